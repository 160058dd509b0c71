"""Experiment tracking: the run's metrics, images, recipe and best checkpoint in TensorBoard and MLflow.

``training.loggers: [csv, tensorboard, mlflow]``. ``csv`` is the run folder's own record (``metrics.csv``,
``per_class_recall.csv``, ``training_curves.png``), always written by the runner; the others mirror it:

* ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir RUN_DIR/tensorboard``).
* ``mlflow``: a run in the experiment named after the recipe, at ``$MLFLOW_TRACKING_URI`` when set (a
  server, ``sqlite:///mlflow.db``...), else in a file store ``RUN_DIR/mlruns``. Its id is kept in
  ``RUN_DIR/mlflow_run.json`` so a resumed run goes on logging into it.

What is logged, on one x-axis (the run's optimizer updates, counted across stages):

* every update: ``train/loss`` (mean of the update's micro-batches) and ``train/lr``;
* every epoch: the columns of ``metrics.csv`` (``val_acc``, ``train_loss``, ..., ``epoch``, ``stage``) and
  ``val_recall/CLASS`` per class;
* once: the resolved recipe as hyper-parameters (flattened keys, ``stages.0.optimizer.lr``);
* at the end: ``training_curves.png`` and the test confusion matrices as images, the test metrics as
  ``test/...``, and (MLflow) ``checkpoints/best`` as an artifact.

Only rank 0 logs: the other ranks get a :class:`RunLogger` without backends. Per-update values stay on the
device until the epoch ends (one CPU-GPU sync per epoch, not per step).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from finetune._io import atomic_write_text
from finetune.config import resolved_dict

EPOCH_KEYS = ("epoch", "stage", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
              "val_balanced_acc", "images_per_s", "seconds", "val_map")
"""The per-epoch values logged: the columns of ``metrics.csv``."""

IMAGES = ("training_curves.png", "eval/confusion_matrix.png", "eval/confusion_matrix_normalized.png")
"""Images of the run folder logged at the end, when present."""

MLFLOW_RUN_FILE = "mlflow_run.json"


class Backend(Protocol):
    """One tracking library. Values arrive with the step (optimizer updates so far in the run)."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...

    def log_image(self, tag: str, png: Path, step: int) -> None: ...

    def log_checkpoint(self, folder: Path) -> None: ...

    def close(self, finished: bool) -> None: ...


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of ``values`` as ``PREFIXkey``, nested dicts flattened (``test/tta/accuracy``), text left out."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class RunLogger:
    """Fans a run's values out to its backends (none on ranks other than 0).

    Args:
        backends: the tracking backends; empty for a run that logs only its CSV.
        first_step: optimizer updates the run made before (a resumed run goes on counting from there).
        classes: class names, for the per-class recall keys.
    """

    def __init__(self, backends: list[Backend], *, first_step: int = 0, classes: tuple[str, ...] = ()):
        self.backends = backends
        self.step = first_step
        self.recall_keys = _metric_keys(classes)
        self._pending: list[tuple[int, Any, float]] = []
        self._finished = False

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log_params(self, params: dict[str, Any]) -> None:
        """The resolved recipe (nested dicts and lists), flattened to ``a.b.0.c`` keys."""
        flat = flatten(params)
        for backend in self.backends:
            backend.log_params(flat)

    def log_update(self, loss, lr: float) -> None:
        """One optimizer update: its loss (a tensor, read at the epoch's end) and learning rate."""
        self.step += 1
        if self.backends:
            self._pending.append((self.step, loss, lr))

    def log_epoch(self, row: dict[str, Any], recall: dict[str, float]) -> None:
        """An epoch's ``metrics.csv`` row and per-class validation recall (by class name)."""
        self._flush_updates()
        values = {key: float(row[key]) for key in EPOCH_KEYS if key in row}
        values.update({self.recall_keys[name]: float(value) for name, value in recall.items()
                       if name in self.recall_keys})
        for backend in self.backends:
            backend.log_scalars(values, self.step)

    def log_end(self, run_dir: Path, test: Optional[dict[str, Any]]) -> None:
        """The run's images, test metrics and best checkpoint; marks the run finished."""
        self._flush_updates()
        for backend in self.backends:
            if test:
                backend.log_scalars(_numbers(test, "test/"), self.step)
            for name in IMAGES:
                if (run_dir / name).is_file():
                    backend.log_image(Path(name).stem, run_dir / name, self.step)
            if (run_dir / "checkpoints" / "best").is_dir():
                backend.log_checkpoint(run_dir / "checkpoints" / "best")
        self._finished = True

    def close(self) -> None:
        """Flush and close every backend; a run closed before :meth:`log_end` is marked failed."""
        for backend in self.backends:
            backend.close(self._finished)
        self.backends = []

    def _flush_updates(self) -> None:
        if not self._pending:
            return

        steps, losses, lrs = zip(*self._pending)
        losses = torch.stack([torch.as_tensor(x).float().cpu() for x in losses]).tolist()  # one sync
        self._pending = []
        for step, loss, lr in zip(steps, losses, lrs):
            for backend in self.backends:
                backend.log_scalars({"train/loss": loss, "train/lr": lr}, step)


