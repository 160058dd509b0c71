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


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    """A checkpoint whose int8 model measurably differs from fp32: the head's linear weights x30 make the logits so
    sharp that the features' quantisation error shows in the softmax (a random-init model's int8 is ~exact)."""
    from finetune.models.checkpoint import save_checkpoint
    from tests.evaluation.conftest import COLOURS, make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("sharp") / "best", "test_efficientnet", list(COLOURS))
    model, meta = load_checkpoint(path)
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(30)
    return save_checkpoint(path, model, meta)


def test_quantization_aware_fine_tuning_lowers_its_distillation_loss_and_states_an_agreement_that_holds(
        sharp_checkpoint, images, tmp_path, monkeypatch):
    """--qat: NNCF's int8 model is fine-tuned towards fp32 (its distillation loss falls epoch by epoch), the IR
    holds int8 fake-quantise ops, runs any batch size, and the agreement the JSON states is the one measured."""
    import finetune.deploy.openvino as ov_export
    from finetune.deploy.openvino import OpenVINOModel, _arrays

    checkpoint = sharp_checkpoint
    monkeypatch.setattr(ov_export, "QAT_LR", 1e-3)  # a few steps on 18 images: a larger step than the 1e-5 default
    paths = sorted(str(p) for p in images.rglob("*.png"))
    out = export_model(checkpoint, format="openvino", out=tmp_path / "qat", quantize="int8",
                       calibration_images=paths[0::2], validation_images=paths[1::2], max_drop=0.5, qat_epochs=4)
    q = json.loads((out / "model.json").read_text())["quantization"]
    assert q["method"] == "nncf quantization-aware fine-tuning" and q["epochs"] == 4 and q["lr"] == 1e-3
    losses = q["distillation_loss_per_epoch"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert 0 <= q["agreement_before_fine_tuning"] <= 1
    xml = (out / "model.xml").read_text()
    assert xml.count('type="FakeQuantize"') >= 3
    model, meta = load_checkpoint(checkpoint)
    x = torch.from_numpy(np.concatenate(_arrays(paths[1::2], meta["preprocessing"])))
    int8 = OpenVINOModel(out)
    with torch.inference_mode():
        agree = (int8(x).argmax(1) == model(x).argmax(1)).float().mean().item()
        assert int8(x[:1]).shape == (1, len(meta["classes"]))  # a dynamic batch
    assert agree == pytest.approx(q["agreement_with_fp32"])


def test_quantization_aware_fine_tuning_outside_the_budget_is_one_line_and_writes_nothing(sharp_checkpoint, images,
                                                                                         tmp_path, monkeypatch, capsys):
    """A fine-tuning that ruins the model (taught the fp32 model's logits shifted by one class) ends below the
    budget: refused in one line, no folder."""
    import finetune.deploy.openvino as ov_export

    monkeypatch.setattr(ov_export, "QAT_LR", 0.05)
    monkeypatch.setattr(ov_export, "_distillation",
                        lambda out, target, multilabel: (out - target.roll(1, dims=1)).square().mean())
    capsys.readouterr()
    rc = main(["export", str(sharp_checkpoint), "--format", "openvino", "--quantize", "int8", "--qat", "20",
               "--max-drop", "0.01", "--data", str(images), "--calibration", "8", "--out", str(tmp_path / "o")])
    # one error line, the last (the scan's progress lines come first; torch may log a warning about CUDA when NNCF
    # loads its extension)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "cpp_extension" not in line]
    assert rc == 2 and [line for line in err if "error" in line] == err[-1:], err
    err = err[-1]
    assert "quantisation-aware fine-tuning agrees with fp32" in err
    assert "below the budget of 0.9900" in err and not (tmp_path / "o").exists()


def test_qat_from_the_command_line_reports_which_quantisation_ran(checkpoint, images, tmp_path, capsys):
    capsys.readouterr()
    assert main(["export", str(checkpoint), "--format", "onnx", "--quantize", "int8", "--qat", "1",
                 "--data", str(images), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--qat" in err and "--format openvino" in err and not list(tmp_path.iterdir())
    assert main(["export", str(checkpoint), "--format", "openvino", "--quantize", "int8", "--qat", "2",
                 "--max-drop", "0.5", "--data", str(images), "--calibration", "8", "--out", str(tmp_path / "q")]) == 0
    said = capsys.readouterr().out
    q = json.loads((tmp_path / "q" / "model.json").read_text())["quantization"]
    assert "nncf quantization-aware fine-tuning, 2 epoch(s): agreement with fp32" in said
    assert f"{q['agreement_with_fp32']:.4f} on 8 training images" in said
    from finetune.deploy.benchmark import benchmark

    rows = benchmark([tmp_path / "q"], batches=[2], iterations=1, warmup=1, devices=["cpu"])["rows"]
    assert [r["status"] for r in rows if r["backend"] == "openvino int8 qat"] == ["ok"]
    assert not [r for r in rows if r["backend"] == "openvino int8"]  # named apart from post-training int8


def test_post_training_int8_below_the_budget_is_refused_and_points_to_qat(sharp_checkpoint, images, tmp_path,
                                                                          monkeypatch, capsys):
    """When NNCF's accuracy control returns a model outside the budget (here: one whose top-1 is the next class), the
    export is refused in one line that suggests --qat, and writes nothing."""
    import nncf

    model, meta = load_checkpoint(sharp_checkpoint)

    class NextClass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x).roll(1, dims=1)

    with torch.no_grad():
        wrong = openvino.convert_model(NextClass().eval(),
                                       example_input=torch.zeros(1, *meta["preprocessing"]["input_size"]))
    monkeypatch.setattr(nncf, "quantize_with_accuracy_control", lambda *args, **kwargs: wrong)
    capsys.readouterr()
    rc = main(["export", str(sharp_checkpoint), "--format", "openvino", "--quantize", "int8", "--max-drop", "0.01",
               "--data", str(images), "--calibration", "8", "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "cpp_extension" not in line]
    assert rc == 2 and [line for line in err if "error" in line] == err[-1:], err
    assert "below the budget of 0.9900" in err[-1] and "--qat 2" in err[-1] and not (tmp_path / "o").exists()
