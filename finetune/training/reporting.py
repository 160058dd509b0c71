"""What a run shows and logs: progress bars, metrics CSVs, the training-curves PNG, the final summary."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from finetune._io import atomic_write_bytes, atomic_write_text
from finetune.evaluation import evaluate
from finetune.evaluation.calibrate import calibrate_checkpoint, set_label_temperatures
from finetune.evaluation.multilabel import tune_thresholds
from finetune.evaluation.multilabel_evaluator import evaluate_multilabel
from finetune.evaluation.plots import figure_png
from finetune.inference.temperature import meta_temperature, meta_temperatures, sigmoid
from finetune.inference.predictor import eval_transform, predict_probabilities
from finetune.models.checkpoint import META_FILE, load_checkpoint, read_meta, write_json_atomic

METRIC_COLUMNS = [
    "stage", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
    "val_balanced_acc", "images_per_s", "seconds", "val_map",
]


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is when a record is written, not the one it was made with
    (a program or a notebook that redirects stderr after its first run still gets the lines)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def setup_logging(is_main: bool) -> None:
    """The ``finetune`` logger prints bare lines on stderr: progress from rank 0, warnings from every rank."""
    log = logging.getLogger("finetune")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)


def epoch_row(*, stage: int, epoch: int, lr: float, totals: list[float], seconds: float,
              val: dict[str, Any], updates: int = 0) -> dict[str, Any]:
    """An epoch's ``metrics.csv`` row from the summed train ``totals`` of every rank (loss × samples,
    accuracy × samples, samples, skipped) and the validation metrics; ``updates`` (the epoch's optimizer
    updates, not a metrics.csv column) gives the loggers their step count on resume."""
    samples = max(totals[2], 1)
    return {
        "stage": stage, "epoch": epoch, "lr": lr,
        "train_loss": totals[0] / samples, "train_acc": totals[1] / samples,
        "val_loss": val["loss"], "val_acc": val["accuracy"], "val_macro_f1": val["macro_f1"],
        "val_balanced_acc": val["balanced_accuracy"],
        "images_per_s": totals[2] / seconds if seconds else 0.0,
        "seconds": seconds,
        "updates": updates,
        **({"val_map": val["map"]} if "map" in val else {}),  # multi-label: macro mAP (val_acc: subset accuracy)
    }


def log_epoch(where: str, row: dict[str, Any], best: bool) -> None:
    if "val_map" in row:  # multi-label: its selection metric, and subset accuracy for "acc"
        logging.getLogger("finetune").info(
            "%s: train loss %.4f | val loss %.4f mAP %.4f macro-F1 %.4f subset acc %.4f | %.0f img/s%s", where,
            row["train_loss"], row["val_loss"], row["val_map"], row["val_macro_f1"], row["val_acc"],
            row["images_per_s"], " | best" if best else "")
        return
    logging.getLogger("finetune").info(
        "%s: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s%s", where, row["train_loss"],
        row["train_acc"], row["val_loss"], row["val_acc"], row["val_macro_f1"], row["images_per_s"],
        " | best" if best else "",
    )


def write_logs(run_dir: Path, classes: list[str], history: list[dict[str, Any]],
               recall_history: list[dict[str, Any]]) -> None:
    """``metrics.csv``, ``per_class_recall.csv`` and ``training_curves.png`` of the epochs so far."""
    write_csv_atomic(run_dir / "metrics.csv", METRIC_COLUMNS, history)
    write_csv_atomic(run_dir / "per_class_recall.csv", ["epoch", *classes], recall_history)
    plot_training_curves(history, run_dir / "training_curves.png")


def write_csv_atomic(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, with stage boundaries marked."""
    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    multilabel = bool(history) and "val_map" in history[-1]
    if multilabel:  # its accuracy is subset accuracy; mAP is what selects
        ax_acc.plot(epochs, [r["val_map"] for r in history], "o-", label="val mAP")
        ax_acc.plot(epochs, [r["val_acc"] for r in history], "o-", label="val subset accuracy")
    else:
        ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
        ax_acc.plot(epochs, [r["val_acc"] for r in history], "o-", label="val")
    ax_acc.plot(epochs, [r["val_macro_f1"] for r in history], "s--", label="val macro-F1")
    for prev, row in zip(history, history[1:]):
        if row["stage"] != prev["stage"]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(prev["epoch"] + 0.5, color="grey", lw=0.8, ls=":")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="mAP and accuracy" if multilabel else "accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=100))


