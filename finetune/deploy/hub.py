"""``finetune export --format hub``: a checkpoint as a model folder in timm's Hugging Face Hub layout (the layout is
described in :mod:`finetune.models.hub_format`, which reads it), with a model card made from its run; and
``finetune push``, which uploads such a folder with ``huggingface_hub``.

timm writes the ``config.json`` (``timm.models.save_config_for_hf``: the same fields its own Hub models have, so
``timm.create_model("hf-hub:OWNER/NAME", pretrained=True)`` and ``"local-dir:DIR"`` read them); finetune adds the weights in timm's
names, its ``checkpoint.json`` and the card.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save
from timm.models._hub import save_config_for_hf  # timm exports it only from _hub (push_to_hf_hub uses it)

from finetune._io import write_dir_atomic
from finetune._version import __version__
from finetune.errors import FinetuneError, first_line
from finetune.models.checkpoint import (META_FILE, is_hub_folder, load_checkpoint, read_meta, resolve_checkpoint,
                                       run_folder_of)
from finetune.models.hub_format import (CARD_FILE, CONFIG_FILE, HEAD_FILE, LAYOUT, LINEAR_HEAD, WEIGHTS_FILE)

FILES = (CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE, META_FILE, CARD_FILE)
"""What a hub-format folder may hold (and all that ``finetune push`` uploads)."""
PARITY_ATOL = 1e-5


def export_hub(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the hub-format folder of a checkpoint (or a run's best) at ``out`` (default: beside the checkpoint
    folder, ``best-hub``), atomically: a failure leaves what was there.

    A linear head becomes the timm model's own classifier, checked to give the checkpoint's logits (within
    ``PARITY_ATOL``) before anything is written; where timm's classifier cannot hold it (another head, or a family
    whose classifier is not one linear layer), the folder holds the backbone and finetune's head apart.

    Raises:
        FinetuneError: ``out`` is a file, or a folder holding anything but an earlier hub export (replacing it
            would delete it), or cannot be written; the written folder does not load back to the same outputs.
    """
    folder = resolve_checkpoint(checkpoint)
    out = Path(out) if out is not None else folder.with_name(folder.name + "-hub")
    _check_out(out)
    model, meta = load_checkpoint(folder)
    size = meta["preprocessing"]["input_size"]
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(example)
    timm_model, classifier = _as_timm_classifier(model, meta, example, expected)
    net = timm_model if classifier else model.backbone
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    hub_meta = {**read_meta(folder), "layout": LAYOUT, "hub": {"classifier": classifier}}
    card = model_card(meta, folder, classifier=classifier)

    def write(tmp: Path) -> None:
        (tmp / WEIGHTS_FILE).write_bytes(save(state, metadata={"format": "pt"}))
        if not classifier:
            head = {k: v.detach().contiguous() for k, v in model.head.state_dict().items()}
            (tmp / HEAD_FILE).write_bytes(save(head, metadata={"format": "pt"}))
        save_config_for_hf(net, str(tmp / CONFIG_FILE), model_config=_model_config(meta, classifier),
                           data_config=_data_config(meta["preprocessing"]))
        (tmp / META_FILE).write_text(json.dumps(hub_meta, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        reloaded, _ = load_checkpoint(tmp)  # the folder as every command will read it
        with torch.inference_mode():
            got = reloaded(example)
        if not torch.allclose(got, expected, atol=PARITY_ATOL, rtol=0):
            raise FinetuneError(f"the hub folder of {folder} does not load back to the checkpoint's outputs "
                                f"(max |difference| {(got - expected).abs().max().item():.3g})")

    write_dir_atomic(out, write)
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; give a folder for the hub-format model")
    if out.is_dir() and any(out.iterdir()):
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        earlier = (out / META_FILE).is_file() and is_hub_folder(out)
        if others or not earlier:
            raise FinetuneError(f"--out {out} holds files that are not an earlier hub export "
                                f"({', '.join(others[:3]) or 'no hub checkpoint.json'}); the export replaces the "
                                "whole folder: give a new folder")


def _as_timm_classifier(model, meta: dict[str, Any], example: torch.Tensor, expected: torch.Tensor
                        ) -> tuple[torch.nn.Module | None, str | None]:
    """The plain timm model (``num_classes`` = the checkpoint's) holding a linear head as its classifier, and the
    classifier's name; ``(None, None)`` where that model would not give the checkpoint's logits."""
    if meta["head"].get("name") != "linear":
        return None, None
    net = timm.create_model(meta["backbone"], pretrained=False, num_classes=meta["num_classes"],
                            **meta.get("backbone_kwargs", {}))
    names = {id(m): n for n, m in net.named_modules()}
    classifier = names.get(id(net.get_classifier()))
    if not classifier or not isinstance(net.get_classifier(), torch.nn.Linear):
        return None, None
    state = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state.update({f"{classifier}.{k[len(LINEAR_HEAD):]}": v for k, v in model.state_dict().items()
                  if k.startswith(LINEAR_HEAD)})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        return None, None
    net.eval()
    with torch.inference_mode():
        got = net(example)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=PARITY_ATOL, rtol=0):
        return None, None
    return net, classifier


def _model_config(meta: dict[str, Any], classifier: str | None) -> dict[str, Any]:
    extra = {"finetune": {"version": __version__, "head": meta["head"], "classes": list(meta["classes"]),
                          "task": meta.get("task", "single"),
                          **({"thresholds": meta["thresholds"]} if meta.get("thresholds") else {}),
                          "loads_in": "timm" if classifier else "finetune (timm loads the backbone alone)"}}
    return {**({"label_names": list(meta["classes"])} if classifier else {}), **extra}


def _data_config(pre: dict[str, Any]) -> dict[str, Any]:
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: (tuple(pre[k]) if isinstance(pre[k], list) else pre[k]) for k in keys if pre.get(k) is not None}


