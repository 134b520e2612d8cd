"""Issue 8: inputs that used to give a wrong answer with exit 0 are refused (naming the file, tensor
or split and the fix) or become an explicit decision recorded on the loaded model."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from shrinkml.cli import main
from shrinkml.data import ArrayData, Splits
from shrinkml.errors import InputError
from shrinkml.models import LoadedModel, load_model
from shrinkml.tasks import get_task

MODEL = "usermodels_for_tests:good"  # Flatten, Linear(64, 32), ReLU, Linear(32, 10); see conftest


def _good() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _save(path: Path, state: dict) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


# --- factory models without weights -------------------------------------------------------------


def test_factory_without_weights_is_refused(user_project):
    with pytest.raises(InputError) as info:
        load_model(MODEL)
    err = info.value
    assert MODEL in err.where and "random weights" in err.what
    assert "--weights file.safetensors" in err.fix and "--random-weights" in err.fix


def test_random_weights_is_an_explicit_recorded_choice(user_project):
    loaded = load_model(MODEL, random_weights=True)
    assert loaded.random_weights and loaded.weights is None
    assert isinstance(loaded.module, nn.Module)
    trained = load_model(MODEL, "weights.safetensors")
    assert not trained.random_weights and trained.weights == "weights.safetensors" and trained.notes == []


def test_module_object_is_the_users_own_and_not_refused():
    loaded = load_model(_good())
    assert not loaded.random_weights and loaded.kind == "torch"


@pytest.mark.parametrize(
    ("spec", "weights", "needle"),
    [(MODEL, "weights.safetensors", "contradict"), ("m.onnx", None, "only for factory models")],
)
def test_random_weights_where_it_cannot_mean_anything(user_project, spec, weights, needle):
    with pytest.raises(InputError, match=needle):
        load_model(spec, weights, random_weights=True)


def test_a_broken_factory_is_reported_before_the_missing_weights(user_project):
    with pytest.raises(InputError, match="factory raised RuntimeError"):
        load_model("usermodels_for_tests:broken")


def test_cli_factory_without_weights_exits_2(user_project, capsys):
    code = main(["compress", "--model", MODEL, "--data", "data.npz", "--recipe", "recipe.yaml", "--out", "out"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--random-weights" in err and not (user_project / "out").exists()


# --- weight dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
def test_non_float_weights_for_float_parameters_are_refused(user_project, dtype):
    state = _good().state_dict()
    state["1.weight"] = (state["1.weight"] * 100).to(dtype)
    path = _save(user_project / "w.safetensors", state)
    with pytest.raises(InputError) as info:
        load_model(MODEL, path)
    assert "'1.weight'" in info.value.where and str(dtype).removeprefix("torch.") in info.value.what


def test_float_weights_for_an_integer_buffer_are_refused(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    state = model.state_dict()
    state["1.num_batches_tracked"] = torch.tensor(3.5)
    with pytest.raises(InputError, match="num_batches_tracked"):
        load_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), _save(tmp_path / "w.safetensors", state))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_precisions_are_cast_and_noted(user_project, dtype):
    reference = _good()
    state = {k: v.to(dtype) for k, v in reference.state_dict().items()}
    loaded = load_model(MODEL, _save(user_project / "w.safetensors", state))
    name = str(dtype).removeprefix("torch.")
    assert loaded.notes == [f"weights: 4 tensors cast from {name} to float32 (the model's dtype) when loading w.safetensors"]
    for key, value in loaded.module.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[key].to(torch.float32), rtol=0, atol=0)


def test_float64_values_beyond_float32_are_refused(user_project):
    state = {k: v.double() for k, v in _good().state_dict().items()}
    state["3.bias"][2] = 1e300
    with pytest.raises(InputError, match="outside the range of float32") as info:
        load_model(MODEL, _save(user_project / "w.safetensors", state))
    assert "'3.bias'" in info.value.where and "1 float64 values" in info.value.found


# --- non-finite and wrongly shaped weights --------------------------------------------------------


@pytest.mark.parametrize(("value", "counts"), [(float("nan"), "3 NaN, 0 inf"), (float("inf"), "0 NaN, 3 inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(user_project, value, counts):
    state = _good().state_dict()
    state["3.weight"][0, :3] = value
    with pytest.raises(InputError) as info:
        load_model(MODEL, _save(user_project / "w.safetensors", state))
    err = info.value
    assert "NaN or infinite" in err.what and "export" not in str(err)
    assert f"'3.weight' ({counts} of 320)" in err.found and "w.safetensors, 1 tensor" in err.where


class Tied(nn.Module):
    """One Linear reached under two names: the state dict holds it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = self.a

    def forward(self, x):
        return self.b(x)


