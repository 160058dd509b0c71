import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from finetune.data import build_transform, load_image
from finetune.errors import FinetuneError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SEED_TRAIN_OPS = [
    {"name": "Resize", "height": 230, "width": 230},
    {"name": "Rotate", "limit": 15, "p": 1.0},
    {"name": "RandomCrop", "height": 224, "width": 224},
    {"name": "HorizontalFlip"},
]
SEED_EVAL_OPS = [{"name": "Resize", "height": 224, "width": 224}]


def apply(transform, image):
    return transform(image=image)["image"]


@pytest.mark.parametrize("rel", ["kinds/grey.png", "kinds/rgba.png", "kinds/cmyk.jpg", "kinds/grey16.png", "kinds/palette.gif"])
@pytest.mark.parametrize("train", [True, False])
def test_any_decoded_kind_becomes_a_float32_chw_tensor_of_the_input_size(odd_root, rel, train):
    transform = build_transform(train, input_size=(3, 32, 32), mean=MEAN, std=STD)
    out = apply(transform, load_image(odd_root / rel))
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)


def test_normalisation_uses_the_given_mean_and_std(odd_root):
    transform = build_transform(False, input_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), ops=[{"name": "Resize", "height": 16, "width": 16}])
    white = np.full((16, 16, 3), 255, np.uint8)
    out = apply(transform, white)
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    grey = apply(transform, load_image(odd_root / "kinds/grey16.png"))  # all 65535 -> 255 in every channel
    assert torch.allclose(grey, apply(transform, white))


def test_rgba_transparent_half_is_normalised_white(odd_root):
    transform = build_transform(False, input_size=20, mean=MEAN, std=STD, ops=[{"name": "Resize", "height": 20, "width": 20}])
    out = apply(transform, load_image(odd_root / "kinds/rgba.png"))
    expected_white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out[:, 5, 2], expected_white, atol=1e-5)


def test_default_train_pipeline_is_random_resized_crop_and_flip():
    transform = build_transform(True, input_size=224, mean=MEAN, std=STD)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]
    assert transform.transforms[0].interpolation == cv2.INTER_CUBIC
    assert tuple(transform.transforms[0].scale) == (0.08, 1.0)  # timm's ImageNet crop from 128 px up


