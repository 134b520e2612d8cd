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

Mixed precision by measurement, not a fixed table (llama.cpp's ``_K_M`` mixes use one): with
``promote: N`` every Linear weight is quantized alone (the rest float) on ``sensitivity_windows``
calibration windows, and the ``N`` whose next-token KL against the float model is largest take
``promote_format``; the summary lists them with their KL.

Norms and biases stay float32, as llama.cpp keeps them. The step records the codes on the model
state (``weight_codes``, Hugging Face tensor names), which the GGUF writer stores as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.techniques.base import StepConfig, register, searchable

BlockFormatName = Literal["Q8_0", "Q6_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0"]
GPTQ_FORMATS = ("Q4_0", "Q8_0")  # symmetric blocks of 32 with one fp16 scale: GPTQ's group layout
_GPTQ_BITS = {"Q4_0": 4, "Q8_0": 8}


class QuantizeGGUFConfig(StepConfig):
    """llama.cpp block formats for a causal LM's weights (round-to-nearest)."""

    technique: Literal["quantize.gguf"] = Field("quantize.gguf", description="llama.cpp block formats for a causal LM")
    format: BlockFormatName = Field(
        "Q4_0", description="block format of every decoder Linear weight",
        json_schema_extra=searchable(choices=("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")))
    embedding_format: BlockFormatName = Field(
        "Q8_0", description="block format of the token embedding table (also the output head when tied)")
    output_format: BlockFormatName = Field("Q6_K", description="block format of an untied lm_head")
    method: Literal["rtn", "gptq"] = Field(
        "rtn", description="rtn: llama.cpp's round to nearest; gptq: error-compensating codes from the"
        " calibration windows (Linear weights in Q4_0 or Q8_0; embeddings stay round to nearest)",
        json_schema_extra=searchable(choices=("rtn", "gptq")))
    calibration_windows: int = Field(32, ge=1, le=4096, description="gptq: calibration windows whose inputs make the Hessians")
    promote: int = Field(0, ge=0, le=100_000, description="how many of the most sensitive Linear weights take promote_format")
    promote_format: BlockFormatName = Field("Q8_0", description="the block format of the promoted weights")
    sensitivity_windows: int = Field(
        1, ge=1, le=256, description="calibration windows that measure each weight's sensitivity (one forward pass"
        " of them per Linear weight)")
    damp: float = Field(0.01, gt=0, lt=1, description="gptq: dampening added to the Hessian's diagonal, as a fraction of its mean")

    @model_validator(mode="after")
    def _gptq_formats(self) -> QuantizeGGUFConfig:
        if self.method == "gptq" and self.format not in GPTQ_FORMATS:
            raise ValueError(f"method gptq writes {' or '.join(GPTQ_FORMATS)} codes (one fp16 scale per 32 weights,"
                             f" symmetric); format {self.format} needs method rtn")
        return self


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


def _fp16_params(group, bits: int, symmetric: bool):
    """ONNX Runtime's symmetric group rule with the scale rounded to fp16, as llama.cpp stores it."""
    from shrinkml.quant.weight_codec import group_params

    scale, zero = group_params(group, bits, symmetric)
    return scale.half().float(), zero


def calibration_hessians(model, windows, names: list[str], *, batch: int = 4) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(accumulators, owner, tokens)``: the input Gram matrix of every Linear in ``names`` over the
    calibration windows, one accumulator per distinct input (q/k/v share theirs, gate/up theirs):
    ``owner[name]`` names the module whose accumulator ``name`` uses."""
    import torch

    from shrinkml.quant.gptq import HessianAccumulator

    modules = dict(model.named_modules())
    owner: dict[str, str] = {}
    accs: dict[str, HessianAccumulator] = {}
    seen: dict[int, str] = {}
    alive: list = []  # the first batch's inputs stay referenced, so no two of them share an id

    def hook(name: str):
        def record(_module, args):
            x = args[0]
            if name not in owner:
                owner[name] = seen.setdefault(id(x), name)
                alive.append(x)
                if owner[name] == name:
                    accs[name] = HessianAccumulator(x.shape[-1])
            if owner[name] == name:
                accs[name].add(x)
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    tokens = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch):
                ids = torch.as_tensor(windows[start : start + batch], dtype=torch.long)
                model(input_ids=ids, use_cache=False)
                tokens += ids.numel()
                alive.clear()
    finally:
        for h in handles:
            h.remove()
    return accs, owner, tokens


def _kl_to(reference, logits) -> float:
    """Mean KL(reference || logits) per token, over the whole vocabulary."""
    import torch

    p = torch.log_softmax(reference.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def sensitivities(model, targets: list[tuple[str, Any, str]], formats: dict[str, str], windows) -> dict[str, float]:
    """Per Linear weight: the mean next-token KL against the float model on ``windows`` when that
    weight alone is round-to-nearest quantized to its format (the others stay float)."""
    import torch

    from shrinkml.formats import gguf_blocks as gb

    ids = torch.as_tensor(windows, dtype=torch.long)
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits
        out = {}
        for name, param, role in targets:
            if role == "embedding":
                continue
            saved = param.detach().clone()
            w = saved.float().numpy()
            param.copy_(torch.from_numpy(gb.dequantize(gb.quantize_rtn(w, formats[name]))).to(param.dtype))
            out[name] = _kl_to(reference, model(input_ids=ids, use_cache=False).logits)
            param.copy_(saved)
    return out


def _formats(targets, config: QuantizeGGUFConfig) -> tuple[dict[str, str], list[str]]:
    """Each target's block format (its role's, or llama.cpp's fallback where rows do not fit)."""
    from shrinkml.formats import gguf_blocks as gb

    wanted = {"embedding": config.embedding_format, "output": config.output_format, "linear": config.format}
    formats, fallbacks = {}, []
    for name, param, role in targets:
        fmt = wanted[role]
        if not gb.fits(fmt, param.shape[1]):
            fmt = gb.LLAMA_CPP_FALLBACK.get(fmt, "Q8_0")
            fallbacks.append(f"{name} ({param.shape[1]} wide): {wanted[role]} -> {fmt}")
        formats[name] = fmt
    return formats, fallbacks


def quantize_model(model, config: QuantizeGGUFConfig, calibration=None, progress=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize ``model``'s weights in place (their values become the dequantized codes); return
    ``(codes by Hugging Face name, summary)``. ``calibration``: token windows for ``gptq``."""
    import numpy as np
    import torch

    from shrinkml.formats import gguf_blocks as gb

    targets = _targets(model)
    formats, fallbacks = _formats(targets, config)
    promoted: list[dict[str, Any]] = []
    if config.promote:
        if progress is not None:
            progress.log(f"quantize.gguf: measuring the sensitivity of {len(targets) - 1} weights on"
                         f" {min(config.sensitivity_windows, len(calibration))} calibration windows")
        kl = sensitivities(model, targets, formats, calibration[: config.sensitivity_windows])
        promote_fmt = config.promote_format
        widths = {n: p.shape[1] for n, p, _ in targets}
        for name in sorted(kl, key=kl.get, reverse=True)[: config.promote]:
            fmt = promote_fmt if gb.fits(promote_fmt, widths[name]) else gb.LLAMA_CPP_FALLBACK.get(promote_fmt, "Q8_0")
            promoted.append({"tensor": name, "kl_alone": round(kl[name], 6), "from": formats[name], "to": fmt})
            formats[name] = fmt
    hessians: dict[str, Any] = {}
    owner: dict[str, str] = {}
    calib_tokens = 0
    if config.method == "gptq":
        linear = [name.removesuffix(".weight") for name, _, role in targets if role != "embedding"]
        hessians, owner, calib_tokens = calibration_hessians(model, calibration[: config.calibration_windows], linear)

    codes: dict[str, Any] = {}
    counts: dict[str, int] = {}
    stored = weights = 0
    err_num = err_den = 0.0
    gptq_done = 0
    for name, param, role in targets:
        w = param.detach().float().cpu().numpy().copy()  # a copy: the parameter is overwritten below
        fmt = formats[name]
        module_name = name.removesuffix(".weight")
        if config.method == "gptq" and role != "embedding" and fmt in _GPTQ_BITS and module_name in owner:
            from shrinkml.quant.gptq import gptq_quantize

            g = gptq_quantize(torch.from_numpy(w), hessians[owner[module_name]].hessian(), bits=_GPTQ_BITS[fmt],
                              group_size=32, symmetric=True, damp=config.damp, params=_fp16_params)
            c = gb.from_group_params(g.codes.numpy(), g.scales.numpy(), None, fmt, bits=_GPTQ_BITS[fmt])
            gptq_done += 1
            if progress is not None and gptq_done % 30 == 0:
                progress.log(f"quantize.gguf: GPTQ {gptq_done} Linear weights done")
        else:
            c = gb.quantize_rtn(w, fmt)
        deq = gb.dequantize(c)
        with torch.no_grad():
            param.copy_(torch.from_numpy(deq).to(param.dtype))
        codes[name] = c
        counts[fmt] = counts.get(fmt, 0) + 1
        stored += gb.packed_nbytes(fmt, *w.shape)
        weights += w.size
        err_num += float(np.square(w - deq, dtype=np.float64).sum())
        err_den += float(np.square(w, dtype=np.float64).sum())
    summary = {
        "tensors": len(codes), "formats": counts, "weights": int(weights), "stored_bytes": int(stored),
        "bits_per_weight": round(8.0 * stored / max(weights, 1), 3),
        "weight_sqnr_db": round(10.0 * float(np.log10(err_den / err_num)), 2) if err_num > 0 else None,
        "fallbacks": fallbacks,
        "promoted": promoted,  # the most sensitive weights, by next-token KL when quantized alone
        "method": "rtn (llama.cpp's reference quantizers)" if config.method == "rtn" else
        f"gptq on {gptq_done} Linear weights ({calib_tokens:,} calibration tokens), rtn on the rest",
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
    ctx.progress.log(f"quantize.gguf: {config.format} weights ({config.method}), {config.embedding_format} embeddings")
    calibration = None
    if config.method == "gptq" or config.promote:
        calibration = ctx.splits.calibration.x
        if not len(calibration):
            from shrinkml.errors import InputError

            raise InputError("quantize.gguf with method gptq or promote needs calibration windows, and the split"
                             " has none", where="quantize.gguf", fix="give more text, or use method rtn and promote 0")
    codes, summary = quantize_model(model, config, calibration, ctx.progress)
    new = ModelState("torch", torch_model=model.eval(), weight_codes=codes)
    return StepResult(new, summary)
