"""Reading and writing GGUF files, llama.cpp's model format, with the tensors shrinkml chose.

:func:`read_gguf` parses a file's header itself, bounding every count, length and offset by the
file's size before anything is allocated, so a garbage, truncated or hostile file ends as one
``InputError`` naming it; tensor data stays on disk (memory-mapped) until asked for
(:func:`tensor_float32`, :func:`tensor_codes`). :func:`write_gguf` writes a new file with the
source's metadata (architecture, hyperparameters, tokenizer, chat template) and the given tensors,
through ``gguf.GGUFWriter``, atomically.

GGUF names (``blk.0.attn_q.weight``) map to Hugging Face names
(``model.layers.0.self_attn.q_proj.weight``) with :func:`gguf_to_hf_name` / :func:`hf_to_gguf_name`.
llama.cpp's converter stores Llama's q_proj/k_proj rows permuted (``LlamaModel.permute``, so
that rotary pairs sit next to each other): :func:`permute_qk` does that and :func:`unpermute_qk`
undoes it; :func:`hf_tensor_float32` gives a tensor as transformers' GGUF loader does.

>>> f = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
>>> f.architecture, f.tensor("blk.0.attn_q.weight").shape, f.tensor("blk.0.attn_q.weight").type_name  # doctest: +SKIP
('llama', (576, 576), 'Q4_1')

Needs the ``gguf`` package (``pip install 'shrinkml[llm]'``).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.atomic import atomic_path
from shrinkml.errors import InputError, brief
from shrinkml.formats import gguf_blocks as gb

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType
except ImportError:  # pragma: no cover  (the llm extra is not installed)
    gguf = None  # type: ignore[assignment]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
_FIX_FILE = "pass a complete llama.cpp .gguf file (a download cut short is truncated; re-download or re-convert it)"

# Metadata of the old file's quantization: not copied into a file with new tensors.
_DROPPED_KEYS = ("general.file_type",)
_DROPPED_PREFIXES = ("quantize.",)  # llama-quantize's imatrix record (file, dataset, entries, chunks)


def _need_gguf() -> None:
    if gguf is None:  # pragma: no cover
        raise InputError("reading and writing GGUF files needs the gguf package, which is not installed",
                         fix="pip install 'shrinkml[llm]'")


# ----------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: ``shape`` in numpy order (rows, cols for a 2-D weight; GGUF
    itself lists dimensions innermost first), its ``qtype``, its data's size and absolute offset."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    offset: int

    @property
    def type_name(self) -> str:
        return self.qtype.name

    @property
    def byte_shape(self) -> tuple[int, ...]:
        """The data as uint8: rows of packed blocks (gguf's ``quant_shape_to_byte_shape``)."""
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return (*self.shape[:-1], self.shape[-1] // block * size)


@dataclass(eq=False)
class GGUFFile:
    """A parsed GGUF file: its metadata as Python values (``metadata``, in file order, with each
    key's GGUF type in ``value_types``: (type, element type or None)) and its tensors' infos (in
    file order). Tensor data is read from disk when asked for (:meth:`raw`)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[Any, Any]]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int
    _by_name: dict[str, TensorInfo] = field(default_factory=dict, init=False, repr=False)
    _map: np.memmap | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    @property
    def architecture(self) -> str:
        """``general.architecture`` (``"llama"``)."""
        return str(self.metadata.get("general.architecture", ""))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def tensor(self, name: str) -> TensorInfo:
        """The info of tensor ``name``; ``InputError`` when the file has none."""
        info = self._by_name.get(name)
        if info is None:
            raise InputError(f"the GGUF file has no tensor {name!r}", where=str(self.path),
                             found=f"{len(self.tensors)} tensors, e.g. {brief(self.names[:4])}",
                             fix="check the tensor name (GGUF names look like blk.0.attn_q.weight)")
        return info

    def hparam(self, key: str, default: Any = None) -> Any:
        """``{architecture}.{key}`` from the metadata (``hparam("attention.head_count")``)."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name: str) -> np.ndarray:
        """Tensor ``name``'s bytes, memory-mapped read-only, shaped :attr:`TensorInfo.byte_shape`."""
        info = self.tensor(name)
        if self._map is None:
            size = self.path.stat().st_size if self.path.is_file() else -1
            if size != self.file_size:
                raise InputError("the GGUF file changed since it was read", where=str(self.path),
                                 expected=f"{self.file_size:,} bytes", found=f"{size:,} bytes",
                                 fix="read the file again")
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[info.offset: info.offset + info.nbytes].reshape(info.byte_shape)

    def drop_pages(self) -> None:
        """Tell the system this process no longer needs the file's pages it has read (they stay in
        the page cache, and are read again if asked for): a walk over the file's tensors then keeps
        only the current ones resident, not every tensor it has passed."""
        import mmap

        handle = getattr(self._map, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                handle.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # a closed or unmappable file: nothing resident to drop
                pass


class _Header:
    """Bounded reads from the start of a GGUF file: every length is checked against what is left
    before it is used, so nothing is allocated for a count the file cannot hold."""

    def __init__(self, buf: mmap.mmap, size: int, where: str) -> None:
        self.buf, self.size, self.where, self.pos = buf, size, where, 0

    def fail(self, what: str, **kw: Any) -> InputError:
        return InputError(what, where=self.where, **kw)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"the GGUF file is truncated or corrupt: {what} at byte {self.pos:,} needs {n:,} bytes,"
                            f" {max(self.size - self.pos, 0):,} are left", fix=_FIX_FILE)

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def raw_string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"the length of {what}")
        self.need(n, what)
        data = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        return data

    def text(self, what: str) -> str:
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text", found=brief(data), fix=_FIX_FILE) from None


_SCALARS = {  # GGUFValueType -> struct format, numpy dtype
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", np.bool_), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


def _value_type(h: _Header, raw: int, key: str) -> Any:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise h.fail(f"metadata key {key!r} has an unknown value type {raw}", expected="a GGUF value type 0-12",
                     fix=_FIX_FILE) from None


def _read_string_value(h: _Header, what: str) -> str | bytes:
    data = h.raw_string(what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # kept as bytes, written back as they were
        return data


def _read_value(h: _Header, key: str) -> tuple[Any, tuple[Any, Any]]:
    vtype = _value_type(h, h.unpack("<I", f"the type of metadata key {key!r}"), key)
    if vtype in (_STRING,):
        return _read_string_value(h, f"the value of {key!r}"), (vtype, None)
    if vtype != _ARRAY:
        return h.unpack(_SCALARS[vtype][0], f"the value of {key!r}"), (vtype, None)
    etype = _value_type(h, h.unpack("<I", f"the element type of {key!r}"), key)
    count = h.unpack("<Q", f"the length of {key!r}")
    if etype == _ARRAY:
        raise h.fail(f"metadata key {key!r} is an array of arrays, which shrinkml does not read",
                     fix="pass a GGUF file written by llama.cpp's converter")
    if etype == _STRING:
        h.need(count * 8, f"the {count:,} strings of {key!r}")  # each takes at least its 8-byte length
        return [_read_string_value(h, f"element {i} of {key!r}") for i in range(count)], (vtype, etype)
    fmt, dtype = _SCALARS[etype]
    n = count * struct.calcsize(fmt)
    h.need(n, f"the {count:,} values of {key!r}")
    values = np.frombuffer(h.buf, dtype=dtype, count=count, offset=h.pos).tolist()
    h.pos += n
    return values, (vtype, etype)


def _read_tensor_info(h: _Header, index: int, seen: set[str]) -> tuple[str, tuple[int, ...], Any, int]:
    name = h.text(f"the name of tensor {index}")
    if name in seen:
        raise h.fail(f"the GGUF file lists tensor {name!r} twice", fix=_FIX_FILE)
    seen.add(name)
    n_dims = h.unpack("<I", f"the rank of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise h.fail(f"tensor {name!r} declares {n_dims} dimensions", expected=f"1 to {MAX_DIMS}", fix=_FIX_FILE)
    dims = [h.unpack("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
    raw_type = h.unpack("<I", f"the type of tensor {name!r}")
    offset = h.unpack("<Q", f"the offset of tensor {name!r}")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise h.fail(f"tensor {name!r} has an unknown type {raw_type}", expected="a ggml type llama.cpp knows",
                     fix="use a newer shrinkml/gguf, or a file of a common type") from None
    if dims[0] % block:
        raise h.fail(f"tensor {name!r} has rows of {dims[0]} weights, not a whole number of {qtype.name} blocks"
                     f" of {block}", fix=_FIX_FILE)
    return name, tuple(reversed(dims)), qtype, offset


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the GGUF file at ``path`` (header only; tensor data stays on disk).

    ``InputError`` naming the file when it is missing, not a GGUF file, of a version or byte
    order shrinkml does not read, or when anything it declares (counts, lengths, tensor data)
    does not fit inside it."""
    _need_gguf()
    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise InputError("the GGUF file is not a file" if p.exists() else "the GGUF file does not exist",
                         where=where, fix="pass the path of a .gguf file")
    size = p.stat().st_size
    with p.open("rb") as fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise InputError("the file is not a GGUF file", where=where, expected="the magic bytes b'GGUF' at the start",
                             found=brief(magic), fix="pass a llama.cpp .gguf model file")
        if size < 24:
            raise InputError("the GGUF file is truncated: it ends inside its 24-byte header", where=where,
                             found=f"{size} bytes", fix=_FIX_FILE)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, size, p)


def _parse(buf: mmap.mmap, size: int, p: Path) -> GGUFFile:
    h = _Header(buf, size, str(p))
    h.pos = 4
    version = h.unpack("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in SUPPORTED_VERSIONS:
            raise h.fail("the GGUF file is big-endian; shrinkml reads little-endian GGUF files only",
                         fix="convert the model again for a little-endian machine")
        raise h.fail("the GGUF version is not one shrinkml reads",
                     expected=f"version {' or '.join(map(str, SUPPORTED_VERSIONS))}",
                     found=f"version {version}", fix="convert the model again with a recent llama.cpp")
    n_tensors, n_kv = h.unpack("<QQ", "the tensor and key counts")
    left = size - h.pos
    if n_kv > left // 13 or n_tensors > left // 24:  # smallest key/value: 13 bytes; tensor info: 24 bytes
        raise h.fail("the GGUF file declares more metadata or tensors than it can hold", found=f"{n_kv:,} keys and"
                     f" {n_tensors:,} tensors in {size:,} bytes", fix=_FIX_FILE)
    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[Any, Any]] = {}
    for i in range(n_kv):
        key = h.text(f"metadata key {i}")
        if key in metadata:
            raise h.fail(f"the GGUF file has metadata key {key!r} twice", fix=_FIX_FILE)
        metadata[key], value_types[key] = _read_value(h, key)
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and (value_types["general.alignment"][0] != GGUFValueType.UINT32
                                            or alignment <= 0 or alignment & (alignment - 1)):
        raise h.fail("general.alignment must be a power of two (uint32)", found=brief(alignment), fix=_FIX_FILE)
    seen: set[str] = set()
    infos = [_read_tensor_info(h, i, seen) for i in range(n_tensors)]
    data_offset = -(-h.pos // alignment) * alignment
    tensors = []
    for name, shape, qtype, offset in infos:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = 1
        for dim in shape:
            n *= dim
        nbytes = n // block * type_size
        if offset % alignment:
            raise h.fail(f"tensor {name!r} starts at offset {offset:,}, not a multiple of the alignment {alignment}",
                         fix=_FIX_FILE)
        end = data_offset + offset + nbytes
        if end > size:
            raise h.fail(f"tensor {name!r} ({qtype.name} {'x'.join(map(str, shape))}) declares data up to byte"
                         f" {end:,}, beyond the end of the file", found=f"{size:,} bytes", fix=_FIX_FILE)
        tensors.append(TensorInfo(name, shape, qtype, nbytes, data_offset + offset))
    return GGUFFile(p, version, metadata, value_types, tuple(tensors), alignment, data_offset, size)


# ----------------------------------------------------------------------------------------------
# Tensors as numbers
# ----------------------------------------------------------------------------------------------

_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": np.int8, "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def tensor_float32(reader: GGUFFile, name: str) -> np.ndarray:
    """Tensor ``name`` as a float32 numpy array of its shape (rows, cols for a weight),
    dequantized as llama.cpp does (``gguf.quants.dequantize``)."""
    info = reader.tensor(name)
    return _dequantize(reader, info, np.ascontiguousarray(reader.raw(name)), info.shape)


def _dequantize(reader: GGUFFile, info: TensorInfo, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``raw`` bytes of tensor ``info`` (whole, or whole rows of it) as float32 of ``shape``."""
    plain = _PLAIN.get(info.type_name)
    if plain is not None:
        return raw.view(plain).reshape(shape).astype(np.float32)
    try:
        out = gguf.quants.dequantize(raw, info.qtype)
    except NotImplementedError:
        raise InputError(f"tensor {info.name!r} is {info.type_name}, which the gguf package cannot dequantize",
                         where=str(reader.path), fix="use a file of a common type (F16, Q8_0, Q4_K, ...)") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)


def dequantize_rows(reader: GGUFFile, name: str, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of 2-D tensor ``name`` as float32 ``(len(index), cols)``, in the file's own
    layout: only those rows' bytes read (blocks lie along rows) and dequantized as
    :func:`tensor_float32` would."""
    info = reader.tensor(name)
    if len(info.shape) != 2:
        raise ValueError(f"{name} is {len(info.shape)}-D; rows are read from 2-D tensors")
    index = np.asarray(index, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= info.shape[0]):
        raise IndexError(f"{name} has {info.shape[0]} rows; asked for rows {int(index.min())}..{int(index.max())}")
    if not index.size:
        return np.empty((0, info.shape[1]), dtype=np.float32)
    return _dequantize(reader, info, np.ascontiguousarray(reader.raw(name)[index]), (len(index), info.shape[1]))


def tensor_codes(reader: GGUFFile, name: str) -> gb.BlockCodes:
    """A 2-D tensor stored in one of shrinkml's block formats, as its :class:`BlockCodes`."""
    info = reader.tensor(name)
    if len(info.shape) != 2 or info.qtype.name not in gb.FORMATS:
        raise InputError(f"tensor {name!r} is not a 2-D weight in a block format shrinkml reads", where=str(reader.path),
                         expected=f"2-D {'/'.join(gb.FORMATS)}", found=f"{info.type_name} {info.shape}")
    return gb.unpack(np.ascontiguousarray(reader.raw(name)), info.qtype.name)


# ----------------------------------------------------------------------------------------------
# Names and the Llama Q/K permutation
# ----------------------------------------------------------------------------------------------

_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA_BLOCK_HF = {v: k for k, v in _LLAMA_BLOCK.items()}
_LLAMA_TOP_HF = {v: k for k, v in _LLAMA_TOP.items()}
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.([a-z_.]+)\.(weight|bias)")
_SUFFIX = re.compile(r"(.+)\.(weight|bias)")
PERMUTED_ARCHS = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes (LlamaModel)


def _arch_enum(arch: str) -> Any:
    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise ValueError(f"gguf does not know the architecture {arch!r}")


def _llama_map(name: str, block: re.Pattern, block_table: dict, top_table: dict, block_fmt: str) -> str | None:
    """``name`` through Llama's fixed tables, in either direction (None when it has no counterpart)."""
    m = block.fullmatch(name)
    if m and m.group(2) in block_table:
        return block_fmt.format(m.group(1), block_table[m.group(2)], m.group(3))
    m = _SUFFIX.fullmatch(name)
    if m and m.group(1) in top_table:
        return f"{top_table[m.group(1)]}.{m.group(2)}"
    return None


def gguf_to_hf_name(name: str, arch: str = "llama", *, hf_names: Any = None) -> str | None:
    """The Hugging Face name of GGUF tensor ``name`` (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), None for tensors only llama.cpp has
    (``rope_freqs.weight``). Llama has a fixed table; for other architectures the reverse of
    ``gguf.TensorNameMap`` is ambiguous, so ``hf_names`` (the model's own names) must say which."""
    if arch == "llama" and hf_names is None:
        return _llama_map(name, _GGUF_BLOCK, _LLAMA_BLOCK, _LLAMA_TOP, "model.layers.{}.{}.{}")
    if hf_names is None:
        raise ValueError(f"GGUF names map to Hugging Face names unambiguously only for llama; for {arch!r} pass"
                         " hf_names, the model's own tensor names")
    layers = 1 + max((int(m.group(1)) for n in hf_names if (m := re.search(r"\.(\d+)\.", n))), default=-1)
    for hf in hf_names:
        if hf_to_gguf_name(hf, arch, n_layers=layers) == name:
            return hf
    return None


def hf_to_gguf_name(name: str, arch: str = "llama", *, n_layers: int | None = None) -> str | None:
    """The GGUF name of Hugging Face tensor ``name``, None when GGUF has no such tensor. Llama uses
    a fixed table; other architectures use ``gguf.TensorNameMap`` (which needs ``n_layers``)."""
    if arch == "llama":
        return _llama_map(name, _HF_BLOCK, _LLAMA_BLOCK_HF, _LLAMA_TOP_HF, "blk.{}.{}.{}")
    if n_layers is None:
        raise ValueError("n_layers is needed to map block tensor names")
    return gguf.get_tensor_name_map(_arch_enum(arch), n_layers).get_name(name, try_suffixes=(".weight", ".bias"))


def _qk_heads(n_head: int, n_head_kv: int | None) -> int:
    return n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py): Hugging Face q_proj/k_proj rows
    (or biases) to GGUF order. Each head's rows ``[first half; second half]`` become interleaved
    pairs. Use ``n_head, n_head`` for q_proj and ``n_head, n_head_kv`` for k_proj."""
    heads = _qk_heads(n_head, n_head_kv)
    w = np.asarray(weights)
    if w.shape[0] % (2 * heads):
        raise ValueError(f"{w.shape[0]} rows do not split into {heads} heads of pairs")
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The inverse of :func:`permute_qk`: GGUF q/k rows back to Hugging Face order (what
    transformers' GGUF loader does, ``reverse_permute_weights``)."""
    heads = _qk_heads(n_head, n_head_kv)
    w = np.asarray(weights)
    if w.shape[0] % (2 * heads):
        raise ValueError(f"{w.shape[0]} rows do not split into {heads} heads of pairs")
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_row_order(n_rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Row indices ``perm`` with ``permute_qk(w) == w[perm]``: to reorder codes a quantizer chose
    in Hugging Face layout (their blocks run along rows, so rows move whole)."""
    return permute_qk(np.arange(n_rows), n_head, n_head_kv)


def _layer_value(value: Any, layer: int) -> int | None:
    if isinstance(value, list):
        return int(value[layer]) if layer < len(value) else None
    return None if value is None else int(value)


def _qk_heads_for(reader: GGUFFile, name: str) -> tuple[int, int | None] | None:
    """(n_head, n_head for this tensor's permutation) when ``name`` is a permuted Llama q/k tensor."""
    m = _GGUF_BLOCK.fullmatch(name)
    if reader.architecture not in PERMUTED_ARCHS or not m or m.group(2) not in ("attn_q", "attn_k"):
        return None
    layer = int(m.group(1))
    n_head = _layer_value(reader.hparam("attention.head_count"), layer)
    n_kv = _layer_value(reader.hparam("attention.head_count_kv", reader.hparam("attention.head_count")), layer)
    if n_head is None:
        raise InputError(f"{reader.architecture}.attention.head_count is missing", where=str(reader.path),
                         fix="pass a GGUF file written by llama.cpp's converter")
    return (n_head, n_head) if m.group(2) == "attn_q" else (n_head, n_kv)


def hf_tensor_float32(reader: GGUFFile, name: str) -> tuple[str | None, np.ndarray]:
    """GGUF tensor ``name`` as (Hugging Face name, float32 array in Hugging Face layout): Llama's
    q/k rows unpermuted, as transformers' ``load_gguf_checkpoint`` gives them. The name is None
    for tensors Hugging Face has not, and for architectures other than llama (whose reverse name
    map is ambiguous: see :func:`gguf_to_hf_name`)."""
    weights = tensor_float32(reader, name)
    heads = _qk_heads_for(reader, name)
    if heads is not None:
        weights = unpermute_qk(weights, *heads)
    return gguf_to_hf_name(name, reader.architecture) if reader.architecture == "llama" else None, weights


def to_gguf_layout(reader: GGUFFile, name: str, value: Any) -> Any:
    """``value`` for GGUF tensor ``name`` given in Hugging Face layout (a float array, or
    :class:`BlockCodes` a quantizer chose), reordered as llama.cpp stores it (Llama q/k rows)."""
    heads = _qk_heads_for(reader, name)
    if heads is None:
        return value
    if isinstance(value, gb.BlockCodes):
        return value.take_rows(qk_row_order(value.shape[0], *heads))
    return permute_qk(value, *heads)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

if gguf is not None:

    class _Writer(gguf.GGUFWriter):
        """``GGUFWriter`` that can also write an empty typed array (llama.cpp reads them; the stock
        writer refuses), so any source's metadata copies over."""

        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)


_FILE_TYPE_OF = {  # the tensor type most tensors have -> llama.cpp's LLAMA_FTYPE (llama_model_loader's guess)
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
}


def llama_file_type(file_type: Any) -> Any:
    """``gguf.LlamaFileType`` for a LlamaFileType, its number, its name (``"MOSTLY_Q4_0"``) or a
    tensor type's name (``"Q4_0"`` -> MOSTLY_Q4_0)."""
    _need_gguf()
    try:
        if isinstance(file_type, str):
            name = file_type.upper()
            return gguf.LlamaFileType[_FILE_TYPE_OF.get(name, name)]
        return gguf.LlamaFileType(int(file_type))
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"unknown llama.cpp file type {file_type!r}") from None


def _guess_file_type(types: list[str]) -> Any:
    """What llama.cpp's model loader guesses for a file without ``general.file_type``: the type of
    the most tensors (on a tie, the type that reached that count first)."""
    counts: dict[str, int] = {}
    top, most = None, 0
    for t in types:
        counts[t] = counts.get(t, 0) + 1
        if counts[t] > most:
            top, most = t, counts[t]
    return gguf.LlamaFileType[_FILE_TYPE_OF[top]] if top in _FILE_TYPE_OF else None


def _tensor_bytes(name: str, info: TensorInfo, value: Any) -> tuple[np.ndarray, Any]:
    """(uint8 bytes in gguf's byte shape, qtype) of a tensor to write in ``info``'s place."""
    if isinstance(value, gb.BlockCodes):
        if value.shape != info.shape:
            raise ValueError(f"tensor {name!r}: codes of shape {value.shape} for a tensor of shape {info.shape}")
        return gb.pack(value), value.fmt.qtype
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"tensor {name!r}: pass (packed uint8 array, qtype)")
        packed, qtype = np.asarray(value[0]), value[1]
        qtype = GGMLQuantizationType(gb.block_format(qtype).type_id if isinstance(qtype, str) else int(qtype))
        if packed.dtype != np.uint8:
            raise ValueError(f"tensor {name!r}: packed blocks must be uint8, found {packed.dtype}")
        expected = gguf.quants.quant_shape_to_byte_shape(info.shape, qtype)
        if packed.shape != expected:
            raise ValueError(f"tensor {name!r}: packed {qtype.name} data of shape {packed.shape}; a tensor of shape"
                             f" {info.shape} needs {expected}")
        return np.ascontiguousarray(packed), qtype
    array = np.asarray(value)
    if array.dtype not in (np.float32, np.float16):
        raise ValueError(f"tensor {name!r}: float arrays are written as F32 or F16; cast the {array.dtype} array to"
                         " float32 or float16, or pass BlockCodes / (packed, qtype)")
    if array.shape != info.shape:
        raise ValueError(f"tensor {name!r}: an array of shape {array.shape} for a tensor of shape {info.shape}")
    qtype = GGMLQuantizationType.F32 if array.dtype == np.float32 else GGMLQuantizationType.F16
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return data.view(np.uint8).reshape(*info.shape[:-1], -1), qtype


def write_gguf(path: str | os.PathLike, *, source: GGUFFile | str | os.PathLike,
               tensors: Mapping[str, Any], file_type: Any = None) -> Path:
    """Write a GGUF file at ``path`` (atomically) with ``source``'s metadata and tensor order and
    the given tensors in place of its own.

    ``tensors`` maps GGUF names to a float32/float16 array (written F32/F16), :class:`BlockCodes`
    (packed) or ``(packed uint8 array, qtype)``, each of the source tensor's shape (in GGUF
    layout: see :func:`to_gguf_layout`); tensors not given are copied as they are. Every metadata
    key is copied except those describing the old file's quantization (``general.file_type``,
    ``quantize.*``); ``general.file_type`` is set to ``file_type`` (a ``gguf.LlamaFileType``, its
    name, or a format name such as ``"Q4_K"``), or to what llama.cpp would guess from the tensors.
    A source with tied embeddings (no ``output.weight``) gets none: an ``output.weight`` given for
    it is left out. Other names the source lacks, and wrong shapes, are ``ValueError``."""
    _need_gguf()
    src = source if isinstance(source, GGUFFile) else read_gguf(source)
    if int(src.metadata.get("split.count", 1) or 1) > 1:
        raise InputError("the source GGUF is one shard of a split model", where=str(src.path),
                         fix="merge the shards first (llama-gguf-split --merge)")
    unknown = [n for n in tensors if n not in src and n != "output.weight"]
    if unknown:
        raise ValueError(f"the source GGUF has no tensors {unknown[:4]}; write_gguf keeps the source's tensors"
                         f" (e.g. {src.names[:3]})")
    planned = []
    for info in src.tensors:
        if info.name in tensors:
            planned.append((info, *_tensor_bytes(info.name, info, tensors[info.name])))
        else:
            planned.append((info, np.asarray(src.raw(info.name)), info.qtype))
    ftype = llama_file_type(file_type) if file_type is not None else _guess_file_type([q.name for _, _, q in planned])
    quantized = any(gguf.GGML_QUANT_SIZES[q][0] > 1 for _, _, q in planned)
    target = Path(path)
    with atomic_path(target) as tmp:
        writer = _Writer(tmp, src.architecture)
        writer.kv_data[0].clear()  # general.architecture is copied below in the source's order
        for key, value in src.metadata.items():
            if key in _DROPPED_KEYS or key.startswith(_DROPPED_PREFIXES):
                if key == "general.file_type" and ftype is not None:
                    writer.add_uint32(key, int(ftype))
                continue
            vtype, etype = src.value_types[key]
            if key == "general.alignment":
                writer.add_custom_alignment(int(value))
            else:
                writer.add_key_value(key, value, vtype, sub_type=etype)
        if "general.file_type" not in src.metadata and ftype is not None:
            writer.add_uint32("general.file_type", int(ftype))
        if quantized and "general.quantization_version" not in src.metadata:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for info, data, qtype in planned:
            writer.add_tensor(info.name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return target
