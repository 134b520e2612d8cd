"""``quantize.bf16``: bfloat16 compute in PyTorch, with INT8 weights on disk.

On CPUs with native bfloat16 matrix units (Intel AMX or AVX512-BF16, recent AMD) PyTorch's oneDNN
kernels multiply bfloat16 several times faster than float32, with an 8-bit mantissa that keeps
transformer outputs within ~1e-3 cosine of float32. ONNX Runtime's CPU provider has no bfloat16
MatMul (1.32), so this step keeps the model in PyTorch (``--runtime torch``).

``weights: int8`` (the default) stores every Linear weight (and, with ``quantize_embeddings``, every
embedding table) as symmetric INT8 codes with one float32 scale per output channel (per row for
embeddings): the safetensors file holds the codes, about a quarter of the float32 bytes. When the
module is built (or loaded) the codes are dequantized once into the bfloat16 weight the kernels use,
so memory holds the codes and the bfloat16 weight; the report's peak-memory figure shows it.
``weights: bfloat16`` stores the bfloat16 weights themselves (half the float32 bytes).

The file is self-contained: besides every tensor (codes, scales, the other weights in bfloat16) its
metadata holds what builds the architecture without the original weights: for Hugging Face models the
transformers config and the ``TextEncoder`` settings (kind, pooling, normalize, pad id), so
``load_int8("model.safetensors")`` needs nothing else; for factory models the architecture is the
user's code, ``load_int8("model.safetensors", model=factory())``, and the factory's weights are never
read (every parameter and buffer must come from the file). ``save_int8`` writes such a file.

Inputs that are floating point are cast to bfloat16 and outputs back to float32, so callers see
float32 as before. Whether the CPU has native bfloat16 is read from the machine and stated in the
summary: without it PyTorch emulates bfloat16 and the step makes the model slower, which the
report's latency figures show.

Recipe step (with ``--runtime torch``)::

    - technique: quantize.bf16
      weights: int8
      quantize_embeddings: true
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from shrinkml.core.types import ModelState, StepContext, StepResult
from shrinkml.errors import InputError
from shrinkml.techniques.base import StepConfig, register

if TYPE_CHECKING:
    from torch import nn

# The INT8 modules live on the torch side (shrinkml.nn.int8), so that importing this module (to
# validate a recipe) imports no torch; their names still import from here, on first use.
_MOVED_TO_NN = ("Int8Linear", "Int8Embedding", "dequantized_copy", "has_int8_modules")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_NN:
        from shrinkml.nn import int8

        return getattr(int8, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

WHERE = "quantize.bf16"


class QuantizeBf16Config(StepConfig):
    """bfloat16 compute in PyTorch; Linear (and embedding) weights stored as INT8 codes or bfloat16."""

    technique: Literal["quantize.bf16"] = Field("quantize.bf16", description="the technique this step runs")
    weights: Literal["int8", "bfloat16"] = Field(
        "int8",
        description="how Linear (and embedding) weights are stored on disk: int8 = symmetric per-output-channel"
        " INT8 codes with float32 scales (about 1/4 of float32), bfloat16 = the bfloat16 weights (1/2);"
        " computation is bfloat16 either way",
    )
    quantize_embeddings: bool = Field(
        True, description="store nn.Embedding tables as per-row INT8 codes too (weights: int8 only)"
    )
    method: Literal["rtn", "gptq"] = Field(
        "rtn",
        description="how Linear weights become INT8 codes (weights: int8): rtn = round each weight to its row's"
        " grid; gptq = GPTQ on the same per-row grid, each rounding error compensated on the row's remaining"
        " weights using the layer's inputs on the calibration split (real tokens only for text models);"
        " embedding tables are rounded either way",
    )
    damp: float = Field(
        0.01, gt=0, lt=1, description="GPTQ's dampening, as a fraction of the Hessian's mean diagonal (method: gptq)"
    )
    keep_float: tuple[str, ...] = Field(
        (),
        description="module-name globs (e.g. 'classifier'; a module and everything inside it) of Linear / Embedding layers stored as"
        " bfloat16 instead of INT8 (weights: int8 only); every glob must match a module",
    )


# --- the self-contained file ----------------------------------------------------------------------

FORMAT = "shrinkml.quantize_bf16/1"
_FORMAT_KEY = "shrinkml.format"
_ARCH_KEY = "shrinkml.architecture"
# attributes prune.heads changes on a BERT self-attention, which its transformers config cannot express
_HEAD_ATTRS = ("num_attention_heads", "all_head_size")


def is_bf16_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``quantize.bf16`` output (INT8 modules or its bfloat16 input hook)."""
    from shrinkml.nn.int8 import has_int8_modules, inputs_to_bf16

    return has_int8_modules(model) or any(h is inputs_to_bf16 for h in model._forward_pre_hooks.values())


