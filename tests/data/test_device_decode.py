"""Batched JPEG decode where the model runs (data.device_decode): its logic on the CPU, its speed path on CUDA."""
import io
import logging

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import build_transform, load_image
from finetune.data.device_decode import DeviceJpegBatches, device_decoding, device_ops, orient

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _photo(path, size=(96, 64), seed=0, **save):
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (4, 6, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(low).resize(size, Image.Resampling.BICUBIC))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **save)
    return path


def _identity_pipeline(height, width):
    return build_transform(False, input_size=(height, width), mean=MEAN, std=STD, device_normalize=True,
                           ops=[{"name": "CenterCrop", "height": height, "width": width}])


def _denormalised(batch):
    return (batch * 0.25 + 0.5) * 255


def test_device_ops_cover_the_default_eval_pipeline_and_refuse_the_rest():
    default = build_transform(False, input_size=64, mean=MEAN, std=STD, device_normalize=True)
    assert len(device_ops(default)) == 2  # SmallestMaxSize + CenterCrop
    assert device_ops(build_transform(True, input_size=64, mean=MEAN, std=STD, device_normalize=True)) is None
    assert device_ops(build_transform(False, input_size=64, mean=MEAN, std=STD)) is None  # normalises per sample
    flipped = build_transform(False, input_size=64, mean=MEAN, std=STD, device_normalize=True,
                              ops=[{"name": "Resize", "height": 64, "width": 64}, {"name": "HorizontalFlip", "p": 1}])
    assert device_ops(flipped) is None
    assert device_decoding([("a.jpg", 0)], default, device=torch.device("cpu"), batch_size=4, num_workers=0) is None
    assert device_decoding([("a.jpg", 0)], default, device=torch.device("cpu"), batch_size=4, num_workers=0,
                           enabled=True) is not None


def test_batched_decode_equals_the_cpu_decode_within_jpeg_tolerance(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", seed=i, quality=90) for i in range(5)]
    batches = DeviceJpegBatches([(p, i) for i, p in enumerate(paths)], _identity_pipeline(64, 96), device="cpu",
                                batch_size=4)
    inputs, labels, skipped = zip(*batches)
    got = _denormalised(torch.cat(inputs))
    expected = torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1).float() for p in paths])
    assert torch.cat(labels).tolist() == [0, 1, 2, 3, 4] and sum(skipped) == 0
    assert batches.decoded_on_device == 5
    assert (got - expected).abs().max() <= 3  # two IDCT implementations, one file


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_load_image_applies_it(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _photo(tmp_path / "o.jpg", size=(48, 32), quality=95, exif=exif.tobytes())
    expected = torch.from_numpy(load_image(path)).permute(2, 0, 1).float()
    batches = DeviceJpegBatches([(path, 0)], _identity_pipeline(*expected.shape[1:]), device="cpu", batch_size=1)
    (inputs, _, _), = list(batches)
    assert inputs.shape[2:] == expected.shape[1:]
    assert (_denormalised(inputs[0]) - expected).abs().max() <= 3
    assert orient(torch.arange(6).view(1, 2, 3), orientation).numel() == 6


def test_other_formats_cmyk_and_broken_files_take_the_cpu_path_or_are_counted(tmp_path, caplog):
    jpeg = _photo(tmp_path / "a.jpg", quality=90)
    png = _photo(tmp_path / "b.png")
    cmyk = tmp_path / "c.jpg"
    Image.open(jpeg).convert("CMYK").save(cmyk, quality=95)
    broken = tmp_path / "d.jpg"
    broken.write_bytes(b"\xff\xd8" + b"\x00" * 64)
    items = [(jpeg, 0), (png, 1), (cmyk, 2), (broken, 3)]
    with caplog.at_level(logging.WARNING):
        (inputs, labels, skipped), = list(DeviceJpegBatches(items, _identity_pipeline(64, 96), device="cpu",
                                                             batch_size=4))
    assert labels.tolist() == [0, 1, 2] and skipped == 1
    assert sum("d.jpg" in r.getMessage() for r in caplog.records) == 1
    for row, path in zip(_denormalised(inputs), (jpeg, png, cmyk)):
        expected = torch.from_numpy(load_image(path)).permute(2, 0, 1).float()
        assert (row - expected).abs().mean() < 2


def test_default_eval_pipeline_on_the_device_is_close_to_the_cpu_pipeline(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", size=(300, 200), seed=i, quality=92) for i in range(3)]
    uint8 = build_transform(False, input_size=64, mean=MEAN, std=STD, device_normalize=True)
    cpu = build_transform(False, input_size=64, mean=MEAN, std=STD)
    (inputs, _, _), = list(DeviceJpegBatches([(p, 0) for p in paths], uint8, device="cpu", batch_size=3))
    expected = torch.stack([cpu(image=load_image(p))["image"] for p in paths])
    assert inputs.shape == expected.shape == (3, 3, 64, 64)
    assert (inputs - expected).abs().mean() < 0.05  # antialiased tensor resize vs OpenCV bicubic, in std units


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_equals_the_cpu_decode_within_jpeg_tolerance(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", seed=i, quality=90) for i in range(8)]
    batches = DeviceJpegBatches([(p, i) for i, p in enumerate(paths)], _identity_pipeline(64, 96), device="cuda",
                                batch_size=8)
    (inputs, labels, skipped), = list(batches)
    assert inputs.is_cuda and skipped == 0 and batches.decoded_on_device == 8
    expected = torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1).float() for p in paths])
    assert (_denormalised(inputs).cpu() - expected).abs().max() <= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_loader_batches_are_uint8_and_pinned_then_normalised_on_the_device(tmp_path):
    from finetune.data import DeviceBatches, ImageDataset, collate_skip

    paths = [_photo(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    pipeline = _identity_pipeline(64, 96)
    loader = torch.utils.data.DataLoader(ImageDataset([(p, 0) for p in paths], pipeline), batch_size=4,
                                         collate_fn=collate_skip, pin_memory=True)
    raw = next(iter(loader))[0]
    assert raw.dtype == torch.uint8 and raw.is_pinned()
    (inputs, _, _), = list(DeviceBatches(loader, "cuda", pipeline.batch_normalize))
    assert inputs.is_cuda and inputs.dtype == torch.float32
    torch.testing.assert_close(inputs.cpu(), pipeline.batch_normalize(raw), atol=1e-6, rtol=0)


def test_exif_written_by_pillow_is_read_back(tmp_path):
    """The fixture's EXIF is real: Pillow reads the orientation this test wrote."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _photo(tmp_path / "o.jpg", exif=exif.tobytes())
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        assert img.getexif().get(0x0112) == 6
    assert A is not None
