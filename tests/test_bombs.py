"""Hostile and absurd inputs: each is refused fast, before anything large is allocated, with one
short InputError that says where (file, line and column, array or tensor) and what was declared."""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from safetensors.torch import save_file

import shrinkml.data.load as data_load
from shrinkml.data import load_data
from shrinkml.data.text import read_jsonl
from shrinkml.errors import MESSAGE_CHARS, InputError
from shrinkml.models.safetensors_io import check_safetensors_file, load_state_dict
from shrinkml.recipe import MAX_RECIPE_BYTES, Recipe


@contextmanager
def refused_fast(*needles: str, seconds: float = 2.0):
    """Expect an InputError within ``seconds`` whose short message contains every needle."""
    start = time.perf_counter()
    with pytest.raises(InputError) as info:
        yield info
    assert time.perf_counter() - start < seconds
    message = str(info.value)
    assert len(message) <= MESSAGE_CHARS
    for needle in needles:
        assert needle in message, (needle, message)


def _recipe(tmp_path, text: str | bytes):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --- recipes ---------------------------------------------------------------------------------

def test_billion_laughs_recipe_is_refused_in_milliseconds(tmp_path):
    lines = ["steps:", "  - technique: prune.channels", '    ignore: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"    x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = _recipe(tmp_path, "\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    with refused_fast(str(path), "line 4, column 14", "alias *l0", seconds=0.5):
        Recipe.from_yaml(path)


def test_duplicate_keys_name_both_positions(tmp_path):
    path = _recipe(tmp_path, "steps:\n  - technique: finetune\n    epochs: 3\n    lr: 0.01\n    epochs: 5\n")
    with refused_fast(f"{path}, line 5, column 5", "'epochs' appears twice (first at line 3, column 5)"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize("value", ["true", '"3"', "3.0", ".nan"])
def test_epochs_takes_only_a_real_int(tmp_path, value):
    path = _recipe(tmp_path, f"steps:\n  - technique: finetune\n    epochs: {value}\n")
    with refused_fast("steps[0].epochs"):
        Recipe.from_yaml(path)


def test_lists_and_ints_still_fill_tuple_and_float_fields(tmp_path):
    path = _recipe(tmp_path, "steps:\n  - technique: prune.channels\n    ignore: [fc, head]\n"
                             "  - technique: finetune\n    lr: 1\n  - technique: quantize.dynamic\n    keep_float: [fc]\n")
    recipe = Recipe.from_yaml(path)
    assert recipe.steps[0].ignore == ("fc", "head") and recipe.steps[1].lr == 1.0
    assert recipe.steps[2].keep_float == ("fc",)
    assert Recipe.from_yaml(_recipe(tmp_path, recipe.to_yaml())) == recipe


def test_recipe_that_is_not_utf8_names_the_byte(tmp_path):
    path = _recipe(tmp_path, b"steps:\n  - technique: fine\xfftune\n")
    with refused_fast(str(path), "not UTF-8", "byte 26, line 2"):
        Recipe.from_yaml(path)


def test_every_yaml_error_names_line_and_column(tmp_path):
    path = _recipe(tmp_path, "steps:\n  - technique: finetune\n    epochs: [3\n")
    with refused_fast(f"{path}, line 4, column 1", "not valid YAML"):
        Recipe.from_yaml(path)
    path = _recipe(tmp_path, "steps:\n  - technique: fine\x07tune\n")
    with refused_fast(f"{path}, line 2, column 20", "#x0007"):
        Recipe.from_yaml(path)


@pytest.mark.parametrize(
    "text, needle",
    [
        pytest.param("steps: " + "[" * 200_000, "nests more than", id="deep-nesting"),
        pytest.param("steps:\n  - technique: finetune\n    epochs: 1" + ":1" * 100_000, "characters long",
                     id="long-sexagesimal-int"),
        pytest.param("steps:\n  - technique: finetune\n    epochs: " + "9" * 990, "steps[0].epochs", id="huge-int"),
    ],
)
def test_expensive_yaml_is_refused(tmp_path, text, needle):
    with refused_fast(needle):
        Recipe.from_yaml(_recipe(tmp_path, text))


def test_oversized_recipe_is_refused_before_reading(tmp_path):
    path = _recipe(tmp_path, "#" * (MAX_RECIPE_BYTES + 1))
    with refused_fast("too large", f"{MAX_RECIPE_BYTES + 1:,} bytes", seconds=0.5):
        Recipe.from_yaml(path)


def test_messages_never_echo_a_whole_input():
    with refused_fast("steps[0].technique"):
        Recipe.from_steps([{"technique": "x" * 10_000_000}])
    with refused_fast("steps[0].ignore"):
        Recipe.from_steps([{"technique": "prune.channels", "ignore": list(range(20_000))}])
    with refused_fast("unknown top-level key"):
        Recipe.from_dict({"steps": [], **{f"k{i}" * 100: i for i in range(10_000)}})


# --- .npz ------------------------------------------------------------------------------------

def _npy_bytes(header: dict, payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def _npz(path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return path


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array(buf, array)
    return buf.getvalue()


def test_npz_header_declaring_1e12_examples_is_refused(tmp_path):
    huge = _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (10**12, 1, 8, 8)}, b"\0" * 256)
    path = _npz(tmp_path / "d.npz", {"x": huge, "y": _npy(np.zeros(4, np.int64))})
    with refused_fast(f"{path}[x]", "(1000000000000, 1, 8, 8)", "256,000,000,000,000 bytes", seconds=0.5):
        load_data(path)


def test_npz_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    monkeypatch.setattr(data_load, "NPZ_INFLATE_FLOOR", 2**20)  # so the test's bomb can stay small
    path = tmp_path / "bomb.npz"
    shape = (8192, 1, 32, 32)  # 32 MiB of float32 zeros, ~32 kB deflated
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w") as f:
            npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            chunk = bytes(2**20)
            for _ in range(32):
                f.write(chunk)
        zf.writestr("y.npy", _npy(np.zeros(8192, np.int64)))
    assert path.stat().st_size < 200_000
    with refused_fast(str(path), "zip bomb", "x: shape (8192, 1, 32, 32)", seconds=0.5):
        load_data(path)


def test_npz_larger_than_the_total_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data_load, "MAX_NPZ_BYTES", 1000)
    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((100, 4), np.float32), y=np.zeros(100, np.int64))
    with refused_fast("too large to load", "at most 1,000 bytes"):
        load_data(path)


