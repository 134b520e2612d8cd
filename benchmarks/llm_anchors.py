"""Anchors of ``benchmarks/llm.py`` on other runtimes: ONNX Runtime GenAI's model builder and OpenVINO
with NNCF weight compression, each built from the same float weights as the F32 GGUF reference.

- :func:`save_hf_dir`: the pipeline's causal LM (lazy or not) as a Hugging Face directory with its
  tokenizer, the input both builders read.
- ORT GenAI (:func:`ortgenai_anchor`, :data:`ORTGENAI_ANCHORS`): ``onnxruntime_genai.models.builder``
  0.18 for the CPU execution provider through ``shrinkml.runtimes.ortgenai.build_folder``, measured with
  ``OrtGenAIGenerator``. The builder's round-to-nearest ``MatMulNBits`` at int4 with blocks of 32 and at
  int8 with its default blocks (32), both with the builder's CPU defaults: symmetric codes, and
  ``accuracy_level`` 4, which quantizes the *activations* to int8 inside every ``MatMulNBits``. Tied
  SmolLM2 shares one quantized matrix between the embedding (``GatherBlockQuantized``) and the head.
- OpenVINO + NNCF (:func:`openvino_export`, :func:`openvino_anchor`, :data:`NNCF_ANCHORS`,
  :class:`OpenVINOGenerator`): optimum-intel is not used (installing it would downgrade transformers
  5.24 to 5.5.4), so the float model is converted by ``openvino.convert_model`` from :class:`KVDecoder`
  (the model's own modules, the KV cache as tensors) and made stateful the way optimum-intel makes its
  exports (``beam_idx`` gather, states with zero initializers): OpenVINO fuses RoPE (angles kept in
  float32) and attention with its own KV cache. Then ``nncf.compress_weights``, data-free:
  ``INT8_ASYM`` (NNCF's default mode: 8-bit, per output channel, asymmetric) and ``INT4_SYM`` with
  ``group_size=64, ratio=1.0``, everything else NNCF's default. In int4 modes NNCF puts the embedding
  and the last MatMul in its backup mode, ``INT8_ASYM`` per channel; SmolLM2 ties them, so one u8
  constant serves both (:func:`openvino_weights` reads what the IR stores). Scales are float16.
  Compiled for the CPU plugin with OpenVINO's defaults except threads (``INFERENCE_NUM_THREADS``), one
  stream and the latency hint; these defaults are *not* float32 on every CPU: bfloat16 inference
  precision on CPUs with AMX / AVX512-BF16, activations of compressed-weight MatMuls quantized to int8
  in groups of 32 (``DYNAMIC_QUANTIZATION_GROUP_SIZE``), and a u8 KV cache in the fused attention
  (used by generation; a scored window is one call from an empty cache). ``config`` overrides them,
  and :meth:`OpenVINOGenerator.describe` reports what the compiled model uses.

Every anchor is measured as the files it writes: ORT GenAI's folder, OpenVINO's ``.xml`` + ``.bin``
(saved with ``compress_to_fp16=False``, so only NNCF changed the weights).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# label -> build_folder options (the builder's defaults otherwise: symmetric, accuracy_level 4, RTN)
ORTGENAI_ANCHORS: dict[str, dict[str, Any]] = {
    "ORT GenAI int4 (block 32)": {"precision": "int4", "block_size": 32},
    "ORT GenAI int8": {"precision": "int8", "block_size": 32},
}
# label -> nncf.compress_weights options (data-free; NNCF's defaults otherwise)
NNCF_ANCHORS: dict[str, dict[str, Any]] = {
    "OpenVINO + NNCF int8": {"mode": "INT8_ASYM"},
    "OpenVINO + NNCF int4 (group 64, sym)": {"mode": "INT4_SYM", "group_size": 64, "ratio": 1.0},
}


# ---------------------------------------------------------------------------------- float model
def float_model(loaded):
    """``loaded.module`` with every weight in memory (float32): a lazy model (``shrinkml.models.lazy``,
    what the llamacpp runtime loads) is rebuilt from its weight source, the model itself untouched."""
    from shrinkml.models.lazy import is_lazy, source_of

    module = loaded.module
    if not is_lazy(module):
        return module.eval()
    source = source_of(module)
    tied = bool(getattr(module.config, "tie_word_embeddings", False))
    model = transformers.AutoModelForCausalLM.from_config(module.config, dtype=torch.float32)
    state = {name: source.get(name) if value.is_meta else value for name, value in module.state_dict().items()
             if not (tied and name == "lm_head.weight")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise ValueError(f"rebuilding the float model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def save_hf_dir(loaded, out_dir: Path) -> Path:
    """The causal LM (``pipe.prepared.loaded``) as a Hugging Face directory with its tokenizer (float32
    safetensors, the model's exact float weights)."""
    out_dir = Path(out_dir)
    float_model(loaded).save_pretrained(str(out_dir))
    loaded.lm.tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------------------------- ORT GenAI
def ortgenai_anchor(hf_dir: Path, out_dir: Path, precision: str, block_size: int = 32, threads: int = 2) -> Path:
    """ORT GenAI's builder on ``hf_dir`` for the CPU EP: round-to-nearest ``MatMulNBits`` at ``precision``
    (``int4`` / ``int8``) with blocks of ``block_size``, symmetric and ``accuracy_level`` 4 (int8
    activations in the matrix products): the builder's defaults. Returns the folder ORT GenAI loads."""
    from shrinkml.runtimes.ortgenai import build_folder

    return build_folder(Path(hf_dir), Path(out_dir), precision=precision, block_size=block_size, threads=threads)


# ---------------------------------------------------------------------------------- OpenVINO + NNCF
class KVDecoder(torch.nn.Module):
    """A Llama-architecture ``*ForCausalLM`` as one traceable step with the KV cache as tensors.

    ``forward(input_ids (1, T), attention_mask (1, P + T), position_ids (1, T), logits_index (K,), *past)``
    with ``past`` the keys and values of every layer (``(1, kv_heads, P, head_dim)``, key then value) and
    ``attention_mask`` all ones (it gives the keys' positions, as optimum-intel's exports take it) returns
    the logits of positions ``logits_index`` ``(1, K, vocab)`` and every layer's keys and values after
    the step. The
    model's own code computes the embedding, norms, projections, rotary embedding (its ``rotary_emb``
    and ``apply_rotary_pos_emb``: OpenVINO fuses them into its RoPE op and keeps the angles in float32),
    MLP and head; only grouped-query attention over the cache and its causal mask are written out
    (``scaled_dot_product_attention``, scale ``1 / sqrt(head_dim)``): batch 1, no padding."""

    def __init__(self, model) -> None:
        super().__init__()
        config = model.config
        if config.model_type != "llama":
            raise ValueError(f"KVDecoder writes out Llama's attention; this model is {config.model_type}")
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                logits_index: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        base = self.model.model
        x = base.embed_tokens(input_ids)
        cos, sin = base.rotary_emb(x, position_ids)
        key_pos = torch.cumsum(attention_mask[0], 0) - 1
        mask = key_pos[None, :] <= position_ids[0, :, None]  # key j is seen by the query at position p when j <= p
        group = self.heads // self.kv_heads
        present = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            y = layer.input_layernorm(x)
            q = attn.q_proj(y).view(1, -1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(y).view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(y).view(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat((past[2 * i], k), 2)
            v = torch.cat((past[2 * i + 1], v), 2)
            present += [k, v]
            keys = k[:, :, None].expand(-1, -1, group, -1, -1).reshape(1, self.heads, -1, self.head_dim)
            values = v[:, :, None].expand(-1, -1, group, -1, -1).reshape(1, self.heads, -1, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(1, -1, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(base.norm(x).index_select(1, logits_index))
        return (logits, *present)


def openvino_export(model, out_xml: Path) -> Path:
    """The float causal LM ``model`` as a stateful OpenVINO IR at ``out_xml`` (float32 ``.xml`` + ``.bin``):
    :class:`KVDecoder` converted by ``openvino.convert_model`` (TorchScript tracing), then made stateful as
    optimum-intel makes its exports.

    Inputs ``input_ids`` (1, T), ``attention_mask`` (1, P + T) ones, ``position_ids`` (1, T),
    ``logits_index`` (K,) (the positions whose logits are computed) and ``beam_idx`` (1,) zero; output
    ``logits`` (1, K, vocab). Every layer's keys and values are OpenVINO states (``ReadValue`` /
    ``Assign``), grown by each infer call and emptied by ``reset_state``."""
    import openvino as ov

    decoder = KVDecoder(model).eval()
    n_layers = len(model.model.layers)
    past = [torch.zeros(1, decoder.kv_heads, 3, decoder.head_dim) for _ in range(2 * n_layers)]
    example = (torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), torch.tensor([[3, 4]]),
               torch.arange(2), *past)
    with torch.no_grad():
        ov_model = ov.convert_model(decoder, example_input=example)
    kinds = [f"{kind}.{i}" for i in range(n_layers) for kind in ("key", "value")]
    for port, name in zip(ov_model.inputs[4:], kinds, strict=True):
        port.get_tensor().set_names({f"past.{name}"})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    for port, name in zip(ov_model.outputs[1:], kinds, strict=True):
        port.get_tensor().set_names({f"present.{name}"})
    cache_shape = ov.PartialShape([1, decoder.kv_heads, -1, decoder.head_dim])
    ov_model.reshape({**{n: ov.PartialShape([1, -1]) for n in ("input_ids", "attention_mask", "position_ids")},
                      **{f"past.{name}": cache_shape for name in kinds}})
    _make_stateful(ov_model, {f"past.{name}": f"present.{name}" for name in kinds})
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, str(out_xml), compress_to_fp16=False)
    return out_xml


def _make_stateful(ov_model, cache: dict[str, str]) -> None:
    """optimum-intel's three steps: every cache input read through ``Gather(beam_idx)``, the cache
    inputs and outputs turned into states, each state starting as zeros of ``(batch, kv_heads, 0,
    head_dim)``. The first and last are what the CPU plugin needs to fuse attention with its own KV
    cache (without them it keeps the attention decomposed, or refuses the model)."""
    import openvino as ov
    from openvino import opset13 as opset
    from openvino._offline_transformations import apply_make_stateful_transformation

    beam_idx = opset.parameter(ov.PartialShape([1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    for name in cache:
        param = ov_model.input(name).get_node()
        targets = list(param.output(0).get_target_inputs())
        reorder = opset.gather(param, beam_idx, opset.constant(0, ov.Type.i64))
        for target in targets:
            target.replace_source_output(reorder.output(0))
    ov_model.add_parameters([beam_idx])
    apply_make_stateful_transformation(ov_model, cache)
    batch = opset.gather(opset.shape_of(ov_model.input("input_ids"), "i64"), opset.constant([0]), opset.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [batch, *(opset.constant(np.array([d.get_min_length()], dtype=np.int64))
                             for d in list(op.get_output_partial_shape(0))[1:])]
            zeros = opset.broadcast(opset.constant(0.0, op.get_output_element_type(0)), opset.concat(dims, 0))
            op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()


def openvino_anchor(float_xml: Path, out_xml: Path, mode: str, group_size: int | None = None,
                    ratio: float | None = None) -> Path:
    """``nncf.compress_weights`` (data-free, ``mode`` a ``CompressWeightsMode`` name) on the float IR,
    saved at ``out_xml`` with ``compress_to_fp16=False``. ``group_size`` / ``ratio`` None keep NNCF's
    defaults (int8: per channel; int4: group 128, ratio 1). In int4 modes NNCF leaves the embedding
    and the last MatMul to its backup mode (``INT8_ASYM``, per channel)."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_xml))
    options: dict[str, Any] = {"mode": nncf.CompressWeightsMode[mode]}
    if group_size is not None:
        options["group_size"] = group_size
    if ratio is not None:
        options["ratio"] = ratio
    compressed = nncf.compress_weights(model, **options)
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(compressed, str(out_xml), compress_to_fp16=False)
    return out_xml


def openvino_bytes(xml: Path) -> int:
    """Serialized size of an OpenVINO IR: its ``.xml`` plus its ``.bin``."""
    xml = Path(xml)
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


_DECOMPRESSION_OPS = frozenset({"Convert", "Reshape", "Multiply", "Subtract", "Unsqueeze"})


def _size(node) -> int:
    return int(np.prod(list(node.get_output_shape(0))))


def _weight_of(port) -> dict[str, Any] | None:
    """The stored weight behind a MatMul / Gather input: the largest constant reached through NNCF's
    decompression subgraph (Convert, Subtract zero point, Multiply scale, Reshape), with its scale,
    group and whether it has a zero point; None for an activation."""
    stack, seen, consts, kinds = [port.get_source_output().get_node()], set(), [], set()
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        kinds.add(node.get_type_name())
        if node.get_type_name() == "Constant":
            consts.append(node)
        elif node.get_type_name() in _DECOMPRESSION_OPS:
            stack += [i.get_source_output().get_node() for i in node.inputs()]
        else:
            return None
    if not consts:
        return None
    weight, *rest = sorted(consts, key=_size, reverse=True)
    shape = [int(d) for d in weight.get_output_shape(0)]
    info: dict[str, Any] = {"constant": weight.get_friendly_name(),
                            "dtype": weight.get_output_element_type(0).get_type_name(), "shape": shape}
    scales = [c for c in rest if c.get_output_element_type(0).is_real() and _size(c) > 1]
    if scales:
        info["scale"] = {"dtype": scales[0].get_output_element_type(0).get_type_name(),
                         "shape": [int(d) for d in scales[0].get_output_shape(0)]}
        info["group_size"] = shape[-1] if len(shape) == 3 else "per channel"
        info["zero_point"] = "Subtract" in kinds
    return info


def openvino_weights(xml: Path) -> dict[str, Any]:
    """What the IR stores its matrices as: the embedding's and the output head's weights (dtype,
    shape, scale, group, zero point; ``tied``: one constant for both), and a count of the other MatMul
    weights by stored dtype and group size."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    logits = model.output("logits").get_node().input(0).get_source_output().get_node()
    embedding = head = None
    others: Counter = Counter()
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Gather" and embedding is None:
            embedding = _weight_of(op.input(0))
        elif kind == "MatMul":
            info = _weight_of(op.input(1))
            if info is None:
                continue
            if op.get_friendly_name() == logits.get_friendly_name():
                head = info
            else:
                others[f"{info['dtype']}, group {info.get('group_size', '-')}"] += 1
    tied = embedding is not None and head is not None and embedding["constant"] == head["constant"]
    return {"embedding": embedding, "lm_head": head, "tied": tied, "other_matmuls": dict(others)}


class OpenVINOGenerator:
    """A stateful OpenVINO IR from :func:`openvino_export` compiled for the CPU plugin: ``logits`` for
    scoring, ``generate`` for timing (the interface of ``shrinkml.measure.lm.TorchGenerator``).

    - ``logits(ids)``: every window from an empty KV cache (``reset_state``), the logits of all its
      positions, ``(B, T, V)`` float32;
    - ``generate(prompt, n)``: the prompt in one infer call computing the last position's logits only
      (as llama.cpp's prefill does), timed until they are in hand; the first token by numpy's argmax;
      then ``n - 1`` single-token infer calls, each with the argmax, on the wall clock.

    Compiled with ``INFERENCE_NUM_THREADS`` = ``threads``, one stream, the latency hint, and OpenVINO's
    defaults for everything else (``config`` overrides, e.g. ``{"INFERENCE_PRECISION_HINT": "f32"}``).
    ``context`` and ``new_tokens`` only bound ``generate`` (the states grow as needed)."""

    def __init__(self, xml: str | Path, *, threads: int, context: int, new_tokens: int = 128,
                 config: dict[str, Any] | None = None) -> None:
        import openvino as ov

        self.xml = Path(xml)
        self.threads = threads
        self.n_ctx = int(context + max(new_tokens, 1))
        settings = {"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                    **(config or {})}
        self.compiled = ov.Core().compile_model(str(self.xml), "CPU", settings)
        self.request = self.compiled.create_infer_request()
        self._logits = self.compiled.output("logits")
        self._beam = np.zeros(1, dtype=np.int32)

    def _step(self, ids: np.ndarray, start: int, logits_index: np.ndarray) -> np.ndarray:
        """Append ``ids`` to the cache at position ``start``; the logits of ``logits_index`` (1, K, V)."""
        end = start + len(ids)
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, end), dtype=np.int64),
                 "position_ids": np.arange(start, end, dtype=np.int64)[None], "logits_index": logits_index,
                 "beam_idx": self._beam}
        return self.request.infer(feeds)[self._logits]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """``(B, T)`` token ids -> ``(B, T, V)`` float32 logits, each window from an empty cache."""
        ids = np.asarray(ids, dtype=np.int64)
        out = []
        for window in ids:
            self.request.reset_state()
            out.append(self._step(window, 0, np.arange(len(window), dtype=np.int64))[0])
        return np.stack(out).astype(np.float32, copy=False)

    def generate(self, prompt: np.ndarray, new_tokens: int):
        from shrinkml.measure.lm import Generation

        prompt = np.asarray(prompt, dtype=np.int64)
        if len(prompt) + new_tokens > self.n_ctx:
            raise ValueError(f"a {len(prompt)}-token prompt and {new_tokens} new tokens exceed {self.n_ctx} positions")
        last = np.array([len(prompt) - 1], dtype=np.int64)
        only = np.zeros(1, dtype=np.int64)
        self.request.reset_state()
        tokens: list[int] = []
        start = time.perf_counter()
        logits = self._step(prompt, 0, last)
        prefill = time.perf_counter() - start
        token = int(np.argmax(logits[0, -1]))
        first = time.perf_counter() - start
        tokens.append(token)
        pos = len(prompt)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = int(np.argmax(self._step(np.array([token], dtype=np.int64), pos, only)[0, -1]))
            tokens.append(token)
            pos += 1
        decode = time.perf_counter() - t0
        return Generation(prefill, first, decode, len(prompt), new_tokens, tuple(tokens))

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        def prop(name: str) -> str:
            value = self.compiled.get_property(name)
            return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

        runtime = Counter(op.get_rt_info()["layerType"].astype(str) for op in self.compiled.get_runtime_model().get_ops())
        return {
            "runtime": "openvino", "version": ov.__version__, "device": "CPU",
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(self.compiled.get_property("NUM_STREAMS")),
            "inference_precision": prop("INFERENCE_PRECISION_HINT"),
            "kv_cache_precision": prop("KV_CACHE_PRECISION"),
            "dynamic_quantization_group_size": int(self.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")),
            "fused_attention_with_kv_cache": runtime.get("ScaledDotProductAttention", 0),  # the cache precision's nodes
            "fused_rope": runtime.get("RoPE", 0),
            "weights": openvino_weights(self.xml),
        }

    def close(self) -> None:
        self.request = None
        self.compiled = None
