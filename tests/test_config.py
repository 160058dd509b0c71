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
        ("training.ema_warmup", "true", r"training: .*ema_warmup needs ema, the decay it ramps up to"),
        ("data.store", "4", r"data\.store: .*at least 8 px"),
        ("data.store", "sometimes", r"data\.store: "),
        ("data.store_budget", "lots", r"data\.store_budget: .*a number with a unit"),
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


# --------------------------------------------------------------------------- hostile recipes (issue 15)

def write_recipe(tmp_path, text: str | bytes, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BASE_YAML = yaml.safe_dump(BASE)


def laughs(levels: int, width: int = 9) -> str:
    """A "billion laughs" YAML: ``levels`` lists of ``width`` aliases to the level below (width**levels leaves)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_expansion_beyond_the_bound_is_refused(tmp_path):
    # under 1 KB of YAML that expands to 9**6 = 531,441 strings where a name should be
    path = write_recipe(tmp_path, laughs(6) + BASE_YAML.replace("data:", "name: *l5\ndata:", 1))
    assert path.stat().st_size < 1024
    with pytest.raises(FinetuneError, match=r"r\.yaml: l5: aliases expand to more than 100,000 values") as err:
        load_recipe(path)
    assert len(str(err.value)) <= 500


def test_aliases_and_merge_keys_within_the_bound_work(tmp_path):
    path = write_recipe(tmp_path, (
        "data: {root: /nowhere}\n"
        "model: {backbone: test_resnet}\n"
        "optimizer: &opt {lr: 0.01}\n"
        "stages:\n"
        "- {epochs: 1, train: head, optimizer: *opt}\n"
        "- {epochs: 1, train: all, optimizer: {<<: *opt, weight_decay: 0}}\n"
    ))
    recipe, _ = load_recipe(path)
    assert [s.optimizer.lr for s in recipe.stages] == [0.01, 0.01]
    assert recipe.stages[1].optimizer.weight_decay == 0


def test_recursive_alias_is_refused(tmp_path):
    path = write_recipe(tmp_path, BASE_YAML + "loop: &loop [1, *loop]\n")
    with pytest.raises(FinetuneError, match=r"r\.yaml: loop\.1: recursive alias"):
        load_recipe(path)


def test_deeply_nested_recipe_is_refused(tmp_path):
    path = write_recipe(tmp_path, BASE_YAML + "deep: " + "[" * 2000 + "]" * 2000 + "\n")
    with pytest.raises(FinetuneError, match=r"nested more than \d+ levels deep"):
        load_recipe(path)


def test_recipe_over_the_size_cap_is_refused_before_parsing(tmp_path):
    path = write_recipe(tmp_path, BASE_YAML + ("# padding\n" * 120_000))  # 1.2 MB of comments
    with pytest.raises(FinetuneError, match=r"r\.yaml: recipe is 1,2\d\d,\d\d\d bytes; the limit is 1,048,576"):
        load_recipe(path)


def test_recipe_that_is_not_utf8_text_is_refused(tmp_path):
    path = write_recipe(tmp_path, b"name: \xff\xfe\x00run\n" + BASE_YAML.encode())
    with pytest.raises(FinetuneError, match=r"r\.yaml: not UTF-8 text"):
        load_recipe(path)


def test_error_messages_are_capped_and_show_values_truncated(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["training"] = {"batch_size": "x" * 100_000}
    with pytest.raises(FinetuneError, match=r"training\.batch_size: .*integer.*\(got 'xxx.*\.\.\.") as err:
        parse_recipe(raw)
    assert len(str(err.value)) <= 500
    raw = copy.deepcopy(BASE)
    raw["training"] = {f"unknown_{i}": i for i in range(1000)}
    with pytest.raises(FinetuneError, match=r"training\.unknown_0: unknown key \(\+999 more: ") as err:
        parse_recipe(raw)
    assert len(str(err.value)) <= 500


@pytest.mark.parametrize("assignment,message", [
    ("stages.0.epochs=[1", r"override stages\.0\.epochs: not valid YAML"),
    ("name=!!python/object/apply:os.system [echo hi]",
     r"override name: not valid YAML: could not determine a constructor"),
    ("name=*undefined", r"override name: not valid YAML: found undefined alias"),
])
def test_overrides_with_bad_yaml_are_one_line_errors(assignment, message):
    with pytest.raises(FinetuneError, match=message) as err:
        apply_override(copy.deepcopy(BASE), assignment)
    assert "\n" not in str(err.value)


def test_overrides_refuse_alias_bombs():
    with pytest.raises(FinetuneError, match=r"override name: l5: aliases expand to more than 100,000 values"):
        apply_override(copy.deepcopy(BASE), "name=" + laughs(7).replace("\n", ", ").join("{}"))


@pytest.mark.parametrize("value,message", [
    ("runs/{foo}", r"output\.dir: may use only \{name\}: unknown placeholder 'foo' \(got 'runs/\{foo\}'\)"),
    ("runs/{0}", r"output\.dir: may use only \{name\}: .*\(got 'runs/\{0\}'\)"),
    ("runs/{name", r"output\.dir: may use only \{name\}: expected '\}' before end of string"),
])
def test_output_dir_may_only_use_the_name_placeholder(value, message):
    raw = copy.deepcopy(BASE)
    raw["output"] = {"dir": value}
    with pytest.raises(FinetuneError, match=message):
        parse_recipe(raw)


def test_output_dir_with_the_name_placeholder_is_fine():
    raw = copy.deepcopy(BASE)
    raw["output"] = {"dir": "runs/{name}-{name}"}
    assert parse_recipe(raw).output.dir == "runs/{name}-{name}"


@pytest.mark.parametrize("path,value,message", [
    ("data.num_workers", "-1", r"data\.num_workers: must be 0 or more .*\(got -1\)"),
    ("model.backbone_kwargs", "{drop_rate: abc}",
     r"model\.backbone_kwargs: drop_rate must be a number from 0 to 1 \(got 'abc'\)"),
    ("model.backbone_kwargs", "{drop_path_rate: 1.5}",
     r"model\.backbone_kwargs: drop_path_rate must be a number from 0 to 1 \(got 1\.5\)"),
    ("model.backbone_kwargs", "{drop_rate: true}", r"model\.backbone_kwargs: drop_rate must be a number"),
])
def test_values_that_used_to_fail_only_in_training_fail_validation(path, value, message):
    with pytest.raises(FinetuneError, match=message):
        parse_recipe(recipe_with(path, value))


def test_sensible_workers_and_drop_rates_pass():
    raw = recipe_with("model.backbone_kwargs", "{drop_rate: 0.2, drop_path_rate: 0}")
    apply_override(raw, "data.num_workers=0")
    recipe = parse_recipe(raw)
    assert recipe.model.backbone_kwargs == {"drop_rate": 0.2, "drop_path_rate": 0}
    assert recipe.data.num_workers == 0
    assert parse_recipe(recipe_with("data.num_workers", "auto")).data.num_workers == "auto"


def test_cache_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(FinetuneError, match=r"training\.cache_dir: .*afile is a file, not a folder"):
        parse_recipe(recipe_with("training.cache_dir", str(tmp_path / "afile" / "cache")))
    with pytest.raises(FinetuneError, match=r"training\.cache_dir: .*afile is a file, not a folder"):
        parse_recipe(recipe_with("training.cache_dir", str(tmp_path / "afile")))
    ok = parse_recipe(recipe_with("training.cache_dir", str(tmp_path / "new" / "cache")))
    assert ok.training.cache_dir == str(tmp_path / "new" / "cache")
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_fp16_on_the_cpu_is_refused_at_validation(monkeypatch):
    import torch

    with pytest.raises(FinetuneError, match=r"training\.precision: fp16 on the CPU \(training\.device: cpu\)"):
        parse_recipe(recipe_with("training", "{precision: fp16, device: cpu}"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FinetuneError, match=r"training\.precision: fp16 on the CPU \(training\.device: auto, no CUDA"):
        parse_recipe(recipe_with("training", "{precision: fp16}"))
    assert parse_recipe(recipe_with("training", "{precision: bf16, device: cpu}")).training.precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_recipe(recipe_with("training", "{precision: fp16}")).training.precision == "fp16"


def test_data_store_takes_auto_off_or_a_size_and_the_old_resize_cache_means_a_size():
    assert parse_recipe(BASE).data.store == "auto"
    assert parse_recipe(recipe_with("data.store", "off")).data.store == "off"
    assert parse_recipe(recipe_with("data.store", "96")).data.store == 96
    assert parse_recipe(recipe_with("data.store_budget", "1.5GB")).data.store_budget == 1_500_000_000
    assert parse_recipe(recipe_with("data.store_budget", "2GiB")).data.store_budget == 2 * 2**30
    with pytest.warns(DeprecationWarning, match="data.store: N"):
        assert parse_recipe(recipe_with("data.resize_cache", "128")).data.store == 128
