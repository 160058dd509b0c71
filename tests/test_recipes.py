"""Every shipped recipe validates, and runs end to end for one step per stage on a tiny folder with a
tiny backbone substituted through --set, as a user would."""
import json
from pathlib import Path

import pytest

from finetune.cli import main
from finetune.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "bird225_spinal", "bird225_vgg19bn_spinal", "bird225_spinal_staged",
            "caltech101_spinal", "caltech101_spinal_staged"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_starts_with_its_command(path):
    recipe, _ = load_recipe(path)
    first = path.read_text().splitlines()[:3]
    assert first[0].startswith("#")
    assert any(f"finetune train recipes/{path.name}" in line for line in first)


# the quickstart keeps its higher lrs (at 1e-4 its test accuracy fell below the README's 0.98) and carries its
# transitions with an EMA of the weights instead (bench_recipes.py)
STAGED = [p for p in RECIPES if p.stem in ("bird225_spinal_staged", "caltech101_spinal_staged")]


@pytest.mark.parametrize("path", STAGED, ids=lambda p: p.stem)
def test_staged_recipes_unfreeze_gently(path):
    """After the head stage, every stage that trains the backbone keeps its BatchNorm statistics, starts at
    most at lr 1e-4 (photos near ImageNet's) and warms up over a whole epoch (issue 12's stage transitions)."""
    from finetune.config import load_yaml, resolve_raw

    stages = resolve_raw(load_yaml(path.read_text()))["stages"]
    assert stages[0]["train"] == "head" and stages[0]["feature_cache_views"] >= 1
    for stage in stages[1:]:
        assert stage["batchnorm"] == "eval"
        assert stage["optimizer"]["lr"] <= 1e-4
        assert stage["schedule"]["warmup_epochs"] >= 1


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_one_step_per_stage_on_a_tiny_folder(path, tiny_folder, tmp_path):
    recipe, _ = load_recipe(path)
    sets = [
        f"data.root={tiny_folder}", "data.card=null", "data.sample=null", "data.val=0.25", "data.test=0.25",
        "data.num_workers=0", "model.backbone=test_resnet", "model.pretrained=false",
        "training.batch_size=32", "training.device=cpu", f"training.cache_dir={tmp_path / 'cache'}",
    ]
    if recipe.data.input_size not in (None, 224):
        sets.append("data.input_size=32")
        sets += ["data.train_transforms=[{name: Resize, height: 32, width: 32}]",
                 "data.eval_transforms=[{name: Resize, height: 32, width: 32}]"]
    sets += [f"stages.{i}.epochs=1" for i in range(len(recipe.stages))]
    run = tmp_path / "run"
    args = ["train", str(path), "--out", str(run), "--quiet"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == len([s for s in recipe.stages if s.epochs])
    assert "accuracy" in summary["test"]
