"""Run folders: what a crash or a failed setup leaves is either resumed or replaced.

A run folder is *resumable* when ``checkpoints/last`` holds a training state (after :func:`recover`
has undone a checkpoint swap a crash interrupted); any other folder is *restartable*. Its run files are
a first epoch that never reached its checkpoint: a fresh run replaces them (:func:`clear_partial_run`),
so it never trains on a manifest made with other split options. Files the runner does not write are left
alone.

A fresh run's setup writes its files into ``.setup.tmp`` inside the run folder and moves them in only
when setup succeeded (:func:`commit_setup`); a setup that fails removes them, and the folders it created
(:func:`discard_setup`): a failed setup leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from finetune import _distributed as ddp
from finetune._io import atomic_write_text, ensure_folder, recover_dir
from finetune.config import resolve_raw
from finetune.errors import FinetuneError, first_line
from finetune.models.checkpoint import META_FILE, read_meta
from finetune.training.auto_batch import RECORD_FILE  # batch_size auto's record (a fresh run searches again)

log = logging.getLogger("finetune")

STATE_FILE = "training_state.pt"
RUN_FILES = ("recipe.yaml", "manifest.csv", "bad_files.csv", "metrics.csv", "per_class_recall.csv",
             "training_curves.png", "summary.json", RECORD_FILE)
RUN_FOLDERS = ("checkpoints", "eval")
SETUP_DIR = ".setup.tmp"
# what a resumed run's recipe may change (key paths, or prefixes ending in "."): how it runs, not what it
# trains; besides these, the epochs of the stage in progress or a later one may grow
RESUME_MAY_CHANGE = ("name", "output.", "data.num_workers", "training.device", "training.eval_batch_size",
                     "training.ddp_timeout", "training.cache_dir", "training.cache_max_gb",
                     "training.loggers")
STATE_KEYS = ("stage_index", "epoch_in_stage", "updates_in_stage", "stale_epochs", "train_seconds", "best",
              "history", "recall_history", "optimizer", "scaler", "rng")


def recover(run_dir: Path) -> None:
    """Undo interrupted checkpoint swaps in ``run_dir/checkpoints`` (see :func:`~finetune.models.checkpoint.recover_dir`)."""
    for name in ("last", "best"):
        recover_dir(run_dir / "checkpoints" / name)


def is_resumable(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "last" / STATE_FILE).is_file()


def resumable_hint(run_dir: Path) -> str:
    return f"resumable: finetune train --resume {run_dir}"


def restartable_hint(run_dir: Path) -> str:
    recipe = run_dir / "recipe.yaml"
    return f"restartable: finetune train {recipe if recipe.is_file() else 'RECIPE'} --out {run_dir}"


def check_outside_data(run_dir: Path, data_root: Optional[str]) -> None:
    """Refuse a run folder that is (or is inside) the image folder: its ``eval/`` would become a class."""
    if not data_root:
        return
    root, out = Path(data_root).resolve(), run_dir.resolve()
    if out == root or root in out.parents:
        raise FinetuneError(f"--out {run_dir} is inside the data root {data_root}: the next scan would take its "
                            "files for images; choose a run folder outside it")


def prepare(run_dir: Path, *, resume: bool, data_root: Optional[str], dist) -> Optional[list[Path]]:
    """Check ``run_dir`` fits the command (a fresh run needs a restartable folder outside the data, a resume
    a resumable one) after :func:`recover`, and start a fresh run's setup (on rank 0).

    Args:
        dist: the process group (a :class:`~finetune._distributed.DistInfo`); rank 0 changes files.

    Returns:
        The folders a fresh run's setup created (for :func:`discard_setup`), else None.
    """

    if not resume:
        check_outside_data(run_dir, data_root)
    if dist.is_main:
        recover(run_dir)
    ddp.barrier(dist)
    resumable = is_resumable(run_dir)
    if resume and not resumable:
        raise FinetuneError(f"nothing to resume in {run_dir}: no checkpoints/last/{STATE_FILE} (the run "
                            f"stopped before its first checkpoint); {restartable_hint(run_dir)}")
    if not resume and resumable:
        raise FinetuneError(f"{run_dir} already holds a run; {resumable_hint(run_dir)} (or choose another --out)")
    created = start_setup(run_dir) if dist.is_main and not resume else None
    ddp.barrier(dist)
    return created


def start_setup(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and an empty ``run_dir/.setup.tmp`` for a fresh run's setup files.

    Returns:
        The folders this created, deepest first (what :func:`discard_setup` removes).
    """
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    ensure_folder(run_dir)
    staging = run_dir / SETUP_DIR
    shutil.rmtree(staging, ignore_errors=True)  # from a setup that was killed
    staging.mkdir()
    return created


