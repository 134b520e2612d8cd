"""GPTQ: group-wise weight quantization that compensates each column's rounding error on the
columns not yet quantized (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1).

For a linear layer ``Y = X W^T`` with calibration inputs ``X`` (rows = tokens), GPTQ minimises
``||X W^T - X W'^T||^2`` column by column. With ``H = 2 X^T X`` (dampened), quantizing column ``j``
to ``q_j`` leaves the error ``e = (w_j - q_j) / [H^-1]_jj``; subtracting ``e * [H^-1]_{j, j+1:}``
from the remaining columns is the optimal least-squares correction (Optimal Brain Surgeon). The
inverse Hessian's upper Cholesky factor supplies every ``[H^-1]`` row that is needed, in order.
Updates are applied lazily in blocks of ``block_size`` columns (same result, fewer memory passes).

Group scales and zero points are computed when a group starts, from the *updated* weights of that
group, with the same arithmetic as round-to-nearest (:mod:`shrinkml.quant.weight_codec`), so the
result deploys as ``MatMulNBits`` unchanged. With an identity Hessian no error is propagated and
GPTQ reduces to round-to-nearest.

>>> acc = HessianAccumulator(512)
>>> acc.add(x)                                   # doctest: +SKIP  (calibration inputs, (tokens, 512))
>>> q = gptq_quantize(layer.weight, acc.hessian(), bits=4, group_size=32)  # doctest: +SKIP
>>> layer.weight.data = q.dequantize()           # doctest: +SKIP
"""

from __future__ import annotations

import torch

from shrinkml.quant.weight_codec import GroupQuantized, check_group_size, group_params, quantize_codes


class HessianAccumulator:
    """Running ``X^T X`` of a layer's inputs (float64), from batches of any leading shape.

    ``hessian()`` is ``2 X^T X / n`` (the mean over the ``n`` rows seen, as in the reference
    implementation: the scale does not change GPTQ's result, but keeps the dampening relative).
    """

    def __init__(self, features: int) -> None:
        self.features = features
        self.gram = torch.zeros(features, features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.features).float()
        # float32 product per batch (fast), float64 running sum (no drift over many batches)
        self.gram += (x.T @ x).double()
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration inputs were recorded for this layer")
        return 2.0 * self.gram / self.rows


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float64)."""
    h = hessian.double().clone()
    k = h.shape[0]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    lower = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    params=None,
) -> GroupQuantized:
    """GPTQ-quantize a ``(N, K)`` weight given the ``(K, K)`` Hessian of its layer's inputs.

    ``damp`` is added to the diagonal as a fraction of its mean (the paper's 1%). ``block_size``
    is the lazy-update width; it is rounded to a multiple of ``group_size`` (at least one group)
    so that every group lies in one block and its scale sees all earlier columns' corrections.
    ``params(group, bits, symmetric) -> (scale, zero)`` replaces ONNX Runtime's group rules
    (:func:`~shrinkml.quant.weight_codec.group_params`), e.g. to keep every scale an fp16 value for
    llama.cpp's blocks. Raises ``torch.linalg.LinAlgError`` if the dampened Hessian is not positive
    definite.
    """
    if group_size != weight.shape[1]:  # one group per row (a per-channel scale) fits any width
        check_group_size(group_size)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, found {bits}")
    if not 0 < damp < 1:
        raise ValueError(f"damp must lie strictly between 0 and 1, found {damp}")
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}) for a weight of shape {tuple(weight.shape)}, found {tuple(hessian.shape)}")
    block = max(group_size, (block_size // group_size) * group_size)

    w = weight.detach().float().clone()
    h = hessian.double().clone()
    # inputs that were always zero carry no information: their weights cannot change the output
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_factor(h, damp).float()

    n_blocks = -(-k // group_size)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, n_blocks, dtype=torch.float32)
    zeros = torch.zeros(n, n_blocks, dtype=torch.float32)
    scale = zero = None
    for start in range(0, k, block):
        stop = min(start + block, k)
        w_block = w[:, start:stop].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:
                g = col // group_size
                group = w_block[:, i : i + group_size]  # already corrected for all earlier columns
                scale, zero = (params or group_params)(group, bits, symmetric)
                scales[:, g], zeros[:, g] = scale, zero
            column = w_block[:, i]
            q = quantize_codes(column, scale, zero, bits)
            codes[:, col] = q
            dequantized = (q.float() - zero) * scale
            err = (column - dequantized) / hinv_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            err_block[:, i] = err
        w[:, stop:] -= err_block @ hinv[start:stop, stop:]
    return GroupQuantized(
        codes=codes,
        scales=scales,
        zero_points=None if symmetric else zeros.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )
