"""`finetune predict CHECKPOINT PATH...`: top-k classes of images and folders, as CSV or JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune._io import csv_text
from finetune._workers import workers_arg
from finetune.cli import positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify images and folders with a checkpoint",
        description="Classify images (folders are searched recursively) with a checkpoint's model and "
                    "preprocessing. Unreadable files are listed with an error instead of stopping the run.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its best checkpoint)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--topk", type=positive_int, default=1, help="classes per image (default 1)")
    p.add_argument("--out", metavar="FILE", help="write FILE.csv or FILE.json (default: CSV on stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--num-workers", type=workers_arg, default="auto",
                   help="image-decoding worker processes, or auto: the CPU cores, at most 8 (default auto)")
    p.add_argument("--tta", choices=("hflip", "crops", "hflip+crops"),
                   help="test-time augmentation: average the probabilities over the image and its mirror image "
                        "(hflip), its 4 corner crops (crops), or both (10 views)")
    p.add_argument("--threshold", type=float, metavar="P",
                   help="multi-label checkpoints: one probability threshold for every label instead of the ones "
                        "tuned on validation")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune._io import atomic_write_text, check_output
    from finetune.errors import FinetuneError

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise FinetuneError(f"--out must end in .csv or .json, got {out}")
    if out is not None:
        check_output(out)
    sources, missing = collect_images(args.paths)
    if not sources:  # refused before the model is loaded
        empty = [path for path in args.paths if path not in missing]
        raise FinetuneError("; ".join(
            ([f"no image files found in {', '.join(empty)}"] if empty else [])
            + ([f"no such file or folder: {', '.join(missing)}"] if missing else [])
        ))
    from finetune.inference.predictor import load  # imports torch: after the arguments are checked

    predictor = load(args.checkpoint, device=args.device)
    multilabel = predictor.thresholds is not None
    if multilabel and args.tta:
        raise FinetuneError("--tta averages softmax probabilities of single-label checkpoints; this one is multi-label")
    if args.threshold is not None and not multilabel:
        raise FinetuneError("--threshold applies to multi-label checkpoints; this one is single-label (use --topk)")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise FinetuneError(f"--threshold must lie in [0, 1], got {args.threshold}")
    options = {"threshold": args.threshold} if multilabel else {"tta": args.tta}
    predictions = predictor.predict(sources, topk=args.topk, batch_size=args.batch_size, num_workers=args.num_workers,
                                    **options)
    records = [(p.path, p.labels, p.probabilities, p.error) for p in predictions]
    records += [(path, [], [], "no such file or folder") for path in missing]
    failed = [(path, error) for path, _, _, error in records if error]
    if len(failed) == len(records):  # nothing to write: an error, not a file of error rows
        raise FinetuneError(f"none of the {len(records)} file(s) could be read (first: {failed[0][0]}: {failed[0][1]})")
    k = min(args.topk, len(predictor.classes))
    if out is not None and out.suffix.lower() == ".json":
        text = json.dumps([
            {"path": path, "predictions": [{"label": label, "probability": prob} for label, prob in zip(labels, probs)],
             "error": error}
            for path, labels, probs, error in records
        ], indent=2) + "\n"
    elif multilabel:  # every label at or above its threshold, most probable first
        text = csv_text(["path", "labels", "probabilities", "error"],
                        [[path, ";".join(labels), ";".join(f"{p:.6f}" for p in probs), error or ""]
                         for path, labels, probs, error in records])
    else:
        text = _csv(records, k)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
    if failed:
        print(f"{len(failed)} of {len(records)} file(s) could not be read (see the error column)", file=sys.stderr)
    if out is not None:
        print(f"wrote {len(records)} prediction(s) to {out}", file=sys.stderr)
    return 0


def collect_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """Files given directly (whatever their suffix) plus the image files found under folders, in order;
    and the paths that do not exist."""
    from finetune.data import find_images

    files, missing = [], []
    for path in map(Path, paths):
        if path.is_dir():
            files += [str(path / rel) for rel in find_images(path, path)]
        elif path.exists():
            files.append(str(path))
        else:
            missing.append(str(path))
    return files, missing


def _csv(records, k: int) -> str:
    header = ["path", "label", "probability"]
    for rank in range(2, k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    rows = []
    for path, labels, probs, error in records:
        cells = []
        for rank in range(k):
            cells += [labels[rank], f"{probs[rank]:.6f}"] if rank < len(labels) else ["", ""]
        rows.append([path, *cells, error or ""])
    return csv_text([*header, "error"], rows)
