"""Built-in techniques, registered explicitly: importing this package imports each module once."""

from shrinkml.techniques import (  # noqa: F401
    finetune,
    prune_channels,
    prune_magnitude,
    prune_transformer,
    quantize_bf16,
    quantize_dynamic,
    quantize_half,
    quantize_qat,
    quantize_static,
    quantize_weight_only,
    share_embeddings,
)
from shrinkml.techniques.base import StepConfig, get_technique, register, registry

__all__ = ["StepConfig", "get_technique", "register", "registry"]
