"""Turn a data spec into splits: an ``.npz`` (arrays ``x``, ``y``), ``package.module:function``
returning a torch ``Dataset`` or an iterable of ``(inputs, labels)``, ``builtin:digits``, or
in-memory arrays.

An ``.npz`` is a zip of ``.npy`` members, each opening with a header that declares its dtype and
shape. Every header is read and checked before any array is allocated: no object arrays (loading
them would unpickle), no shape larger than the member holds, and no more inflated bytes than
``MAX_NPZ_BYTES`` in all, or than ``NPZ_INFLATE_RATIO`` times the file's size beyond
``NPZ_INFLATE_FLOOR`` (a zip bomb). So a hostile or corrupt file fails in milliseconds.
"""

from __future__ import annotations

import lzma
import math
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from shrinkml.data.arrays import ArrayData, SplitFractions, Splits, make_splits
from shrinkml.errors import InputError
from shrinkml.imports import import_object

SPLIT_NAMES = ("calibration", "finetune", "validation", "test")
MAX_NPZ_BYTES = 4 * 2**30  # arrays read from one .npz, in total
NPZ_INFLATE_FLOOR = 256 * 2**20  # a compressed .npz may always inflate to this much
# Beyond the floor, inflated bytes per byte of file. Real numeric data deflates far less (deflate
# itself tops out near 1032:1, reached only by long runs of one byte value).
NPZ_INFLATE_RATIO = 100
# What a damaged zip or .npy member raises while it is read: bad headers (ValueError), corrupt
# compressed streams (zlib / lzma / bz2's OSError), truncation, unsupported compression
# (NotImplementedError) and encryption (RuntimeError).
_NPZ_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, ValueError,
                    NotImplementedError, RuntimeError)
_NPZ_FIX = ("re-create it with numpy.savez(path, x=inputs, y=labels); object arrays are refused because"
            " loading them would unpickle")


@dataclass(frozen=True)
class _NpyHeader:
    """What a ``.npy`` member declares, and how many data bytes it really has."""

    member: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    data_bytes: int  # the member's declared uncompressed size after the header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        return f"shape {self.shape} of {self.dtype} ({self.nbytes:,} bytes)"


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
        with np.errstate(over="ignore", invalid="ignore"):  # what float32 cannot hold becomes inf: refused below
            x = np.ascontiguousarray(x, dtype=np.float32)
    elif np.issubdtype(x.dtype, np.integer):  # token ids and the like stay integers
        x = np.ascontiguousarray(x)
    else:
        raise InputError("inputs are not numeric", where=where, found=str(x.dtype))
    if x.dtype == np.float32 and not np.all(np.isfinite(x)):
        raise InputError(
            "inputs contain NaN or infinite values (or values beyond float32's range)",
            where=where,
            fix="clean or impute the data first",
        )
    if y is None:
        return ArrayData(x, None)
    y = _labels(y, where)
    if len(y) != len(x):
        raise InputError(
            "inputs and labels have different lengths",
            where=where,
            expected="as many labels in y as examples in x",
            found=f"{len(x)} examples and {len(y)} labels",
            fix="store arrays of equal length along the first axis",
        )
    return ArrayData(x, y)


def _labels(y: Any, where: str) -> np.ndarray:
    """``y`` as int64 class ids; refused unless 1-D with every value an integer that int64 holds."""
    y = np.asarray(y)
    kind = y.dtype.kind
    valid = y.ndim == 1 and kind in "biuf"
    if valid and kind in "uf" and y.size:
        with np.errstate(over="ignore", invalid="ignore"):  # a bound a small float cannot hold is inf: still right
            valid = bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)) and y.min() >= -(2**63) and y.max() < 2**63)
    if not valid:
        raise InputError(
            "labels must be a 1-D array of integer class ids",
            where=where,
            found=f"y with shape {tuple(y.shape)} and dtype {y.dtype}",
            fix="store y as integers, one per example",
        )
    return y.astype(np.int64)


def _npz_keys(members: dict[str, zipfile.ZipInfo], path: Path, needs_labels: bool) -> list[str]:
    """The arrays to read: the given splits' ``x_*`` and ``y_*``, or ``x`` and ``y``."""
    given = [name for name in SPLIT_NAMES if f"x_{name}" in members]
    if given:
        missing = [name for name in ("calibration", "test") if f"x_{name}" not in members]
        if missing:
            raise InputError(
                "the .npz gives some splits but not all",
                where=str(path),
                expected="x_calibration and x_test (x_finetune optional), with y_* labels",
                found="keys " + ", ".join(sorted(members)),
                fix="add the missing split arrays, or store a single x/y and let shrinkml split",
            )
        return [f"{kind}_{name}" for name in given for kind in "xy" if f"{kind}_{name}" in members]
    if "x" not in members or (needs_labels and "y" not in members):
        wanted = "'x' and 'y'" if needs_labels else "'x' (and optionally 'y')"
        raise InputError(
            "the .npz file lacks the expected arrays",
            where=str(path),
            expected=f"arrays named {wanted}",
            found="arrays " + (", ".join(repr(k) for k in sorted(members)) or "none"),
            fix="save with numpy.savez(path, x=inputs, y=labels)"
            + ("" if not needs_labels else ", or use --task fidelity for label-free data"),
        )
    return [key for key in ("x", "y") if key in members]


