import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from finetune.errors import FinetuneError
from finetune.models import create_model, offline_weights
from finetune.models.weights import lukemelas_to_timm


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_weights_file_loads_and_drops_old_classifier(tmp_path, suffix):
    source = timm.create_model("test_resnet", num_classes=10)
    state = source.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model = create_model("test_resnet", 3, head="linear", pretrained=path)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_weights_file_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2), "conv1.0.weight": torch.zeros(1)}, str(path))
    with pytest.raises(FinetuneError) as err:
        create_model("test_resnet", 3, pretrained=path)
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys: foo.weight" in msg and "shape mismatch" in msg


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickled code ran')",))


def test_weights_file_with_pickled_code_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(FinetuneError, match="cannot read weights"):
        create_model("test_resnet", 3, pretrained=path)


def test_lukemelas_mapping_rejects_keys_no_rule_covers():
    with pytest.raises(FinetuneError, match="no rule maps weights key _blocks.0._se_reduce.weight"):
        lukemelas_to_timm({"_blocks.0._se_reduce.weight": torch.zeros(1)}, [1])


def test_offline_lite0_weights_fill_every_tensor_of_timm_model_with_right_shapes():
    state = offline_weights("tf_efficientnet_lite0").load()
    own = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert set(state) == set(own)
    assert all(state[k].shape == own[k].shape for k in own)


def test_offline_lite0_known_answer_palace_and_daisy():
    """The mapped ImageNet model must classify sklearn's sample images as timm's reference weights do."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    model = timm.create_model("tf_efficientnet_lite0")
    model.load_state_dict(offline_weights("tf_efficientnet_lite0").load())
    model.eval()
    config = timm.data.resolve_model_data_config(model)
    assert config["mean"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**config)
    images = load_sample_images()
    batch = torch.stack([transform(Image.fromarray(img)) for img in images.images])
    names = [f.rsplit("/", 1)[-1] for f in images.filenames]
    with torch.no_grad():
        top1 = model(batch).argmax(-1).tolist()
    palace, daisy = 698, 985  # ImageNet-1k indices
    assert dict(zip(names, top1)) == {"china.jpg": palace, "flower.jpg": daisy}


def test_create_model_with_offline_weights_loads_the_lite0_backbone():
    model = create_model("tf_efficientnet_lite0", 4, head="linear", pretrained="offline")
    expected = offline_weights("tf_efficientnet_lite0").load()
    torch.testing.assert_close(model.backbone.conv_stem.weight, expected["conv_stem.weight"])
