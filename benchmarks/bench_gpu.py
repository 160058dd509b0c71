"""GPU throughput: finetune's training step vs a plain loop (AMP + channels_last), cached-feature extraction, MFU.

    python benchmarks/bench_gpu.py --out OUT       # on a CUDA machine; benchmarks/gpu_check.sh runs it
    python benchmarks/bench_gpu.py --tiny          # seconds, on the CPU too; the smoke test

Three parts, each written to ``<out>/results/gpu.json`` (and ``<out>/RESULTS.md``) as soon as it ends, so a
run cut short still leaves the parts it finished:

1. **Training step** of ``resnet50`` and ``tf_efficientnet_lite0`` (random init, 1000-class linear head, as
   in timm's benchmark) at 224 px, batch ``--batch``, with the recipe defaults on a GPU: ``precision:
   auto`` (bf16 from compute capability 8.0, else fp16 with a GradScaler), ``channels_last``, cuDNN
   autotuning and TF32 (``configure_cuda``). The finetune side is the real ``train_one_epoch`` with timm's
   optimizer factory and a per-update scheduler, as ``bench_step.py`` runs it; the plain side is
   ``zero_grad / autocast forward / loss / (scaled) backward / step`` written by hand, run twice per round
   (the A/A noise floor). Sides share one model and optimizer and take turns on the same batches, held on
   the GPU (no data loading); every side synchronises the GPU before its clock stops.
2. **Model FLOP utilisation**: FLOPs per training image (3x the forward's, counted by
   ``torch.utils.flop_counter``), times images/s, over the card's dense bf16/fp16 tensor peak from the table below.
3. **Cached-feature extraction**: what a head-only stage waits for before its first epoch. finetune's
   ``extract_features`` (the function the feature cache runs) over JPEG photos made by ``make_dataset.py``
   (224-500 px): decoded by ``data.num_workers: auto`` workers (uint8 to the device), decoded in batches on
   the device (nvJPEG, the default on CUDA), and read from the pixel store; vs the backbone's forward alone on
   batches already on the GPU (the GPU's ceiling): their ratio says whether input or the GPU bounds extraction.
4. **Training from the JPEG folder**: each model trained ``--folder-steps`` steps (batch ``--batch``) on the
   same photos through finetune's train loader (RandomResizedCrop + flip, uint8 to the device, normalised
   there), from the files and from the pixel store, against the same steps on synthetic batches already on the
   device; the GPU's utilisation sampled during each (``torch.cuda.utilization``, where NVML is there).
5. **Automatic batch size** (``training.batch_size: auto``): the batch the runner's search finds for the head
   stage (cached features) and the ``all`` stage of ``--auto-model`` at 224 px, and whether three real AdamW steps
   at each run without running out of memory, with their peak memory. (Run before part 4.)

timm's published training figures (``results/benchmark-train-amp-*.csv`` in timm's repository) exist only for
an RTX 3090; they are printed beside ours with the MFU they imply on that card, the only like-for-like
comparison across cards.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import _common

MODELS = ("resnet50", "tf_efficientnet_lite0")

# Dense bf16 (fp16 where the card has no bf16) tensor-core peaks in TFLOPS, by a substring of
# torch.cuda.get_device_name(); first match wins, so specific names come first. Sources: NVIDIA's data
# sheets for H200, H100 (SXM, PCIe, NVL), A100, L40S, L4, T4 and V100 (the "with sparsity" figures halved);
# RTX 3090: NVIDIA's Ampere GA102 whitepaper (FP16 tensor with FP32 accumulate, what AMP uses).
PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("T4", 65.0),
    ("V100-PCIE", 112.0),
    ("V100", 125.0),
    ("RTX 3090", 71.0),
)

# timm's published training throughput (img/s; timm benchmark.py train step, AMP, batch 512, 224 px,
# PyTorch 1.12, CUDA 11.3) on an RTX 3090: the only card timm publishes training figures for.
TIMM_PUBLISHED = {
    "resnet50": {
        "nhwc": (1218.01, "results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv"),
        "nchw": (826.06, "results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv"),
    },
    "tf_efficientnet_lite0": {
        "nhwc": (2134.89, "results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv"),
        "nchw": (1591.79, "results/benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv"),
    },
}
TIMM_CARD = "RTX 3090"


def peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------- 1. training step

def make_sides(model: nn.Module, batches: list, device: torch.device, amp_dtype, *, epochs: int):
    """finetune's ``train_one_epoch`` and a hand-written AMP + channels_last loop, callables returning img/s."""
    from finetune.config import OptimizerConfig, ScheduleConfig
    from finetune._device import autocast
    from finetune.training.loop import make_grad_scaler, train_one_epoch
    from finetune.training.optim import make_optimizer, make_scheduler

    loss_fn = nn.CrossEntropyLoss()
    scaler = make_grad_scaler(device, amp_dtype)
    optimizer = make_optimizer(model, OptimizerConfig(lr=1e-4, weight_decay=0.05))
    scheduler = make_scheduler(optimizer, ScheduleConfig(), epochs, len(batches))
    ours = [(x, y, 0) for x, y in batches]  # finetune's loaders yield (inputs, labels, skipped)
    samples = sum(y.numel() for _, y in batches)
    state = {"updates": 0}

    def finetune_loop() -> float:
        sync(device)
        start = time.perf_counter()
        stats = train_one_epoch(model, ours, optimizer, loss_fn, device=device, amp_dtype=amp_dtype, scaler=scaler,
                                accumulation=1, scheduler=scheduler, first_update=state["updates"],
                                channels_last=True)
        sync(device)
        state["updates"] += stats.updates
        return stats.samples / (time.perf_counter() - start)

    def plain_loop() -> float:
        sync(device)
        start = time.perf_counter()
        for x, y in batches:
            x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp_dtype):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        sync(device)
        return samples / (time.perf_counter() - start)

    return {"finetune": finetune_loop, "plain": plain_loop, "plain (again)": plain_loop}


