import os

import numpy as np
import pytest
from PIL import Image

from finetune.data import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, load_image
from finetune.errors import FinetuneError


def test_image_extensions_cover_the_common_formats_in_lower_case():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def test_every_good_kind_decodes_to_uint8_rgb(odd_good_file):
    image = load_image(odd_good_file)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.flags.writeable and image.flags.c_contiguous


def test_every_bad_kind_raises_decode_error_with_its_reason(odd_bad_file):
    path, reason = odd_bad_file
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert reason in info.value.reason
    assert isinstance(info.value, FinetuneError)
    assert str(path) in str(info.value)


def test_missing_file_raises_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        load_image(tmp_path / "gone.jpg")


def test_greyscale_is_replicated_into_three_equal_channels(odd_root):
    image = load_image(odd_root / "kinds/grey.png")
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_rgba_transparent_pixels_become_white_and_opaque_keep_colour(odd_root):
    image = load_image(odd_root / "kinds/rgba.png")
    assert (image[:, :10] == 255).all()  # fully transparent blue -> white background
    assert (image[:, 10:] == (0, 255, 0)).all()


def test_palette_transparency_becomes_white(odd_root):
    image = load_image(odd_root / "kinds/palette_transparent.png")
    assert (image[:, :10] == 255).all()  # transparent palette index
    assert (image[:, 10:] == (0, 0, 255)).all()


def test_cmyk_red_decodes_to_rgb_red(odd_root):
    image = load_image(odd_root / "kinds/cmyk.jpg").astype(int)
    assert np.abs(image - (255, 0, 0)).max() <= 3


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    image = load_image(tmp_path / "ramp16.png")
    assert image[0, :, 0].tolist() == [0, 1, 127, 255]


def test_exif_orientation_is_applied(odd_root):
    image = load_image(odd_root / "kinds/exif_rotated.jpg").astype(int)
    assert image.shape == (30, 20, 3)  # stored 30 wide and 20 high, displayed rotated a quarter turn
    assert np.abs(image[2, 10] - (255, 0, 0)).max() < 20  # the stored left half (red) is now on top
    assert np.abs(image[-3, 10] - (0, 0, 255)).max() < 20


def test_image_over_the_pixel_limit_is_rejected_before_decoding(make_image, tmp_path):
    path = make_image(tmp_path / "big.png", size=(40, 40))
    assert load_image(path, max_pixels=1600).shape == (40, 40, 3)
    with pytest.raises(ImageDecodeError, match=r"too many pixels .*40×40 = 1,600 > limit 1,599"):
        load_image(path, max_pixels=1599)


def test_header_only_bomb_is_rejected_at_the_default_limit(tmp_path, header_only_png):
    path = tmp_path / "bomb.png"
    path.write_bytes(header_only_png(10_000, 10_000))  # 1e8 pixels: over our limit, under Pillow's error limit
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageDecodeError, match="too many pixels"):
        load_image(path)
    assert 10_000 * 10_000 > DEFAULT_MAX_PIXELS


@pytest.mark.parametrize("mode,scale,offset", [
    ("F", 0.001, -0.5),  # float32 in -0.5..0.5: Pillow's convert clips it to a flat black image
    ("F", 1000.0, 0.0),  # float32 in 0..1000: clips to mostly white
    ("I", 100_000, -50_000),  # int32 beyond 16 bits, negatives too: clipped to 0..65535 flattens it
    ("I", 1, 0),  # int32 in 0..1000: a 16-bit scale (// 257) would make it black
])
def test_float_and_32_bit_tiffs_are_scaled_by_their_range(tmp_path, mode, scale, offset):
    yy, xx = np.mgrid[:16, :24]
    pattern = ((xx // 4 + yy // 4) % 2) * 1000 + xx  # a checkerboard with a ramp: values 0..1023
    data = (pattern * scale + offset).astype(np.float32 if mode == "F" else np.int32)
    Image.fromarray(data, mode).save(tmp_path / "image.tif")
    assert Image.open(tmp_path / "image.tif").mode == mode

    image = load_image(tmp_path / "image.tif")

    assert image.shape == (16, 24, 3) and (image[..., 0] == image[..., 2]).all()
    grey = image[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255  # the full 8-bit range, not flat
    expected = np.round((pattern - pattern.min()) / (pattern.max() - pattern.min()) * 255)
    assert np.abs(grey - expected).max() <= 1  # the source's spatial pattern, scaled linearly


@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocked open or read is interrupted after 10 s."""
    import signal

    def timeout(signum, frame):
        raise TimeoutError("blocked reading a file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind, reason", [
    ("fifo", "not a regular file (a FIFO)"),
    ("folder", "not a regular file (a folder)"),
    ("dangling link", "cannot read file: broken symbolic link (its target does not exist)"),
])
def test_only_regular_files_are_read_and_a_fifo_does_not_block(tmp_path, alarm, kind, reason):
    path = tmp_path / "x.png"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageDecodeError) as info:
        load_image(path)
    assert info.value.reason == reason


def test_a_link_to_a_regular_image_is_followed(tmp_path, make_image):
    target = make_image(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(target)
    assert load_image(tmp_path / "link.png").shape[2] == 3
