"""Self-contained model checkpoints: a folder holding ``model.safetensors`` and ``checkpoint.json``.

``checkpoint.json`` carries everything inference needs: the backbone name and kwargs, the head config,
class names in index order, preprocessing, metrics, the recipe and library versions. Loading never runs
pickled code: weights come from safetensors, metadata from JSON.

A run's checkpoints may split the weights: ``frozen.safetensors`` holds those a stage left unchanged (a
frozen backbone), written once and hard-linked into each folder, ``model.safetensors`` the rest
(:class:`WeightsWriter`); a folder is still complete on its own, and :func:`read_weights` reads either
layout.

Folders are written atomically: into a temporary sibling, then swapped in by renames, so a crash leaves
either the old checkpoint or the new one. A crash between the two renames leaves only ``NAME.old``:
:func:`recover_dir` (run before every write and when a run starts or resumes) puts it back, and
:func:`resolve_checkpoint` reads it meanwhile.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from finetune._io import (  # noqa: F401 (recover_dir: re-exported)
    atomic_write_text,
    read_text_file,
    recover_dir,
    write_dir_atomic,
)
from finetune._version import __version__
from finetune.errors import FinetuneError, one_line, short_repr
from finetune.models import create_model
from finetune.models.factory import check_backbone_kwargs
from finetune.models.hub_format import hub_state_dict, is_hub_meta

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
FROZEN_FILE = "frozen.safetensors"  # optional: the weights a stage left unchanged, shared by hard links
META_FILE = "checkpoint.json"
SPLIT_FRACTION = 0.5  # split the weights when the unchanged ones are at least this share of the bytes


def library_versions() -> dict[str, str]:

    return {"finetune": __version__, "torch": torch.__version__, "timm": timm.__version__}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_checkpoint(path: str | Path, model, meta: dict[str, Any], extra: Optional[Callable[[Path], None]] = None,
                    writer: Optional["WeightsWriter"] = None) -> Path:
    """Write ``model`` (a :class:`~finetune.models.FinetuneModel`) and ``meta`` as a checkpoint folder.

    ``meta`` should hold ``classes`` and ``preprocessing``; the backbone, head, format version and library
    versions are filled in here. ``extra(tmp_dir)``, when given, writes more files into the same folder
    before it is swapped in (the runner's resumable training state). A ``writer`` writes only what changed
    since its previous checkpoint (see :class:`WeightsWriter`).

    Raises:
        FinetuneError: the folder could not be written (a full disk, no permission); the previous
            checkpoint at ``path``, if any, is kept.
    """

    def write(tmp: Path) -> None:
        write_model_files(tmp, model, meta, writer and (lambda folder, m, state: writer.split(folder, Path(path), m, state)))
        if extra is not None:
            extra(tmp)

    write_dir_atomic(path, write)
    if writer is not None:
        writer.commit()
    return Path(path)


def write_model_files(folder: Path, model, meta: dict[str, Any], split: Optional[Callable] = None) -> None:

    model = getattr(model, "module", model)  # unwrap DDP
    full_meta = {
        "format_version": FORMAT_VERSION,
        "backbone": model.backbone_name,
        "backbone_kwargs": model.backbone_kwargs,
        "head": model.head_config,
        "num_classes": len(meta["classes"]),
        "versions": library_versions(),
        **meta,
    }
    state = model.state_dict()
    if split is not None:  # a WeightsWriter's: the unchanged tensors go to frozen.safetensors
        state = split(folder, model, state)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # written by Python, so a failed write (a full disk) raises OSError, not save_file's SafetensorError
    (folder / WEIGHTS_FILE).write_bytes(save(state))
    (folder / META_FILE).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")


class WeightsWriter:
    """Checkpoints of one run that cost what changed: a frozen backbone is written once, not every epoch.

    The tensors that did not change since the model's previous checkpoint (torch bumps a tensor's version
    counter on every in-place change: optimizer steps, BatchNorm statistics, ``load_state_dict``) go into
    ``frozen.safetensors``, written once: each later checkpoint folder gets a hard link to the copy in a
    folder this writer wrote before (a copy where links fail) and a ``model.safetensors`` with the rest, so
    every folder stays self-contained and replacing one never touches another. Before a model's first
    checkpoint, its parameters that need no gradient and the buffers of modules without a trainable
    parameter count as unchanged. Only one process may write a run's checkpoints (rank 0).
    """

    def __init__(self):
        self._seen: dict[int, dict[str, tuple]] = {}  # id(model) -> its previous stamps
        self._files: dict[Path, dict[str, tuple]] = {}  # frozen file -> its tensors' stamps
        self._pending: Optional[tuple[Path, Optional[dict]]] = None

    def split(self, tmp: Path, path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put the unchanged tensors of ``state`` (``model``'s) into ``tmp/frozen.safetensors``, the folder that
        becomes ``path``; call :meth:`commit` once it has.

        Returns:
            The rest of ``state``, for ``model.safetensors``.
        """

        # a stamp holds the tensor itself: its storage stays alive, so no other tensor can take its address.
        # BatchNorm updates its running statistics inside its kernel without bumping their version: buffers
        # (small) are compared by value, with a copy
        params = {name for name, _ in model.named_parameters()}
        stamps = {k: (v, v._version, None if k in params else v.detach().clone()) for k, v in state.items()}
        seen = self._seen.get(id(model))
        unchanged = (_frozen_guess(model) if seen is None else
                     {k for k, (v, version, _) in stamps.items() if k in seen and _same(seen[k], v, version)})
        self._seen[id(model)] = stamps
        source = next((f for f, saved in self._files.items() if f.is_file()
                       and all(k in stamps and _same(stamp, *stamps[k]) for k, stamp in saved.items())), None)
        frozen = self._files[source] if source is not None else {k: stamps[k] for k in unchanged}
        size = sum(v.nelement() * v.element_size() for v in state.values())
        if source is None and sum(state[k].nelement() * state[k].element_size() for k in unchanged) < SPLIT_FRACTION * size:
            self._pending = (path, None)
            return state
        try:
            if source is None:
                raise OSError("no earlier copy")
            os.link(source, tmp / FROZEN_FILE)
        except OSError:
            (tmp / FROZEN_FILE).write_bytes(save({k: state[k].detach().to("cpu").contiguous() for k in sorted(frozen)}))
        self._pending = (path, frozen)
        return {k: v for k, v in state.items() if k not in frozen}

    def commit(self) -> None:
        """Record what the folder :meth:`split` prepared holds, now that it is in place."""
        if self._pending is not None:
            path, frozen = self._pending
            self._files.pop(path / FROZEN_FILE, None)
            if frozen is not None:
                self._files[path / FROZEN_FILE] = frozen
            self._pending = None


