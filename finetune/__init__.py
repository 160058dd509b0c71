"""finetune: transfer learning on image folders with timm backbones and the SpinalNet head."""
from finetune._version import __version__
from finetune.errors import FinetuneError

__all__ = ["__version__", "FinetuneError"]
