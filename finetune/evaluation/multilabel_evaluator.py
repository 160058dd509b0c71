"""``evaluate_multilabel``: a multi-label model over images with multi-hot targets, into metrics, tables, plots
and ``report.html`` — what :func:`~finetune.evaluation.evaluate` writes for single-label data.

Files written into ``out_dir`` (each atomically; ``metrics.json`` last, so its presence means the rest is
complete):

* ``per_class.csv``: ``class, ap, precision, recall, f1, support, tp, fp, fn, tn, threshold``: each label's
  average precision and its 2×2 confusion table at its threshold.
* ``predictions.csv``: ``path, labels, predicted`` and one probability column per label (``p:NAME``), every
  image read: the metrics can be recomputed from it.
* ``confused_pairs.csv``: ``predicted, present, count, of_false_positives``: false positives of a label that
  co-occur with another (:func:`~finetune.evaluation.multilabel.confused_label_pairs`).
* ``errors.csv``: ``kind, path, label, probability, threshold``: the most confident false positives and the
  least confident false negatives.
* ``pr_curves.png``: each label's precision-recall curve with its operating point.
* ``report.html``: summary, per-label table, PR curves, confused pairs, the worst false positives and false
  negatives as thumbnails (with Grad-CAM of the label in question where ``explain``), the run's training log.
* ``metrics.json``: :func:`~finetune.evaluation.multilabel.multilabel_metrics` (``task: multilabel``) with the
  confused pairs, ``calibration`` (per-label temperatures, ECE and loss before and after) for a calibrated
  checkpoint, and the unreadable images left out.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from finetune._io import atomic_write_bytes, check_output, csv_text, ensure_folder
from finetune.errors import FinetuneError
from finetune.evaluation.evaluator import _add_heatmaps, _run_history, evaluation_logits, thumbnail
from finetune.evaluation.multilabel import confused_label_pairs, label_calibration, multilabel_metrics
from finetune.evaluation.plots import pr_curves_png
from finetune.evaluation.report import _details, _figure, _training, data_uri, escape, html_page
from finetune.inference.temperature import sigmoid

logger = logging.getLogger(__name__)

ERRORS_SHOWN = 12
"""How many false positives and how many false negatives the report shows as thumbnails."""
SECTIONS = ("summary", "per-label", "pr-curves", "confused-pairs", "false-positives", "false-negatives",
            "training", "details")


def evaluate_multilabel(
    model: nn.Module,
    items: Sequence[tuple[str | os.PathLike, np.ndarray]],
    *,
    class_names: Sequence[str],
    preprocessing: Mapping[str, Any],
    out_dir: str | os.PathLike,
    thresholds: float | Sequence[float] | None = None,
    temperatures: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | str = 0,
    run_dir: str | os.PathLike | None = None,
    amp_dtype: torch.dtype | None = None,
    details: Mapping[str, Any] | None = None,
    progress: bool = False,
    explain: bool = True,
) -> dict[str, Any]:
    """Evaluate a multi-label ``model`` and write every evaluation file into ``out_dir``.

    Args:
        model: images → one logit per label; set to eval mode here.
        items: ``(image path, multi-hot target)`` pairs, target columns in the order of ``class_names``.
        class_names: the model's labels in index order.
        preprocessing: the checkpoint's preprocessing (the eval transform is built from it).
        out_dir: the folder to write into, checked before the model runs.
        thresholds: per-label thresholds (the checkpoint's tuned ones), or one; default 0.5.
        temperatures: per-label temperatures the logits are divided by (``finetune calibrate``); the metrics
            are those of the calibrated probabilities, and ``calibration`` compares them with the raw ones.
        device, batch_size, num_workers, amp_dtype, progress: as for :func:`~finetune.evaluation.evaluate`.
        run_dir: the training run, whose curves and log go into the report.
        details: what was evaluated, listed in the report.
        explain: Grad-CAM heat-maps on the report's thumbnails.

    Returns:
        The contents of ``metrics.json``.

    Raises:
        FinetuneError: no items, targets of the wrong width, no readable image, a model whose outputs do not
            match ``class_names``, or an ``out_dir`` that cannot be written.
    """
    if not items:
        raise FinetuneError("nothing to evaluate: no images")
    check_output(out_dir, folder=True)
    paths = [str(p) for p, _ in items]
    targets = np.stack([np.asarray(t) for _, t in items]).astype(np.int64)
    if targets.ndim != 2 or targets.shape[1] != len(class_names):
        raise FinetuneError(f"multi-hot targets must have {len(class_names)} columns (the model's labels)")
    device = torch.device(device)
    model = model.to(device).eval()
    indices, logits, unreadable = evaluation_logits(model, paths, preprocessing, outputs=len(class_names),
                                                    device=device, batch_size=batch_size, num_workers=num_workers,
                                                    amp_dtype=amp_dtype, progress=progress, what="labels")
    y_true = targets[indices]
    probs = sigmoid(logits, temperatures)
    names = list(class_names)
    metrics = {"task": "multilabel", **multilabel_metrics(y_true, probs, class_names=names, thresholds=thresholds)}
    cut = np.array([row["threshold"] for row in metrics["per_class"]])
    metrics["confused_pairs"] = confused_label_pairs(y_true, probs, class_names=names, thresholds=cut)
    if temperatures is not None:
        metrics["calibration"] = {"temperatures": [float(t) for t in temperatures],
                                  **label_calibration(y_true, sigmoid(logits), probs)}
    metrics["num_unreadable"] = len(unreadable)
    metrics["unreadable"] = [{"path": p, "reason": r} for p, r in unreadable]

    out = ensure_folder(out_dir)
    kept = [paths[i] for i in indices]
    false_positives, false_negatives = worst_errors(kept, y_true, probs, cut, names)
    _write_tables(out, metrics, kept, y_true, probs, cut, names, false_positives + false_negatives)
    curves_png = pr_curves_png(y_true, probs, names, cut)
    atomic_write_bytes(out / "pr_curves.png", curves_png)

    shown = false_positives[:ERRORS_SHOWN] + false_negatives[:ERRORS_SHOWN]
    # each thumbnail's heat-map is of the label in question: the one wrongly predicted, or the one missed
    note = _add_heatmaps(model, shown, names, preprocessing, device, batch_size) if explain and shown else ""
    for item in shown:
        if not item.get("heatmap"):
            item["thumbnail"] = thumbnail(item["path"])
    training_curves, log = _run_history(run_dir)
    page = html_page(f"Multi-label evaluation: {metrics['num_samples']} images, {len(names)} labels", SECTIONS, [
        _summary(metrics),
        _per_label(metrics["per_class"]),
        '<section id="pr-curves"><h2>Precision-recall curves</h2><p class="muted">Each label\'s curve over its '
        'thresholds; the dot is its operating point (the stored threshold).</p>'
        f'<img class="zoom" alt="precision-recall curves" src="{data_uri(curves_png, "image/png")}"></section>',
        _confused(metrics["confused_pairs"]),
        _gallery("false-positives", "Most confident false positives", false_positives[:ERRORS_SHOWN], note),
        _gallery("false-negatives", "Least confident false negatives", false_negatives[:ERRORS_SHOWN], note),
        _training(training_curves, log),
        _details({**(details or {}), "run folder": str(run_dir) if run_dir else "none"}, unreadable),
    ])
    atomic_write_bytes(out / "report.html", page.encode("utf-8"))
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
    return metrics


def worst_errors(paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray, thresholds: np.ndarray,
                 names: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every false positive (a label predicted, absent), most confident first, and every false negative (a label
    present, not predicted), least confident first; ties by path then label. Each a dict with ``kind``, ``path``,
    ``label`` (also as ``predicted``: the label a heat-map explains), ``probability``, ``threshold``, ``true``
    (the image's labels)."""
    predicted = probs >= thresholds
    out: dict[str, list] = {"false positive": [], "false negative": []}
    for kind, mask in (("false positive", predicted & (y_true == 0)), ("false negative", ~predicted & (y_true == 1))):
        for r, c in zip(*np.nonzero(mask)):
            out[kind].append({"kind": kind, "path": paths[r], "label": names[c], "predicted": names[c],
                              "probability": float(probs[r, c]), "confidence": float(probs[r, c]),
                              "threshold": float(thresholds[c]),
                              "true": "; ".join(names[i] for i in np.flatnonzero(y_true[r])) or "(none)"})
    false_positives = sorted(out["false positive"], key=lambda e: (-e["probability"], e["path"], e["label"]))
    false_negatives = sorted(out["false negative"], key=lambda e: (e["probability"], e["path"], e["label"]))
    return false_positives, false_negatives


def _write_tables(out: Path, metrics: Mapping[str, Any], paths: Sequence[str], y_true: np.ndarray, probs: np.ndarray,
                  thresholds: np.ndarray, names: Sequence[str], errors: Sequence[Mapping[str, Any]]) -> None:
    columns = ["class", "ap", "precision", "recall", "f1", "support", "tp", "fp", "fn", "tn", "threshold"]
    atomic_write_bytes(out / "per_class.csv", csv_text(columns, [
        ["" if r[c] is None else (f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]) for c in columns]
        for r in metrics["per_class"]]).encode("utf-8"))
    predicted = probs >= thresholds
    atomic_write_bytes(out / "predictions.csv", csv_text(["path", "labels", "predicted", *(f"p:{n}" for n in names)], [
        [path, ";".join(names[c] for c in np.flatnonzero(y_true[r])), ";".join(names[c] for c in np.flatnonzero(predicted[r])),
         *(repr(float(v)) for v in probs[r])] for r, path in enumerate(paths)]).encode("utf-8"))
    pairs = metrics["confused_pairs"]
    atomic_write_bytes(out / "confused_pairs.csv", csv_text(["predicted", "present", "count", "of_false_positives"], [
        [p["predicted"], p["present"], p["count"], f"{p['of_false_positives']:.6f}"] for p in pairs]).encode("utf-8"))
    atomic_write_bytes(out / "errors.csv", csv_text(["kind", "path", "label", "probability", "threshold"], [
        [e["kind"], e["path"], e["label"], f"{e['probability']:.6f}", f"{e['threshold']:.6f}"] for e in errors
    ]).encode("utf-8"))


