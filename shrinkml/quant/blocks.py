"""The block-size rule of ONNX Runtime's block-quantized ops (``MatMulNBits``,
``GatherBlockQuantized``), without torch or ONNX: recipe validation checks it
(``quantize.weight_only``'s ``group_size``) before anything heavy is imported."""

from __future__ import annotations


def check_group_size(group_size: int) -> int:
    """``MatMulNBits`` needs a power-of-two block size of at least 16."""
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of 2 and at least 16 (16, 32, 64, 128, ...), found {group_size}")
    return group_size
