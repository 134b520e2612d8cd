"""A Hugging Face causal-LM directory as a GGUF file for llama.cpp, written as llama.cpp's own
``convert_hf_to_gguf.py`` writes it, so that a directory runs on ``--runtime llamacpp`` and its
compressed GGUF has a tokenizer and metadata to carry.

* **Architectures:** ``LlamaForCausalLM`` and ``MistralForCausalLM`` (GGUF ``llama``; q/k rows
  permuted as llama.cpp's ``LlamaModel.permute``) and ``Qwen2ForCausalLM`` (``qwen2``, with its
  attention biases), dense only. RoPE: plain, ``linear`` scaling, or Llama 3's ``llama3`` (its
  ``rope_freqs`` tensor). Others are refused with a pointer to llama.cpp's converter.
* **Weights** are read from the safetensors shards one tensor at a time and written at their own
  precision (BF16, F16 or F32; norms and biases as F32, as llama.cpp's converter does), so memory
  holds one tensor, and the file holds the directory's weights bit for bit (up to the q/k row order).
* **Tokenizer:** byte-level BPE (``tokenizer.json``; Llama 3, Qwen2, SmolLM, GPT-2 families) as
  llama.cpp's ``gpt2`` vocabulary: tokens and types as its ``get_vocab_base``, the pre-tokenizer
  named by llama.cpp's hash table (``shrinkml.formats.bpe_pre``), merges, special tokens and the chat
  template through the ``gguf`` package's ``SpecialVocab``. A vocabulary llama.cpp would split
  differently (an unknown pre-tokenizer, or SentencePiece) is refused rather than guessed.

>>> convert_hf_dir(Path("SmolLM2-135M-Instruct"), Path("smollm2-bf16.gguf"))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.atomic import atomic_path
from shrinkml.errors import InputError, brief

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_FLOAT_TYPES = {"F32": ("F32", np.float32), "F16": ("F16", np.float16), "BF16": ("BF16", np.uint16)}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq")
_CONVERTER = "llama.cpp's convert_hf_to_gguf.py (python convert_hf_to_gguf.py DIR --outfile model.gguf)"
_MAX_JSON_BYTES = 64 * 2**20


def _fail(message: str, where: Path, **kw: Any) -> InputError:
    return InputError(message, where=str(where), fix=kw.pop("fix", f"convert the directory with {_CONVERTER} and pass"
                      " the .gguf, or pass --runtime torch"), **kw)


def _json(path: Path, what: str) -> dict:
    from shrinkml.models.hf import _read_json

    return _read_json(path, what)


def architecture(config: dict, where: Path) -> str:
    """The GGUF architecture of a transformers ``config.json``, or ``InputError``."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise _fail("shrinkml converts this causal LM's architecture to GGUF only for some families", where,
                    expected=", ".join(ARCHITECTURES), found=brief(archs or config.get("model_type")))
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            raise _fail("shrinkml converts dense causal LMs to GGUF, not mixtures of experts", where,
                        expected="a dense model", found=f"{key} = {config[key]}")
    return arch


