import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import shrinkml.measure.latency as latency
from shrinkml.measure.latency import (
    LatencyStats,
    StableTiming,
    time_interleaved,
    time_until_stable,
)
from shrinkml.measure.memory import (
    peak_memory_onnx,
    peak_memory_torch,
    save_module_for_child,
)
from shrinkml.measure.stats import paired_speedup_ci, speedup_verdict

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
        assert s.to_dict() == {"p50": s.p50_ms, "p95": s.p95_ms, "mean": s.mean_ms, "runs": 12,
                               "p95_over_p50": s.p95_ms / s.p50_ms}
        assert len(s.samples_ms) == 12  # kept in round order, for paired ratios


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


# ---------------------------------------------------------------- adaptive rounds (fake clock)
# time_until_stable is driven by a fake clock that each fake call advances by a known duration,
# so rounds, caps and intervals are exact and nothing depends on this machine's speed or load.


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns

    def model(self, durations_ms):
        """A callable whose calls take the next of ``durations_ms`` (cycled) on this clock."""
        it = itertools.cycle(list(durations_ms))

        def call() -> None:
            self.now_ns += int(next(it) * 1e6)
        return call


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(latency, "_clock_ns", fake)
    monkeypatch.setattr(latency, "_load_average", lambda: (0.5, 0.5, 0.5))
    return fake


def _lognormal(median_ms: float, noise: float, n: int, seed: int) -> np.ndarray:
    return median_ms * np.exp(noise * np.random.default_rng(seed).standard_normal(n))


def test_clear_speedup_stops_after_the_minimum_rounds(clock):
    fns = {"fp32": clock.model(_lognormal(10.0, 0.01, 500, 1)), "int8": clock.model(_lognormal(5.0, 0.01, 500, 2))}
    timing = time_until_stable(fns, warmup=1, repeats=10, rel_tolerance=0.05, max_time_s=20.0)
    assert timing.rounds == 10 and not timing.cap_hit
    assert timing.widest_rel_half_width <= 0.05
    assert all(s.runs == 10 and s.calls_per_sample == 1 for s in timing.stats.values())
    value, lo, hi = paired_speedup_ci(np.array(timing.stats["fp32"].samples_ms), np.array(timing.stats["int8"].samples_ms))
    assert value == pytest.approx(2.0, rel=0.02) and speedup_verdict(lo, hi) == "faster"
    assert timing.unstable_reasons == []
    record = timing.to_dict()
    assert record["unstable"] is False and record["rounds"] == 10 and record["load_average_before"] == [0.5, 0.5, 0.5]


def test_noisy_pair_adds_rounds_until_the_time_cap(clock):
    # Equal speed, rounds scattered by ~30%: the interval cannot reach ±5% within the cap.
    fns = {"a": clock.model(_lognormal(10.0, 0.3, 997, 3)), "b": clock.model(_lognormal(10.0, 0.3, 991, 4))}
    timing = time_until_stable(fns, warmup=1, repeats=10, rel_tolerance=0.05, max_time_s=2.0)
    assert timing.cap_hit and timing.widest_rel_half_width > 0.05
    assert timing.rounds > 10  # rounds were added ...
    assert 2.0 <= timing.timed_s < 2.0 + 0.2  # ... until the cap, overshooting by at most a block
    value, lo, hi = paired_speedup_ci(np.array(timing.stats["a"].samples_ms), np.array(timing.stats["b"].samples_ms))
    assert speedup_verdict(lo, hi) == "no measurable difference"
    assert any("time cap" in reason for reason in timing.unstable_reasons)


