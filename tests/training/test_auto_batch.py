"""training.batch_size: auto (issue 26, part 4): the bounded search against a fake memory limit, what a stage
searches with (head on features, or the whole model on images), the CPU resolution, and resume reading the record."""
import copy
import json

import pytest
import torch

from finetune.config import parse_recipe
from finetune.errors import FinetuneError
from finetune.training import auto_batch
from finetune.training.auto_batch import search_batch_size
from finetune.training.runner import Runner


def fake_memory(per_sample, limit, overhead=0):
    """``fits(b)``: a pass of batch b takes overhead + b × per_sample bytes, against limit; records each b tried."""
    tried = []

    def fits(b):
        tried.append(b)
        return overhead + b * per_sample <= limit

    return fits, tried


@pytest.mark.parametrize("per_sample, limit, maximum, expected", [
    (10, 1000, 1024, 100),     # doubling to 128 fails, bisecting 64..128 finds 100
    (10, 1000, 50, 50),        # capped by maximum (the split's size)
    (10, 75, 1024, 7),         # the start batch (8) does not fit: down from there
    (1, 10**9, 1024, 1024),
])
def test_the_search_finds_the_largest_batch_under_a_fake_memory_limit(per_sample, limit, maximum, expected):
    fits, tried = fake_memory(per_sample, limit)
    assert search_batch_size(fits, maximum=maximum) == expected
    assert len(tried) <= 2 * (maximum.bit_length() + 1)  # bounded: logarithmic in the range
    assert all(b <= maximum for b in tried)


def test_the_search_refuses_when_not_even_one_sample_fits():
    fits, _ = fake_memory(100, 50)
    with pytest.raises(FinetuneError, match="not even a batch of 1"):
        search_batch_size(fits, maximum=64)


def _spy_batch_sizes(monkeypatch) -> list:
    """The batch size of each stage's training loader, in the order the stages train."""
    from finetune.training import runner as runner_module

    sizes = []
    real = runner_module.train_one_epoch

    def spy(module, loader, optimizer, loss_fn, **kwargs):
        sizes.append(loader.batch_size)
        return real(module, loader, optimizer, loss_fn, **kwargs)

    monkeypatch.setattr(runner_module, "train_one_epoch", spy)
    return sizes


def _auto_recipe(tiny_recipe):
    raw = copy.deepcopy(tiny_recipe)
    raw["training"]["batch_size"] = "auto"
    raw["stages"] = [{"name": "head", "epochs": 1, "train": "head"}, {"name": "all", "epochs": 1, "train": "all"}]
    return raw


def test_auto_resolves_to_the_default_on_the_cpu_per_stage_and_is_recorded(tiny_recipe, tmp_path, monkeypatch):
    sizes = _spy_batch_sizes(monkeypatch)
    raw = _auto_recipe(tiny_recipe)
    recipe = parse_recipe(raw)
    assert recipe.training.eval_batch_size == 2 * auto_batch.DEFAULT_BATCH
    runner = Runner(recipe, raw, run_dir=tmp_path / "run", resume=False, quiet=True)
    runner.setup()
    try:
        runner.train()
    finally:
        runner.cleanup()
    assert sizes == [auto_batch.DEFAULT_BATCH] * 2
    assert json.loads((tmp_path / "run" / auto_batch.RECORD_FILE).read_text()) == {"0": 32, "1": 32}


def test_a_resumed_run_trains_with_the_recorded_batches(tiny_recipe, tmp_path, monkeypatch):
    raw = _auto_recipe(tiny_recipe)
    runner = Runner(parse_recipe(raw), raw, run_dir=tmp_path / "run", resume=False, quiet=True)
    runner.setup()
    (tmp_path / "run" / auto_batch.RECORD_FILE).write_text(json.dumps({"0": 5, "1": 3}))
    sizes = _spy_batch_sizes(monkeypatch)
    try:
        runner.train()
    finally:
        runner.cleanup()
    assert sizes == [5, 3]


@pytest.mark.parametrize("cached", [True, False])
def test_the_search_runs_the_stages_own_module_and_inputs_and_leaves_batchnorm_alone(tiny_recipe, tmp_path, monkeypatch,
                                                                                     cached):
    raw = _auto_recipe(tiny_recipe)
    runner = Runner(parse_recipe(raw), raw, run_dir=tmp_path / "run", resume=False, quiet=True)
    runner.setup()
    seen = {}

    def fake_memory_fits(module, trainable, example, *, fraction, device, amp_dtype, total_memory=None):
        seen.update(module=module, trainable=trainable, fraction=fraction)

        def fits(b):  # a real pass, to move the BatchNorm statistics, against a fake limit of 24 samples
            module(example(b)).sum().backward()
            seen.setdefault("shapes", []).append(tuple(example(b).shape))
            return b <= 24

        return fits

    monkeypatch.setattr(auto_batch, "memory_fits", fake_memory_fits)
    try:
        before = {k: v.clone() for k, v in runner.model.state_dict().items()}
        assert runner._search_batch(cached) == min(24, len(runner.items("train")))
        after = runner.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics put back
    finally:
        runner.cleanup()
    assert seen["module"] is (runner.model.head if cached else runner.model)
    width = runner.model.num_features
    assert seen["shapes"][0][1:] == ((width,) if cached else tuple(runner.preprocessing["input_size"]))
    assert seen["fraction"] == 0.85
