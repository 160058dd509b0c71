"""`finetune predict CHECKPOINT PATH...`: top-k classes of images and folders, as CSV or JSON."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from finetune._workers import workers_arg


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify images and folders with a checkpoint",
        description="Classify images (folders are searched recursively) with a checkpoint's model and "
                    "preprocessing. Unreadable files are listed with an error instead of stopping the run.",
    )
    p.add_argument("checkpoint", help="checkpoint folder (or a run folder: its best checkpoint)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--topk", type=int, default=1, help="classes per image (default 1)")
    p.add_argument("--out", metavar="FILE", help="write FILE.csv or FILE.json (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--num-workers", type=workers_arg, default="auto",
                   help="image-decoding worker processes, or auto: the CPU cores, at most 8 (default auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from finetune._io import atomic_write_text, check_output
    from finetune.errors import FinetuneError
    from finetune.inference import load

    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise FinetuneError(f"--out must end in .csv or .json, got {out}")
    if out is not None:
        check_output(out)
    sources, missing = collect_images(args.paths)
    if not sources and not missing:
        raise FinetuneError(f"no image files found in {', '.join(args.paths)}")
    predictor = load(args.checkpoint, device=args.device)
    predictions = predictor.predict(sources, topk=args.topk, batch_size=args.batch_size, num_workers=args.num_workers)
    records = [(p.path, p.labels, p.probabilities, p.error) for p in predictions]
    records += [(path, [], [], "no such file or folder") for path in missing]
    k = min(args.topk, len(predictor.classes))
    if out is not None and out.suffix.lower() == ".json":
        text = json.dumps([
            {"path": path, "predictions": [{"label": label, "probability": prob} for label, prob in zip(labels, probs)],
             "error": error}
            for path, labels, probs, error in records
        ], indent=2) + "\n"
    else:
        text = _csv(records, k)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text)
    failed = sum(1 for *_, error in records if error)
    if failed:
        print(f"{failed} of {len(records)} file(s) could not be read (see the error column)", file=sys.stderr)
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
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([*header, "error"])
    for path, labels, probs, error in records:
        cells = []
        for rank in range(k):
            cells += [labels[rank], f"{probs[rank]:.6f}"] if rank < len(labels) else ["", ""]
        writer.writerow([path, *cells, error or ""])
    return text.getvalue()
