"""The recipe schema: typed sections validated once, at the edge (`finetune.config.loading` reads and
validates a recipe file; `finetune.config.checks` checks it against the model and the machine).

A recipe is a YAML file with sections ``data``, ``model``, ``optimizer``, ``schedule``, ``stages``,
``training`` and ``output``. Every error names the key path and nothing is written. Below the config
package, functions take plain arguments.

The top-level ``optimizer`` and ``schedule`` are defaults that each stage's own ``optimizer`` /
``schedule`` keys override field by field.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator, model_validator

from finetune.models.factory import check_backbone_kwargs

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Metric = Literal["accuracy", "macro_f1", "balanced_accuracy", "loss", "map"]
Logger = Literal["csv", "tensorboard", "mlflow"]
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
"""Logger → the package it needs (the optional extra of the same name installs it)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _section_or(section: type, value: Any) -> Any:
    """A field holding either a ``section`` (a mapping) or a ``value`` (such as ``Literal["auto"]``), validated as
    the one its input looks like, so an error names the key rather than every branch of the union."""
    def pick(raw: Any) -> str:
        return "<section>" if isinstance(raw, (dict, BaseModel)) else "<value>"

    return Annotated[Union[Annotated[section, Tag("<section>")], Annotated[value, Tag("<value>")]], Discriminator(pick)]


class RandomErasingConfig(_Section):
    p: float = Field(0.25, gt=0, le=1)  # probability an image gets an erased rectangle
    scale: tuple[float, float] = (0.02, 0.33)  # its area, as a fraction of the image's
    ratio: tuple[float, float] = (0.3, 3.3)  # its aspect ratio (width / height)
    fill: Union[Literal["random", "random_uniform"], float] = "random"  # per-pixel noise, one colour, or a value

    @model_validator(mode="after")
    def _ranges(self):
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {list(self.ratio)}")
        return self


AUGMENT_FIELDS = {"none": set(), "randaugment": {"magnitude", "num_ops", "magnitude_std"},
                  "trivialaugment": {"magnitude"}, "autoaugment": {"policy", "magnitude_std"}}
"""The options each ``data.augment.preset`` uses (``random_erasing`` goes with any)."""


class AugmentConfig(_Section):
    # a timm policy on the train images (finetune/data/transforms.py: augment_ops)
    preset: Literal["none", "randaugment", "trivialaugment", "autoaugment"] = "none"
    magnitude: int = Field(9, ge=0, le=10)  # randaugment: each op's; trivialaugment: the top of its uniform draw
    num_ops: int = Field(2, ge=1, le=10)  # randaugment: ops per image
    magnitude_std: float = Field(0.5, ge=0)  # randaugment, autoaugment: Gaussian noise on the magnitude
    policy: Literal["v0", "v0r", "original", "originalr"] = "v0"  # autoaugment: timm's ImageNet policy
    random_erasing: Optional[RandomErasingConfig] = None  # albumentations' Erasing, after the policy

    @model_validator(mode="after")
    def _options_of_preset(self):
        unused = sorted(self.model_fields_set - AUGMENT_FIELDS[self.preset] - {"preset", "random_erasing"})
        if unused:
            used = ", ".join(sorted(AUGMENT_FIELDS[self.preset])) or "none"
            raise ValueError(f"preset {self.preset} takes no {', '.join(unused)} (its options: {used})")
        return self


