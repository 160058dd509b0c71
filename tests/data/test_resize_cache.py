import logging
import os
import time

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from finetune.data import ImageDataset, load_image, resize_cache
from finetune.data import store as _resize_cache
from finetune.errors import FinetuneError


class _Identity:
    """A pipeline that returns the decoded image as it is."""

    def set_random_state(self, np_rng, py_rng):
        pass

    def __call__(self, image):
        return {"image": image}


@pytest.fixture
def decodes(monkeypatch):
    """The paths `resize_cache` decodes, in call order."""
    calls = []

    real = _resize_cache._decode

    def spy(data, path, max_pixels, min_side):
        if min_side is not None:  # resize_cache's decodes (with the copy's size), not the test's load_image
            calls.append(path)
        return real(data, path, max_pixels, min_side)

    monkeypatch.setattr(_resize_cache, "_decode", spy)
    return calls


def test_shorter_side_becomes_size_keeping_the_aspect_ratio(tmp_path, make_image):
    sources = [
        make_image(tmp_path / "src" / "wide.jpg", size=(120, 70)),
        make_image(tmp_path / "src" / "tall.png", size=(45, 100)),
    ]
    cached = resize_cache([(sources[0], 3), (sources[1], 1)], size=32, cache_dir=tmp_path / "cache")

    assert [label for _, label in cached] == [3, 1]
    for (copy, _), source in zip(cached, sources):
        assert copy.parent.parent == tmp_path / "cache"
        height, width = load_image(source).shape[:2]
        new_height, new_width = load_image(copy).shape[:2]
        assert min(new_height, new_width) == 32
        if width > height:
            assert abs(new_width - width * 32 / height) <= 1
        else:
            assert abs(new_height - height * 32 / width) <= 1
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_jpeg_sources_become_jpeg_444_and_others_png(tmp_path, make_image):
    jpeg = make_image(tmp_path / "a.JPG", size=(40, 40), fmt="JPEG")
    png = make_image(tmp_path / "b.png", size=(40, 40))
    (jpeg_copy, _), (png_copy, _) = resize_cache([(jpeg, 0), (png, 0)], size=20, cache_dir=tmp_path / "cache")

    with Image.open(jpeg_copy) as image:
        assert image.format == "JPEG" and jpeg_copy.suffix == ".jpg"
        assert JpegImagePlugin.get_sampling(image) == 0  # 4:4:4, no chroma subsampling
    with Image.open(png_copy) as image:
        assert image.format == "PNG" and image.mode == "RGB"


def test_images_at_or_below_size_are_not_upscaled(tmp_path, make_image):
    small = make_image(tmp_path / "small.png", size=(30, 20))
    exact = make_image(tmp_path / "exact.png", size=(64, 80))
    (small_copy, _), (exact_copy, _) = resize_cache([(small, 0), (exact, 0)], size=64, cache_dir=tmp_path / "cache")

    # PNG sources are stored losslessly: the copy is exactly the decoded source.
    np.testing.assert_array_equal(load_image(small_copy), load_image(small))
    np.testing.assert_array_equal(load_image(exact_copy), load_image(exact))


def test_second_call_reuses_the_copies_without_decoding(tmp_path, make_image, decodes):
    items = [(make_image(tmp_path / "src" / f"{i}.jpg", size=(50, 40)), i) for i in range(3)]
    first = resize_cache(items, size=16, cache_dir=tmp_path / "cache")
    assert len(decodes) == 3
    stamps = [os.stat(path).st_mtime_ns for path, _ in first]

    decodes.clear()
    second = resize_cache(items, size=16, cache_dir=tmp_path / "cache")
    assert decodes == []
    assert second == first
    assert [os.stat(path).st_mtime_ns for path, _ in second] == stamps


def test_a_modified_source_or_another_size_gets_a_new_copy(tmp_path, make_image, decodes):
    # BMP: the rewritten file has exactly the old file's size, so only the modification time tells them apart.
    source = make_image(tmp_path / "photo.bmp", size=(60, 40))
    [(old, _)] = resize_cache([(source, 0)], size=20, cache_dir=tmp_path / "cache")

    before = os.stat(source)
    Image.new("RGB", (60, 40), (255, 0, 0)).save(source)
    assert os.stat(source).st_size == before.st_size
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # coarse clocks: make it differ
    [(new, _)] = resize_cache([(source, 0)], size=20, cache_dir=tmp_path / "cache")
    assert new != old and old.exists()
    assert (load_image(new) == (255, 0, 0)).all()

    [(other_size, _)] = resize_cache([(source, 0)], size=10, cache_dir=tmp_path / "cache")
    assert other_size not in (old, new) and load_image(other_size).shape == (10, 15, 3)
    assert len(decodes) == 3


