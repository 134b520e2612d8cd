"""Decoder language models: a Hugging Face causal-LM directory or a llama.cpp GGUF file, loaded
offline as a float PyTorch ``*ForCausalLM``. Never loaded as an encoder.

* A directory whose ``config.json`` names a causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
  ``MistralForCausalLM``, ``Phi3ForCausalLM``, ``GemmaForCausalLM``, ``GPT2LMHeadModel``, ... or a
  decoder ``model_type`` without architectures) loads through ``AutoModelForCausalLM`` from its
  safetensors weights (never pickles) with its tokenizer.
* A ``.gguf`` file loads through transformers' GGUF reader (the ``gguf`` package dequantizes the
  blocks to float32) into a fresh ``AutoModelForCausalLM`` built from the file's hyperparameters,
  with the tokenizer the file carries. The float weights are the file's blocks dequantized: a
  Q4_1 file's "FP32" model holds 4-bit values, which ``notes`` says, because any 4-bit scheme with
  the same blocks reproduces them exactly.

transformers is imported inside the functions (``import shrinkml`` stays light).

>>> loaded = load_causal_lm(Path("SmolLM2-135M-Instruct.Q4_1.gguf"))  # doctest: +SKIP
>>> loaded.lm.architecture, loaded.lm.file_type  # doctest: +SKIP
('llama', 'MOSTLY_Q4_1')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError, brief
from shrinkml.models.hf import _tokenizer_from
from shrinkml.models.loaded import LoadedModel

GGUF_SUFFIX = ".gguf"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MAX_GGUF_BYTES = 64 * 2**30  # a bound on what is memory-mapped; larger files are refused up front
_GGUF_MAGIC = b"GGUF"


@dataclass
class CausalLMInfo:
    """What a causal LM needs besides its weights, and what loading found."""

    tokenizer: Any
    source: str
    architecture: str  # the config's model_type, e.g. "llama"
    context_length: int  # max_position_embeddings
    vocab_size: int
    tied_embeddings: bool
    gguf_path: str | None = None  # the source GGUF file, when loaded from one
    file_type: str | None = None  # the GGUF's general.file_type name (e.g. MOSTLY_Q4_1), when known
    converted_gguf: str | None = None  # a directory's GGUF made by shrinkml (converted_gguf), once made
    bos_token_id: int | None = None
    notes: list[str] = field(default_factory=list)
    kind: str = "causal_lm"


def is_causal_lm_config(config: dict) -> bool:
    """True when a transformers ``config.json`` describes a decoder-only language model."""
    from shrinkml.models.hf import _DECODER_MODEL_TYPES

    if config.get("is_encoder_decoder") is True:
        return False
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if archs:
        return any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    return config.get("model_type") in _DECODER_MODEL_TYPES


def is_causal_lm_dir(path: Path) -> bool:
    """A transformers directory (no ``modules.json``) whose config.json names a causal LM."""
    from shrinkml.models.hf import _read_json

    path = Path(path)
    if (path / "modules.json").is_file() or not (path / "config.json").is_file():
        return False
    return is_causal_lm_config(_read_json(path / "config.json", "a transformers config.json (a JSON object)"))


def _import_transformers():
    from shrinkml.models.hf import _import_transformers as imp

    return imp()


def _info(model, tokenizer, source: str, **extra) -> CausalLMInfo:
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return CausalLMInfo(
        tokenizer=tokenizer, source=source, architecture=str(cfg.model_type),
        context_length=int(getattr(cfg, "max_position_embeddings", 0) or 2048),
        vocab_size=int(cfg.vocab_size), tied_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(cfg, "bos_token_id", None),
        **extra,
    )


def load_causal_lm_dir(root: Path, config: dict) -> LoadedModel:
    """A transformers causal-LM directory (``config.json`` + safetensors) as a float model."""
    from shrinkml.models.hf import _check_weights

    root = Path(root)
    _check_weights(root, False, False)
    transformers = _import_transformers()
    transformers.utils.logging.disable_progress_bar()  # shrinkml reports its own progress
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(root), local_files_only=True, use_safetensors=True, dtype="float32")
    except Exception as exc:
        raise InputError(
            f"transformers could not load the causal language model ({type(exc).__name__}: "
            f"{brief(str(exc).splitlines()[0] if str(exc) else '', 160)})",
            where=str(root), expected="config.json of a *ForCausalLM with model.safetensors beside it",
            fix="check the weights are complete and the architecture is one this transformers knows",
        ) from None
    tokenizer = _tokenizer_from(str(root), str(root))
    info = _info(model, tokenizer, str(root))
    return LoadedModel("torch", str(root), module=model.eval(), lm=info, notes=list(info.notes))


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise InputError("the GGUF file does not exist", where=str(path), fix="pass the path of a .gguf file")
    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise InputError(
            "the file is not a GGUF file", where=str(path), expected="the GGUF magic bytes 'GGUF' at the start",
            found=brief(magic), fix="pass a llama.cpp .gguf model file",
        )
    if size > _MAX_GGUF_BYTES:
        raise InputError("the GGUF file is larger than shrinkml loads", where=str(path),
                         expected=f"at most {_MAX_GGUF_BYTES:,} bytes", found=f"{size:,} bytes",
                         fix="use a smaller model")


def gguf_file_type(path: Path) -> str | None:
    """The GGUF's ``general.file_type`` as llama.cpp's name (``MOSTLY_Q4_1``), or None."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = reader.fields.get("general.file_type")
    if f is None:
        return None
    value = int(f.parts[f.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return str(value)


def load_gguf(path: Path, *, lazy: bool = False) -> LoadedModel:
    """A GGUF file as a float ``*ForCausalLM`` (its blocks dequantized) with the file's tokenizer.
    ``lazy``: the decoder layers stay in the file (memory-mapped) until a step walks them
    (``shrinkml.models.lazy``; llama-architecture files), for runtimes that measure files."""
    path = Path(path)
    _check_gguf_file(path)
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise InputError("loading a GGUF file needs the gguf package, which is not installed", where=str(path),
                         fix="pip install 'shrinkml[llm]'") from None
    transformers = _import_transformers()
    import torch
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # its plain tqdm bar ignores transformers' progress-bar switch; shrinkml reports its own progress
    bar, gguf_utils.tqdm = getattr(gguf_utils, "tqdm", None), lambda items, **_: items
    try:
        return _load_gguf(path, transformers, torch, load_gguf_checkpoint, lazy=lazy)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar


def _load_gguf(path: Path, transformers, torch, load_gguf_checkpoint, *, lazy: bool) -> LoadedModel:
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        cfg = dict(parsed["config"])
        model_type = cfg.pop("model_type")
        cfg.pop("_model_name_or_path", None)
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        if lazy and model_type == "llama":
            from shrinkml.models.lazy import GGUFWeights, lazy_causal_lm

            model = lazy_causal_lm(config, GGUFWeights(path))
            notes = ["loaded lazily: the decoder layers stay in the GGUF file until a step reads them, one at a time"]
            return _gguf_loaded(path, model, notes)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(
            f"transformers could not read the GGUF model ({type(exc).__name__}: {brief(str(exc).splitlines()[0] if str(exc) else '', 160)})",
            where=str(path), expected="a GGUF file of an architecture transformers' GGUF reader knows (llama, qwen2,"
            " mistral, phi3, gemma, gpt2, ...)", fix="convert the model to a Hugging Face directory and pass that",
        ) from None
    state = {name: torch.as_tensor(value, dtype=torch.float32) for name, value in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise InputError(
            "the GGUF file's tensors do not fill the model its metadata describes", where=str(path),
            expected=f"every tensor of a {model_type} model", found=f"missing {missing[:3]}, unexpected"
            f" {list(result.unexpected_keys)[:3]}", fix="check the file is complete (a download cut short is truncated)",
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return _gguf_loaded(path, model, [])


def _gguf_loaded(path: Path, model, notes: list[str]) -> LoadedModel:
    tokenizer = _tokenizer_from(str(path.parent), str(path), gguf_file=path.name)
    file_type = gguf_file_type(path)
    notes = [f"loaded from GGUF ({file_type or 'unknown file type'}): the float model holds the file's blocks"
             " dequantized to float32, not the weights it was trained with", *notes]
    info = _info(model, tokenizer, str(path), gguf_path=str(path), file_type=file_type, notes=notes)
    return LoadedModel("torch", str(path), module=model.eval(), lm=info, notes=list(notes))


def load_causal_lm(path: Path, *, lazy: bool = False) -> LoadedModel:
    """A ``.gguf`` file or a transformers causal-LM directory. ``lazy`` (for runtimes that measure
    GGUF files): a file loads as :func:`load_gguf` says; a directory is converted to a GGUF first
    (:func:`load_causal_lm_dir_as_gguf`)."""
    path = Path(path)
    if path.suffix.lower() == GGUF_SUFFIX:
        return load_gguf(path, lazy=lazy)
    from shrinkml.models.hf import _read_json

    config = _read_json(path / "config.json", "a transformers config.json (a JSON object)")
    if not is_causal_lm_config(config):
        raise InputError("the directory is not a causal language model", where=str(path / "config.json"),
                         expected="a *ForCausalLM / *LMHeadModel architecture",
                         found=brief(config.get("architectures") or config.get("model_type")),
                         fix="pass an encoder directory without --task perplexity")
    if lazy:
        return load_causal_lm_dir_as_gguf(path)
    return load_causal_lm_dir(path, config)


def converted_gguf(root: Path) -> tuple[Path, dict[str, Any]]:
    """The causal-LM directory ``root`` as a GGUF file at its own precision
    (``shrinkml.models.hf_gguf``), in a temporary folder removed when this process exits;
    returns (path, the conversion's summary). ``root`` is only read."""
    import atexit
    import shutil
    import tempfile

    from shrinkml.models.hf_gguf import convert_hf_dir

    _check_gguf_input(root)
    folder = Path(tempfile.mkdtemp(prefix="shrinkml-gguf-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return convert_hf_dir(root, folder / f"{root.name or 'model'}.gguf")


def gguf_source(loaded: LoadedModel) -> Path:
    """The GGUF file whose tokenizer and metadata a written GGUF carries: the input ``.gguf``, or
    the input directory converted once (:func:`converted_gguf`)."""
    lm = loaded.lm
    if lm.gguf_path is not None:
        return Path(lm.gguf_path)
    if lm.converted_gguf is None:
        lm.converted_gguf = str(converted_gguf(Path(loaded.source))[0])
    return Path(lm.converted_gguf)


def gguf_refusal(loaded: LoadedModel) -> str | None:
    """Why no GGUF can be written for this causal LM (None when one can)."""
    if loaded.lm.gguf_path is not None or loaded.lm.converted_gguf is not None:
        return None
    if loaded.source not in _REFUSALS:  # a search asks once per candidate: the tokenizer check loads it
        try:
            _check_gguf_input(Path(loaded.source))
            _REFUSALS[loaded.source] = None
        except InputError as exc:
            _REFUSALS[loaded.source] = f"{exc.what} ({exc.where})"
    return _REFUSALS[loaded.source]


_REFUSALS: dict[str, str | None] = {}


def _check_gguf_input(root: Path) -> None:
    from shrinkml.models.hf import _check_weights
    from shrinkml.models.hf_gguf import check_convertible

    check_convertible(root)
    _check_weights(root, False, False)


def load_causal_lm_dir_as_gguf(root: Path) -> LoadedModel:
    """A causal-LM directory for a runtime that measures GGUF files (llama.cpp): converted to a
    GGUF file at its own precision (:func:`converted_gguf`), which then loads lazily as a ``.gguf``
    input does (its decoder layers read one at a time by the steps), with the directory's own
    tokenizer. ``source`` stays the directory: its files are the input's size."""
    root = Path(root)
    path, summary = converted_gguf(root)
    loaded = load_gguf(path, lazy=True)
    tokenizer = _tokenizer_from(str(root), str(root))
    note = (f"converted to GGUF by shrinkml for llama.cpp ({summary['file_type']}, {summary['tensors']} tensors,"
            f" pre-tokenizer {summary['pre_tokenizer']}, {path.stat().st_size:,} bytes): the directory's weights at"
            " their own precision, as llama.cpp's convert_hf_to_gguf.py writes them; the baseline is that file")
    notes = [note, *(n for n in loaded.notes if not n.startswith("loaded from GGUF"))]
    lm = loaded.lm
    lm.source, lm.tokenizer, lm.notes, lm.converted_gguf = str(root), tokenizer, notes, str(path)
    lm.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else lm.bos_token_id
    return LoadedModel("torch", str(root), module=loaded.module, lm=lm, notes=list(notes))
