"""`finetune data`: inspect or audit a dataset, write a split manifest, write the embedded sample dataset."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

INSPECT_EPILOG = """\
--json prints one object with the keys: root, layout ("pre-split", "folder" or "manifest"),
split_folders, classes, counts (split -> class -> usable images; "all" for an unsplit folder),
num_images, image_size (width/height min, median, max), modes, bad_files ([{path, reason}]) and
duplicates ([{paths, splits, leak}]).
"""

AUDIT_EPILOG = """\
Near-duplicates: each image's 10 nearest images by embedding cosine (>= --duplicate-cosine) and its
10 nearest by whole 24x24 greyscale thumbnail correlation (>= 0.7) are candidates, confirmed when their
thumbnails correlate >= 0.999 (allowing crops of up to 10 % per side). Label issues: 5-fold out-of-fold probabilities of a linear classifier on the
features, confident learning (Northcutt et al. 2021), ranked by -log p(given label). Outliers: cosine
distance to the nearest class centroid, flagged above median + 6 MAD.

--json prints one object: summary (images, classes, splits, near_duplicate_groups,
near_duplicate_images, leaking_groups, leaked_images, label_issues, outliers_flagged), settings,
features_cached, seconds, near_duplicates ([{group, paths, splits, classes, leak, similarity}]),
label_issues ([{path, split, given, suggested, score, p_given, p_suggested}]), outliers ([{path,
split, class, distance, nearest_class, flagged}]) and files (name -> path).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="inspect, audit, split or create datasets",
        description="Inspect or audit a dataset, write a split manifest, or write the embedded sample dataset.",
    )
    parser.set_defaults(func=lambda args: _print_help(parser))
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="report layout, classes, counts, image sizes, bad files and duplicates",
        epilog=INSPECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("root", type=Path, help="dataset folder, manifest CSV or multi-label labels CSV")
    inspect.add_argument("--labels", type=Path, metavar="CSV",
                         help="multi-label: a labels CSV (path,labels[,split]) for the images of ROOT")
    inspect.add_argument("--separator", default=";", help="what separates a multi-label row's labels (default ;)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_max_pixels(inspect)
    inspect.set_defaults(func=_inspect)

    split = commands.add_parser(
        "split",
        help="write a split manifest (CSV path,class,split) for a dataset folder",
        description="Scan a dataset folder, split its usable images into train/val/test (seeded, stratified) "
        "or freeze a pre-split one, and write the manifest of usable images. Without --val/--test/"
        "--train-per-class, the card's protocol applies, else 0.15/0.15. Paths in the manifest are relative to "
        "the root: written into the root, the manifest alone is enough to train (--data MANIFEST).",
    )
    split.add_argument("root", type=Path, help="dataset folder (or a multi-label labels CSV)")
    split.add_argument("--labels", type=Path, metavar="CSV",
                       help="multi-label: a labels CSV (path,labels) for the images of ROOT, split by iterative "
                       "stratification into a CSV of path,labels,split")
    split.add_argument("--separator", default=";", help="what separates a multi-label row's labels (default ;)")
    split.add_argument("--out", type=Path, required=True, metavar="MANIFEST", help="manifest CSV to write")
    split.add_argument("--val", type=float, help="val fraction (of each class, or of the rest after --train-per-class)")
    split.add_argument("--test", type=float, help="test fraction of each class")
    split.add_argument("--train-per-class", type=int, metavar="N", help="N training images per class, the rest test")
    split.add_argument(
        "--exclude", nargs="+", action="extend", default=[], metavar="NAME",
        help="classes to leave out (in addition to the card's)"
    )
    split.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    split.add_argument("--card", help="dataset card (name in datasets/ or YAML path) giving the protocol")
    split.add_argument("--no-scan", action="store_true", help="do not decode every image to find bad files")
    split.add_argument("--report", type=Path, help="bad-file report CSV (default: MANIFEST with .bad.csv)")
    _add_max_pixels(split)
    split.set_defaults(func=_split)

    audit = commands.add_parser(
        "audit",
        help="find near-duplicates and leakage, likely label errors and outliers (writes CSVs and audit.html)",
        description="Embed every usable image with a pretrained backbone (cached like training's features) and "
        "write near_duplicates.csv (groups; leak=1 where a group spans splits), label_issues.csv (out-of-fold "
        "confident learning: given and suggested label, score), outliers.csv (farthest from every class) and "
        "a self-contained audit.html into --out; print a one-paragraph summary. A one-folder dataset is split "
        "as training would split it (--card/--val/--test/--seed). A labels CSV (multi-label data) gets the same "
        "near-duplicate and leakage checks, and label checks per label (each label present/absent, confident "
        "learning as cleanlab's multi-label find_label_issues: a label likely missing or extra); outliers, being "
        "distances to single-label class centroids, are not computed for it.",
        epilog=AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("root", type=Path, metavar="ROOT|MANIFEST", help="dataset folder or manifest CSV")
    audit.add_argument("--root", type=Path, metavar="DIR", dest="data_root",
                       help="folder the manifest's paths are relative to (default: the manifest's folder)")
    audit.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: ./audit-NAME, NAME the root's)")
    audit.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    audit.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone (default tf_efficientnet_lite0)")
    audit.add_argument("--pretrained", default="offline", metavar="offline|true|none|PATH",
                       help="backbone weights: offline package weights (default), true (timm hub), none (random "
                       "init: tests only), or a weights file")
    audit.add_argument("--input-size", type=int, metavar="PX", help="square input side (default: the backbone's)")
    audit.add_argument("--card", help="dataset card giving the split protocol")
    audit.add_argument("--val", type=float, help="val fraction for a one-folder dataset (as in training)")
    audit.add_argument("--test", type=float, help="test fraction for a one-folder dataset (as in training)")
    audit.add_argument("--seed", type=int, default=0, help="split and fold seed (default 0)")
    audit.add_argument("--duplicate-cosine", type=float, default=0.85,
                       help="least embedding cosine of a near-duplicate candidate (default 0.85)")
    audit.add_argument("--folds", type=int, default=5, help="folds of the out-of-fold classifier (default 5)")
    audit.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    audit.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    audit.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (default 0)")
    audit.add_argument("--cache-dir", type=Path, help="feature cache (default $FINETUNE_CACHE or ~/.cache/finetune)")
    audit.set_defaults(func=_audit)

    sample = commands.add_parser("sample", help="write an embedded sample dataset as a PNG class-folder dataset")
    sample.add_argument("name", choices=["digits"], help="digits: scikit-learn's 1,797 handwritten 8×8 digits")
    sample.add_argument("out", type=Path, help="folder to create")
    sample.add_argument("--size", type=int, default=32, help="side of the upscaled square images (default 32)")
    sample.set_defaults(func=_sample)


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=int,
        help="reject images with more pixels as decompression bombs "
        "(default: finetune.data.DEFAULT_MAX_PIXELS, Pillow's own limit of 89,478,485)",
    )


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _labels_table(args: argparse.Namespace):
    """The multi-label table the command names (``--labels CSV``, or ROOT itself a labels CSV), or None."""
    from finetune.data.multilabel import is_labels_csv, read_labels_csv

    if args.labels is not None:
        return read_labels_csv(args.labels, root=args.root, separator=args.separator)
    if is_labels_csv(args.root):
        return read_labels_csv(args.root, separator=args.separator)
    return None


def _format_labels(report: dict) -> str:
    lines = [f"root: {report['root']}", f"task: multilabel; {report['num_images']} images, "
             f"{len(report['classes'])} labels, {report['cardinality']:.2f} labels per image (at most "
             f"{report['max_labels']}), {report['without_label']} without a label"]
    splits = list(report["label_counts"])
    width = max(len(c) for c in ["label", *report["classes"]])
    lines += ["", f"{'label':<{width}}  " + "  ".join(f"{s:>6}" for s in splits)]
    lines += [f"{c:<{width}}  " + "  ".join(f"{report['label_counts'][s][c]:>6}" for s in splits)
              for c in report["classes"]]
    lines += ["", "most frequent label pairs:"]
    lines += [f"  {' + '.join(p['labels'])}: {p['images']}" for p in report["top_pairs"]] or ["  none"]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from finetune.data import DEFAULT_MAX_PIXELS, inspect_dataset

    _log_to_stderr()  # progress and warnings; stdout stays pure JSON with --json
    table = _labels_table(args)
    if table is not None:
        from finetune.data.multilabel import label_statistics

        report = label_statistics(table)
        print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else _format_labels(report))
        return 0
    report = inspect_dataset(args.root, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else _format_inspect(report))
    return 0


