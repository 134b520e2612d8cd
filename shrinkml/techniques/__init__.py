"""Built-in techniques, registered explicitly: importing this package imports each module once.

The modules are light: a config class and the functions of a step, with torch, ONNX and ONNX
Runtime imported inside the functions that run it (torch-side modules live in ``shrinkml.nn``).
So ``registry()``, recipe validation and ``shrinkml techniques`` import none of them
(``tests/test_import_light.py``).
"""

from shrinkml.techniques import (  # noqa: F401
    finetune,
    prune_channels,
    prune_magnitude,
    prune_transformer,
    quantize_bf16,
    quantize_dynamic,
    quantize_gguf,
    quantize_half,
    quantize_nncf,
    quantize_qat,
    quantize_static,
    quantize_weight_only,
    share_embeddings,
    unpad,
)
from shrinkml.techniques.base import StepConfig, get_technique, register, registry

__all__ = ["StepConfig", "get_technique", "register", "registry"]
