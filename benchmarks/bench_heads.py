"""Spinal vs linear vs MLP heads on the same backbone: parameters, FLOPs and time per training step.

    python benchmarks/bench_heads.py          # tf_efficientnet_lite0, 128 px, batch 32, 10 classes
    python benchmarks/bench_heads.py --tiny   # seconds; the smoke test

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one image's forward pass (eval
mode), for the head alone (on the pooled features) and for backbone + head. Time per training step
(AdamW, ``zero_grad / forward / loss / backward / step``, batch ``--batch``, ``--threads`` torch
threads) is measured for the whole model on images and for the head alone on pooled features (what a
cached head-only stage runs); the heads take turns in interleaved rounds, and each is also given
relative to the linear head.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

import _common

HEADS = {
    "spinal (default: 4x1024, p 0.5)": {"name": "spinal"},
    "spinal (quickstart: 4x256, p 0.2)": {"name": "spinal", "width": 256, "layers": 4, "splits": 2, "dropout": 0.2},
    "linear": {"name": "linear"},
    "mlp (default: 4096-4096)": {"name": "mlp"},
}


def forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return int(counter.get_total_flops())


def step_timer(module: nn.Module, batches: list, optimizer: Optional[torch.optim.Optimizer] = None) -> Any:
    """Milliseconds per training step of ``module``; ``optimizer`` may hold more parameters than the module
    (those without gradients are skipped)."""
    optimizer = optimizer or torch.optim.AdamW(module.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    module.train()

    def run() -> float:
        start = time.perf_counter()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(module(x), y).backward()
            optimizer.step()
        return (time.perf_counter() - start) / len(batches) * 1e3  # ms per step
    return run


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="full-model steps per round and head")
    p.add_argument("--head-steps", type=int, default=100, help="head-alone steps per round and head")
    p.add_argument("--rounds", type=int, default=4)
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    if args.tiny:
        args.backbone, args.size, args.batch, args.steps, args.head_steps, args.rounds = "test_resnet", 32, 4, 1, 2, 1
    wall = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = measure(args)
    finally:
        torch.set_num_threads(threads)
    wall = time.perf_counter() - wall
    report(args, results, argv, wall)
    return results


def measure(args) -> dict:
    from finetune.models import FinetuneModel, create_model

    gen = torch.Generator().manual_seed(0)
    # One backbone instance under every head, and one optimizer over the backbone and all heads (a step
    # updates the backbone and the head that ran): separate copies of a model ran up to 20% apart on this
    # machine from where they sit in memory alone, which would swamp the heads' differences.
    models: dict[str, FinetuneModel] = {}
    backbone = None
    for name, spec in HEADS.items():
        torch.manual_seed(0)
        model = create_model(args.backbone, args.classes, head=spec, pretrained=False)
        backbone = backbone or model.backbone
        models[name] = FinetuneModel(backbone, model.head, args.backbone, model.head_config)
    shared = torch.optim.AdamW([*backbone.parameters(), *(p for m in models.values() for p in m.head.parameters())],
                               lr=1e-3)
    num_features = next(iter(models.values())).num_features
    image = torch.randn(1, 3, args.size, args.size, generator=gen)
    feature = torch.randn(1, num_features, generator=gen)
    images = [(torch.randn(args.batch, 3, args.size, args.size, generator=gen),
               torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(args.steps)]
    features = [(torch.randn(args.batch, num_features, generator=gen),
                 torch.randint(0, args.classes, (args.batch,), generator=gen)) for _ in range(args.head_steps)]

    static = {}
    for name, model in models.items():
        static[name] = {
            "head_params": sum(p.numel() for p in model.head.parameters()),
            "total_params": sum(p.numel() for p in model.parameters()),
            "head_flops": forward_flops(model.head, feature),
            "model_flops": forward_flops(model, image),
        }
    print("full model, ms/step:", file=sys.stderr)
    full_ms = _common.interleave({n: step_timer(m, images, shared) for n, m in models.items()}, rounds=args.rounds)
    print("head alone, ms/step:", file=sys.stderr)
    head_ms = _common.interleave({n: step_timer(m.head, features) for n, m in models.items()}, rounds=args.rounds)
    results = {}
    for name, model in models.items():
        full_rel = _common.median(_common.paired_ratios(full_ms[name], full_ms["linear"]))
        head_rel = _common.median(_common.paired_ratios(head_ms[name], head_ms["linear"]))
        results[name] = {**static[name], "spec": HEADS[name],
                         "full_step_ms": _common.spread(full_ms[name]), "head_step_ms": _common.spread(head_ms[name]),
                         "full_step_vs_linear": full_rel, "head_step_vs_linear": head_rel,
                         "raw_full_step_ms": full_ms[name], "raw_head_step_ms": head_ms[name],
                         "num_features": model.num_features}
    return results


def report(args, results: dict, argv, wall: float) -> None:
    rows = []
    for name, r in results.items():
        rows.append([name, r["head_params"], r["total_params"], r["head_flops"], r["model_flops"],
                     r["head_step_ms"]["median"], f"{r['head_step_vs_linear']:.2f}x", r["full_step_ms"]["median"],
                     f"{r['full_step_vs_linear']:.3f}x"])
    spinal, mlp = "spinal (default: 4x1024, p 0.5)", "mlp (default: 4096-4096)"
    static, num_features = results, results["linear"]["num_features"]
    summary = [
        f"On {args.backbone} ({num_features} features, {args.classes} classes, {args.size} px, batch {args.batch}): "
        f"a full training step costs {results[spinal]['full_step_vs_linear']:.3f}x linear with the default "
        f"spinal head, {results[mlp]['full_step_vs_linear']:.3f}x with the default MLP.",
        f"Head parameters: spinal {static[spinal]['head_params']:,}, linear {static['linear']['head_params']:,}, "
        f"mlp {static[mlp]['head_params']:,}; head FLOPs are "
        f"{100 * static[spinal]['head_flops'] / static[spinal]['model_flops']:.1f}% (spinal) and "
        f"{100 * static[mlp]['head_flops'] / static[mlp]['model_flops']:.1f}% "
        "(mlp) of the model's forward FLOPs.",
    ]
    tables = [_common.table(
        f"Forward FLOPs per image (FlopCounterMode, multiply-add = 2 FLOPs); ms per training step, median of "
        f"{args.rounds} interleaved rounds; 'vs linear' = median of per-round ratios.",
        ["head", "head params", "total params", "head FLOPs", f"model FLOPs ({args.size} px)", "head-alone ms/step",
         "vs linear", "full-model ms/step", "vs linear"], rows)]
    notes = ["Backbone weights are random (speed and FLOPs don't depend on them); heads as registered in "
             "finetune.models.heads with the options shown.",
             "Full-model steps: one backbone instance and one AdamW shared by all heads (each step updates the "
             "backbone and the head that ran), so memory placement of separate copies can't pose as a head "
             "difference; head-alone steps: each head with its own AdamW."]
    _common.write_result(
        args.out, "heads", title="Heads: spinal vs linear vs MLP",
        command=_common.command_line("bench_heads.py", argv), tiny=args.tiny, wall_s=wall,
        settings={k: (str(v) if k == "out" else v) for k, v in vars(args).items()},
        summary=summary, tables=tables, notes=notes, results=results,
    )


if __name__ == "__main__":
    main()
