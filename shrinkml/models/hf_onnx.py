"""The transformer of a ``TextEncoder`` as ``onnx/model.onnx`` in the layout Hugging Face tools use.

sentence-transformers' ONNX backend (``SentenceTransformer(dir, backend="onnx")``, through optimum)
and optimum's ``ORTModelFor...`` classes read ``onnx/model.onnx`` beside the weights, feed it the
tokenizer's outputs by name (``input_ids``, ``attention_mask`` and, for BERT-like models,
``token_type_ids``) and expect ``last_hidden_state`` (token embeddings, pooled by the library) or
``logits``. shrinkml's own ``model.onnx`` is different (token ids in, pooled embedding out), so model
directories get this second export. Both axes are dynamic; the export is checked against PyTorch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ONNX_SUBDIR = "onnx"


class _Outputs(nn.Module):
    """``transformer(**named inputs)`` -> its first output (token states, or logits)."""

    def __init__(self, transformer: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.transformer, self.names = transformer, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.transformer(**dict(zip(self.names, inputs)))
        return out[0] if isinstance(out, tuple) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def input_names(transformer: nn.Module, tokenizer: Any) -> list[str]:
    """The tokenizer outputs the transformer takes, in the tokenizer's order."""
    import inspect

    accepted = inspect.signature(transformer.forward).parameters
    names = [n for n in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]) if n in accepted]
    return names if "input_ids" in names else ["input_ids", *names]


def export_hf_layout(module: nn.Module, tokenizer: Any, ids: np.ndarray, dest: Path, *, kind: str, pad_token_id: int,
                     threads: int, tolerance: float) -> dict[str, Any]:
    """Write ``dest/onnx/model.onnx`` for ``module.transformer``; return what was written and the check.

    Raises ``ValueError`` when ONNX Runtime's output differs from PyTorch's by more than ``tolerance``.
    """
    from shrinkml.atomic import write_bytes
    from shrinkml.runtimes.export import eager_attention

    transformer = module.transformer.eval()
    names = input_names(transformer, tokenizer)
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": (ids != pad_token_id).astype(np.int64),
             "token_type_ids": np.zeros_like(ids, dtype=np.int64)}
    feeds = {n: feeds.get(n, np.zeros_like(ids, dtype=np.int64)) for n in names}
    output = "logits" if kind == "classifier" else "last_hidden_state"
    wrapper = _Outputs(transformer, names).eval()
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes[output] = {0: "batch_size"} if kind == "classifier" else {0: "batch_size", 1: "sequence_length"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), eager_attention(wrapper), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(torch.from_numpy(feeds[n]) for n in names), buffer, dynamo=False,
                          input_names=names, output_names=[output], dynamic_axes=axes, opset_version=17,
                          do_constant_folding=True)
        expected = wrapper(*(torch.from_numpy(feeds[n]) for n in names)).float().numpy()
    payload = buffer.getvalue()
    from shrinkml.runtimes.onnxruntime import session

    got = session(payload, threads=threads).run([output], feeds)[0]
    if kind != "classifier":  # padding positions are never read by pooling: compare real tokens only
        real = feeds["attention_mask"].astype(bool)
        got, expected = got[real], expected[real]
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance:
        raise ValueError(f"onnx/model.onnx differs from PyTorch by {diff:.3g} (> {tolerance:g})")
    path = Path(dest) / ONNX_SUBDIR / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, payload)
    return {"file": f"{ONNX_SUBDIR}/model.onnx", "inputs": names, "output": output,
            "dynamic_axes": "batch_size, sequence_length", "max_abs_diff_vs_pytorch": diff}