def _rope(config: dict, where: Path) -> tuple[float | None, dict]:
    """(rope_theta, rope scaling parameters) from transformers 4 (``rope_scaling``) or 5
    (``rope_parameters``) configs; scaling types llama.cpp's converter handles are refused otherwise."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise _fail("the config's rope parameters are not an object", where, expected="a JSON object", found=brief(params))
    theta = config.get("rope_theta", params.get("rope_theta"))
    kind = str(params.get("rope_type", params.get("type", "default")) or "default").lower()
    if kind not in ("default", "linear", "llama3"):
        raise _fail("shrinkml converts plain, linear and llama3 RoPE to GGUF", where,
                    expected="rope_type default, linear or llama3", found=f"rope_type {kind}")
    return (float(theta) if theta is not None else None), {**params, "rope_type": kind}


def _llama3_rope_factors(params: dict, theta: float, dim: int) -> np.ndarray:
    """Llama 3's per-frequency RoPE factors, as llama.cpp's converter computes ``rope_freqs``."""
    import math

    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _shards(root: Path) -> list[Path]:
    from shrinkml.models.hf import _inside

    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    index = root / "model.safetensors.index.json"
    if not index.is_file():
        raise InputError("the model directory has no safetensors weights", where=str(root),
                         expected="model.safetensors or model.safetensors.index.json with its shards",
                         fix="save the model with save_pretrained(safe_serialization=True)")
    weight_map = _json(index, "a safetensors index (a JSON object with weight_map)").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError("the safetensors index has no weight_map", where=str(index),
                         expected='{"weight_map": {"tensor name": "shard file", ...}}', found=brief(weight_map),
                         fix="restore model.safetensors.index.json from the original model")
    files = list(dict.fromkeys(str(v) for v in weight_map.values()))
    return [_inside(root, f, index) for f in files]


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _hparams(config: dict, where: Path) -> dict[str, Any]:
    def need(*keys: str) -> int:
        for k in keys:
            if isinstance(config.get(k), int) and config[k] > 0:
                return int(config[k])
        raise _fail(f"the config has no {keys[0]}", where, expected="a positive integer", found="nothing",
                    fix=f"restore config.json from the original model ({keys[0]} is missing)")

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    out = {"block_count": need("num_hidden_layers"), "embedding_length": hidden,
           "feed_forward_length": need("intermediate_size"), "head_count": heads,
           "head_count_kv": int(config.get("num_key_value_heads") or heads), "vocab_size": need("vocab_size"),
           "context_length": int(config.get("max_position_embeddings") or 0) or None,
           "rms_eps": config.get("rms_norm_eps"), "head_dim": config.get("head_dim")}
    if out["head_dim"] is None and hidden % heads:
        raise _fail("hidden_size is not a multiple of num_attention_heads", where, expected="head_dim in the config",
                    found=f"{hidden} / {heads}", fix="restore config.json from the original model")
    return out


_ITEM = {"F32": 4, "F16": 2, "BF16": 2}


def _shard_entries(shard: Path) -> list[tuple[str, tuple[int, ...], str, int]]:
    """[(name, shape, dtype, byte offset in the file)] of a safetensors shard, every declared
    offset checked against the file's size before anything is read."""
    from shrinkml.models.safetensors_io import _read_header

    header = _read_header(shard) if shard.is_file() else None
    if header is None:
        raise InputError("the safetensors shard is missing or its header is unreadable", where=str(shard),
                         expected="a safetensors file", fix="check the download is complete")
    size = shard.stat().st_size
    with shard.open("rb") as fh:
        data_start = 8 + int.from_bytes(fh.read(8), "little")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(info, dict) and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
        shape = tuple(info["shape"]) if ok else ()
        offsets = info["data_offsets"] if ok else []
        ok = ok and all(isinstance(d, int) and d >= 0 for d in shape) and len(offsets) == 2 and all(
            isinstance(o, int) for o in offsets)
        dtype = str(info.get("dtype")) if isinstance(info, dict) else "?"
        if ok and dtype in _ITEM:
            ok = 0 <= offsets[0] and offsets[1] - offsets[0] == int(np.prod(shape)) * _ITEM[dtype] and \
                data_start + offsets[1] <= size
        if not ok:
            raise InputError(f"the shard's entry for {name} does not describe its bytes", where=str(shard),
                             expected="dtype, shape and data_offsets inside the file", found=brief(info),
                             fix="check the download is complete")
        entries.append((name, shape, dtype, data_start + offsets[0]))
    return entries


def _plan(root: Path, config: dict, arch: str, hp: dict) -> list[tuple[str, str, Path, tuple[int, ...], str, int]]:
    """(GGUF name, HF name, shard, shape, source dtype, byte offset) of every tensor to write, in
    llama.cpp's order (embedding first, then by name, layers in numeric order)."""
    from shrinkml.formats.gguf_file import hf_to_gguf_name

    tied = bool(config.get("tie_word_embeddings", False))
    found = []
    for shard in _shards(root):
        for name, shape, dtype, offset in _shard_entries(shard):
            if _SKIPPED.fullmatch(name) or (tied and name == "lm_head.weight"):
                continue
            gguf_name = hf_to_gguf_name(name, arch, n_layers=hp["block_count"])
            if gguf_name is None:
                raise _fail(f"the tensor {name} has no place in llama.cpp's {arch} layout", shard,
                            expected=f"the tensors of a {next(iter(config.get('architectures') or ['']))}",
                            found=f"{name} of shape {list(shape)}")
            if dtype not in _FLOAT_TYPES:
                raise _fail(f"the tensor {name} is {dtype}; shrinkml converts float checkpoints", shard,
                            expected="BF16, F16 or F32 tensors", found=dtype)
            found.append((gguf_name, name, shard, shape, dtype, offset))
    names = [g for g, *_ in found]
    if len(set(names)) != len(names) or "token_embd.weight" not in names:
        raise _fail("the shards do not hold one copy of each tensor of the model", root,
                    expected="model.embed_tokens.weight and each layer's tensors once",
                    found=f"{len(names)} tensors, {len(names) - len(set(names))} repeated",
                    fix="restore the shards and model.safetensors.index.json from the original model")
    return sorted(found, key=lambda t: (t[0] != "token_embd.weight", _natural(t[0])))


