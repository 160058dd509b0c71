"""load_image decodes plain JPEG/PNG files with OpenCV (faster, see benchmarks/RESULTS.md) and gets the
same pixels Pillow would; every other case stays on Pillow."""
import numpy as np
import pytest
from PIL import Image, ImageOps

import finetune.data.decode as decode
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


def test_rgba_and_cmyk_files_stay_on_pillow(tmp_path, make_image, imdecode_calls):
    make_image(tmp_path / "a.png", mode="RGBA", fmt="PNG")
    make_image(tmp_path / "c.jpg", mode="CMYK", fmt="JPEG")
    for name in ("a.png", "c.jpg"):
        assert load_image(tmp_path / name).shape[2] == 3
    assert imdecode_calls == []


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_exif_rotated_jpeg_takes_the_opencv_path_with_pillows_orientation(tmp_path, imdecode_calls, orientation, mode):
    """Every EXIF orientation (flips, quarter and half turns) comes out as Pillow's exif_transpose shows it."""
    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pixels[:15, :20] = (255, 0, 0)  # an asymmetric mark: any wrong flip or turn moves it
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "r.jpg"
    Image.fromarray(pixels).convert(mode).save(path, quality=95, exif=exif.tobytes())
    fast = load_image(path)
    assert imdecode_calls == [1]
    with Image.open(path) as img:
        reference = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert fast.shape == reference.shape and fast.flags.c_contiguous
    assert np.array_equal(fast, reference)


def test_truncated_jpeg_is_still_reported(tmp_path, make_image, imdecode_calls):
    path = make_image(tmp_path / "t.jpg", size=(64, 64), fmt="JPEG")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageDecodeError):
        load_image(path)
    assert imdecode_calls == []