_HEADLINE = (("map_macro", "mAP (macro)"), ("map_micro", "mAP (micro)"), ("f1_micro", "F1 (micro)"),
             ("f1_macro", "F1 (macro)"), ("subset_accuracy", "Subset accuracy"), ("hamming_loss", "Hamming loss"),
             ("lrap", "Label-ranking AP"), ("num_samples", "Images"))


def _summary(metrics: Mapping[str, Any]) -> str:
    cards = "".join(f'<div class="card"><b>{metrics[key]:,}</b><span>{label}</span></div>' if key == "num_samples" else
                    f'<div class="card"><b>{metrics[key]:.4f}</b><span>{label}</span></div>' for key, label in _HEADLINE)
    parts = [f'<section id="summary"><h2>Summary</h2><div class="cards">{cards}</div>',
             f'<p class="muted">A label is predicted at or above its threshold (per label, tuned on validation '
             f'unless overridden). mAP (macro) averages the {metrics["ap_labels"]} label(s) with a positive here.</p>']
    if metrics["num_unreadable"]:
        parts.append(f'<p class="bad">{metrics["num_unreadable"]} unreadable image(s) were left out; see '
                     '<a href="#details">details</a>.</p>')
    calibration = metrics.get("calibration")
    if calibration:
        parts.append(
            "<h3>Calibration (per-label temperatures)</h3><table><thead><tr><th>metric</th><th>before (T = 1)</th>"
            f"<th>after</th></tr></thead><tbody><tr><td>Calibration error (ECE, mean over labels)</td>"
            f"<td class=n>{calibration['ece_before']:.4f}</td><td class=n>{calibration['ece_after']:.4f}</td></tr>"
            f"<tr><td>Loss (binary cross-entropy)</td><td class=n>{calibration['loss_before']:.4f}</td>"
            f"<td class=n>{calibration['loss_after']:.4f}</td></tr></tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def _per_label(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = (("ap", "AP"), ("f1", "F1"), ("precision", "precision"), ("recall", "recall"), ("threshold", "threshold"))
    counts = (("support", "support"), ("tp", "TP"), ("fp", "FP"), ("fn", "FN"), ("tn", "TN"))
    body = []
    for r in sorted(rows, key=lambda r: (-1 if r["ap"] is None else r["ap"], r["class"])):
        cells = "".join('<td class="n" data-v="-1">-</td>' if r[k] is None else
                        f'<td class="n" data-v="{r[k]:.6f}">{r[k]:.3f}</td>' for k, _ in columns)
        cells += "".join(f'<td class="n" data-v="{r[k]}">{r[k]}</td>' for k, _ in counts)
        body.append(f'<tr><td data-v="{escape(r["class"])}">{escape(r["class"])}</td>{cells}</tr>')
    head = '<th data-type="text">label</th>' + "".join(f'<th data-type="num">{label}</th>' for _, label in (*columns, *counts))
    return ('<section id="per-label"><h2>Per label</h2><p class="muted">Worst AP first; TP/FP/FN/TN: the label\'s '
            '2×2 confusion table at its threshold. Click a heading to sort.</p>'
            '<input type="search" placeholder="filter labels" data-filter="per-label-table">'
            f'<div class="scroll"><table id="per-label-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></section>')


def _confused(pairs: Sequence[Mapping[str, Any]]) -> str:
    if not pairs:
        return '<section id="confused-pairs"><h2>Most confused label pairs</h2><p>No false positive.</p></section>'
    body = "".join(f'<tr><td>{escape(p["predicted"])}</td><td>{escape(p["present"])}</td><td class="n">{p["count"]}</td>'
                   f'<td class="n">{100 * p["of_false_positives"]:.1f}%</td></tr>' for p in pairs)
    return ('<section id="confused-pairs"><h2>Most confused label pairs</h2><p class="muted">False positives of a '
            'label on images that show another: what the model takes the present label for.</p><div class="scroll">'
            '<table><thead><tr><th>predicted (absent)</th><th>present</th><th>images</th><th>of its false positives'
            f'</th></tr></thead><tbody>{body}</tbody></table></div></section>')


def _gallery(section: str, title: str, items: Sequence[Mapping[str, Any]], note: str) -> str:
    if not items:
        return f'<section id="{section}"><h2>{title}</h2><p>None.</p></section>'
    figures = "".join(_figure({**item, "predicted": f"{item['label']} (threshold {item['threshold']:.2f})"}, "bad")
                      for item in items)
    return (f'<section id="{section}"><h2>{title}</h2><p class="muted">All are in errors.csv; a caption gives the '
            f'image\'s labels and the label in question with its probability. {escape(note)}</p>'
            f'<div class="grid">{figures}</div></section>')