# ------------------------------------------------------------------------------------------------ the card

def model_card(meta: dict[str, Any], folder: Path, *, classifier: str | None) -> str:
    """The ``README.md`` of a hub folder: what the model is, how to load it, its data, recipe and test metrics
    (the run's ``eval/metrics.json`` and ``per_class.csv``, as they are), its intended use and limits."""
    run_dir = run_folder_of(folder)
    multilabel = meta.get("task") == "multilabel"
    name = (meta.get("recipe") or {}).get("name") or folder.name
    head = meta["head"].get("name")
    tags = ["image-classification", "timm", "finetune", *(["multi-label"] if multilabel else [])]
    lines = ["---", f"library_name: {'timm' if classifier else 'finetune'}", "pipeline_tag: image-classification",
             "tags:", *(f"- {t}" for t in tags), "---", "",
             f"# {name}", "",
             f"`{meta['backbone']}` fine-tuned with a {head} head by finetune {__version__}: "
             f"{len(meta['classes'])} {'labels (multi-label: each predicted at or above its threshold)' if multilabel else 'classes'}.",
             "", "## How to use", ""]
    if classifier:
        lines += ["A plain timm classifier (the head is timm's own `" + classifier + "` layer):", "", "```python",
                  "import timm", 'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # or "hf-hub:OWNER/NAME"',
                  "model.eval()", "config = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**config)", "```", "",
                  "The class names are `label_names` in config.json, in output order."]
    else:
        lines += [f"The {head} head is finetune's, not a timm module: load the whole model with finetune.", "",
                  "```python", "import finetune", 'predictor = finetune.load("local-dir:THIS_FOLDER")  # or "hf-hub:OWNER/NAME"',
                  'predictor.predict(["image.jpg"])', "```", "",
                  '**Note:** plain timm (`timm.create_model("local-dir:THIS_FOLDER", pretrained=True)`) loads the backbone alone, '
                  "as a feature extractor (`num_classes: 0`); the head's weights are in finetune_head.safetensors."]
    if meta.get("temperature") or meta.get("temperatures"):
        lines += ["", "Calibrated: finetune divides the logits by the temperature(s) in checkpoint.json; the raw "
                      "weights here give the uncalibrated logits."]
    recipe = meta.get("recipe") or {}
    data = recipe.get("data") or {}
    lines += ["", "## Training data", "", f"- source: `{data.get('manifest') or data.get('root') or 'unknown'}`"]
    if run_dir is not None and (run_dir / "manifest.csv").is_file():
        with open(run_dir / "manifest.csv", encoding="utf-8", newline="") as f:
            splits: dict[str, int] = {}
            for row in csv.DictReader(f):
                splits[row.get("split", "")] = splits.get(row.get("split", ""), 0) + 1
        lines.append("- images per split: " + ", ".join(f"{s} {n}" for s, n in splits.items()))
    lines += ["", "## Recipe", "", "```json", json.dumps(recipe, indent=2, default=str), "```", ""]
    lines += ["## Evaluation", ""] + _metrics_section(run_dir, multilabel)
    lines += ["", "## Intended use and limits", "",
              f"Classifies images like those it was trained on into its {len(meta['classes'])} "
              f"{'labels' if multilabel else 'classes'}. Its figures hold for the test split above, drawn from the "
              "same source as its training images: on other cameras, lighting, resolutions or subjects expect "
              "lower accuracy, and measure it (`finetune eval`) before relying on it. It inherits the biases of "
              f"its training data and of `{meta['backbone']}`'s pretraining. It is not meant for decisions about "
              "people, or for medical, legal or safety-critical use without an evaluation of its own.", ""]
    return "\n".join(lines)


