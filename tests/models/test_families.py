"""Every backbone family × every head along the user's path: create, forward, one training step of each
stage kind (``head`` on cached features, ``last:2``, ``all``), save, load, predict and ONNX export.

Tiny random-init timm models at 32 px; kwargs shrink the big ones and build fixed-size ones for 32 px.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import finetune
from finetune.models.checkpoint import load_checkpoint, save_checkpoint
from finetune.data import ImageDataset
from finetune.errors import FinetuneError
from finetune.deploy.export import export_model
from finetune.data.transforms import preprocessing_transform
from finetune.models import create_model
from finetune.models.factory import check_forward
from finetune.features.extract import extract_features
from finetune.models.params import is_head_only
from finetune.models.params import apply_trainable, frozen_batchnorms, select_trainable, set_train_mode

FAMILIES = {
    "resnet": ("test_resnet", {}),
    "efficientnet": ("test_efficientnet", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),  # pre-logits: conv_head widens 288 pooled channels to 1024
    "ghostnet": ("ghostnet_050", {}),  # pre-logits: 480 → 1280
    "convnext": ("test_convnext", {"head_hidden_size": 32}),  # pre-logits MLP in its head: 64 → 32
    "regnet": ("regnetx_002", {}),
    "vit": ("test_vit", {"img_size": 32, "global_pool": "avg"}),
    "deit": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}),  # cls + distillation tokens
    "swin": ("swin_tiny_patch4_window7_224",  # fixed input size: built for 32 px, 2×2 windows down to the last stage
             {"img_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
              "window_size": 2}),
    # coarse group_matcher: stem + 3 stages; 16× stem and 2 downsamples: 128 px leaves 2×2 tokens to attend over
    "levit": ("levit_128s", {"img_size": 128, "depth": [1, 1, 1]}),
}
HEADS = {
    "spinal": {"name": "spinal", "width": 8, "layers": 2},
    "linear": "linear",
    "mlp": {"name": "mlp", "hidden": [16]},
}
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six 36-px PNGs, two per class, with their labels."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(path)
        items.append((path, i % 3))
    return items


def preprocessing_for(model):
    cfg = model.data_config()  # input_size: the img_size the backbone is built for
    size = cfg["input_size"][-1] if "img_size" in model.backbone_kwargs else 32
    return {"input_size": [3, size, size], "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}


def train_steps(module, inputs, labels):
    """Two Adam steps on ``module``'s trainable parameters; returns the names of the parameters they changed.

    Two, because timm zero-initialises the last BatchNorm/scale of residual branches (resnet, regnet, levit):
    on the first step nothing before it gets a gradient.
    """
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        F.cross_entropy(module(inputs), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def train_selection(model, train, inputs, labels):
    trainable = select_trainable(model, train)
    apply_trainable(model, trainable)
    set_train_mode(model, frozen_batchnorms(model, trainable))
    return trainable, train_steps(model, inputs, labels)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_and_head_create_train_each_stage_kind_save_load_and_predict(family, head, images, tmp_path):
    backbone, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = create_model(backbone, len(CLASSES), head=HEADS[head], **kwargs)
    names = {n for n, _ in model.named_parameters()}
    preprocessing = preprocessing_for(model)
    transform = preprocessing_transform(preprocessing)
    dataset = ImageDataset(images, transform)
    batch = torch.stack([dataset[i][0] for i in range(len(images))])
    labels = torch.tensor([label for _, label in images])

    # forward: the backbone returns num_features pooled features, the head maps them to logits
    model.eval()
    with torch.no_grad():
        features = model.backbone(batch)
        assert features.shape == (len(images), model.num_features)
        assert model(batch).shape == (len(images), len(CLASSES))

    # head stage on cached features: the cache holds exactly what the frozen backbone returns
    trainable = select_trainable(model, "head")
    assert is_head_only(trainable) and trainable == {n for n in names if n.startswith("head.")}
    backbone_state = copy.deepcopy(model.backbone.state_dict())
    cached, cached_labels = extract_features(model.backbone, dataset, device=torch.device("cpu"), amp_dtype=None,
                                             batch_size=4, num_workers=0)
    torch.testing.assert_close(torch.from_numpy(cached), features, rtol=1e-4, atol=1e-5)
    assert cached_labels.tolist() == labels.tolist()
    apply_trainable(model, trainable)
    model.head.train()
    changed = train_steps(model.head, torch.from_numpy(cached), labels)
    assert {f"head.{n}" for n in changed} == trainable
    for key, value in model.backbone.state_dict().items():  # weights and BatchNorm statistics
        torch.testing.assert_close(value, backbone_state[key], rtol=0, atol=0)

    # last:2: the head and the backbone's last two stages train, nothing else
    trainable, changed = train_selection(model, "last:2", batch, labels)
    assert any(n.startswith("backbone.") for n in trainable) and trainable < names
    assert changed == trainable

    # all
    trainable, changed = train_selection(model, "all", batch, labels)
    assert changed == trainable == names

    # save, load: the same logits
    model.eval()
    checkpoint = save_checkpoint(tmp_path / "best", model, {"classes": CLASSES, "preprocessing": preprocessing})
    loaded, meta = load_checkpoint(checkpoint)
    with torch.no_grad():
        logits = model(batch)
        torch.testing.assert_close(loaded(batch), logits, rtol=1e-5, atol=1e-6)

    # predict from the checkpoint: the model's softmax on the preprocessed files
    predictions = finetune.load(checkpoint).predict([str(p) for p, _ in images[:2]], topk=3)
    probabilities = logits.softmax(dim=1)
    for prediction, row in zip(predictions, probabilities):
        assert prediction.labels[0] == CLASSES[int(row.argmax())]
        expected = [float(row[CLASSES.index(label)]) for label in prediction.labels]
        assert prediction.probabilities == pytest.approx(expected, rel=1e-4, abs=1e-6)


# torch.onnx.export takes 5-30 s a model on CPU: one export per family, the heads taking turns
# (efficientnet and vit: tests/evaluation/test_export.py)
ONNX_FAMILIES = [f for f in FAMILIES if f not in ("efficientnet", "vit")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The tensor attributes .*attention_bias_cache:UserWarning")  # levit's eval cache
@pytest.mark.parametrize("family,head", [(f, list(HEADS)[i % len(HEADS)]) for i, f in enumerate(ONNX_FAMILIES)])
def test_family_exports_to_onnx_with_the_models_logits(family, head, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    backbone, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = create_model(backbone, len(CLASSES), head=HEADS[head], **kwargs).eval()
    preprocessing = preprocessing_for(model)
    checkpoint = save_checkpoint(tmp_path / "best", model, {"classes": CLASSES, "preprocessing": preprocessing})

    session = ort.InferenceSession(str(export_model(checkpoint, format="onnx")), providers=["CPUExecutionProvider"])

    for batch_size in (1, 3):
        batch = torch.randn(batch_size, *preprocessing["input_size"])
        (logits,) = session.run(["logits"], {"input": batch.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(batch), rtol=1e-4, atol=1e-5)


def test_last_n_on_a_backbone_without_group_matcher_is_a_clear_error():
    with torch.device("meta"):
        model = create_model("pit_ti_224", len(CLASSES), head="linear")  # PiT has no timm group_matcher
    with pytest.raises(FinetuneError, match="pit_ti_224 has no timm group_matcher .* regexes instead"):
        select_trainable(model, "last:1")
    assert select_trainable(model, ["head", r"transformers\.2\."]) > select_trainable(model, "head")


def test_fixed_size_backbone_fed_another_size_is_a_clear_error_naming_img_size():
    with torch.device("meta"):
        model = create_model("swin_tiny_patch4_window7_224", len(CLASSES), head="spinal")
    with pytest.raises(FinetuneError, match=r"cannot take 3×32×32 images: .*backbone_kwargs\.img_size"):
        check_forward(model, (3, 32, 32))
    check_forward(model, (3, 224, 224))


def test_pre_logits_backbone_trains_its_head_from_cached_features_end_to_end(tiny_recipe, tmp_path):
    # mobilenetv3 widens its 576 pooled channels to 1024 in a pre-logits conv_head: the cached features and
    # the head both have the 1024 the backbone returns
    raw = copy.deepcopy(tiny_recipe)
    raw["model"] = {"backbone": "mobilenetv3_small_050", "pretrained": False, "head": {"name": "linear"}}
    raw["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": True}]
    raw["output"] = {"evaluate_test": False}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    summary = finetune.train(recipe, out=tmp_path / "run")

    [entry] = [p for p in (tmp_path / "cache" / "features").iterdir() if (p / "meta.json").is_file()]
    assert np.load(entry / "train.npy", mmap_mode="r").shape[-1] == 1024
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert model.head[-1].in_features == 1024
    assert summary["best_epoch"] == 1