def test_a_shape_fitting_cannot_take_names_the_tensor_and_both_shapes(tmp_path):
    state = {"a.weight": torch.zeros(4, 8), "a.bias": torch.zeros(4), "b.weight": torch.zeros(6, 8), "b.bias": torch.zeros(6)}
    with pytest.raises(InputError) as info:
        load_model(Tied(), _save(tmp_path / "w.safetensors", state))
    assert "'b.weight': the model has [4, 8], the file [6, 8]" in info.value.found
    assert "--data" not in str(info.value)


def test_a_different_kernel_size_is_refused(tmp_path):
    state = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU()).state_dict()
    with pytest.raises(InputError) as info:
        load_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), _save(tmp_path / "w.safetensors", state))
    assert "'0.weight'" in info.value.found and "[4, 1, 3, 3]" in info.value.found and "[4, 1, 5, 5]" in info.value.found


def test_pruned_widths_load_and_are_recorded(user_project):
    pruned = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    loaded = load_model(MODEL, _save(user_project / "w.safetensors", pruned.state_dict()))
    assert loaded.module[1].out_features == 16
    assert loaded.resized == {"1.weight": ((32, 64), (16, 64)), "1.bias": ((32,), (16,)), "3.weight": ((10, 32), (10, 16))}
    summary = loaded.resized_summary()
    assert summary.startswith("the weights ") and "resized 3 tensors" in summary and "'1.weight' [32, 64] -> [16, 64]" in summary
    assert load_model(MODEL, "weights.safetensors").resized_summary() is None


# --- modules that need the state dict's version metadata ------------------------------------------


