"""The GPU path, end to end through the public entry points: mixed precision, channels_last, compile, the
CUDA defaults, the feature cache, eval/predict/export and DDP. Marked ``gpu``; skipped without CUDA.

    pytest -m gpu tests/gpu              # or benchmarks/gpu_check.sh OUT (these tests + bench_gpu.py)

Each run trains a tiny random-init timm model (``test_resnet``) on a tiny image folder, so the whole file
takes about a minute on one GPU (``compile`` and the DDP launches are most of it). What happens inside
the training step is observed with a global forward hook on every ``Conv2d`` (its input's and weight's
memory format, its output's dtype): no internals of the runner are touched.
"""
from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HERE = Path(__file__).resolve().parent
SIZE = 64


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture
def gpu_recipe(tiny_recipe, tmp_path, make_tiny_folder):
    """The tiny recipe on CUDA at 64 px, one stage training everything for two epochs, init weights from a
    file (so a test can tell what changed), no test evaluation unless a test turns it on."""
    root = make_tiny_folder(tmp_path / "data", per_class=16, size=SIZE)
    init = tmp_path / "init.safetensors"
    save_init_weights(init)
    tiny_recipe["data"].update(root=str(root), input_size=SIZE,
                               train_transforms=[{"name": "Resize", "height": SIZE, "width": SIZE},
                                                 {"name": "HorizontalFlip"}],
                               eval_transforms=[{"name": "Resize", "height": SIZE, "width": SIZE}])
    tiny_recipe["model"]["pretrained"] = str(init)
    tiny_recipe["stages"] = [{"name": "all", "epochs": 2, "train": "all"}]
    tiny_recipe["training"].update(device="cuda", precision="fp32", batch_size=8)
    tiny_recipe["output"] = {"evaluate_test": False}
    return tiny_recipe