def _format_inspect(report: dict) -> str:
    folders = ", ".join(f"{d}/" for d in report["split_folders"].values())
    lines = [f"root: {report['root']}", f"layout: {report['layout']}" + (f" ({folders})" if folders else "")]
    splits = list(report["counts"])
    totals = ", ".join(f"{s} {sum(report['counts'][s].values())}" for s in splits)
    lines.append(f"classes: {len(report['classes'])}; usable images: {report['num_images']} ({totals})")
    size = report["image_size"]
    if size:
        for axis in ("width", "height"):
            s = size[axis]
            lines.append(f"{axis}: min {s['min']}, median {s['median']:g}, max {s['max']}")
    lines.append("modes: " + ", ".join(f"{mode} {n}" for mode, n in report["modes"].items()))
    width = max(len(c) for c in ["class", *report["classes"]])
    lines.append("")
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for c in report["classes"]:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{report['counts'][s][c]:>6}" for s in splits))
    lines.append("")
    lines.append(f"bad files: {len(report['bad_files'])}")
    lines.extend(f"  {b['path']}: {b['reason']}" for b in report["bad_files"])
    leaks = sum(d["leak"] for d in report["duplicates"])
    lines.append(f"duplicates: {len(report['duplicates'])} group(s) of byte-identical files, {leaks} across splits")
    lines.extend(f"  {'LEAK ' if d['leak'] else ''}{' = '.join(d['paths'])}" for d in report["duplicates"])
    return "\n".join(lines)


