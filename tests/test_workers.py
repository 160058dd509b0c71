"""`usable_cpus`: the CPUs the process may use — its affinity mask capped by the cgroup v2/v1 CPU quota —
which sizes every pool of parallel work (the scan, the resize cache, DataLoader workers)."""
import os

import pytest

from finetune._workers import auto_workers, usable_cpus


@pytest.fixture
def six_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)


def test_affinity_without_cgroup_limit(six_cpus, tmp_path):
    assert usable_cpus(tmp_path) == 6  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == 6


@pytest.mark.parametrize("text, expected", [("250000 100000\n", 3), ("50000 100000\n", 1), ("800000 100000\n", 6)])
def test_cgroup_v2_quota_caps_the_affinity(six_cpus, tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text)  # 2.5 CPUs round up to 3; half a CPU is still 1
    assert usable_cpus(tmp_path) == expected


def test_cgroup_v1_quota(six_cpus, tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 2
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert usable_cpus(tmp_path) == 6


def test_auto_workers_follow_the_quota(six_cpus, tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    monkeypatch.setattr("finetune._workers.CGROUP_ROOT", tmp_path)
    assert auto_workers("auto") == 2
    assert auto_workers("auto", world_size=2) == 1
    assert auto_workers(5) == 5


def test_scan_pool_is_sized_by_usable_cpus(monkeypatch, tiny_folder):
    import finetune.data.scan as images

    sizes = []
    real = images.ThreadPoolExecutor

    def spy(max_workers):
        sizes.append(max_workers)
        return real(max_workers=max_workers)

    monkeypatch.setattr(images, "usable_cpus", lambda: 3)
    monkeypatch.setattr(images, "ThreadPoolExecutor", spy)
    paths = sorted(p.relative_to(tiny_folder).as_posix() for p in tiny_folder.rglob("*.png"))
    images.scan_images(tiny_folder, paths)
    assert sizes == [3]


_FAULTS = """
import resource, sys
import numpy as np
from finetune._workers import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(4):  # a worker's rhythm: a batch of 224 px images allocated, collated, all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batch = [np.ones((224, 224, 3), np.uint8) for _ in range(32)]
    del batch
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[1:]))
"""


def test_keep_freed_memory_stops_each_batch_page_faulting_again():
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)

    applied, kept = run("keep")
    if applied != "True":
        pytest.skip("this C library has no mallopt")
    _, default = run("default")
    # 3 batches x 32 images x 37 pages of 4 KB each, faulted in again under glibc's defaults
    assert default > 1000 and kept < default / 20


def test_image_loaders_start_their_workers_with_worker_init(monkeypatch):
    import torch

    import finetune.data.batch_pool as batch_pool
    import finetune.features.extract as extract
    from finetune._workers import worker_init
    from finetune.training.loaders import make_loader

    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    loader = make_loader(dataset, sampler=range(4), batch_size=2, num_workers=1, device=torch.device("cpu"))
    assert loader.worker_init_fn is worker_init
    seen = []
    real = batch_pool.DataLoader
    monkeypatch.setattr(batch_pool, "DataLoader", lambda *a, **k: seen.append(k.get("worker_init_fn")) or
                        real(*a, **{**k, "num_workers": 0, "prefetch_factor": None}))
    extract.extract_features(torch.nn.Flatten(), dataset, device=torch.device("cpu"), amp_dtype=None, batch_size=2,
                             num_workers=1)
    assert seen == [worker_init]