def _metrics_section(run_dir: Path | None, multilabel: bool) -> list[str]:
    path = run_dir / "eval" / "metrics.json" if run_dir else None
    if path is None or not path.is_file():
        return ["No test evaluation was found beside this checkpoint (its run's eval/metrics.json)."]
    metrics = json.loads(path.read_text(encoding="utf-8"))
    keys = (("map_macro", "mAP (macro)"), ("map_micro", "mAP (micro)"), ("f1_micro", "F1 (micro)"),
            ("subset_accuracy", "subset accuracy"), ("hamming_loss", "Hamming loss")) if multilabel else (
            ("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("balanced_accuracy", "balanced accuracy"),
            ("top5_accuracy", "top-5 accuracy"), ("ece", "ECE"))
    lines = [f"Test split, {metrics.get('num_samples')} images (the run's eval/metrics.json):", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {metrics[k]:.4f} |" for k, label in keys if isinstance(metrics.get(k), (int, float))]
    table = run_dir / "eval" / "per_class.csv"
    if table.is_file():
        rows = list(csv.reader(io.StringIO(table.read_text(encoding="utf-8"))))
        if rows:
            lines += ["", "Per class (eval/per_class.csv):", "", "| " + " | ".join(rows[0]) + " |",
                      "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return lines


# ------------------------------------------------------------------------------------------------ push

def push_folder(folder: str | os.PathLike, repo: str, *, private: bool = False) -> str:
    """Upload a hub-format folder to the Hugging Face Hub as one commit (``huggingface_hub.upload_folder``):
    the repository then has all of it or, on a failure, none of it. The token is the environment's
    (``HF_TOKEN``) or the Hugging Face CLI login's.

    Returns:
        The commit's URL.

    Raises:
        FinetuneError: not a hub-format folder, a repository name that is not ``OWNER/NAME``, no token, or an
            upload that fails (offline, refused); one line, nothing sent before the check that fails.
    """
    from huggingface_hub import HfApi, get_token  # lazy: only this command talks to the Hub

    folder = Path(folder)
    if not (folder / META_FILE).is_file() or not is_hub_folder(folder) or not (folder / CONFIG_FILE).is_file():
        raise FinetuneError(f"{folder} is not a hub-format model folder: make one with "
                            "`finetune export CHECKPOINT --format hub --out DIR`")
    read_meta(folder)
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise FinetuneError(f"--repo {repo!r}: give the repository as OWNER/NAME")
    token = get_token()
    if not token:
        raise FinetuneError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`; nothing was sent")
    api = HfApi(token=token)
    present = [name for name in FILES if (folder / name).is_file()]
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", allow_patterns=present,
                                   commit_message=f"finetune {__version__}: upload {folder.name}")
    except Exception as e:  # huggingface_hub and requests raise many types: offline, 401, 403, 404...
        raise FinetuneError(f"upload to {repo} failed, nothing was committed: {type(e).__name__}: "
                            f"{first_line(e)}") from None
    return str(getattr(commit, "commit_url", commit))
