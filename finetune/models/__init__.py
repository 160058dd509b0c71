"""Models: timm backbones, heads and pretrained weights."""
from finetune.models.factory import (FinetuneModel, backbone_stages, create_model, parse_head, pooled_width,
                                     resolve_preprocessing)
from finetune.models.heads import create_head, head_options, list_heads, register_head
from finetune.models.weights import (
    OfflineWeights,
    list_offline_weights,
    offline_weights,
    read_state_dict,
    register_offline_weights,
)

__all__ = [
    "FinetuneModel", "backbone_stages", "create_model", "parse_head", "pooled_width", "resolve_preprocessing",
    "create_head", "head_options", "list_heads", "register_head",
    "OfflineWeights", "list_offline_weights", "offline_weights", "read_state_dict", "register_offline_weights",
]
