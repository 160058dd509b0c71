"""What a run shows and logs: progress bars, metrics CSVs, the training-curves PNG, the final summary."""
from __future__ import annotations

import contextlib
import csv
import io
import time
from pathlib import Path
from typing import Any

from finetune._io import atomic_write_bytes, atomic_write_text


def write_csv_atomic(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def plot_training_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, with stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in history], "o-", label="val")
    ax_acc.plot(epochs, [r["val_macro_f1"] for r in history], "s--", label="val macro-F1")
    for prev, row in zip(history, history[1:]):
        if row["stage"] != prev["stage"]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(prev["epoch"] + 0.5, color="grey", lw=0.8, ls=":")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.set(title="accuracy", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"done in {summary['train_seconds']:.0f}s of training"]
    if summary.get("best_metric"):
        bm = summary["best_metric"]
        lines.append(f"best: epoch {summary['best_epoch']}, val {bm['name']} {bm['value']:.4f}")
    if "test" in summary:
        t = summary["test"]
        lines.append(f"test: accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}")
    lines.append(f"best checkpoint: {summary['best_checkpoint']}")
    return "\n".join(lines)


class Progress:
    """tqdm bars on a terminal: one per epoch (loss, lr, images/s) under an overall one; nothing otherwise
    (the epoch lines log instead)."""

    def __init__(self, enabled: bool, total_epochs: int, done_epochs: int):
        self.enabled = enabled
        self.overall = None
        if enabled:
            from tqdm import tqdm

            self.overall = tqdm(total=total_epochs, initial=done_epochs, desc="epochs", position=0, dynamic_ncols=True)

    @contextlib.contextmanager
    def epoch(self, desc: str, total: int):
        if not self.enabled:
            yield None
            return
        from tqdm import tqdm

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
