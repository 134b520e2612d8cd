"""Built-in techniques, registered explicitly: importing this package imports each module once."""

from shrinkml.techniques import finetune, prune_channels, prune_magnitude, quantize_dynamic  # noqa: F401
from shrinkml.techniques.base import StepConfig, get_technique, register, registry

__all__ = ["StepConfig", "get_technique", "register", "registry"]
