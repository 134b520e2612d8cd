"""Model specs: ``package.module:factory`` (+ ``.safetensors`` weights), an ``.onnx`` file, an
``nn.Module`` object, or a Hugging Face / sentence-transformers model directory. Pickle-based files
are refused: loading them would run arbitrary code.

Weights are checked before they are loaded, since ``load_state_dict`` would silently cast or accept
them: integer/bool tensors for float parameters, NaN/inf values and shapes the model cannot take
are refused naming the tensor; float tensors of another precision are cast and noted."""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError
from shrinkml.imports import import_object
from shrinkml.models.loaded import _LISTED, LoadedModel

_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}
# Errors that say nothing about the weights: let them through instead of blaming the file.
_NOT_ABOUT_THE_WEIGHTS = (TimeoutError, MemoryError)


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
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise InputError(
            "the ONNX model has no inputs", where=str(path), fix="export the model with its input tensor"
        )
    from shrinkml.runtimes.feeds import META_KEY, TEXT_INPUTS, onnx_spec

    if len(inputs) > 1 and onnx_spec(model) is None:
        text = "input_ids" in inputs and set(inputs) <= set(TEXT_INPUTS)
        raise InputError(
            f"the ONNX model takes {len(inputs)} inputs and says nothing about how to feed them from one data array",
            where=str(path),
            expected=f"one input, or a shrinkml-written model (its metadata_props {META_KEY!r} says how the other"
            " inputs follow from token ids)",
            found="inputs " + ", ".join(inputs[:8]) + (" (a tokenizer's outputs: the pad id that masks them is"
                                                       " not recorded in the file)" if text else ""),
            fix=("pass the Hugging Face / sentence-transformers model directory as --model instead: shrinkml exports"
                 " it itself, with these inputs" if text else "export the model with a single input tensor"),
        )
    return LoadedModel("onnx", str(path), onnx_model=model)


def _listing(items: list[str]) -> str:
    return ", ".join(items[:_LISTED]) + (f" and {len(items) - _LISTED} more" if len(items) > _LISTED else "")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtypes(state: dict, target: dict, path: Path) -> list[str]:
    """Cast float tensors to the float dtype of the parameter they load into (returned as notes);
    refuse a tensor of another kind (integer, bool, complex) where the model has a float one, and a
    float where it has an integer one: ``load_state_dict`` would cast those silently."""
    import torch

    def kind(t: torch.Tensor) -> str:
        return "float" if t.is_floating_point() else "complex" if t.is_complex() else "integer"

    casts: Counter = Counter()
    for name, tensor in state.items():
        own = target.get(name)
        if not isinstance(own, torch.Tensor) or not isinstance(tensor, torch.Tensor) or own.dtype == tensor.dtype:
            continue
        if kind(own) != kind(tensor):
            raise InputError(
                f"a weight tensor has the wrong dtype: {_dtype_name(tensor.dtype)} where the model has"
                f" {_dtype_name(own.dtype)}; casting it would change its values",
                where=f"{path}, tensor {name!r}",
                expected=f"{kind(own)} values ({_dtype_name(own.dtype)}, as the model factory builds it)",
                found=f"{_dtype_name(tensor.dtype)} (quantized or corrupted weights?)",
                fix="save the float weights (model.state_dict() before quantizing) with"
                " safetensors.torch.save_file, and pass that file as --weights",
            )
        if kind(own) == "float":
            cast = tensor.to(own.dtype)
            overflow = int((~torch.isfinite(cast) & torch.isfinite(tensor)).sum())
            if overflow:
                raise InputError(
                    f"weight values are outside the range of {_dtype_name(own.dtype)}",
                    where=f"{path}, tensor {name!r}",
                    expected=f"values {_dtype_name(own.dtype)} can hold (the model's dtype)",
                    found=f"{overflow} {_dtype_name(tensor.dtype)} values that become inf when cast",
                    fix="check the checkpoint: weights this large come from a diverged or corrupted training run",
                )
            state[name] = cast
        else:  # integer to integer (e.g. BatchNorm's num_batches_tracked): values are counts
            state[name] = tensor.to(own.dtype)
        casts[(_dtype_name(tensor.dtype), _dtype_name(own.dtype))] += 1
    return [
        f"weights: {n} tensor{'s' if n > 1 else ''} cast from {a} to {b} (the model's dtype) when loading {path.name}"
        for (a, b), n in sorted(casts.items())
    ]