def train_flops_per_image(model: nn.Module, size: int, device: torch.device, amp_dtype) -> float:
    """FLOPs of one training step per image: 3x the forward's, as torch.utils.flop_counter counts them
    (matmuls and convolutions). The backward is taken as twice the forward, the usual MFU convention:
    counting it too would be wrong here, since the counter's ``convolution_backward`` formula ignores
    groups (tf_efficientnet_lite0's depthwise convolutions came out at 32 GFLOP instead of about 2.3)."""
    from torch.utils.flop_counter import FlopCounterMode

    from finetune._device import autocast

    x = torch.randn(2, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(device, amp_dtype):
        model(x)
    return 3 * counter.get_total_flops() / 2


def measure_training(name: str, args, device: torch.device, amp_dtype, peak: Optional[float]) -> dict[str, Any]:
    from finetune.models import create_model

    torch.manual_seed(0)
    model = create_model(name, 1000, head="linear", pretrained=False).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device),
                torch.randint(0, 1000, (args.batch,), generator=gen).to(device)) for _ in range(args.steps)]
    flops = train_flops_per_image(model, args.size, device, amp_dtype)
    print(f"{name}:", file=sys.stderr)
    sides = make_sides(model, batches, device, amp_dtype, epochs=args.rounds + 1)
    speeds = _common.interleave(sides, rounds=args.rounds, warmup=1, unit=" img/s")
    plain = [(a + b) / 2 for a, b in zip(speeds["plain"], speeds["plain (again)"])]
    ips = {k: _common.median(v) for k, v in speeds.items()}
    result = {
        "model": name,
        "images_per_s": {k: _common.spread(v) for k, v in speeds.items()},
        "ratio": _common.spread(_common.paired_ratios(speeds["finetune"], plain)),
        "noise_floor_ratio": _common.spread(_common.paired_ratios(speeds["plain (again)"], speeds["plain"])),
        "train_gflops_per_image": flops / 1e9,
        "achieved_tflops": ips["finetune"] * flops / 1e12,
        "mfu": ips["finetune"] * flops / (peak * 1e12) if peak else None,
        "raw_images_per_s": speeds,
    }
    timm = TIMM_PUBLISHED.get(name)
    if timm:
        ref, source = timm["nhwc"]
        result["timm_published"] = {
            "card": TIMM_CARD, "images_per_s": ref, "layout": "nhwc", "source": source,
            "nchw_images_per_s": timm["nchw"][0], "nchw_source": timm["nchw"][1],
            "mfu_on_its_card": ref * flops / (peak_tflops(TIMM_CARD) * 1e12),
        }
    del model, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------- 3. extraction