class Versioned(nn.Module):
    """Like torchvision's MNASNet: refuses a state dict without its layout version."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_modules_reading_the_state_dict_version_load_from_safetensors(tmp_path):
    source = Versioned()
    loaded = load_model(Versioned(), _save(tmp_path / "w.safetensors", source.state_dict()))
    assert torch.equal(loaded.module.fc.weight, source.fc.weight)


def test_torchvision_mnasnet_loads_from_safetensors(tmp_path):
    from torchvision import models  # a dev dependency

    torch.manual_seed(0)
    source = models.mnasnet0_5(weights=None)
    loaded = load_model(models.mnasnet0_5(weights=None), _save(tmp_path / "w.safetensors", source.state_dict()))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


class Failing(nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.exc = exc

    def _load_from_state_dict(self, *args, **kwargs):
        raise self.exc


def test_other_load_state_dict_failures_name_the_file_and_the_exception(tmp_path):
    path = _save(tmp_path / "w.safetensors", Failing(ValueError()).state_dict())
    with pytest.raises(InputError) as info:
        load_model(Failing(KeyError("layout 7 unknown")), path)
    assert info.value.where == path and "KeyError: 'layout 7 unknown'" in info.value.found


@pytest.mark.parametrize("exc", [TimeoutError("harness timeout"), KeyboardInterrupt()])
def test_interruptions_are_not_blamed_on_the_weights(tmp_path, exc):
    path = _save(tmp_path / "w.safetensors", Failing(ValueError()).state_dict())
    with pytest.raises(type(exc)):
        load_model(Failing(exc), path)


# --- labels and outputs the task cannot score -----------------------------------------------------


def _splits(y_test, y_other=None, x=None) -> Splits:
    """Splits of ``data.npz``: labels ``y_test`` for test (None: no labels), ``y_other`` (default
    zeros) for calibration and fine-tune."""
    n = len(x) if x is not None else 8 if y_test is None else len(y_test)
    x = np.zeros((n, 1, 8, 8), np.float32) if x is None else x
    if y_test is None:
        return Splits(ArrayData(x), ArrayData(x), ArrayData(x), source="data.npz", seed=0)
    other = ArrayData(x, np.zeros(n, np.int64) if y_other is None else np.asarray(y_other, np.int64))
    return Splits(other, other, ArrayData(x, np.asarray(y_test, np.int64)), source="data.npz", seed=0)


@dataclass(frozen=True)
class BadLabels:
    name: str
    y: tuple[int, ...]
    found: str


@pytest.mark.parametrize(
    "case",
    [
        BadLabels("shifted", tuple(range(50, 60)) * 2, "20 of 20 labels outside it (values 50, 51, 52, 53, 54, ...)"),
        BadLabels("minus-one", (0, 1, -1, 3, -1, 5), "2 of 6 labels outside it (values -1)"),
        BadLabels("one-too-many", (0, 9, 10, 2), "1 of 4 labels outside it (values 10)"),
    ],
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("task", ["classification", "fidelity"])
def test_labels_outside_the_models_classes_are_refused(case, task):
    outputs = np.random.default_rng(0).standard_normal((8, 10)).astype(np.float32)
    with pytest.raises(InputError) as info:
        get_task(task).check_outputs(_splits(case.y), outputs, "usermodels_for_tests:good")
    err = info.value
    assert err.where == "data.npz, test split"
    assert err.expected.startswith("labels in [0, 10)") and err.found == case.found


def test_the_offending_split_is_named():
    outputs = np.zeros((4, 10), np.float32)
    with pytest.raises(InputError) as info:
        get_task("classification").check_outputs(_splits([0, 1, 2, 3], y_other=[0, 1, 2, 12]), outputs, "m")
    assert info.value.where == "data.npz, calibration split"


def test_labels_in_range_pass():
    get_task("classification").check_outputs(_splits(list(range(10))), np.zeros((8, 10), np.float32), "m")


@pytest.mark.parametrize("shape", [(8,), (8, 1), (8, 10, 3)])
def test_classification_needs_class_scores(shape):
    with pytest.raises(InputError, match="needs class scores") as info:
        get_task("classification").check_outputs(_splits([0] * 8), np.zeros(shape, np.float32), "m")
    assert str(shape) in info.value.found and "--task fidelity" in info.value.fix


@pytest.mark.parametrize(("task", "shape"), [("fidelity", (8,)), ("fidelity", (8, 1)), ("embedding", (8, 16))])
def test_label_free_tasks_take_any_output(task, shape):
    get_task(task).check_outputs(_splits([99] * 8), np.zeros(shape, np.float32), "m")
    get_task(task).check_outputs(_splits(None), np.zeros(shape, np.float32), "m")


def test_non_finite_outputs_are_refused():
    outputs = np.zeros((8, 10), np.float32)
    outputs[2, 3] = np.nan
    with pytest.raises(InputError, match="not finite") as info:
        get_task("fidelity").check_outputs(_splits(None), outputs, "m.onnx")
    assert info.value.where == "m.onnx on data.npz" and info.value.found.startswith("1 of 80")


# --- --task embedding on a model that is not a text embedding model -------------------------------


def test_embedding_task_on_an_image_model_is_refused():
    loaded = LoadedModel("torch", MODEL, module=_good())
    with pytest.raises(InputError) as info:
        get_task("embedding").check_model(loaded, _splits([0] * 4))
    err = info.value
    assert "text embedding model" in err.what and "--task fidelity" in err.fix
    assert err.where == f"{MODEL} on data.npz" and "float32 inputs of shape (1, 8, 8)" in err.found


def test_embedding_task_on_token_ids_is_accepted():
    tokens = np.ones((4, 12), np.int64)
    get_task("embedding").check_model(LoadedModel("onnx", "m.onnx"), _splits(None, x=tokens))


def test_embedding_task_on_a_text_classifier_is_refused():
    from shrinkml.models.hf import TextModelInfo

    loaded = LoadedModel("torch", "clf/", text=TextModelInfo(tokenizer=None, source_dir="clf/", kind="classifier"))
    with pytest.raises(InputError, match="holds a classifier"):
        get_task("embedding").check_model(loaded, _splits(None, x=np.ones((4, 12), np.int64)))


def test_classification_on_an_embedding_model_is_refused():
    from shrinkml.models.hf import TextModelInfo

    loaded = LoadedModel("torch", "st/", text=TextModelInfo(tokenizer=None, source_dir="st/", kind="embedding"))
    with pytest.raises(InputError, match="holds an embedding model") as info:
        get_task("classification").check_model(loaded, _splits([0] * 4, x=np.ones((4, 12), np.int64)))
    assert "--task embedding" in info.value.fix
    get_task("fidelity").check_model(loaded, _splits(None, x=np.ones((4, 12), np.int64)))


@pytest.mark.parametrize("task", ["classification", "fidelity"])
def test_other_tasks_take_any_model(task):
    get_task(task).check_model(LoadedModel("torch", MODEL, module=_good()), _splits([0] * 4))


def test_state_dict_helpers_keep_ordered_dicts():
    # load_state_dict hands submodules their metadata only from an OrderedDict's _metadata
    from shrinkml.models.load import _versioned

    versioned = _versioned({"fc.weight": torch.zeros(2, 4)}, Versioned())
    assert isinstance(versioned, OrderedDict) and versioned._metadata[""]["version"] == 2