def commit_setup(run_dir: Path, recipe_text: str) -> None:
    """Replace what an earlier unfinished run left with the staged setup files, then write ``recipe.yaml``."""
    clear_partial_run(run_dir)
    staging = run_dir / SETUP_DIR
    for path in staging.iterdir():
        os.replace(path, run_dir / path.name)
    staging.rmdir()
    atomic_write_text(run_dir / "recipe.yaml", recipe_text)


def discard_setup(run_dir: Path, created: list[Path]) -> None:
    """Undo a fresh run's failed setup: remove the staged files and the (then empty) folders it created."""
    shutil.rmtree(run_dir / SETUP_DIR, ignore_errors=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def read_state(path: Path) -> dict[str, Any]:
    """``checkpoints/last/training_state.pt``, loaded without running pickled code; anything else (garbage,
    a pickle of other objects, missing keys) is refused in one line."""

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (not a zip), EOFError, ...
        reason = first_line(e, limit=160)
        raise FinetuneError(f"{path} is not a training state finetune wrote ({reason})") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise FinetuneError(f"{path} is not a training state finetune wrote (missing {', '.join(missing)})")
    return state


def read_last(folder: Path, run_dir: Path, current: dict[str, Any]) -> dict[str, Any]:
    """The training state of ``checkpoints/last`` (:func:`read_state`), once the recipe ``current`` (resolved)
    passes :func:`check_resume_recipe` against the one the checkpoint recorded; the allowed changes are logged."""

    meta = read_meta(folder)
    state = read_state(folder / STATE_FILE)
    started = resolve_raw(meta.get("recipe"), source=f"the recipe {folder / META_FILE} recorded")
    for change in check_resume_recipe(run_dir / "recipe.yaml", started, current, state["stage_index"]):
        log.info("resuming with %s", change)
    return state


def check_resume_recipe(recipe_path: Path, started: dict[str, Any], current: dict[str, Any],
                        stage_index: int) -> list[str]:
    """Refuse a resumed run whose recipe changed what it trains since the run started.

    Args:
        recipe_path: the run's ``recipe.yaml`` (named in the message).
        started: the recipe the last checkpoint recorded.
        current: the recipe the run resumes with.
        stage_index: the stage in progress.

    Returns:
        The allowed changes, as ``key old -> new``.
    """
    before, after = _flatten(started), _flatten(current)
    allowed, refused = [], []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key, "unset"), after.get(key, "unset")
        if old == new:
            continue
        parts = key.split(".")
        grows = (len(parts) == 3 and parts[0] == "stages" and parts[2] == "epochs" and int(parts[1]) >= stage_index
                 and isinstance(old, int) and isinstance(new, int) and new > old)
        if grows or any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_CHANGE):
            allowed.append(f"{key} {old} -> {new}")
        else:
            refused.append((key, old, new))
    if refused:
        key, old, new = refused[0]
        may_change = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
        raise FinetuneError(
            f"{recipe_path} changed since the run started: {', '.join(k for k, _, _ in refused)} ({old!r} -> "
            f"{new!r}; a resumed run keeps its model, data and training settings: only the epochs of the stage "
            f"in progress or a later one may grow, and {may_change} may change)"
        )
    return allowed


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` → ``{"a.b.0": 1}``; empty containers stay values."""
    if not (isinstance(obj, (dict, list)) and obj):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


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
