"""finetune: transfer learning on image folders with timm backbones and the SpinalNet head."""
from finetune import _moved
from finetune._version import __version__
from finetune.errors import FinetuneError

_moved.install()  # the modules the layout by verb moved, under their old names for one release

__all__ = ["__version__", "FinetuneError", "create_model", "load", "train"]


def __getattr__(name):
    # lazy, so `import finetune` (and `finetune --help`) doesn't import torch and timm
    if name == "load":
        from finetune.inference.predictor import load  # lazy: see above

        return load
    if name == "train":
        from finetune.training import train  # lazy: see above

        return train
    if name == "create_model":
        from finetune.models import create_model  # lazy: see above

        return create_model
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
