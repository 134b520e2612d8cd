"""Loading the user's model safely: a factory plus safetensors weights, or an ONNX file."""

from shrinkml.models.load import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
