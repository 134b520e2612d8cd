"""Hugging Face model directories: a sentence-transformers directory (``modules.json``) or a plain
transformers directory (``config.json``), loaded offline into a one-input ``TextEncoder``.

transformers is imported inside the functions so that ``import shrinkml`` stays light.

>>> loaded = load_hf_dir(Path("all-MiniLM-L6-v2"))  # doctest: +SKIP
>>> loaded.text.pooling, loaded.text.normalize, loaded.text.max_seq_length  # doctest: +SKIP
('mean', True, 256)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError

_FIX_INSTALL = "pip install 'shrinkml[text]'"


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


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise InputError(
            f"the model directory lacks {path.name}",
            where=str(path),
            expected=what,
            fix="pass a complete sentence-transformers or transformers model directory",
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(
            f"cannot parse {path.name} ({exc})", where=str(path), expected=what,
            fix="restore the file from the original model",
        ) from None


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


def _st_layout(root: Path) -> tuple[str, str, bool, int | None]:
    """(transformer subdir, pooling mode, normalize, max_seq_length) from a sentence-transformers dir."""
    modules = _read_json(root / "modules.json", "a list of sentence-transformers modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise InputError("modules.json is not a list of modules", where=str(root / "modules.json"))
    modules = sorted(modules, key=lambda m: m.get("idx", 0))
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
    subdir = str(modules[0].get("path", "") or "")
    pooling = "mean"
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            cfg = _read_json(root / str(m.get("path", "")) / "config.json", "the Pooling module's config")
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
        max_len = _read_json(sbert, "max_seq_length").get("max_seq_length")
    return subdir, pooling, normalize, (int(max_len) if max_len else None)


def load_hf_dir(root: Path):
    """Load a model directory into a ``LoadedModel`` holding a ``TextEncoder`` and ``text`` info."""
    from shrinkml.models.load import LoadedModel
    from shrinkml.models.text import TextEncoder

    root = Path(root)
    is_st = (root / "modules.json").is_file()
    if is_st:
        subdir, pooling, normalize, max_len = _st_layout(root)
    else:
        subdir, pooling, normalize, max_len = "", "mean", False, None
    model_dir = root / subdir
    config = _read_json(model_dir / "config.json", "a transformers config.json")
    transformers = _import_transformers()
    architectures = config.get("architectures") or []
    classifier = not is_st and any(str(a).endswith("ForSequenceClassification") for a in architectures)
    cls = transformers.AutoModelForSequenceClassification if classifier else transformers.AutoModel
    try:
        transformer = cls.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise InputError(
            f"transformers could not load the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            where=str(model_dir),
            expected="config.json with model.safetensors (or pytorch_model.bin) beside it",
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
        limits = [v for v in (getattr(tokenizer, "model_max_length", None), config.get("max_position_embeddings")) if v]
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


def save_text_model(module: Any, info: TextModelInfo, dest: Path) -> Path:
    """Write a loadable directory for ``module`` (a ``TextEncoder``): the original directory's
    non-weight files (tokenizer, modules.json, pooling/normalize folders, configs) plus the
    transformer's weights via ``save_pretrained`` (safetensors), so config.json has any pruned shapes.
    ``quantize.bf16``'s INT8 weights are written as the bfloat16 weights they dequantize to, which plain
    transformers loads (the compact INT8 file is the run's ``model.safetensors``)."""
    import shutil

    from shrinkml.models.text import TextEncoder

    if not isinstance(module, TextEncoder):
        raise TypeError(f"expected a TextEncoder, found {type(module).__name__}")
    src = Path(info.source_dir)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weights_dir = (src / info.transformer_subdir).resolve()
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.name in _WEIGHT_FILES and path.parent.resolve() == weights_dir:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    transformer = module.transformer
    from shrinkml.techniques.quantize_bf16 import dequantized_copy, has_int8_modules

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
