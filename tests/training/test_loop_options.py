"""The loop options, each checked by its effect: lr values at known updates, parameters and BatchNorm
statistics that changed or did not, EMA weights, rows in metrics.csv and the best epoch in summary.json.

Runner-level tests use a tiny folder (18 train / 9 val images at 32 px) and mostly head stages on
cached features, which cost a fraction of a second per epoch."""
import csv
import json
import math

import pytest
import torch
from torch import nn

from finetune.models.checkpoint import read_weights
from finetune.config import parse_recipe
from finetune.models import create_model
from finetune.models.params import apply_trainable, frozen_batchnorms, select_trainable, set_train_mode
from finetune.training.loop import make_grad_scaler, train_one_epoch
from finetune.training.runner import Runner, run_training

CPU = torch.device("cpu")


def train(raw, run_dir, resume=False):
    return run_training(parse_recipe(raw), raw, run_dir=run_dir, resume=resume, quiet=True)


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def training_state(run_dir):
    """The training state of ``checkpoints/last``, its EMA made whole again: the entries it shares with the
    model (``ema_shared``) come from the checkpoint's weights, as a resume takes them."""
    state = torch.load(run_dir / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    if state["ema"] is not None:
        model = read_weights(run_dir / "checkpoints" / "last")
        state["ema"] = {**{k: model[k] for k in state["ema_shared"]}, **state["ema"]}
    return state


def initial_weights(raw):
    """The weights a run starts from: it seeds ``training.seed`` right before creating the model."""
    recipe = parse_recipe(raw)
    torch.manual_seed(recipe.training.seed)
    return create_model(recipe.model.backbone, 3, head=recipe.model.head).state_dict()


@pytest.fixture
def quick(tiny_recipe):
    """The tiny recipe without the test-split evaluation."""
    tiny_recipe["output"] = {"evaluate_test": False}
    return tiny_recipe


def head_stage(epochs, **extra):
    return {"name": "head", "epochs": epochs, "train": "head", **extra}


# -------------------------------------------------------------------------------- accumulation, lr

def cosine_with_warmup(t, *, base, total, warmup, warmup_lr):
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * t / total))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_schedule_is_sized_and_stepped_in_optimizer_updates(quick, tmp_path, monkeypatch, accumulation):
    """18 train images in batches of 4 → 4 micro-batches per epoch (the incomplete one is dropped); with
    accumulation 3 that is 2 updates (3 + a last partial window of 1). Over 2 epochs with 1 warmup epoch,
    the lr of every update follows warmup then cosine sized in updates, so the last update of the stage
    runs at the curve's last point and the epoch-end lr in metrics.csv is the cosine midpoint, then 0."""
    from finetune.training import optim as runner_module

    lrs = []
    make_optimizer = runner_module.make_optimizer

    def recording(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(runner_module, "make_optimizer", recording)
    quick["stages"] = [head_stage(2, schedule={"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-4})]
    quick["training"].update({"batch_size": 4, "accumulation": accumulation})
    run = tmp_path / "run"
    train(quick, run)

    per_epoch = math.ceil(4 / accumulation)
    total = 2 * per_epoch
    expected = [cosine_with_warmup(t, base=3e-3, total=total, warmup=per_epoch, warmup_lr=1e-4) for t in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert [float(r["lr"]) for r in read_metrics(run)] == pytest.approx([1.5e-3, 0.0], abs=1e-9)
    assert training_state(run)["updates_in_stage"] == total


def test_step_decay_happens_every_step_epochs_of_updates_with_accumulation(quick, tmp_path):
    quick["stages"] = [head_stage(3, schedule={"name": "step", "step_epochs": 1, "gamma": 0.5})]
    quick["training"].update({"batch_size": 4, "accumulation": 3})
    train(quick, tmp_path / "run")
    assert [float(r["lr"]) for r in read_metrics(tmp_path / "run")] == pytest.approx([1.5e-3, 7.5e-4, 3.75e-4])


# ------------------------------------------------------------------------------------ early stopping

def scripted_validation(monkeypatch, script, crash_at=None):
    """Replace validation by a script: the n-th epoch of the run validates to ``script[n]``, an accuracy
    (every other metric follows it; loss 1 - accuracy) or a dict of metrics; ``crash_at``: raise once
    while validating that epoch, as a killed run would stop."""
    crashed = []

    def validate(self, inputs):
        epoch = len(self.state.history)
        if epoch == crash_at and not crashed:
            crashed.append(epoch)
            raise RuntimeError("simulated crash")
        step = script[epoch]
        metrics = step if isinstance(step, dict) else {
            "loss": 1 - step, "accuracy": step, "macro_f1": step, "balanced_accuracy": step}
        return {**metrics, "per_class_recall": {c: metrics["accuracy"] for c in self.classes}}

    monkeypatch.setattr(Runner, "_validate", validate)


STAGE_SCRIPT = [0.9, 0.5, 0.6, 0.55, 0.58, 0.95, 0.95]  # stage 0: 1 epoch; stage 1: up to 6


def test_patience_counts_against_the_stage_own_best_and_best_stays_the_run_best(quick, tmp_path, monkeypatch):
    """Stage 1 starts below stage 0's best (as unfreezing does): it improves on its own best twice, then
    stalls 2 epochs (patience 2) and stops after its 4th epoch; the best checkpoint is still epoch 1."""
    scripted_validation(monkeypatch, STAGE_SCRIPT)
    quick["stages"] = [head_stage(1), head_stage(6, name="again")]
    quick["training"]["early_stopping"] = 2
    run = tmp_path / "run"
    summary = train(quick, run)
    assert [(r["stage"], r["val_acc"]) for r in read_metrics(run)] == [
        ("0", "0.9"), ("1", "0.5"), ("1", "0.6"), ("1", "0.55"), ("1", "0.58")]
    assert summary["best_epoch"] == 1 and summary["best_metric"]["value"] == 0.9
    best = json.loads((run / "checkpoints" / "best" / "checkpoint.json").read_text())
    assert best["metrics"]["epoch"] == 1


def test_resume_restores_the_stage_own_best_for_patience(quick, tmp_path, monkeypatch):
    """Killed while validating stage 1's 4th epoch: the resumed run still stops at the same epoch."""
    scripted_validation(monkeypatch, STAGE_SCRIPT, crash_at=4)
    quick["stages"] = [head_stage(1), head_stage(6, name="again")]
    quick["training"]["early_stopping"] = 2
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(quick, run)
    assert len(read_metrics(run)) == 4
    train(quick, run, resume=True)
    assert [r["val_acc"] for r in read_metrics(run)] == ["0.9", "0.5", "0.6", "0.55", "0.58"]


# ----------------------------------------------------------------------------------- best selection

SELECT_SCRIPT = [  # each metric is best at a different epoch
    {"loss": 0.6, "accuracy": 0.5, "macro_f1": 0.6, "balanced_accuracy": 0.5},
    {"loss": 0.8, "accuracy": 0.7, "macro_f1": 0.5, "balanced_accuracy": 0.7},
    {"loss": 0.9, "accuracy": 0.6, "macro_f1": 0.8, "balanced_accuracy": 0.6},
]


@pytest.mark.parametrize("select, column, pick, epoch", [("loss", "val_loss", min, 1), ("accuracy", "val_acc", max, 2),
                                                         ("macro_f1", "val_macro_f1", max, 3)])
def test_best_epoch_is_the_selected_column_argmax_or_argmin(quick, tmp_path, monkeypatch, select, column, pick, epoch):
    scripted_validation(monkeypatch, SELECT_SCRIPT)
    quick["stages"] = [head_stage(3)]
    quick["training"]["select"] = select
    run = tmp_path / "run"
    summary = train(quick, run)
    values = [float(r[column]) for r in read_metrics(run)]
    assert summary["best_epoch"] == 1 + values.index(pick(values)) == epoch
    assert summary["best_metric"] == {"name": select, "value": pick(values)}
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == epoch
    assert json.loads((run / "checkpoints" / "best" / "checkpoint.json").read_text())["metrics"]["epoch"] == epoch


# ------------------------------------------------------------------------------------------- batchnorm

def test_batchnorm_eval_still_trains_the_head_normalisation(quick, tmp_path):
    """The spinal head's BatchNorm1d learns running statistics under ``batchnorm: eval``; the backbone's keep theirs."""
    quick["stages"] = [head_stage(1, batchnorm="eval")]
    run = tmp_path / "run"
    train(quick, run)
    before, after = initial_weights(quick), read_weights(run / "checkpoints" / "last")
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    head_stats = [k for k in stats if k.startswith("head.")]
    assert head_stats and all(not torch.equal(before[k], after[k]) for k in head_stats)
    assert all(torch.equal(before[k], after[k]) for k in stats if k.startswith("backbone."))


def batches(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 3, (4,), generator=g), 0) for _ in range(n)]


def fit_stage(model, train, batchnorm="auto", *, lr=0.05, clip_grad=None, accumulation=1, ema=None, data=None):
    trainable = select_trainable(model, train)
    apply_trainable(model, trainable)
    set_train_mode(model, frozen_batchnorms(model, trainable, batchnorm))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return train_one_epoch(model, data or batches(), optimizer, nn.CrossEntropyLoss(), device=CPU, amp_dtype=None,
                           scaler=make_grad_scaler(CPU, None), clip_grad=clip_grad, accumulation=accumulation,
                           ema=ema)


@pytest.mark.parametrize("batchnorm, train, backbone_stats_change, backbone_weights_change", [
    ("auto", "head", False, False),
    ("auto", "all", True, True),
    ("eval", "all", False, True),
    ("train", "head", True, False),
])
def test_batchnorm_modes_decide_which_running_statistics_change(batchnorm, train, backbone_stats_change,
                                                                backbone_weights_change):
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head={"name": "spinal", "width": 16})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_stage(model, train, batchnorm)
    after = model.state_dict()

    def changed(prefix, kind):
        keys = [k for k in before if k.startswith(prefix) and kind(k)]
        assert keys
        return {not torch.equal(before[k], after[k]) for k in keys}

    is_stat = lambda k: k.endswith(("running_mean", "running_var"))  # noqa: E731
    is_conv = lambda k: "conv" in k and k.endswith("weight")  # noqa: E731
    assert changed("head.", is_stat) == {True}  # the head's BatchNorm1d always learns its statistics
    assert changed("backbone.", is_stat) == {backbone_stats_change}
    assert (True in changed("backbone.", is_conv)) == backbone_weights_change


# ---------------------------------------------------------------------- label smoothing, class balance

def test_label_smoothing_reaches_the_loss(quick, tmp_path):
    quick["training"]["label_smoothing"] = 0.3
    loss_fn = Runner(parse_recipe(quick), quick, run_dir=tmp_path / "run", resume=False, quiet=True)._make_loss()
    logits, labels = torch.tensor([[4.0, 0.0, -1.0], [0.0, 2.0, 1.0]]), torch.tensor([0, 2])
    target = torch.full((2, 3), 0.1)
    target[[0, 1], labels] = 0.8  # 1 - 0.3 + 0.3 / 3 on the true class, 0.3 / 3 elsewhere
    expected = -(target * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss_fn(logits, labels), expected)


@pytest.fixture
def imbalanced(quick, tmp_path, make_tiny_folder):
    """The tiny recipe on a folder of 4 circles, 12 squares and 12 stripes (splits keep the ratio)."""
    root = make_tiny_folder(tmp_path / "imbalanced")
    for path in sorted((root / "circle").iterdir())[4:]:
        path.unlink()
    quick["data"]["root"] = str(root)
    return quick


def set_up(raw, run_dir):
    runner = Runner(parse_recipe(raw), raw, run_dir=run_dir, resume=False, quiet=True)
    runner.setup()
    runner.cleanup()
    return runner


@pytest.mark.parametrize("balance", ["none", "loss"])
def test_balance_loss_weights_classes_by_inverse_train_frequency(imbalanced, tmp_path, balance):
    imbalanced["data"]["balance"] = balance
    runner = set_up(imbalanced, tmp_path / "run")
    counts = torch.bincount(torch.tensor([label for _, label in runner.items("train")]), minlength=3).float()
    assert counts[0] < counts[1]
    weight = runner.loss_fn.weight
    if balance == "none":
        assert weight is None
    else:
        torch.testing.assert_close(weight * counts, torch.full((3,), (weight * counts)[0].item()))
        assert weight.mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize("balance", ["none", "sampler"])
def test_balance_sampler_draws_every_class_equally_often(imbalanced, tmp_path, balance):
    imbalanced["data"]["balance"] = balance
    runner = set_up(imbalanced, tmp_path / "run")
    loader = runner._image_loader("train", train=True)
    labels = loader.dataset.labels
    drawn = torch.bincount(torch.tensor([labels[i] for i in loader.sampler]), minlength=3)
    present = torch.bincount(torch.tensor(list(labels)), minlength=3)
    assert drawn.sum() == present.sum()
    if balance == "none":
        assert torch.equal(drawn, present)
    else:
        assert drawn.max() - drawn.min() <= 1


# -------------------------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("clip", [None, 1e-3])
def test_clipping_bounds_the_norm_of_each_update(clip):
    """Plain SGD with lr 1: the step equals the gradient, so its norm is the clipped gradient norm."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear")
    before = [p.detach().clone() for p in model.parameters()]
    fit_stage(model, "all", lr=1.0, clip_grad=clip, data=batches(1))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
    if clip is None:
        assert step > 10 * 1e-3
    else:
        assert step == pytest.approx(clip, rel=1e-3)


# ------------------------------------------------------------------------------------------------ EMA

@pytest.mark.parametrize("ema", [None, 0.5])
def test_ema_weights_are_what_is_validated_and_saved_as_best(quick, tmp_path, ema):
    quick["stages"] = [head_stage(1)]
    quick["training"]["ema"] = ema
    run = tmp_path / "run"
    train(quick, run)
    best = read_weights(run / "checkpoints" / "best")
    last = read_weights(run / "checkpoints" / "last")
    head = [k for k in best if k.startswith("head.") and k.endswith("weight")]
    if ema is None:
        assert training_state(run)["ema"] is None
        assert all(torch.equal(best[k], last[k]) for k in best)
    else:
        averaged = training_state(run)["ema"]
        assert all(torch.equal(best[k], averaged[k]) for k in best)
        assert all(not torch.equal(best[k], last[k]) for k in head)


def test_ema_warmup_blends_update_n_at_decay_one_minus_n_to_the_minus_two_thirds_capped():
    """timm's EMA warmup: the first update copies, update n blends at min(1 - n^(-2/3), decay); past
    n = 32 the cap of 0.9 holds."""
    from finetune.training.ema import Ema

    model = nn.Linear(1, 1, bias=False)
    ema = Ema(model, 0.9, warmup=True)
    values = torch.randn(40, generator=torch.Generator().manual_seed(0)).tolist()
    expected = values[0]
    for n, value in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update()
        decay = min(1 - n ** (-2 / 3), 0.9)
        expected = value if n == 1 else decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), n


def test_ema_warmup_lets_the_average_of_a_short_run_follow_it(quick, tmp_path):
    """At a fixed decay of 0.999 a few updates leave the EMA at the first update's (nearly random) head;
    with ``training.ema_warmup`` the decay starts low and the EMA head follows training."""
    quick["stages"] = [head_stage(3)]
    gap = {}
    for warmup in (False, True):
        quick["training"].update({"ema": 0.999, "ema_warmup": warmup})
        train(quick, tmp_path / str(warmup))
        ema, model = training_state(tmp_path / str(warmup))["ema"], read_weights(tmp_path / str(warmup) / "checkpoints" / "last")
        gap[warmup] = sum((ema[k] - model[k]).norm().item() for k in model if k.startswith("head.") and k.endswith("weight"))
    assert gap[True] < 0.5 * gap[False]


def test_ema_carries_across_stages_with_one_update_count(quick, tmp_path):
    """Stage 0 trains the head (1 update), stage 1 everything with 1 update. The EMA isn't restarted
    at stage 1: its one update blends the (still initial) EMA backbone with the trained one at the
    configured decay — a restart would have copied the model."""
    decay = 0.75
    quick["stages"] = [head_stage(1), {"name": "all", "epochs": 1, "train": "all"}]
    # 18 train images in batches of 8: 2 micro-batches per epoch, one update each with accumulation 2
    quick["training"].update({"ema": decay, "batch_size": 8, "accumulation": 2})
    run = tmp_path / "run"
    train(quick, run)
    state = training_state(run)
    model = read_weights(run / "checkpoints" / "last")
    initial = initial_weights(quick)
    assert any(not torch.equal(state["ema"][k], model[k]) for k in model if k.startswith("backbone."))
    for k in (k for k in initial if k.startswith("backbone.") and initial[k].is_floating_point()):
        expected = initial[k] + (1 - decay) * (model[k] - initial[k])
        torch.testing.assert_close(state["ema"][k], expected, msg=k)
    assert state["ema_updates"] == 2


def test_head_only_stage_leaves_the_ema_backbone_untouched(quick, tmp_path):
    """A cached head stage after an ``all`` stage: only the head's EMA moves — the EMA backbone is the
    one the ``all`` stage left, bit for bit (the same run stopped after stage 0 shows it)."""
    quick["stages"] = [{"name": "all", "epochs": 1, "train": "all"}]
    quick["training"].update({"ema": 0.5, "batch_size": 8})
    train(quick, tmp_path / "a")
    quick["stages"].append(head_stage(1))
    train(quick, tmp_path / "b")
    a, b = training_state(tmp_path / "a"), training_state(tmp_path / "b")
    model = read_weights(tmp_path / "b" / "checkpoints" / "last")
    for k in a["ema"]:
        if k.startswith("backbone."):
            assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert any(not torch.equal(a["ema"][k], model[k]) for k in a["ema"] if k.startswith("backbone."))
    assert all(not torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"] if k.startswith("head.") and k.endswith("weight"))
    assert b["ema_updates"] == a["ema_updates"] + 2


def test_training_state_of_a_cached_head_stage_holds_the_ema_of_the_head_alone(quick, tmp_path):
    """The EMA backbone of a head-first run is the model's, bit for bit: the training state names it
    (``ema_shared``) instead of writing it every epoch, and a resume takes it from the checkpoint's weights."""
    quick["stages"] = [head_stage(2), {"name": "all", "epochs": 1, "train": "all"}]
    quick["training"].update({"ema": 0.5, "batch_size": 8})
    quick["stages"][1]["epochs"] = 0
    run = tmp_path / "run"
    train(quick, run)
    raw = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    model = read_weights(run / "checkpoints" / "last")
    backbone = {k for k in model if k.startswith("backbone.")}
    assert backbone and backbone <= set(raw["ema_shared"])
    assert set(raw["ema"]) == {k for k in model if k.startswith("head.")} - set(raw["ema_shared"])
    assert any(k.endswith("weight") for k in raw["ema"])
    # the whole run (stage 1 included) against the head stage resumed from its last checkpoint
    quick["stages"][1]["epochs"] = 1
    train(quick, tmp_path / "whole")
    (run / "recipe.yaml").write_text((tmp_path / "whole" / "recipe.yaml").read_text())
    train(quick, run, resume=True)
    a, b = training_state(tmp_path / "whole")["ema"], training_state(run)["ema"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_update_of_a_cached_head_stage_writes_only_the_head():
    """On cached features only the head runs: the EMA never writes a backbone tensor (no wasted blend),
    which so stays bit for bit the model's backbone, while the head's EMA (its BatchNorm included) moves."""
    from finetune.training.ema import Ema, stage_state_names

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head={"name": "spinal", "width": 16})
    ema = Ema(model, 0.5)
    trainable = select_trainable(model, "head")
    apply_trainable(model, trainable)
    frozen = frozen_batchnorms(model, trainable, "train")  # even with every BatchNorm training
    ema.track(model, stage_state_names(model, trainable, frozen, runs=model.head))
    state = ema.module.state_dict()
    versions = {k: v._version for k, v in state.items() if k.startswith("backbone.")}
    with torch.no_grad():  # as the feature cache does: BatchNorm in eval mode
        features = [(model.backbone.eval()(x), y, 0) for x, y, _ in batches()]
    head_before = {k: v.clone() for k, v in state.items() if k.startswith("head.")}
    set_train_mode(model, frozen)
    train_one_epoch(model.head, features, torch.optim.SGD(model.head.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                    device=CPU, amp_dtype=None, scaler=make_grad_scaler(CPU, None), ema=ema)
    assert ema.updates == 3
    assert {k: v._version for k, v in state.items() if k.startswith("backbone.")} == versions
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k.startswith("backbone."))
    assert [k for k in head_before if k.endswith(("weight", "running_mean")) and torch.equal(state[k], head_before[k])] == []
