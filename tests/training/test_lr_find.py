"""The learning-rate finder: the sweep's shape, its suggestion, cached features for head-only stages."""
import json

import numpy as np
import pytest
import yaml

from finetune.cli import main
from finetune.config import parse_recipe
from finetune.models import FinetuneModel
from finetune.training.lr_find import lr_find, suggest


@pytest.fixture
def forwards(monkeypatch):
    """Counts the whole model's forward passes (backbone + head); cached features go through the head alone."""
    calls = []
    original = FinetuneModel.forward

    def counting(self, x):
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(FinetuneModel, "forward", counting)
    return calls


def test_sweep_falls_then_diverges_and_suggests_an_lr_where_the_loss_falls(tiny_recipe, tmp_path, forwards):
    tiny_recipe["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    tiny_recipe["optimizer"] = {"name": "sgd", "lr": 0.1, "weight_decay": 0.0}

    result = lr_find(parse_recipe(tiny_recipe), tiny_recipe, stage=0, out_dir=tmp_path / "lr", start_lr=1e-4,
                     end_lr=1e3, num_updates=60)

    lrs, smoothed = np.array(result["lrs"]), np.array(result["smoothed"])
    assert not result["cached_features"] and len(forwards) == result["num_updates"] == len(lrs)
    assert np.all(np.diff(np.log(lrs)) > 0) and lrs[0] == pytest.approx(1e-4)
    assert "exceeded 4x its minimum" in result["stopped"]  # SGD at lr ~100 blows up: the sweep stops early
    assert smoothed[-1] > 4 * smoothed.min() and smoothed.min() < smoothed[0]
    i = result["lrs"].index(result["suggested_lr"])
    assert lrs[0] <= result["suggested_lr"] < result["min_loss_lr"] <= lrs[-1]
    assert smoothed[min(i + 1, len(lrs) - 1)] < smoothed[i - 1]  # the smoothed loss falls there
    written = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert written["suggested_lr"] == result["suggested_lr"] and written["losses"] == result["losses"]
    assert (tmp_path / "lr" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["lr", "tiny"]  # no run folder


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = list(np.logspace(-6, 1, 50))
    smoothed = list(np.r_[np.full(10, 2.0), np.linspace(2.0, 1.9, 10), np.linspace(1.9, 0.5, 5),
                          np.linspace(0.5, 0.45, 15), np.linspace(0.5, 3.0, 10)])
    suggested, at_min = suggest(lrs, smoothed)
    assert lrs.index(suggested) in range(20, 25) and lrs.index(at_min) == 39


def test_head_stage_sweeps_on_cached_features_from_the_command(tiny_recipe, tmp_path, forwards, capsys):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe))

    assert main(["lr-find", str(tmp_path / "r.yaml"), "--stage", "0", "--set", "stages.0.feature_cache=true",
                 "--updates", "30", "--out", str(tmp_path / "lr")]) == 0

    result = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert result["cached_features"] and result["num_updates"] == 30 and result["stage_name"] == "head"
    assert forwards == []  # no forward through the backbone per update: the head ran on cached features
    assert "suggested lr" in capsys.readouterr().out
    assert main(["lr-find", str(tmp_path / "r.yaml"), "--stage", "5"]) == 2
    assert "--stage must be 0..1" in capsys.readouterr().err


def test_sweep_of_a_mixup_stage_trains_on_mixed_batches(tiny_recipe, tmp_path, monkeypatch):
    from finetune.training.mixing import BatchMixer

    mixed = []
    original = BatchMixer.__call__

    def counting(self, inputs, labels):
        out = original(self, inputs, labels)
        mixed.append(out[1].shape)
        return out

    monkeypatch.setattr(BatchMixer, "__call__", counting)
    tiny_recipe["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    tiny_recipe["training"]["mixup"] = {"mixup_alpha": 0.4}
    result = lr_find(parse_recipe(tiny_recipe), tiny_recipe, stage=0, out_dir=tmp_path / "lr", num_updates=4)
    assert len(mixed) == result["num_updates"] == 4 and all(shape[1] == 3 for shape in mixed)
