"""The data layer; everything public is importable from here.

* `decode`: every file to an RGB array (`load_image`), or `ImageDecodeError` with the reason.
* `similarity`: the perceptual hash, crop-aware thumbnail correlation, blank images, the quick leak check.
* `scan`: the pre-training scan (bad files, hashes), kept in the scan cache (`_scan_cache`).
* `store`: the resize cache (`resize_cache`): images decoded and shrunk once.
* `layout`: dataset folders (`discover`, `find_images`); `split`: the seeded split (`split_classes`).
* `manifest`: the split manifest (`Manifest`) and its CSV; `prepare`: `prepare_manifest` (find, scan,
  split: what a run calls), `split_like_run` (the split a checkpoint's run made) and `inspect_dataset`.
* `transforms`: albumentations pipelines (`build_transform`) and a checkpoint's preprocessing.
* `datasets`: `ImageDataset`, the one collate `collate_skip`, class balance (`BalancedSampler`, weights).
* `cards`: dataset cards and the embedded digits sample (`write_digits`).
"""
from finetune import _moved
from finetune.data.cards import DatasetCard, list_cards, load_card, write_digits
from finetune.data.datasets import BalancedSampler, ImageDataset, class_counts, class_weights, collate_skip
from finetune.data.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, decode_image, load_image
from finetune.data.scan import BadFile, ScanResult, scan_images, write_report
from finetune.data.similarity import (
    COPY_SIMILARITY,
    FLAT_LEVELS,
    colour_name,
    flat_copies,
    flat_signature,
    perceptual_hash,
    thumbnail_vector,
    thumbnail_views,
    view_similarity,
)
from finetune.data.store import resize_cache
from finetune.data._scan_cache import default_scan_cache
from finetune.data.layout import DatasetFolder, discover, find_images
from finetune.data.manifest import Manifest, ManifestRow
from finetune.data.prepare import inspect_dataset, manifest_root, prepare_manifest
from finetune.data.split import split_classes
from finetune.data.transforms import INTERPOLATIONS, build_transform, preprocessing_transform

__all__ = [
    "BadFile",
    "COPY_SIMILARITY",
    "BalancedSampler",
    "DEFAULT_MAX_PIXELS",
    "DatasetCard",
    "DatasetFolder",
    "FLAT_LEVELS",
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "ImageDataset",
    "ImageDecodeError",
    "Manifest",
    "ManifestRow",
    "ScanResult",
    "build_transform",
    "class_counts",
    "class_weights",
    "collate_skip",
    "colour_name",
    "decode_image",
    "default_scan_cache",
    "discover",
    "find_images",
    "flat_copies",
    "flat_signature",
    "inspect_dataset",
    "list_cards",
    "load_card",
    "load_image",
    "manifest_root",
    "perceptual_hash",
    "prepare_manifest",
    "preprocessing_transform",
    "resize_cache",
    "scan_images",
    "split_classes",
    "thumbnail_vector",
    "thumbnail_views",
    "view_similarity",
    "write_digits",
    "write_report",
]

# moved to finetune.models.factory, for one release
__getattr__ = _moved.attribute_getter(__name__, ("resolve_preprocessing",), "finetune.models.factory")
