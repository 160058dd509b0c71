"""`finetune explain CHECKPOINT IMAGE... --out DIR`: Grad-CAM heat-maps of images, as PNGs, JSON and a page."""
from __future__ import annotations

from finetune.cli import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="Grad-CAM heat-maps: where in each image the checkpoint found its evidence",
        description="Write, for each image (folders are searched recursively), what the model saw with a "
                    "Grad-CAM heat-map of the predicted class (or --class) as NNNN-NAME.png, plus "
                    "explanations.json (predicted class and probability per image) and a self-contained "
                    "index.html.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its best checkpoint)")
    p.add_argument("paths", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--class", "--label", dest="target", metavar="NAME",
                   help="explain this class (a multi-label checkpoint: this label) in every image (default: each "
                        "image's predicted class, or its most probable label)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per pass (default 16)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune._io import check_output
    from finetune.cli.predict import collect_images
    from finetune.errors import FinetuneError

    check_output(args.out, folder=True)
    sources, missing = collect_images(args.paths)
    if missing:
        raise FinetuneError(f"no such file or folder: {', '.join(missing)}")
    if not sources:
        raise FinetuneError(f"no image files found in {', '.join(args.paths)}")
    from finetune.models.checkpoint import load_checkpoint  # imports torch: after the arguments are checked
    from finetune.evaluation.explain import write_explanations
    from finetune.inference.temperature import meta_temperature, meta_temperatures
    from finetune._device import resolve_device

    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, map_location=device)
    multilabel = meta.get("task") == "multilabel"
    thresholds = (meta.get("thresholds") or [0.5] * len(meta["classes"])) if multilabel else None
    temperature = meta_temperature(meta) if not multilabel else meta_temperatures(meta)
    records = write_explanations(model, sources, args.out, classes=meta["classes"], preprocessing=meta["preprocessing"],
                                 target=args.target, device=device, batch_size=args.batch_size, thresholds=thresholds,
                                 temperature=1.0 if temperature is None else temperature)
    failed = sum(r["error"] is not None for r in records)
    for r in records:
        if r["error"] is None:
            shown = f" [labels: {', '.join(r['labels']) or 'none'}]" if "labels" in r else ""
            print(f"{r['path']}: {r['predicted']} ({r['probability']:.3f}){shown} -> {r['overlay']}")
    if failed:
        print(f"{failed} of {len(records)} file(s) could not be read (see explanations.json)")
    print(f"wrote {args.out}/ (open {args.out}/index.html)")
    return 0
