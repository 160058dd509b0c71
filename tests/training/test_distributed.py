"""torchrun helpers: the device each rank takes and the process group's timeout."""
from datetime import timedelta

import pytest
import torch

from finetune.config import parse_recipe
from finetune.errors import FinetuneError
from finetune import _distributed as ddp
from finetune.training.runner import run_training

RANK1_OF_2 = ddp.DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2)


@pytest.fixture
def cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_each_rank_takes_the_gpu_of_its_local_rank(cuda_available, device):
    assert ddp.rank_device(device, RANK1_OF_2) == torch.device("cuda:1")


def test_cuda_n_under_torchrun_is_refused_rather_than_putting_every_rank_on_one_gpu(cuda_available):
    with pytest.raises(FinetuneError, match="CUDA_VISIBLE_DEVICES"):
        ddp.rank_device("cuda:0", RANK1_OF_2)
    assert ddp.rank_device("cuda:1", ddp.DistInfo()) == torch.device("cuda:1")  # one process: as asked


def test_the_runner_refuses_cuda_n_under_torchrun_before_writing_anything(tiny_recipe, tmp_path, monkeypatch,
                                                                           cuda_available):
    tiny_recipe["training"]["device"] = "cuda:0"
    monkeypatch.setattr(ddp, "init_distributed", lambda *a, **k: RANK1_OF_2)
    with pytest.raises(FinetuneError, match="training.device is cuda:0"):
        run_training(parse_recipe(tiny_recipe), tiny_recipe, run_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


class Joined(Exception):
    pass


def test_training_ddp_timeout_reaches_init_process_group(tiny_recipe, tmp_path, monkeypatch):
    calls = []

    def init_process_group(**kwargs):
        calls.append(kwargs)
        raise Joined

    monkeypatch.setattr(ddp.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    tiny_recipe["training"]["ddp_timeout"] = 90
    with pytest.raises(Joined):
        run_training(parse_recipe(tiny_recipe), tiny_recipe, run_dir=tmp_path / "run", quiet=True)
    assert calls == [{"backend": "gloo", "timeout": timedelta(minutes=90)}]
