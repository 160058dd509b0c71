"""The recipe runner: recipe → builders (``run_folder``, ``loaders``, ``optim``, ``feature_cache``) → stages
(``loop``, ``best_epoch``) → checkpoints (``state``) → report (``reporting``, ``loggers``). A run folder holds
``recipe.yaml`` (resolved), ``manifest.csv``, ``bad_files.csv``, ``metrics.csv``, ``per_class_recall.csv``,
``training_curves.png``, ``checkpoints/{last,best}``, ``summary.json`` and ``eval/`` (the best checkpoint on
the test split). Only rank 0 writes."""
from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from torch import nn

from finetune._device import resolve_precision
from finetune.models.checkpoint import WeightsWriter, describe_model, load_weights, save_checkpoint, write_json_atomic
from finetune.config import Recipe, StageConfig, resolved_dict
from finetune.data import preprocessing_transform
from finetune.errors import FinetuneError
from finetune.models import FinetuneModel, create_model
from finetune import _distributed as ddp
from finetune.training import best_epoch, run_folder
from finetune.training.ema import Ema, stage_state_names
from finetune.models.params import is_head_only
from finetune.models.params import freeze_stage, set_train_mode
from finetune.training.loggers import RunLogger, create_run_logger
from finetune._workers import auto_workers
from finetune.features.cache import stage_features
from finetune.training.loaders import (StageInputs, as_plain, feature_key_parts, image_loader, run_manifest, split_dataset,
                                      stage_inputs, train_pipeline, uses_feature_cache)
from finetune.training import auto_batch
from finetune.training.mixing import stage_mixer
from finetune.training.loop import make_grad_scaler, reduce_epoch, train_one_epoch, updates_per_epoch, validate
from finetune.training.optim import make_loss, stage_optimizer
from finetune.training.reporting import (Progress, calibrate_best, epoch_row, evaluate_test, finish_multilabel,
                                         format_summary, log_epoch, run_summary, setup_logging, write_logs)
from finetune.training.state import RunState, load_state_dict, seed_everything, serialize, state_dict

log = logging.getLogger("finetune")


def run_training(recipe: Recipe, resolved: dict[str, Any], *, run_dir: str | Path, resume: bool = False,
                 quiet: bool = False) -> dict[str, Any]:
    """Train ``recipe`` (``resolved``: the recipe as a dict, saved with the run) into ``run_dir``, or resume it."""
    runner = Runner(recipe, resolved, run_dir=Path(run_dir), resume=resume, quiet=quiet)
    try:
        runner.setup()
        return runner.train()
    finally:
        runner.cleanup()