def test_added_rounds_grow_by_half_and_narrow_the_interval(clock):
    # Noise ~10%: ±5% needs more than 10 rounds but far fewer than the cap allows.
    fns = {"a": clock.model(_lognormal(10.0, 0.1, 997, 5)), "b": clock.model(_lognormal(8.0, 0.1, 991, 6))}
    timing = time_until_stable(fns, warmup=1, repeats=10, rel_tolerance=0.05, max_time_s=60.0)
    assert not timing.cap_hit and timing.widest_rel_half_width <= 0.05
    sizes = [10]
    while sizes[-1] < timing.rounds:
        sizes.append(sizes[-1] + sizes[-1] // 2)
    assert timing.rounds in sizes and timing.rounds > 10


def test_zero_cap_runs_only_the_minimum_rounds(clock):
    fns = {"a": clock.model(_lognormal(10.0, 0.3, 97, 7)), "b": clock.model(_lognormal(10.0, 0.3, 89, 8))}
    timing = time_until_stable(fns, warmup=1, repeats=12, max_time_s=0.0)
    assert timing.rounds == 12 and timing.cap_hit


def test_one_callable_narrows_its_p50(clock):
    timing = time_until_stable({"only": clock.model(_lognormal(3.0, 0.2, 997, 9))}, warmup=1, repeats=10,
                               rel_tolerance=0.05, max_time_s=60.0)
    assert timing.rounds > 10 and not timing.cap_hit and timing.reference == "only"


def test_rounds_keep_alternating_when_added(clock):
    log: list[str] = []

    def model(name: str):
        def call() -> None:
            log.append(name)
            clock.now_ns += 3_000_000 if name == "a" else int(3_000_000 * (1 + 0.5 * (len(log) % 3)))
        return call

    timing = time_until_stable({"a": model("a"), "b": model("b")}, warmup=1, repeats=10, max_time_s=0.2)
    rounds = log[2:]  # after one warm-up call each
    assert len(rounds) == 2 * timing.rounds
    assert rounds == list("ab" "ba" * timing.rounds)[: len(rounds)]


def _stable(stats: dict, load_after=(0.5, 0.5, 0.5), cpu_count=2, cap_hit=False) -> StableTiming:
    return StableTiming(stats=stats, reference="a", rounds=10, timed_s=1.0, rel_tolerance=0.05, max_time_s=20.0,
                        widest_rel_half_width=0.2 if cap_hit else 0.01, cap_hit=cap_hit,
                        load_average_before=(0.5, 0.5, 0.5), load_average_after=load_after, cpu_count=cpu_count)


def _stats(p50: float, p95: float) -> LatencyStats:
    return LatencyStats(p50_ms=p50, p95_ms=p95, mean_ms=p50, runs=10)


def test_unstable_reasons_name_spread_load_and_cap():
    calm = _stable({"a": _stats(10, 12), "b": _stats(5, 6)})
    assert calm.unstable_reasons == [] and calm.to_dict()["unstable"] is False
    # The case: p50 485 ms, p95 1,701 ms on a loaded 2-core machine.
    loaded = _stable({"a": _stats(485, 1701), "b": _stats(300, 330)}, load_after=(3.9, 2.1, 1.0), cap_hit=True)
    reasons = loaded.unstable_reasons
    assert reasons[0] == "a: p95 is 3.51x the p50 (more than 1.5x)"
    assert "1-minute load average reached 3.90 on 2 CPUs" in reasons[1]
    assert "20 s time cap" in reasons[2] and "±20.0%" in reasons[2]
    record = loaded.to_dict()
    assert record["unstable"] is True and record["unstable_reasons"] == reasons
    assert record["load_average_after"] == [3.9, 2.1, 1.0] and record["cpu_count"] == 2
    no_load = _stable({"a": _stats(10, 12)}, load_after=None, cpu_count=None)
    assert no_load.unstable_reasons == [] and no_load.to_dict()["load_average_after"] is None


def test_stable_timing_settings_are_checked(clock):
    fns = {"a": clock.model([3.0])}
    with pytest.raises(ValueError, match="not among"):
        time_until_stable(fns, reference="b")
    with pytest.raises(ValueError, match="negative"):
        time_until_stable(fns, max_time_s=-1)
    with pytest.raises(ValueError, match="at least 10"):
        time_until_stable(fns, repeats=5)


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
