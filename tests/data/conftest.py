"""Fixtures building tiny synthetic datasets in tmp_path: Bird-225-like, Caltech-101-like, and odd files."""
from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (24, 20), mode: str = "RGB", fmt: str | None = None, **save) -> Path:
    """Save an image of random content (seeded by the path, so no two files are byte-identical)."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(str(path).encode()).digest()[:8], "little"))
    width, height = size
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image = rgb if mode == "RGB" else rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **save)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels but holds almost no data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


BIRD_CLASSES = ("AFRICAN CROWNED CRANE", "BALD EAGLE", "CROW")


@pytest.fixture
def header_only_png():
    """`png_header_only` as a fixture: ``header_only_png(width, height) -> bytes``."""
    return png_header_only


@pytest.fixture
def make_image():
    """`write_image` as a fixture: ``make_image(path, size=(w, h), mode="RGB", fmt=None, **save_kwargs)``."""
    return write_image


@pytest.fixture
def bird_root(tmp_path) -> Path:
    """Bird-225-like: train/ (6 per class), valid/ (2), test/ (2); class names upper case with spaces."""
    root = tmp_path / "bird225"
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        for label in BIRD_CLASSES:
            for i in range(n):
                write_image(root / split / label / f"{i + 1}.jpg", size=(24, 24))
    return root


@pytest.fixture
def caltech_root(tmp_path) -> Path:
    """Caltech-101-like download: caltech-101/101_ObjectCategories/ with a background class and a 2-image class.

    Classes: BACKGROUND_Google (6), Faces (12), accordion (9, some greyscale), tiny (2); sizes vary.
    """
    root = tmp_path / "caltech-101" / "101_ObjectCategories"
    for label, n in (("BACKGROUND_Google", 6), ("Faces", 12), ("accordion", 9), ("tiny", 2)):
        for i in range(n):
            mode = "L" if label == "accordion" and i % 3 == 0 else "RGB"
            write_image(root / label / f"image_{i + 1:04d}.jpg", size=(20 + 2 * i, 16 + i), mode=mode)
    return root


# Every odd file of the odd_root fixture: path relative to the root -> the reason's expected wording
# (None: a good image).
ODD_BAD = {
    "bad/truncated.jpg": "truncated",
    "bad/truncated.png": "truncated",
    "bad/empty.jpg": "empty file",
    "bad/text.jpg": "not an image",
    "bad/bomb.png": "too many pixels",
}
ODD_GOOD = (
    "good/0.jpg",
    "good/1.jpg",
    "good/2.jpg",
    "good/link.jpg",
    "kinds/grey.png",
    "kinds/palette_transparent.png",
    "kinds/palette.gif",
    "kinds/cmyk.jpg",
    "kinds/rgba.png",
    "kinds/grey16.png",
    "kinds/exif_rotated.jpg",
    "kinds/UPPER.JPG",
    "kinds/Mixed.JpEg",
    "kinds/bitmap.bmp",
    "kinds/web.webp",
    "kinds/scan.tiff",
    "kinds/nested/deeper/inner.png",
    "linked/0.jpg",
    "linked/1.jpg",
)


@pytest.fixture
def odd_root(tmp_path) -> Path:
    """One folder of class folders holding every odd file kind.

    Classes ``bad`` (only bad files), ``good``, ``kinds`` (every mode and suffix, nested folders) and
    ``linked`` (a symlink to a folder outside the root). Also: hidden files and folders, non-images, a
    symlinked file, and symlink cycles (inside a class: a link to its own folder and one to the root;
    ``loop_class``: a class folder linking to the root).
    """
    root = tmp_path / "odd"
    outside = tmp_path / "outside"
    for i in range(3):
        write_image(root / "good" / f"{i}.jpg")
    write_image(outside / "file.jpg")
    (root / "good" / "link.jpg").symlink_to(outside / "file.jpg")
    write_image(root / "good" / ".hidden.jpg")
    write_image(root / "good" / ".cache" / "cached.jpg")
    (root / "good" / "notes.txt").write_text("not an image")
    (root / "good" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")

    kinds = root / "kinds"
    write_image(kinds / "grey.png", mode="L")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (10, 0, 20, 20))  # left half index 0 (red, transparent), right half index 1 (blue)
    palette.save(kinds / "palette_transparent.png", transparency=0)
    write_image(kinds / "palette.gif", mode="P")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(kinds / "cmyk.jpg")  # pure red
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (0, 0, 255, 0)  # left: blue but fully transparent
    rgba[:, 10:] = (0, 255, 0, 255)  # right: opaque green
    Image.fromarray(rgba).save(kinds / "rgba.png")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(kinds / "grey16.png")
    rotated = np.zeros((20, 30, 3), np.uint8)
    rotated[:, :15] = (255, 0, 0)  # stored 30 wide, 20 high: left red, right blue
    rotated[:, 15:] = (0, 0, 255)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(rotated).save(kinds / "exif_rotated.jpg", exif=exif, quality=95)
    write_image(kinds / "UPPER.JPG", fmt="JPEG")
    write_image(kinds / "Mixed.JpEg", fmt="JPEG")
    write_image(kinds / "bitmap.bmp")
    write_image(kinds / "web.webp", lossless=True)
    write_image(kinds / "scan.tiff")
    write_image(kinds / "nested" / "deeper" / "inner.png")
    (kinds / "loop").symlink_to(kinds, target_is_directory=True)
    (kinds / "nested" / "up").symlink_to(root, target_is_directory=True)

    for i in range(2):
        write_image(outside / "birds" / f"{i}.jpg")
    (root / "linked").symlink_to(outside / "birds", target_is_directory=True)

    bad = root / "bad"
    truncate(write_image(bad / "truncated.jpg", size=(40, 40), quality=95))
    truncate(write_image(bad / "truncated.png", size=(40, 40)))
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not a picture\n")
    (bad / "bomb.png").write_bytes(png_header_only(20_000, 20_000))

    (root / "loop_class").symlink_to(root, target_is_directory=True)  # a class folder that is the root itself

    (root / ".hidden_class").mkdir()
    write_image(root / ".hidden_class" / "x.jpg")
    (root / "README.txt").write_text("odd files")
    return root


@pytest.fixture(params=ODD_GOOD)
def odd_good_file(request, odd_root) -> Path:
    """Each good file of odd_root in turn."""
    return odd_root / request.param


@pytest.fixture(params=sorted(ODD_BAD))
def odd_bad_file(request, odd_root) -> tuple[Path, str]:
    """Each bad file of odd_root in turn, with the words its reason must contain."""
    return odd_root / request.param, ODD_BAD[request.param]
