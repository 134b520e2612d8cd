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
    method: Literal["rtn", "imatrix", "gptq"] = Field(
        "rtn", description="rtn: llama.cpp's round to nearest; imatrix: each block's fp16 scale searched to"
        " minimize the error weighted by the mean squared input of its columns on the calibration windows"
        " (Q4_0, Q5_0, Q8_0; other formats round to nearest); gptq: error-compensating codes from the"
        " calibration windows (Linear weights in Q4_0 or Q8_0; embeddings imatrix)",
        json_schema_extra=searchable(choices=("rtn", "imatrix", "gptq")))
    calibration_windows: int = Field(32, ge=1, le=4096, description="gptq: calibration windows whose inputs make the Hessians")
    promote: int = Field(0, ge=0, le=100_000, description="how many of the most sensitive Linear weights take promote_format")
    promote_format: BlockFormatName = Field("Q8_0", description="the block format of the promoted weights")
    sensitivity_windows: int = Field(
        1, ge=1, le=256, description="calibration windows that measure each weight's sensitivity (one forward pass"
        " of them per Linear weight)")
    bits_per_weight: float | None = Field(
        None, ge=4.0, le=9.0, description="a size budget: every quantized tensor (the embedding included) takes"
        " one of candidate_formats so that the mean stored bits per weight stay within this, chosen to"
        " minimize the next-token KL measured tensor by tensor (format and embedding_format are then unused)")
    candidate_formats: tuple[BlockFormatName, ...] = Field(
        ("Q4_0", "Q5_0", "Q8_0"), min_length=1, description="bits_per_weight: the formats a tensor may take")
    awq: bool = Field(
        False, description="activation-aware scaling before quantizing: per input channel scales s = E[x^2]^(a/2),"
        " a searched per layer group, folded into the RMSNorm weights (q/k/v, gate/up) and the up_proj rows"
        " (down_proj), so the float model computes the same and the GGUF stays the same size (Llama-style"
        " decoders)")
    damp: float = Field(0.01, gt=0, lt=1, description="gptq: dampening added to the Hessian's diagonal, as a fraction of its mean")

    @model_validator(mode="after")
    def _gptq_formats(self) -> QuantizeGGUFConfig:
        if self.method == "gptq" and self.format not in GPTQ_FORMATS:
            raise ValueError(f"method gptq writes {' or '.join(GPTQ_FORMATS)} codes (one fp16 scale per 32 weights,"
                             f" symmetric); format {self.format} needs method rtn or imatrix")
        if self.bits_per_weight is not None:
            from shrinkml.formats.gguf_blocks import block_format

            if self.promote:
                raise ValueError("bits_per_weight chooses every tensor's format; promote chooses some: use one")
            if self.method == "gptq":
                raise ValueError("bits_per_weight is measured with method rtn or imatrix in this version, not gptq")
            cheapest = min(block_format(f).bits_per_weight for f in self.candidate_formats)
            if self.bits_per_weight < cheapest:
                raise ValueError(f"bits_per_weight {self.bits_per_weight} is below the cheapest candidate format"
                                 f" ({cheapest} bits per weight)")
            if any(block_format(f).super_block for f in self.candidate_formats):
                raise ValueError("candidate_formats are 32-weight block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) in this"
                                 " version: K-quants need rows of 256 weights")
        return self


def _applies(loaded: Any) -> str | None:
    if getattr(loaded, "lm", None) is None:
        return "not a causal language model"
    from shrinkml.models.causal_lm import gguf_refusal

    why = gguf_refusal(loaded)  # a directory is converted for its tokenizer and metadata
    return None if why is None else f"writing a GGUF needs its tokenizer and metadata in GGUF form: {why}"


_EMBEDDING = "model.embed_tokens.weight"  # the token embedding's key in the codes (Llama's Hugging Face name)


