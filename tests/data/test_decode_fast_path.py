"""load_image decodes plain JPEG/PNG files with OpenCV (faster, see benchmarks/RESULTS.md) and gets the
same pixels Pillow would; every other case stays on Pillow."""
import numpy as np
import pytest
from PIL import Image

import finetune.data.images as decode
from finetune.data import ImageDecodeError, load_image


@pytest.fixture
def imdecode_calls(monkeypatch):
    calls = []
    real = decode.cv2.imdecode
    monkeypatch.setattr(decode.cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("fmt,suffix", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_plain_files_take_the_opencv_path_with_pillows_pixels(tmp_path, make_image, imdecode_calls, fmt, suffix, mode):
    path = make_image(tmp_path / f"x.{suffix}", size=(40, 30), mode=mode, fmt=fmt)
    fast = load_image(path)
    assert imdecode_calls == [1]
    with Image.open(path) as img:
        reference = np.asarray(img.convert("RGB"))
    assert fast.shape == (30, 40, 3) and fast.dtype == np.uint8 and fast.flags.c_contiguous
    assert np.array_equal(fast, reference)


def test_rgba_cmyk_and_rotated_files_stay_on_pillow(tmp_path, make_image, imdecode_calls):
    make_image(tmp_path / "a.png", mode="RGBA", fmt="PNG")
    make_image(tmp_path / "c.jpg", mode="CMYK", fmt="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(tmp_path / "r.jpg", size=(40, 30), fmt="JPEG", exif=exif.tobytes())
    for name in ("a.png", "c.jpg"):
        assert load_image(tmp_path / name).shape[2] == 3
    assert load_image(tmp_path / "r.jpg").shape == (40, 30, 3)  # rotated by Pillow's exif_transpose
    assert imdecode_calls == []


def test_truncated_jpeg_is_still_reported(tmp_path, make_image, imdecode_calls):
    path = make_image(tmp_path / "t.jpg", size=(64, 64), fmt="JPEG")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageDecodeError):
        load_image(path)
    assert imdecode_calls == []
