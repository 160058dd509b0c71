"""Every backbone family × every head: create, forward, train each stage kind, save, load, predict, export."""
import copy

import numpy as np
import yaml

import finetune
from finetune.checkpoint import load_checkpoint


def test_pre_logits_backbone_trains_its_head_from_cached_features_end_to_end(tiny_recipe, tmp_path):
    # mobilenetv3 widens its 576 pooled channels to 1024 in a pre-logits conv_head: the cached features and
    # the head both have the 1024 the backbone returns
    raw = copy.deepcopy(tiny_recipe)
    raw["model"] = {"backbone": "mobilenetv3_small_050", "pretrained": False, "head": {"name": "linear"}}
    raw["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": True}]
    raw["output"] = {"evaluate_test": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    summary = finetune.train(recipe, out=tmp_path / "run")

    [entry] = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()]
    assert np.load(entry / "train.npy", mmap_mode="r").shape[-1] == 1024
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert model.head[-1].in_features == 1024
    assert summary["best_epoch"] == 1