def _check_finite(state: dict, path: Path) -> None:
    import torch

    bad = []
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if nan or inf:
                bad.append(f"{name!r} ({nan} NaN, {inf} inf of {tensor.numel()})")
    if bad:
        raise InputError(
            "the weights contain NaN or infinite values, so every output computed from them is meaningless",
            where=f"{path}, {len(bad)} tensor{'s' if len(bad) > 1 else ''}",
            expected="finite weights",
            found=_listing(bad),
            fix="save the weights from a checkpoint before training diverged (or check how the file was written)",
        )


def _check_shapes(state: dict, target: dict, path: Path) -> None:
    """Shapes ``fit_module_to_state_dict`` left different (e.g. a layer reached under two names)."""
    import torch

    wrong = [
        f"{name!r}: the model has {list(target[name].shape)}, the file {list(t.shape)}"
        for name, t in state.items()
        if isinstance(t, torch.Tensor) and isinstance(target.get(name), torch.Tensor)
        and tuple(t.shape) != tuple(target[name].shape)
    ]
    _refuse_shapes(wrong, path, "weight tensors have shapes the model's layers cannot take",
                   "each tensor shaped like the factory model's tensor of the same name")


def _check_resizes(resized: dict, path: Path) -> None:
    """A model saved after channel pruning differs from the factory's only in channel / feature
    counts (dims 0 and 1); ``fit_module_to_state_dict`` also takes a new kernel size, which would
    silently run another architecture."""
    wrong = [
        f"{name!r}: the model has {list(built)}, the file {list(loaded)}"
        for name, (built, loaded) in resized.items()
        if len(built) != len(loaded) or built[2:] != loaded[2:]
    ]
    _refuse_shapes(wrong, path, "weight tensors differ from the factory's model in more than channel counts",
                   "the factory's shapes, or fewer channels / features after pruning (kernel sizes unchanged)")


def _refuse_shapes(wrong: list[str], path: Path, what: str, expected: str) -> None:
    if wrong:
        raise InputError(
            what, where=f"{path}, {len(wrong)} tensor{'s' if len(wrong) > 1 else ''}", expected=expected,
            found=_listing(wrong), fix="pass the factory that built the model these weights were saved from",
        )


