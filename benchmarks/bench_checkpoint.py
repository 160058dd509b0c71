"""Checkpoint cost in a cached head stage: the whole model every epoch vs what changed (target <= 25%).

    python benchmarks/bench_checkpoint.py --dataset DIR   # as many rows as make_dataset.py's bird225 train split
    python benchmarks/bench_checkpoint.py          # wide_resnet101_2 + spinal (random init), 225 classes
    python benchmarks/bench_checkpoint.py --tiny   # seconds; the smoke test

A cached head stage trains the head on cached backbone features; each epoch then writes
``checkpoints/last`` (weights, optimizer, RNG state; fsync) and, when validation improved, ``best``. This
measures one such epoch as the runner does it: ``train_one_epoch`` of the head over ``--features`` cached
feature rows (AdamW, batch 64), then ``save_checkpoint`` of ``last`` (with the training state) and of
``best``, in two layouts interleaved in one run:

* ``whole model``: ``model.safetensors`` with every weight, every epoch (the layout before this change).
* ``what changed``: a ``WeightsWriter``: the frozen backbone goes into ``frozen.safetensors`` once, then
  each checkpoint hard-links it and writes the head.

The first epoch of the ``what changed`` layout writes the backbone once; the table shows the epochs after
it (the stage's steady state) and that first one apart.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import _common

TARGET = 0.25


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="wide_resnet101_2")
    p.add_argument("--classes", type=int, default=225)
    p.add_argument("--features", type=int, default=12000, help="cached feature rows per epoch")
    p.add_argument("--dataset", type=Path, help="a folder written by make_dataset.py: rows and classes from its "
                                                "bird225 train split (its dataset.json)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temp folder)")
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    source = "random rows"
    if args.dataset:
        bird = json.loads((args.dataset / "dataset.json").read_text())["variants"]["bird225"]
        args.features, args.classes = bird["images"]["train"], bird["classes"]
        source = "as many as the benchmark folder's bird225 train split"
    if args.tiny:
        args.backbone, args.epochs = "test_resnet", 3
        if not args.dataset:
            args.classes, args.features = 3, 256

    import torch

    from finetune.models.checkpoint import WeightsWriter, save_checkpoint
    from finetune.models import create_model
    from finetune.training.loop import train_one_epoch
    from finetune.training.state import RunState, serialize, state_dict

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = create_model(args.backbone, args.classes, head="spinal", pretrained=False)
    model.backbone.requires_grad_(False).eval()
    features = torch.randn(args.features, model.num_features)
    labels = torch.randint(0, args.classes, (args.features,))
    loader = [(features[i:i + 64], labels[i:i + 64], 0) for i in range(0, args.features, 64)]
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    root = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    meta = {"classes": [f"c{i}" for i in range(args.classes)], "preprocessing": {}}
    layouts = {"whole model": None, "what changed": WeightsWriter()}
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "checkpoint": []} for name in layouts}
    try:
        for epoch in range(args.epochs):
            for name in (layouts if epoch % 2 == 0 else reversed(list(layouts))):  # A B, B A, ...
                t0 = time.perf_counter()
                train_one_epoch(model.head, loader, optimizer, loss_fn, device=torch.device("cpu"), amp_dtype=None,
                                scaler=scaler, accumulation=1, clip_grad=None, scheduler=None, first_update=0,
                                ema=None, channels_last=False, where="bench")
                t1 = time.perf_counter()
                folder = root / ("changed" if layouts[name] else "whole")
                data = serialize(state_dict(RunState(), optimizer, scaler, None))
                save_checkpoint(folder / "best", model, meta, writer=layouts[name])
                save_checkpoint(folder / "last", model, meta, writer=layouts[name],
                                extra=lambda f: (f / "training_state.pt").write_bytes(data))
                t2 = time.perf_counter()
                times[name]["train"].append(t1 - t0)
                times[name]["checkpoint"].append(t2 - t1)
        sizes = {name: sum(f.stat().st_size for f in (root / ("changed" if w else "whole") / "last").iterdir())
                 for name, w in layouts.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows, stats = [], {}
    for name, t in times.items():
        steady = slice(1, None) if len(t["checkpoint"]) > 1 else slice(None)
        ck, tr = _common.median(t["checkpoint"][steady]), _common.median(t["train"][steady])
        stats[name] = {"checkpoint_s": ck, "train_s": tr, "share_of_epoch": ck / (ck + tr),
                       "first_checkpoint_s": t["checkpoint"][0], "last_folder_mb": sizes[name] / 2**20,
                       "checkpoint_s_all": t["checkpoint"], "train_s_all": t["train"]}
        rows.append([name, f"{tr:.2f}", f"{ck:.2f}", f"{ck / (ck + tr):.0%}", f"{t['checkpoint'][0]:.2f}",
                     f"{sizes[name] / 2**20:.0f}"])
    new, old = stats["what changed"], stats["whole model"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    summary = [
        f"Cached head stage of {args.backbone} + spinal ({params:.0f} M parameters, {args.classes} classes), "
        f"{args.features:,} feature rows per epoch ({source}): checkpoints (best + last, fsync) take "
        f"{new['share_of_epoch']:.0%} of the epoch's wall time when writing what changed "
        f"(target <= {TARGET:.0%}), {old['share_of_epoch']:.0%} writing the whole model: "
        f"{old['checkpoint_s'] / new['checkpoint_s']:.1f}x cheaper ({new['checkpoint_s']:.2f} s vs {old['checkpoint_s']:.2f} s).",
        f"The backbone is written once per stage: the first checkpoint costs {new['first_checkpoint_s']:.2f} s.",
    ]
    tables = [_common.table(
        f"Medians over epochs 2-{args.epochs}, layouts interleaved in one run; epoch = head training + checkpoints.",
        ["layout", "train s/epoch", "checkpoint s/epoch", "checkpoint share", "first epoch's checkpoint s",
         "last/ MB (links counted)"], rows)]
    notes = ["Every epoch writes best and last here (validation improving every epoch: the worst case).",
             "`last/` still holds the head's AdamW state (2x the head) and the RNG state every epoch.",
             "The disk is the shared machine's; fsync times vary with other writers, so the share is the claim.",
             "Feature rows are random: a head step's time does not depend on the values, only on how many rows and "
             "how wide (the backbone's features)."]
    _common.write_result(
        args.out, "checkpoint", title="Checkpoints in a cached head stage: whole model vs what changed",
        command=_common.command_line("bench_checkpoint.py", ["DIR" if a == str(args.dataset) else a
                                                              for a in (argv or sys.argv[1:])]), tiny=args.tiny,
        wall_s=time.perf_counter() - started,
        settings={"backbone": args.backbone, "classes": args.classes, "features": args.features, "rows": source,
                  "epochs": args.epochs, "threads": args.threads},
        summary=summary, tables=tables, notes=notes, results={"layouts": stats, "target": TARGET})
    return stats


if __name__ == "__main__":
    main()