def create_run_logger(names: list[str] | tuple[str, ...], run_dir: Path, *, enabled: bool, experiment: str,
                      classes: list[str], first_step: int = 0, params: Any = None) -> RunLogger:
    """The run's logger: the backends ``names`` asks for on the process that logs (``enabled``: rank 0).

    Args:
        names: ``training.loggers`` (``csv`` needs no backend: the runner writes the CSVs).
        run_dir: the run folder (TensorBoard's events and MLflow's default store go there).
        enabled: whether this process logs (rank 0); otherwise the logger has no backend.
        experiment: MLflow experiment name (the recipe's name).
        classes: class names in index order.
        first_step: optimizer updates the run made before (resume).
        params: the validated recipe (a ``Recipe``), logged first as hyper-parameters with every default filled in.
    """
    backends: list[Backend] = []
    if enabled:
        try:
            if "tensorboard" in names:
                backends.append(TensorBoardBackend(run_dir / "tensorboard", purge_step=first_step + 1))
            if "mlflow" in names:
                backends.append(MlflowBackend(run_dir, experiment=experiment))
        except BaseException:
            for backend in backends:
                backend.close(False)
            raise
    logger = RunLogger(backends, first_step=first_step, classes=tuple(classes))
    if params is not None:

        logger.log_params(resolved_dict(params))
    return logger


# ------------------------------------------------------------------------------------------ backends

class TensorBoardBackend:
    """``torch.utils.tensorboard``'s SummaryWriter; ``purge_step`` hides what a killed run logged past
    its last checkpoint when the run resumes."""

    def __init__(self, folder: Path, purge_step: Optional[int] = None):

        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def log_params(self, params: dict[str, str]) -> None:

        # written into the run's own event file (SummaryWriter.add_hparams would start another run)
        for summary in hparams(params, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, tag: str, png: Path, step: int) -> None:

        with Image.open(png) as image:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def log_checkpoint(self, folder: Path) -> None:
        pass  # TensorBoard has no artifacts; the checkpoint stays in the run folder

    def close(self, finished: bool) -> None:
        self.writer.close()


class MlflowBackend:
    """An MLflow run through ``MlflowClient`` (no global state: several runs in one process are fine)."""

    def __init__(self, run_dir: Path, *, experiment: str):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants an opt-in for file stores
        from mlflow.tracking import MlflowClient  # lazy: optional (finetune[mlflow])

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        record = run_dir / MLFLOW_RUN_FILE
        previous = json.loads(record.read_text()) if record.is_file() else {}
        if previous.get("tracking_uri") == uri:  # a resumed run: go on logging into the same MLflow run
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            atomic_write_text(record, json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param  # lazy: optional (finetune[mlflow])

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]  # params cannot change
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start:start + 100], synchronous=True)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # lazy: optional (finetune[mlflow])
        from mlflow.utils.time import get_current_time_millis  # lazy: optional (finetune[mlflow])

        now = get_current_time_millis()
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000], synchronous=True)

    def log_image(self, tag: str, png: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(png), "images")

    def log_checkpoint(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), f"checkpoints/{folder.name}")

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "FAILED")


# ------------------------------------------------------------------------------------------- helpers

MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value


def flatten(params: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as ``{"a.b.0.c": "value"}`` (values as strings, cut to MLflow's limit)."""
    if isinstance(params, dict) and params:
        items = params.items()
    elif isinstance(params, list) and params and any(isinstance(v, (dict, list)) for v in params):
        items = ((str(i), v) for i, v in enumerate(params))
    else:
        return {prefix: _text(params)[:MAX_PARAM_CHARS]} if prefix else {}
    flat: dict[str, str] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _metric_keys(classes: tuple[str, ...]) -> dict[str, str]:
    """``val_recall/NAME`` per class, with characters MLflow refuses in keys replaced by ``_`` (and the
    class index added where that makes two names alike)."""
    safe = {name: re.sub(r"[^\w\-. /]", "_", name) for name in classes}
    clashes = {s for s in safe.values() if list(safe.values()).count(s) > 1}
    return {name: f"val_recall/{s if s not in clashes else f'{i}_{s}'}"
            for i, (name, s) in enumerate(safe.items())}
