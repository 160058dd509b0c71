"""OpenVINO export (issue 26, part 2): fp32 parity with the checkpoint, NNCF accuracy-controlled int8 that keeps its
agreement with fp32 within the budget, `finetune eval` and `finetune benchmark` on the export folder, bad input."""
import json

import numpy as np
import pytest
import torch

from finetune.cli import main
from finetune.deploy.export import export_model
from finetune.models.checkpoint import load_checkpoint

openvino = pytest.importorskip("openvino")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tests.evaluation.conftest import COLOURS, write_images

    return write_images(tmp_path_factory.mktemp("ov-images"), {name: [colour] * 12 for name, colour in COLOURS.items()})


def test_fp32_export_gives_the_checkpoints_logits(checkpoint, tmp_path):
    from finetune.deploy.openvino import OpenVINOModel

    out = export_model(checkpoint, format="openvino", out=tmp_path / "ov")
    assert sorted(p.name for p in out.iterdir()) == ["model.bin", "model.json", "model.xml"]
    model, meta = load_checkpoint(checkpoint)
    x = torch.randn(5, *meta["preprocessing"]["input_size"], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(x)
    got = OpenVINOModel(out)(x)
    assert got.shape == expected.shape and (got - expected).abs().max().item() <= 1e-3
    info = json.loads((out / "model.json").read_text())
    assert info["format"] == "openvino" and info["classes"] == meta["classes"] and "quantization" not in info


def test_int8_keeps_its_agreement_with_fp32_within_the_budget_and_eval_reports_its_accuracy(checkpoint, images, tmp_path,
                                                                                            capsys):
    from finetune.deploy.openvino import OpenVINOModel

    paths = sorted(str(p) for p in images.rglob("*.png"))
    out = export_model(checkpoint, format="openvino", out=tmp_path / "ov8", quantize="int8",
                       calibration_images=paths[0::2], validation_images=paths[1::2], max_drop=0.01)
    info = json.loads((out / "model.json").read_text())
    q = info["quantization"]
    assert q["method"] == "nncf accuracy control" and q["max_drop"] == 0.01
    assert q["calibration_images"] == len(paths[0::2]) and q["validation_images"] == len(paths[1::2])
    assert q["agreement_with_fp32"] >= 0.99
    # the agreement it states holds: top-1 of int8 against the checkpoint on the validation images
    from finetune.deploy.openvino import _arrays

    model, meta = load_checkpoint(checkpoint)
    x = torch.from_numpy(np.concatenate(_arrays(paths[1::2], meta["preprocessing"])))
    with torch.inference_mode():
        agree = (OpenVINOModel(out)(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree == pytest.approx(q["agreement_with_fp32"])
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(images), "--split", "all", "--out", str(tmp_path / "ev"),
                 "--reference", str(checkpoint), "--no-explain", "--num-workers", "0"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["num_samples"] == len(paths) and "accuracy_delta" in metrics["reference"]
    assert "OpenVINO" in (tmp_path / "ev" / "report.html").read_text()


def test_benchmark_times_the_openvino_export(checkpoint, tmp_path):
    from finetune.deploy.benchmark import benchmark

    out = export_model(checkpoint, format="openvino", out=tmp_path / "ov")
    result = benchmark([checkpoint, out], batches=[2], iterations=2, warmup=1, devices=["cpu"])
    row = next(r for r in result["rows"] if r["backend"] == "openvino fp32")
    assert row["status"] == "ok" and row["images_per_s"] > 0


def test_openvino_int8_of_a_checkpoint_without_a_calibration_split_is_one_line(checkpoint, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--format", "openvino", "--quantize", "int8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "give --data" in err and not (tmp_path / "o").exists()


def test_an_openvino_export_refuses_a_folder_of_other_files(checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--format", "openvino", "--out", str(out)]) == 2
    assert "not an OpenVINO export's" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
