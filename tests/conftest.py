"""Shared test fixtures: tiny models and data made here (no downloads), seeded."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shrinkml.data import ArrayData, make_splits
from shrinkml.progress import SILENT
from shrinkml.tasks import get_task
from shrinkml.techniques.base import ModelState, StepContext


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def toy_data(n: int = 200, seed: int = 0) -> ArrayData:
    """Learnable 10-class data on 1x8x8 inputs: the class sets one bright row."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, 0, label % 8, :] += 2.0 if label < 8 else -2.0
        if label >= 8:
            x[i, 0, :, label - 8] += 2.0
    return ArrayData(x, y.astype(np.int64))


def make_ctx(model: nn.Module, tmp_path: Path, *, task: str = "classification", data: ArrayData | None = None) -> StepContext:
    splits = make_splits(data or toy_data(), seed=0)
    teacher = __import__("copy").deepcopy(model).eval()
    return StepContext(
        splits=splits, task=get_task(task), teacher=teacher, example_input=splits.calibration.x[:4],
        seed=0, threads=1, progress=SILENT, workdir=tmp_path,
    )


@pytest.fixture(params=["mlp", "cnn"])
def tiny_model(request) -> nn.Module:
    return tiny_mlp() if request.param == "mlp" else tiny_cnn()


@pytest.fixture
def torch_state():
    def make(model: nn.Module) -> ModelState:
        return ModelState("torch", torch_model=model)

    return make


MODEL_MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn

    def good():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def broken():
        raise RuntimeError("the checkpoint server is down")

    def not_a_module():
        return 42
    '''
)


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A folder with a user model module, weights, data and a recipe, set as the working dir."""
    from safetensors.torch import save_file

    (tmp_path / "usermodels_for_tests.py").write_text(MODEL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = toy_data(240)
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    (tmp_path / "recipe.yaml").write_text("steps:\n  - technique: quantize.dynamic\n")
    return tmp_path
