"""Mixup and CutMix of training batches: timm's ``Mixup`` turning labels into soft targets.

The loss stays the run's cross-entropy (:func:`~finetune.training.optim.make_loss`): PyTorch's
``CrossEntropyLoss`` takes class probabilities as targets, where it equals timm's ``SoftTargetCrossEntropy``,
and applies ``training.label_smoothing`` (and class weights) to them as to hard labels. Smoothing the mixed
one-hot targets is the same as mixing smoothed ones, so timm's ``Mixup`` runs with ``label_smoothing=0``.

Training accuracy on mixed batches counts a prediction as right when it is the sample's dominant class
(the largest entry of its soft target).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.data import Mixup

from finetune.data.transforms import size_defaults


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
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch"):

        self.num_classes = num_classes
        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           mode=mode, label_smoothing=0.0, num_classes=num_classes)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = F.one_hot(labels, self.num_classes).to(torch.float32)
        even = len(labels) - len(labels) % 2
        if even:
            mixed, soft = self.mixup(inputs[:even], labels[:even])  # mixes the view in place
            inputs = torch.cat([mixed, inputs[even:]]) if even < len(labels) else mixed
            targets[:even] = soft.to(torch.float32)
        return inputs, targets


def stage_mixer(stage_mixup: Union[dict, bool, None], run_mixup: Union[dict, str, None], *,
                input_size: Sequence[int], num_classes: int) -> Optional[BatchMixer]:
    """The mixer of a stage that trains on images, or None when it doesn't mix.

    Args:
        stage_mixup: The stage's ``mixup`` (a dict, ``False``: none, None: the run's).
        run_mixup: ``training.mixup`` (a dict, ``"auto"``: :func:`~finetune.data.transforms.size_defaults`, None).
        input_size: The model's input size, for ``auto``.
        num_classes: Classes of the targets.
    """

    cfg = run_mixup if stage_mixup is None else stage_mixup
    if cfg == "auto":
        cfg = size_defaults(input_size)["mixup"]
    if not cfg or not cfg.get("prob", 1.0):
        return None
    return BatchMixer(num_classes=num_classes, **cfg)
