"""Model specs: ``package.module:factory`` (+ ``.safetensors`` weights), an ``.onnx`` file, or an
``nn.Module`` object, or a Hugging Face / sentence-transformers model directory. Pickle-based files are refused: loading them would run arbitrary code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError
from shrinkml.imports import import_object

_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


@dataclass
class LoadedModel:
    """The model as loaded. ``kind`` is ``torch`` (``module`` set) or ``onnx`` (``onnx_model`` set)."""

    kind: str
    source: str
    module: Any = None  # torch.nn.Module
    onnx_model: Any = None  # onnx.ModelProto
    weights: str | None = None
    text: Any = None  # shrinkml.models.hf.TextModelInfo for Hugging Face model directories


def _pickle_refusal(path: Path, where: str) -> InputError:
    return InputError(
        "this looks like a pickle / torch.save file; shrinkml does not unpickle files, because"
        " loading a pickle can run arbitrary code",
        where=where,
        expected="a .safetensors file (or an .onnx file as --model)",
        found=f"{path.name}",
        fix="convert it once in an environment you trust: safetensors.torch.save_file("
        f"torch.load('{path}', weights_only=True), 'model.safetensors'), then pass --weights"
        " model.safetensors",
    )


def _load_onnx(path: Path) -> LoadedModel:
    import onnx

    if not path.is_file():
        raise InputError("model file not found", where=str(path), fix="check the path given to --model")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise InputError(
            f"not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            where=str(path),
            fix="re-export the model (torch.onnx.export) and check it with onnx.checker.check_model",
        ) from None
    initializers = {t.name for t in model.graph.initializer}
    if not [i for i in model.graph.input if i.name not in initializers]:
        raise InputError(
            "the ONNX model has no inputs", where=str(path), fix="export the model with its input tensor"
        )
    return LoadedModel("onnx", str(path), onnx_model=model)


def _load_weights(module: Any, weights: str) -> None:
    from shrinkml.models.safetensors_io import fit_module_to_state_dict, load_state_dict

    path = Path(weights)
    state = load_state_dict(path)
    fit_module_to_state_dict(module, state)
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append("missing " + ", ".join(result.missing_keys[:5]) + ("..." if len(result.missing_keys) > 5 else ""))
    if result.unexpected_keys:
        problems.append(
            "unexpected " + ", ".join(result.unexpected_keys[:5]) + ("..." if len(result.unexpected_keys) > 5 else "")
        )
    if problems:
        raise InputError(
            "the weights do not match the model built by the factory",
            where=str(path),
            expected="the same parameter names as the factory's model.state_dict()",
            found="; ".join(problems),
            fix="pass the factory that built the model these weights were saved from",
        )


def load_model(spec: Any, *, weights: str | Path | None = None) -> LoadedModel:
    """Load a model spec; see the module docstring for the accepted forms."""
    import torch

    if isinstance(spec, torch.nn.Module):
        if weights is not None:
            _load_weights(spec, str(weights))
        return LoadedModel("torch", type(spec).__name__, module=spec.eval(), weights=None if weights is None else str(weights))
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        from shrinkml.models.hf import is_hf_dir, load_hf_dir

        if weights is not None:
            raise InputError(
                "--weights is only for factory models", where="--weights",
                fix="a model directory holds its own weights: drop --weights",
            )
        if not is_hf_dir(path):
            raise InputError(
                "the model directory has neither modules.json nor config.json",
                where=text,
                expected="a sentence-transformers directory (modules.json) or a transformers directory (config.json)",
                fix="pass the directory that save_pretrained / SentenceTransformer.save wrote",
            )
        return load_hf_dir(path)
    if path.suffix.lower() == ".onnx":
        if weights is not None:
            raise InputError(
                "--weights is only for factory models", where="--weights", fix="drop --weights for an .onnx model"
            )
        return _load_onnx(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES or path.suffix.lower() == ".safetensors":
        if path.suffix.lower() == ".safetensors":
            raise InputError(
                "a .safetensors file holds weights, not the model's architecture",
                where="--model",
                fix="pass the architecture as --model package.module:factory and the file as --weights",
            )
        raise _pickle_refusal(path, "--model")
    if ":" not in text or path.exists():
        raise InputError(
            "cannot tell what kind of model this is" if path.exists() else "model not found",
            where=text,
            expected="package.module:factory (with --weights file.safetensors) or a .onnx file",
            fix="pass one of those to --model",
        )
    factory = import_object(text, what="model factory")
    try:
        module = factory()
    except Exception as exc:
        raise InputError(
            f"the model factory raised {type(exc).__name__}: {exc}",
            where=text,
            fix="call the factory on its own to debug it (shrinkml --debug shows the traceback)",
        ) from exc
    if not isinstance(module, torch.nn.Module):
        raise InputError(
            "the model factory did not return a torch.nn.Module",
            where=text,
            found=type(module).__name__,
            fix="return the model instance from the factory",
        )
    if weights is not None:
        wpath = Path(weights)
        if wpath.suffix.lower() in _PICKLE_SUFFIXES:
            raise _pickle_refusal(wpath, "--weights")
        _load_weights(module, str(weights))
    return LoadedModel("torch", text, module=module.eval(), weights=None if weights is None else str(weights))
