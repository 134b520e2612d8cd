"""Turn a data spec into splits: an ``.npz`` (arrays ``x``, ``y``), ``package.module:function``
returning a torch ``Dataset`` or an iterable of ``(inputs, labels)``, ``builtin:digits``, or
in-memory arrays. Files are read without unpickling (``allow_pickle=False``)."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.data.arrays import ArrayData, SplitFractions, Splits, make_splits
from shrinkml.errors import InputError
from shrinkml.imports import import_object

SPLIT_NAMES = ("calibration", "finetune", "test")


def _as_arrays(x: Any, y: Any, where: str) -> ArrayData:
    x = np.asarray(x)
    if x.dtype == object:
        raise InputError(
            "inputs are not a numeric array", where=where, found="object dtype", fix="store numeric arrays"
        )
    if x.ndim == 0 or len(x) == 0:
        raise InputError(
            "the data is empty",
            where=where,
            expected="at least one example along the first axis of x",
            found=f"x with shape {tuple(x.shape)}",
            fix="give a non-empty dataset",
        )
    if np.issubdtype(x.dtype, np.floating) or x.dtype == bool:
        x = np.ascontiguousarray(x, dtype=np.float32)
    elif np.issubdtype(x.dtype, np.integer):  # token ids and the like stay integers
        x = np.ascontiguousarray(x)
    else:
        raise InputError("inputs are not numeric", where=where, found=str(x.dtype))
    if x.dtype == np.float32 and not np.all(np.isfinite(x)):
        raise InputError(
            "inputs contain NaN or infinite values", where=where, fix="clean or impute the data first"
        )
    if y is None:
        return ArrayData(x, None)
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
        raise InputError(
            "labels must be a 1-D array of integer class ids",
            where=where,
            found=f"y with shape {tuple(y.shape)} and dtype {y.dtype}",
            fix="store y as integers, one per example",
        )
    return ArrayData(x, y.astype(np.int64))


def _load_npz(path: Path, *, needs_labels: bool) -> dict[str, ArrayData] | ArrayData:
    if not path.is_file():
        raise InputError("data file not found", where=str(path), fix="check the path given to --data")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read the .npz file ({detail})",
            where=str(path),
            expected="a NumPy .npz archive written by numpy.savez with numeric arrays 'x' and 'y'",
            fix="re-create it with numpy.savez(path, x=inputs, y=labels); object arrays are refused"
            " because loading them would unpickle",
        ) from None
    given = [name for name in SPLIT_NAMES if f"x_{name}" in arrays]
    if given:
        missing = [name for name in ("calibration", "test") if f"x_{name}" not in arrays]
        if missing:
            raise InputError(
                "the .npz gives some splits but not all",
                where=str(path),
                expected="x_calibration and x_test (x_finetune optional), with y_* labels",
                found="keys " + ", ".join(sorted(arrays)),
                fix="add the missing split arrays, or store a single x/y and let shrinkml split",
            )
        return {
            name: _as_arrays(arrays[f"x_{name}"], arrays.get(f"y_{name}"), f"{path}[x_{name}]")
            for name in given
        }
    if "x" not in arrays or (needs_labels and "y" not in arrays):
        wanted = "'x' and 'y'" if needs_labels else "'x' (and optionally 'y')"
        raise InputError(
            "the .npz file lacks the expected arrays",
            where=str(path),
            expected=f"arrays named {wanted}",
            found="arrays " + (", ".join(repr(k) for k in sorted(arrays)) or "none"),
            fix="save with numpy.savez(path, x=inputs, y=labels)"
            + ("" if not needs_labels else ", or use --task fidelity for label-free data"),
        )
    return _as_arrays(arrays["x"], arrays.get("y"), str(path))


def _materialize(obj: Any, where: str) -> ArrayData:
    """Stack a torch Dataset / iterable of (inputs, labels) or inputs into arrays."""
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], (tuple, list)):
        return _as_arrays(_to_numpy(obj[0]), None if obj[1] is None else _to_numpy(obj[1]), where)
    if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        items: Iterable = (obj[i] for i in range(len(obj)))
    elif isinstance(obj, Iterable):
        items = obj
    else:
        raise InputError(
            "the data function returned something that is not a dataset",
            where=where,
            expected="a torch Dataset, an iterable of (inputs, labels), or a tuple (x, y) of arrays",
            found=type(obj).__name__,
            fix="return one of those",
        )
    xs, ys = [], []
    batched = None
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            x, y = _to_numpy(item[0]), _to_numpy(item[1])
        else:
            x, y = _to_numpy(item), None
        if batched is None:
            batched = y is not None and np.ndim(y) == 1
        xs.append(x)
        ys.append(y)
    if not xs:
        raise InputError("the data is empty", where=where, found="0 examples", fix="return at least one")
    if batched:  # an iterable of mini-batches, like a DataLoader
        x_all = np.concatenate(xs)
        y_all = np.concatenate(ys)
    else:
        x_all = np.stack(xs)
        y_all = None if any(y is None for y in ys) else np.stack(ys).reshape(-1)
    return _as_arrays(x_all, y_all, where)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _digits() -> ArrayData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # N x 1 x 8 x 8 in [0, 1]
    return ArrayData(x, digits.target.astype(np.int64))


def load_data(
    spec: Any,
    *,
    seed: int = 0,
    fractions: SplitFractions | None = None,
    needs_labels: bool = True,
    text_encoding: Any = None,
) -> Splits:
    """Load ``spec`` and return its calibration / fine-tune / test splits.

    ``spec`` is a path to an ``.npz``, ``"builtin:digits"``, ``"package.module:function"``, an
    ``ArrayData``, a ``Splits`` (used as is), a ``(x, y)`` tuple, or a torch ``Dataset``.
    Text (``.txt``, ``.jsonl``, ``"builtin:texts"``) is tokenized with ``text_encoding``
    (a ``shrinkml.data.text.TextEncoding``: the model's tokenizer and a fixed length).
    """
    if isinstance(spec, Splits):
        return spec
    if isinstance(spec, ArrayData):
        return make_splits(spec, seed=seed, fractions=fractions, source="data")
    source = str(spec) if isinstance(spec, (str, Path)) else type(spec).__name__
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if text == "builtin:digits":
            data: Any = _digits()
        elif text == "builtin:texts" or Path(text).suffix.lower() in (".txt", ".jsonl"):
            from shrinkml.data.text import load_text_data

            data = load_text_data(text, text_encoding, seed=seed)
        elif text.startswith("builtin:"):
            raise InputError(
                f"unknown built-in dataset {text!r}", where="--data", expected="builtin:digits or builtin:texts"
            )
        elif text.endswith(".npz") or Path(text).suffix:
            data = _load_npz(Path(text), needs_labels=needs_labels)
        elif ":" in text:
            factory = import_object(text, what="data function")
            try:
                produced = factory()
            except Exception as exc:
                raise InputError(
                    f"the data function raised {type(exc).__name__}: {exc}",
                    where=text,
                    fix="run it on its own to debug it (shrinkml --debug shows the traceback)",
                ) from exc
            data = _materialize(produced, text)
        else:
            raise InputError(
                "cannot tell what kind of data this is",
                where=str(spec),
                expected="a .npz file, builtin:digits, or package.module:function",
                fix="pass one of those to --data",
            )
    else:
        data = _materialize(spec, source)
    if isinstance(data, dict):
        empty = ArrayData(data["test"].x[:0], None if data["test"].y is None else data["test"].y[:0])
        return Splits(data["calibration"], data.get("finetune", empty), data["test"], source=source, seed=seed)
    return make_splits(data, seed=seed, fractions=fractions, source=source)
