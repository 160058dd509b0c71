import pytest
import torch

from finetune.errors import FinetuneError
from finetune.models import create_model
from finetune.models.params import apply_trainable, frozen_batchnorms, select_trainable, set_train_mode
from finetune.training.optim import make_optimizer


@pytest.fixture
def model():
    return create_model("test_resnet", 3)


def test_selection_kinds(model):
    names = {n for n, _ in model.named_parameters()}
    head = {n for n in names if n.startswith("head.")}
    assert select_trainable(model, "head") == head
    assert select_trainable(model, "all") == names
    last2 = select_trainable(model, "last:2")
    assert head < last2 and all(n.startswith(("head.", "backbone.layer3", "backbone.layer4")) for n in last2)
    assert select_trainable(model, ["head", r"^backbone\.layer1\."]) == head | {n for n in names if n.startswith("backbone.layer1.")}


def test_selection_errors_name_the_problem(model):
    with pytest.raises(FinetuneError, match="'last:6' asks for 6 stages but test_resnet has 5"):
        select_trainable(model, "last:6")
    with pytest.raises(FinetuneError, match="'blocks' matches no parameter"):
        select_trainable(model, "blocks")


def test_frozen_parts_keep_batchnorm_in_eval_mode(model):
    trainable = select_trainable(model, "last:1")
    apply_trainable(model, trainable)
    frozen = frozen_batchnorms(model, trainable)
    set_train_mode(model, frozen)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert all(not m.training for n, m in bns.items() if not n.startswith("backbone.layer4"))
    assert all(m.training for n, m in bns.items() if n.startswith("backbone.layer4"))
    assert model.head.training
    assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())


def test_stage_switch_rebuilds_optimizer_groups_over_the_trainable_parameters(model):
    from finetune.config import OptimizerConfig

    counts = []
    for selection in ("head", "last:2", "all"):
        apply_trainable(model, select_trainable(model, selection))
        opt = make_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3))
        counts.append(sum(p.numel() for g in opt.param_groups for p in g["params"]))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts[-1] == trainable
    assert counts[0] < counts[1] < counts[2]


def test_layer_decay_scales_lower_stages_down(model):
    from finetune.config import OptimizerConfig

    apply_trainable(model, select_trainable(model, "all"))
    opt = make_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3, layer_decay=0.5))
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale_of[id(model.head.out[1].weight)] == 1.0
    assert scale_of[id(model.backbone.conv1[0].weight)] < scale_of[id(model.backbone.layer4[0].conv1.weight)] < 1.0


@pytest.mark.parametrize("mode, train", [("eval", "all"), ("auto", "last:1"), ("auto", r"^backbone\.layer4\.")])
def test_head_batchnorm_always_trains_and_eval_or_auto_freeze_only_backbone_statistics(model, mode, train):
    trainable = select_trainable(model, train)
    apply_trainable(model, trainable)
    set_train_mode(model, frozen_batchnorms(model, trainable, mode))
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    head_bns = [m for n, m in bns.items() if n.startswith("head.")]
    assert head_bns and all(m.training for m in head_bns)  # the spinal head's BatchNorm1d
    frozen_backbone = [n for n, m in bns.items() if n.startswith("backbone.") and not m.training]
    if mode == "eval":
        assert len(frozen_backbone) == len(bns) - len(head_bns)
    else:
        assert frozen_backbone and all(not n.startswith("backbone.layer4") for n in frozen_backbone)


def test_batchnorm_train_mode_freezes_nothing(model):
    assert frozen_batchnorms(model, select_trainable(model, "head"), "train") == []
