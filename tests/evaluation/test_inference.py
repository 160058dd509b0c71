import csv
import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import finetune.inference
from finetune.cli import main
from finetune.data import load_image, preprocessing_transform
from finetune.errors import FinetuneError
from finetune.inference.predictor import Prediction, Predictor, load


def test_predict_gives_the_models_softmax_through_the_checkpoints_preprocessing(checkpoint, image_folder):
    predictor = load(checkpoint)
    paths = sorted(image_folder.rglob("*.png"))

    predictions = predictor.predict(paths, topk=3, batch_size=5)

    transform = preprocessing_transform(predictor.preprocessing)  # normalised per sample on the CPU
    with torch.no_grad():
        expected = predictor.model(torch.stack([transform(image=load_image(p))["image"] for p in paths])).softmax(1)
    for pred, probs, path in zip(predictions, expected, paths):
        assert pred.path == str(path) and pred.error is None
        assert pred.labels == [predictor.classes[i] for i in probs.argsort(descending=True)]
        np.testing.assert_allclose(pred.probabilities, probs.sort(descending=True).values, rtol=1e-5, atol=1e-6)
        assert pred.label == pred.labels[0] and pred.probability == pred.probabilities[0]


def test_predict_accepts_paths_pil_images_and_arrays_alike(checkpoint, image_folder):
    predictor = load(checkpoint)
    path = image_folder / "dog" / "01.png"
    array = load_image(path)

    by_path = predictor.predict(path, topk=2)
    by_pil = predictor.predict(Image.open(path), topk=2)
    by_array = predictor.predict(array, topk=2)
    batch = predictor.predict(np.stack([array, array]), topk=2)

    assert isinstance(by_path, Prediction) and by_pil.path is None
    for other in (by_pil, by_array, *batch):
        assert other.labels == by_path.labels
        np.testing.assert_allclose(other.probabilities, by_path.probabilities, rtol=1e-6)


def test_predict_clips_topk_to_the_number_of_classes(checkpoint, image_folder):
    pred = load(checkpoint).predict(image_folder / "cat" / "00.png", topk=10)

    assert sorted(pred.labels) == ["cat", "dog", "fox"]
    assert sum(pred.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_predict_reports_an_unreadable_file_instead_of_raising(checkpoint, image_folder):
    bad = image_folder / "cat" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated jpeg")

    good, broken = load(checkpoint).predict([image_folder / "cat" / "00.png", bad])

    assert good.error is None and good.label is not None
    assert broken.label is None and broken.labels == [] and broken.error == "not an image (unrecognised format)"


def test_predict_rejects_an_array_that_is_not_an_rgb_image(checkpoint):
    with pytest.raises(FinetuneError, match="uint8 RGB"):
        load(checkpoint).predict(np.zeros((8, 8, 4), dtype=np.uint8))


def test_load_needs_only_the_checkpoint_folder_and_unpickles_nothing(checkpoint, image_folder, tmp_path, monkeypatch):
    alone = shutil.copytree(checkpoint, tmp_path / "elsewhere" / "ckpt")
    # A pickle that would leave a marker file if anything unpickled it.
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(str(marker)))
    for name in ("pytorch_model.bin", "model.pt", "training_state.pt"):
        (alone / name).write_bytes(payload)

    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    predictor = finetune.inference.load(alone)
    pred = predictor.predict(image_folder / "fox" / "00.png")

    assert isinstance(predictor, Predictor) and isinstance(predictor.model, torch.nn.Module)
    assert pred.label in ("cat", "dog", "fox")
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_refuses_a_checkpoint_from_a_newer_format_version(checkpoint, tmp_path):
    newer = shutil.copytree(checkpoint, tmp_path / "newer")
    meta = json.loads((newer / "checkpoint.json").read_text())
    meta["format_version"] = 99
    (newer / "checkpoint.json").write_text(json.dumps(meta))

    with pytest.raises(FinetuneError, match="format version 99"):
        load(newer)


def test_load_refuses_an_unknown_device(checkpoint):
    with pytest.raises(FinetuneError, match="unknown device"):
        load(checkpoint, device="tpu9")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_load_on_cuda_without_cuda_says_so(checkpoint):
    with pytest.raises(FinetuneError, match="CUDA is not available"):
        load(checkpoint, device="cuda")


def test_predict_command_lists_a_bad_file_as_an_error_row(checkpoint, image_folder, tmp_path, capsys):
    (image_folder / "dog" / "empty.png").write_bytes(b"")
    (image_folder / "dog" / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "predictions.csv"

    status = main(["predict", str(checkpoint), str(image_folder), str(tmp_path / "missing.png"),
                   "--topk", "2", "--out", str(out), "--batch-size", "4", "--device", "cpu"])

    assert status == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "probability", "label_2", "probability_2", "error"]
    assert len(rows) == 14  # 12 images, the empty one and the missing path
    errors = {r["path"]: r["error"] for r in rows if r["error"]}
    assert errors == {str(image_folder / "dog" / "empty.png"): "empty file (0 bytes)",
                      str(tmp_path / "missing.png"): "no such file or folder"}
    good = [r for r in rows if not r["error"]]
    assert all(r["label"] in ("cat", "dog", "fox") and float(r["probability"]) >= float(r["probability_2"]) for r in good)
    assert "2 of 14 file(s) could not be read" in capsys.readouterr().err


def test_predict_command_writes_json(checkpoint, image_folder, tmp_path):
    out = tmp_path / "predictions.json"

    assert main(["predict", str(checkpoint), str(image_folder / "fox"), "--out", str(out), "--device", "cpu"]) == 0

    records = json.loads(out.read_text())
    assert [r["path"] for r in records] == [str(image_folder / "fox" / f"{i:02d}.png") for i in range(4)]
    assert all(len(r["predictions"]) == 1 and r["error"] is None for r in records)
    expected = load(checkpoint).predict(image_folder / "fox" / "00.png")
    assert records[0]["predictions"][0] == {"label": expected.label, "probability": pytest.approx(expected.probability)}


def test_predict_command_prints_csv_without_out(checkpoint, image_folder, capsys):
    assert main(["predict", str(checkpoint), str(image_folder / "cat" / "00.png"), "--device", "cpu"]) == 0

    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["path", "label", "probability", "error"] and len(rows) == 2


def test_predict_command_refuses_an_unknown_output_format(checkpoint, image_folder, tmp_path, capsys):
    status = main(["predict", str(checkpoint), str(image_folder), "--out", str(tmp_path / "p.xlsx")])

    assert status == 2 and "--out must end in .csv or .json" in capsys.readouterr().err


def test_load_and_export_refuse_a_checkpoint_listing_more_classes_than_its_model_has_outputs(checkpoint, tmp_path):
    from finetune.deploy.export import export_model

    bad = shutil.copytree(checkpoint, tmp_path / "bad")
    meta = json.loads((bad / "checkpoint.json").read_text())
    meta["classes"] += ["wolf", "owl"]  # 5 names for 3 outputs: labels and the export's JSON would be wrong
    (bad / "checkpoint.json").write_text(json.dumps(meta))
    expected = f"{bad / 'checkpoint.json'} lists 5 classes for a model with 3 outputs"
    with pytest.raises(FinetuneError, match=expected):
        load(bad)
    with pytest.raises(FinetuneError, match=expected):
        export_model(bad, format="safetensors", out=tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