def make_photos(args, work: Path) -> tuple[list, float, dict]:
    """The JPEG folder parts 3 and 4 read (make_dataset.py's Bird-225-shaped train split)."""
    import make_dataset

    start = time.perf_counter()
    doc = make_dataset.generate(work / "photos", seed=0, classes=args.extract_classes, per_class=args.extract_per_class,
                                eval_per_class=0, caltech_classes=2, caltech_per_class=1, specials=0, bad_per_kind=0)
    root = work / "photos" / make_dataset.BIRD / "train"
    items = [(p, i) for i, d in enumerate(sorted(root.iterdir())) for p in sorted(d.iterdir())]
    return items, time.perf_counter() - start, {k: doc[k] for k in ("files", "bytes")}


def measure_extraction(args, device: torch.device, amp_dtype, work: Path, photos) -> dict[str, Any]:
    from finetune._workers import auto_workers
    from finetune.data import ImageDataset, build_store, build_transform, store_plan
    from finetune.models import create_model
    from finetune.features.extract import extract_features

    items, generated_s, dataset_doc = photos
    name = args.extract_model
    torch.manual_seed(0)
    model = create_model(name, 10, head="linear", pretrained=False).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    cfg = model.data_config()
    transform = build_transform(False, input_size=args.size, mean=cfg["mean"], std=cfg["std"], device_normalize=True,
                                interpolation=cfg.get("interpolation", "bicubic"), crop_pct=cfg.get("crop_pct", 0.875))
    workers = auto_workers("auto")
    dataset = ImageDataset(items, transform)
    plan, rest, _ = store_plan(transform, "auto")
    t = time.perf_counter()
    store = build_store(items, plan, cache_dir=work / "store", workers=workers)
    store_s = time.perf_counter() - t
    stored = ImageDataset(items, rest, store=store)

    def extraction(data, device_decode) -> Callable[[], float]:
        def run() -> float:
            sync(device)
            t = time.perf_counter()
            feats, _ = extract_features(model.backbone, data, device=device, amp_dtype=amp_dtype,
                                        batch_size=args.extract_batch, num_workers=workers, channels_last=True,
                                        device_decode=device_decode)
            sync(device)
            return len(feats) / (time.perf_counter() - t)
        return run

    x = torch.randn(args.extract_batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    n_batches = max(1, math.ceil(len(items) / args.extract_batch))

    def forward_only() -> float:
        from finetune._device import autocast

        sync(device)
        t = time.perf_counter()
        with torch.inference_mode(), autocast(device, amp_dtype):
            for _ in range(n_batches):
                model.backbone(x)
        sync(device)
        return n_batches * args.extract_batch / (time.perf_counter() - t)

    print(f"extraction ({name}, {len(items)} photos, {workers} workers):", file=sys.stderr)
    variants = {"from JPEGs, CPU decode": extraction(dataset, False),
                "from JPEGs, device decode": extraction(dataset, True),
                "from the pixel store": extraction(stored, None), "backbone forward alone": forward_only}
    speeds = _common.interleave(variants, rounds=args.extract_rounds, warmup=1, unit=" img/s")
    forward = speeds["backbone forward alone"]
    return {
        "model": name, "images": len(items), "workers": workers, "batch": args.extract_batch,
        "photos_generated_s": generated_s, "photo_sizes": "shorter side 224-400 px, longer <= 500 px",
        "store_build_s": store_s,
        "images_per_s": {k: _common.spread(v) for k, v in speeds.items()},
        "fraction_of_forward": {k: _common.spread(_common.paired_ratios(v, forward)) for k, v in speeds.items()
                                if k != "backbone forward alone"},
        "raw_images_per_s": speeds,
        "dataset": dataset_doc,
    }


def measure_folder_training(name: str, args, device: torch.device, amp_dtype, work: Path, photos) -> dict[str, Any]:
    """Fixed steps of training ``name`` from the JPEG folder (files, store) and on synthetic device batches."""
    from finetune._device import autocast
    from finetune._distributed import DistInfo
    from finetune._workers import auto_workers
    from finetune.data import build_transform
    from finetune.models import create_model
    from finetune.training.loaders import image_loader, split_dataset

    items = photos[0]
    torch.manual_seed(0)
    model = create_model(name, 1000, head="linear", pretrained=False).to(device).to(memory_format=torch.channels_last)
    cfg = model.data_config()
    pipeline = build_transform(True, input_size=args.size, mean=cfg["mean"], std=cfg["std"], device_normalize=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = nn.CrossEntropyLoss()
    workers = min(16, auto_workers("auto"))

    def step(inputs, labels) -> None:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp_dtype):
            loss = loss_fn(model(inputs), labels.to(device, non_blocking=True))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def from_loader(store: str) -> Callable[[], float]:
        dataset = split_dataset(items, pipeline, store=store, budget=None, cache_dir=str(work / "cache"), seed=0,
                                dist=DistInfo())
        loader = image_loader(dataset, train=True, balance=False, seed=0, batch_size=args.batch, num_workers=workers,
                              dist=DistInfo(), device=device)
        epoch = [0]

        def run() -> float:
            seen, t, busy = 0, None, []
            while seen < args.folder_steps * args.batch:
                loader.sampler.set_epoch(epoch[0])
                loader.dataset.set_epoch(epoch[0])
                epoch[0] += 1
                for inputs, labels, _ in loader:
                    if t is None:  # the clock starts at the first batch (workers already running)
                        sync(device)
                        t = time.perf_counter()
                    step(inputs, labels)
                    seen += len(inputs)
                    busy.append(_utilisation(device))
                    if seen >= args.folder_steps * args.batch:
                        break
            sync(device)
            utilisation.setdefault(store, []).extend(u for u in busy if u is not None)
            return seen / (time.perf_counter() - t)
        return run

    synthetic_x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    synthetic_y = torch.randint(0, 1000, (args.batch,), device=device)

    def synthetic() -> float:
        sync(device)
        t = time.perf_counter()
        busy = []
        for _ in range(args.folder_steps):
            step(pipeline.batch_normalize(synthetic_x), synthetic_y)
            busy.append(_utilisation(device))
        sync(device)
        utilisation.setdefault("synthetic", []).extend(u for u in busy if u is not None)
        return args.folder_steps * args.batch / (time.perf_counter() - t)

    utilisation: dict[str, list] = {}
    print(f"training {name} from {len(items)} JPEGs ({workers} workers):", file=sys.stderr)
    variants = {"from JPEG files": from_loader("off"), "from the pixel store": from_loader("auto"),
                "synthetic batches on the device": synthetic}
    speeds = _common.interleave(variants, rounds=args.folder_rounds, warmup=1, unit=" img/s")
    base = speeds["synthetic batches on the device"]
    names = {"off": "from JPEG files", "auto": "from the pixel store", "synthetic": "synthetic batches on the device"}
    return {
        "model": name, "images": len(items), "workers": workers, "batch": args.batch, "steps": args.folder_steps,
        "images_per_s": {k: _common.spread(v) for k, v in speeds.items()},
        "fraction_of_synthetic": {k: _common.spread(_common.paired_ratios(v, base)) for k, v in speeds.items()
                                  if k != "synthetic batches on the device"},
        "gpu_utilisation_percent": {names[k]: (sum(v) / len(v) if v else None) for k, v in utilisation.items()},
        "raw_images_per_s": speeds,
    }


def measure_auto_batch(args, device: torch.device, amp_dtype) -> dict[str, Any]:
    """``training.batch_size: auto`` for the default recipe's two stages of ``--auto-model`` (the default head,
    ``--auto-classes`` classes): the head stage on cached features, then ``all``; each found by the runner's own
    search (``auto_batch.find_batch``, fraction 0.85, at most 1024), then checked by three real AdamW steps at that
    batch with the stage's parameters training. On the CPU (the smoke test) the search runs against a fake memory
    limit of ``--auto-fake-limit`` samples (``find_batch`` measures CUDA memory), and the steps at its result."""
    from finetune.config import TrainingConfig
    from finetune.models import create_model
    from finetune.training import auto_batch

    torch.manual_seed(0)
    model = create_model(args.auto_model, args.auto_classes, pretrained=False).to(device)
    model = model.to(memory_format=torch.channels_last)
    defaults = TrainingConfig()
    fraction, maximum = defaults.auto_batch_fraction, defaults.auto_batch_max
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    stages = {}
    for stage, cached in (("head (cached features)", True), ("all", False)):
        module = model.head if cached else model
        for p in model.parameters():
            p.requires_grad_(False)
        for p in module.parameters():
            p.requires_grad_(True)
        shape = (model.num_features,) if cached else (3, args.size, args.size)
        start = time.perf_counter()
        if device.type == "cuda":
            batch = auto_batch.find_batch(module, shape, channels_last=not cached, fraction=fraction, device=device,
                                          amp_dtype=amp_dtype, maximum=maximum)
        else:
            batch = auto_batch.search_batch_size(lambda b: b <= args.auto_fake_limit, maximum=maximum)
        search_s = time.perf_counter() - start
        stages[stage] = {"batch": batch, "search_s": search_s,
                         **_check_steps(module, shape, batch, device, amp_dtype, channels_last=not cached)}
        if total:
            stages[stage]["peak_fraction"] = stages[stage]["peak_bytes"] / total
        print(f"  auto batch, {stage}: {batch} in {search_s:.1f} s; three steps: "
              f"{'ok' if stages[stage]['steps_ok'] else 'out of memory'}", file=sys.stderr)
    return {"model": args.auto_model, "classes": args.auto_classes, "size": args.size, "fraction": fraction,
            "maximum": maximum, "total_memory_bytes": total, "fake_limit": None if total else args.auto_fake_limit,
            "stages": stages}


def _check_steps(module: nn.Module, shape, batch: int, device: torch.device, amp_dtype, *,
                 channels_last: bool) -> dict[str, Any]:
    """Three AdamW steps of ``module`` on random batches of ``batch``: whether they ran, and the peak memory."""
    from finetune._device import autocast

    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    ok = True
    try:
        for _ in range(3):
            x = torch.randn(batch, *shape, device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp_dtype):
                loss = module(x).float().logsumexp(1).mean()
            loss.backward()
            optimizer.step()
        sync(device)
    except torch.cuda.OutOfMemoryError:
        ok = False
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"steps_ok": ok, "peak_bytes": peak}


