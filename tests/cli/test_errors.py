"""Every bad input from the issue: exit 2, one clear message naming the problem and the fix, no
traceback, and nothing (not even a partial file) in --out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shrinkml.cli import main

MODEL = "usermodels_for_tests:good"


def _run(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_clean_failure(project, code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ")
    assert "Fix:" in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    out = project / "out"
    assert not out.exists() or not any(out.iterdir())
    assert not list(project.glob(".out.partial-*")), "staging folder left behind"
    assert not list(project.rglob("*.partial"))


def _compress(*extra, recipe="recipe.yaml", data="data.npz", weights="weights.safetensors", model=MODEL):
    args = ["compress", "--model", model, "--data", data, "--recipe", recipe, "--out", "out", "--repeats", "10", "--max-timing-s", "0"]
    if weights:
        args += ["--weights", weights]
    return args + list(extra)


def test_missing_data_file(user_project, capsys):
    code, _, err = _run(capsys, _compress(data="nope.npz"))
    _assert_clean_failure(user_project, code, err, "nope.npz", "not found")


def test_missing_weights_file(user_project, capsys):
    code, _, err = _run(capsys, _compress(weights="nope.safetensors"))
    _assert_clean_failure(user_project, code, err, "nope.safetensors")


def test_corrupt_npz(user_project, capsys):
    (user_project / "bad.npz").write_bytes(b"PK\x03\x04 definitely not a real archive")
    code, _, err = _run(capsys, _compress(data="bad.npz"))
    _assert_clean_failure(user_project, code, err, "bad.npz", "cannot read the .npz")


def test_npz_without_x_y(user_project, capsys):
    np.savez(user_project / "noxy.npz", features=np.zeros((10, 64)), labels=np.zeros(10))
    code, _, err = _run(capsys, _compress(data="noxy.npz"))
    _assert_clean_failure(user_project, code, err, "noxy.npz", "'x' and 'y'", "'features'")


def test_recipe_unknown_key(user_project, capsys):
    (user_project / "r.yaml").write_text("steps:\n  - technique: quantize.dynamic\n    per_chanel: true\n")
    code, _, err = _run(capsys, _compress(recipe="r.yaml"))
    _assert_clean_failure(user_project, code, err, "steps[0].per_chanel: unknown key", "per_channel")


def test_unknown_technique(user_project, capsys):
    (user_project / "r.yaml").write_text("steps:\n  - technique: quantize.magic\n")
    code, _, err = _run(capsys, _compress(recipe="r.yaml"))
    _assert_clean_failure(user_project, code, err, "steps[0].technique", "quantize.magic", "quantize.dynamic")


def test_sparsity_at_least_one(user_project, capsys):
    (user_project / "r.yaml").write_text("steps:\n  - technique: prune.magnitude\n    sparsity: 1.0\n")
    code, _, err = _run(capsys, _compress(recipe="r.yaml"))
    _assert_clean_failure(user_project, code, err, "steps[0].sparsity: must be in [0, 1), got 1.0")


def test_empty_data(user_project, capsys):
    np.savez(user_project / "empty.npz", x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    code, _, err = _run(capsys, _compress(data="empty.npz"))
    _assert_clean_failure(user_project, code, err, "empty.npz", "empty")


def test_model_data_shape_mismatch(user_project, capsys):
    np.savez(user_project / "wide.npz", x=np.zeros((50, 3, 32, 32), np.float32), y=np.zeros(50, np.int64))
    code, _, err = _run(capsys, _compress(data="wide.npz"))
    _assert_clean_failure(user_project, code, err, "cannot run on the data", "examples of shape (3, 32, 32)", "mat1 and mat2")


def test_factory_that_raises(user_project, capsys):
    code, _, err = _run(capsys, _compress(model="usermodels_for_tests:broken", weights=None))
    _assert_clean_failure(user_project, code, err, "factory raised RuntimeError", "checkpoint server is down")


def test_factory_returning_non_module(user_project, capsys):
    code, _, err = _run(capsys, _compress(model="usermodels_for_tests:not_a_module", weights=None))
    _assert_clean_failure(user_project, code, err, "did not return a torch.nn.Module", "int")


@pytest.mark.parametrize("name", ["weights.pt", "disguised.safetensors"])
def test_pickle_where_safetensors_expected(user_project, capsys, name):
    torch.save({"1.weight": torch.zeros(3)}, user_project / name)  # a pickle in a zip, torch.save's format
    code, _, err = _run(capsys, _compress(weights=name))
    _assert_clean_failure(user_project, code, err, name, "does not unpickle", "safetensors.torch.save_file")


def test_raw_pickle_as_weights(user_project, capsys):
    import pickle

    (user_project / "w.safetensors").write_bytes(pickle.dumps({"a": 1}))
    code, _, err = _run(capsys, _compress(weights="w.safetensors"))
    _assert_clean_failure(user_project, code, err, "w.safetensors", "pickle")


def test_onnx_model_with_pruning_recipe(user_project, capsys):
    from shrinkml.runtimes.export import export_onnx
    import onnx
    from tests.conftest import tiny_mlp

    onnx.save(export_onnx(tiny_mlp(), np.zeros((2, 1, 8, 8), np.float32)), user_project / "m.onnx")
    (user_project / "r.yaml").write_text("steps:\n  - technique: prune.channels\n")
    code, _, err = _run(capsys, _compress(model="m.onnx", weights=None, recipe="r.yaml"))
    _assert_clean_failure(user_project, code, err, "prune.channels needs a PyTorch model")


def test_debug_shows_the_traceback(user_project):
    from shrinkml.errors import InputError

    with pytest.raises(InputError):
        main(["--debug", *_compress(data="nope.npz")])


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert main(["compress", "--no-such-option"]) == 2
    assert "no-such-option" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "compress" in capsys.readouterr().out
