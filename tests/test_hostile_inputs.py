"""Hostile input through the real command: every error is one line naming the problem, exit status 2,
and nothing is written (README, "Every error is one line ...").

Each case runs ``finetune ...`` (the console script's ``main``, in this process: conftest's
``finetune_cli``) in a fresh folder holding a good tiny recipe (``recipe.yaml``,
conftest's ``tiny_recipe``), its image folder (``tiny/``) and the case's own files, then checks the exit
status, that stderr is exactly one line of at most ``MAX_MESSAGE`` characters holding the expected text
and no traceback, and that no file or folder appeared; two cases also run as ``python -m finetune`` in a
fresh process. The table keeps to what needs the real command (a traceback, a half-written run folder, an
exit status); variants of one check live as unit tests (tests/test_config.py). To add a case, add a row to
``CASES``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from finetune.errors import MAX_MESSAGE


def tiny_checkpoint(root: Path) -> None:
    """A random-init test_resnet checkpoint at ``root/ckpt`` (classes a, b; 32 px)."""
    from finetune.models.checkpoint import save_checkpoint
    from finetune.models import create_model

    preprocessing = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3,
                     "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    model = create_model("test_resnet", 2, head="linear").eval()
    save_checkpoint(root / "ckpt", model, {"classes": ["a", "b"], "preprocessing": preprocessing, "metrics": {}})


def laughs(levels: int, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: str  # text the one stderr line must hold
    status: int = 2
    files: dict[str, str | bytes] = field(default_factory=dict)  # more files, by path under the folder
    setup: Optional[Callable[[Path], None]] = None  # makes what files can't (a checkpoint)


# `train` where the bug let train start (and write); `validate` (no torch import: seconds faster) otherwise
TRAIN = ("train", "recipe.yaml", "--out", "run")

CASES = [
    # 1. recipes: a "billion laughs" passed validation and ran train out of memory
    Case("recipe-billion-laughs", ("train", "bomb.yaml", "--out", "run"),
         "bomb.yaml: l5: aliases expand to more than 100,000 values",
         files={"bomb.yaml": laughs(9) + "name: *l8\n"}),
    Case("recipe-nested-too-deep", ("validate", "deep.yaml"), "deep.yaml: nested more than 64 levels deep",
         files={"deep.yaml": "name: " + "[" * 5000 + "]" * 5000 + "\n"}),
    Case("recipe-not-utf8", ("validate", "latin1.yaml"), "latin1.yaml: not UTF-8 text (byte 9)",
         files={"latin1.yaml": "name: caf\xe9\n".encode("latin-1")}),
    Case("recipe-over-1-MiB", ("validate", "big.yaml"), "big.yaml: recipe is 1,200,000 bytes; the limit is 1,048,576",
         files={"big.yaml": "#" * 1_199_999 + "\n"}),
    # 2. --set: yaml tracebacks; output.dir placeholders that failed in train with a KeyError
    Case("set-invalid-yaml", ("validate", "recipe.yaml", "--set", "stages.0.epochs=[1"),
         "override stages.0.epochs: not valid YAML"),
    Case("set-python-tag", ("validate", "recipe.yaml", "--set", "name=!!python/object/apply:os.system [touch pwned]"),
         "override name: not valid YAML: could not determine a constructor for the tag"),
    Case("output-dir-unknown-placeholder", ("train", "recipe.yaml", "--set", "output.dir=runs/{foo}"),
         "output.dir: may use only {name}: unknown placeholder 'foo'"),
    # 3. values that passed validation and failed in (or after) training
    Case("num-workers-negative", (*TRAIN, "--set", "data.num_workers=-1"), "data.num_workers: must be 0 or more"),
    Case("drop-rate-not-a-number", (*TRAIN, "--set", "model.backbone_kwargs={drop_rate: abc}"),
         "model.backbone_kwargs: drop_rate must be a number from 0 to 1 (got 'abc')"),
    Case("cache-dir-under-a-file", (*TRAIN, "--set", "training.cache_dir=afile/cache"),
         "afile is a file, not a folder", files={"afile": "a file, not a folder"}),
    Case("eval-batch-size-0", ("eval", "ckpt", "--data", "tiny", "--batch-size", "0"),
         "argument --batch-size: must be 1 or more (got 0)"),
    Case("predict-num-workers-negative", ("predict", "ckpt", "tiny", "--num-workers", "-1"),
         "argument --num-workers: must be auto or a number of processes (0 or more)"),
    Case("predict-topk-0", ("predict", "ckpt", "tiny", "--topk", "0"), "argument --topk: must be 1 or more (got 0)"),
    Case("unknown-option-is-one-line", ("train", "--bogus"), "unrecognized arguments: --bogus"),
    # 11. exit codes and odd runs
    Case("fp16-on-the-cpu", (*TRAIN, "--set", "training.precision=fp16"),
         "training.precision: fp16 on the CPU (training.device: cpu)"),
    Case("predict-every-input-fails", ("predict", "ckpt", "empty.png", "fake.jpg", "--out", "p.csv", "--device", "cpu"),
         "none of the 2 file(s) could be read", files={"empty.png": b"", "fake.jpg": b"not a jpeg"},
         setup=tiny_checkpoint),
    Case("predict-nothing-to-read", ("predict", "ckpt", "gone.png", "tiny/circle/none", "--out", "p.csv"),
         "no such file or folder: gone.png, tiny/circle/none"),
    Case("explain-every-input-fails", ("explain", "ckpt", "empty.png", "fake.jpg", "--out", "heat", "--device", "cpu"),
         "none of the 2 image(s) could be read (first: empty.png: ", files={"empty.png": b"", "fake.jpg": b"not a jpeg"},
         setup=tiny_checkpoint),
    # error lines are capped, however long the value they name
    Case("recipe-path-too-long", ("validate", "x" * 5000 + ".yaml"),
         "cannot read the recipe (File name too long): xxx"),
]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def prepare(case: Case, tmp_path: Path, tiny_recipe) -> set[str]:
    """The case's folder: the good recipe, its images, the case's files; what it holds before the command."""
    tiny_recipe["output"] = {"dir": "runs/{name}"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe))
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if case.setup:
        case.setup(tmp_path)
    return snapshot(tmp_path)


def check(case: Case, returncode: int, stdout: str, stderr: str) -> None:
    lines = stderr.splitlines()
    assert returncode == case.status, stderr[-2000:]
    assert "Traceback" not in stderr + stdout
    assert len(lines) == 1, stderr[-2000:]
    assert case.expect in lines[0]
    assert len(lines[0]) <= MAX_MESSAGE


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_writes_nothing(case: Case, tmp_path: Path, tiny_recipe, finetune_cli):
    before = prepare(case, tmp_path, tiny_recipe)

    done = finetune_cli(*case.argv, cwd=tmp_path, env={"FINETUNE_CACHE": str(tmp_path / "default-cache")})

    check(case, done.returncode, done.stdout, done.stderr)
    assert snapshot(tmp_path) == before  # no run folder, cache, output file or anything else


# Through `python -m finetune` in a fresh process: what the in-process table can't see (warnings printed
# while modules import, the process's own exit status) for one case that fails before torch is imported
# and one that fails in training.
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("recipe-nested-too-deep", "fp16-on-the-cpu")],
                         ids=lambda c: c.id)
def test_hostile_input_through_a_real_process_is_one_line_exit_2(case: Case, tmp_path: Path, tiny_recipe):
    before = prepare(case, tmp_path, tiny_recipe)
    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path / "default-cache"), "OMP_NUM_THREADS": "1"}

    done = subprocess.run([sys.executable, "-m", "finetune", *case.argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)

    check(case, done.returncode, done.stdout, done.stderr)
    assert snapshot(tmp_path) == before
