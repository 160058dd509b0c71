"""The recipe runner: setup, train (stage by stage), checkpoints, resume, cleanup.

A run folder holds ``recipe.yaml`` (resolved), ``manifest.csv``, ``bad_files.csv``, ``metrics.csv``,
``per_class_recall.csv``, ``training_curves.png``, ``checkpoints/{last,best}``, ``summary.json`` and
``eval/`` (the best checkpoint on the test split). Only rank 0 writes.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from finetune._workers import auto_workers
from finetune.checkpoint import save_checkpoint, write_json_atomic
from finetune.config import Recipe, StageConfig
from finetune.errors import FinetuneError
from finetune.models import FinetuneModel, create_model
from finetune.training import distributed as ddp
from finetune.training import run_folder
from finetune.training.ema import Ema, stage_state_names
from finetune.training.freeze import (
    apply_trainable,
    frozen_batchnorms,
    select_trainable,
    set_train_mode,
)
from finetune.training.loggers import RunLogger, create_run_logger
from finetune.training.loop import (
    make_grad_scaler,
    predict,
    require_samples,
    resolve_precision,
    train_one_epoch,
    updates_per_epoch,
)
from finetune.training.reporting import (
    Progress,
    format_summary,
    plot_training_curves,
    write_csv_atomic,
)

log = logging.getLogger("finetune")

METRIC_COLUMNS = [
    "stage", "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
    "val_balanced_acc", "images_per_s", "seconds",
]
STATE_FILE = run_folder.STATE_FILE


def run_training(recipe: Recipe, raw: dict[str, Any], *, run_dir: str | Path, resume: bool = False,
                 quiet: bool = False) -> dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` (or resume the run there) and return the summary."""
    runner = Runner(recipe, raw, run_dir=Path(run_dir), resume=resume, quiet=quiet)
    try:
        runner.setup()
        return runner.train()
    finally:
        runner.cleanup()


