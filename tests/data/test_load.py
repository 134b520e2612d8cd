from __future__ import annotations

import numpy as np
import pytest
import torch

from shrinkml.data import ArrayData, SplitFractions, load_data, make_splits
from shrinkml.errors import InputError


def test_digits_builtin_splits_are_disjoint_and_deterministic():
    a = load_data("builtin:digits", seed=0)
    b = load_data("builtin:digits", seed=0)
    assert a.sizes() == {"calibration": 180, "finetune": 898, "validation": 180, "test": 539}
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert a.test.x.shape[1:] == (1, 8, 8) and a.test.x.dtype == np.float32
    # disjoint: no example appears in two splits (digits has a few duplicate images, so compare rows by index)
    n = sum(a.sizes().values())
    assert n == 1797
    c = load_data("builtin:digits", seed=1)
    assert not np.array_equal(a.test.y, c.test.y)


def test_make_splits_indices_partition():
    data = ArrayData(np.arange(100, dtype=np.float32)[:, None], np.arange(100) % 3)
    s = make_splits(data, seed=3, fractions=SplitFractions(calibration=0.2, finetune=0.4, validation=0.1, test=0.3))
    seen = np.concatenate([s.calibration.x[:, 0], s.finetune.x[:, 0], s.validation.x[:, 0], s.test.x[:, 0]])
    assert len(seen) == len(set(seen.tolist())) == 100


@pytest.mark.parametrize("n", [1125, 1124, 45, 7])
def test_fractions_that_sum_to_one_use_every_example(n):
    """Half-to-even rounding of 0.1/0.3/0.5/0.1 of 1125 gives 112+338+562+112 = 1124: the example
    left over goes to the last split asked for instead of being dropped."""
    data = ArrayData(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % 3)
    s = make_splits(data, seed=0)
    seen = np.concatenate([s.calibration.x[:, 0], s.finetune.x[:, 0], s.validation.x[:, 0], s.test.x[:, 0]])
    assert len(seen) == len(set(seen.tolist())) == n
    no_val = make_splits(data, seed=0, fractions=SplitFractions(finetune=0.6, validation=0.0))
    assert sum(no_val.sizes().values()) == n
    some = make_splits(data, seed=0, fractions=SplitFractions(calibration=0.1, finetune=0.2, validation=0.1, test=0.3))
    assert sum(some.sizes().values()) < n  # fractions below 1 leave the rest out, as asked


def test_calibration_and_test_do_not_depend_on_the_other_fractions():
    """Carving a validation split out of fine-tune leaves calibration and test as they were."""
    data = ArrayData(np.arange(200, dtype=np.float32)[:, None], np.arange(200) % 3)
    with_val = make_splits(data, seed=5)
    without = make_splits(data, seed=5, fractions=SplitFractions(finetune=0.6, validation=0.0))
    np.testing.assert_array_equal(with_val.test.x, without.test.x)
    np.testing.assert_array_equal(with_val.calibration.x, without.calibration.x)
    assert len(with_val.validation) == 20 and len(without.validation) == 0
    # fine-tune then validation continue the same order: together they are the old fine-tune split
    np.testing.assert_array_equal(np.concatenate([with_val.finetune.x, with_val.validation.x]), without.finetune.x)


def test_npz_with_explicit_splits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "s.npz"
    np.savez(path, x_calibration=rng.normal(size=(5, 3)), x_test=rng.normal(size=(7, 3)), y_test=np.arange(7) % 2,
             y_calibration=np.zeros(5, int))
    s = load_data(path)
    assert s.sizes() == {"calibration": 5, "finetune": 0, "test": 7}


def test_callable_dataset_and_iterable(tmp_path, monkeypatch):
    (tmp_path / "datafns_for_tests.py").write_text(
        "import torch\n"
        "from torch.utils.data import TensorDataset\n"
        "def ds():\n    return TensorDataset(torch.randn(50, 4), torch.arange(50) % 2)\n"
        "def batches():\n    return [(torch.randn(10, 4), torch.arange(10) % 2) for _ in range(5)]\n"
        "def boom():\n    raise ValueError('no data today')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert sum(load_data("datafns_for_tests:ds").sizes().values()) == 50
    assert sum(load_data("datafns_for_tests:batches").sizes().values()) == 50
    with pytest.raises(InputError, match="the data function raised ValueError: no data today"):
        load_data("datafns_for_tests:boom")
    with pytest.raises(InputError, match="cannot import module"):
        load_data("nosuchmodule_xyz:fn")


def test_npz_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_data(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip file at all")
    with pytest.raises(InputError, match="cannot read the .npz"):
        load_data(corrupt)
    no_xy = tmp_path / "noxy.npz"
    np.savez(no_xy, inputs=np.zeros((4, 2)))
    with pytest.raises(InputError, match="'inputs'"):
        load_data(no_xy)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    with pytest.raises(InputError, match="object arrays are refused"):
        load_data(objects)
    nan = tmp_path / "nan.npz"
    np.savez(nan, x=np.full((20, 2), np.nan), y=np.zeros(20, int))
    with pytest.raises(InputError, match="NaN"):
        load_data(nan)


def test_label_free_data_loads_for_fidelity(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(30, 4)))
    assert load_data(path, needs_labels=False).test.y is None
    with pytest.raises(InputError, match="'x' and 'y'"):
        load_data(path, needs_labels=True)


def test_tensor_tuple_input():
    s = load_data((torch.randn(40, 3), torch.arange(40) % 4))
    assert s.test.y.dtype == np.int64
