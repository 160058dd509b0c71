"""Mixup/CutMix (training.mixup, stages.N.mixup): timm's Mixup, soft targets, the loss, cached stages."""
import copy

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from finetune.config import parse_recipe
from finetune.errors import FinetuneError
from finetune.training import runner as runner_module
from finetune.training.mixing import BatchMixer, stage_mixer
from finetune.training.optim import make_loss

NUM_CLASSES = 5


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_soft_targets_sum_to_one_and_the_loss_is_timms_soft_target_cross_entropy(mode):
    inputs, labels = batch(8)
    mixer = BatchMixer(num_classes=NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode=mode)
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode=mode, label_smoothing=0.1,
                      num_classes=NUM_CLASSES)
    for seed in range(4):
        np.random.seed(seed)
        mixed, targets = mixer(inputs.clone(), labels)
        np.random.seed(seed)
        expected_inputs, smoothed = reference(inputs.clone(), labels)
        assert torch.allclose(targets.sum(1), torch.ones(8))
        assert not torch.equal(mixed, inputs) and torch.equal(mixed, expected_inputs)
        assert ((targets > 0) & (targets < 1)).any()  # soft, not one-hot
        logits = torch.randn(8, NUM_CLASSES)
        loss = make_loss(label_smoothing=0.1)(logits, targets)  # the run's loss, given probabilities
        assert torch.allclose(loss, SoftTargetCrossEntropy()(logits, smoothed), atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_multi_hot_targets_mix_with_the_images_factors(mode):
    inputs, _ = batch(8)
    g = torch.Generator().manual_seed(1)
    multi_hot = (torch.rand(8, NUM_CLASSES, generator=g) > 0.5).float()
    mixer = stage_mixer(None, {"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "mode": mode},
                        input_size=(3, 8, 8), num_classes=NUM_CLASSES, multilabel=True)
    for seed in range(3):
        np.random.seed(seed)
        mixed, targets = mixer(inputs.clone(), multi_hot)
        # mixup: mixed = lam x + (1 - lam) x_flipped; the targets carry the same lam, per image in elem mode
        flipped = inputs.flip(0)
        lam = ((mixed - flipped).flatten(1) * (inputs - flipped).flatten(1)).sum(1) / (inputs - flipped).flatten(1).pow(2).sum(1)
        expected = multi_hot * lam[:, None] + multi_hot.flip(0) * (1 - lam[:, None])
        assert torch.allclose(targets, expected, atol=1e-4)
        assert mode == "batch" or lam.unique().numel() > 1
    with pytest.raises(AssertionError):  # timm's own check: an even batch (BatchMixer leaves an odd one's last out)
        mixer.mixup(inputs[:3].clone(), multi_hot[:3])
    loss = make_loss(label_smoothing=0.1, task="multilabel")(torch.randn(8, NUM_CLASSES), targets)
    assert torch.isfinite(loss)


def test_odd_batches_mix_all_but_the_last_sample_and_a_batch_of_one_is_left_alone():
    inputs, labels = batch(7)
    np.random.seed(0)
    mixed, targets = BatchMixer(num_classes=NUM_CLASSES, mixup_alpha=1.0, cutmix_alpha=0.0)(inputs.clone(), labels)
    assert mixed.shape == inputs.shape and not torch.equal(mixed[:6], inputs[:6])
    assert torch.equal(mixed[6], inputs[6]) and torch.equal(targets[6], torch.eye(NUM_CLASSES)[labels[6]])
    one, target = BatchMixer(num_classes=NUM_CLASSES)(inputs[:1].clone(), labels[:1])
    assert torch.equal(one, inputs[:1]) and torch.equal(target, torch.eye(NUM_CLASSES)[labels[:1]])


def test_stage_mixup_replaces_the_runs_and_auto_follows_the_input_size():
    run = {"mixup_alpha": 0.4, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch"}
    assert stage_mixer(None, run, input_size=(3, 32, 32), num_classes=3).mixup.mixup_alpha == 0.4
    assert stage_mixer({**run, "mixup_alpha": 0.1}, run, input_size=(3, 32, 32), num_classes=3).mixup.mixup_alpha == 0.1
    assert stage_mixer(False, run, input_size=(3, 32, 32), num_classes=3) is None
    assert stage_mixer(None, {**run, "prob": 0.0}, input_size=(3, 32, 32), num_classes=3) is None
    assert stage_mixer(None, "auto", input_size=(3, 32, 32), num_classes=3) is None
    assert stage_mixer(None, "auto", input_size=(3, 224, 224), num_classes=3).mixup.cutmix_alpha == 1.0


def test_cached_head_stages_do_not_mix_and_image_stages_do(tiny_recipe, tmp_path, monkeypatch):
    """The run's mixup mixes the image stages; the cached head stage trains on hard labels; a head stage with
    its own mixup trains on images, mixed; mixup: false turns it off in a stage."""
    raw = copy.deepcopy(tiny_recipe)
    raw["training"]["mixup"] = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0}
    raw["stages"] = [
        {"name": "cached", "epochs": 1, "train": "head"},
        {"name": "mixed-head", "epochs": 1, "train": "head", "mixup": {"mixup_alpha": 0.2, "cutmix_alpha": 0.0}},
        {"name": "all", "epochs": 1, "train": "all"},
        {"name": "plain", "epochs": 1, "train": "all", "mixup": False},
    ]
    seen = []
    real = runner_module.train_one_epoch

    def spy(model, loader, optimizer, loss_fn, **kwargs):
        targets = []

        def loss(logits, target):
            targets.append(target)
            return loss_fn(logits, target)

        stats = real(model, loader, optimizer, loss, **kwargs)
        seen.append((type(model).__name__, {t.ndim for t in targets}, kwargs["mix"]))
        return stats

    monkeypatch.setattr(runner_module, "train_one_epoch", spy)
    runner_module.run_training(parse_recipe(raw), raw, run_dir=tmp_path / "run", quiet=True)
    kinds = [(module, dims) for module, dims, _ in seen]
    assert kinds[0][0] != "FinetuneModel" and kinds[0][1] == {1}  # the head on cached features, hard labels
    assert kinds[1:] == [("FinetuneModel", {2}), ("FinetuneModel", {2}), ("FinetuneModel", {1})]
    assert seen[1][2].mixup.mixup_alpha == 0.2 and seen[2][2].mixup.mixup_alpha == 0.4


@pytest.mark.parametrize("change, message", [
    ({"data.augment": {"preset": "trivialaugment", "num_ops": 3}},
     "data.augment: preset trivialaugment takes no num_ops (its options: magnitude)"),
    ({"data.augment": {"preset": "randaugment", "magnitude": 11}}, "data.augment.magnitude: Input should be less than or equal to 10"),
    ({"data.augment": {"preset": "cutout"}}, "data.augment.preset: Input should be"),
    ({"data.augment": "strong"}, "data.augment: Input should be 'auto'"),
    ({"data.augment": {"random_erasing": {"scale": [0.5, 0.1]}}}, "data.augment.random_erasing: scale must be"),
    ({"training.mixup": {"mixup_alpha": 0, "cutmix_alpha": 0}}, "training.mixup: needs mixup_alpha or cutmix_alpha"),
    ({"training.mixup": {"switch_prob": 2}}, "training.mixup.switch_prob"),
    ({"stages.0.mixup": {"mixup_alpha": 0.2}, "stages.0.feature_cache": True},
     "stages.0.mixup: a head-only stage with feature_cache: true trains on cached features"),
])
def test_bad_augment_and_mixup_settings_are_one_line_errors_naming_the_key(tiny_recipe, change, message):
    raw = copy.deepcopy(tiny_recipe)
    for path, value in change.items():
        section, key = path.rsplit(".", 1)
        node = raw
        for part in section.split("."):
            node = node[int(part)] if part.isdigit() else node[part]
        node[key] = value
    with pytest.raises(FinetuneError) as e:
        parse_recipe(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_training_accuracy_on_mixed_batches_counts_the_dominant_class():
    from finetune.training.loop import make_grad_scaler, train_one_epoch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, NUM_CLASSES))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))  # always predicts class 0
    inputs, labels = batch(6)
    labels = torch.full((6,), 3)

    def mix(x, y):  # the dominant class is 0 for the first four samples, 3 for the last two
        targets = torch.zeros(6, NUM_CLASSES)
        targets[:4, 0], targets[:4, 3], targets[4:, 3], targets[4:, 0] = 0.6, 0.4, 0.7, 0.3
        return x, targets

    received = []

    def loss_fn(logits, targets):
        received.append(targets)
        return torch.nn.functional.cross_entropy(logits, targets)

    stats = train_one_epoch(model, [(inputs, labels, 0)], torch.optim.SGD(model.parameters(), lr=0.0), loss_fn,
                            device=torch.device("cpu"), amp_dtype=None,
                            scaler=make_grad_scaler(torch.device("cpu"), None), mix=mix)
    assert received[0].shape == (6, NUM_CLASSES)  # the loss got the soft targets
    assert stats.accuracy == pytest.approx(4 / 6)  # against the dominant class, not the original label 3


