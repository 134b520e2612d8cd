"""Quantization building blocks shared by the quantize.* techniques."""
