"""Run folders: what a crash or a failed setup leaves is either resumed or replaced.

A run folder is *resumable* when ``checkpoints/last`` holds a training state (after :func:`recover`
has undone a checkpoint swap a crash interrupted). Any other run files in it are a partial setup or a
first epoch that never reached its checkpoint: a fresh run replaces them (:func:`clear_partial_run`), so
it never trains on a manifest made with other split options. Files the runner does not write are left
alone.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from finetune.checkpoint import recover_dir

log = logging.getLogger("finetune")

STATE_FILE = "training_state.pt"
RUN_FILES = ("recipe.yaml", "manifest.csv", "bad_files.csv", "metrics.csv", "per_class_recall.csv",
             "training_curves.png", "summary.json")
RUN_FOLDERS = ("checkpoints", "eval")


def recover(run_dir: Path) -> None:
    """Undo interrupted checkpoint swaps in ``run_dir/checkpoints`` (see :func:`~finetune.checkpoint.recover_dir`)."""
    for name in ("last", "best"):
        recover_dir(run_dir / "checkpoints" / name)


def is_resumable(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last" / STATE_FILE).is_file()


def clear_partial_run(run_dir: Path) -> list[str]:
    """Delete the run files (and their interrupted temporary files) of a run folder that is not
    resumable: call it only when :func:`is_resumable` is false.

    Returns:
        The names removed.
    """
    removed = []
    for name in RUN_FILES:
        temps = list(run_dir.glob(f".{name}.*.tmp"))
        for path in [run_dir / name, *temps]:
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    for name in RUN_FOLDERS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)
            removed.append(name + "/")
    if removed:
        log.warning("%s held an unfinished setup or a run stopped before its first checkpoint; replaced %s",
                    run_dir, ", ".join(removed))
    return removed