def _targets(model) -> list[tuple[str, Any, str]]:
    """``(hf name, parameter, role)`` of every weight the step quantizes, each tensor once."""
    from torch import nn

    seen: set[int] = set()
    out = []
    embed = model.get_input_embeddings()
    out.append((_EMBEDDING, embed.weight, "embedding"))
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

    from shrinkml.quant.sequential import recording_inputs

    modules = dict(model.named_modules())
    owner: dict[str, str] = {}
    accs: dict[str, Any] = {}
    tokens = 0
    with recording_inputs({n: modules[n] for n in names}, owner, accs) as batch_done, torch.inference_mode():
        for start in range(0, len(windows), batch):
            ids = torch.as_tensor(windows[start : start + batch], dtype=torch.long)
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
            batch_done()
    return accs, owner, tokens


def _kl_to(reference, logits) -> float:
    """Mean KL(reference || logits) per token, over the whole vocabulary."""
    import torch

    p = torch.log_softmax(reference.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def sensitivities(model, targets: list[tuple[str, Any, str]], quantized, windows, *,
                  include_embedding: bool = False) -> dict[str, float]:
    """Per weight: the mean next-token KL against the float model on ``windows`` when that weight
    alone takes the values ``quantized(name)`` (the others stay float). The embedding only with
    ``include_embedding`` (tied to the output head, it moves both)."""
    import torch

    ids = torch.as_tensor(windows, dtype=torch.long)
    with torch.inference_mode():
        reference = model(input_ids=ids, use_cache=False).logits
        out = {}
        for name, param, role in targets:
            if role == "embedding" and not include_embedding:
                continue
            saved = param.detach().clone()
            param.copy_(torch.from_numpy(quantized(name)).to(param.dtype))
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


def allocate(options: dict[str, list[tuple[int, float, str]]], budget_bytes: float) -> tuple[dict[str, str], float]:
    """Choose one option ``(bytes, estimated KL, format)`` per tensor, minimizing the summed KL with
    the summed bytes within ``budget_bytes``: every tensor starts at its smallest option, then the
    upgrades with the most KL saved per byte (on each tensor's lower convex hull, so a tensor's
    upgrades come in order) are taken while they fit. Returns (format by tensor, bytes used)."""
    choice: dict[str, int] = {}
    steps: list[tuple[float, str, int, int]] = []  # (KL saved per byte, tensor, from index, to index)
    hulls: dict[str, list[tuple[int, float, str]]] = {}
    used = 0.0
    for name, opts in options.items():
        pts = sorted(opts)
        hull: list[tuple[int, float, str]] = []
        for b, k, f in pts:  # monotone chain: keep points that lower the KL at a falling rate per byte
            if hull and k >= hull[-1][1]:
                continue
            while len(hull) >= 2:
                (b1, k1, _), (b2, k2, _) = hull[-2], hull[-1]
                if (k1 - k2) * (b - b2) <= (k2 - k) * (b2 - b1):  # the middle point is not below the chord
                    hull.pop()
                else:
                    break
            hull.append((b, k, f))
        hulls[name] = hull
        choice[name] = 0
        used += hull[0][0]
        for i in range(1, len(hull)):
            steps.append(((hull[i - 1][1] - hull[i][1]) / max(hull[i][0] - hull[i - 1][0], 1), name, i - 1, i))
    if used > budget_bytes:
        raise ValueError(f"the smallest formats take {used:,.0f} bytes, over the budget of {budget_bytes:,.0f}")
    steps.sort(key=lambda t: -t[0])
    blocked: set[str] = set()
    for _, name, i, j in steps:
        if name in blocked or choice[name] != i:
            continue
        extra = hulls[name][j][0] - hulls[name][i][0]
        if used + extra <= budget_bytes:
            choice[name] = j
            used += extra
        else:
            blocked.add(name)  # its later upgrades would skip this one
    return {name: hulls[name][i][2] for name, i in choice.items()}, used


def _importance(hessians: dict[str, Any], owner: dict[str, str], tokens: int) -> dict[str, Any]:
    """Mean squared input of every column (the diagonal of each input Gram matrix over the tokens
    it saw), by module name: what llama.cpp's importance matrix holds."""
    out = {}
    for name, own in owner.items():
        acc = hessians[own]
        out[name] = (acc.gram.diagonal() / max(acc.rows, 1)).float().numpy()
    return out


_AWQ_GRID = tuple(i / 10 for i in range(11))


def _awq_groups(model) -> list[tuple[Any, list[Any], str, Any]] | None:
    """Per decoder layer: (what takes 1/s, the Linears that take s, a label, the Linear whose input
    statistics they share). None for architectures without Llama's module names."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return None
    groups = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = (attn, mlp, getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if any(m is None for m in needed) or not all(hasattr(attn, f"{k}_proj") for k in "qkv") or not all(
                hasattr(mlp, f"{k}_proj") for k in ("gate", "up", "down")):
            return None
        groups.append((layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], f"model.layers.{i}.self_attn.q_proj", "norm"))
        groups.append((layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], f"model.layers.{i}.mlp.gate_proj", "norm"))
        groups.append((mlp.up_proj.weight, [mlp.down_proj], f"model.layers.{i}.mlp.down_proj", "rows"))
    return groups


def awq_scale(model, hessians: dict[str, Any], owner: dict[str, str], fmt_of, quantize) -> list[dict[str, Any]]:
    """Activation-aware scaling (AWQ's search, on the input Gram matrices instead of cached
    activations): for each group of Linears sharing one input, scales ``s = E[x^2]^(a/2)``
    (normalized to geometric mean 1) for ``a`` in 0, 0.1, ..., 1; the ``a`` whose quantized
    weights ``Q(W s) / s`` give the smallest output error ``tr(D H D^T)`` is applied: the Linears'
    columns times ``s``, what feeds them (an RMSNorm weight, or up_proj's rows for down_proj)
    divided by ``s``. ``quantize(w, fmt, importance)`` returns the dequantized weight."""
    import torch

    groups = _awq_groups(model)
    chosen = []
    with torch.no_grad():
        for feeder, linears, key, how in groups:
            acc = hessians[owner[key]]
            h = (acc.gram / max(acc.rows, 1)).float()
            mean_sq = h.diagonal().clamp(min=1e-12)
            weights = [m.weight.detach().float() for m in linears]
            best = (None, float("inf"), 0.0)
            for a in _AWQ_GRID:
                s = mean_sq.pow(a / 2)
                s = s / torch.exp(torch.log(s).mean())
                err = 0.0
                for m, w in zip(linears, weights):
                    scaled = (w * s).numpy()
                    deq = torch.from_numpy(quantize(scaled, fmt_of(m), (mean_sq / (s * s)).numpy())) / s
                    d = w - deq
                    err += float(((d @ h) * d).sum())
                if err < best[1]:
                    best = (s, err, a)
            s, err, a = best
            if a != 0.0:
                for m in linears:
                    m.weight.mul_(s.to(m.weight.dtype))
                if how == "norm":
                    feeder.div_(s.to(feeder.dtype))
                else:
                    feeder.div_(s.to(feeder.dtype)[:, None])
            chosen.append({"group": key.rsplit(".", 1)[0], "alpha": a})
    return chosen


def quantize_model(model, config: QuantizeGGUFConfig, calibration=None, progress=None, *,
                   layer_by_layer: bool | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize ``model``'s weights in place (their values become the dequantized codes; a lazy
    model's stay in their file); return ``(codes by Hugging Face name, summary)``. ``calibration``:
    token windows (``imatrix``, ``gptq``, ``promote`` and ``bits_per_weight`` read them).
    ``layer_by_layer``: walk one decoder layer at a time (None: whenever the config allows it, see
    :func:`streams`; False: the whole model at once, as promote, bits_per_weight and awq need)."""
    import numpy as np

    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.models.lazy import is_lazy, materialize_all

    def log(msg: str) -> None:
        if progress is not None:
            progress.log(f"quantize.gguf: {msg}")

    walkable = streams(config) and _walkable(model)
    if layer_by_layer and not walkable:
        raise ValueError("this config or model cannot be quantized one decoder layer at a time")
    if walkable and layer_by_layer is not False:
        return _quantize_streaming(model, config, calibration, log)
    if is_lazy(model):
        log("promote, bits_per_weight and awq measure the whole model: loading every weight")
        materialize_all(model)

    targets = _targets(model)
    params = {n: p for n, p, _ in targets}
    formats, fallbacks = _formats(targets, config)
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight

    hessians: dict[str, Any] = {}
    owner: dict[str, str] = {}
    calib_tokens = 0
    importance: dict[str, Any] = {}
    awq: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = {}  # float tensors the step changed (the norms AWQ divides)
    if config.awq:
        if _awq_groups(model) is None:
            raise ValueError("awq scales Llama-style decoders (input_layernorm, self_attn.q/k/v_proj,"
                             f" post_attention_layernorm, mlp.gate/up/down_proj); {type(model).__name__} has not those")
        linear = [name.removesuffix(".weight") for name, _, role in targets if role != "embedding"]
        log(f"awq: input statistics on {min(config.calibration_windows, len(calibration))} calibration windows")
        h0, o0, _ = calibration_hessians(model, calibration[: config.calibration_windows], linear)
        fmt_by_module = {id(params[n]): formats[n] for n in params}

        def quick(w, fmt, imp):
            c = gb.quantize_weighted(w, fmt, imp) if config.method != "rtn" and fmt in gb.WEIGHTED_FORMATS else gb.quantize_rtn(w, fmt)
            return gb.dequantize(c)

        awq = awq_scale(model, h0, o0, lambda m: fmt_by_module[id(m.weight)], quick)
        log(f"awq: {sum(1 for g in awq if g['alpha'])} of {len(awq)} groups scaled")
        del h0, o0
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                extra[name] = p.detach().float().numpy().copy()
    if config.method in ("imatrix", "gptq"):
        linear = [name.removesuffix(".weight") for name, _, role in targets if role != "embedding"]
        head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()] if tied else []
        log(f"input statistics of {len(linear) + len(head)} weights on {min(config.calibration_windows, len(calibration))}"
            " calibration windows")
        hessians, owner, calib_tokens = calibration_hessians(model, calibration[: config.calibration_windows], linear + head)
        by_module = _importance(hessians, owner, calib_tokens)
        importance = {f"{m}.weight": v for m, v in by_module.items() if f"{m}.weight" in params}
        if head and head[0] in by_module:  # the tied table is also the output head: its columns meet the final hidden state
            importance["model.embed_tokens.weight"] = by_module[head[0]]

    cache: dict[tuple[str, str], Any] = {}

    def codes_of(name: str, fmt: str):
        key = (name, fmt)
        if key not in cache:
            w = params[name].detach().float().cpu().numpy()
            if config.method != "rtn" and name in importance and fmt in gb.WEIGHTED_FORMATS:
                cache[key] = gb.quantize_weighted(w, fmt, importance[name])
            else:
                cache[key] = gb.quantize_rtn(w, fmt)
        return cache[key]

    promoted: list[dict[str, Any]] = []
    allocation: dict[str, Any] | None = None
    n_sens = min(config.sensitivity_windows, len(calibration)) if calibration is not None else 0
    if config.promote:
        log(f"measuring the sensitivity of {len(targets) - 1} weights on {n_sens} calibration windows")
        kl = sensitivities(model, targets, lambda n: gb.dequantize(codes_of(n, formats[n])), calibration[:n_sens])
        promote_fmt = config.promote_format
        for name in sorted(kl, key=kl.get, reverse=True)[: config.promote]:
            width = params[name].shape[1]
            fmt = promote_fmt if gb.fits(promote_fmt, width) else gb.LLAMA_CPP_FALLBACK.get(promote_fmt, "Q8_0")
            promoted.append({"tensor": name, "kl_alone": round(kl[name], 6), "from": formats[name], "to": fmt})
            formats[name] = fmt
    if config.bits_per_weight is not None:
        allocation = _allocate_formats(model, targets, config, codes_of, importance, calibration[:n_sens], log)
        formats.update(allocation.pop("formats"))
        fallbacks = []

    tally = _Tally()
    for name, param, role in targets:
        w = param.detach().float().cpu().numpy().copy()  # a copy: the parameter is overwritten below
        module_name = name.removesuffix(".weight")
        hessian = hessians[owner[module_name]] if module_name in owner else None
        c, by_gptq = _encode(w, formats[name], role, config, hessian, lambda n=name: codes_of(n, formats[n]))
        tally.add(name, w, c, param, gptq=by_gptq)
        if by_gptq and tally.gptq % 30 == 0:
            log(f"GPTQ {tally.gptq} Linear weights done")
    codes, counts, stored, weights, err_num, err_den, gptq_done = (
        tally.codes, tally.counts, tally.stored, tally.weights, tally.err_num, tally.err_den, tally.gptq)
    method = {"rtn": "rtn (llama.cpp's reference quantizers)",
              "imatrix": f"imatrix: fp16 scales searched for the error weighted by the mean squared input of each"
                         f" column ({calib_tokens:,} calibration tokens)",
              "gptq": f"gptq on {gptq_done} Linear weights ({calib_tokens:,} calibration tokens), imatrix on the rest"}
    summary = {
        "tensors": len(codes), "formats": counts, "weights": int(weights), "stored_bytes": int(stored),
        "bits_per_weight": round(8.0 * stored / max(weights, 1), 3),
        "weight_sqnr_db": round(10.0 * float(np.log10(err_den / err_num)), 2) if err_num > 0 else None,
        "fallbacks": fallbacks,
        "promoted": promoted,  # the most sensitive weights, by next-token KL when quantized alone
        "method": method[config.method],
    }
    if allocation is not None:
        summary["allocation"] = allocation
    if awq is not None:
        summary["awq"] = {"groups": len(awq), "scaled": sum(1 for g in awq if g["alpha"]),
                          "alpha_counts": {str(a): sum(1 for g in awq if g["alpha"] == a) for a in sorted({g["alpha"] for g in awq})},
                          "rule": "a per group by the smallest tr(D H D^T) of the quantized weights on the calibration inputs"}
        codes.update(extra)  # the divided norms: float32, written as F32 like the source's
    return codes, summary


class _Tally:
    """The codes chosen so far and the summary's figures; writes each tensor's dequantized values
    into its parameter when there is one to write (a lazy model's parameters have no storage)."""

    def __init__(self) -> None:
        self.codes: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.stored = self.weights = self.gptq = 0
        self.err_num = self.err_den = 0.0

    def add(self, name: str, w, c, param, *, gptq: bool = False) -> None:
        import numpy as np
        import torch

        from shrinkml.formats import gguf_blocks as gb

        if param is not None and not param.is_meta:
            deq = gb.dequantize(c)
            with torch.no_grad():
                param.copy_(torch.from_numpy(deq).to(param.dtype))
            self._error(w, deq)
        else:  # nothing to write: the error row block by row block (bounded temporaries)
            for i in range(0, len(w), _ROWS):
                rows = np.arange(i, min(i + _ROWS, len(w)))
                self._error(w[rows], gb.dequantize(c.take_rows(rows)))
        self.gptq += int(gptq)
        self.codes[name] = c
        self.counts[c.fmt.name] = self.counts.get(c.fmt.name, 0) + 1
        self.stored += gb.packed_nbytes(c.fmt.name, *w.shape)
        self.weights += w.size

    def _error(self, w, deq) -> None:
        import numpy as np

        self.err_num += float(np.square(w - deq, dtype=np.float64).sum())
        self.err_den += float(np.square(w, dtype=np.float64).sum())


def _encode(w, fmt: str, role: str, config: QuantizeGGUFConfig, hessian, fallback):
    """``(codes, by GPTQ)`` of one tensor: GPTQ for a Linear in a GPTQ format with calibration
    statistics under ``method: gptq``, else ``fallback()`` (the rtn / importance-weighted codes)."""
    if config.method == "gptq" and role != "embedding" and fmt in _GPTQ_BITS and hessian is not None:
        import torch

        from shrinkml.formats import gguf_blocks as gb
        from shrinkml.quant.gptq import gptq_quantize

        g = gptq_quantize(torch.from_numpy(w), hessian.hessian(), bits=_GPTQ_BITS[fmt], group_size=32,
                          symmetric=True, damp=config.damp, params=_fp16_params)
        return gb.from_group_params(g.codes.numpy(), g.scales.numpy(), None, fmt, bits=_GPTQ_BITS[fmt]), True
    return fallback(), False


def streams(config: QuantizeGGUFConfig) -> bool:
    """Whether ``config`` chooses each tensor's codes from its own layer's statistics (so the model
    can be walked one decoder layer at a time): not promote, bits_per_weight or awq, which measure
    or change the whole model."""
    return not config.promote and config.bits_per_weight is None and not config.awq


def _walkable(model) -> bool:
    """Whether every Linear of ``model`` is inside its decoder layers or is its output head."""
    from torch import nn

    from shrinkml.models.lazy import decoder_layers

    parts = decoder_layers(model)
    if parts is None:
        return False
    prefix = parts[1] + "."
    head = model.get_output_embeddings()
    return all(name.startswith(prefix) or m is head for name, m in model.named_modules() if isinstance(m, nn.Linear))


_ROWS = 4096  # rows quantized at once by the layer-by-layer route


class _SourceRows:
    """A weight that stays in its source, read by rows when sliced (``w[i:j]``, ``w[index]``): what
    the layer-by-layer route quantizes the embedding table from, in bounded row blocks."""

    def __init__(self, source, name: str, shape: tuple[int, int]) -> None:
        self.source, self.name, self.shape = source, name, shape
        self.size = shape[0] * shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        import numpy as np

        rows = np.arange(*index.indices(self.shape[0])) if isinstance(index, slice) else np.asarray(index)
        return self.source.rows(self.name, rows)


def _quantize_streaming(model, config: QuantizeGGUFConfig, calibration, log) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`quantize_model` one decoder layer at a time (``shrinkml.quant.sequential``): each
    layer's weights live only while its statistics are taken and its codes chosen; a lazy model's
    weights are read from their file then. The same codes as the one-pass route (tested)."""
    import numpy as np

    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.models.lazy import is_lazy, source_of
    from shrinkml.quant.sequential import layer_by_layer

    targets = _targets(model)
    formats, fallbacks = _formats(targets, config)
    roles = {n: role for n, _, role in targets}
    by_module = {n.removesuffix(".weight"): n for n in roles}
    source = source_of(model)
    write_back = not is_lazy(model)  # a lazy model's weights stay its file's: the codes are the result
    tally = _Tally()

    def current(name: str):  # looked up when used: a lazy layer's parameters are new once materialized
        param = model.get_input_embeddings().weight if name == _EMBEDDING else model.get_parameter(name)
        if param.is_meta and roles[name] != "linear" and hasattr(source, "rows"):
            # a vocabulary-sized table (the embedding, an untied head): a few thousand rows at a time
            return _SourceRows(source, name, tuple(param.shape)), None
        w = (source.get(name) if param.is_meta else param.detach()).float().cpu().numpy()
        if write_back:
            return w.copy(), param  # a copy: the parameter is overwritten with the codes' values
        return w, None

    def encode(name: str, w, hessian, importance) -> Any:
        fmt = formats[name]
        weighted = importance is not None and config.method != "rtn" and fmt in gb.WEIGHTED_FORMATS

        def rest():
            # blocks lie along rows: quantizing a few thousand rows at a time gives the same codes, and
            # bounds the quantizers' temporaries (the embedding table is the largest tensor)
            parts = [gb.quantize_weighted(w[i : i + _ROWS], fmt, importance) if weighted else gb.quantize_rtn(w[i : i + _ROWS], fmt)
                     for i in range(0, len(w), _ROWS)]
            return gb.BlockCodes.concat_rows(parts)

        return _encode(w, fmt, roles[name], config, hessian, rest)

    calib_tokens = 0
    if config.method == "rtn":
        for name, _, _ in targets:
            w, param = current(name)
            c, _ = encode(name, w, None, None)
            tally.add(name, w, c, param)
    else:
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        linear = {n.removesuffix(".weight") for n, r in roles.items() if r == "linear"}
        windows = calibration[: config.calibration_windows]
        log(f"input statistics of {len(linear) + (head_name is not None)} weights on {len(windows)} calibration"
            " windows, one decoder layer at a time")
        for stats in layer_by_layer(model, windows, linear, head_name=head_name):
            calib_tokens = stats.tokens
            for module_name, own in stats.owner.items():
                acc = stats.accumulators[own]
                importance = (acc.gram.diagonal() / max(acc.rows, 1)).float().numpy()
                if stats.index is None:  # the output head: its own weight, or the tied embedding table
                    name = by_module.get(module_name) or _EMBEDDING
                else:
                    name = by_module[module_name]
                w, param = current(name)
                c, by_gptq = encode(name, w, acc, importance)
                tally.add(name, w, c, param, gptq=by_gptq)
                if by_gptq and tally.gptq % 30 == 0:
                    log(f"GPTQ {tally.gptq} Linear weights done")
            stats.accumulators.clear()
        for name, _, _ in targets:  # the untied embedding (and anything no layer fed) rounds to nearest
            if name not in tally.codes:
                w, param = current(name)
                c, _ = encode(name, w, None, None)
                tally.add(name, w, c, param)
    codes = {name: tally.codes[name] for name, _, _ in targets}  # the model's order
    method = {"rtn": "rtn (llama.cpp's reference quantizers)",
              "imatrix": f"imatrix: fp16 scales searched for the error weighted by the mean squared input of each"
                         f" column ({calib_tokens:,} calibration tokens)",
              "gptq": f"gptq on {tally.gptq} Linear weights ({calib_tokens:,} calibration tokens), imatrix on the rest"}
    summary = {
        "tensors": len(codes), "formats": tally.counts, "weights": int(tally.weights), "stored_bytes": int(tally.stored),
        "bits_per_weight": round(8.0 * tally.stored / max(tally.weights, 1), 3),
        "weight_sqnr_db": (round(10.0 * float(np.log10(tally.err_den / tally.err_num)), 2) if tally.err_num > 0 else None),
        "fallbacks": fallbacks,
        "promoted": [],
        "method": method[config.method],
        "calibration": ("none (round to nearest)" if config.method == "rtn" else
                        "one decoder layer at a time: each layer's weights live while its statistics are taken and"
                        " its codes chosen"),
    }
    return codes, summary


def _allocate_formats(model, targets, config: QuantizeGGUFConfig, codes_of, importance, windows, log) -> dict[str, Any]:
    """``bits_per_weight``: measure each tensor's KL alone in its cheapest candidate format, estimate
    the others' by their (importance-weighted) squared error relative to it, and allocate."""
    import numpy as np

    from shrinkml.formats import gguf_blocks as gb

    cands = sorted(set(config.candidate_formats), key=lambda f: gb.block_format(f).bits_per_weight)
    params = {n: p for n, p, _ in targets}
    cheapest = {}
    for name, param, _ in targets:
        fits = [f for f in cands if gb.fits(f, param.shape[1])]
        if not fits:
            raise ValueError(f"{name} is {param.shape[1]} wide: none of {cands} fits it")
        cheapest[name] = fits[0]
    log(f"bits_per_weight {config.bits_per_weight}: the KL of each of {len(targets)} tensors alone in"
        f" {'/'.join(sorted(set(cheapest.values())))}, on {len(windows)} calibration windows")
    kl = sensitivities(model, targets, lambda n: gb.dequantize(codes_of(n, cheapest[n])), windows, include_embedding=True)

    def error(name: str, fmt: str) -> float:
        w = params[name].detach().float().cpu().numpy()
        diff = np.square(w - gb.dequantize(codes_of(name, fmt)), dtype=np.float64)
        imp = importance.get(name)
        return float((diff * imp[None, :]).sum() if imp is not None else diff.sum())

    options: dict[str, list[tuple[int, float, str]]] = {}
    weights = 0
    for name, param, _ in targets:
        rows, cols = param.shape
        weights += rows * cols
        base = error(name, cheapest[name])
        opts = []
        for fmt in cands:
            if not gb.fits(fmt, cols):
                continue
            ratio = error(name, fmt) / base if base > 0 else 0.0
            opts.append((gb.packed_nbytes(fmt, rows, cols), kl[name] * ratio, fmt))
        options[name] = opts
    budget = config.bits_per_weight * weights / 8.0
    chosen, used = allocate(options, budget)
    est = {name: next(k for b, k, f in options[name] if f == chosen[name]) for name in chosen}
    upgraded = sorted((n for n in chosen if chosen[n] != cheapest[n]), key=lambda n: -kl[n])
    return {
        "formats": chosen,
        "budget_bits_per_weight": config.bits_per_weight,
        "bits_per_weight": round(8.0 * used / weights, 4),
        "estimated_kl_sum": round(float(sum(est.values())), 6),
        "kl_alone_cheapest_sum": round(float(sum(kl.values())), 6),
        "tensors_by_format": {f: sum(1 for v in chosen.values() if v == f) for f in cands},
        "upgraded": [{"tensor": n, "kl_alone": round(kl[n], 6), "format": chosen[n]} for n in upgraded],
        "rule": "KL of each tensor alone in its cheapest candidate format measured; other formats estimated"
                " by their squared error (weighted by input importance with imatrix) relative to it; the"
                " upgrades saving the most KL per byte taken while the budget allows",
    }


# the state is a PyTorch model holding the dequantized codes (what --runtime torch measures); the GGUF the
# pipeline writes from its codes is what --runtime llamacpp measures
@register("quantize.gguf", QuantizeGGUFConfig, accepts=("torch",), runtime="torch", stage="quantize", applies=_applies,
          causal_lm=True)
def apply(state: ModelState, config: QuantizeGGUFConfig, ctx: StepContext) -> StepResult:
    import copy

    from torch import nn

    model = state.torch_model
    if not hasattr(model, "get_input_embeddings") or not isinstance(model.get_input_embeddings(), nn.Embedding):
        from shrinkml.errors import InputError

        raise InputError("quantize.gguf takes a causal language model", where="quantize.gguf",
                         found=type(model).__name__, fix="use it on a model loaded from a .gguf file")
    ctx.progress.log(f"quantize.gguf: {config.format} weights ({config.method}), {config.embedding_format} embeddings")
    calibration = None
    if config.method != "rtn" or config.promote or config.bits_per_weight is not None:
        calibration = ctx.splits.calibration.x
        if not len(calibration):
            from shrinkml.errors import InputError

            raise InputError("quantize.gguf with method imatrix or gptq, promote or bits_per_weight needs calibration"
                             " windows, and the split has none", where="quantize.gguf",
                             fix="give more text, or use method rtn, promote 0 and no bits_per_weight")
    from shrinkml.models.lazy import (
        CodesWeights,
        attach,
        is_lazy,
        meta_copy,
        retie,
        source_of,
    )

    if is_lazy(model) and streams(config) and _walkable(model):
        # the weights stay in their file: the walk materializes one layer at a time (values unchanged) and
        # the result is a model without storage whose weights are the codes (CodesWeights)
        codes, summary = quantize_model(model, config, calibration, ctx.progress)
        out = meta_copy(model)
        attach(out, CodesWeights(codes, source_of(model)))
        return StepResult(ModelState("torch", torch_model=out.eval(), weight_codes=codes), summary)
    model = copy.deepcopy(model)
    retie(model)  # a deep copy keeps the tie, but say so for every transformers version
    codes, summary = quantize_model(model, config, calibration, ctx.progress)
    new = ModelState("torch", torch_model=model.eval(), weight_codes=codes)
    return StepResult(new, summary)