class Runner:
    """One training run. The protocol: :meth:`setup`, :meth:`train`, :meth:`save_checkpoint`,
    :meth:`load_checkpoint`, :meth:`cleanup`."""

    def __init__(self, recipe: Recipe, raw: dict[str, Any], *, run_dir: Path, resume: bool, quiet: bool):
        self.recipe = recipe
        self.raw = raw
        self.run_dir = run_dir
        self.resume = resume
        self.quiet = quiet
        self.cfg = recipe.training
        # progress through the stages; restored by load_checkpoint
        self.stage_index = 0
        self.epoch_in_stage = 0
        self.updates_in_stage = 0
        self.history: list[dict[str, Any]] = []
        self.recall_history: list[dict[str, Any]] = []
        self.best: Optional[dict[str, Any]] = None  # of the run: picks checkpoints/best
        self.stage_best: Optional[float] = None  # of the current stage: early stopping's patience counts against it
        self.stale_epochs = 0
        self.train_seconds = 0.0
        self.resume_optimizer: Optional[dict[str, Any]] = None
        self._items: dict[str, list[tuple[Path, int]]] = {}
        self._created: Optional[list[Path]] = None  # folders a fresh run's setup created (rank 0)
        self.loggers = RunLogger([])  # experiment tracking, opened by train()

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build everything a run needs. A fresh run's setup leaves nothing behind if it fails."""
        try:
            self._setup()
        except BaseException:
            if self._created is not None:
                run_folder.discard_setup(self.run_dir, self._created)
            raise

    def _setup(self) -> None:
        from finetune.data import Manifest, build_transform, manifest_root, prepare_manifest

        cfg, data = self.cfg, self.recipe.data
        device_type = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.dist = ddp.init_distributed(device_type, timeout=timedelta(minutes=cfg.ddp_timeout))
        self.device = ddp.rank_device(cfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.is_main = self.dist.is_main
        self._setup_logging()
        self._prepare_run_dir()
        # the same seed on every rank: identical initial weights (DDP broadcasts them anyway, but the
        # feature cache runs the backbone before any DDP wrapper exists)
        seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # data: the manifest is made once (rank 0) and reused on resume, so the split never changes; a fresh
        # run stages its setup files until setup succeeds
        setup_dir = self.run_dir if self.resume else self.run_dir / run_folder.SETUP_DIR
        manifest_path = setup_dir / "manifest.csv"
        if self.is_main and not manifest_path.exists():
            if data.sample == "digits" and data.root:
                from finetune.data import write_digits

                write_digits(data.root)
            manifest, bad = prepare_manifest(
                data.root, manifest=data.manifest, card=data.card, val=data.val, test=data.test,
                train_per_class=data.train_per_class, exclude=tuple(data.exclude), seed=data.seed,
                report_path=setup_dir / "bad_files.csv",
            )
            if bad:
                log.warning("excluded %d unreadable image(s); see %s", len(bad), self.run_dir / "bad_files.csv")
            manifest.write_csv(manifest_path)
        ddp.barrier(self.dist)
        self.manifest = Manifest.read_csv(manifest_path, root=manifest_root(data.root, data.manifest))
        if "train" not in self.manifest.splits() or "val" not in self.manifest.splits():
            raise FinetuneError(
                f"the data needs train and val splits, found {', '.join(self.manifest.splits())} "
                "(give data.val, or a validation folder named val/valid/validation)"
            )
        self.classes = list(self.manifest.classes)
        if len(self.classes) < 2:
            raise FinetuneError(f"classification needs at least two classes; {data.root or data.manifest} has "
                                f"{len(self.classes)}: {', '.join(self.classes)}")

        # model
        m = self.recipe.model
        self.model: FinetuneModel = create_model(
            m.backbone, len(self.classes), head=m.head, pretrained=False if self.resume else m.pretrained,
            **m.backbone_kwargs,
        ).to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.preprocessing = resolve_preprocessing(self.model.data_config(), data)
        self.train_transform = build_transform(True, ops=data.train_transforms, **self._transform_args())
        self.eval_transform = build_transform(False, ops=data.eval_transforms, **self._transform_args())
        self.ema = Ema(self.model, cfg.ema) if cfg.ema is not None else None
        self.loss_fn = self._make_loss()
        self.scaler = make_grad_scaler(self.device, self.amp_dtype)
        if self.resume:
            self.load_checkpoint(self.run_dir / "checkpoints" / "last")
        elif self.is_main:
            run_folder.commit_setup(self.run_dir, yaml.safe_dump(self.raw, sort_keys=False))
        ddp.barrier(self.dist)
        log.info(
            "%s: %s + %s head, %d classes, %d train / %d val images, device %s, precision %s",
            self.recipe.name, m.backbone, self.model.head_config["name"], len(self.classes),
            len(self.items("train")), len(self.items("val")), self.device,
            {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype],
        )

    def _transform_args(self) -> dict[str, Any]:
        p = self.preprocessing
        return dict(input_size=p["input_size"], mean=p["mean"], std=p["std"],
                    interpolation=p["interpolation"], crop_pct=p["crop_pct"])

    def _make_loss(self) -> nn.Module:
        weight = None
        if self.recipe.data.balance == "loss":
            from finetune.data import class_counts, class_weights

            labels = [label for _, label in self.items("train")]
            weight = class_weights(class_counts(labels, len(self.classes)), mode=self.recipe.data.class_weights)
            weight = weight.to(self.device)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=self.cfg.label_smoothing)

    def _setup_logging(self) -> None:
        level = logging.INFO if self.is_main else logging.WARNING
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
            log.propagate = False
        log.setLevel(level)

    def _prepare_run_dir(self) -> None:
        if not self.resume:
            run_folder.check_outside_data(self.run_dir, self.recipe.data.root)
        if self.is_main:
            run_folder.recover(self.run_dir)
        ddp.barrier(self.dist)
        resumable = run_folder.is_resumable(self.run_dir)
        if self.resume and not resumable:
            raise FinetuneError(f"nothing to resume in {self.run_dir}: no checkpoints/last/{STATE_FILE} (the run "
                                f"stopped before its first checkpoint); {run_folder.restartable_hint(self.run_dir)}")
        if not self.resume and resumable:
            raise FinetuneError(f"{self.run_dir} already holds a run; {run_folder.resumable_hint(self.run_dir)} "
                                "(or choose another --out)")
        if self.is_main and not self.resume:
            self._created = run_folder.start_setup(self.run_dir)
        ddp.barrier(self.dist)

    # ------------------------------------------------------------------------------------------ train

    def train(self) -> dict[str, Any]:
        from finetune.config import resolved_dict

        stages = self.recipe.stages
        # experiment tracking (training.loggers): TensorBoard / MLflow on rank 0; steps count optimizer updates
        self.loggers = create_run_logger(self.cfg.loggers, self.run_dir, enabled=self.is_main,
                                         experiment=self.recipe.name, classes=self.classes,
                                         first_step=sum(row.get("updates", 0) for row in self.history))
        self.loggers.log_params(resolved_dict(self.recipe))
        self.progress = Progress(self.is_main and not self.quiet and sys.stderr.isatty(),
                                 total_epochs=sum(s.epochs for s in stages), done_epochs=len(self.history))
        for index in range(self.stage_index, len(stages)):
            stage = stages[index]
            if stage.epochs == 0:
                log.info("stage %d (%s): 0 epochs, skipped", index, stage_label(stage, index))
                continue
            if index != self.stage_index:  # entering a new stage: fresh optimizer, warmup, patience
                self.stage_index, self.epoch_in_stage, self.updates_in_stage, self.stale_epochs = index, 0, 0, 0
                self.stage_best = None
                self.resume_optimizer = None  # a resumed optimizer state belongs to the stage it came from
            if self.epoch_in_stage >= stage.epochs or self._early_stopped(stage):
                continue
            self._run_stage(index, stage)
        self.progress.close()
        return self._finish()

    def _early_stopped(self, stage: StageConfig) -> bool:
        patience = self.cfg.early_stopping
        return patience is not None and self.stale_epochs >= patience

    def _run_stage(self, index: int, stage: StageConfig) -> None:
        label = stage_label(stage, index)
        trainable = select_trainable(self.model, stage.train)
        apply_trainable(self.model, trainable)
        frozen_bn = frozen_batchnorms(self.model, trainable, stage.batchnorm)
        n_train = sum(p.numel() for n, p in self.model.named_parameters() if n in trainable)
        log.info("stage %d (%s): %d epochs, training %s (%s parameters)", index, label, stage.epochs,
                 stage.train, f"{n_train:,}")

        inputs = self._stage_inputs(stage, trainable)
        module = inputs.module
        if self.ema is not None:  # the EMA averages what this stage changes; frozen weights keep their EMA
            self.ema.track(self.model, stage_state_names(self.model, trainable, frozen_bn, runs=inputs.module))
        if self.dist.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        optimizer = make_optimizer(self.model, stage.optimizer)
        scheduler = make_scheduler(optimizer, stage.schedule, stage.epochs,
                                   updates_per_epoch(len(inputs.train_loader), self.cfg.accumulation))
        if self.resume_optimizer is not None:  # resuming inside this stage
            optimizer.load_state_dict(self.resume_optimizer)
            self.resume_optimizer = None
        # after loading the state, whose lr is that of the stage's old length when a resume grew its epochs
        scheduler.step_update(num_updates=self.updates_in_stage)
        train_module = torch.compile(module) if self.cfg.compile else module

        while self.epoch_in_stage < stage.epochs:
            epoch = self.epoch_in_stage
            global_epoch = sum(s.epochs for s in self.recipe.stages[:index]) + epoch
            inputs.set_epoch(global_epoch)
            where = f"stage {index} ({label}), epoch {epoch + 1}"
            set_train_mode(self.model, frozen_bn)
            with self.progress.epoch(f"{label} {epoch + 1}/{stage.epochs}", len(inputs.train_loader)) as progress:
                stats = train_one_epoch(
                    train_module, inputs.train_loader, optimizer, self.loss_fn, device=self.device,
                    amp_dtype=self.amp_dtype, scaler=self.scaler, accumulation=self.cfg.accumulation,
                    clip_grad=self.cfg.clip_grad, scheduler=scheduler, first_update=self.updates_in_stage,
                    ema=self.ema, channels_last=self.cfg.channels_last, where=where,
                    progress=progress, on_update=self.loggers.log_update,
                )
            self.updates_in_stage += stats.updates
            totals = ddp.all_reduce_sum([stats.loss * stats.samples, stats.accuracy * stats.samples,
                                         stats.samples, stats.skipped], self.dist, self.device)
            samples = max(totals[2], 1)
            if totals[3]:
                log.warning("%s: skipped %d unreadable image(s) (and survivors of batches they left at one)",
                            where, int(totals[3]))
            require_samples("train", int(totals[2]), int(totals[3]), where)
            val = self._validate(inputs)
            self.train_seconds += stats.seconds
            self.epoch_in_stage += 1
            row = {
                "stage": index, "epoch": global_epoch + 1,
                "lr": max(g["lr"] for g in optimizer.param_groups),
                "train_loss": totals[0] / samples, "train_acc": totals[1] / samples,
                "val_loss": val["loss"], "val_acc": val["accuracy"], "val_macro_f1": val["macro_f1"],
                "val_balanced_acc": val["balanced_accuracy"],
                "images_per_s": totals[2] / stats.seconds if stats.seconds else 0.0,
                "seconds": stats.seconds,
                "updates": stats.updates,  # not a metrics.csv column: the loggers' step count on resume
            }
            self.history.append(row)
            self.recall_history.append({"epoch": global_epoch + 1, **val["per_class_recall"]})
            value = _select_value(val, self.cfg.select)
            improved = is_better(value, self.best["value"] if self.best else None, self.cfg.select)
            if improved:
                self.best = {"epoch": global_epoch + 1, "stage": index, "metric": self.cfg.select,
                             "value": value, "val": _json_metrics(val)}
            if is_better(value, self.stage_best, self.cfg.select):
                self.stage_best, self.stale_epochs = value, 0
            else:
                self.stale_epochs += 1
            log.info(
                "%s: train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s%s",
                where, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"], row["val_macro_f1"],
                row["images_per_s"], " | best" if improved else "",
            )
            if self.is_main:
                if improved:
                    self._save_best(val)
                self._write_logs()
                self.loggers.log_epoch(row, val["per_class_recall"])
                self.save_checkpoint(optimizer)
            ddp.barrier(self.dist)
            if self._early_stopped(stage):
                log.info("%s: no improvement in %d epochs, stage stops early", where, self.stale_epochs)
                break

    def _stage_inputs(self, stage: StageConfig, trainable: set[str]) -> "StageInputs":
        """What the stage trains on: images through the whole model, or (head-only stages) cached
        backbone features through the head."""
        from finetune.training.feature_cache import cached_feature_inputs

        cached = cached_feature_inputs(self, stage, trainable)
        if cached is not None:
            return cached
        return StageInputs(
            module=self.model,
            train_loader=self._image_loader("train", train=True),
            val_loader=self._image_loader("val", train=False),
            eval_module=self._eval_model,
            datasets=[],
        )

    def items(self, split: str) -> list[tuple[Path, int]]:
        """``(image path, class index)`` of a split; with ``data.resize_cache`` the paths are pre-resized
        copies (made once, by one process per machine, then reused across epochs and runs)."""
        if split not in self._items:
            items = self.manifest.items(split)
            size = self.recipe.data.resize_cache
            if size:
                from finetune.data import resize_cache

                folder = Path(self.cfg.cache_dir).expanduser() / "images" if self.cfg.cache_dir else default_image_cache()
                # the processes of a machine share the work: each makes the copies of its slice
                local, shards = self.dist.local_rank, self.dist.local_world_size
                mine = resize_cache(items[local::shards], size=size, cache_dir=folder,
                                    workers=auto_workers("auto", shards))
                ddp.barrier(self.dist)
                # then every process reads the whole list (all copies exist: no decoding)
                items = mine if shards == 1 else resize_cache(items, size=size, cache_dir=folder)
            self._items[split] = items
        return self._items[split]

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _image_loader(self, split: str, *, train: bool) -> DataLoader:
        from finetune.data import BalancedSampler, ImageDataset, collate_skip

        items = self.items(split)
        dataset = ImageDataset(items, self.train_transform if train else self.eval_transform, seed=self.cfg.seed)
        if train and self.recipe.data.balance == "sampler":
            sampler = BalancedSampler(dataset.labels, seed=self.cfg.seed, num_replicas=self.dist.world_size,
                                      rank=self.dist.rank)
        elif train:
            sampler = DistributedSampler(dataset, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                         shuffle=True, seed=self.cfg.seed)
        else:
            sampler = ShardSampler(len(dataset), self.dist.rank, self.dist.world_size)
        batch_size = self.cfg.batch_size if train else (self.cfg.eval_batch_size or self.cfg.batch_size * 2)
        return make_loader(dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate_skip,
                           num_workers=self.recipe.data.num_workers, device=self.device,
                           world_size=self.dist.world_size, train=train)

    def _validate(self, inputs: "StageInputs") -> dict[str, Any]:
        from finetune.evaluation import classification_metrics

        where = f"stage {self.stage_index}, epoch {self.epoch_in_stage + 1}"
        labels, probs, skipped = predict(inputs.eval_module(), inputs.val_loader, device=self.device,
                                         amp_dtype=self.amp_dtype, channels_last=self.cfg.channels_last)
        parts = ddp.all_gather_objects((labels, probs, skipped), self.dist)
        skipped = sum(p[2] for p in parts)
        if skipped:
            log.warning("%s: validation skipped %d unreadable image(s)", where, skipped)
        require_samples("val", sum(len(p[0]) for p in parts), skipped, where)
        labels = np.concatenate([p[0] for p in parts])
        probs = np.concatenate([p[1] for p in parts if len(p[1])])
        return classification_metrics(labels, probs, class_names=self.classes)

    # ------------------------------------------------------------------------------------ checkpoints

    def _meta(self, metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "preprocessing": self.preprocessing,
            "metrics": metrics or {},
            "recipe": self.raw,
        }

    def _save_best(self, val: dict[str, Any]) -> None:
        save_checkpoint(self.run_dir / "checkpoints" / "best", self._eval_model(),
                        self._meta({"epoch": self.best["epoch"], **_json_metrics(val)}))

    def save_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        """Write ``checkpoints/last``: the model plus everything an exact resume needs."""
        state = {
            "stage_index": self.stage_index,
            "epoch_in_stage": self.epoch_in_stage,
            "updates_in_stage": self.updates_in_stage,
            "stale_epochs": self.stale_epochs,
            "stage_best": self.stage_best,
            "train_seconds": self.train_seconds,
            "best": json.dumps(self.best),
            "history": json.dumps(self.history),
            "recall_history": json.dumps(self.recall_history),
            "optimizer": optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "rng": rng_state(),
        }
        save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, self._meta(),
                        extra=lambda folder: (folder / STATE_FILE).write_bytes(_serialize(state)))

    def load_checkpoint(self, folder: Path) -> None:
        """Restore ``checkpoints/last``, refusing a recipe changed in what it trains (see
        :func:`~finetune.training.run_folder.check_resume_recipe`) and files that don't fit the model."""
        from finetune.checkpoint import META_FILE, describe_model, load_weights, read_meta
        from finetune.config import resolve_raw, resolved_dict

        meta = read_meta(folder)
        state = run_folder.read_state(folder / STATE_FILE)
        started = resolve_raw(meta.get("recipe"), source=f"the recipe {folder / META_FILE} recorded")
        for change in run_folder.check_resume_recipe(self.run_dir / "recipe.yaml", started,
                                                     resolved_dict(self.recipe), state["stage_index"]):
            log.info("resuming with %s", change)
        m = self.recipe.model
        load_weights(folder, self.model, describe_model(m.backbone, m.head, len(self.classes), m.backbone_kwargs),
                     self.device)
        self.stage_index = state["stage_index"]
        self.epoch_in_stage = state["epoch_in_stage"]
        self.updates_in_stage = state["updates_in_stage"]
        self.stale_epochs = state["stale_epochs"]
        self.stage_best = state.get("stage_best")
        self.train_seconds = state["train_seconds"]
        self.best = json.loads(state["best"])
        self.history = json.loads(state["history"])
        self.recall_history = json.loads(state["recall_history"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.updates = state.get("ema_updates", 0)
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.resume_optimizer = state["optimizer"]
        log.info("resuming %s at stage %d, epoch %d", self.run_dir, self.stage_index, self.epoch_in_stage + 1)

    # ---------------------------------------------------------------------------------------- outputs

    def _write_logs(self) -> None:
        write_csv_atomic(self.run_dir / "metrics.csv", METRIC_COLUMNS, self.history)
        write_csv_atomic(self.run_dir / "per_class_recall.csv", ["epoch", *self.classes], self.recall_history)
        plot_training_curves(self.history, self.run_dir / "training_curves.png")

    def _finish(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "name": self.recipe.name,
            "run_dir": str(self.run_dir),
            "best_epoch": self.best["epoch"] if self.best else None,
            "best_metric": {"name": self.cfg.select, "value": self.best["value"]} if self.best else None,
            "best_val": self.best["val"] if self.best else None,
            "train_seconds": round(self.train_seconds, 2),
            "epochs_run": len(self.history),
            "best_checkpoint": str(self.run_dir / "checkpoints" / "best"),
        }
        if self.best and self.recipe.output.evaluate_test and "test" in self.manifest.splits():
            self.items("test")  # on every rank: with data.resize_cache it is a collective (a barrier)
            if self.is_main:
                summary["test"] = self._evaluate_test()
        if self.is_main:
            write_json_atomic(self.run_dir / "summary.json", summary)
            self.loggers.log_end(self.run_dir, summary.get("test"))
            log.info(format_summary(summary))
        ddp.barrier(self.dist)
        return summary

    def _evaluate_test(self) -> dict[str, Any]:
        from finetune.checkpoint import load_checkpoint
        from finetune.evaluation import evaluate

        model, meta = load_checkpoint(self.run_dir / "checkpoints" / "best", map_location=self.device)
        metrics = evaluate(
            model, self.items("test"), class_names=meta["classes"], preprocessing=meta["preprocessing"],
            out_dir=self.run_dir / "eval", device=str(self.device), batch_size=self.cfg.eval_batch_size or 64,
            num_workers=self.recipe.data.num_workers, run_dir=self.run_dir, amp_dtype=self.amp_dtype,
        )
        return {k: metrics[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "top5_accuracy", "loss",
                                        "num_samples") if k in metrics}


    def cleanup(self) -> None:
        self.loggers.close()
        ddp.cleanup(getattr(self, "dist", ddp.DistInfo()))


# ------------------------------------------------------------------------------------------- helpers

class StageInputs:
    """What one stage trains and validates on. ``datasets`` get ``set_epoch`` every epoch."""

    def __init__(self, module: nn.Module, train_loader, val_loader, eval_module, datasets):
        self.module = module
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.eval_module = eval_module
        self.datasets = datasets

    def set_epoch(self, epoch: int) -> None:
        for obj in (self.train_loader.sampler, self.train_loader.dataset, *self.datasets):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of w takes samples r, r + w, r + 2w, …: every sample once across ranks, no padding."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def default_image_cache() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "images"


def make_loader(dataset, *, sampler, batch_size: int, collate_fn, num_workers, device: torch.device,
                world_size: int = 1, train: bool = False) -> DataLoader:
    workers = auto_workers(num_workers, world_size)
    # Workers persist across the epochs of a stage: the dataset keeps its epoch (which seeds the
    # augmentation) in shared memory, so set_epoch reaches them. The loader gets its own generator:
    # otherwise each new iterator draws its workers' base seed from the global RNG, and dropout in a
    # resumed run would see a different stream than in an uninterrupted one.
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0), drop_last=drop_last_for(sampler, batch_size, train),
    )