def run_summary(*, name: str, run_dir: Path, select: str, best: dict[str, Any] | None, train_seconds: float,
                epochs_run: int) -> dict[str, Any]:
    """``summary.json`` of a finished run (the runner adds ``test``)."""
    return {
        "name": name,
        "run_dir": str(run_dir),
        "best_epoch": best["epoch"] if best else None,
        "best_metric": {"name": select, "value": best["value"]} if best else None,
        "best_val": best["val"] if best else None,
        "train_seconds": round(train_seconds, 2),
        "epochs_run": epochs_run,
        "best_checkpoint": str(run_dir / "checkpoints" / "best"),
    }


def calibrate_best(run_dir: Path, items: list[tuple[Path, int]], **run) -> dict[str, Any] | None:
    """Fit the temperature of ``checkpoints/best`` on the validation ``items`` (``run``: device, batch_size,
    num_workers, amp_dtype); the summary's ``calibration`` (None without items)."""

    if not items:
        return None
    result = calibrate_checkpoint(run_dir / "checkpoints" / "best", items, **run)
    logging.getLogger("finetune").info("calibration: temperature %.4f, val ECE %.4f -> %.4f", result["temperature"],
                                       result["ece_before"], result["ece_after"])
    return result


def evaluate_test(run_dir: Path, items: list[tuple[Path, int]], *, device, batch_size: int, num_workers,
                  amp_dtype, tta: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoints/best`` (with its temperature) on the test ``items`` into ``run_dir/eval``, also
    with test-time augmentation ``tta`` when given; the summary's ``test``."""

    model, meta = load_checkpoint(run_dir / "checkpoints" / "best", map_location=device)
    metrics = evaluate(
        model, items, class_names=meta["classes"], preprocessing=meta["preprocessing"], out_dir=run_dir / "eval",
        device=str(device), batch_size=batch_size, num_workers=num_workers, run_dir=run_dir, amp_dtype=amp_dtype,
        temperature=meta_temperature(meta), tta=tta,
    )
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "top5_accuracy", "ece", "loss",
                                    "num_samples", "calibration", "tta") if k in metrics}