def save_init_weights(path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def train(raw: dict, run_dir: Path) -> dict:
    """``finetune train`` on a raw recipe dict, through the public API."""
    import finetune

    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return finetune.train(path, out=run_dir)


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def backbone_changed(run_dir: Path, init: Path) -> float:
    """The largest absolute change of a backbone weight between the init file and ``checkpoints/last``."""
    from safetensors.torch import load_file

    from finetune.models.checkpoint import read_weights

    before = load_file(str(init))
    after = read_weights(run_dir / "checkpoints" / "last")
    common = [k for k in before if f"backbone.{k}" in after and before[k].is_floating_point()
              and "running_" not in k]
    assert len(common) > 5, sorted(after)[:10]
    return max((after[f"backbone.{k}"].float() - before[k].float()).abs().max().item() for k in common)


def training_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last" / "training_state.pt", map_location="cpu", weights_only=True)


class ConvProbe:
    """Records, for every Conv2d call in training mode: device, output dtype, and whether input and weight
    are channels_last. A global forward hook: it sees the model the runner builds without reaching into it."""

    def __init__(self):
        self.calls: list[dict] = []

    def __enter__(self):
        def hook(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d) and module.training and torch.is_grad_enabled():
                x = inputs[0]
                self.calls.append({
                    "device": x.device.type,
                    "dtype": output.dtype,
                    "input_cl": x.is_contiguous(memory_format=torch.channels_last),
                    "weight_cl": module.weight.is_contiguous(memory_format=torch.channels_last),
                })

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(autouse=True)
def restore_cuda_flags():
    """configure_cuda sets process-wide flags: put them back for the next test."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def expected_auto_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


# ------------------------------------------------------------------------------- precision and speed

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_with_finite_loss(gpu_recipe, tmp_path, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 is emulated before compute capability 8.0")
    gpu_recipe["training"]["precision"] = precision
    with ConvProbe() as probe:
        train(gpu_recipe, tmp_path / "run")
    assert probe.calls and all(c["device"] == "cuda" and c["dtype"] == dtype for c in probe.calls)
    rows = metric_rows(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert backbone_changed(tmp_path / "run", tmp_path / "init.safetensors") > 1e-4
    scaler = training_state(tmp_path / "run")["scaler"]
    if dtype == torch.float16:  # the GradScaler ran: a scale and a growth tracker were kept
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:  # bf16 needs no loss scaling: the scaler is disabled and keeps no state
        assert scaler == {}


def test_mixup_cutmix_and_a_preset_train_on_the_gpu_in_mixed_precision(gpu_recipe, tmp_path):
    """Mixup/CutMix mixes the batch on the GPU (timm's Mixup, soft targets under autocast; an odd batch
    keeps its last sample), after a RandAugment preset in the loader workers' numpy pipeline."""
    gpu_recipe["data"]["augment"] = {"preset": "randaugment", "num_ops": 2, "magnitude": 9}
    gpu_recipe["training"].update(precision="auto", channels_last=True, batch_size=7,
                                  mixup={"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5})
    with ConvProbe() as probe:
        train(gpu_recipe, tmp_path / "run")
    assert probe.calls and {c["dtype"] for c in probe.calls} == {expected_auto_dtype()}
    rows = metric_rows(tmp_path / "run")
    assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert backbone_changed(tmp_path / "run", tmp_path / "init.safetensors") > 1e-4


def test_precision_auto_picks_bf16_from_compute_capability_8(gpu_recipe, tmp_path):
    gpu_recipe["training"]["precision"] = "auto"
    with ConvProbe() as probe:
        train(gpu_recipe, tmp_path / "run")
    assert {c["dtype"] for c in probe.calls} == {expected_auto_dtype()}, torch.cuda.get_device_name()


def test_channels_last_reaches_weights_and_inputs(gpu_recipe, tmp_path):
    gpu_recipe["training"].update(channels_last=True, precision="auto")
    with ConvProbe() as probe:
        train(gpu_recipe, tmp_path / "run")
    assert probe.calls
    assert all(c["weight_cl"] for c in probe.calls), "a conv weight is not channels_last"
    assert all(c["input_cl"] for c in probe.calls), "a conv input is not channels_last"


def test_without_channels_last_inputs_stay_nchw(gpu_recipe, tmp_path):
    """The probe can fail: without the option the first conv's input is plain NCHW."""
    with ConvProbe() as probe:
        train(gpu_recipe, tmp_path / "run")
    assert not probe.calls[0]["input_cl"]


def test_fp32_runs_get_the_cuda_defaults(gpu_recipe, tmp_path):
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    with ConvProbe() as probe:
        train(gpu_recipe, tmp_path / "run")
    assert {c["dtype"] for c in probe.calls} == {torch.float32}
    assert torch.backends.cudnn.benchmark is True
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True


def test_compile_trains_through_a_compiled_module(gpu_recipe, tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def spy(module, *args, **kwargs):
        out = real_compile(module, *args, **kwargs)
        compiled.append(out)
        return out

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    gpu_recipe["training"].update(compile=True, precision="auto", channels_last=True)
    train(gpu_recipe, tmp_path / "run")
    assert compiled, "training.compile did not compile the model"
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0, "dynamo captured no graph"
    rows = metric_rows(tmp_path / "run")
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    assert backbone_changed(tmp_path / "run", tmp_path / "init.safetensors") > 1e-4


# ---------------------------------------------------------------------------------------- the cache

def cached(cache_dir: Path) -> dict[str, np.ndarray]:
    (folder,) = [p for p in cache_dir.rglob("meta.json")]
    return {name: np.load(folder.parent / f"{name}.npy").astype(np.float32) for name in ("train", "val")}


def test_feature_cache_extracted_on_the_gpu_matches_the_cpu(gpu_recipe, tmp_path):
    gpu_recipe["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": True}]
    # no dropout: CUDA and the CPU draw different dropout masks from the same seed, so with it the two
    # losses differ by ~0.2 (seen on an H200); without it they differ only by the features' rounding
    gpu_recipe["model"]["head"]["dropout"] = 0.0
    features = {}
    for device in ("cpu", "cuda"):
        raw = json.loads(json.dumps(gpu_recipe))
        raw["training"].update(device=device, cache_dir=str(tmp_path / f"cache-{device}"))
        train(raw, tmp_path / f"run-{device}")
        features[device] = cached(tmp_path / f"cache-{device}")
    for split in ("train", "val"):
        cpu, gpu = features["cpu"][split], features["cuda"][split]
        assert cpu.shape == gpu.shape and np.abs(cpu).max() > 0
        # TF32 convolutions on the GPU, float16 storage in the cache
        assert np.abs(cpu - gpu).max() <= 0.02 * np.abs(cpu).max() + 2e-3, split
    rows = {d: metric_rows(tmp_path / f"run-{d}") for d in ("cpu", "cuda")}
    assert abs(float(rows["cpu"][0]["train_loss"]) - float(rows["cuda"][0]["train_loss"])) < 0.05


# --------------------------------------------------------------------------- eval, predict, export

def test_eval_predict_and_export_of_a_gpu_run(gpu_recipe, tmp_path, capsys):
    import onnxruntime

    import finetune
    from finetune.cli import main as finetune_main
    from finetune.deploy.export import export_model

    gpu_recipe["training"]["precision"] = "auto"
    gpu_recipe["output"] = {"evaluate_test": True}  # the test split evaluated on the GPU after training
    summary = train(gpu_recipe, tmp_path / "run")
    best = tmp_path / "run" / "checkpoints" / "best"
    assert summary["test"]["num_samples"] > 0

    reports = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"eval-{device}"
        assert finetune_main(["eval", str(best), "--data", gpu_recipe["data"]["root"], "--split", "test",
                              "--device", device, "--num-workers", "0", "--out", str(out)]) == 0
        reports[device] = json.loads((out / "metrics.json").read_text())
    assert reports["cuda"]["num_samples"] == reports["cpu"]["num_samples"] == summary["test"]["num_samples"]
    assert reports["cuda"]["loss"] == pytest.approx(reports["cpu"]["loss"], rel=0.05, abs=0.02)

    images = sorted(Path(gpu_recipe["data"]["root"]).rglob("*.png"))[:6]
    on_gpu = finetune.load(best, device="cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    p_gpu = np.array([p.probabilities[0] for p in on_gpu.predict(images, topk=1)])
    p_cpu = np.array([p.probabilities[0] for p in finetune.load(best, device="cpu").predict(images, topk=1)])
    np.testing.assert_allclose(p_gpu, p_cpu, atol=0.02)

    onnx_path = export_model(best, format="onnx", out=tmp_path / "model.onnx")
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():  # the export divides by the calibration temperature, as predict does
        expected = (on_gpu.model(x.cuda()).float() / on_gpu.temperature).cpu().numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------- DDP

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Two processes on this machine under torchrun, running ddp_worker.py with ``args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / "ddp_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ddp_backend(tmp_path_factory) -> str:
    """NCCL when two ranks can use it here; else gloo on CUDA tensors. With one GPU both ranks share it, and
    NCCL refuses two ranks on one device ("Duplicate GPU detected"): gloo then carries the same DDP code
    over CUDA tensors. The reason is printed (pytest -s, or the gpu_check.sh log)."""
    out = tmp_path_factory.mktemp("nccl-probe")
    run = launch("probe", "nccl", str(out), timeout=180)
    if run.returncode == 0:
        return "nccl"
    tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
    print(f"\nNCCL with 2 ranks on {torch.cuda.device_count()} GPU(s) failed; using gloo on CUDA tensors: "
          + " | ".join(tail), file=sys.stderr)
    return "gloo"


def test_ddp_all_reduce_and_a_ddp_step_on_cuda(ddp_backend, tmp_path):
    run = launch("probe", ddp_backend, str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["backend"] == ddp_backend and report["device"].startswith("cuda")
        assert report["all_reduce"] == 3.0  # 1 + 2
        assert report["grads_averaged"]  # DDP averaged the two ranks' different gradients
    assert reports[0]["params"] == reports[1]["params"]  # the same weights after a step on different data


def test_finetune_trains_under_ddp_on_cuda(ddp_backend, gpu_recipe, tmp_path):
    """A whole run (cached head stage, then all layers) with two ranks; every validation image counted once."""
    gpu_recipe["stages"] = [{"name": "head", "epochs": 1, "train": "head", "feature_cache": True},
                            {"name": "all", "epochs": 1, "train": "all"}]
    gpu_recipe["training"].update(precision="auto", ddp_timeout=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(gpu_recipe))
    run_dir = tmp_path / "ddp"
    run = launch("train", ddp_backend, str(recipe), str(run_dir), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(metric_rows(run_dir)) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "manifest.csv") as f:
        val = sum(row["split"] == "val" for row in csv.DictReader(f))
    assert summary["best_val"]["num_samples"] == val


# --------------------------------------------------------------------------------------- bench_gpu.py

def test_bench_gpu_measures_on_the_default_cuda_device(tmp_path, monkeypatch):
    """bench_gpu.py's smoke setting on ``auto`` (plain ``cuda``): torch.cuda.set_device refuses a device
    without an index, which stopped the first real run on an H200 before it measured anything."""
    monkeypatch.syspath_prepend(str(HERE.parents[1] / "benchmarks"))
    import bench_gpu

    results = bench_gpu.main(["--tiny", "--out", str(tmp_path)])
    train = results["train"]["test_resnet"]
    assert train["images_per_s"]["finetune"]["median"] > 0 and train["images_per_s"]["plain"]["median"] > 0
    doc = json.loads((tmp_path / "results" / "gpu" / "gpu.json").read_text())
    assert doc["machine"]["gpu"] == torch.cuda.get_device_name(0)


def test_auto_batch_search_measures_the_cards_memory():
    """The search's CUDA path against a memory budget set low (128 MB over what the process holds already): the
    batch it finds fits, twice it does not, measured the way it measures (peak allocated in a forward and backward
    pass, plus AdamW's state)."""
    from finetune.models import create_model
    from finetune.training import auto_batch

    device = torch.device("cuda")
    model = create_model("test_resnet", 10, pretrained=False).to(device).to(memory_format=torch.channels_last)
    fraction = 0.5
    total = int((torch.cuda.memory_allocated(device) + 128 * 2**20) / fraction)
    batch = auto_batch.find_batch(model, (3, SIZE, SIZE), channels_last=True, fraction=fraction, device=device,
                                  amp_dtype=torch.bfloat16, maximum=1 << 16, total_memory=total)
    assert 1 <= batch < 1 << 16
    state = 2 * sum(p.numel() * 4 for p in model.parameters())

    def peak(b: int) -> int:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(b, 3, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        torch.cuda.synchronize(device)
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) + state

    assert peak(batch) <= fraction * total < peak(2 * batch)