def _versioned(state: dict, module: Any) -> OrderedDict:
    """``state`` with the ``_metadata`` a ``module.state_dict()`` carries.

    ``load_state_dict`` hands each submodule its ``local_metadata``; modules that changed their
    layout (torchvision's MNASNet, BatchNorm) read the saved ``version`` from it, and MNASNet refuses
    to load without one. safetensors files do not store it; they are written from the current
    version of the modules, so the freshly built module's own versions are the right ones.
    """
    versioned = OrderedDict(state)
    versioned._metadata = getattr(module.state_dict(), "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return versioned


def _load_weights(module: Any, weights: str) -> tuple[list[str], dict]:
    """Load ``weights`` into ``module`` in place; return the notes for the report and the tensors
    resized from the factory's shapes (``name -> (built shape, loaded shape)``)."""
    from shrinkml.models.safetensors_io import fit_module_to_state_dict, load_state_dict

    path = Path(weights)
    state = load_state_dict(path)
    built = {name: tuple(t.shape) for name, t in module.state_dict().items() if hasattr(t, "shape")}
    fit_module_to_state_dict(module, state)
    target = module.state_dict()
    resized = {
        name: (built[name], tuple(t.shape))
        for name, t in target.items()
        if name in built and hasattr(t, "shape") and tuple(t.shape) != built[name]
    }
    _check_shapes(state, target, path)
    _check_resizes(resized, path)
    _check_finite(state, path)
    notes = _check_dtypes(state, target, path)
    try:
        result = module.load_state_dict(_versioned(state, module), strict=False)
    except _NOT_ABOUT_THE_WEIGHTS:
        raise
    except Exception as exc:  # the modules' own _load_from_state_dict code can raise anything
        raise InputError(
            "the model could not load the weights",
            where=str(path),
            expected="weights the factory's model.load_state_dict accepts",
            found=f"{type(exc).__name__}: {str(exc).strip()[:500]}",
            fix="pass the factory that built the model these weights were saved from"
            " (model.load_state_dict on its own shows the full error)",
        ) from exc
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
    return notes, resized


def _only_for_factories(flag: str, fix: str) -> InputError:
    return InputError(f"{flag} is only for factory models", where=flag, fix=fix)


def _refuse_weights(weights: Any, random_weights: bool, holder: str) -> None:
    """A model that holds its own weights (``holder``: "a model directory", "an .onnx file", ...)
    takes neither --weights nor --random-weights."""
    if weights is not None or random_weights:
        raise _only_for_factories("--weights" if weights is not None else "--random-weights",
                                  f"{holder} holds its own weights: drop --weights / --random-weights")


def load_model(spec: Any, weights: str | Path | None = None, *, random_weights: bool = False,
               lazy_lm: bool = False) -> LoadedModel:
    """Load a model spec; see the module docstring for the accepted forms. ``lazy_lm`` (runtimes that
    measure GGUF files): a causal LM's decoder layers stay in their GGUF file until a step reads
    them (``shrinkml.models.lazy``); a causal-LM directory is converted to that GGUF first.

    A factory's model has random weights until ``weights`` are loaded into it, so a factory without
    ``weights`` is refused unless ``random_weights=True`` (architecture benchmarking; recorded on
    the result). An ``nn.Module`` object is the caller's own, trained or not, and is taken as is.

    >>> loaded = load_model("mypkg.models:make_net", "net.safetensors")  # doctest: +SKIP
    >>> loaded.notes  # doctest: +SKIP
    ['weights: 4 tensors cast from float64 to float32 (the model's dtype) when loading net.safetensors']
    """
    import torch

    if random_weights and weights is not None:
        raise InputError(
            "--random-weights and --weights contradict each other",
            where="--random-weights",
            fix="drop --random-weights to use the trained weights, or drop --weights to benchmark the"
            " architecture with random weights",
        )
    if isinstance(spec, torch.nn.Module):
        notes, resized = _load_weights(spec, str(weights)) if weights is not None else ([], {})
        return LoadedModel(
            "torch", type(spec).__name__, module=spec.eval(), weights=None if weights is None else str(weights),
            random_weights=random_weights, notes=notes, resized=resized,
        )
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        from shrinkml.models.hf import is_hf_dir, load_hf_dir

        _refuse_weights(weights, random_weights, "a model directory")
        if not is_hf_dir(path):
            raise InputError(
                "the model directory has neither modules.json nor config.json",
                where=text,
                expected="a sentence-transformers directory (modules.json) or a transformers directory (config.json)",
                fix="pass the directory that save_pretrained / SentenceTransformer.save wrote",
            )
        from shrinkml.models.causal_lm import is_causal_lm_dir, load_causal_lm

        if is_causal_lm_dir(path):  # a decoder LM: its own loader, never an encoder
            return load_causal_lm(path, lazy=lazy_lm)
        return load_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        _refuse_weights(weights, random_weights, "a .gguf file")
        from shrinkml.models.causal_lm import load_gguf

        return load_gguf(path, lazy=lazy_lm)
    if path.suffix.lower() == ".onnx":
        _refuse_weights(weights, random_weights, "an .onnx file")
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
    if weights is not None and Path(weights).suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_refusal(Path(weights), "--weights")
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
    if weights is None:
        if not random_weights:
            # After calling the factory, so a factory that cannot build a model says so first.
            raise InputError(
                "no weights were given for the factory model, so it would be measured and compressed"
                " with the random weights it is built with",
                where=f"{text} without --weights",
                expected="--weights file.safetensors holding the trained weights",
                fix="pass --weights file.safetensors (if the factory loads trained weights itself, save them"
                " once with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')), or"
                " --random-weights to benchmark the architecture with random weights",
            )
        return LoadedModel("torch", text, module=module.eval(), random_weights=True)
    notes, resized = _load_weights(module, str(weights))
    return LoadedModel("torch", text, module=module.eval(), weights=str(weights), notes=notes, resized=resized)
