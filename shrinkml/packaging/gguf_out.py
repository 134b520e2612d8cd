"""A quantized causal LM written as a GGUF file: the source GGUF's metadata and tokenizer, the
step's block codes where it chose them, the source's own tensors elsewhere (norms stay F32). The
source is the input ``.gguf``, or the input directory converted by ``shrinkml.models.hf_gguf``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkml.errors import InputError


def write_lm_gguf(state, loaded, path: Path) -> Path:
    """Write ``state`` (a causal LM with ``weight_codes``) as a GGUF at ``path`` (atomically)."""
    from shrinkml.formats.gguf_file import (
        hf_to_gguf_name,
        read_gguf,
        to_gguf_layout,
        write_gguf,
    )

    if state.weight_codes is None:
        raise InputError(
            "a causal-LM recipe must end with a step that chooses block codes (quantize.gguf) in this version",
            where="the recipe", fix="add a quantize.gguf step at the end")
    from shrinkml.models.causal_lm import gguf_source

    source_path = gguf_source(loaded)  # the input .gguf, or the input directory converted by shrinkml
    source = read_gguf(source_path)
    n_layers = int(source.hparam("block_count")) if source.architecture != "llama" else None
    tensors: dict[str, Any] = {}
    for name, codes in state.weight_codes.items():
        gguf_name = hf_to_gguf_name(name, source.architecture, **({"n_layers": n_layers} if n_layers else {}))
        if gguf_name is None or gguf_name not in source:
            raise InputError(f"the model's tensor {name} has no place in the source GGUF", where=str(source_path),
                             expected=f"a tensor of the source's {source.architecture} layout",
                             fix="quantize a model loaded from this GGUF file")
        tensors[gguf_name] = to_gguf_layout(source, gguf_name, codes)
    return write_gguf(path, source=source, tensors=tensors)