def test_default_train_crop_is_milder_on_small_inputs():
    """Below 128 px the default crop keeps at least half the image: a bright centre square of 1/16 of the
    image is always partly in the crop; timm's ImageNet crops (down to 8%) often cut it away entirely."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[24:40, 24:40] = 255
    for size in (64, 128):
        transform = build_transform(True, input_size=size, mean=(0, 0, 0), std=(1, 1, 1))
        assert tuple(transform.transforms[0].scale) == ((0.5, 1.0) if size < 128 else (0.08, 1.0))
        bright = [float((apply(transform, image) > 0.5).float().mean()) for _ in range(200)]
        if size < 128:
            assert min(bright) > 0.05
        else:
            assert min(bright) == 0.0


def test_default_eval_pipeline_resizes_by_crop_pct_then_centre_crops():
    transform = build_transform(False, input_size=224, mean=MEAN, std=STD, crop_pct=0.875, interpolation="bilinear")
    resize, crop = transform.transforms[:2]
    assert isinstance(resize, A.SmallestMaxSize) and resize.max_size == 256 and resize.interpolation == cv2.INTER_LINEAR
    assert isinstance(crop, A.CenterCrop) and (crop.height, crop.width) == (224, 224)
    rectangular = build_transform(False, input_size=(3, 224, 160), mean=MEAN, std=STD)
    assert (rectangular.transforms[0].height, rectangular.transforms[0].width) == (256, 182)
    assert apply(rectangular, np.zeros((300, 500, 3), np.uint8)).shape == (3, 224, 160)


def test_seed_bird_and_caltech_pipelines_are_expressible():
    train = build_transform(True, input_size=224, mean=MEAN, std=STD, ops=SEED_TRAIN_OPS)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["Resize", "Rotate", "RandomCrop", "HorizontalFlip", "Normalize", "ToTensorV2"]
    assert train.transforms[1].limit == (-15, 15) and train.transforms[1].p == 1.0
    assert train.transforms[0].interpolation == cv2.INTER_CUBIC  # the pipeline's interpolation fills in
    evaluation = build_transform(False, input_size=224, mean=MEAN, std=STD, ops=SEED_EVAL_OPS)
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    assert apply(train, image).shape == apply(evaluation, image).shape == (3, 224, 224)


def test_interpolation_name_in_an_op_is_mapped_to_the_opencv_flag():
    ops = [{"name": "Resize", "height": 8, "width": 8, "interpolation": "nearest"}]
    transform = build_transform(False, input_size=8, mean=MEAN, std=STD, ops=ops)
    assert transform.transforms[0].interpolation == cv2.INTER_NEAREST


def test_same_random_state_gives_the_same_augmentation():
    transform = build_transform(True, input_size=32, mean=MEAN, std=STD, ops=[{"name": "Resize", "height": 40, "width": 40}, {"name": "RandomCrop", "height": 32, "width": 32}, {"name": "ColorJitter", "p": 1.0}])
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    transform.set_random_seed(11)
    first = apply(transform, image)
    transform.set_random_seed(11)
    assert torch.equal(first, apply(transform, image))
    transform.set_random_seed(12)
    assert not torch.equal(first, apply(transform, image))


@pytest.mark.parametrize(
    "ops, message",
    [
        ([{"name": "Sharpen2"}], r"transform op 0 \(Sharpen2\): not an albumentations transform"),
        ([{"name": "Compose"}], "not an albumentations transform"),
        ([{"name": "Rotate", "limmit": 15}], r"transform op 0 \(Rotate\): .*limmit"),
        ([{"name": "Rotate", "limit": "wide"}], r"transform op 0 \(Rotate\): .*limit"),
        ([{"name": "HorizontalFlip"}, {"name": "Normalize"}], r"transform op 1 \(Normalize\): .*appended already"),
        ([{"name": "Resize", "height": 16, "width": 16, "interpolation": "cubic"}], "unknown interpolation 'cubic'"),
        (["Resize"], "transform op 0: expected a mapping with a 'name' key"),
        ([{"name": "Resize", "height": 230, "width": 230}], "produce 230×230 images, the backbone expects 224×224"),
        ([{"name": "HorizontalFlip"}], "produce 455×451 images"),
        ([{"name": "RandomCrop", "height": 999, "width": 999}], "transform ops fail on a 455×451 image"),
    ],
)
def test_bad_ops_are_rejected_naming_the_op(ops, message):
    with pytest.raises(FinetuneError, match=message) as info:
        build_transform(True, input_size=224, mean=MEAN, std=STD, ops=ops)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("input_size", [(224,), (0, 224), "224", (3, 224, 22.5)])
def test_bad_input_size_is_rejected(input_size):
    with pytest.raises(FinetuneError, match="input_size must be"):
        build_transform(False, input_size=input_size, mean=MEAN, std=STD)


def test_unknown_interpolation_is_rejected():
    with pytest.raises(FinetuneError, match="unknown interpolation 'random'"):
        build_transform(False, input_size=224, mean=MEAN, std=STD, interpolation="random")


def test_normalize_table_matches_albumentations():
    """The appended Normalize's one-pass table look-up gives albumentations' values, for uint8 and float input."""
    import albumentations as A

    from finetune.data.transforms import Normalize

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours, reference = Normalize(mean=mean, std=std), A.Normalize(mean=mean, std=std)
    image = np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    fast = ours.apply(image)
    assert fast.dtype == np.float32 and fast.shape == image.shape
    np.testing.assert_allclose(fast, reference.apply(image), rtol=0, atol=1e-5)
    as_float = image.astype(np.float32)
    np.testing.assert_allclose(ours.apply(as_float), reference.apply(as_float), rtol=0, atol=1e-5)


@pytest.mark.parametrize("image", [
    np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3),
    np.linspace(-1, 1, 5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3),
    np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4),
    np.arange(5 * 7, dtype=np.uint8).reshape(5, 7, 1),
    np.arange(5 * 7, dtype=np.uint8).reshape(5, 7),
    np.arange(5 * 7 * 3, dtype=np.uint16).reshape(5, 7, 3),
    np.arange(5 * 14 * 3, dtype=np.uint8).reshape(5, 14, 3)[:, ::2],  # a strided view
    np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)[:, ::-1],  # a flipped view
], ids=["uint8", "float32", "rgba", "hw1", "hw", "uint16", "strided", "flipped"])
def test_the_appended_to_tensor_gives_albumentations_values_as_a_contiguous_chw_tensor(image):
    from finetune.data.transforms import ToTensorV2

    out = ToTensorV2()(image=image)["image"]
    expected = A.ToTensorV2()(image=image.copy())["image"]
    assert out.is_contiguous() and out.dtype == expected.dtype and out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device_normalize", [True, False])
def test_pipelines_hand_the_collate_contiguous_chw_tensors(device_normalize):
    # albumentations' own ToTensorV2 returns a transposed view, which the collate gathers at a stride of 3
    transform = build_transform(True, input_size=32, mean=MEAN, std=STD, device_normalize=device_normalize)
    out = apply(transform, np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    assert out.shape == (3, 32, 32) and out.is_contiguous()
