"""DDP corners (issue 22), each on 2 CPU processes (gloo) under a timeout: the EMA of the weights is one
average on every rank, a rank that lost a whole batch to unreadable files still takes part, the loader
sizes its workers by the processes on this machine, and a rank that fails stops the others with its
message instead of leaving them waiting in a collective."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

GLOBAL_BATCH, STEPS = 8, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, *args, world: int = 2, timeout: float = 120) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` forked processes; fails the test if they take longer than
    ``timeout`` (a hang) or one of them raises."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {world} processes did not finish in {timeout:.0f} s: a rank waits for another")


def join_group(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def data(seed: int = 0):
    """``STEPS`` global batches of 32-px images of 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS * GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 3, (STEPS * GLOBAL_BATCH,), generator=g)


def batches(rank: int, world: int, lost: tuple[int, ...] = ()):
    """This rank's share of every global batch, interleaved as DistributedSampler deals it; the steps in
    ``lost`` come empty (every file unreadable), as ``collate_skip`` gives them."""
    x, y = data()
    out = []
    for step in range(STEPS):
        xs, ys = x[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH], y[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        if step in lost:
            out.append((torch.empty(0), torch.empty(0, dtype=torch.int64), GLOBAL_BATCH // world))
        else:
            out.append((xs[rank::world], ys[rank::world], 0))
    return out


def train(rank: int, world: int, *, bn_trains: bool, lost: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """A few steps of finetune's own loop (``train_one_epoch``) with its EMA, on this rank's share; the EMA."""
    from finetune.models import create_model
    from finetune import _distributed as ddp
    from finetune.training.ema import Ema
    from finetune.training.loop import make_grad_scaler, train_one_epoch

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear")
    model.train()
    if not bn_trains:  # BatchNorm frozen (stages' bn: eval): the global batch's gradient is the mean of the ranks'
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    ema = Ema(model, 0.5)
    info = ddp.DistInfo(rank=rank, local_rank=rank, world_size=world, local_world_size=world)
    wrapped = ddp.wrap(model, info, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    train_one_epoch(wrapped, batches(rank, world, lost), optimizer, torch.nn.functional.cross_entropy,
                    device=torch.device("cpu"), amp_dtype=None, scaler=make_grad_scaler(torch.device("cpu"), None),
                    ema=ema)
    return {k: v.clone() for k, v in ema.module.state_dict().items()}


def _ema_rank(rank, world, port, out, bn_trains, lost):
    import torch.distributed as dist

    join_group(rank, world, port)
    try:
        torch.save(train(rank, world, bn_trains=bn_trains, lost=lost), Path(out) / f"ema{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=0, msg=k)


@pytest.mark.slow
def test_the_ema_is_one_average_on_every_rank_with_batchnorm_training(tmp_path):
    """Regression: each rank's BatchNorm statistics followed its own half of the batch, so the ranks' EMAs
    (which validate on every rank) drifted apart."""
    run_ranks(_ema_rank, tmp_path, True, ())

    a, b = torch.load(tmp_path / "ema0.pt"), torch.load(tmp_path / "ema1.pt")
    assert any("running_mean" in k for k in a)
    assert_same(a, b)


@pytest.mark.slow
def test_the_ddp_ema_equals_one_process_over_the_same_global_batches(tmp_path):
    run_ranks(_ema_rank, tmp_path, False, ())

    torch.set_num_threads(1)
    single = train(0, 1, bn_trains=False)
    assert_same(torch.load(tmp_path / "ema0.pt"), single, atol=1e-5)
    assert_same(torch.load(tmp_path / "ema1.pt"), single, atol=1e-5)


@pytest.mark.slow
def test_a_rank_whose_whole_batch_is_unreadable_still_takes_part(tmp_path):
    """Regression: the rank skipped the step and the other waited in the gradient all-reduce (a hang)."""
    run_ranks(_ema_rank_lost, tmp_path, timeout=90)

    assert_same(torch.load(tmp_path / "ema0.pt"), torch.load(tmp_path / "ema1.pt"))


def _ema_rank_lost(rank, world, port, out):
    _ema_rank(rank, world, port, out, True, (2,) if rank == 1 else ())


def _workers_rank(rank, world, port, out, local_world):
    import torch.distributed as dist

    from finetune import _distributed as ddp
    from finetune.training import loaders

    join_group(rank, world, port)
    try:
        loaders.auto_workers.__globals__["usable_cpus"] = lambda: 8  # this "machine" has 8 CPUs
        info = ddp.DistInfo(rank=rank, local_rank=rank % local_world, world_size=world, local_world_size=local_world)
        images = [(Path(out) / f"{i}.png", 0) for i in range(64)]
        loader = loaders.image_loader(loaders.ImageDataset(images, lambda image: {"image": image}), train=True,
                                      balance=False, seed=0,
                                      batch_size=2, num_workers="auto", dist=info, device=torch.device("cpu"))
        (Path(out) / f"workers{rank}").write_text(str(loader.num_workers))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("local_world, expected", [(1, 8), (2, 4)])
def test_each_rank_shares_its_own_machines_cpus(local_world, expected, tmp_path, monkeypatch):
    """Two ranks on two machines (LOCAL_WORLD_SIZE 1) each use all 8 CPUs of theirs; two on one machine share
    them. Regression: the loader divided by the global world size, leaving half of each machine idle."""
    from finetune.training import loaders

    monkeypatch.setattr(loaders, "shm_budget", lambda workers, *a, **k: (workers, 2))  # any /dev/shm: inherited
    monkeypatch.setattr(loaders, "sample_batch_bytes", lambda *a: 0)  # by the forked ranks
    from PIL import Image

    for i in range(64):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    run_ranks(_workers_rank, tmp_path, local_world)

    assert [int((tmp_path / f"workers{r}").read_text()) for r in range(2)] == [expected, expected]


FAIL_ON_RANK_1 = textwrap.dedent("""
    # rank 1 fails in its second epoch; rank 0 goes on into the next gradient all-reduce
    import os, sys
    from finetune.errors import FinetuneError
    from finetune.training import runner

    if os.environ["RANK"] == "1":
        real, calls = runner.train_one_epoch, []
        def train_one_epoch(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise FinetuneError("rank 1 failed on purpose")
            return real(*args, **kwargs)
        runner.train_one_epoch = train_one_epoch
    from finetune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_rank_that_fails_stops_the_others_with_its_message(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"name": "all", "epochs": 4, "train": "all"}]
    tiny_recipe["training"]["ddp_timeout"] = 30  # minutes: what stops rank 0 must not be its timeout
    tiny_recipe["output"] = {"evaluate_test": False}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    (tmp_path / "fail.py").write_text(FAIL_ON_RANK_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(tmp_path / "fail.py"), "train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"],
                              env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("rank 0 kept waiting for the rank that failed")
    assert done.returncode != 0
    assert "finetune train: error: rank 1 failed on purpose" in done.stderr
    assert time.monotonic() - start < 200


@pytest.mark.slow
def test_early_stopping_under_ddp_stops_every_rank_at_the_same_epoch(tiny_recipe, tmp_path):
    """Ranks decide from the same all-reduced validation metrics: both stop, none waits for the other (an lr of
    1e-12 changes no prediction, so no epoch improves on the first)."""
    tiny_recipe["stages"] = [{"name": "all", "epochs": 6, "train": "all", "optimizer": {"lr": 1.0e-12}}]
    tiny_recipe["training"].update({"early_stopping": 1, "ddp_timeout": 30})
    tiny_recipe["output"] = {"evaluate_test": False}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "finetune", "train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"],
                              env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("a rank kept waiting after early stopping")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert 1 <= len(rows) < 6  # lr ~0: no epoch improves on the first, so the stage stops after one more
