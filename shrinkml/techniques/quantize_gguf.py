"""``quantize.gguf``: a causal language model's weights in llama.cpp's block formats, so that the
GGUF file shrinkml writes runs in llama.cpp (and everything built on it) with its own kernels.

Every ``nn.Linear`` weight of the decoder takes ``format``; the token embedding table takes
``embedding_format`` (with tied embeddings it is also the output head, stored once); an untied
``lm_head`` takes ``output_format``. Codes are chosen by llama.cpp's reference round-to-nearest
quantizers (``shrinkml.formats.gguf_blocks.quantize_rtn``, bit-exact with them), and the PyTorch
model's weights are set to exactly the values the codes dequantize to, so what shrinkml measures
in PyTorch is what the GGUF holds. A K-quant needs rows that are a multiple of 256 weights; where a
row is not (SmolLM2's 576-wide layers), the tensor takes llama.cpp's own fallback (Q4_K -> Q5_0,
Q6_K -> Q8_0) and the summary says which.

Norms and biases stay float32, as llama.cpp keeps them. The step records the codes on the model
state (``weight_codes``, Hugging Face tensor names), which the GGUF writer stores as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.techniques.base import StepConfig, register, searchable

BlockFormatName = Literal["Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0"]


class QuantizeGGUFConfig(StepConfig):
    """llama.cpp block formats for a causal LM's weights (round-to-nearest)."""

    technique: Literal["quantize.gguf"] = Field("quantize.gguf", description="llama.cpp block formats for a causal LM")
    format: BlockFormatName = Field(
        "Q4_0", description="block format of every decoder Linear weight",
        json_schema_extra=searchable(choices=("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")))
    embedding_format: BlockFormatName = Field(
        "Q8_0", description="block format of the token embedding table (also the output head when tied)")
    output_format: BlockFormatName = Field("Q6_K", description="block format of an untied lm_head")


def _applies(loaded: Any) -> str | None:
    if getattr(loaded, "lm", None) is None:
        return "not a causal language model"
    if loaded.lm.gguf_path is None:
        return "writing a GGUF needs a GGUF source for its tokenizer and metadata (the model was not loaded from one)"
    return None


def _targets(model) -> list[tuple[str, Any, str]]:
    """``(hf name, parameter, role)`` of every weight the step quantizes, each tensor once."""
    from torch import nn

    seen: set[int] = set()
    out = []
    embed = model.get_input_embeddings()
    out.append(("model.embed_tokens.weight", embed.weight, "embedding"))
    seen.add(id(embed.weight))
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out.append((f"{name}.weight", module.weight, "output" if module is head else "linear"))
    return out


def quantize_model(model, config: QuantizeGGUFConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize ``model``'s weights in place (their values become the dequantized codes); return
    ``(codes by Hugging Face name, summary)``."""
    import numpy as np
    import torch

    from shrinkml.formats import gguf_blocks as gb

    wanted = {"embedding": config.embedding_format, "output": config.output_format, "linear": config.format}
    codes: dict[str, Any] = {}
    formats: dict[str, int] = {}
    fallbacks: list[str] = []
    stored = weights = 0
    err_num = err_den = 0.0
    for name, param, role in _targets(model):
        w = param.detach().float().cpu().numpy()
        fmt = wanted[role]
        if not gb.fits(fmt, w.shape[1]):
            fmt = gb.LLAMA_CPP_FALLBACK.get(fmt, "Q8_0")
            fallbacks.append(f"{name} ({w.shape[1]} wide): {wanted[role]} -> {fmt}")
        c = gb.quantize_rtn(w, fmt)
        deq = gb.dequantize(c)
        with torch.no_grad():
            param.copy_(torch.from_numpy(deq).to(param.dtype))
        codes[name] = c
        formats[fmt] = formats.get(fmt, 0) + 1
        stored += gb.packed_nbytes(fmt, *w.shape)
        weights += w.size
        err_num += float(np.square(w - deq, dtype=np.float64).sum())
        err_den += float(np.square(w, dtype=np.float64).sum())
    summary = {
        "tensors": len(codes), "formats": formats, "weights": int(weights), "stored_bytes": int(stored),
        "bits_per_weight": round(8.0 * stored / max(weights, 1), 3),
        "weight_sqnr_db": round(10.0 * float(np.log10(err_den / err_num)), 2) if err_num > 0 else None,
        "fallbacks": fallbacks, "method": "rtn (llama.cpp's reference quantizers)",
    }
    return codes, summary


# measured on PyTorch (the dequantized weights) until a llama.cpp runtime measures the GGUF itself
@register("quantize.gguf", QuantizeGGUFConfig, accepts=("torch",), runtime="torch", stage="quantize", applies=_applies)
def apply(state: ModelState, config: QuantizeGGUFConfig, ctx: StepContext) -> StepResult:
    import copy

    from torch import nn

    model = state.torch_model
    if not hasattr(model, "get_input_embeddings") or not isinstance(model.get_input_embeddings(), nn.Embedding):
        from shrinkml.errors import InputError

        raise InputError("quantize.gguf takes a causal language model", where="quantize.gguf",
                         found=type(model).__name__, fix="use it on a model loaded from a .gguf file")
    model = copy.deepcopy(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # a deep copy keeps the tie, but say so for every transformers version
    ctx.progress.log(f"quantize.gguf: {config.format} weights, {config.embedding_format} embeddings (round to nearest)")
    codes, summary = quantize_model(model, config)
    new = ModelState("torch", torch_model=model.eval(), weight_codes=codes)
    return StepResult(new, summary)
