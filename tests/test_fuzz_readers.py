"""Property: every reader of user files ends in success or one short InputError, whatever the bytes.

Each reader gets random bytes and, more usefully, near-valid inputs: YAML dumped from recipes with
random values (then sometimes cut or spliced), .npz archives of random dtypes, shapes and headers,
JSON Lines of random rows, and safetensors files with random headers and encoding metadata. Each
test also checks that its inputs reach both outcomes, so the generators stay near the valid ones.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format
from pydantic import ValidationError
from safetensors.torch import save as safetensors_bytes

from shrinkml.data import load_data
from shrinkml.data.text import read_jsonl, read_txt
from shrinkml.errors import MESSAGE_CHARS, InputError
from shrinkml.models.safetensors_io import (
    SPARSE_METADATA_KEY,
    check_safetensors_file,
    load_state_dict,
)
from shrinkml.recipe import Recipe
from shrinkml.techniques.base import registry

# derandomize: the same examples on every run, so a failure reproduces and CI never flakes
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# sizes a hostile header declares: negative, beyond int64, or merely far beyond memory
absurd_ints = st.sampled_from([-1, 2**31, 10**12, 2**30 * 2**30, 2**63 - 1, 2**64, 2**70, -(2**63) - 1])


def fuzz(strategy: st.SearchStrategy, read) -> Counter:
    """Run ``read`` on ``strategy``'s examples: each must succeed or raise a short InputError (any
    other exception fails the test). Returns how often each happened."""
    outcomes: Counter = Counter()

    @FUZZ
    @given(strategy)
    def run(example):
        try:
            read(example)
            outcomes["ok"] += 1
        except InputError as exc:
            assert len(str(exc)) <= MESSAGE_CHARS, str(exc)
            outcomes["refused"] += 1

    run()
    assert outcomes["ok"] and outcomes["refused"], outcomes
    return outcomes


def mostly(good: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """``good`` four times in five, else ``odd``."""
    return st.integers(0, 4).flatmap(lambda i: odd if i == 0 else good)


def mangled(data: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """``data`` mostly as is, else cut short, with a byte range overwritten or bytes spliced in, or
    random bytes."""

    @st.composite
    def damage(draw):
        raw = draw(data)
        if not raw:
            return raw
        at = draw(st.integers(0, len(raw) - 1))
        how = draw(st.sampled_from(["truncate", "overwrite", "insert"]))
        if how == "truncate":
            return raw[:at]
        junk = draw(st.binary(min_size=1, max_size=16))
        return raw[:at] + junk + raw[at + (len(junk) if how == "overwrite" else 0):]

    return mostly(mostly(data, damage()), st.binary(max_size=300))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --- recipes ---------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), absurd_ints, st.floats(), st.text(max_size=20),
    st.sampled_from(["auto", "l1", "l2", "qint8", "float16", "int8", "rtn", "3", "true", "1e3"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _defaults(config_cls) -> dict:
    try:
        return config_cls().model_dump(mode="json")
    except ValidationError:  # a config with a required choice (prune.layers): its fields get random values
        return {}


@st.composite
def recipe_structures(draw):
    """``{"steps": [...]}`` of real techniques whose fields keep their defaults or get any value."""
    techniques = registry()
    steps = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(mostly(st.sampled_from(sorted(techniques)), st.text(max_size=12) | values))
        step = {"technique": name}
        if isinstance(name, str) and name in techniques:
            fields = {**_defaults(techniques[name].config_cls), "technique": name}
            for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3)):
                step[key] = draw(mostly(st.just(fields[key]), values))
        steps.append(step)
    return draw(mostly(st.just({"steps": steps}), values))


yaml_texts = st.one_of(
    recipe_structures().map(lambda data: yaml.safe_dump(data, sort_keys=False, allow_unicode=True)),
    recipe_structures().map(lambda data: yaml.safe_dump(data, default_flow_style=True)),
    st.text(alphabet="steps:- technique\n[]{},&*!|>'\"#?%@`<=\t\x07\u2028", max_size=200),
)


def test_recipe_reader(workdir):
    path = workdir / "recipe.yaml"

    def read(data: bytes) -> None:
        path.write_bytes(data)
        Recipe.from_yaml(path)

    fuzz(mangled(yaml_texts.map(lambda text: text.encode("utf-8"))), read)


# --- .npz ------------------------------------------------------------------------------------

DTYPES = ["<f2", "<f4", ">f8", "|b1", "|i1", "<i8", "<u8", "|u1", "<c8", "<U3", "|S2", "<M8[s]", "|V4", "<f16"]
KEYS = ["x", "y", "x_calibration", "y_calibration", "x_finetune", "y_finetune", "x_test", "y_test", "z"]
LAYOUTS = [["x", "y"], ["x"], ["x_calibration", "y_calibration", "x_test", "y_test"]]


@st.composite
def npy_members(draw) -> bytes:
    """A .npy member: an array of any dtype and shape, or a header declaring anything over a
    payload of any length."""
    buf = io.BytesIO()
    if draw(st.booleans()):
        dtype, shape = np.dtype(draw(st.sampled_from(DTYPES))), tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
        raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(dtype.itemsize * int(np.prod(shape)))
        npy_format.write_array(buf, np.frombuffer(raw, dtype).reshape(shape))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 6) | absurd_ints, max_size=4)))
        header = {"descr": draw(st.sampled_from(DTYPES + ["|O"])), "fortran_order": draw(st.booleans()), "shape": shape}
        npy_format.write_array_header_1_0(buf, header)
        buf.write(draw(st.binary(max_size=300)))
    return buf.getvalue()


@st.composite
def npz_archives(draw) -> bytes:
    buf = io.BytesIO()
    compression = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]))
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for key in draw(st.sampled_from(LAYOUTS) | st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
            zf.writestr(key + ".npy", draw(npy_members()))
    return buf.getvalue()


@st.composite
def saved_npz(draw) -> bytes:
    """What numpy.savez writes: mostly usable inputs and labels, sometimes NaN, out-of-range or
    mismatched ones."""
    n = draw(st.integers(0, 12))
    dtype = draw(st.sampled_from(["f4", "f8", "i8", "u8", "b1", "f2", "i1"]))
    inputs = [np.ones((n, 3), dtype), np.ones((n, 1, 2, 2), dtype), (np.arange(n) % 5).astype(dtype)]
    labels = [(np.arange(n) % 3).astype(dtype)]
    odd = [np.full((n, 2), np.nan), np.full(n, 2.0**70), np.ones((n + 1, 3)), np.ones((n, 4), np.complex64)]
    arrays = {}
    for key in draw(mostly(st.sampled_from(LAYOUTS), st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True))):
        arrays[key] = draw(mostly(st.sampled_from(labels if key.startswith("y") else inputs), st.sampled_from(odd)))
    buf = io.BytesIO()
    (np.savez_compressed if draw(st.booleans()) else np.savez)(buf, **arrays)
    return buf.getvalue()


def test_npz_reader(workdir):
    path = workdir / "data.npz"

    def read(example: tuple[bytes, bool]) -> None:
        path.write_bytes(example[0])
        load_data(path, needs_labels=example[1])

    fuzz(st.tuples(mangled(saved_npz() | npz_archives()), st.booleans()), read)


# --- .jsonl / .txt ---------------------------------------------------------------------------

@st.composite
def jsonl_texts(draw) -> str:
    """Rows of {"text", "label"} labelled alike (none, small ids, or any value), with odd lines."""
    labels = draw(st.sampled_from([None, st.integers(0, 9), st.integers(0, 9) | absurd_ints, absurd_ints, values]))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        row = {"text": draw(st.text(max_size=30))}
        if labels is not None:
            row["label"] = draw(labels)
        # an odd line: any JSON value, or not JSON at all
        rows.append(draw(mostly(st.just(json.dumps(row, ensure_ascii=False)), values.map(json.dumps) | st.text(max_size=20))))
    return draw(st.sampled_from(["\n", "\r\n", "\r"])).join(rows)


@pytest.mark.parametrize("reader", [read_jsonl, read_txt])
def test_jsonl_and_txt_readers(workdir, reader):
    path = workdir / "texts.jsonl"

    def read(data: bytes) -> None:
        path.write_bytes(data)
        reader(path)

    fuzz(mangled(jsonl_texts().map(lambda text: text.encode("utf-8"))), read)


# --- safetensors -----------------------------------------------------------------------------

ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "C64",
             "F4", "E8M0", "X9"]


@st.composite
def sparse_metadata(draw) -> str:
    """shrinkml's encoding metadata with random shapes and dtypes, or any JSON at all."""
    entries = {}
    for name in draw(st.lists(st.sampled_from(["w", "b", "missing"]), max_size=3, unique=True)):
        shape = draw(st.lists(st.integers(0, 40) | absurd_ints, max_size=3) | values)
        dtype = draw(st.sampled_from(["float32", "float16", "int64", "bool", "uint16", "os.system", "Tensor"]) | values)
        entries[name] = draw(mostly(st.just({"shape": shape, "dtype": dtype}), values))
    return json.dumps(draw(mostly(st.just(entries), values)))