def _npy_header(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> _NpyHeader:
    with archive.open(member) as f:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(f)
        else:  # 3.0 only adds UTF-8 field names of structured dtypes, which are not numeric data
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        return _NpyHeader(member, tuple(shape), dtype, member.file_size - f.tell())


def _check_npy_header(header: _NpyHeader, where: str) -> None:
    if header.dtype.hasobject:
        raise InputError("the array holds Python objects", where=where, expected="a numeric array",
                         found=f"dtype {header.dtype}", fix=_NPZ_FIX)
    # numpy can only allocate shapes whose nonzero extents multiply below 2**63 bytes
    extent = math.prod(max(d, 1) for d in header.shape) * max(header.dtype.itemsize, 1)
    if any(d < 0 for d in header.shape) or extent >= 2**63 or header.nbytes > header.data_bytes:
        raise InputError(
            "the array's header declares more data than the file holds",
            where=where,
            expected=f"at most {max(header.data_bytes, 0):,} bytes of data (the member's uncompressed size)",
            found=header.describe(),
            fix="the file is corrupt or was not written by numpy; " + _NPZ_FIX,
        )


def _check_inflated_size(headers: dict[str, _NpyHeader], path: Path) -> None:
    total = sum(header.nbytes for header in headers.values())
    on_disk = path.stat().st_size
    found = ", ".join(f"{key}: {header.describe()}" for key, header in headers.items())
    if total > MAX_NPZ_BYTES:
        raise InputError(
            f"the arrays are too large to load ({total:,} bytes)",
            where=str(path),
            expected=f"at most {MAX_NPZ_BYTES:,} bytes in all",
            found=found,
            fix="use a sample of the data: calibration and evaluation need thousands of examples, not millions",
        )
    if total > max(NPZ_INFLATE_FLOOR, NPZ_INFLATE_RATIO * on_disk):
        raise InputError(
            f"the {on_disk:,}-byte file inflates to {total:,} bytes ({total // max(on_disk, 1):,}x), like a zip bomb",
            where=str(path),
            expected=f"compressed arrays at most {NPZ_INFLATE_RATIO}x their size on disk",
            found=found,
            fix="if the data is genuine, save it uncompressed with numpy.savez (not savez_compressed)",
        )


def _check_split_shapes(headers: dict[str, _NpyHeader], path: Path) -> None:
    """Every split's examples must have one shape, or a model could not take them all."""
    shapes = {key: header.shape[1:] for key, header in headers.items() if key.startswith("x_")}
    if len(set(shapes.values())) > 1:
        raise InputError(
            "the splits' examples have different shapes",
            where=str(path),
            expected="one per-example shape (every axis after the first) in all x_* arrays",
            found=", ".join(f"{key}: examples of shape {shape}" for key, shape in shapes.items()),
            fix="store every split with the same shape, e.g. resized or padded alike",
        )


def _read_npz(path: Path, needs_labels: bool) -> dict[str, np.ndarray]:
    """The arrays of the .npz that shrinkml uses, each read only after every header was checked."""
    with zipfile.ZipFile(path) as archive:
        members = {m.filename.removesuffix(".npy"): m for m in archive.infolist() if m.filename.endswith(".npy")}
        keys = _npz_keys(members, path, needs_labels)
        headers = {key: _npy_header(archive, members[key]) for key in keys}
        for key, header in headers.items():
            _check_npy_header(header, f"{path}[{key}]")
        _check_inflated_size(headers, path)
        _check_split_shapes(headers, path)
        arrays = {}
        for key in keys:
            with archive.open(members[key]) as f:
                arrays[key] = npy_format.read_array(f, allow_pickle=False)
        return arrays


def _load_npz(path: Path, *, needs_labels: bool) -> dict[str, ArrayData] | ArrayData:
    if not path.is_file():
        raise InputError("data file not found", where=str(path), fix="check the path given to --data")
    try:
        arrays = _read_npz(path, needs_labels)
    except _NPZ_READ_ERRORS as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read the .npz file ({detail})",
            where=str(path),
            expected="a NumPy .npz archive written by numpy.savez with numeric arrays 'x' and 'y'",
            fix=_NPZ_FIX,
        ) from None
    if "x" not in arrays:
        return {
            name: _as_arrays(arrays[f"x_{name}"], arrays.get(f"y_{name}"), f"{path}[x_{name}]")
            for name in SPLIT_NAMES
            if f"x_{name}" in arrays
        }
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
    Text (``.txt``, ``.jsonl``, ``"builtin:texts"``, ``"builtin:prose"``) is tokenized with ``text_encoding``
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
        elif text in ("builtin:texts", "builtin:prose") or Path(text).suffix.lower() in (".txt", ".jsonl"):
            from shrinkml.data.text import load_text_data

            data = load_text_data(text, text_encoding, seed=seed)
        elif text.startswith("builtin:"):
            raise InputError(
                f"unknown built-in dataset {text!r}", where="--data", expected="builtin:digits, builtin:texts or builtin:prose"
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
        return Splits(data["calibration"], data.get("finetune", empty), data["test"], source=source, seed=seed,
                      validation=data.get("validation"))
    return make_splits(data, seed=seed, fractions=fractions, source=source)