def test_npz_splits_with_different_example_shapes_are_refused(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, x_calibration=np.zeros((4, 3, 32, 32), np.float32), y_calibration=np.zeros(4, int),
             x_test=np.zeros((6, 3, 28, 28), np.float32), y_test=np.zeros(6, int))
    with refused_fast("different shapes", "x_calibration: examples of shape (3, 32, 32)", "x_test: examples of shape (3, 28, 28)"):
        load_data(path)


def test_npz_labels_that_int64_cannot_hold_are_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 2**64 - 1, 3], np.uint64))
    with refused_fast("labels must be a 1-D array of integer class ids"):
        load_data(path)
    np.savez(path, x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.complex64))
    with refused_fast("labels must be"):
        load_data(path)


# --- .jsonl ----------------------------------------------------------------------------------

def test_jsonl_label_beyond_int64_names_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(f'{{"text": "fine", "label": 1}}\n{{"text": "huge", "label": {2**70}}}\n')
    with refused_fast(f"{path}:2", "out of range"):
        read_jsonl(path)


def test_jsonl_deep_nesting_and_long_lines_name_the_line(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a", "x": ' + "[" * 200_000 + "\n")
    with refused_fast(f"{path}:2", "nested"):
        read_jsonl(path)
    monkeypatch.setattr("shrinkml.data.text.MAX_LINE_CHARS", 100)
    path.write_text('{"text": "fine"}\n{"text": "' + "a" * 200 + '"}\n')
    with refused_fast(f"{path}:2", "too long"):
        read_jsonl(path)


def test_jsonl_text_with_unicode_line_separators_stays_one_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one\u2028line\u0085still", "label": 0}\n', encoding="utf-8")
    texts, labels = read_jsonl(path)
    assert texts == ["one\u2028line\u0085still"] and labels.tolist() == [0]


# --- safetensors -----------------------------------------------------------------------------

def test_sparse_metadata_declaring_2_30_squared_elements_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w::values": torch.ones(3), "w::mask": torch.tensor([0b10110000], dtype=torch.uint8)}, str(path),
              metadata={"shrinkml.sparse": json.dumps({"w": {"shape": [2**30, 2**30], "dtype": "float32"}})})
    with refused_fast("tensor 'w'", "[1073741824, 1073741824]", "1,152,921,504,606,846,976 elements", seconds=0.5):
        load_state_dict(path)


@pytest.mark.parametrize(
    "info, needle",
    [
        ({"shape": [8], "dtype": "os.system"}, "dtype 'os.system'"),
        ({"shape": [-8], "dtype": "float32"}, "shape [-8]"),
        ({"shape": [8.0], "dtype": "float32"}, "shape [8.0]"),
        ({"shape": [8], "dtype": "int64"}, "float32 values"),
        ({"shape": [3], "dtype": "float32"}, "3 float32 values for 2 set mask bits"),
    ],
)
def test_sparse_metadata_is_validated(tmp_path, info, needle):
    path = tmp_path / "m.safetensors"
    save_file({"w::values": torch.ones(3), "w::mask": torch.tensor([0b10110000], dtype=torch.uint8)}, str(path),
              metadata={"shrinkml.sparse": json.dumps({"w": info})})
    with refused_fast("inconsistent", needle):
        load_state_dict(path)


def test_header_of_200k_brackets_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    header = b'{"w": ' + b"[" * 200_000
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with refused_fast(str(path), "header is corrupt"):
        check_safetensors_file(path)
    with refused_fast(str(path), "header is corrupt"):
        load_state_dict(path)
    save_file({"w": torch.ones(2)}, str(path), metadata={"shrinkml.sparse": '{"w": ' + "[" * 200_000})
    with refused_fast(str(path), "not valid JSON", "nested"):
        load_state_dict(path)
