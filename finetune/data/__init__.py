"""The data layer: image folders and manifests, decoding, albumentations pipelines, sampling, dataset cards.

The runner calls `prepare_manifest` (layout detection, seeded split, bad-file scan), builds pipelines with
`build_transform`, wraps `Manifest.items` in `ImageDataset` and batches with `collate_skip`.
"""
from finetune.data._cards import DatasetCard, list_cards, load_card
from finetune.data._dataset import ImageDataset, collate_skip
from finetune.data._decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, decode_image, load_image
from finetune.data._digits import write_digits
from finetune.data._inspect import inspect_dataset
from finetune.data._layout import DatasetFolder, discover, find_images
from finetune.data._manifest import Manifest, ManifestRow
from finetune.data._prepare import manifest_root, prepare_manifest
from finetune.data._resize_cache import resize_cache
from finetune.data._sampling import BalancedSampler, class_counts, class_weights
from finetune.data._scan import BadFile, ScanResult, scan_images, write_report
from finetune.data._similarity import (
    COPY_SIMILARITY,
    perceptual_hash,
    thumbnail_vector,
    thumbnail_views,
    view_similarity,
)
from finetune.data._split import split_classes
from finetune.data._transforms import INTERPOLATIONS, build_transform, preprocessing_transform, resolve_preprocessing

__all__ = [
    "BadFile",
    "COPY_SIMILARITY",
    "BalancedSampler",
    "DEFAULT_MAX_PIXELS",
    "DatasetCard",
    "DatasetFolder",
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
    "decode_image",
    "discover",
    "find_images",
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
