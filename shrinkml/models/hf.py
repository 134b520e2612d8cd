"""Hugging Face model directories: a sentence-transformers directory (``modules.json``) or a plain
transformers directory (``config.json``), loaded offline into a one-input ``TextEncoder``.

transformers is imported inside the functions so that ``import shrinkml`` stays light.

Before transformers sees the directory, what it could not mean is refused: JSON files of the wrong
shape (or over 16 MB, or nested without end), generative language models (GPT-2, Llama, T5, ...),
which have no meaning as embedding or classifier encoders here, and weights stored only as pickle
files (``pytorch_model.bin``, ``.pt``, ``.ckpt``, ...), which could run code when loaded: transformers
loads with ``use_safetensors=True``, so it never falls back to one.

>>> loaded = load_hf_dir(Path("all-MiniLM-L6-v2"))  # doctest: +SKIP
>>> loaded.text.pooling, loaded.text.normalize, loaded.text.max_seq_length  # doctest: +SKIP
('mean', True, 256)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError, brief
from shrinkml.models.loaded import LoadedModel
from shrinkml.untrusted import decode_utf8, parse_json, read_bounded

_FIX_INSTALL = "pip install 'shrinkml[text]'"
_MAX_JSON_BYTES = 16 * 1024 * 1024  # a model's config files are kilobytes; vocabularies are not read here
_SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # what use_safetensors loads
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# generative language models: the architectures' suffixes and the model types of decoder-only LMs
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_DECODER_MODEL_TYPES = frozenset({
    "arcee", "bitnet", "bloom", "codegen", "cohere", "cohere2", "ctrl", "dbrx", "deepseek_v2", "deepseek_v3",
    "exaone", "exaone4", "falcon", "falcon_h1", "falcon_mamba", "gemma", "gemma2", "gemma3", "gemma3_text",
    "glm", "glm4", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "gptj",
    "granite", "granitemoe", "helium", "jamba", "llama", "llama4", "llama4_text", "mamba", "mamba2",
    "ministral", "mistral", "mixtral", "mpt", "nemotron", "olmo", "olmo2", "olmoe", "openai-gpt", "opt",
    "persimmon", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "recurrent_gemma",
    "rwkv", "smollm3", "stablelm", "starcoder2", "xglm", "zamba", "zamba2",
})


@dataclass
class TextModelInfo:
    """What a text model needs besides its weights: how to tokenize and how it pools."""

    tokenizer: Any
    source_dir: str
    kind: str  # "embedding" or "classifier"
    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    transformer_subdir: str = ""  # module 0's folder inside a sentence-transformers directory
    sentence_transformers: bool = False


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file())


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON list"
    if isinstance(value, str):
        return f"the JSON string {brief(value, 40)}"
    return f"the JSON value {brief(value, 40)}"  # a number, true/false or null


def _read_json(path: Path, what: str, kind: type = dict) -> Any:
    """The JSON value of ``path``, which must be a ``kind`` (dict: an object, list: a list); anything
    else (missing, over 16 MB, not UTF-8, malformed, nested without end, another type) is an
    ``InputError`` naming the file."""
    if not path.is_file():
        raise InputError(
            f"the model directory lacks {path.name}",
            where=str(path),
            expected=what,
            fix="pass a complete sentence-transformers or transformers model directory",
        )
    data = read_bounded(path, _MAX_JSON_BYTES, what=f"{path.name} file",
                        fix="restore the file from the original model (config files are a few kilobytes)")
    try:
        value = parse_json(decode_utf8(data, where=str(path)))
    except ValueError as exc:
        raise InputError(
            f"cannot parse {path.name} ({brief(str(exc), 120)})", where=str(path), expected=what,
            fix="restore the file from the original model",
        ) from None
    if not isinstance(value, kind):
        raise InputError(
            f"{path.name} is not {'a JSON object' if kind is dict else 'a JSON list'}", where=str(path),
            expected=what, found=_json_kind(value), fix="restore the file from the original model",
        )
    return value


def _field(obj: dict, key: str, kinds: tuple[type, ...], where: Path, what: str) -> Any:
    """``obj[key]`` (None when absent or null) if it is one of ``kinds``, else ``InputError``."""
    value = obj.get(key)
    ok = value is None or (isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds))
    if not ok:
        raise InputError(
            f"{where.name} has a {key!r} of the wrong type", where=f"{where}, key {key!r}",
            expected=what, found=_json_kind(value), fix="restore the file from the original model",
        )
    return value


def _inside(root: Path, rel: str, where: Path) -> Path:
    """``root / rel``, refused when ``rel`` leads out of the model directory (``..``, absolute)."""
    path = root / rel
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise InputError(
            "a module path leads out of the model directory", where=str(where),
            expected="a folder inside the directory", found=brief(rel), fix="restore modules.json from the original model",
        ) from None
    return path


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise InputError(
            "loading a model directory needs the transformers package, which is not installed",
            where="--model",
            fix=_FIX_INSTALL,
        ) from None
    return transformers


def _tokenizer_from(path: str, where: str, **kwargs):
    """The tokenizer at ``path`` (transformers, offline), or ``InputError`` naming ``where``."""
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    except Exception as exc:
        raise InputError(
            f"transformers could not load the tokenizer ({type(exc).__name__}: {brief(str(exc).splitlines()[0] if str(exc) else '', 160)})",
            where=where,
            expected="tokenizer.json or tokenizer_config.json with its vocabulary" if not kwargs else
            "a GGUF file carrying its tokenizer (tokenizer.ggml.* keys)",
            fix="copy the model's tokenizer files beside it",
        ) from None


def _st_layout(root: Path) -> tuple[str, str, bool, int | None]:
    """(transformer subdir, pooling mode, normalize, max_seq_length) from a sentence-transformers dir."""
    where = root / "modules.json"
    modules = _read_json(where, "a JSON list of sentence-transformers modules", list)
    if not modules:
        raise InputError("modules.json lists no modules", where=str(where), expected="a non-empty list of modules",
                         found="[]", fix="restore modules.json from the original model")
    for i, m in enumerate(modules):
        if not isinstance(m, dict):
            raise InputError(
                f"modules.json entry {i} is not a module", where=str(where),
                expected='objects like {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}',
                found=_json_kind(m), fix="restore modules.json from the original model",
            )
        _field(m, "idx", (int,), where, "an integer")
        _field(m, "type", (str,), where, "a class name string")
        _field(m, "path", (str,), where, "a folder name string")
    modules = sorted(modules, key=lambda m: m.get("idx") or 0)
    types = [str(m.get("type", "")) for m in modules]
    if not types[0].endswith("Transformer"):
        raise InputError(
            "the first sentence-transformers module is not a Transformer",
            where=str(root / "modules.json"), found=types[0],
            fix="shrinkml supports Transformer -> Pooling [-> Normalize] pipelines",
        )
    supported = ("Transformer", "Pooling", "Normalize")
    others = [t for t in types if not t.endswith(supported)]
    if others:
        raise InputError(
            "unsupported sentence-transformers module", where=str(root / "modules.json"),
            found=", ".join(others), expected="Transformer, Pooling and Normalize modules only",
        )
    subdir = modules[0].get("path") or ""
    _inside(root, subdir, where)
    pooling = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = _read_json(_inside(root, m.get("path") or "", where) / "config.json",
                             "the Pooling module's config (a JSON object)")
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_max_tokens"):
                pooling = "max"
            elif cfg.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            if cfg.get("pooling_mode_mean_sqrt_len_tokens") or cfg.get("pooling_mode_weightedmean_tokens") or cfg.get("pooling_mode_lasttoken"):
                raise InputError(
                    "unsupported pooling mode", where=str(root / str(m.get("path", "")) / "config.json"),
                    expected="pooling_mode_mean_tokens, pooling_mode_cls_token or pooling_mode_max_tokens",
                )
    normalize = any(t.endswith("Normalize") for t in types)
    max_len = None
    sbert = root / subdir / "sentence_bert_config.json"
    if not sbert.is_file():
        sbert = root / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = _field(_read_json(sbert, "a JSON object with max_seq_length"), "max_seq_length", (int,), sbert,
                         "a positive integer")
        if max_len is not None and max_len < 1:
            raise InputError("max_seq_length is not positive", where=f"{sbert}, key 'max_seq_length'",
                             expected="a positive integer", found=str(max_len), fix="restore the file from the original model")
    return subdir, pooling, normalize, max_len or None


def _refuse_generative(config: dict, where: Path) -> None:
    """Generative LMs load with ``AutoModel`` too, and mean-pooling their states would make a
    meaningless "embedding model": refuse them from config.json alone, before any weight is read."""
    archs = [a for a in config.get("architectures") or [] if a.endswith(_GENERATIVE_SUFFIXES)]
    model_type = config.get("model_type")
    found = (
        f"architectures {', '.join(archs)}" if archs
        else "is_decoder: true" if config.get("is_decoder") is True
        else "is_encoder_decoder: true" if config.get("is_encoder_decoder") is True
        else f"model_type {model_type!r} (a decoder-only language model)" if model_type in _DECODER_MODEL_TYPES
        else None
    )
    if found:
        raise InputError(
            "this is a generative language model (a causal decoder such as GPT-2 or Llama, or an"
            " encoder-decoder); those are not supported as embedding or classifier encoders yet",
            where=str(where),
            expected="an encoder (BERT, RoBERTa, MiniLM, ...): a sentence-transformers directory, a"
            " *ForSequenceClassification, or a base model",
            found=found,
            fix="compress an encoder model; mean-pooling a language model's states would not be a"
            " meaningful embedding, so shrinkml does not pretend it is one",
        )


def _convert_command(is_st: bool, classifier: bool) -> str:
    if is_st:
        code = ("import sys; from sentence_transformers import SentenceTransformer as S;"
                " S(sys.argv[1]).save(sys.argv[1] + '-safetensors')")
    else:
        auto = "AutoModelForSequenceClassification" if classifier else "AutoModel"
        code = (f"import sys, transformers as t; d = sys.argv[1]; [c.from_pretrained(d).save_pretrained(d +"
                f" '-safetensors') for c in (t.{auto}, t.AutoTokenizer)]")
    return f'python -c "{code}" DIR'


def _check_weights(model_dir: Path, is_st: bool, classifier: bool) -> None:
    """Refuse a directory whose weights are pickles (or missing) before transformers touches it."""
    if any((model_dir / name).is_file() for name in _SAFETENSORS_WEIGHTS):
        return
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    pickles = [n for n in names if n.lower().endswith(_PICKLE_WEIGHTS)]
    others = [n for n in names if n in ("tf_model.h5", "flax_model.msgpack", "rust_model.ot")]
    # transformers >= 4.35 saves safetensors by default (5.x only); no path inside: the message stays short
    fix = f"in an environment you trust, convert once: {_convert_command(is_st, classifier)} (DIR: the model directory), then pass DIR-safetensors"
    if pickles:
        raise InputError(
            "the model's weights are pickle files; shrinkml does not load pickles, because loading one"
            " can run arbitrary code",
            where=str(model_dir),
            expected="model.safetensors (or model.safetensors.index.json with its shards)",
            found=", ".join(pickles[:4]) + (f" and {len(pickles) - 4} more" if len(pickles) > 4 else ""),
            fix=fix,
        )
    raise InputError(
        "the model directory has no safetensors weights",
        where=str(model_dir),
        expected="model.safetensors (or model.safetensors.index.json with its shards)",
        found=", ".join(others) if others else "no weights file",
        fix=fix if others else "copy model.safetensors of the model into the directory",
    )


def load_hf_dir(root: Path):
    """Load a model directory into a ``LoadedModel`` holding a ``TextEncoder`` and ``text`` info."""
    from shrinkml.models.text import TextEncoder

    root = Path(root)
    is_st = (root / "modules.json").is_file()
    if is_st:
        subdir, pooling, normalize, max_len = _st_layout(root)
    else:
        subdir, pooling, normalize, max_len = "", "mean", False, None
    model_dir = root / subdir
    config_path = model_dir / "config.json"
    config = _read_json(config_path, "a transformers config.json (a JSON object)")
    architectures = _field(config, "architectures", (list,), config_path, "a list of class names") or []
    if not all(isinstance(a, str) for a in architectures):
        raise InputError("config.json's architectures are not class names", where=f"{config_path}, key 'architectures'",
                         expected="a list of strings", found=brief(architectures), fix="restore the file from the original model")
    _field(config, "model_type", (str,), config_path, "a model type string")
    _refuse_generative(config, config_path)  # causal LMs never get here: models.load routes them
    classifier = not is_st and any(a.endswith("ForSequenceClassification") for a in architectures)
    _check_weights(model_dir, is_st, classifier)
    transformers = _import_transformers()
    cls = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    try:
        transformer = cls.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
    except Exception as exc:
        raise InputError(
            f"transformers could not load the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            where=str(model_dir),
            expected="config.json with model.safetensors beside it",
            fix="check the weights file in the directory is complete",
        ) from None
    tok_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "vocab.txt").is_file() else root
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"transformers could not load the tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            where=str(tok_dir),
            expected="tokenizer.json or tokenizer_config.json with its vocabulary",
            fix="copy the tokenizer files of the model into the directory",
        ) from None
    if max_len is None:
        positions = _field(config, "max_position_embeddings", (int,), config_path, "an integer")
        limits = [v for v in (getattr(tokenizer, "model_max_length", None), positions) if v and v > 0]
        max_len = int(min(limits)) if limits else 512
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kind = "classifier" if classifier else "embedding"
    module = TextEncoder(transformer.eval(), kind=kind, pooling=pooling, normalize=normalize, pad_token_id=int(pad_id))
    info = TextModelInfo(
        tokenizer=tokenizer, source_dir=str(root), kind=kind, pooling=pooling, normalize=normalize,
        max_seq_length=max_len, transformer_subdir=subdir, sentence_transformers=is_st,
    )
    return LoadedModel("torch", str(root), module=module.eval(), text=info)


def tokenize(tokenizer: Any, texts: list[str], max_length: int):
    """Token ids ``(n, max_length)`` int64, padded with the tokenizer's pad id (fixed length)."""
    import numpy as np

    enc = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=int(max_length),
        return_attention_mask=False, return_token_type_ids=False,
    )
    return np.asarray(enc["input_ids"], dtype=np.int64)


