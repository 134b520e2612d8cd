"""``unpad``: a BERT text encoder that computes its batches' real tokens only, in PyTorch.

Padding changes nothing a text encoder returns, but the usual forward runs every Linear, LayerNorm and
GELU on every padded position. After this step the model (a ``TextEncoder`` around a BERT-architecture
transformer, such as all-MiniLM-L6-v2) drops the columns that are padding in every row, packs the real
tokens of the batch into one matrix for the embeddings, projections, feed-forward blocks and
LayerNorms, and pads only Q, K and V for the attention scores (``shrinkml.nn.unpad``). Same weights,
same function (checked on a calibration batch; the summary gives the difference); the time saved is
the padding fraction of the batches a user sends: most for batches padded to a fixed length, some
for batches padded to their longest text, none for texts of equal length.

It changes how PyTorch computes, not what is stored: the result runs on ``--runtime torch``, and
``quantize.bf16``'s file records it so ``load_int8`` rebuilds the unpadded model; an exported ONNX
computes every position as before. Sentence-transformers, loading the output's ``model/`` directory,
computes the same embeddings with its usual padded forward.

Recipe step (with ``--runtime torch``, usually after ``quantize.bf16``)::

    - technique: unpad
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register

WHERE = "unpad"


class UnpadConfig(StepConfig):
    """Compute real tokens only (same weights, same function): BERT text encoders, in PyTorch."""

    technique: Literal["unpad"] = Field("unpad", description="the technique this step runs")


def _applies(loaded) -> str | None:
    """A search's check: BERT-architecture text encoders only."""
    from shrinkml.nn.unpad import unsupported

    module = getattr(loaded, "module", None)
    return "not a Hugging Face text encoder" if getattr(loaded, "text", None) is None else unsupported(module)


@register("unpad", UnpadConfig, accepts=("torch",), produces="torch", runtime="torch", applies=_applies)
def apply(state: ModelState, config: UnpadConfig, ctx: StepContext) -> StepResult:
    import numpy as np
    import torch

    from shrinkml.nn.unpad import unsupported

    why = unsupported(state.torch_model)
    if why is not None:
        raise InputError(
            "unpad computes BERT text encoders only",
            where=WHERE,
            expected="a Hugging Face BERT-architecture encoder or classifier (e.g. all-MiniLM-L6-v2) given as a"
            " model directory",
            found=why,
            fix="remove the unpad step for this model",
        )
    model = copy.deepcopy(state.torch_model).eval()
    model.unpad = True
    ids = np.asarray(ctx.splits.calibration.x)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(
            "unpad needs token ids", where=f"{WHERE}, calibration data",
            expected="(texts, length) integer token ids", found=f"{ids.dtype} of shape {ids.shape}",
            fix="pass text data (--data texts.txt, builtin:prose) for a text model",
        )
    sample = torch.from_numpy(ids[:32].astype(np.int64))
    with torch.inference_mode():
        packed = model(sample).float()
        model.unpad = False
        padded = model(sample).float()
        model.unpad = True
    diff = float((packed - padded).abs().max()) if len(sample) else 0.0
    scale = float(padded.abs().max()) if len(sample) else 1.0
    dtype = next(model.parameters()).dtype
    tolerance = (0.05 if dtype == torch.bfloat16 else 1e-4) * max(scale, 1e-6)  # bfloat16: 8-bit mantissa
    if not diff <= tolerance:
        raise InputError(
            "the unpadded forward does not compute what the model computes",
            where=WHERE, expected=f"a max abs difference <= {tolerance:.3g} on a calibration batch",
            found=f"{diff:.3g} (largest output {scale:.3g})",
            fix="remove the unpad step for this model, and report it: it is a bug",
        )
    mask = ids != int(model.pad_token_id)
    width = int(mask.any(0).nonzero()[0].max()) + 1 if mask.any() else 0
    summary = {
        "computes": "real tokens only (PyTorch)",
        "max_abs_diff_vs_padded_forward": diff,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "calibration_padding_fraction": float(1 - mask.mean()) if mask.size else 0.0,
        "calibration_tokens_computed_fraction": float(mask.sum() / mask.size) if mask.size else 0.0,
        "calibration_pad_only_columns": int(ids.shape[1] - width) if ids.ndim == 2 else 0,
    }
    return StepResult(ModelState("torch", torch_model=model), summary)