def test_unreadable_files_keep_their_path_with_one_warning(tmp_path, make_image, caplog):
    good = make_image(tmp_path / "good.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(make_image(tmp_path / "whole.jpg", size=(40, 40)).read_bytes()[:300])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    items = [(truncated, 0), (good, 1), (empty, 2), (missing, 3)]

    with caplog.at_level(logging.WARNING, logger="finetune.data.store"):
        cached = resize_cache(items, size=8, cache_dir=tmp_path / "cache")

    assert [item for i, item in enumerate(cached) if i != 1] == [(truncated, 0), (empty, 2), (missing, 3)]
    assert cached[1][0] != good and cached[1][0].exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 4 images" in warnings[0].getMessage()


def test_every_kind_of_source_caches_to_an_rgb_copy(tmp_path, make_image):
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[:, :15] = (0, 0, 255, 0)  # transparent: must come out white, as load_image composites it
    rgba[:, 15:] = (0, 255, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # rotate 90° to display: stored 60 wide, 30 high
    Image.new("RGB", (60, 30), (200, 10, 10)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    sources = [
        tmp_path / "rgba.png",
        tmp_path / "rotated.jpg",
        tmp_path / "cmyk.jpg",
        make_image(tmp_path / "grey.png", size=(30, 30), mode="L"),
        make_image(tmp_path / "palette.gif", size=(30, 30), mode="P"),
    ]
    cached = resize_cache([(s, 0) for s in sources], size=15, cache_dir=tmp_path / "cache")

    copies = [load_image(path) for path, _ in cached]
    for image in copies:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert (copies[0][:, :6] == 255).all()
    assert copies[1].shape == (30, 15, 3)  # orientation applied once: the copy is upright, no EXIF left


def test_workers_keep_the_input_order(tmp_path, make_image, monkeypatch):
    items = [(make_image(tmp_path / "src" / f"{i:02d}.jpg", size=(20 + i, 10)), 11 - i) for i in range(12)]
    serial = resize_cache(items, size=5, cache_dir=tmp_path / "serial")

    real = _resize_cache._decode

    def first_finishes_last(data, path, max_pixels, min_side):
        if path == items[0][0]:
            time.sleep(0.1)
        return real(data, path, max_pixels, min_side)

    monkeypatch.setattr(_resize_cache, "_decode", first_finishes_last)
    threaded = resize_cache(items, size=5, cache_dir=tmp_path / "threaded", workers=2)

    assert [label for _, label in threaded] == [label for _, label in items]
    assert [path.name for path, _ in threaded] == [path.name for path, _ in serial]
    assert [load_image(path).shape[1] for path, _ in threaded] == [round((20 + i) / 2) for i in range(12)]


def test_cached_items_feed_image_dataset(tmp_path, make_image):
    items = [(make_image(tmp_path / f"{i}.jpg", size=(40, 30)), i) for i in range(2)]
    cached = resize_cache(items, size=12, cache_dir=tmp_path / "cache")
    dataset = ImageDataset(cached, _Identity())
    assert [sample[0].shape for sample in dataset] == [(12, 16, 3)] * 2


def test_bad_settings_and_an_unwritable_cache_raise(tmp_path, make_image):
    items = [(make_image(tmp_path / "a.jpg"), 0)]
    with pytest.raises(FinetuneError, match="at least 1"):
        resize_cache(items, size=0, cache_dir=tmp_path / "cache")
    with pytest.raises(FinetuneError, match="quality"):
        resize_cache(items, size=8, cache_dir=tmp_path / "cache", quality=0)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FinetuneError, match="cannot create"):
        resize_cache(items, size=8, cache_dir=tmp_path / "file")


def _photo(height: int, width: int) -> np.ndarray:
    """A smooth photo-like image with edges (random fields blurred, plus a few hard rectangles)."""
    rng = np.random.default_rng(height)
    import cv2

    image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 6)
    image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX)
    for _ in range(6):
        y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
        image[y:y + 40, x:x + 60] = rng.integers(0, 256, 3)
    return image


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


@pytest.fixture
def imdecode_flags(monkeypatch):
    flags = []
    real = _resize_cache.cv2.imdecode
    monkeypatch.setattr(_resize_cache.cv2, "imdecode", lambda data, f: flags.append(f) or real(data, f))
    return flags


def test_large_jpeg_is_decoded_at_a_reduced_scale_close_to_full_decode_and_shrink(tmp_path, imdecode_flags):
    import cv2

    path = tmp_path / "big.jpg"
    Image.fromarray(_photo(900, 1300)).save(path, quality=92)
    [(copy, _)] = resize_cache([(path, 0)], size=200, cache_dir=tmp_path / "cache")
    assert imdecode_flags[-1] == cv2.IMREAD_REDUCED_COLOR_4  # 900 // 4 = 225 >= 200; 900 // 8 would not be
    reduced = load_image(copy)
    reference = _resize_cache._shrink(load_image(path), 200)
    assert reduced.shape == reference.shape == (200, 289, 3)
    assert _psnr(reduced, reference) > 35


@pytest.mark.parametrize("min_side, flag", [(None, "full"), (451, "full"), (450, "2"), (112, "8")])
def test_reduction_is_the_largest_that_keeps_min_side(tmp_path, imdecode_flags, min_side, flag):
    import cv2

    path = tmp_path / "p.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn: the reduced decode is turned too
    Image.fromarray(_photo(900, 1300)).save(path, quality=92, exif=exif.tobytes())
    image = load_image(path, min_side=min_side)
    expected = {"full": cv2.IMREAD_COLOR_RGB, "2": cv2.IMREAD_REDUCED_COLOR_2, "8": cv2.IMREAD_REDUCED_COLOR_8}[flag]
    assert imdecode_flags == [expected]
    k = {"full": 1, "2": 2, "8": 8}[flag]
    assert image.shape == (-(-1300 // k), -(-900 // k), 3)


def test_png_is_never_reduced(tmp_path, imdecode_flags):
    path = tmp_path / "p.png"
    Image.fromarray(_photo(400, 600)).save(path)
    assert load_image(path, min_side=50).shape == (400, 600, 3)
