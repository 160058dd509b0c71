"""The data layer, five modules plus cards; everything public is importable from here.

* `images`: decoding (`load_image`), the pre-training scan, pixel similarity, the resize cache.
* `layout`: dataset folders (`discover`, `find_images`) and the seeded split (`split_classes`).
* `manifest`: the split manifest (`Manifest`), `prepare_manifest` (find, scan, split: what a run calls)
  and `inspect_dataset`.
* `transforms`: albumentations pipelines (`build_transform`) and a checkpoint's preprocessing.
* `datasets`: `ImageDataset`, the one collate `collate_skip`, class balance (`BalancedSampler`, weights).
* `cards`: dataset cards and the embedded digits sample (`write_digits`).
"""
from finetune.data.cards import DatasetCard, list_cards, load_card, write_digits
from finetune.data.datasets import BalancedSampler, ImageDataset, class_counts, class_weights, collate_skip
from finetune.data.images import (
    COPY_SIMILARITY,
    DEFAULT_MAX_PIXELS,
    FLAT_LEVELS,
    IMAGE_EXTENSIONS,
    BadFile,
    ImageDecodeError,
    ScanResult,
    colour_name,
    decode_image,
    flat_copies,
    flat_signature,
    load_image,
    perceptual_hash,
    resize_cache,
    scan_images,
    thumbnail_vector,
    thumbnail_views,
    view_similarity,
    write_report,
)
from finetune.data._scan_cache import default_scan_cache
from finetune.data.layout import DatasetFolder, discover, find_images, split_classes
from finetune.data.manifest import Manifest, ManifestRow, inspect_dataset, manifest_root, prepare_manifest
from finetune.data.transforms import INTERPOLATIONS, build_transform, preprocessing_transform, resolve_preprocessing

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
    "resolve_preprocessing",
    "scan_images",
    "split_classes",
    "thumbnail_vector",
    "thumbnail_views",
    "view_similarity",
    "write_digits",
    "write_report",
]