def finish_multilabel(run_dir: Path, val_items: list, test_items: list, *, device, batch_size: int, num_workers,
                      amp_dtype, calibrate: bool = False) -> dict[str, Any]:
    """The end of a multi-label run: per-label thresholds (and a global one) that maximise F1 on the validation
    split, written into ``checkpoints/best``; with ``calibrate``, per-label temperatures fitted on the same split
    (the thresholds moved to their scale); then the test split evaluated at them into ``run_dir/eval``
    (:func:`~finetune.evaluation.multilabel_evaluator.evaluate_multilabel`). Returns the summary's
    ``thresholds`` (``per_class`` as the checkpoint stores them, on the probabilities it predicts: ``scale``
    says which, with the tuned ones as ``per_class_uncalibrated`` once calibrated; ``global`` is the one
    threshold best for all labels on the uncalibrated probabilities), ``calibration`` and ``test``."""
    folder = run_dir / "checkpoints" / "best"
    model, meta = load_checkpoint(folder, map_location=device)
    model.eval()
    indices, logits, _ = predict_probabilities(model, [str(p) for p, _ in val_items], eval_transform(meta["preprocessing"]),
                                               device=device, batch_size=batch_size, num_workers=num_workers,
                                               amp_dtype=amp_dtype, logits=True)
    targets = np.stack([val_items[i][1] for i in indices]).astype(np.int64)
    tuned = tune_thresholds(targets, sigmoid(logits))
    meta = read_meta(folder)
    meta.update(task="multilabel", thresholds=[float(t) for t in tuned["per_class"]], threshold=tuned["global"])
    meta.pop("temperatures", None)
    write_json_atomic(folder / META_FILE, meta)
    log = logging.getLogger("finetune")
    log.info("multi-label thresholds tuned on %d val images: global %.3f, per label %s", len(targets), tuned["global"],
             ", ".join(f"{t:.2f}" for t in tuned["per_class"]))
    out: dict[str, Any] = {"thresholds": {"per_class": meta["thresholds"], "global": meta["threshold"],
                                          "val_f1": tuned["f1"], "scale": "uncalibrated"}}
    if calibrate:
        out["calibration"] = set_label_temperatures(folder, logits, targets)  # the logits the thresholds came from
        tuned_thresholds, meta = meta["thresholds"], read_meta(folder)  # the temperatures, the thresholds moved
        # the summary's per-label thresholds are the checkpoint's: on the calibrated probabilities predict gives
        out["thresholds"].update(per_class=meta["thresholds"], per_class_uncalibrated=tuned_thresholds,
                                 scale="calibrated")
        log.info("calibration: per-label temperatures %s, val ECE %.4f -> %.4f",
                 ", ".join(f"{t:.2f}" for t in out["calibration"]["temperatures"]), out["calibration"]["ece_before"],
                 out["calibration"]["ece_after"])
    if test_items:  # at the thresholds (and temperatures) just written, with the model already loaded
        metrics = evaluate_multilabel(model, test_items, class_names=meta["classes"], preprocessing=meta["preprocessing"],
                                      out_dir=run_dir / "eval", thresholds=meta["thresholds"],
                                      temperatures=meta_temperatures(meta), device=str(device), batch_size=batch_size,
                                      num_workers=num_workers, run_dir=run_dir, amp_dtype=amp_dtype)
        out["test"] = {"map": metrics["map_macro"], "map_micro": metrics["map_micro"],
                       "accuracy": metrics["subset_accuracy"], "macro_f1": metrics["f1_macro"],
                       "f1_micro": metrics["f1_micro"], "hamming_loss": metrics["hamming_loss"],
                       "num_samples": metrics["num_samples"]}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"done in {summary['train_seconds']:.0f}s of training"]
    if summary.get("best_metric"):
        bm = summary["best_metric"]
        lines.append(f"best: epoch {summary['best_epoch']}, val {bm['name']} {bm['value']:.4f}")
    if "test" in summary:
        t = summary["test"]
        if "map" in t:
            lines.append(f"test: mAP {t['map']:.4f} (micro {t['map_micro']:.4f}), micro-F1 {t['f1_micro']:.4f}, "
                         f"subset accuracy {t['accuracy']:.4f}, Hamming loss {t['hamming_loss']:.4f}")
        else:
            lines.append(f"test: accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}"
                         + (f"; with {t['tta']['views']} TTA: accuracy {t['tta']['accuracy']:.4f}" if "tta" in t else ""))
    lines.append(f"best checkpoint: {summary['best_checkpoint']}")
    return "\n".join(lines)


class Progress:
    """tqdm bars on a terminal: one per epoch (loss, lr, images/s) under an overall one; nothing otherwise
    (the epoch lines log instead)."""

    def __init__(self, enabled: bool, total_epochs: int, done_epochs: int):
        self.enabled = enabled
        self.overall = None
        if enabled:

            self.overall = tqdm(total=total_epochs, initial=done_epochs, desc="epochs", position=0, dynamic_ncols=True)

    @contextlib.contextmanager
    def epoch(self, desc: str, total: int):
        if not self.enabled:
            yield None
            return

        bar = tqdm(total=total, desc=desc, leave=False, position=1, dynamic_ncols=True)
        start = time.perf_counter()

        def update(step: int, samples: int, loss: float, lr: float) -> None:
            bar.update(step - bar.n)
            rate = samples / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")

        try:
            yield update
        finally:
            bar.close()
            self.overall.update(1)

    def close(self) -> None:
        if self.overall is not None:
            self.overall.close()
