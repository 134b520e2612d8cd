"""SmoothQuant: float-equivalent, flatter activations, and only where it is safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shrinkml.errors import InputError
from shrinkml.quant.smoothquant import smooth_linears
from tests.conftest import tiny_mlp


class PreLNBlock(nn.Module):
    """Embedding -> LayerNorm feeding two Linears (like q/k/v), with outlier channels."""

    def __init__(self, outliers: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 48)
        self.gate = nn.Linear(32, 48)
        self.head = nn.Linear(48, 5)
        if outliers:
            with torch.no_grad():
                self.norm.weight[[3, 17]] = 30.0  # the channels transformers are known for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        return self.head(torch.relu(self.up(h)) * torch.sigmoid(self.gate(h)))


class PostLNResidual(PreLNBlock):
    """Adds a LayerNorm whose output also feeds a residual add: smoothing it would change the
    output, so it must be skipped while the pre-LN group is smoothed."""

    def __init__(self) -> None:
        super().__init__()
        self.norm2 = nn.LayerNorm(48)
        self.proj = nn.Linear(48, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        n2 = self.norm2(torch.relu(self.up(h)) * torch.sigmoid(self.gate(h)))
        return self.head(n2 + self.proj(n2))  # post-LN style: the normalized tensor is also the residual


def _x(n: int = 96) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)


def _channel_max(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    seen = []
    handle = model.norm.register_forward_hook(lambda _m, _i, out: seen.append(out.abs().amax(dim=0)))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    return seen[0]


def _outlier_ratio(channel_max: torch.Tensor) -> float:
    return float(channel_max.max() / channel_max.median())


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smoothing_is_float_equivalent_and_flattens_outliers(alpha):
    model = PreLNBlock().eval()
    x = _x()
    before = model.norm.weight.detach().clone()
    smoothed, summary = smooth_linears(model, x, alpha=alpha)
    assert summary["smoothed_groups"] == 1 and summary["alpha"] == alpha
    assert summary["groups"][0]["linears"] == ["up", "gate"]
    torch.testing.assert_close(model.norm.weight, before)  # the original is untouched (deep copy)
    with torch.no_grad():
        ref, got = model(torch.from_numpy(x)), smoothed(torch.from_numpy(x))
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)
    ratio_before, ratio_after = _outlier_ratio(_channel_max(model, x)), _outlier_ratio(_channel_max(smoothed, x))
    assert ratio_after < ratio_before / 2, (ratio_before, ratio_after)
    assert summary["groups"][0]["outlier_ratio_after"] == pytest.approx(ratio_after, rel=1e-3)


def test_groups_with_other_consumers_are_skipped():
    model = PostLNResidual().eval()
    x = _x()
    smoothed, summary = smooth_linears(model, x, alpha=0.5)
    assert [g["layernorm"] for g in summary["groups"]] == ["norm"]
    assert [s["layernorm"] for s in summary["skipped"]] == ["norm2"]
    with torch.no_grad():
        np.testing.assert_allclose(
            smoothed(torch.from_numpy(x)).numpy(), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4
        )


def test_no_layernorm_linear_pattern_is_a_clear_error():
    with pytest.raises(InputError, match="transformer linears"):
        smooth_linears(tiny_mlp(), np.zeros((4, 1, 8, 8), np.float32), alpha=0.5)
