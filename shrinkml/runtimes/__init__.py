"""The runtimes models are measured on: PyTorch eager and ONNX Runtime (CPU)."""

RUNTIMES = ("onnxruntime", "torch")
