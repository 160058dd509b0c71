import copy

import pytest
import yaml

from finetune.cli import main
from finetune.config import apply_override, load_recipe, parse_recipe
from finetune.errors import FinetuneError

BASE = {
    "data": {"root": "/nowhere"},
    "model": {"backbone": "test_resnet", "head": "spinal"},
    "optimizer": {"lr": 1e-3},
    "stages": [{"epochs": 1, "train": "head"}, {"epochs": 1, "train": "last:2"}],
}


def recipe_with(path, value):
    raw = copy.deepcopy(BASE)
    apply_override(raw, f"{path}={value}")
    return raw


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("training.bogus", "1", r"training\.bogus: unknown key"),
        ("training.batch_size", "big", r"training\.batch_size: .*integer.*'big'"),
        ("stages.0.optimizer.lr", "-0.1", r"stages\.0\.optimizer\.lr: .*greater than 0"),
        ("stages.1.train", "'layer9\\.'", r"stages\.1\.train: 'layer9\\\.' matches no parameter of test_resnet"),
        ("stages.1.train", "last:9", r"stages\.1\.train: 'last:9' asks for 9 stages but test_resnet has 5"),
        ("model.head", "{name: spinal, depth: 3}", r"model\.head\.depth: head 'spinal' has no option 'depth'"),
        ("model.head", "nope", r"model\.head: unknown head 'nope'"),
        ("model.backbone", "resnet_nope", r"model\.backbone: unknown timm backbone 'resnet_nope'"),
        ("stages.0.optimizer.name", "sgdx", r"stages\.0\.optimizer\.name: unknown optimizer 'sgdx'"),
        ("training.precision", "fp8", r"training\.precision: "),
        ("training.device", "tpu", r"training\.device: device must be auto, cpu, cuda or cuda:N"),
        ("stages.0.epochs", "-1", r"stages\.0\.epochs: .*greater than or equal to 0"),
        ("schedule.name", "linear", r"stages\.0\.schedule\.name: "),
    ],
)
def test_bad_recipe_values_give_one_clear_error_naming_the_key_path(path, value, message):
    with pytest.raises(FinetuneError, match=message) as err:
        parse_recipe(recipe_with(path, value))
    assert "\n" not in str(err.value)


def test_top_level_optimizer_is_a_default_each_stage_overrides_field_by_field():
    raw = copy.deepcopy(BASE)
    raw["optimizer"] = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01}
    raw["stages"][1]["optimizer"] = {"lr": 1e-4}
    recipe = parse_recipe(raw)
    assert recipe.stages[0].optimizer.lr == 1e-3
    assert recipe.stages[1].optimizer.lr == 1e-4
    assert recipe.stages[1].optimizer.weight_decay == 0.01


def test_overrides_parse_yaml_values_and_reject_bad_paths():
    raw = copy.deepcopy(BASE)
    apply_override(raw, "stages.0.epochs=3")
    apply_override(raw, "data.exclude=[a, b]")
    assert raw["stages"][0]["epochs"] == 3 and raw["data"]["exclude"] == ["a", "b"]
    with pytest.raises(FinetuneError, match="stages.5 is not an index of a list of 2"):
        apply_override(raw, "stages.5.epochs=1")
    with pytest.raises(FinetuneError, match="must look like key.path=value"):
        apply_override(raw, "stages.0.epochs")


def test_load_recipe_returns_the_resolved_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    recipe, resolved = load_recipe(path, ["stages.0.epochs=4"])
    assert recipe.stages[0].epochs == 4
    assert resolved["stages"][0]["epochs"] == 4
    assert resolved["stages"][1]["optimizer"]["lr"] == 1e-3  # defaults merged in
    assert resolved["training"]["batch_size"] == 32  # schema defaults made explicit


def test_train_with_a_bad_recipe_writes_nothing(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_with("stages.0.optimizer.lr", "-1")))
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stages.0.optimizer.lr" in err and "Traceback" not in err
    assert not out.exists()


def test_validate_command_checks_without_training(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["validate", str(path), "--set", "training.bogus=1"]) == 2
    assert "training.bogus: unknown key" in capsys.readouterr().err


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(FinetuneError, match="not valid YAML"):
        load_recipe(path)