class MixupConfig(_Section):
    # timm's Mixup: each batch (with probability prob) is mixed by Mixup or, with probability switch_prob
    # when both alphas are set, by CutMix; targets become soft labels (finetune/training/mixing.py)
    mixup_alpha: float = Field(0.8, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    prob: float = Field(1.0, ge=0, le=1)
    switch_prob: float = Field(0.5, ge=0, le=1)
    mode: Literal["batch", "pair", "elem"] = "batch"  # one mixing factor per batch, per pair or per sample

    @model_validator(mode="after")
    def _something_mixes(self):
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError("needs mixup_alpha or cutmix_alpha above 0 (turn mixing off with mixup: null, "
                             "or false in a stage)")
        return self


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value: Union[int, str]) -> int:
    """A size as bytes: an int, or a number with a unit (``500MB``, ``20GB``, ``1.5GiB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size must be 0 or more bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"a size is bytes or a number with a unit (500MB, 20GB, 1.5GiB), got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


class DataConfig(_Section):
    # single-label (a class per image) or multi-label (a labels CSV); auto: as the data is. Set, it is checked
    task: Literal["auto", "single", "multilabel"] = "auto"
    root: Optional[str] = None  # an image folder (pre-split or one folder to split), or a manifest CSV
    # A split manifest CSV instead of splitting root; its paths are relative to root, or without root to the
    # CSV's own folder (where `finetune data split ROOT --out ROOT/split.csv` puts it).
    manifest: Optional[str] = None
    card: Optional[str] = None  # a dataset card in datasets/ giving the split protocol
    sample: Optional[Literal["digits"]] = None  # build this bundled sample at root when missing
    val: Optional[float] = Field(None, ge=0, lt=1)
    test: Optional[float] = Field(None, ge=0, lt=1)
    train_per_class: Optional[int] = Field(None, ge=1)
    exclude: list[str] = Field(default_factory=list)
    seed: int = 0  # the split seed
    input_size: Optional[Union[int, tuple[int, int]]] = None  # default: the backbone's
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    interpolation: Optional[Literal["nearest", "bilinear", "bicubic", "area", "lanczos"]] = None
    crop_pct: Optional[float] = Field(None, gt=0, le=1)
    train_transforms: Optional[list[dict[str, Any]]] = None  # albumentations specs; None: timm-like default
    eval_transforms: Optional[list[dict[str, Any]]] = None
    # augmentation preset after train_transforms in stages that see images; auto: by input size (size_defaults)
    augment: Optional[_section_or(AugmentConfig, Literal["auto"])] = None
    balance: Literal["none", "sampler", "loss"] = "none"
    class_weights: Literal["inverse", "effective"] = "inverse"  # formula when balance: loss
    num_workers: Union[int, Literal["auto"]] = "auto"
    # The decoded-pixel store (finetune.data.store): each image decoded once and resized to what the
    # pipeline's first op needs, read as raw pixels by every epoch, stage, run and rank. auto: where the
    # first op allows (a deterministic resize is applied exactly; RandomResizedCrop keeps 1.25x the crop);
    # N: every image's shorter side shrunk to N px; off: decode the files every epoch.
    store: Union[int, str] = "auto"
    # most bytes of raw pixels the store may hold (e.g. 20GB); beyond it, or beyond half the free disk,
    # each image is stored as JPEG q95 4:4:4 instead
    store_budget: Optional[Union[int, str]] = None
    resize_cache: Optional[int] = Field(None, ge=8)  # deprecated: data.store: N

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, store):
        if store is False:  # YAML reads a bare `off` as false
            return "off"
        if isinstance(store, str) and store.strip().isdigit():
            store = int(store)
        if store in ("auto", "off") or (isinstance(store, int) and not isinstance(store, bool) and store >= 8):
            return store
        raise ValueError(f"must be auto, off, or a shorter side of at least 8 px (got {store!r})")

    @field_validator("store_budget")
    @classmethod
    def _budget(cls, budget):
        return None if budget is None else parse_bytes(budget)

    @model_validator(mode="after")
    def _resize_cache(self):
        if self.resize_cache is not None:
            warnings.warn("data.resize_cache is deprecated: it is data.store: N (the decoded-pixel store) now",
                          DeprecationWarning, stacklevel=2)
            self.store = self.resize_cache
        return self

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, workers):
        if workers != "auto" and workers < 0:
            raise ValueError("must be 0 or more (0: decode in the main process), or auto")
        return workers

    @model_validator(mode="after")
    def _source(self):
        if not (self.root or self.manifest or self.card):
            raise ValueError("give data.root, data.manifest or data.card")
        return self


class ModelConfig(_Section):
    backbone: str
    pretrained: Union[bool, str] = False  # true (timm hub), "offline", or a weights file
    head: Union[str, dict[str, Any]] = "spinal"
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backbone_kwargs")
    @classmethod
    def _drop_rates(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        check_backbone_kwargs(kwargs)  # the rule checkpoints are loaded with too
        return kwargs


class OptimizerConfig(_Section):
    name: str = "adamw"  # any timm optimizer (timm.optim.list_optimizers())
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    layer_decay: Optional[float] = Field(None, gt=0, le=1)  # layer-wise lr decay from the head down

    @field_validator("name")
    @classmethod
    def _lower(cls, name: str) -> str:
        return name.lower()  # whether timm knows it: check_against_model (importing timm takes seconds)


class ScheduleConfig(_Section):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(0.0, ge=0)
    step_epochs: int = Field(7, ge=1)  # step: decay every N epochs (the seed's StepLR 7 / 0.1)
    gamma: float = Field(0.1, gt=0, le=1)


class StageConfig(_Section):
    name: Optional[str] = None
    epochs: int = Field(ge=0)
    # what trains: "head", "last:N" (head + last N backbone stages), "all", or regexes over parameter names
    train: Union[str, list[str]] = "all"
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    # The backbone's BatchNorm mode while training. auto: layers in frozen parts stay in eval mode (their
    # running statistics don't drift), layers in trained parts train. eval: every backbone BatchNorm keeps
    # its pretrained statistics (often better on small datasets far from ImageNet; the no-recipe defaults
    # and the shipped staged recipes use it once the backbone trains). train: every one trains. The head's
    # normalisation is new and always trains.
    batchnorm: Literal["auto", "eval", "train"] = "auto"
    feature_cache: Union[bool, Literal["auto"]] = "auto"  # head-only stages train from cached features
    # augmented views cached per image (0: the eval transform, no augmentation). A head trained on un-augmented
    # features meets augmented ones when the next stage unfreezes the backbone: staged recipes cache 1 or more.
    feature_cache_views: int = Field(0, ge=0)
    # Mixup/CutMix of this stage, replacing training.mixup (null: that one; false: none). A stage that sets
    # its own trains on images even when head-only (mixing images is not mixing cached features).
    mixup: Optional[_section_or(MixupConfig, Literal[False])] = None

    @field_validator("train")
    @classmethod
    def _selection(cls, train):
        items = [train] if isinstance(train, str) else train
        if not items:
            raise ValueError("train must select something: head, last:N, all or regexes")
        for item in items:
            if item.startswith("last:") and not re.fullmatch(r"last:\d+", item):
                raise ValueError(f"'{item}' must be last:N with N a whole number")
            if item not in ("head", "all") and not item.startswith("last:"):
                try:
                    re.compile(item)
                except re.error as e:
                    raise ValueError(f"'{item}' is not a valid regex: {e}") from None
        return train


class TrainingConfig(_Section):
    # "auto": per stage, the largest batch that fits auto_batch_fraction of the GPU's memory (training/auto_batch.py);
    # 32 on the CPU
    batch_size: Union[int, Literal["auto"]] = 32
    auto_batch_fraction: float = Field(0.85, gt=0, le=1)
    auto_batch_max: int = Field(1024, ge=1)  # the largest batch auto may choose
    # default: 2 × batch_size (validation, test, features); 64 with batch_size auto
    eval_batch_size: Optional[int] = Field(None, ge=1)
    # micro-batches per optimizer update; a last partial window of an epoch also updates (with the mean
    # gradient of its micro-batches). Schedules are sized and stepped in updates.
    accumulation: int = Field(1, ge=1)
    clip_grad: Optional[float] = Field(None, gt=0)  # max gradient norm
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # auto: cross-entropy for single-label data, BCE for multi-label (a labels CSV); bce or asl (asymmetric
    # loss) for multi-label only
    loss: Literal["auto", "ce", "bce", "asl"] = "auto"
    # Mixup/CutMix of the stages that train on images (cached head stages see no images and don't mix);
    # auto: by input size (finetune.data.transforms.size_defaults)
    mixup: Optional[_section_or(MixupConfig, Literal["auto"])] = None
    # EMA decay; evaluate and select on the EMA weights. One EMA for the run: it carries across stages
    # (one update count; its first update copies the model) and each update averages only what the stage
    # trains (frozen weights keep their EMA; a head-only stage moves only the head's).
    ema: Optional[float] = Field(None, gt=0, lt=1)
    # ramp the decay up with the updates, as timm's ModelEmaV3(use_warmup=True): 1 - (1 + n)^(-2/3) after n
    # updates, capped at `ema` (0.9 after 30 updates, 0.99 after 1,000): the average never holds on to the
    # first, random-head updates of a short run or a small data set
    ema_warmup: bool = False
    # patience in epochs, within a stage: a stage stops after this many epochs without beating its own
    # best (not the run's, which unfreezing often starts below); checkpoints/best stays the run's best.
    early_stopping: Optional[int] = Field(None, ge=1)
    select: Metric = "accuracy"  # validation metric that picks the best checkpoint
    precision: Precision = "auto"
    channels_last: bool = False
    compile: bool = False
    # on CUDA a run also turns on cuDNN's autotuner and TF32 for fp32 matmuls/convolutions
    # (finetune/training/cuda.py); deterministic keeps the autotuner off
    device: str = "auto"
    seed: int = 0
    deterministic: bool = False
    cache_dir: Optional[str] = None  # feature cache; default ~/.cache/finetune (or $FINETUNE_CACHE)
    cache_max_gb: float = Field(10.0, gt=0)
    # torchrun: minutes a rank waits for the others at a collective before the run fails instead of
    # hanging; must cover the longest work one process does alone (rank 0 writing checkpoints, the test
    # report). NCCL's own default is 10.
    ddp_timeout: float = Field(60.0, gt=0)
    # where metrics also go: csv (the run folder's metrics.csv and plots) is always written; tensorboard
    # (RUN_DIR/tensorboard) and mlflow ($MLFLOW_TRACKING_URI, else RUN_DIR/mlruns) are optional extras
    loggers: list[Logger] = Field(default_factory=lambda: ["csv"])

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value):
        # one message for both forms (a union would report one error per member)
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("Input should be a whole number (an integer of 1 or more) or 'auto'")
        if value < 1:
            raise ValueError("Input should be an integer of 1 or more, or 'auto'")
        return value

    @model_validator(mode="after")
    def _eval_batch_size(self):
        # resolved once, here: every evaluation of a run (validation, test, feature extraction) takes it
        if self.eval_batch_size is None:
            self.eval_batch_size = 2 * (32 if self.batch_size == "auto" else self.batch_size)
        return self

    @model_validator(mode="after")
    def _ema_warmup_needs_ema(self):
        if self.ema_warmup and self.ema is None:
            raise ValueError("ema_warmup needs ema, the decay it ramps up to (e.g. training.ema: 0.999)")
        return self

    @field_validator("loggers")
    @classmethod
    def _loggers_installed(cls, loggers: list[str]) -> list[str]:
        for name in loggers:
            if not _installed(LOGGER_PACKAGES.get(name)):
                raise ValueError(f'{name} needs the {LOGGER_PACKAGES[name]} package: pip install -e ".[{name}]"')
        return list(dict.fromkeys(["csv", *loggers]))

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'")
        return device


class OutputConfig(_Section):
    dir: str = "runs/{name}"  # {name} is the recipe's name
    evaluate_test: bool = True  # evaluate the best checkpoint on the test split at the end

    @field_validator("dir")
    @classmethod
    def _placeholders(cls, folder: str) -> str:
        try:
            folder.format(name="run")
        except KeyError as e:
            raise ValueError(f"may use only {{name}}: unknown placeholder {e}") from None
        except (IndexError, ValueError, AttributeError) as e:
            raise ValueError(f"may use only {{name}}: {e}") from None
        return folder


class EvaluationConfig(_Section):
    # test-time augmentation of the end-of-training test evaluation, reported beside the plain metrics:
    # hflip (2 views), crops (the image and its 4 corner crops) or hflip+crops (10 views)
    tta: Optional[Literal["hflip", "crops", "hflip+crops"]] = None
    calibrate: bool = True  # fit a temperature on the val split at the end of training, stored in the checkpoint


class Recipe(_Section):
    name: str = "run"
    data: DataConfig
    model: ModelConfig
    stages: list[StageConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    _preprocessing: Optional[dict] = PrivateAttr(None)

    @property
    def preprocessing(self) -> dict:
        """The run's preprocessing (input size ``[3, H, W]``, mean, std, interpolation, crop, eval ops),
        resolved against the backbone when the recipe is validated (`finetune.config.parse_recipe`)."""
        if self._preprocessing is None:
            raise RuntimeError("recipe not validated against its model: use finetune.config.parse_recipe")
        return self._preprocessing

    @field_validator("stages")
    @classmethod
    def _some_epochs(cls, stages: list[StageConfig]) -> list[StageConfig]:
        if not any(stage.epochs for stage in stages):
            raise ValueError("at least one stage needs epochs > 0 (a run without epochs has no checkpoint)")
        return stages


def _installed(package: Optional[str]) -> bool:
    """Whether ``package`` can be imported (None: nothing needed), without importing it."""
    if package is None:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (blocked)
        return False
