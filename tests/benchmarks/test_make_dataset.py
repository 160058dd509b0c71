"""benchmarks/make_dataset.py: the generated folders are what finetune's data layer expects of Bird-225 and
Caltech-101 (layouts, planted bad files found, sizes in range), and the same seed gives the same bytes."""
from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

import pytest

from finetune.cli import main as finetune_main

from .test_benchmarks import BENCH_DIR


@pytest.fixture(scope="module")
def script():
    """The script as the module ``make_dataset``, importable by its worker processes, as when run directly."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module("make_dataset")


@pytest.fixture(scope="module")
def made(tmp_path_factory, script):
    work = tmp_path_factory.mktemp("made")
    doc = script.main(["--tiny", str(work / "data"), "--out", str(work / "results")])
    return work, doc


def inspect(root: Path, capsys) -> dict:
    capsys.readouterr()
    assert finetune_main(["data", "inspect", str(root), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "dataset.json"}


@pytest.mark.parametrize("variant, layout", [("bird225", "pre-split"), ("caltech101", "folder")])
def test_the_data_layer_sees_the_layout_classes_and_planted_bad_files(made, capsys, variant, layout):
    work, doc = made
    planned = doc["variants"][variant]
    found = inspect(work / "data" / planned["root"], capsys)
    assert found["layout"] == layout == planned["layout"]
    assert len(found["classes"]) == planned["classes"]
    if layout == "pre-split":
        assert found["split_folders"] == {"train": "train", "val": "valid", "test": "test"}
        usable = {split: sum(per_class.values()) for split, per_class in found["counts"].items()}
        assert usable == {"train": planned["images"]["train"], "val": planned["images"]["valid"],
                          "test": planned["images"]["test"]}
        assert "BIRD 001" in found["classes"]
    else:
        assert sum(found["counts"]["all"].values()) == planned["images"]["all"]
        assert "BACKGROUND_Google" in found["classes"]
    # every planted bad file is reported, and nothing else
    assert sorted(b["path"] for b in found["bad_files"]) == sorted(b["path"] for b in planned["bad_files"])
    assert {b["kind"] for b in planned["bad_files"]} == {"truncated", "empty", "not-an-image"}
    # photo sizes vary within 224-500 px (after EXIF orientation), with greyscale and alpha among them
    for axis in ("width", "height"):
        stats = found["image_size"][axis]
        assert 224 <= stats["min"] < stats["max"] <= 500
    assert {"RGB", "L", "RGBA"} <= set(found["modes"])
    assert found["duplicates"] == []
    assert {k: len(v) for k, v in planned["special"].items()} == {"png": 1, "png-alpha": 1, "grey": 1, "exif": 1}


def test_the_generation_is_recorded_like_a_benchmark(made):
    work, doc = made
    result = json.loads((work / "results" / "results" / "dataset.json").read_text())
    assert result["tiny"] is True and result["results"]["files"] == doc["files"] > 0
    assert result["results"]["seconds"] > 0
    assert "The benchmark dataset" in (work / "results" / "RESULTS.md").read_text()


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_images(made, script, tmp_path):
    """Also across process counts: every image has its own seed."""
    work, doc = made
    settings = doc["settings"]
    again = script.generate(tmp_path / "again", seed=0, workers=2, **settings)
    script.generate(tmp_path / "other", seed=1, workers=1, **settings)
    first = digest(work / "data")
    assert digest(tmp_path / "again") == first
    assert again["variants"] == doc["variants"]
    changed = digest(tmp_path / "other")
    assert sum(changed.get(path) != h for path, h in first.items()) > len(first) // 2
