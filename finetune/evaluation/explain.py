"""Class-activation maps: where in an image a model found the evidence for a class.

Grad-CAM (Selvaraju et al., ICCV 2017): the activations ``A`` (C maps) of a late layer, each weighted by
the mean gradient of the class score over its positions, summed and clipped at zero, then upsampled to
the input. The layer depends on the backbone family and is found through timm's interface
(``forward_features`` then ``forward_head``), never by a module name:

* CNNs (ResNet, EfficientNet, ConvNeXt, ...): the output of ``forward_features``, the last feature stage:
  N×C×H×W, or N×H×W×C for models whose ``output_fmt`` is NHWC (Swin, MambaOut).
* Vision transformers (ViT, DeiT, ...): tokens N×L×C. The prefix tokens (class, distillation, register:
  timm's ``num_prefix_tokens``) are dropped and the patch tokens reshaped to the patch grid. A model that
  pools its class token (``global_pool="token"``) reads the patch tokens after its last block only
  through that token, so their gradient at the output of ``forward_features`` is zero: its map is taken
  at the input of the last block, whose attention mixes them into the class token.

Written here rather than taken from the ``grad-cam`` package: the method is a few lines over timm's
interface, while the part that needs care, turning each family's features into a grid, is left to the
caller by the package (its ``reshape_transform``), which would add an sdist-only dependency for the rest.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune._io import atomic_write_bytes, ensure_folder
from finetune.data import ImageDecodeError, load_image
from finetune.data.transforms import normalizer_of
from finetune.errors import FinetuneError
from finetune.evaluation.report import data_uri, escape, html_page
from finetune.inference.predictor import eval_transform

THUMBNAIL = 128
"""Longest side, in pixels, of the heat-map overlays the report shows."""


@dataclass(frozen=True)
class Explanation:
    """The class-activation map of one image.

    Attributes:
        image: what the model saw (after its resize and crop), H×W×3 uint8 RGB.
        cam: the map for ``target``, H×W float32 in [0, 1] (all zero where no position supports it).
        target: the class index explained.
        probabilities: the model's softmax over all classes (a multi-label model's: per-label sigmoids).
    """

    image: np.ndarray
    cam: np.ndarray
    target: int
    probabilities: np.ndarray

    def overlay(self) -> np.ndarray:
        """:attr:`image` with the map blended over it (see :func:`overlay`)."""
        return overlay(self.image, self.cam)


def supports_cam(model: nn.Module) -> bool:
    """Whether ``model`` is a backbone (with timm's ``forward_features``/``forward_head``) plus a head."""
    backbone = getattr(model, "backbone", None)
    return (isinstance(getattr(model, "head", None), nn.Module) and hasattr(backbone, "forward_features")
            and hasattr(backbone, "forward_head"))


def grad_cam(model: nn.Module, images: torch.Tensor, targets: Sequence[int] | None = None, *,
             multilabel: bool = False, temperature: float | Sequence[float] = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a batch.

    Args:
        model: a :class:`~finetune.models.FinetuneModel` (a timm backbone made with ``num_classes=0`` plus a
            head), in eval mode.
        images: N×3×H×W, preprocessed, on the model's device.
        targets: the class to explain for each image; default the predicted one.
        multilabel: the probabilities are per-label sigmoids (a multi-label model), not a softmax.
        temperature: the checkpoint's temperature (one, or one per label), dividing the logits before the
            softmax or sigmoids, as ``finetune predict`` does; the maps do not depend on it (a scaled score has
            scaled gradients, and each map is divided by its peak).

    Returns:
        ``(probabilities N×C, maps N×H×W in [0, 1])``, on the CPU.
    """
    if not supports_cam(model):
        raise FinetuneError(f"class-activation maps need a timm backbone plus a head, not a {type(model).__name__}")
    backbone = model.backbone
    captured: list[torch.Tensor] = []
    hook = None
    if _pools_class_token(backbone):
        hook = backbone.blocks[-1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # a graph even when every parameter is frozen
            features = backbone.forward_features(x)
            logits = model.head(backbone.forward_head(features)).float()
            activations = captured[-1] if captured else features
            chosen = logits.argmax(dim=1) if targets is None else torch.as_tensor(targets, device=logits.device)
            score = logits.gather(1, chosen.view(-1, 1)).sum()  # images are independent in eval mode
            (gradients,) = torch.autograd.grad(score, activations)
    finally:
        if hook is not None:
            hook.remove()
    grid = _to_grid(backbone, activations.detach().float(), images.shape[-2:])
    weights = _to_grid(backbone, gradients.float(), images.shape[-2:]).mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * grid).sum(dim=1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(1e-12).view(-1, 1, 1)
    scaled = logits.detach() / torch.as_tensor(np.asarray(temperature, dtype=np.float32), device=logits.device)
    probabilities = scaled.sigmoid() if multilabel else scaled.softmax(dim=1)
    return probabilities.cpu(), (cam / peak).cpu()


def explain_images(
    model: nn.Module,
    sources: Sequence[str | os.PathLike | np.ndarray],
    transform: Callable,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    targets: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    multilabel: bool = False,
    temperature: float | Sequence[float] = 1.0,
) -> tuple[list[Explanation | None], dict[int, str]]:
    """Grad-CAM of image files (or uint8 RGB arrays), in batches.

    Args:
        model: as for :func:`grad_cam`; moved to ``device`` and put in eval mode.
        sources: image paths or H×W×3 uint8 arrays.
        transform: the eval pipeline (:func:`finetune.inference.predictor.eval_transform`), ending in
            ``Normalize(mean, std)`` or leaving it to the batch (``device_normalize``).
        mean, std: that normalisation, to show the image the model saw.
        targets: the class to explain per source; default the predicted one.
        device: where the model runs.
        batch_size: images per forward and backward pass.
        multilabel: per-label sigmoid probabilities (:func:`grad_cam`).
        temperature: the checkpoint's temperature(s) (:func:`grad_cam`).

    Returns:
        ``(explanations, errors)``: one :class:`Explanation` per source (``None`` where it could not be
        read) and position → reason for those.
    """

    device = torch.device(device)
    model = model.to(device).eval()
    results: list[Explanation | None] = [None] * len(sources)
    errors: dict[int, str] = {}
    readable: list[tuple[int, torch.Tensor]] = []
    for i, source in enumerate(sources):
        try:
            image = source if isinstance(source, np.ndarray) else load_image(source)
        except ImageDecodeError as e:
            errors[i] = e.reason
            continue
        readable.append((i, transform(image=image)["image"]))
    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    normalize = normalizer_of(transform)
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        batch = torch.stack([x for _, x in chunk])
        if normalize is not None:  # a uint8 pipeline (device_normalize): the model sees the normalised batch
            batch = normalize(batch)
            chunk = [(i, x) for (i, _), x in zip(chunk, batch)]
        batch = batch.to(device)
        chosen = None if targets is None else [int(targets[i]) for i, _ in chunk]
        probs, cams = grad_cam(model, batch, chosen, multilabel=multilabel, temperature=temperature)
        for row, (i, x) in enumerate(chunk):
            seen = ((x * std_t + mean_t).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            target = int(probs[row].argmax()) if chosen is None else chosen[row]
            results[i] = Explanation(seen, cams[row].numpy(), target, probs[row].numpy())
    return results, errors


def overlay(image: np.ndarray, cam: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """A heat-map (matplotlib's ``jet``) over ``image``, opaque in proportion to ``cam``: where the map is
    zero the image shows unchanged.

    Args:
        image: H×W×3 uint8 RGB.
        cam: H×W in [0, 1].
        strength: the heat-map's opacity where ``cam`` is 1.
    """
    from matplotlib import colormaps  # lazy: matplotlib is slow to import and only figures need it

    heat = colormaps["jet"](cam)[..., :3]
    alpha = strength * cam[..., None]
    blended = (1 - alpha) * image / 255 + alpha * heat
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


def encode(image: np.ndarray, *, size: int | None = THUMBNAIL, format: str = "JPEG") -> bytes:
    """``image`` (H×W×3 uint8) as JPEG or PNG bytes, shrunk to ``size`` px on its longest side (None: as is)."""

    picture = Image.fromarray(image)
    if size is not None:
        picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **({"quality": 80} if format == "JPEG" else {}))
    return buffer.getvalue()


def _pools_class_token(backbone: nn.Module) -> bool:
    return (getattr(backbone, "global_pool", None) == "token" and getattr(backbone, "num_prefix_tokens", 0) > 0
            and hasattr(backbone, "blocks"))


def _to_grid(backbone: nn.Module, x: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """Features as N×C×h×w: NCHW as is, NHWC permuted, tokens N×L×C without their prefix tokens reshaped
    to the patch grid (the input's aspect ratio)."""
    if x.ndim == 4:
        return x.permute(0, 3, 1, 2) if getattr(backbone, "output_fmt", "NCHW") == "NHWC" else x
    if x.ndim != 3:
        raise FinetuneError(f"cannot map features of shape {tuple(x.shape)} onto the image")
    tokens = x[:, getattr(backbone, "num_prefix_tokens", 0):]
    count = tokens.shape[1]
    height = max(1, round(math.sqrt(count * input_size[0] / input_size[1])))
    width = count // height
    if height * width != count:
        raise FinetuneError(f"cannot arrange {count} tokens as a grid for a {input_size[0]}×{input_size[1]} input")
    return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def write_explanations(
    model: nn.Module,
    sources: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    classes: Sequence[str],
    preprocessing: Mapping[str, Any],
    target: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    thresholds: Sequence[float] | None = None,
    temperature: float | Sequence[float] = 1.0,
) -> list[dict[str, Any]]:
    """Grad-CAM overlays of image files, written into ``out_dir``.

    Files: ``NNNN-NAME.png`` per readable image (what the model saw, at its input size, with the heat-map
    of the explained class), ``explanations.json`` (one record per image, in order: ``path``,
    ``predicted``, ``probability``, ``explained``, ``explained_probability``, ``overlay``, ``error``)
    and a self-contained ``index.html`` showing them.

    Args:
        model: as for :func:`grad_cam`.
        sources: image files.
        out_dir: the folder to write into (created if missing).
        classes: the model's class names in index order.
        preprocessing: the checkpoint's preprocessing.
        target: the class to explain for every image; default each image's predicted class.
        device: where the model runs.
        batch_size: images per forward and backward pass.
        thresholds: a multi-label checkpoint's per-label thresholds: probabilities are then sigmoids, the default
            label explained is the most probable one, and each record lists ``labels``, those at or above their
            thresholds.
        temperature: the checkpoint's temperature (``finetune calibrate``), or a calibrated multi-label
            checkpoint's per-label temperatures (its thresholds are on that scale): the probabilities shown are
            those ``finetune predict`` gives.

    Returns:
        The records of ``explanations.json``.

    Raises:
        FinetuneError: an unknown ``target``, or no readable image.
    """

    if target is not None and target not in classes:
        shown = ", ".join(repr(c) for c in list(classes)[:10]) + (" ..." if len(classes) > 10 else "")
        raise FinetuneError(f"unknown class {target!r} (the checkpoint's classes: {shown})")
    targets = None if target is None else [list(classes).index(target)] * len(sources)
    explanations, errors = explain_images(model, sources, eval_transform(preprocessing), mean=preprocessing["mean"],
                                   std=preprocessing["std"], targets=targets, device=device, batch_size=batch_size,
                                   multilabel=thresholds is not None, temperature=temperature)
    if len(errors) == len(sources):
        first = min(errors)
        raise FinetuneError(f"none of the {len(sources)} image(s) could be read (first: {sources[first]}: {errors[first]})")
    out = ensure_folder(out_dir)
    records, figures = [], []
    for i, (source, e) in enumerate(zip(sources, explanations)):
        if e is None:
            records.append({"path": str(source), "predicted": None, "probability": None, "explained": None,
                            "explained_probability": None, "overlay": None, "error": errors[i]})
            continue
        probs = e.probabilities
        predicted = int(probs.argmax())
        name = f"{i:04d}-{_safe_stem(source)}.png"
        picture = e.overlay()
        atomic_write_bytes(out / name, encode(picture, size=None, format="PNG"))
        record = {"path": str(source), "predicted": classes[predicted], "probability": float(probs[predicted]),
                  "explained": classes[e.target], "explained_probability": float(probs[e.target]),
                  "overlay": name, "error": None}
        if thresholds is not None:
            record["labels"] = [classes[c] for c in np.argsort(-probs, kind="stable") if probs[c] >= thresholds[c]]
        records.append(record)
        figures.append(
            f'<figure title="{escape(source)}"><img class="heat-map" alt="{escape(source)}" '
            f'src="{data_uri(encode(picture), "image/jpeg")}"><figcaption>'
            f'<div>predicted: {escape(record["predicted"])} ({100 * record["probability"]:.1f}%)</div>'
            f'<div class="muted">heat-map of {escape(record["explained"])} '
            f'({100 * record["explained_probability"]:.1f}%)</div>'
            f'<div class="muted">{escape(source)}</div></figcaption></figure>'
        )
    unreadable = "".join(f"<li>{escape(r['path'])}: {escape(r['error'])}</li>" for r in records if r["error"])
    page = html_page(f"Explanations: {len(figures)} image(s)", ("explanations",), [
        '<section id="explanations"><h2>Explanations</h2><p class="muted">Grad-CAM on the image the model saw '
        "(after its resize and crop); red marks the regions whose features raised the explained class's "
        f'score most.</p><div class="grid">{"".join(figures)}</div>'
        + (f"<h3>Unreadable images</h3><ul>{unreadable}</ul>" if unreadable else "") + "</section>",
    ])
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
    atomic_write_bytes(out / "explanations.json", (json.dumps(records, indent=2) + "\n").encode("utf-8"))
    return records


def _safe_stem(source: str | os.PathLike) -> str:
    """The file name's stem with anything but letters, digits, ``-``, ``_`` and ``.`` replaced, at most 60
    characters: a file name that is safe everywhere."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(source).stem)[:60]
    return stem or "image"
