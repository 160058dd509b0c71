import json
import shutil
import sys

import pytest
import torch

from finetune.models.checkpoint import load_checkpoint
from finetune.cli import main
from finetune.errors import FinetuneError
from finetune.deploy.export import export_model
from finetune.deploy.onnx import metadata_path
from finetune.models import create_model

CLASSES = ["cat", "dog", "fox", "owl"]
# PyTorch deprecates TorchScript (torch.jit.trace/save/load) but still supports it; the export keeps it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")


@pytest.fixture(scope="module", params=["test_efficientnet", "test_vit"])
def model_checkpoint(request, tmp_path_factory, make_checkpoint):
    """A convolutional and a transformer checkpoint, the ViT built for 32-px inputs."""
    kwargs = {"img_size": 32} if request.param == "test_vit" else {}
    return make_checkpoint(tmp_path_factory.mktemp(request.param) / "checkpoints" / "best", request.param, CLASSES,
                           **kwargs)


def reference_logits(checkpoint, batch: torch.Tensor) -> torch.Tensor:
    model, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(batch)


def test_onnx_export_gives_the_models_logits_for_any_batch_size(model_checkpoint, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_model(model_checkpoint, format="onnx", out=tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    assert [i.name for i in session.get_inputs()] == ["input"]
    for batch_size in (1, 5):
        batch = torch.randn(batch_size, 3, 32, 32)
        (logits,) = session.run(["logits"], {"input": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), reference_logits(model_checkpoint, batch),
                                   rtol=1e-4, atol=1e-5)


def test_torchscript_export_gives_the_models_logits_and_carries_the_labels(model_checkpoint, tmp_path):
    path = export_model(model_checkpoint, format="torchscript", out=tmp_path / "model.pt")
    batch = torch.randn(3, 3, 32, 32)

    extra = {"finetune.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        logits = scripted(batch)

    torch.testing.assert_close(logits, reference_logits(model_checkpoint, batch), rtol=1e-4, atol=1e-5)
    assert json.loads(extra["finetune.json"])["classes"] == CLASSES


def test_safetensors_export_rebuilds_the_model_from_its_json(checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = export_model(checkpoint, format="safetensors", out=tmp_path / "weights.safetensors")
    info = json.loads(metadata_path(path).read_text())
    model = create_model(info["backbone"], info["num_classes"], head=info["head"], **info["backbone_kwargs"])
    model.load_state_dict(load_file(str(path)))
    batch = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.eval()(batch)

    torch.testing.assert_close(logits, reference_logits(checkpoint, batch))
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["finetune"])["classes"] == ["cat", "dog", "fox"]


def test_export_writes_classes_and_preprocessing_beside_the_model(checkpoint, tmp_path, preprocessing):
    path = export_model(checkpoint, format="safetensors", out=tmp_path / "deploy" / "birds.safetensors")

    info = json.loads((tmp_path / "deploy" / "birds.safetensors.json").read_text())
    assert path == tmp_path / "deploy" / "birds.safetensors"
    assert info["classes"] == ["cat", "dog", "fox"] and info["num_classes"] == 3
    assert info["preprocessing"] == preprocessing
    assert info["input"]["shape"] == ["batch", 3, 32, 32] and info["output"]["shape"] == ["batch", 3]
    assert info["model_file"] == "birds.safetensors" and info["format"] == "safetensors"
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["birds.safetensors", "birds.safetensors.json"]  # no temp files


def test_export_command_writes_next_to_the_checkpoint_by_default(checkpoint, tmp_path, capsys):
    folder = shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / "best")

    status = main(["export", str(tmp_path / "run"), "--format", "safetensors"])

    expected = tmp_path / "run" / "checkpoints" / "best.safetensors"
    assert status == 0 and expected.is_file() and metadata_path(expected).is_file()
    assert json.loads(metadata_path(expected).read_text())["source_checkpoint"] == str(folder)
    assert f"wrote {expected}" in capsys.readouterr().out


def test_export_refuses_an_unknown_format_and_a_json_model_path(checkpoint, tmp_path):
    with pytest.raises(FinetuneError, match="unknown export format 'tflite'"):
        export_model(checkpoint, format="tflite")
    with pytest.raises(FinetuneError, match="cannot end in .json"):
        export_model(checkpoint, format="onnx", out=tmp_path / "model.json")


def test_onnx_export_without_onnxscript_says_what_to_install(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` raise ImportError

    with pytest.raises(FinetuneError, match=r"pip install 'finetune\[export\]'"):
        export_model(checkpoint, format="onnx", out=tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())


def test_exports_of_each_format_to_one_stem_keep_their_own_metadata(checkpoint, tmp_path):
    """Regression: m.pt, m.safetensors and m.onnx all wrote m.json, the last export's silently winning."""
    pytest.importorskip("onnxruntime")
    paths = {fmt: export_model(checkpoint, format=fmt, out=tmp_path / f"m{suffix}")
             for fmt, suffix in (("torchscript", ".pt"), ("safetensors", ".safetensors"), ("onnx", ".onnx"))}

    for fmt, path in paths.items():
        info = json.loads(metadata_path(path).read_text())
        assert info["format"] == fmt and info["model_file"] == path.name
    assert not (tmp_path / "m.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json", "m.pt", "m.pt.json",
                                                          "m.safetensors", "m.safetensors.json"]


def test_an_onnx_export_of_an_older_finetune_is_read_from_its_stem_json(checkpoint, tmp_path):
    from finetune.deploy.onnx import read_onnx_info

    onnx = pytest.importorskip("onnx")
    path = export_model(checkpoint, format="onnx", out=tmp_path / "old.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(path))
    metadata_path(path).rename(tmp_path / "old.json")  # the name finetune used to write

    assert read_onnx_info(path)["classes"] == ["cat", "dog", "fox"]
