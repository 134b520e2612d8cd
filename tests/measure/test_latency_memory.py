import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shrinkml.measure.latency import LatencyStats, time_interleaved
from shrinkml.measure.memory import peak_memory_onnx, peak_memory_torch, save_module_for_child

# ----------------------------------------------------------------------------------- latency


def _work(size: int):
    """Numeric work without sleeping; its duration does not matter to the tests."""
    data = np.arange(size, dtype=np.float64)
    return lambda: float(np.sqrt(data).sum())


def test_stats_structure_and_ordering():
    stats = time_interleaved({"small": _work(100), "large": _work(20_000)}, warmup=2, repeats=12)
    assert set(stats) == {"small", "large"}
    for s in stats.values():
        assert isinstance(s, LatencyStats)
        assert s.runs == 12
        assert 0 < s.p50_ms <= s.p95_ms
        assert s.mean_ms > 0
        assert s.calls_per_sample >= 1
        assert s.to_dict() == {"p50": s.p50_ms, "p95": s.p95_ms, "mean": s.mean_ms, "runs": 12}


def test_sub_millisecond_calls_are_timed_in_an_inner_loop():
    calls = []
    stats = time_interleaved({"tiny": lambda: calls.append(1)}, warmup=3, repeats=10)
    # A list append takes well under a microsecond; each sample must loop many calls so it lasts
    # about 2 ms, and the report stays per call.
    assert stats["tiny"].calls_per_sample > 100
    assert len(calls) == 3 + 10 * stats["tiny"].calls_per_sample
    assert stats["tiny"].p50_ms < 1.0


def test_rounds_alternate_order():
    log: list[str] = []
    fns = {name: (lambda name=name: log.append(name)) for name in "abc"}
    stats = time_interleaved(fns, warmup=2, repeats=10)
    # Inner-loop lengths differ from machine to machine; collapsing runs of the same name makes
    # the sequence independent of them: warm-up a, b, c, then rounds a b c | c b a | a b c ...
    collapsed = [name for name, _ in itertools.groupby(log)]
    rounds = list("abc" "cba" * 5)
    expected = [name for name, _ in itertools.groupby(list("abc") + rounds)]
    assert collapsed == expected
    assert all(s.runs == 10 for s in stats.values())


def test_min_repeat_s_adds_rounds():
    stats = time_interleaved({"a": _work(10)}, warmup=1, repeats=10, min_repeat_s=0.05)
    # Rounds go on past the 10 requested until the timed samples add up to 50 ms.
    s = stats["a"]
    assert s.runs >= 10
    assert s.runs * s.mean_ms * s.calls_per_sample >= 50.0 * 0.999


@pytest.mark.parametrize(("kwargs", "match"), [({"repeats": 9}, "at least 10"), ({"warmup": -1}, "negative")])
def test_bad_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        time_interleaved({"a": _work(10)}, **kwargs)


def test_empty_fns_rejected():
    with pytest.raises(ValueError, match="empty"):
        time_interleaved({})


# ------------------------------------------------------------------------------------ memory


def _mlp(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()


class _Wrapped(torch.nn.Module):
    """Takes a keyword input ``x``, as peak_memory_torch calls ``model(**inputs)``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _onnx_mlp(path: Path, width: int, layers: int) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width), dtype=np.float32), f"w{i}"))
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


BIG, SMALL = (2048, 4), (8, 1)  # 64 MiB of float32 weights vs 256 bytes
BIG_WEIGHT_BYTES = 2048 * 2048 * 4 * 4


def test_onnx_peak_memory_grows_with_the_model(tmp_path):
    peaks = {}
    for name, (width, layers) in {"big": BIG, "small": SMALL}.items():
        path = _onnx_mlp(tmp_path / f"{name}.onnx", width, layers)
        x = np.ones((1, width), dtype=np.float32)
        peaks[name] = peak_memory_onnx(path, {"x": x}, threads=1)
    assert peaks["small"] >= 0
    assert peaks["big"] > peaks["small"]
    assert peaks["big"] >= 0.9 * BIG_WEIGHT_BYTES  # the weights must be in memory to run


def test_torch_peak_memory_grows_with_the_model(tmp_path):
    peaks = {}
    for name, (width, layers) in {"big": BIG, "small": SMALL}.items():
        path = save_module_for_child(_Wrapped(_mlp(width, layers)), tmp_path / f"{name}.pt")
        x = np.ones((1, width), dtype=np.float32)
        # The child unpickles _Wrapped, so it must import this test module from its folder.
        peaks[name] = peak_memory_torch(path, {"x": x}, threads=1, sys_path=[str(Path(__file__).parent)])
    assert peaks["small"] >= 0
    assert peaks["big"] > peaks["small"]
    assert peaks["big"] >= 0.9 * BIG_WEIGHT_BYTES


def test_child_errors_carry_its_stderr(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(RuntimeError, match="stderr ends with"):
        peak_memory_onnx(broken, {"x": np.ones((1, 2), dtype=np.float32)}, threads=1)