def drop_last_for(sampler, batch_size: int, train: bool) -> bool:
    """Training drops an incomplete last batch (a batch of one breaks BatchNorm in training mode)
    unless that would leave no batch at all; evaluation sees every sample."""
    return train and len(sampler) > batch_size


def make_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """timm's optimizer factory over the trainable parameters, with layer-wise lr decay when asked."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, layer_decay=cfg.layer_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, epochs: int, updates_per_epoch: int):
    """timm's scheduler factory, stepped per update (so warmup is smooth): cosine, step or constant."""
    from timm.scheduler import create_scheduler_v2

    name = {"cosine": "cosine", "step": "step", "constant": "step"}[cfg.name]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=name, num_epochs=epochs, decay_epochs=cfg.step_epochs,
        decay_rate=1.0 if cfg.name == "constant" else cfg.gamma, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=max(updates_per_epoch, 1),
    )
    return scheduler


def resolve_preprocessing(data_config: dict[str, Any], data) -> dict[str, Any]:
    """The backbone's timm data config with the recipe's overrides applied."""
    input_size = data.input_size if data.input_size is not None else data_config["input_size"]
    if isinstance(input_size, int):
        input_size = (3, input_size, input_size)
    elif len(input_size) == 2:
        input_size = (3, *input_size)
    return {
        "input_size": list(input_size),
        "mean": list(data.mean or data_config["mean"]),
        "std": list(data.std or data_config["std"]),
        "interpolation": data.interpolation or data_config.get("interpolation", "bicubic"),
        "crop_pct": data.crop_pct or data_config.get("crop_pct", 0.875),
        "crop_mode": data_config.get("crop_mode", "center"),
        "eval_transforms": data.eval_transforms,
    }


def stage_label(stage: StageConfig, index: int) -> str:
    return stage.name or f"stage{index}"


def is_better(value: float, best: Optional[float], metric: str) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing to beat); lower is better for loss."""
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _select_value(val: dict[str, Any], metric: str) -> float:
    return float(val[metric])


def _json_metrics(val: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in val.items() if isinstance(v, (int, float, str))}


def _serialize(state: dict[str, Any]) -> bytes:
    """``torch.save`` into memory: the file is then written by Python, so a full disk raises OSError (which
    the checkpoint writer reports in one line) rather than torch's RuntimeError."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
