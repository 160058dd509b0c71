import time

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.models import create_model


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
@pytest.mark.parametrize("head", ["spinal", "linear", {"name": "mlp", "hidden": [32]}])
def test_create_model_maps_images_to_logits_for_resnet_efficientnet_and_vit(backbone, head):
    model = create_model(backbone, 5, head=head).eval()
    size = model.data_config()["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    assert model(x).shape == (2, 5)
    assert model.backbone(x).shape == (2, model.num_features)  # pooled features, no classifier
    assert model.backbone.num_classes == 0


def test_model_exposes_data_config_and_ordered_stages():
    model = create_model("test_resnet", 3)
    cfg = model.data_config()
    assert set(cfg) >= {"input_size", "mean", "std", "interpolation", "crop_pct"}
    stages = model.stages()
    assert len(stages) == 5
    assert stages[0][0].startswith("backbone.conv1")
    assert all(n.startswith("backbone.layer4") for n in stages[-1])
    names = {n for n, _ in model.backbone.named_parameters(prefix="backbone")}
    assert {n for s in stages for n in s} == names


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(FinetuneError, match="unknown timm backbone 'resnet_nope'"):
        create_model("resnet_nope", 3)


def test_pretrained_true_without_network_fails_fast_naming_other_sources():
    start = time.monotonic()
    with pytest.raises(FinetuneError) as err:
        create_model("test_resnet", 3, pretrained=True)
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message
    assert "local weights file" in message and "offline" in message


def test_offline_pretrained_for_a_backbone_without_package_names_the_known_ones():
    with pytest.raises(FinetuneError, match="tf_efficientnet_lite0"):
        create_model("test_resnet", 3, pretrained="offline")


@pytest.mark.parametrize("head", ["spinal", "linear", {"name": "mlp", "hidden": [32]}])
def test_head_is_sized_from_the_pooled_width_of_a_pre_logits_backbone(head):
    # mobilenetv3 pools 576 channels, then its conv_head (pre-logits) widens them to 1024: the head sees 1024
    model = create_model("mobilenetv3_small_050", 4, head=head).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.backbone(x)
    assert model.backbone.num_features != features.shape[1]
    assert model.num_features == features.shape[1] == model.backbone.head_hidden_size
    assert model(x).shape == (2, 4)


@pytest.mark.parametrize("img_size,expected", [(32, (3, 32, 32)), ([48, 32], (3, 48, 32))])
def test_data_config_input_size_follows_the_img_size_the_backbone_is_built_for(img_size, expected):
    model = create_model("test_vit", 3, head="linear", img_size=img_size)
    assert tuple(model.data_config()["input_size"]) == expected
    assert model(torch.randn(1, *expected)).shape == (1, 3)