def _utilisation(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # no NVML (pynvml) in this environment
        return None


# ----------------------------------------------------------------------------------------------- main

def report(args, argv, device, amp_dtype, peak, results: dict[str, Any], wall_start: float, notes: list[str]) -> None:
    """Write what is measured so far (called after every part)."""
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    summary, rows, timm_rows, extract_rows = [], [], [], []
    for name, r in results.get("train", {}).items():
        ips = r["images_per_s"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        summary.append(
            f"{name}, {args.size} px, batch {args.batch}, {precision} + channels_last on {card}: finetune "
            f"{ips['finetune']['median']:.0f} img/s, finetune/plain = {r['ratio']['median']:.3f}x (A/A "
            f"{r['noise_floor_ratio']['median']:.3f}x); {r['train_gflops_per_image']:.1f} GFLOP per training image, "
            f"{r['achieved_tflops']:.1f} TFLOPS, MFU {mfu}.")
        rows.append([name, ips["plain"]["median"], ips["plain (again)"]["median"], ips["finetune"]["median"],
                     r["ratio"]["median"], f"{r['ratio']['min']:.3f}-{r['ratio']['max']:.3f}",
                     r["noise_floor_ratio"]["median"], r["train_gflops_per_image"], r["achieved_tflops"], mfu])
        t = r.get("timm_published")
        if t:
            ratio = f"{r['mfu'] / t['mfu_on_its_card']:.2f}" if r["mfu"] is not None else "n/a"
            timm_rows.append([name, f"{t['images_per_s']:.0f} ({t['layout']}), {t['nchw_images_per_s']:.0f} (nchw)",
                              f"{t['mfu_on_its_card']:.1%}", f"{ips['finetune']['median']:.0f}", mfu, ratio,
                              t["source"]])
    e = results.get("extraction")
    if e:
        ips, frac = e["images_per_s"], e["fraction_of_forward"]
        summary.append(
            f"Feature extraction ({e['model']}, {e['images']} JPEG photos, {e['workers']} workers): CPU decode "
            f"{frac['from JPEGs, CPU decode']['median']:.2f}x, device decode {frac['from JPEGs, device decode']['median']:.2f}x, "
            f"pixel store {frac['from the pixel store']['median']:.2f}x the backbone's forward alone "
            f"({ips['backbone forward alone']['median']:.0f} img/s on batches already on the device).")
        for variant in ("from JPEGs, CPU decode", "from JPEGs, device decode", "from the pixel store"):
            extract_rows.append([e["model"], e["images"], e["workers"], variant, ips[variant]["median"],
                                 ips["backbone forward alone"]["median"], frac[variant]["median"],
                                 f"{frac[variant]['min']:.2f}-{frac[variant]['max']:.2f}"])
    folder_rows = []
    for name, f in results.get("folder", {}).items():
        ips, frac = f["images_per_s"], f["fraction_of_synthetic"]
        summary.append(
            f"{name} trained from {f['images']} JPEGs ({f['workers']} workers, batch {f['batch']}): files "
            f"{frac['from JPEG files']['median']:.2f}x, pixel store {frac['from the pixel store']['median']:.2f}x the "
            f"synthetic-batch img/s ({ips['synthetic batches on the device']['median']:.0f}).")
        for variant in ("from JPEG files", "from the pixel store", "synthetic batches on the device"):
            util = f["gpu_utilisation_percent"].get(variant)
            folder_rows.append([name, variant, ips[variant]["median"],
                                frac.get(variant, {}).get("median", 1.0), "n/a" if util is None else f"{util:.0f}%"])
    auto_rows = []
    a = results.get("auto_batch")
    if a:
        limit = (f"{a['fraction']:.0%} of {a['total_memory_bytes'] / 2**30:.0f} GiB" if a["total_memory_bytes"]
                 else f"a fake limit of {a['fake_limit']} samples (no GPU)")
        found = ", ".join(f"{stage} {r['batch']}" for stage, r in a["stages"].items())
        ok = all(r["steps_ok"] for r in a["stages"].values())
        summary.append(f"batch_size auto ({a['model']}, {a['size']} px, {precision}, {limit}): {found}; three AdamW "
                       f"steps at each: {'no out-of-memory' if ok else 'OUT OF MEMORY'}.")
        for stage, r in a["stages"].items():
            auto_rows.append([a["model"], stage, r["batch"], r["search_s"], "ok" if r["steps_ok"] else "out of memory",
                              "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB",
                              "n/a" if r.get("peak_fraction") is None else f"{r['peak_fraction']:.0%}"])
    tables = []
    if rows:
        tables.append(_common.table(
            f"Training step on {card} ({precision}, channels_last, batch {args.batch}, {args.size} px): median img/s per "
            "side; finetune/plain = median of per-round ratios to the mean of both plain runs; A/A = plain again / "
            f"plain. MFU against {peak or 'an unknown'} TFLOPS dense peak.",
            ["model", "plain img/s", "plain again img/s", "finetune img/s", "finetune/plain", "range", "A/A",
             "GFLOP/img (3x fwd)", "TFLOPS", "MFU"], rows))
    if timm_rows:
        tables.append(_common.table(
            f"timm's published training throughput ({TIMM_CARD}, AMP, batch 512; no H100/H200/A100 training figures "
            f"are published) and the MFU it implies at {peak_tflops(TIMM_CARD)} TFLOPS; ours / timm's = MFU ratio.",
            ["model", f"timm img/s on {TIMM_CARD}", "timm MFU", "finetune img/s here", "finetune MFU", "ours / timm's",
             "source (timm repository)"], timm_rows))
    if extract_rows:
        tables.append(_common.table(
            "Cached-feature extraction, side by side in one run: finetune's extract_features over JPEG photos vs the "
            "backbone's forward alone (ratio: median of per-round ratios, with their range).",
            ["model", "images", "workers", "input", "img/s", "forward alone img/s", "ratio", "range"], extract_rows))
    if folder_rows:
        tables.append(_common.table(
            f"Training from the JPEG folder, side by side in one run ({args.folder_steps} steps of batch {args.batch} per "
            "round): img/s, the fraction of the synthetic-batch img/s, mean GPU utilisation.",
            ["model", "input", "img/s", "fraction of synthetic", "GPU utilisation"], folder_rows))
    if auto_rows:
        tables.append(_common.table(
            "training.batch_size: auto, the default recipe's two stages: the batch the runner's search finds (at most "
            "1024), its seconds, and three AdamW steps at that batch: whether they ran, their peak memory and its "
            "share of the card's.",
            ["model", "stage", "batch", "search s", "three steps", "peak memory", "of the card"], auto_rows))
    if not tables:
        return
    _common.write_result(
        args.out, "gpu", title="GPU: training step vs a plain loop, FLOP utilisation, feature extraction",
        command=_common.command_line("bench_gpu.py", argv), tiny=args.tiny, wall_s=time.perf_counter() - wall_start,
        settings={k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        summary=summary, tables=tables, notes=notes,
        results={**results, "device": card, "precision": precision, "peak_tflops": peak,
                 "peak_source": "NVIDIA data sheets (dense = sparse / 2); RTX 3090: GA102 whitepaper"},
    )


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256, help="training batch")
    p.add_argument("--steps", type=int, default=8, help="training steps per side per round")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (after one warm-up round)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--extract-model", default="resnet50")
    p.add_argument("--extract-classes", type=int, default=40)
    p.add_argument("--extract-per-class", type=int, default=50, help="photos per class for the extraction part")
    p.add_argument("--extract-batch", type=int, default=256)
    p.add_argument("--extract-rounds", type=int, default=2)
    p.add_argument("--folder-steps", type=int, default=30, help="training steps from the JPEG folder per round")
    p.add_argument("--folder-rounds", type=int, default=2)
    p.add_argument("--auto-model", default="resnet50", help="the model of the automatic batch size part")
    p.add_argument("--auto-classes", type=int, default=225)
    p.add_argument("--auto-fake-limit", type=int, default=24,
                   help="on the CPU only: the samples the automatic batch search is told fit")
    p.add_argument("--budget", type=float, default=300, help="seconds; a part that would start after it is skipped")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.steps, args.rounds = 32, 4, 2, 2
        args.models, args.extract_model, args.auto_model = ["test_resnet"], "test_resnet", "test_resnet"
        args.extract_classes, args.extract_per_class, args.extract_batch, args.extract_rounds = 2, 3, 4, 1
        args.folder_steps, args.folder_rounds = 2, 1
    from finetune._device import configure_cuda
    from finetune._device import resolve_device, resolve_precision

    wall = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:  # set_device refuses a plain "cuda"
        torch.cuda.set_device(device)
    configure_cuda(device)  # what a run does: cuDNN autotuning, TF32
    amp_dtype = resolve_precision("auto", device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_tflops(card) if device.type == "cuda" else None
    notes = [
        "Random-init weights (speed does not depend on them); synthetic batches held on the device, so the "
        "training figures exclude data loading, like timm's benchmark.",
        "FLOPs per training image: 3x the forward's, counted by torch.utils.flop_counter (matmuls and "
        "convolutions; elementwise ops not counted), the usual MFU convention. Peaks: dense tensor-core bf16/fp16 from NVIDIA's data sheets.",
    ]
    if peak is None:
        notes.append(f"No peak FLOPS known for {card}: MFU not computed.")
    results: dict[str, Any] = {"train": {}, "folder": {}}
    for name in args.models:
        if time.perf_counter() - wall > args.budget:
            notes.append(f"{name}: skipped, past the {args.budget:.0f} s budget.")
            continue
        results["train"][name] = measure_training(name, args, device, amp_dtype, peak)
        report(args, argv, device, amp_dtype, peak, results, wall, notes)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        photos = make_photos(args, Path(tmp))
        if time.perf_counter() - wall > args.budget:
            notes.append(f"extraction: skipped, past the {args.budget:.0f} s budget.")
        else:
            results["extraction"] = measure_extraction(args, device, amp_dtype, Path(tmp), photos)
            report(args, argv, device, amp_dtype, peak, results, wall, notes)
        if time.perf_counter() - wall > args.budget:
            notes.append(f"automatic batch size: skipped, past the {args.budget:.0f} s budget.")
        else:
            results["auto_batch"] = measure_auto_batch(args, device, amp_dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report(args, argv, device, amp_dtype, peak, results, wall, notes)
        for name in args.models:
            if time.perf_counter() - wall > args.budget:
                notes.append(f"{name} from the JPEG folder: skipped, past the {args.budget:.0f} s budget.")
                continue
            results["folder"][name] = measure_folder_training(name, args, device, amp_dtype, Path(tmp), photos)
            report(args, argv, device, amp_dtype, peak, results, wall, notes)
    report(args, argv, device, amp_dtype, peak, results, wall, notes)
    return results


if __name__ == "__main__":
    main()
