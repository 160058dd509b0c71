"""Mixup and CutMix of training batches: timm's ``Mixup`` turning labels into soft targets.

The loss stays the run's cross-entropy (:func:`~finetune.training.optim.make_loss`): PyTorch's
``CrossEntropyLoss`` takes class probabilities as targets, where it equals timm's ``SoftTargetCrossEntropy``,
and applies ``training.label_smoothing`` (and class weights) to them as to hard labels. Smoothing the mixed
one-hot targets is the same as mixing smoothed ones, so timm's ``Mixup`` runs with ``label_smoothing=0``.

Training accuracy on mixed batches counts a prediction as right when it is the sample's dominant class
(the largest entry of its soft target).

Multi-label data (multi-hot targets) mixes the same way, its targets mixed as the images are:
``lam * y + (1 - lam) * y_flipped`` per label (a mosaic cut from two images shows both label sets, in proportion),
what timm's ``mixup_target`` does to one-hot rows. timm's ``Mixup`` one-hot encodes class indices, so
:class:`MultiHotMixup` reuses its image mixing (``_mix_batch``/``_mix_pair``/``_mix_elem``, which draw the factors
and mix in place) and mixes the targets itself. Training accuracy then counts a label as present at a mixed weight
of 0.5 or more.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.data import Mixup

from finetune.data.transforms import size_defaults


class MultiHotMixup(Mixup):
    """timm's ``Mixup`` on multi-hot targets: ``x, y = mixup(x, y)`` with ``y`` a float ``(N, labels)`` matrix."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert len(x) % 2 == 0, "Batch size should be even when using this"
        if self.mode == "elem":
            lam = self._mix_elem(x)  # (N, 1) tensor
        elif self.mode == "pair":
            lam = self._mix_pair(x)
        else:
            lam = self._mix_batch(x)  # a float
        target = target.to(torch.float32)
        return x, target * lam + target.flip(0) * (1.0 - lam)


class BatchMixer:
    """Mixup/CutMix on a batch on the device: ``inputs, targets = mixer(inputs, labels)``.

    timm's ``Mixup`` needs an even batch: an odd one mixes all but its last sample, which keeps its image and
    a one-hot target (a batch of one is not mixed). The mixing factors come from NumPy's global generator,
    which a run seeds and a resumed run restores.

    Args:
        num_classes: Classes of the targets.
        mixup_alpha, cutmix_alpha, prob, switch_prob, mode: timm's ``Mixup`` arguments (``training.mixup``).
    """

    def __init__(self, *, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch", multilabel: bool = False):

        self.num_classes = num_classes
        self.multilabel = multilabel
        self.mixup = (MultiHotMixup if multilabel else Mixup)(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob, mode=mode,
            label_smoothing=0.0, num_classes=num_classes)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``labels``: class indices ``(N,)``, or multi-hot rows ``(N, labels)`` for a multi-label mixer."""
        if self.multilabel:
            targets = labels.to(torch.float32).clone()
        else:
            targets = F.one_hot(labels, self.num_classes).to(torch.float32)
        even = len(labels) - len(labels) % 2
        if even:
            mixed, soft = self.mixup(inputs[:even], labels[:even])  # mixes the view in place
            inputs = torch.cat([mixed, inputs[even:]]) if even < len(labels) else mixed
            targets[:even] = soft.to(torch.float32)
        return inputs, targets


def stage_mixer(stage_mixup: Union[dict, bool, None], run_mixup: Union[dict, str, None], *,
                input_size: Sequence[int], num_classes: int, multilabel: bool = False) -> Optional[BatchMixer]:
    """The mixer of a stage that trains on images, or None when it doesn't mix.

    Args:
        stage_mixup: The stage's ``mixup`` (a dict, ``False``: none, None: the run's).
        run_mixup: ``training.mixup`` (a dict, ``"auto"``: :func:`~finetune.data.transforms.size_defaults`, None).
        input_size: The model's input size, for ``auto``.
        num_classes: Classes of the targets.
        multilabel: the targets are multi-hot rows (:class:`MultiHotMixup`).
    """

    cfg = run_mixup if stage_mixup is None else stage_mixup
    if cfg == "auto":
        cfg = size_defaults(input_size)["mixup"]
    if not cfg or not cfg.get("prob", 1.0):
        return None
    return BatchMixer(num_classes=num_classes, multilabel=multilabel, **cfg)