def _gguf_type(shape: tuple[int, ...], dtype: str) -> str:
    return "F32" if len(shape) == 1 else dtype  # norms and biases in F32, as llama.cpp's converter writes them


def _byte_level(tokenizer_json: dict) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        return node.get("type") == "ByteLevel" or any(has(p) for p in node.get("pretokenizers") or [])

    return has(tokenizer_json.get("pre_tokenizer")) or has(tokenizer_json.get("decoder"))


def _pre_tokenizer(root: Path) -> tuple[Any, str]:
    """(the directory's tokenizer, llama.cpp's name for its pre-tokenizer), or ``InputError`` when
    llama.cpp's gpt2 vocabulary could not split text as this tokenizer does."""
    from shrinkml.formats.bpe_pre import CHECK_TEXT, PRE_TOKENIZERS
    from shrinkml.models.hf import _tokenizer_from
    from shrinkml.untrusted import parse_json, read_bounded

    where = root / "tokenizer.json"
    if not where.is_file():
        raise _fail("the directory has no tokenizer.json; shrinkml converts byte-level BPE vocabularies", root,
                    expected="tokenizer.json", found="tokenizer.model or no tokenizer")
    spec = parse_json(read_bounded(where, _MAX_JSON_BYTES, what="tokenizer.json", fix="restore tokenizer.json"))
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not _byte_level(spec):
        raise _fail("the tokenizer is not a byte-level BPE, the kind shrinkml converts to llama.cpp's gpt2 vocabulary",
                    where, expected="model.type BPE with a ByteLevel pre-tokenizer (Llama 3, Qwen2, SmolLM, GPT-2)",
                    found=f"model.type {brief(model.get('type') if isinstance(model, dict) else model)}")
    tokenizer = _tokenizer_from(str(root), str(root))
    chk = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if chk not in PRE_TOKENIZERS:
        raise _fail("llama.cpp has no pre-tokenizer for this tokenizer: it would split text differently from"
                    " transformers", where, expected="a tokenizer in llama.cpp's table (shrinkml.formats.bpe_pre)",
                    found=f"check hash {chk[:16]}...")
    return tokenizer, PRE_TOKENIZERS[chk][0]


def check_convertible(root: str | Path) -> None:
    """``InputError`` unless :func:`convert_hf_dir` can convert the directory faithfully: its
    architecture, RoPE and tokenizer (no weights are read)."""
    root = Path(root)
    where = root / "config.json"
    config = _json(where, "a transformers config.json (a JSON object)")
    architecture(config, where)
    _rope(config, where)
    _pre_tokenizer(root)