def _split(args: argparse.Namespace) -> int:
    from finetune._io import check_output
    from finetune.data import DEFAULT_MAX_PIXELS, prepare_manifest
    from finetune.errors import FinetuneError

    _log_to_stderr()
    table = _labels_table(args)
    if table is not None:
        from finetune.data.multilabel import split_labels

        check_output(args.out)
        if args.train_per_class is not None or args.card:
            raise FinetuneError("--train-per-class and --card apply to class folders, not to multi-label data")
        table = split_labels(table, val=0.15 if args.val is None else args.val,
                             test=0.15 if args.test is None else args.test, seed=args.seed)
        table.write_csv(args.out, separator=args.separator)
        counts = ", ".join(f"{s} {table.splits_list.count(s)}" for s in ("train", "val", "test") if s in table.splits_list)
        print(f"wrote {args.out}: {len(table.classes)} labels, multi-label (iterative stratification); {counts}")
        return 0
    report = None if args.no_scan else args.report or args.out.with_name(args.out.stem + ".bad.csv")
    for path in (args.out, report):  # before the scan, which may take long
        if path is not None:
            check_output(path)
    manifest, bad = prepare_manifest(
        args.root,
        card=args.card,
        val=args.val,
        test=args.test,
        train_per_class=args.train_per_class,
        exclude=args.exclude,
        seed=args.seed,
        scan=not args.no_scan,
        report_path=report,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
    )
    manifest.write_csv(args.out)
    counts = ", ".join(f"{s} {sum(c.values())}" for s, c in manifest.counts().items())
    print(f"wrote {args.out}: {len(manifest.classes)} classes; {counts}")
    if args.out.resolve().parent != manifest.root.resolve():
        print(f"paths in it are relative to {manifest.root}: give that root along with the manifest "
              "(data.root, --set data.root=ROOT), or write the manifest into it")
    if report is not None:
        print(f"bad files: {len(bad)}, listed in {report}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from finetune.audit import audit_dataset, check_audit_folder, summary_text, to_json, write_audit

    _log_to_stderr()  # progress and warnings; stdout stays the summary or pure JSON
    out = args.out or Path(f"audit-{args.root.resolve().stem}")
    data_root = args.data_root or (args.root.parent if args.root.is_file() else args.root)
    check_audit_folder(out, data_root)  # before the audit, which may take long
    pretrained = {"none": False, "false": False, "true": True}.get(args.pretrained.lower(), args.pretrained)
    audit = audit_dataset(
        args.root, root=args.data_root, backbone=args.backbone, pretrained=pretrained, input_size=args.input_size, card=args.card,
        val=args.val, test=args.test, seed=args.seed, device=args.device, batch_size=args.batch_size,
        num_workers=args.num_workers, cache_dir=args.cache_dir, duplicate_cosine=args.duplicate_cosine,
        folds=args.folds,
    )
    files = write_audit(audit, out)
    print(json.dumps(to_json(audit, files), indent=2, ensure_ascii=False) if args.json else summary_text(audit, out))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from finetune.data import write_digits

    out = write_digits(args.out, size=args.size)
    print(f"digits sample ({args.size}×{args.size} PNGs, one folder per digit) in {out}")
    return 0