def test_feature_cache_key_holds_the_augmentation_preset(tiny_recipe, monkeypatch):
    """Cached augmented views (feature_cache_views) depend on data.augment: it is part of the cache key."""
    from types import SimpleNamespace

    from finetune import _distributed as ddp
    from finetune.models import create_model
    from finetune.training import runner as runner_module

    keys = []
    monkeypatch.setattr(runner_module, "stage_features", lambda *args, **kwargs: keys.append(kwargs["key_parts"]))
    model = create_model("test_resnet", 3, head="linear")
    for augment in (None, {"preset": "trivialaugment"}, {"preset": "trivialaugment", "magnitude": 3}):
        raw = copy.deepcopy(tiny_recipe)
        raw["data"]["augment"] = augment
        raw["stages"][0].update(feature_cache="auto", feature_cache_views=1)
        recipe = parse_recipe(raw)
        runner = SimpleNamespace(cfg=recipe.training, recipe=recipe, model=model, items=lambda split: [], dataset=lambda split, train: None,
                                 train_transform=None, eval_transform=None, preprocessing={"input_size": [3, 32, 32]},
                                 dist=ddp.DistInfo(), device=torch.device("cpu"), amp_dtype=None, classes=[0, 1, 2], task="single", _train_batch=lambda cached: 8,
                                 _eval_model=lambda: model)
        inputs = runner_module.Runner.stage_inputs(runner, recipe.stages[0], True, lambda split, train: [])
        assert inputs.module is model and inputs.mix is None  # the fake cache declined: images, unmixed
    assert "augment" not in keys[0]
    assert keys[1]["augment"]["preset"] == "trivialaugment" and keys[1]["augment"] != keys[2]["augment"]


def test_no_recipe_defaults_choose_augmentation_and_mixing_by_input_size(tiny_folder):
    from finetune.cli.train import default_recipe

    recipe = parse_recipe(default_recipe(str(tiny_folder), "test_resnet", "linear", "false"))
    assert recipe.data.augment == "auto" and recipe.training.mixup == "auto"