def _vocabulary(root: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer) as llama.cpp's ``get_vocab_base`` and
    ``get_vocab_base_pre`` compute them."""
    import gguf

    tokenizer, pre = _pre_tokenizer(root)
    where = root / "tokenizer.json"
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise _fail("the tokenizer has token ids beyond the model's vocab_size", where,
                    expected=f"ids below {vocab_size}", found=f"id {max(vocab.values())}",
                    fix="pass the tokenizer the model was trained with")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp expects control / user tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token, kind = token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(int(kind))
    return tokens, types, pre


def _looks_special(token: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _metadata(writer, root: Path, arch: str, hp: dict, rope: tuple[float | None, dict], file_type: str) -> dict:
    import gguf

    theta, rope = rope
    writer.add_type("model")
    writer.add_name(root.name)
    writer.add_block_count(hp["block_count"])
    if hp["context_length"]:
        writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    if rope["rope_type"] == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if hp["rms_eps"] is not None:
        writer.add_layer_norm_rms_eps(float(hp["rms_eps"]))
    if hp["head_dim"] is not None:
        writer.add_key_length(int(hp["head_dim"]))
        writer.add_value_length(int(hp["head_dim"]))
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[file_type]]))
    if arch == "llama":
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(int(hp["head_dim"] or hp["embedding_length"] // hp["head_count"]))
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file():
        prefix = _json(tokenizer_config, "tokenizer_config.json (a JSON object)").get("add_prefix_space")
        if prefix is not None:
            writer.add_add_space_prefix(bool(prefix))
    tokens, types, pre = _vocabulary(root, hp["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(root, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise _fail("tokenizer.json has no merges", root / "tokenizer.json", expected="model.merges of the BPE",
                    found="none", fix="restore tokenizer.json from the original model")
    if arch == "llama" and hp["vocab_size"] == 49152:  # llama.cpp's converter: Granite/SmolLM-size vocabularies
        special.add_special_token["bos"] = False
    special.add_to_gguf(writer, quiet=True)
    return {"pre_tokenizer": pre, "tokens": len(tokens), "merges": len(special.merges)}


def _tensor(fh, entry: tuple, arch: str, hp: dict) -> np.ndarray:
    """One tensor read from its shard (a plain file read: no mapping left behind in this process)
    as the array llama.cpp's converter writes: Llama's q/k rows permuted, 1-D tensors as F32."""
    from shrinkml.formats.gguf_file import permute_qk

    _, name, _, shape, dtype, offset = entry
    a = np.empty(shape, dtype=_FLOAT_TYPES[dtype][1])  # BF16 as its bits (numpy has no bfloat16)
    fh.seek(offset)
    if fh.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
        raise InputError(f"the shard ended inside tensor {name}", where=fh.name, fix="check the download is complete")
    if _gguf_type(shape, dtype) == "F32" and dtype != "F32":
        a = (a.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else a.astype(np.float32)
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        a = permute_qk(a, hp["head_count"], hp["head_count"] if "q_proj" in name else hp["head_count_kv"])
    return np.ascontiguousarray(a)


def convert_hf_dir(hf_dir: str | Path, path: str | Path, *, progress=None) -> tuple[Path, dict[str, Any]]:
    """Write the causal LM in ``hf_dir`` as a GGUF file at ``path`` (atomically); returns (path, a
    summary: architecture, file type, tensors, pre-tokenizer). Never modifies ``hf_dir``."""
    import gguf

    root = Path(hf_dir)
    where = root / "config.json"
    config = _json(where, "a transformers config.json (a JSON object)")
    arch = architecture(config, where)
    hp = _hparams(config, where)
    theta, rope = _rope(config, where)
    plan = _plan(root, config, arch, hp)
    two_d = [dtype for _, _, _, shape, dtype, _ in plan if len(shape) > 1]
    file_type = max(set(two_d), key=two_d.count)
    extra = []
    if rope["rope_type"] == "llama3":
        dim = int(hp["head_dim"] or hp["embedding_length"] // hp["head_count"])
        extra.append(("rope_freqs.weight", _llama3_rope_factors(rope, theta or 10000.0, dim)))
    target = Path(path)
    with atomic_path(target) as tmp, ExitStack() as stack:
        writer = gguf.GGUFWriter(tmp, arch)
        summary = _metadata(writer, root, arch, hp, (theta, rope), file_type)
        for gguf_name, _, _, shape, dtype, _ in plan:
            qtype, np_type = _FLOAT_TYPES[_gguf_type(shape, dtype)]
            writer.add_tensor_info(gguf_name, shape, np.dtype(np_type), int(np.prod(shape)) * np.dtype(np_type).itemsize,
                                   raw_dtype=gguf.GGMLQuantizationType[qtype])
        for name, array in extra:
            writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handles: dict[Path, Any] = {}
        for i, entry in enumerate(plan):
            shard = entry[2]
            if shard not in handles:
                handles[shard] = stack.enter_context(shard.open("rb"))
            writer.write_tensor_data(_tensor(handles[shard], entry, arch, hp))
            if progress is not None and i % 32 == 0:
                progress.log(f"converting to GGUF: {i + 1}/{len(plan)} tensors")
        for _, array in extra:
            writer.write_tensor_data(array)
        writer.close()
    return target, {"architecture": arch, "file_type": _FILE_TYPES[file_type], "tensors": len(plan) + len(extra),
                    **summary}
