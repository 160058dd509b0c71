"""Which layer groups static int8 keeps in fp32: the groups of an ONNX graph, and the search over them.

onnxruntime's ``quantize_static`` quantises every supported op, or all but ``nodes_to_exclude``; it does not say
which ops cost accuracy (NNCF's accuracy control does that for OpenVINO, :mod:`finetune.deploy.openvino`). So the
search is written here, over coarse groups rather than single ops (a few quantisation runs, not hundreds):

* ``stem``: the first convolution (it sees raw pixels, whose range one int8 scale covers poorly);
* ``depthwise``: every depthwise convolution (one filter per channel: per-channel weights help little, and their
  activations vary most between channels; EfficientNet-Lite and MobileNet quantise poorly because of them);
* ``head``: every op after the global pooling (the classifier: the SpinalNet head's small layers);
* ``blocks 1/4`` … ``blocks 4/4``: the remaining convolutions and matrix products in graph order, in four runs
  of consecutive ops (the backbone's early to late stages).

What the search measures (:func:`kept_with_margin`) is stricter than top-1 agreement: an image's decision counts as
kept only when the int8 model's largest output error could not flip it, whichever outputs that error hit (a
multi-label export is still scored by plain agreement; see the function). The
search's images come from the train split, which the model has fit: their margins are wide, so plain agreement on
them can stay at 1.0 while unseen images, with narrower margins, flip. An image's int8 error depends little on how
well it was fit; judged against each image's margin, it says what narrower margins would do, where agreement says
nothing until a decision has flipped.

The search (:func:`search_fp32_groups`) measures the fully quantised model; if it is within ``max_drop``, that is
the export. Otherwise each group is measured back in fp32 alone, and groups are returned to fp32 in the order
of what that gained, most first, one at a time, until the model is within ``max_drop``: the fewest groups the
greedy order needs, so as much of the graph as the budget allows stays int8.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from finetune.errors import FinetuneError

QUANTISED_OPS = ("Conv", "Gemm", "MatMul")
POOLING_OPS = ("GlobalAveragePool", "ReduceMean", "GlobalMaxPool", "AdaptiveAvgPool")
BLOCK_RUNS = 4


def layer_groups(graph) -> dict[str, list[str]]:
    """The node names of each layer group of an ONNX ``graph`` (``model.graph``, nodes in topological order, as
    onnxruntime's ``quant_pre_process`` leaves them; every node named). Empty groups are left out."""
    nodes = list(graph.node)
    weights = {init.name: list(init.dims) for init in graph.initializer}
    pools = [i for i, node in enumerate(nodes) if node.op_type in POOLING_OPS]
    # the head: everything after the last global pooling (none found: the last matrix product alone, e.g. a ViT
    # whose pooling is a token slice)
    heads = [n.name for n in nodes[pools[-1] + 1:]] if pools else \
        [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    head = set(heads)
    convs = [n for n in nodes if n.op_type == "Conv" and n.name not in head]
    stem = [convs[0].name] if convs else []

    def depthwise(node) -> bool:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shape = weights.get(node.input[1]) if len(node.input) > 1 else None
        return group > 1 and bool(shape) and shape[1] == 1

    dw = [n.name for n in convs if depthwise(n) and n.name not in stem]
    taken = head | set(stem) | set(dw)
    rest = [n.name for n in nodes if n.op_type in QUANTISED_OPS and n.name not in taken]
    groups = {"stem": stem, "depthwise": dw, "head": heads}
    runs = min(BLOCK_RUNS, len(rest))
    for i in range(runs):
        groups[f"blocks {i + 1}/{runs}"] = rest[len(rest) * i // runs: len(rest) * (i + 1) // runs]
    return {name: members for name, members in groups.items() if members}


def search_fp32_groups(groups: Iterable[str], score: Callable[[frozenset[str]], float], max_drop: float
                       ) -> tuple[list[str], float, list[dict]]:
    """The groups to keep in fp32 so that the int8 model's ``score`` (the share of fp32 decisions it keeps with
    margin, :func:`kept_with_margin`; 1.0: all of them) is at most ``max_drop`` below 1 (see the module docstring
    for the order).

    ``score(fp32_groups)`` quantises all but ``fp32_groups`` and measures it.

    Returns:
        ``(fp32 groups in the order returned, score reached, trace)``; the trace lists every measurement as
        ``{"fp32_groups": [...], "score": s}``.

    Raises:
        FinetuneError: not within ``max_drop`` even with every group in fp32.
    """
    groups = list(groups)
    trace: list[dict] = []
    seen: dict[frozenset[str], float] = {}

    def measure(kept: Sequence[str]) -> float:
        key = frozenset(kept)
        if key not in seen:
            seen[key] = float(score(key))
            trace.append({"fp32_groups": list(kept), "score": seen[key]})
        return seen[key]

    base = measure([])
    if 1.0 - base <= max_drop:
        return [], base, trace
    gain = {g: measure([g]) - base for g in groups}
    kept: list[str] = []
    reached = base
    for g in sorted(groups, key=lambda g: (-gain[g], groups.index(g))):
        kept.append(g)
        reached = measure(kept)
        if 1.0 - reached <= max_drop:
            return kept, reached, trace
    raise FinetuneError(f"int8 keeps only {reached:.3f} of the fp32 model's decisions with margin even with every "
                        f"layer group ({', '.join(groups)}) in fp32, over --max-drop {max_drop}: export fp32, or try "
                        f"--format openvino (with --qat 2: quantisation-aware fine-tuning)")


def exclusions(groups: Mapping[str, Sequence[str]], kept: Iterable[str]) -> list[str]:
    """The node names of the groups ``kept`` in fp32 (onnxruntime's ``nodes_to_exclude``)."""
    return [name for g in kept for name in groups[g]]


def decisions(outputs, info: Mapping):
    """What a model decides from its ``outputs``: the top-1 class, or for a multi-label export (``info["task"]``)
    each label's decision at its threshold."""
    if info.get("task") == "multilabel":
        return np.asarray(outputs) >= np.asarray(info["thresholds"])
    return np.asarray(outputs).argmax(axis=1)


def kept_with_margin(outputs, reference, info: Mapping) -> float:
    """The share of the fp32 ``reference``'s decisions that the ``outputs`` (the int8 model's, on the same images)
    keep with margin: an image's error is its largest ``|output - reference|``, and its top-1 decision is kept when
    twice that error is below the fp32 margin (top-1 minus top-2 logit), so that no error that size, on any two
    classes, could flip it. Every decision kept is the same decision, so this never exceeds :func:`agreement`.

    A multi-label export (``info["task"]``) is scored by plain agreement over (image, label) decisions for now: a
    label's threshold is tuned to sit among its probabilities, so some always lie within int8's error of it, and a
    barely trained model (probabilities within 0.001 of their thresholds) could not be kept with margin even with
    every layer group in fp32 (the ops between the groups stay int8); what margins do for a trained multi-label
    model is not measured yet."""
    if info.get("task") == "multilabel":
        return agreement(decisions(outputs, info), decisions(reference, info))
    got, ref = np.asarray(outputs, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    error = np.abs(got - ref).max(axis=1)
    top2 = np.sort(ref, axis=1)[:, -2:]
    return float(np.mean(2 * error < top2[:, 1] - top2[:, 0]))


def agreement(got, reference) -> float:
    """The share of decisions equal to the reference's: of images (top-1), or multi-label of (image, label) pairs."""
    return float(np.mean(np.asarray(got) == np.asarray(reference)))
