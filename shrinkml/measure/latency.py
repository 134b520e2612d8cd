"""Wall-clock latency of several callables, measured interleaved in one process.

Measuring model A for ten seconds and then model B for ten seconds lets CPU frequency, thermal
state and background load drift between the two, and the drift lands in the ratio. Here every
round runs every callable once, in forward then reversed order, so slow drift affects all of them
alike and position effects (cache warmed by the previous call) alternate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

# A timed sample should last at least this long; shorter calls are repeated in an inner loop and
# the sample is their mean, because perf_counter resolution and call overhead dominate below it.
_MIN_SAMPLE_NS = 2_000_000
_MIN_REPEATS = 10


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency in milliseconds over ``runs`` timed samples.

    ``calls_per_sample`` is the inner-loop length used for sub-millisecond callables (1 when each
    call was timed on its own); each sample is the mean over that many back-to-back calls.
    """

    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int
    calls_per_sample: int = 1

    def to_dict(self) -> dict[str, float | int]:
        return {"p50": self.p50_ms, "p95": self.p95_ms, "mean": self.mean_ms, "runs": self.runs}


def _calls_per_sample(fn: Callable[[], object], warmup: int) -> int:
    """Run the warm-up calls and pick the inner-loop length from the fastest of them."""
    fastest = math.inf
    for _ in range(max(warmup, 1)):  # one call is needed to know the duration, even with warmup=0
        start = time.perf_counter_ns()
        fn()
        fastest = min(fastest, time.perf_counter_ns() - start)
    # The fastest warm-up call is the closest to steady state; earlier ones pay one-time costs.
    return max(1, math.ceil(_MIN_SAMPLE_NS / max(fastest, 1)))


def _round_order(names: list[str], round_index: int) -> list[str]:
    return names if round_index % 2 == 0 else names[::-1]


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    min_repeat_s: float = 0.0,
) -> dict[str, LatencyStats]:
    """Time each callable over interleaved rounds; return per-call latency stats by name.

    Each callable gets ``warmup`` discarded calls (at least one, used to size the inner loop),
    then at least ``repeats`` rounds run every callable once, in forward order on even rounds and
    reversed order on odd ones. Rounds continue past ``repeats`` until every callable has spent at
    least ``min_repeat_s`` seconds in timed samples. Pin threads before calling this.

    >>> stats = time_interleaved({"fp32": lambda: model(x), "int8": lambda: qmodel(x)})  # doctest: +SKIP
    >>> stats["int8"].p50_ms  # doctest: +SKIP
    1.7
    """
    if repeats < _MIN_REPEATS:
        raise ValueError(f"repeats must be at least {_MIN_REPEATS} for a median and p95, found {repeats}")
    if warmup < 0 or min_repeat_s < 0:
        raise ValueError(f"warmup and min_repeat_s must not be negative, found {warmup} and {min_repeat_s}")
    if not fns:
        raise ValueError("fns is empty: give at least one callable to time")

    names = list(fns)
    inner = {name: _calls_per_sample(fns[name], warmup) for name in names}
    samples_ns: dict[str, list[float]] = {name: [] for name in names}
    spent_ns = dict.fromkeys(names, 0)
    min_repeat_ns = min_repeat_s * 1e9
    round_index = 0
    while round_index < repeats or min(spent_ns.values()) < min_repeat_ns:
        for name in _round_order(names, round_index):
            fn, k = fns[name], inner[name]
            start = time.perf_counter_ns()
            for _ in range(k):
                fn()
            elapsed = time.perf_counter_ns() - start
            samples_ns[name].append(elapsed / k)
            spent_ns[name] += elapsed
        round_index += 1

    result = {}
    for name in names:
        ms = np.asarray(samples_ns[name]) / 1e6
        p50, p95 = np.percentile(ms, [50, 95])
        result[name] = LatencyStats(
            p50_ms=float(p50),
            p95_ms=float(p95),
            mean_ms=float(ms.mean()),
            runs=len(ms),
            calls_per_sample=inner[name],
        )
    return result