def _is_transformers_model(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") and hasattr(getattr(module, "config", None), "to_json_string")


def file_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata that makes a ``quantize.bf16`` output's file loadable on its own with
    ``load_int8``: the format and the architecture (JSON). ``{}`` for any other model.

    For a Hugging Face model (or a ``TextEncoder`` around one): its transformers class and config, its
    attention implementation and the ``TextEncoder`` settings; for any other module only its class
    name (for the reader: the user's factory builds it). Either way, the modules the step removed
    (``None`` children, e.g. an embedding model's unused pooler) and, for head-pruned attention, the
    head counts the config cannot express.
    """
    if not is_bf16_model(model):
        return {}
    from shrinkml.models.text import TextEncoder

    removed = [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name, child in module._modules.items()
        if child is None
    ]
    transformer = model.transformer if isinstance(model, TextEncoder) else model
    arch: dict[str, Any]
    if _is_transformers_model(transformer):
        config = transformer.config
        cfg = json.loads(config.to_json_string(use_diff=False))
        cfg.pop("_name_or_path", None)  # a local path of the original: not needed, not to be shared
        heads = {
            name: {a: int(getattr(m, a)) for a in _HEAD_ATTRS}
            for name, m in model.named_modules()
            if all(isinstance(getattr(m, a, None), int) for a in _HEAD_ATTRS)
            and int(m.num_attention_heads) != int(getattr(config, "num_attention_heads", m.num_attention_heads))
        }
        arch = {
            "builder": "transformers",
            "class": type(transformer).__name__,
            "config": cfg,
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "attention_heads": heads,
        }
        if isinstance(model, TextEncoder):
            arch["text_encoder"] = {
                "kind": model.kind, "pooling": model.pooling, "normalize": bool(model.normalize),
                "pad_token_id": int(model.pad_token_id),
                **({"unpad": True} if getattr(model, "unpad", False) else {}),
            }
    else:
        arch = {"builder": "factory", "class": f"{type(model).__module__}.{type(model).__qualname__}"}
    arch["removed_modules"] = removed
    return {_FORMAT_KEY: FORMAT, _ARCH_KEY: json.dumps(arch, sort_keys=True)}


def save_int8(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> dict:
    """Write a ``quantize.bf16`` output as one self-contained safetensors file (every tensor plus
    ``file_metadata``), atomically. Returns ``save_state_dict``'s summary (``bytes`` on disk).

    >>> save_int8(result.state.torch_model, "model.safetensors")  # doctest: +SKIP
    """
    from shrinkml.models.safetensors_io import save_state_dict

    if not is_bf16_model(model):
        raise InputError(
            "save_int8 writes quantize.bf16 outputs only",
            where="save_int8(model)",
            expected="the model a quantize.bf16 step returned",
            found=f"a {type(model).__name__} without INT8 modules or bfloat16 hooks",
            fix="apply quantize.bf16 first, or save other models with save_state_dict",
        )
    return save_state_dict(model.state_dict(), path, metadata={**(metadata or {}), **file_metadata(model)})


def load_instruction(model: nn.Module, file: str = "model.safetensors") -> str:
    """How a user loads ``model``'s file (for the run's manifest): the file alone for Hugging Face
    models, the file plus the factory's architecture otherwise."""
    arch = json.loads(file_metadata(model).get(_ARCH_KEY, '{"builder": "factory"}'))
    if arch["builder"] == "transformers":
        return (f"shrinkml.techniques.quantize_bf16.load_int8({file!r}) (self-contained: INT8 codes, scales,"
                " bfloat16 weights and the transformers config in one file; bfloat16 compute)")
    return (f"shrinkml.techniques.quantize_bf16.load_int8({file!r}, model=factory()) (the factory builds the"
            " architecture, its weights are never read; every tensor comes from the file; bfloat16 compute)")


def _architecture(path: str) -> dict[str, Any] | None:
    """The file's architecture record, None for a file written before it had one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _FORMAT_KEY not in metadata and _ARCH_KEY not in metadata:
        return None
    bad = None
    if metadata.get(_FORMAT_KEY) != FORMAT:
        bad = f"{_FORMAT_KEY} = {str(metadata.get(_FORMAT_KEY))[:80]!r}"
    else:
        try:
            arch = json.loads(metadata.get(_ARCH_KEY, ""))
        except (ValueError, RecursionError):
            arch = None
        if not isinstance(arch, dict) or arch.get("builder") not in ("transformers", "factory"):
            bad = f"an unreadable {_ARCH_KEY}"
        elif not isinstance(arch.get("removed_modules", []), list) or not isinstance(arch.get("attention_heads", {}), dict):
            bad = f"malformed removed_modules / attention_heads in {_ARCH_KEY}"
    if bad:
        raise InputError(
            "the file's shrinkml metadata cannot be read",
            where=str(path),
            expected=f"{_FORMAT_KEY} = {FORMAT!r} with a JSON {_ARCH_KEY}",
            found=bad,
            fix="write the file again with this shrinkml version (quantize.bf16), or pass model= the architecture",
        )
    return arch


def _build_transformers(arch: dict[str, Any], where: str) -> nn.Module:
    """The architecture from the stored transformers config: no weights read or downloaded."""
    try:
        import transformers
    except ImportError:
        raise InputError(
            "this file holds a Hugging Face model; building it needs the transformers package",
            where=where, fix="pip install 'shrinkml[text]'",
        ) from None
    from shrinkml.models.text import TextEncoder

    cfg, name = arch.get("config"), arch.get("class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)) or not isinstance(cfg, dict):
        raise InputError(
            "the file's architecture is not a transformers model class with a config",
            where=where,
            expected="a transformers model class (e.g. BertModel) and its config",
            found=f"class {str(name)[:80]!r}",
            fix=f"use the transformers version that wrote it (metadata says {cfg.get('transformers_version') if isinstance(cfg, dict) else '?'}),"
            " or pass model= the architecture",
        )
    try:
        config = transformers.AutoConfig.for_model(**cfg)
        if arch.get("attn_implementation"):
            config._attn_implementation = arch["attn_implementation"]
        transformer = cls(config)
    except Exception as exc:  # config keys of another transformers version, unknown model_type, ...
        raise InputError(
            f"transformers could not build {name} from the stored config ({type(exc).__name__}: {str(exc)[:200]})",
            where=where,
            fix=f"install the transformers version that wrote the file ({cfg.get('transformers_version')}),"
            " or pass model= the architecture",
        ) from None
    text = arch.get("text_encoder")
    if text is None:
        return transformer
    ok = (isinstance(text, dict) and text.get("kind") in ("embedding", "classifier")
          and text.get("pooling") in ("mean", "cls", "max") and isinstance(text.get("normalize"), bool)
          and isinstance(text.get("pad_token_id"), int) and isinstance(text.get("unpad", False), bool)
          and set(text) <= {"kind", "pooling", "normalize", "pad_token_id", "unpad"})
    if not ok:
        raise InputError(
            "the file's TextEncoder settings are malformed", where=where,
            expected="kind embedding|classifier, pooling mean|cls|max, normalize true|false, an integer pad_token_id"
            " (and unpad true|false), nothing else",
            found=json.dumps(text)[:200], fix="write the file again with quantize.bf16",
        )
    return TextEncoder(transformer, **text)


def _remove_module(root: nn.Module, name: str, where: str) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        parent = None
    if parent is None or child not in parent._modules:
        raise InputError(
            "a module the file says was removed is not in the architecture",
            where=where, found=name, fix="pass model= the architecture the file was written from",
        )
    setattr(parent, child, None)


def load_int8(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a ``quantize.bf16`` safetensors file: the layers stored as INT8 become INT8 modules, the
    rest bfloat16, with float32 in and out.

    Hugging Face models need only the file (the architecture is built from the transformers config in
    its metadata; the result is a ``TextEncoder`` taking token ids, or the bare transformers model).
    Factory models need their architecture: ``model=factory()``, whose weights are never read (build
    it on the meta device to skip allocating them, ``with torch.device("meta"): m = factory()``); every
    parameter and persistent buffer must come from the file. ``model`` is left as it was (a copy is
    loaded). ``load_int8(model, path)``, the older argument order, still works.

    >>> encoder = load_int8("out/model.safetensors")  # doctest: +SKIP
    >>> net = load_int8("out/model.safetensors", model=my_factory())  # doctest: +SKIP
    """
    import torch
    from torch import nn

    from shrinkml.models.safetensors_io import fit_module_to_state_dict, load_state_dict
    from shrinkml.nn.int8 import Int8Embedding, Int8Linear, inputs_to_bf16, output_to_float32, replace_module

    if isinstance(path, nn.Module):  # load_int8(model, path)
        path, model = model, path
    where = str(path)
    state = load_state_dict(path)
    arch = _architecture(where)
    if model is None:
        if arch is None or arch["builder"] != "transformers":
            raise InputError(
                "this file does not say how to build its model",
                where=where,
                expected="a Hugging Face model's file (its config is in the metadata)",
                found="a factory model's file" if arch else "a file without shrinkml's architecture metadata (older shrinkml)",
                fix="pass the architecture: load_int8(path, model=factory())",
            )
        out = _build_transformers(arch, where).eval()
    else:
        out = copy.deepcopy(model).eval()
    if arch is None:  # files written before the metadata: the one module quantize.bf16 removes
        if not any(k.startswith("transformer.pooler.") for k in state):
            _drop_unused_pooler(out)
    else:
        for name in arch.get("removed_modules", []):
            _remove_module(out, str(name), where)
        for name, attrs in arch.get("attention_heads", {}).items():
            module = out.get_submodule(name)
            for attr in _HEAD_ATTRS:
                setattr(module, attr, int(attrs[attr]))
    int8 = [k[: -len(".weight_int8")] for k in state if k.endswith(".weight_int8")]
    # shapes changed by pruning before the step: size the layers to the file (INT8 codes = the weight)
    fit_module_to_state_dict(out, {(k[: -len("_int8")] if k.endswith(".weight_int8") else k): v for k, v in state.items()})
    for name in int8:
        try:
            module = out.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear | nn.Embedding):
            raise InputError(
                "the file has INT8 codes for a layer the architecture does not have as Linear / Embedding",
                where=f"{where}, tensor {name}.weight_int8",
                found=type(module).__name__ if module is not None else "no such module",
                fix="pass model= the architecture the file was written from",
            )
        int8_cls = Int8Linear if isinstance(module, nn.Linear) else Int8Embedding
        replace_module(out, name, int8_cls(module, values=False))
    out = out.to(torch.bfloat16)  # what the step did: float non-persistent buffers compute in bfloat16 too
    try:  # assign: the file's tensors (and dtypes) become the model's, nothing of `model` is read
        result = out.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise InputError(
            "the file's tensors do not fit the architecture", where=where,
            found=str(exc).splitlines()[-1][:300], fix="pass model= the architecture the file was written from",
        ) from None
    problems = []
    for label, keys in (("missing from the file", result.missing_keys), ("not in the architecture", result.unexpected_keys)):
        if keys:
            problems.append(f"{label}: " + ", ".join(keys[:5]) + (f" (+{len(keys) - 5})" if len(keys) > 5 else ""))
    empty = [n for n, t in [*out.named_parameters(), *out.named_buffers()] if t.is_meta]
    if empty and not problems:
        problems.append("no value (the model was built on the meta device): " + ", ".join(empty[:5]))
    if problems:
        raise InputError(
            "the file and the architecture do not match tensor for tensor",
            where=where,
            expected="every parameter and buffer of the architecture in the file, and nothing else",
            found="; ".join(problems),
            fix="pass model= the architecture the file was written from (built on the CPU if it has"
            " non-persistent buffers)",
        )
    out.register_forward_pre_hook(inputs_to_bf16)
    out.register_forward_hook(output_to_float32)
    return out


def _drop_unused_pooler(model: nn.Module) -> list[str]:
    """An embedding ``TextEncoder`` never uses its transformer's pooler (its output is pooled from the
    token states): drop it rather than store and run it. Returns the dropped module names."""
    from shrinkml.models.text import TextEncoder

    transformer = getattr(model, "transformer", None)
    if isinstance(model, TextEncoder) and model.kind == "embedding" and getattr(transformer, "pooler", None) is not None:
        transformer.pooler = None
        return ["transformer.pooler"]
    return []


def _gptq_codes(model: nn.Module, names: list[str], config: QuantizeBf16Config,
                ctx: StepContext) -> dict[str, tuple]:
    """GPTQ INT8 codes on ``quantize.bf16``'s grid (per row: scale = max |w| / 127, codes -127..127)
    for the Linears ``names`` of the float32 ``model``, from the Hessians of their inputs on the
    calibration split (one pass of the float model; for a text encoder only real tokens count: padded
    positions never reach the pooled output)."""
    import numpy as np
    import torch

    from shrinkml.models.text import TextEncoder
    from shrinkml.quant.gptq import HessianAccumulator, gptq_quantize

    x = np.asarray(ctx.splits.calibration.x)
    if len(x) == 0:
        raise InputError(
            "quantize.bf16 method gptq needs calibration data", where=f"{WHERE}.method",
            found="an empty calibration split", fix="give more data, or use method: rtn",
        )
    modules = dict(model.named_modules())
    text = isinstance(model, TextEncoder)
    acc: dict[str, HessianAccumulator] = {}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_module, args, _output) -> None:
            inputs = args[0].detach()
            mask = current.get("mask")
            if mask is not None and inputs.shape[:2] == mask.shape:
                inputs = inputs[mask]
            acc.setdefault(name, HessianAccumulator(inputs.shape[-1])).add(inputs)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for start in range(0, len(x), 32):
                batch = torch.as_tensor(x[start:start + 32])
                current["mask"] = batch != model.pad_token_id if text else None
                model(batch)
    finally:
        for handle in handles:
            handle.remove()

    def grid(group: torch.Tensor, _bits: int, _symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (group.abs().amax(-1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        return scale, torch.full_like(scale, 128.0)  # uint8 codes 1..255 = int8 -127..127 + 128

    out = {}
    for name in names:
        if name not in acc:  # never called on calibration data (e.g. an unused head): rounded
            continue
        weight = modules[name].weight
        result = gptq_quantize(weight, acc[name].hessian(), bits=8, group_size=weight.shape[1], symmetric=True,
                               damp=config.damp, params=grid)
        out[name] = ((result.codes.to(torch.int16) - 128).to(torch.int8), result.scales[:, 0].contiguous())
    return out


def cpu_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix or vector instructions (x86 AMX / AVX512-BF16, Arm BF16)."""
    from shrinkml.environment import cpu_flags

    return bool((cpu_flags() or set()) & {"amx_bf16", "avx512_bf16", "bf16"})


@register("quantize.bf16", QuantizeBf16Config, accepts=("torch",), produces="torch", runtime="torch",
          stage="quantize")
def apply(state: ModelState, config: QuantizeBf16Config, ctx: StepContext) -> StepResult:
    import torch
    from torch import nn

    from shrinkml.nn.int8 import (
        Int8Embedding,
        Int8Linear,
        Int8Weight,
        has_int8_modules,
        inputs_to_bf16,
        output_to_float32,
        replace_module,
    )

    model = copy.deepcopy(state.torch_model).eval()
    if any(p.dtype != torch.float32 for p in model.parameters()) or has_int8_modules(model):
        raise InputError(
            "quantize.bf16 needs a float32 model",
            where=WHERE,
            expected="float32 parameters",
            found="parameters of " + ", ".join(sorted({str(p.dtype) for p in model.parameters()})),
            fix="apply quantize.bf16 once, as the last step, to a float32 model",
        )
    dropped = _drop_unused_pooler(model)
    names = dict(model.named_modules())
    from shrinkml.layers import select

    layer_names = [n for n, m in names.items() if isinstance(m, nn.Linear | nn.Embedding)]
    selected = set(select([n for n in names if n], config.keep_float, where=f"{WHERE}.keep_float",
                          candidates=layer_names, what="Linear / Embedding layers"))
    kept = sorted(n for n in layer_names if n in selected)
    int8_layers, before, after = [], 0, 0
    gptq_codes: dict[str, tuple] = {}
    if config.weights == "int8" and config.method == "gptq":
        gptq_codes = _gptq_codes(model, [n for n in layer_names if n not in selected
                                         and isinstance(names[n], nn.Linear)], config, ctx)
    if config.weights == "int8":
        for name, module in list(model.named_modules()):
            if name in kept:
                continue
            if isinstance(module, nn.Linear):
                replace_module(model, name, Int8Linear(module, codes=gptq_codes.get(name)))
            elif isinstance(module, nn.Embedding) and config.quantize_embeddings:
                replace_module(model, name, Int8Embedding(module))
            else:
                continue
            int8_layers.append(name)
            before += module.weight.numel() * 4
            after += module.weight.numel() + module.weight.shape[0] * 4
        if not int8_layers:
            raise InputError(
                "quantize.bf16 found no Linear or Embedding layer to store as INT8",
                where=WHERE,
                expected="nn.Linear / nn.Embedding layers outside keep_float",
                found=f"{len(kept)} kept float" if kept else "none in the model",
                fix="use weights: bfloat16, or narrow keep_float",
            )
    scales = {id(m): m.weight_scale for m in model.modules() if isinstance(m, Int8Weight)}
    model = model.to(torch.bfloat16)
    for module in model.modules():  # .to() casts float buffers: the INT8 codes' scales stay float32
        if isinstance(module, Int8Weight):
            module.weight_scale = scales[id(module)]
            module.weight = module.dequantized()
    model.register_forward_pre_hook(inputs_to_bf16)
    model.register_forward_hook(output_to_float32)
    native = cpu_native_bf16()
    summary = {
        "weights": config.weights,
        "method": config.method if config.weights == "int8" else None,
        "compute_dtype": "bfloat16 (PyTorch)",
        "cpu_native_bf16": native,
        "int8_layers": len(int8_layers),
        "kept_bfloat16": kept,
        "dropped_unused_modules": dropped,
        "int8_weight_bytes": after,
        "float32_weight_bytes_of_those_layers": before,
    }
    if gptq_codes:
        summary["gptq_layers"] = len(gptq_codes)
        summary["gptq_calibration_rows"] = int(len(ctx.splits.calibration))
    if not native:
        summary["note"] = (
            "this CPU has no native bfloat16 instructions: PyTorch emulates them and the model is likely"
            " slower than float32 — the report's latency figures show the real effect"
        )
    return StepResult(ModelState("torch", torch_model=model), summary)