def _same(stamp: tuple, tensor: torch.Tensor, version: int, *_) -> bool:
    old, old_version, value = stamp
    if value is not None:
        return value.shape == tensor.shape and torch.equal(value, tensor)
    return old.data_ptr() == tensor.data_ptr() and old_version == version and old.shape == tensor.shape


def _frozen_guess(model: torch.nn.Module) -> set[str]:
    """Names of the state that training will presumably leave alone: parameters without gradient, and the
    buffers of modules that have no trainable parameter of their own."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for prefix, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            frozen |= {f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False)}
    return frozen & set(model.state_dict().keys())


def read_weights(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The weights of a checkpoint folder: ``model.safetensors``, plus ``frozen.safetensors`` where present.

    Raises:
        FinetuneError: a missing, truncated or corrupt file, named.
    """

    state: dict[str, torch.Tensor] = {}
    for name in (WEIGHTS_FILE, FROZEN_FILE):
        path = Path(folder) / name
        if name == FROZEN_FILE and not path.exists():
            break
        if not path.is_file():
            raise FinetuneError(f"{path} is missing")
        try:
            state.update(load_file(str(path), device=str(device)))
        except (SafetensorError, OSError) as e:
            raise FinetuneError(f"{path} is not a readable safetensors file (truncated or corrupt: {e})") from None
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for ``path``: the folder itself, a run folder's ``checkpoints/best``, or the
    ``.old`` copy left if a crash interrupted a swap. ``local-dir:DIR`` is the hub-format folder ``DIR``, and
    ``hf-hub:OWNER/NAME[@REVISION]`` one on the Hugging Face Hub, fetched into its local cache
    (:mod:`finetune.models.hub_format`)."""
    text = str(path)
    if text.startswith("local-dir:"):
        path = text[len("local-dir:"):]
    elif text.startswith("hf-hub:"):
        from finetune.models.hub_format import download_hub_model

        path = download_hub_model(text[len("hf-hub:"):])
    path = Path(path)
    for candidate in (path, path / "checkpoints" / "best"):
        if (candidate / META_FILE).is_file():
            return candidate
        old = candidate.with_name(candidate.name + ".old")
        if (old / META_FILE).is_file():
            return old
    raise FinetuneError(f"no checkpoint at {path} (expected a folder with {META_FILE} and {WEIGHTS_FILE})")


def read_meta(path: str | Path) -> dict[str, Any]:
    folder = resolve_checkpoint(path)
    file = folder / META_FILE
    try:
        meta = json.loads(read_text_file(file, "checkpoint description"))
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise FinetuneError(f"{file}: not a checkpoint description (a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise FinetuneError(
            f"checkpoint {folder} has format version {version!r}; this finetune {__version__} reads version "
            f"{FORMAT_VERSION} (upgrade finetune to read newer checkpoints)"
        )
    for key in ("backbone", "head", "classes", "preprocessing"):
        if key not in meta:
            raise FinetuneError(f"checkpoint {folder} lacks '{key}' in {META_FILE}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise FinetuneError(f"{file}: classes must be a list of names, got {short_repr(classes)}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise FinetuneError(f"{file}: classes names {', '.join(map(repr, repeated[:5]))} more than once: two "
                            "outputs would print as the same class")
    num_classes = meta.setdefault("num_classes", len(classes))
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise FinetuneError(f"{file}: num_classes must be a whole number of outputs, got {short_repr(num_classes)}")
    if num_classes != len(classes):
        raise FinetuneError(f"{file} lists {len(classes)} classes for a model with {num_classes} outputs (num_classes)")
    if not isinstance(meta["backbone"], str) or not meta["backbone"]:
        raise FinetuneError(f"{file}: backbone must be a timm model name, got {short_repr(meta['backbone'])}")
    try:  # the rule a recipe's model.backbone_kwargs is validated with
        check_backbone_kwargs(meta.setdefault("backbone_kwargs", {}))
    except ValueError as e:
        raise FinetuneError(f"{file}: backbone_kwargs: {e}") from None
    return meta


def describe_model(backbone: str, head: Any, num_classes: int, backbone_kwargs: dict[str, Any]) -> str:
    """``backbone NAME, head HEAD, N classes[, backbone_kwargs {...}]``: a model in error messages."""
    name = head.get("name") if isinstance(head, dict) else head
    kwargs = f", backbone_kwargs {backbone_kwargs}" if backbone_kwargs else ""
    return f"backbone {backbone}, head {name}, {num_classes} classes{kwargs}"


def load_weights(folder: str | Path, model: torch.nn.Module, description: str,
                 map_location: str | torch.device = "cpu") -> None:
    """Load ``folder/model.safetensors`` into ``model``, refusing a missing or unreadable file and weights
    whose names or shapes differ from the model's (``description`` names the model in the message)."""
    path = Path(folder) / WEIGHTS_FILE
    meta = None
    if (Path(folder) / "config.json").is_file():  # perhaps a hub-format folder: its weights are under timm's names
        meta = read_meta(folder)
    hub = meta is not None and is_hub_meta(meta)
    if hub:
        state = hub_state_dict(folder, meta, map_location)
    else:
        state = read_weights(folder, map_location)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        detail = f"{k} is {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model"
    elif missing and not unexpected and not hub and not (Path(folder) / FROZEN_FILE).exists():
        # a checkpoint that split its weights: the missing ones were in the other file
        raise FinetuneError(f"{Path(folder) / FROZEN_FILE} is missing: {len(missing)} weights of the model "
                            f"({description}), e.g. {missing[0]}, are not in {WEIGHTS_FILE} (a checkpoint "
                            f"folder that split its weights needs both files)")
    elif missing or unexpected:
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    else:
        model.load_state_dict(state)
        return
    raise FinetuneError(f"{path} does not fit the model ({description}): {detail}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model of a checkpoint folder (or a run folder) without network or pickled code.

    ``checkpoint.json`` is checked against the weights: a missing, truncated or corrupt
    ``model.safetensors``, or one made for another backbone, head, class count or ``backbone_kwargs``, is
    refused with a :class:`~finetune.errors.FinetuneError` naming the file and the mismatch.

    Returns:
        ``(model, meta)``: the :class:`~finetune.models.FinetuneModel` in eval mode and the checkpoint metadata.
    """

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    kwargs = meta["backbone_kwargs"]
    try:
        model = create_model(meta["backbone"], meta["num_classes"], head=meta["head"], pretrained=False, **kwargs)
    except FinetuneError as e:
        raise FinetuneError(f"{folder / META_FILE}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError, RuntimeError) as e:
        # timm's model constructors check their arguments in many ways, none of them a FinetuneError
        raise FinetuneError(one_line(
            f"{folder / META_FILE}: backbone_kwargs {short_repr(kwargs)} do not fit {meta['backbone']}: "
            f"{type(e).__name__}: {e}"
        )) from None
    description = describe_model(meta["backbone"], meta["head"], meta["num_classes"], kwargs)
    load_weights(folder, model, description, map_location)
    return model.to(map_location).eval(), meta


def run_folder_of(checkpoint: str | Path) -> Optional[Path]:
    """The run folder a checkpoint folder sits in (``RUN_DIR/checkpoints/NAME`` of a run that logged its
    epochs in ``metrics.csv``), or None."""
    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent
    return run_dir if checkpoint.parent.name == "checkpoints" and (run_dir / "metrics.csv").is_file() else None


def is_hub_folder(path: str | Path) -> bool:
    """A folder ``finetune export --format hub`` wrote (its checkpoint.json says layout hub)."""
    try:
        return is_hub_meta(read_meta(Path(path)))
    except FinetuneError:
        return False