_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json", "config.json", "tf_model.h5", "flax_model.msgpack",
                 "rust_model.ot", "model.onnx"}
_SKIP_DIRS = {"onnx", "openvino", ".git", ".cache"}


def copy_text_dir(info: TextModelInfo, dest: Path, *, with_config: bool = True) -> Path:
    """The original directory's non-weight files (tokenizer, modules.json, pooling/normalize folders,
    configs; ``config.json`` unless ``with_config`` is false) copied into ``dest``: with an
    ``onnx/model.onnx`` or ``openvino/`` model beside them, what sentence-transformers' ONNX and
    OpenVINO backends (and optimum) load."""
    import shutil

    src = Path(info.source_dir)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weights_dir = (src / info.transformer_subdir).resolve()
    skipped = _WEIGHT_FILES - ({"config.json"} if with_config else set())
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.name in skipped and path.parent.resolve() == weights_dir:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


def save_text_model(module: Any, info: TextModelInfo, dest: Path) -> Path:
    """Write a loadable directory for ``module`` (a ``TextEncoder``): the original directory's
    non-weight files plus the transformer's weights via ``save_pretrained`` (safetensors), so
    config.json has any pruned shapes. ``quantize.bf16``'s INT8 weights are written as the bfloat16
    weights they dequantize to, which plain transformers loads (the compact INT8 file is the run's
    ``model.safetensors``)."""
    from shrinkml.models.text import TextEncoder

    if not isinstance(module, TextEncoder):
        raise TypeError(f"expected a TextEncoder, found {type(module).__name__}")
    dest = copy_text_dir(info, dest, with_config=False)
    transformer = module.transformer
    from shrinkml.nn.int8 import dequantized_copy, has_int8_modules

    if has_int8_modules(transformer):  # INT8 codes -> the bfloat16 weights they compute with
        transformer = dequantized_copy(transformer)
    transformer.save_pretrained(str(dest / info.transformer_subdir), safe_serialization=True)
    return dest


