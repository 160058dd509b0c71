"""The hub-format model folder (issue 26, part 3): `finetune export --format hub` writes timm's Hugging Face layout
that plain timm loads (a linear head: equal logits), finetune loads whatever the head (`local-dir:`, `hf-hub:`), with
a model card made from the run; `finetune push` uploads it in one call, or refuses in one line."""
import copy
import csv
import json

import pytest
import timm
import torch

from finetune.cli import main
from finetune.config import parse_recipe
from finetune.training.runner import run_training

pytestmark = pytest.mark.slow


def _train(tiny_recipe, run_dir, head):
    raw = copy.deepcopy(tiny_recipe)
    raw["model"]["head"] = head
    raw["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    run_training(parse_recipe(raw), raw, run_dir=run_dir, quiet=True)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders of a linear-head and a spinal-head model on the tiny folder."""
    from tests.conftest import TINY_RECIPE, write_tiny_folder

    tmp = tmp_path_factory.mktemp("hub")
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["root"] = str(write_tiny_folder(tmp / "data", per_class=12, size=36))
    raw["training"]["cache_dir"] = str(tmp / "cache")
    return {"linear": _train(raw, tmp / "linear", "linear"), "spinal": _train(raw, tmp / "spinal", {"name": "spinal", "width": 16})}


def _export(run_dir, out):
    assert main(["export", str(run_dir), "--format", "hub", "--out", str(out)]) == 0
    return out


def _batch(seed=0):
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_a_linear_head_folder_loads_in_plain_timm_with_the_checkpoints_logits_and_its_config(runs, tmp_path):
    from finetune.models.checkpoint import load_checkpoint

    out = _export(runs["linear"], tmp_path / "hub")
    model, meta = load_checkpoint(runs["linear"])
    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = _batch()
    with torch.inference_mode():
        torch.testing.assert_close(net(x), model(x), atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == meta["backbone"] == "test_resnet"
    assert config["num_classes"] == len(meta["classes"]) and config["label_names"] == meta["classes"]
    pre, cfg = meta["preprocessing"], config["pretrained_cfg"]
    assert list(cfg["input_size"]) == pre["input_size"] and cfg["crop_pct"] == pre["crop_pct"]
    assert list(cfg["mean"]) == pytest.approx(pre["mean"]) and list(cfg["std"]) == pytest.approx(pre["std"])
    assert config["finetune"]["head"]["name"] == "linear" and not (out / "finetune_head.safetensors").exists()
    # timm's own data config from the folder is the checkpoint's preprocessing
    data = timm.data.resolve_data_config({}, model=net)
    assert tuple(data["input_size"]) == tuple(pre["input_size"]) and data["crop_pct"] == pre["crop_pct"]


def test_the_model_card_holds_the_runs_test_metrics_and_per_class_table(runs, tmp_path):
    out = _export(runs["linear"], tmp_path / "hub")
    card = (out / "README.md").read_text()
    metrics = json.loads((runs["linear"] / "eval" / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: timm\n")
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card
    assert f"| macro-F1 | {metrics['macro_f1']:.4f} |" in card
    assert f"Test split, {metrics['num_samples']} images" in card
    with open(runs["linear"] / "eval" / "per_class.csv") as f:
        rows = list(csv.reader(f))
    for row in rows:
        assert "| " + " | ".join(row) + " |" in card
    assert "## Intended use and limits" in card and '"backbone": "test_resnet"' in card


def test_a_spinal_head_folder_loads_in_finetune_and_its_backbone_in_timm(runs, tmp_path):
    import finetune
    from finetune.models.checkpoint import load_checkpoint

    out = _export(runs["spinal"], tmp_path / "hub")
    model, meta = load_checkpoint(runs["spinal"])
    predictor = finetune.load(f"local-dir:{out}")
    x = _batch(1)
    with torch.inference_mode():
        torch.testing.assert_close(predictor.model(x), model(x), atol=1e-6, rtol=0)
        backbone = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert backbone.num_classes == 0
        torch.testing.assert_close(backbone(x), model.backbone(x), atol=1e-6, rtol=0)
    assert (out / "finetune_head.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: finetune" in card and "loads the backbone alone" in card
    # the commands take the folder as a checkpoint
    images = sorted(p for p in (runs["spinal"].parent / "data").rglob("*.png"))[:3]
    assert main(["predict", f"local-dir:{out}", *map(str, images), "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", str(runs["spinal"]), *map(str, images), "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_hf_hub_references_load_the_downloaded_folder(runs, tmp_path, monkeypatch):
    import huggingface_hub

    import finetune

    out = _export(runs["spinal"], tmp_path / "hub")
    asked = []

    def fake_snapshot_download(repo_id, revision=None, **kwargs):  # the network call only
        asked.append((repo_id, revision))
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    predictor = finetune.load("hf-hub:someone/tiny@v1")
    assert asked == [("someone/tiny", "v1")] and predictor.classes == finetune.load(str(runs["spinal"])).classes


def test_a_hub_folder_with_a_tampered_config_is_refused_in_one_line(runs, tmp_path, capsys):
    out = _export(runs["linear"], tmp_path / "hub")
    config = json.loads((out / "config.json").read_text())
    config["num_classes"] += 1
    (out / "config.json").write_text(json.dumps(config))
    image = next((runs["linear"].parent / "data").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", f"local-dir:{out}", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.json: num_classes" in err


def test_export_hub_refuses_a_folder_of_other_files_and_leaves_it_alone(runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", str(runs["linear"]), "--format", "hub", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not an earlier hub export" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _export(runs["linear"], tmp_path / "hub")
    _export(runs["linear"], tmp_path / "hub")  # an earlier export is replaced


def test_push_uploads_the_folder_in_one_commit(runs, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    out = _export(runs["spinal"], tmp_path / "hub")
    calls = []

    class Commit:
        commit_url = "https://huggingface.co/someone/tiny/commit/abc"

    def create_repo(self, repo_id, **kwargs):  # the network calls only: what is sent is the real folder
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return Commit()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["push", str(out), "--repo", "someone/tiny", "--private"]) == 0
    assert "commit/abc" in capsys.readouterr().out
    (_, repo, create), (_, repo2, upload) = calls
    assert repo == repo2 == "someone/tiny" and create["private"] is True
    assert upload["folder_path"] == str(out)
    assert sorted(upload["allow_patterns"]) == sorted(p.name for p in out.iterdir())
    assert set(upload["allow_patterns"]) == {"config.json", "model.safetensors", "finetune_head.safetensors",
                                             "checkpoint.json", "README.md"}


@pytest.mark.parametrize("case", ["no token", "offline", "not a hub folder", "bad repo"])
def test_push_refuses_in_one_line_and_sends_nothing(case, runs, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    out = _export(runs["linear"], tmp_path / "hub")
    sent = []
    if case != "offline":
        monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sent.append(kw))
        monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **kw: sent.append(kw))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no CLI login there
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if case != "no token":
        monkeypatch.setenv("HF_TOKEN", "hf_test")
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = runs["linear"] if case == "not a hub folder" else out
    repo = "just-a-name" if case == "bad repo" else "someone/tiny"
    capsys.readouterr()
    assert main(["push", str(folder), "--repo", repo]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and not sent
    assert {"no token": "no Hugging Face token", "offline": "nothing was committed",
            "not a hub folder": "is not a hub-format model folder", "bad repo": "OWNER/NAME"}[case] in err


def test_benchmark_times_the_hub_folder_as_finetune_and_plain_timm_load_it(runs, tmp_path, monkeypatch):
    from finetune.deploy.benchmark import _hub_runners, benchmark

    def no_compile(*args, **kwargs):  # its row is not what this test is about, and compiling takes most of its time
        raise RuntimeError("not in this test")

    monkeypatch.setattr(torch, "compile", no_compile)
    out = _export(runs["linear"], tmp_path / "hub")
    result = benchmark([runs["linear"], out], batches=[2], iterations=2, warmup=1, devices=["cpu"], aa=True)
    rows = {r["backend"]: r for r in result["rows"]}
    assert result["checkpoint"] == str(runs["linear"] / "checkpoints" / "best")  # the run, not the folder
    assert rows["hub folder (finetune.load)"]["status"] == rows["hub folder (plain timm)"]["status"] == "ok"
    # the A/A row: a second session of the same fp32 model, its ratio to the first reported
    assert rows["onnxruntime fp32 (A/A)"]["status"] == "ok" and set(result["aa_ratio"]) == {"cpu/2"}
    assert result["aa_ratio"]["cpu/2"] == pytest.approx(
        rows["onnxruntime fp32"]["latency_ms"]["median"] / rows["onnxruntime fp32 (A/A)"]["latency_ms"]["median"])
    # a spinal head's folder: finetune loads it, plain timm only its backbone (the row says why)
    spinal = _hub_runners(_export(runs["spinal"], tmp_path / "hub-spinal"), "cpu")
    assert callable(spinal["hub folder (finetune.load)"])
    assert spinal["hub folder (plain timm)"].startswith("unavailable: not a linear head")
    # without a hub folder or aa: no such rows
    plain = {r["backend"] for r in benchmark(runs["linear"], batches=[2], iterations=1, warmup=1,
                                             devices=["cpu"])["rows"]}
    assert not any(b.startswith("hub folder") or "A/A" in b for b in plain)
