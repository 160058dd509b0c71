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
        ("model.backbone", "pit_ti_224", r"stages\.1\.train: pit_ti_224 has no timm group_matcher to split it "
                                         r"into stages for 'last:N'; select its parameters with regexes"),
        ("model.backbone", "rdnet_tiny", r"stages\.1\.train: rdnet_tiny has no coarse timm group_matcher to split "
                                         r"it into stages for 'last:N'; select its parameters with regexes"),
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


@pytest.mark.parametrize(
    "model,input_size,message",
    [
        # swin's window layout is fixed by the img_size it is built for: 32-px images crash its first forward
        ({"backbone": "swin_tiny_patch4_window7_224"}, 32,
         r"model: swin_tiny_patch4_window7_224 cannot take 3×32×32 images: .*backbone_kwargs\.img_size"),
        # global_pool '' leaves a feature map: the head would get (N, C, H, W)
        ({"backbone": "test_resnet", "backbone_kwargs": {"global_pool": ""}}, 32,
         r"model: test_resnet returns features of shape \[96, 1, 1\] per image, not pooled"),
    ],
)
def test_validate_catches_a_backbone_the_head_or_input_size_does_not_fit(model, input_size, message):
    raw = copy.deepcopy(BASE)
    raw["model"] = {"head": "spinal", **model}
    raw["data"]["input_size"] = input_size
    raw["stages"] = [{"epochs": 1, "train": "head"}]
    with pytest.raises(FinetuneError, match=message) as err:
        parse_recipe(raw)
    assert "\n" not in str(err.value)


def test_backbone_built_for_an_img_size_validates_with_that_input_size_by_default():
    raw = copy.deepcopy(BASE)
    raw["model"] = {"backbone": "deit_tiny_patch16_224", "head": "spinal", "backbone_kwargs": {"img_size": 32}}
    parse_recipe(raw)  # fed 32 px images, not the 224 it would fail on
    raw["data"]["input_size"] = 64
    with pytest.raises(FinetuneError, match=r"deit_tiny_patch16_224 cannot take 3×64×64 images: Input height"):
        parse_recipe(raw)


def test_a_head_that_does_not_fit_the_backbone_features_fails_validation(monkeypatch):
    import finetune.models.factory as factory

    # a timm model whose declared width is not what it returns (as num_features is for pre-logits models)
    monkeypatch.setattr(factory, "pooled_width", lambda backbone: backbone.num_features)
    raw = copy.deepcopy(BASE)
    raw["model"] = {"backbone": "mobilenetv3_small_050", "head": "linear"}
    with pytest.raises(FinetuneError, match=r"model: mobilenetv3_small_050 returns 1024 features .* head .* 288"):
        parse_recipe(raw)


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
