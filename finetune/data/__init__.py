"""The data layer; everything public is importable from here.

Names load on first use (PEP 562): `finetune data split` imports what the split needs (OpenCV, Pillow,
NumPy), not torch, timm and albumentations, which the datasets and transforms bring.

* `decode`: every file to an RGB array (`load_image`), or `ImageDecodeError` with the reason.
* `similarity`: the perceptual hash, crop-aware thumbnail correlation, blank images, the quick leak check.
* `scan`: the pre-training scan (bad files, hashes), kept in the scan cache (`_scan_cache`).
* `store`: the decoded-pixel store (`build_store`): images decoded and resized once, read as raw pixels.
* `layout`: dataset folders (`discover`, `find_images`); `split`: the seeded split (`split_classes`).
* `manifest`: the split manifest (`Manifest`) and its CSV; `prepare`: `prepare_manifest` (find, scan,
  split: what a run calls), `split_like_run` (the split a checkpoint's run made) and `inspect_dataset`.
* `transforms`: albumentations pipelines (`build_transform`) and a checkpoint's preprocessing.
* `datasets`: `ImageDataset`, the one collate `collate_skip`, `DeviceBatches`, class balance (`BalancedSampler`,
  weights).
* `batch_pool`: `BatchPool`, `collate_skip` in workers into shared-memory buffers they reuse; the /dev/shm
  budget of workers' batches (`shm_budget`); the loader of one pass in order (`one_pass_loader`).
* `cards`: dataset cards and the embedded digits sample (`write_digits`).
"""
import importlib

from finetune import _moved

_PUBLIC = {
    "default_scan_cache": "finetune.data._scan_cache",
    "DatasetCard": "finetune.data.cards",
    "list_cards": "finetune.data.cards",
    "load_card": "finetune.data.cards",
    "write_digits": "finetune.data.cards",
    "BalancedSampler": "finetune.data.datasets",
    "BatchPool": "finetune.data.batch_pool",
    "DeviceBatches": "finetune.data.datasets",
    "ImageDataset": "finetune.data.datasets",
    "class_counts": "finetune.data.datasets",
    "class_weights": "finetune.data.datasets",
    "collate_skip": "finetune.data.datasets",
    "one_pass_loader": "finetune.data.batch_pool",
    "reuses_buffers": "finetune.data.batch_pool",
    "shm_budget": "finetune.data.batch_pool",
    "worker_collate": "finetune.data.batch_pool",
    "DEFAULT_MAX_PIXELS": "finetune.data.decode",
    "IMAGE_EXTENSIONS": "finetune.data.decode",
    "ImageDecodeError": "finetune.data.decode",
    "decode_image": "finetune.data.decode",
    "load_image": "finetune.data.decode",
    "DatasetFolder": "finetune.data.layout",
    "discover": "finetune.data.layout",
    "find_images": "finetune.data.layout",
    "Manifest": "finetune.data.manifest",
    "ManifestRow": "finetune.data.manifest",
    "inspect_dataset": "finetune.data.prepare",
    "manifest_root": "finetune.data.prepare",
    "prepare_manifest": "finetune.data.prepare",
    "BadFile": "finetune.data.scan",
    "ScanResult": "finetune.data.scan",
    "scan_images": "finetune.data.scan",
    "write_report": "finetune.data.scan",
    "COPY_SIMILARITY": "finetune.data.similarity",
    "FLAT_LEVELS": "finetune.data.similarity",
    "colour_name": "finetune.data.similarity",
    "flat_copies": "finetune.data.similarity",
    "flat_signature": "finetune.data.similarity",
    "perceptual_hash": "finetune.data.similarity",
    "thumbnail_vector": "finetune.data.similarity",
    "thumbnail_views": "finetune.data.similarity",
    "view_similarity": "finetune.data.similarity",
    "split_classes": "finetune.data.split",
    "PixelStore": "finetune.data.store",
    "StorePlan": "finetune.data.store",
    "build_store": "finetune.data.store",
    "store_plan": "finetune.data.store",
    "BatchNormalize": "finetune.data.transforms",
    "INTERPOLATIONS": "finetune.data.transforms",
    "build_transform": "finetune.data.transforms",
    "normalizer_of": "finetune.data.transforms",
    "preprocessing_transform": "finetune.data.transforms",
}
"""Each public name and the module it lives in."""

__all__ = sorted(_PUBLIC)

# resolve_preprocessing moved to finetune.models.factory, for one release
_moved_name = _moved.attribute_getter(__name__, ("resolve_preprocessing",), "finetune.models.factory")


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    return _moved_name(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
