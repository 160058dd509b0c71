"""One rank of the GPU DDP tests (tests/gpu/test_cuda.py), started twice by torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/gpu/ddp_worker.py probe BACKEND OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/gpu/ddp_worker.py train BACKEND RECIPE RUN_DIR

Rank r uses ``cuda:r`` when there are two GPUs, else both ranks share ``cuda:0``.

* ``probe``: joins a process group with BACKEND, all-reduces a CUDA tensor and takes one DDP step of a
  small conv net on data that differs per rank; writes OUT/rank{r}.json (what it saw).
* ``train``: ``finetune.training.train(RECIPE)`` as a torchrun rank. On one GPU both ranks must take
  ``cuda:0``, which the runner (rank r → ``cuda:LOCAL_RANK``) does only if each rank is the only process of
  its "machine": so LOCAL_RANK=0 and LOCAL_WORLD_SIZE=1 here, as for two one-GPU machines sharing a
  file system. The process group is joined here with BACKEND first; the runner then uses it as it is.
"""
from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def device_for(rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}" if torch.cuda.device_count() > 1 else "cuda:0")


def join(backend: str, device: torch.device) -> None:
    torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=90), **kwargs)


def probe(backend: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    device = device_for(rank)
    join(backend, device)
    t = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(t)

    torch.manual_seed(0)  # the same initial weights on both ranks
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 2)).to(device)
    model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    x = torch.randn(4, 3, 16, 16, generator=gen).to(device)
    y = torch.randint(0, 2, (4,), generator=gen).to(device)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    # the gradient DDP left must be the mean of both ranks' local gradients
    local = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x), y), net[0].weight)[0]
    both = local.clone()
    dist.all_reduce(both)
    grads_averaged = bool(torch.allclose(net[0].weight.grad, both / 2, rtol=1e-2, atol=1e-5))
    optimizer.step()
    params = [round(v, 5) for v in torch.cat([p.detach().float().flatten() for p in net.parameters()]).cpu().tolist()]
    (out / f"rank{rank}.json").write_text(json.dumps({
        "backend": dist.get_backend(), "device": str(device), "all_reduce": t.item(),
        "grads_averaged": grads_averaged, "params": params,
    }))
    dist.barrier()
    dist.destroy_process_group()


def train(backend: str, recipe: str, run_dir: str) -> None:
    import finetune

    rank = int(os.environ["RANK"])
    if torch.cuda.device_count() < 2:
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = "0", "1"
    join(backend, device_for(rank))
    finetune.train(recipe, out=run_dir)  # the runner destroys the process group when it finishes


if __name__ == "__main__":
    mode, backend, *rest = sys.argv[1:]
    if mode == "probe":
        probe(backend, Path(rest[0]))
    else:
        train(backend, *rest)
