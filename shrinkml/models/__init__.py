"""Loading the user's model safely: a factory plus safetensors weights, or an ONNX file."""

from shrinkml.models.load import load_model
from shrinkml.models.loaded import LoadedModel

__all__ = ["LoadedModel", "load_model"]