@st.composite
def safetensors_files(draw) -> bytes:
    """A header of tensors with random dtypes, shapes and offsets over a random payload."""
    header: dict = {}
    names = ["w", "w::values", "w::mask", "b::values", "b::mask", "c"]
    for name in draw(st.lists(st.sampled_from(names), max_size=4, unique=True)):
        start = draw(st.integers(0, 64) | absurd_ints)
        header[name] = {
            "dtype": draw(st.sampled_from(ST_DTYPES)),
            "shape": draw(st.lists(st.integers(0, 8) | absurd_ints, max_size=3)),
            "data_offsets": [start, start + draw(st.integers(0, 64))],
        }
    if draw(st.booleans()):
        header["__metadata__"] = {SPARSE_METADATA_KEY: draw(sparse_metadata())}
    text = json.dumps(header).encode()
    length = draw(mostly(st.just(len(text)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + text + draw(st.binary(max_size=128))


@st.composite
def saved_with_random_metadata(draw) -> bytes:
    """A shrinkml file with an encoded tensor ``w`` (its metadata real or random) and a random pair."""
    w = torch.zeros(draw(st.integers(1, 40)))
    w[:: draw(st.integers(1, 9))] = 1.0
    tensors = {"w::values": w[w != 0].contiguous(),
               "w::mask": torch.from_numpy(np.packbits((w != 0).numpy())),
               "b::values": torch.ones(draw(st.integers(0, 3)), dtype=torch.int64),
               "b::mask": torch.tensor([draw(st.integers(0, 255))], dtype=torch.uint8)}
    real = json.dumps({"w": {"shape": list(w.shape), "dtype": "float32"}})
    return safetensors_bytes(tensors, metadata={SPARSE_METADATA_KEY: draw(mostly(st.just(real), sparse_metadata()))})


def test_safetensors_readers(workdir):
    path = workdir / "weights.safetensors"

    def read(data: bytes) -> None:
        path.write_bytes(data)
        check_safetensors_file(path)
        load_state_dict(path)

    fuzz(mangled(saved_with_random_metadata() | safetensors_files()), read)