_VERIFY_SCRIPT = """
import sys, numpy as np
from sentence_transformers import SentenceTransformer
texts = [line for line in open(sys.argv[2], encoding='utf-8').read().split('\\n') if line]
emb = SentenceTransformer(sys.argv[1], device='cpu').encode(texts, convert_to_numpy=True)
np.save(sys.argv[3], emb.astype(np.float32))
"""


def verify_sentence_transformers(dest: Path, module: Any, info: TextModelInfo, texts: list[str], workdir: Path) -> float:
    """Load ``dest`` with ``SentenceTransformer`` in a fresh, offline subprocess, encode ``texts``
    and return the smallest cosine to ``module``'s embeddings of the same texts."""
    import os
    import subprocess
    import sys

    import numpy as np
    import torch

    texts_file, emb_file = Path(workdir) / "verify_texts.txt", Path(workdir) / "verify_emb.npy"
    texts_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _VERIFY_SCRIPT, str(dest), str(texts_file), str(emb_file)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"SentenceTransformer could not load the saved directory: {tail}")
    theirs = np.load(emb_file).astype(np.float64)
    ids = tokenize(info.tokenizer, texts, info.max_seq_length or 128)
    with torch.inference_mode():
        ours = module.eval()(torch.as_tensor(ids)).float().numpy().astype(np.float64)
    cos = (ours * theirs).sum(1) / np.maximum(np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1), 1e-30)
    return float(cos.min())
