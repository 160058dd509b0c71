import numpy as np
import pytest
from PIL import Image

from finetune.data import discover, load_image, prepare_manifest, write_digits
from finetune.errors import FinetuneError


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("sample") / "digits", size=16)


def test_digits_are_written_as_one_png_folder_per_class(digits):
    found = discover(digits)
    assert found.layout == "folder" and found.classes == [str(d) for d in range(10)]
    assert sum(len(p) for p in found.images["all"].values()) == 1797
    with Image.open(digits / "0" / "0000.png") as image:
        assert image.size == (16, 16) and image.mode == "L" and image.format == "PNG"


def test_digit_pixels_come_from_scikit_learn(digits):
    from sklearn.datasets import load_digits

    original = load_digits().images[0] * 255 / 16
    upscaled = load_image(digits / "0" / "0000.png")[..., 0].astype(float)
    block_means = upscaled.reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert np.corrcoef(block_means.ravel(), original.ravel())[0, 1] > 0.95


def test_second_call_keeps_the_existing_dataset(digits):
    before = (digits / "3" / "0003.png").stat().st_mtime_ns
    assert write_digits(digits, size=16) == digits
    assert (digits / "3" / "0003.png").stat().st_mtime_ns == before


def test_existing_dataset_at_another_size_is_an_error(digits):
    with pytest.raises(FinetuneError, match="holds the digits at 16×16"):
        write_digits(digits, size=32)


def test_non_empty_folder_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="exists and is not an empty folder"):
        write_digits(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_digits(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_digits_card_split_keeps_every_digit_in_every_split(digits):
    manifest, bad = prepare_manifest(digits, card="digits", seed=0)
    assert bad == []
    counts = manifest.counts()
    assert all(n > 0 for split in counts.values() for n in split.values())
    assert sum(counts["test"].values()) == pytest.approx(0.15 * 1797, abs=10)