class Runner:
    """One training run. The protocol: :meth:`setup`, :meth:`train`, :meth:`save_checkpoint`,
    :meth:`load_checkpoint`, :meth:`cleanup`."""

    def __init__(self, recipe: Recipe, resolved: dict[str, Any], *, run_dir: Path, resume: bool, quiet: bool):
        self.recipe, self.resolved, self.run_dir, self.resume, self.quiet = recipe, resolved, run_dir, resume, quiet
        self.cfg = recipe.training
        self.state, self.resume_optimizer = RunState(), None  # restored by load_checkpoint
        self._items: dict[str, list[tuple[Path, int]]] = {}
        self._datasets: dict[tuple[str, bool], Any] = {}
        # the current stage's training batch (training.batch_size, or what auto resolved to: stage_inputs)
        self.train_batch = self.cfg.batch_size if self.cfg.batch_size != "auto" else auto_batch.DEFAULT_BATCH
        self._created: Optional[list[Path]] = None  # folders a fresh run's setup created (rank 0)
        self.loggers = RunLogger([])  # experiment tracking (training.loggers), opened by train()

    def setup(self) -> None:
        """Build everything a run needs. A fresh run's setup leaves nothing behind if it fails."""
        try:
            self._setup()
        except BaseException:
            if self._created is not None:
                run_folder.discard_setup(self.run_dir, self._created)
            raise

    def _setup(self) -> None:
        cfg, data, m = self.cfg, self.recipe.data, self.recipe.model
        self.dist, self.device = ddp.join(cfg.device, timedelta(minutes=cfg.ddp_timeout), cfg.deterministic)
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.is_main = self.dist.is_main
        setup_logging(self.is_main)
        self._created = run_folder.prepare(self.run_dir, resume=self.resume, data_root=data.root, dist=self.dist)
        seed_everything(cfg.seed)  # on every rank alike
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # a fresh run stages its setup files until setup succeeds
        setup_dir = self.run_dir if self.resume else self.run_dir / run_folder.SETUP_DIR
        self.manifest = run_manifest(setup_dir / "manifest.csv", data, is_main=self.is_main, dist=self.dist,
                                     run_dir=self.run_dir)
        self.classes = list(self.manifest.classes)
        # multi-label data (a labels CSV) trains with BCE/ASL, validates by mAP, and tunes thresholds at the end
        self.task = getattr(self.manifest, "task", "single")
        if data.task != "auto" and data.task != self.task:
            raise FinetuneError(f"data.task: {data.task}, but {data.manifest or data.root} is "
                                + ("a labels CSV (multi-label data)" if self.task == "multilabel" else
                                   "single-label data (a class per image); multi-label data is a labels CSV "
                                   "(path,labels)"))
        self.select = cfg.select
        if self.task == "multilabel":
            if data.balance == "sampler":
                raise FinetuneError("data.balance: sampler balances classes of single-label data; for multi-label "
                                    "data use balance: loss (positive weights per label) or none")
            if "select" not in cfg.model_fields_set:
                self.select = "map"
        self.model: FinetuneModel = create_model(
            m.backbone, len(self.classes), head=m.head, pretrained=False if self.resume else m.pretrained,
            **m.backbone_kwargs,
        ).to(self.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        self.preprocessing = self.recipe.preprocessing  # resolved once, when the recipe was validated
        self.train_transform = train_pipeline(self.preprocessing, data)
        self.eval_transform = preprocessing_transform(self.preprocessing, device_normalize=True)
        self.ema = Ema(self.model, cfg.ema, cfg.ema_warmup) if cfg.ema is not None else None
        self.loss_fn = self._make_loss()
        self.scaler = make_grad_scaler(self.device, self.amp_dtype)
        self.weights = WeightsWriter() if self.is_main else None
        if self.resume:
            self.load_checkpoint(self.run_dir / "checkpoints" / "last")
        elif self.is_main:
            run_folder.commit_setup(self.run_dir, yaml.safe_dump(self.resolved, sort_keys=False))
        ddp.barrier(self.dist)
        log.info("%s: %s + %s head, %d classes, %d train / %d val images, device %s, precision %s",
                 self.recipe.name, m.backbone, self.model.head_config["name"], len(self.classes),
                 len(self.items("train")), len(self.items("val")), self.device,
                 {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype])

    def _make_loss(self) -> nn.Module:
        balance = self.recipe.data.balance == "loss"
        return make_loss(label_smoothing=self.cfg.label_smoothing,
                         class_weights=self.recipe.data.class_weights if balance else None,
                         labels=[label for _, label in self.items("train")] if balance else (),
                         num_classes=len(self.classes) if balance else 0, device=getattr(self, "device", None),
                         task=getattr(self, "task", "single"), loss=self.cfg.loss)

    def items(self, split: str) -> list[tuple[Path, int]]:
        """``(image path, class index)`` of a split."""
        if split not in self._items:
            self._items[split] = self.manifest.items(split)
        return self._items[split]

    def dataset(self, split: str, *, train: bool):
        """A split through the train or eval pipeline, read from the pixel store where ``data.store`` allows
        (:func:`~finetune.training.loaders.split_dataset`; a collective the first time: call on every rank)."""
        if (split, train) not in self._datasets:
            data = self.recipe.data
            self._datasets[split, train] = split_dataset(
                self.items(split), self.train_transform if train else self.eval_transform, store=data.store,
                budget=data.store_budget, cache_dir=self.cfg.cache_dir, seed=self.cfg.seed, dist=self.dist)
        return self._datasets[split, train]

    def train(self) -> dict[str, Any]:
        stages, s = self.recipe.stages, self.state
        self.loggers = create_run_logger(self.cfg.loggers, self.run_dir, enabled=self.is_main, classes=self.classes,
                                         experiment=self.recipe.name, first_step=s.updates, params=self.recipe)
        self.progress = Progress(self.is_main and not self.quiet and sys.stderr.isatty(),
                                 total_epochs=sum(st.epochs for st in stages), done_epochs=len(s.history))
        for index in range(s.stage_index, len(stages)):
            stage = stages[index]
            if stage.epochs == 0:
                log.info("stage %d (%s): 0 epochs, skipped", index, stage.name or f"stage{index}")
                continue
            if index != s.stage_index:  # entering a new stage: fresh optimizer, warmup, patience
                s.enter_stage(index)
                self.resume_optimizer = None  # a resumed optimizer state belongs to the stage it came from only
            if s.epoch_in_stage < stage.epochs and not best_epoch.early_stopped(s, self.cfg.early_stopping):
                self._run_stage(index, stage)
        self.progress.close()
        return self._finish()

    def _run_stage(self, index: int, stage: StageConfig) -> None:
        cfg, s, label = self.cfg, self.state, stage.name or f"stage{index}"
        trainable, frozen_bn = freeze_stage(self.model, stage.train, stage.batchnorm)
        log.info("stage %d (%s): %d epochs, training %s (%s parameters)", index, label, stage.epochs, stage.train,
                 f"{sum(p.numel() for n, p in self.model.named_parameters() if n in trainable):,}")
        inputs = self.stage_inputs(stage, is_head_only(trainable), self._image_loader)
        if self.ema is not None:  # the EMA averages what this stage changes; frozen weights keep their EMA
            self.ema.track(self.model, stage_state_names(self.model, trainable, frozen_bn, runs=inputs.module))
        module = ddp.wrap(inputs.module, self.dist, self.device)
        optimizer, scheduler = stage_optimizer(
            self.model, stage, updates_per_epoch=updates_per_epoch(len(inputs.train_loader), cfg.accumulation),
            first_update=s.updates_in_stage, resume_state=self.resume_optimizer)
        train_module = torch.compile(module) if cfg.compile else module

        while s.epoch_in_stage < stage.epochs:
            epoch = sum(st.epochs for st in self.recipe.stages[:index]) + s.epoch_in_stage  # of the run
            inputs.set_epoch(epoch)
            where = f"stage {index} ({label}), epoch {s.epoch_in_stage + 1}"
            set_train_mode(self.model, frozen_bn)
            with self.progress.epoch(f"{label} {s.epoch_in_stage + 1}/{stage.epochs}", len(inputs.train_loader)) as bar:
                stats = train_one_epoch(
                    train_module, inputs.train_loader, optimizer, self.loss_fn, device=self.device,
                    amp_dtype=self.amp_dtype, scaler=self.scaler, accumulation=cfg.accumulation,
                    clip_grad=cfg.clip_grad, scheduler=scheduler, first_update=s.updates_in_stage, ema=self.ema,
                    channels_last=cfg.channels_last, where=where, progress=bar,
                    on_update=self.loggers.log_update, mix=inputs.mix)
            s.updates_in_stage += stats.updates
            totals = reduce_epoch(stats, self.dist, self.device, where)
            val = self._validate(inputs)
            s.train_seconds += stats.seconds
            s.epoch_in_stage += 1
            row = epoch_row(stage=index, epoch=epoch + 1, lr=max(g["lr"] for g in optimizer.param_groups),
                            totals=totals, seconds=stats.seconds, val=val, updates=stats.updates)
            s.history.append(row)
            s.recall_history.append({"epoch": epoch + 1, **val["per_class_recall"]})
            improved = best_epoch.record(s, val, self.select, epoch=epoch + 1, stage=index)
            log_epoch(where, row, improved)
            if self.is_main:
                if improved:
                    save_checkpoint(self.run_dir / "checkpoints" / "best", self._eval_model(),
                                    self._meta({"epoch": s.best["epoch"], **s.best["val"]}), writer=self.weights)
                write_logs(self.run_dir, self.classes, s.history, s.recall_history)
                self.loggers.log_epoch(row, val["per_class_recall"])
                self.save_checkpoint(optimizer)
            ddp.barrier(self.dist)
            if best_epoch.early_stopped(s, cfg.early_stopping):
                log.info("%s: no improvement in %d epochs, stage stops early", where, s.stale_epochs)
                break

    def stage_inputs(self, stage, head_only: bool, loader: Callable[..., Any],
                     eval_model: Optional[nn.Module] = None) -> StageInputs:
        """What ``stage`` trains on (:func:`~finetune.training.loaders.stage_inputs`): cached features for a
        head-only stage whose cache fits, else images from ``loader(split, train=...)``; ``eval_model``
        validates (default: the EMA, or the model)."""
        cfg, data = self.cfg, self.recipe.data
        cached = None
        if uses_feature_cache(stage.feature_cache, head_only, stage.mixup):
            # the datasets first, on every rank (opening the pixel store is a collective)
            datasets = {"train": self.dataset("train", train=stage.feature_cache_views > 0),
                        "val": self.dataset("val", train=False)}
            cached = stage_features(
                self.model.backbone, {"train": self.items("train"), "val": self.items("val")},
                datasets=datasets,
                views=stage.feature_cache_views,
                key_parts=feature_key_parts(self.model, self.preprocessing, data.train_transforms, as_plain(data.augment),
                                            data.store),
                cache_dir=cfg.cache_dir, max_bytes=int(cfg.cache_max_gb * 1024**3),
                num_features=self.model.num_features, dist=self.dist, device=self.device, amp_dtype=self.amp_dtype,
                seed=cfg.seed, batch_size=cfg.eval_batch_size,
                num_workers=auto_workers(data.num_workers, self.dist.local_world_size), channels_last=cfg.channels_last)
        mix = stage_mixer(as_plain(stage.mixup), as_plain(cfg.mixup), input_size=self.preprocessing["input_size"],
                          num_classes=len(self.classes), multilabel=self.task == "multilabel")
        self.train_batch = self._train_batch(cached is not None)
        return stage_inputs(self.model, eval_model or self._eval_model(), cached=cached, image_loader=loader, mix=mix,
                            batch_size=self.train_batch, eval_batch_size=cfg.eval_batch_size, seed=cfg.seed,
                            dist=self.dist)

    def _train_batch(self, cached: bool) -> int:
        """The current stage's training batch: ``training.batch_size``, or for ``auto`` the one recorded in the run
        folder (a resumed run), else the one :mod:`~finetune.training.auto_batch` finds (rank 0 searches; every
        rank takes its result), recorded."""
        cfg, index = self.cfg, self.state.stage_index
        if cfg.batch_size != "auto":
            return cfg.batch_size
        recorded = auto_batch.recorded_batches(self.run_dir)
        if index in recorded:
            return recorded[index]
        if self.device.type != "cuda":
            batch, how = auto_batch.DEFAULT_BATCH, "the default on the CPU"
        else:
            batch = self._search_batch(cached) if self.is_main else None
            how = (f"the largest that fits {cfg.auto_batch_fraction:.0%} of the GPU's memory "
                   f"({'cached features' if cached else 'images'}; the learning rate is not scaled with it)")
        batch = ddp.broadcast_object(batch, self.dist)
        if self.is_main:
            auto_batch.record_batch(self.run_dir, index, batch)
        log.info("stage %d: batch_size auto -> %d, %s", index, batch, how)
        return batch

    def _search_batch(self, cached: bool) -> int:
        module = self.model.head if cached else self.model
        shape = (self.model.num_features,) if cached else tuple(self.preprocessing["input_size"])
        maximum = min(self.cfg.auto_batch_max, max(1, len(self.items("train")) // self.dist.world_size))
        return auto_batch.find_batch(module, shape, channels_last=self.cfg.channels_last and not cached,
                                     fraction=self.cfg.auto_batch_fraction, device=self.device, amp_dtype=self.amp_dtype,
                                     maximum=maximum)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _image_loader(self, split: str, *, train: bool):
        cfg = self.cfg
        return image_loader(self.dataset(split, train=train), train=train,
                            balance=self.recipe.data.balance == "sampler", seed=cfg.seed,
                            batch_size=self.train_batch if train else cfg.eval_batch_size,
                            num_workers=self.recipe.data.num_workers, dist=self.dist, device=self.device)

    def _validate(self, inputs: StageInputs) -> dict[str, Any]:
        where = f"stage {self.state.stage_index}, epoch {self.state.epoch_in_stage + 1}"
        return validate(inputs.eval_module, inputs.val_loader, device=self.device, amp_dtype=self.amp_dtype,
                        channels_last=self.cfg.channels_last, class_names=self.classes, dist=self.dist, where=where,
                        task=self.task)

    def _meta(self, metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        return {"classes": self.classes, "preprocessing": self.preprocessing, "metrics": metrics or {},
                "recipe": self.resolved, **({"task": "multilabel"} if self.task == "multilabel" else {})}

    def save_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        """Write ``checkpoints/last``: the model plus everything an exact resume needs."""
        data = serialize(state_dict(self.state, optimizer, self.scaler, self.ema, self.model))
        save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, self._meta(), writer=self.weights,
                        extra=lambda folder: (folder / run_folder.STATE_FILE).write_bytes(data))

    def load_checkpoint(self, folder: Path) -> None:
        """Restore ``checkpoints/last``, refusing a recipe changed in what it trains (see
        :func:`~finetune.training.run_folder.check_resume_recipe`) and files that don't fit the model."""
        saved = run_folder.read_last(folder, self.run_dir, resolved_dict(self.recipe))
        m = self.recipe.model
        load_weights(folder, self.model, describe_model(m.backbone, m.head, len(self.classes), m.backbone_kwargs),
                     self.device)
        self.state, self.resume_optimizer = load_state_dict(saved, self.scaler, self.ema, self.model)
        log.info("resuming %s at stage %d, epoch %d", self.run_dir, self.state.stage_index,
                 self.state.epoch_in_stage + 1)

    def _finish(self) -> dict[str, Any]:
        best, run_dir, ev = self.state.best, self.run_dir, self.recipe.evaluation
        summary = run_summary(name=self.recipe.name, run_dir=run_dir, select=self.select, best=best,
                              train_seconds=self.state.train_seconds, epochs_run=len(self.state.history))
        run = dict(device=self.device, batch_size=self.cfg.eval_batch_size, amp_dtype=self.amp_dtype,
                   num_workers=self.recipe.data.num_workers)
        if self.task == "multilabel":
            if best and self.is_main:
                test = self.items("test") if self.recipe.output.evaluate_test and "test" in self.manifest.splits() else []
                summary.update(finish_multilabel(run_dir, self.items("val"), test, calibrate=ev.calibrate, **run))
        elif best and self.is_main and ev.calibrate:  # on the val split, before the test evaluation, which uses it
            summary["calibration"] = calibrate_best(run_dir, self.items("val"), **run)
        if (self.task != "multilabel" and best and self.recipe.output.evaluate_test and "test" in self.manifest.splits()
                and self.items("test")):
            if self.is_main:
                summary["test"] = evaluate_test(run_dir, self.items("test"), tta=ev.tta, **run)
        if self.is_main:
            write_json_atomic(run_dir / "summary.json", summary)
            self.loggers.log_end(run_dir, summary.get("test"))
            log.info(format_summary(summary))
        ddp.barrier(self.dist)
        return summary

    def cleanup(self) -> None:
        self.loggers.close()
        ddp.cleanup(getattr(self, "dist", ddp.DistInfo()))
