"""Named input feeds: the one place where shrinkml's data (one array per example batch) becomes the
inputs a model takes by name.

Most models take one tensor: the batch is fed under the model's input name. A Hugging Face text
model takes the tokenizer's outputs (``input_ids``, ``attention_mask`` and, for BERT-like models,
``token_type_ids``), the layout optimum and sentence-transformers' ONNX and OpenVINO backends feed.
shrinkml keeps text data as padded token ids and writes into the exported graph's metadata
(``metadata_props``, key ``shrinkml.inputs``) how the other inputs follow from them: the attention
mask is ``input_ids != pad_token_id`` and the token types are zeros, exactly what the tokenizer
returns for single sentences. Every runner, calibrator and memory probe builds its feeds here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

META_KEY = "shrinkml.inputs"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def text_spec(pad_token_id: int) -> dict[str, Any]:
    """The metadata of a text model whose inputs follow from padded token ids."""
    return {"kind": "text", "ids": "input_ids", "pad_token_id": int(pad_token_id)}


def spec_from_metadata(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        return None
    spec = json.loads(raw)
    if not isinstance(spec, dict) or spec.get("kind") != "text" or not isinstance(spec.get("pad_token_id"), int):
        raise ValueError(f"unreadable {META_KEY} metadata: {raw[:200]!r}")
    return spec


def onnx_spec(model) -> dict[str, Any] | None:
    """The input spec an ``onnx.ModelProto`` carries (None for a plain one-input model)."""
    return spec_from_metadata({p.key: p.value for p in model.metadata_props})


def set_onnx_spec(model, spec: Mapping[str, Any] | None) -> None:
    """Write ``spec`` into ``model``'s metadata (replacing any earlier one); None leaves it as is."""
    if spec is None:
        return
    kept = [p for p in model.metadata_props if p.key != META_KEY]
    del model.metadata_props[:]
    for prop in kept:
        model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key=META_KEY, value=json.dumps(dict(spec), sort_keys=True))


def state_spec(state) -> dict[str, Any] | None:
    """The input spec of a model state: its ONNX graph's, or a PyTorch ``TextEncoder``'s."""
    if state.kind == "onnx":
        return onnx_spec(state.onnx_model)
    input_names = getattr(state.torch_model, "input_names", None)
    pad = getattr(state.torch_model, "pad_token_id", None)
    return text_spec(pad) if callable(input_names) and pad is not None else None


def file_spec(path: str | Path) -> dict[str, Any] | None:
    """The spec of an ``.onnx`` file, read without loading external weight files."""
    import onnx

    return onnx_spec(onnx.load(str(path), load_external_data=False))


def feeds(x: np.ndarray | Mapping[str, np.ndarray], inputs: Sequence[tuple[str, Any]],
          spec: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """The feeds for a model with ``inputs`` (``(name, numpy dtype or None)`` pairs, graph order).

    ``x`` is one batch: an array (token ids for a text model) or feeds already named. A one-input
    model gets ``x`` (cast to the input's dtype, e.g. float16); a text model gets ``x`` as its ids
    and the mask and token types derived from them.
    """
    if isinstance(x, Mapping):
        return {name: np.asarray(x[name]) for name, _ in inputs}
    if spec is not None and spec.get("kind") == "text":
        ids = np.ascontiguousarray(x, dtype=np.int64)
        derived = {"input_ids": ids, "attention_mask": (ids != spec["pad_token_id"]).astype(np.int64),
                   "token_type_ids": np.zeros_like(ids)}
        unknown = [name for name, _ in inputs if name not in derived]
        if unknown:
            raise ValueError(f"text model input(s) {unknown} cannot be derived from token ids"
                             f" (known: {', '.join(derived)})")
        return {name: derived[name] if dtype is None else derived[name].astype(dtype, copy=False)
                for name, dtype in inputs}
    if len(inputs) != 1:
        names = ", ".join(name for name, _ in inputs)
        raise ValueError(f"the model takes {len(inputs)} inputs ({names}) and carries no {META_KEY} metadata"
                         " saying how to build them from one array")
    (name, dtype), = inputs
    x = np.asarray(x)
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    return {name: x}


def onnx_inputs(model) -> list[tuple[str, Any]]:
    """``(name, numpy dtype)`` of an ``onnx.ModelProto``'s real inputs (initializers excluded)."""
    from onnx import helper

    initializers = {t.name for t in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        elem = value.type.tensor_type.elem_type
        out.append((value.name, np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None))
    return out


def model_feeds(model, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` for an ``onnx.ModelProto``, its inputs and spec read from the model itself."""
    return feeds(x, onnx_inputs(model), onnx_spec(model))
