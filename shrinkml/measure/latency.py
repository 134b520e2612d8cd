"""Wall-clock latency of several callables, measured interleaved in one process.

Measuring model A for ten seconds and then model B for ten seconds lets CPU frequency, thermal
state and background load drift between the two, and the drift lands in the ratio. Here every
round runs every callable once, in forward then reversed order, so slow drift affects all of them
alike and position effects (cache warmed by the previous call) alternate.

``time_until_stable`` keeps each round's samples and adds rounds until the speedup of every
callable over the reference is known to a relative tolerance (or a time cap is reached), and
records what could make the figures untrustworthy: a wide p95/p50 spread and the machine's load.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shrinkml.measure.stats import (
    bootstrap_median_ci,
    paired_speedup_ci,
    relative_half_width,
)

# A timed sample should last at least this long; shorter calls are repeated in an inner loop and
# the sample is their mean, because perf_counter resolution and call overhead dominate below it.
_MIN_SAMPLE_NS = 2_000_000
_MIN_REPEATS = 10
# Bootstrap resamples for the stop-or-continue check between blocks of rounds; the reported
# interval is computed again afterwards with the run's own resample count.
_CHECK_RESAMPLES = 500
# A p95 more than this many times the p50 means the tail is not the model's own variation.
UNSTABLE_SPREAD = 1.5

# Looked up at call time, so tests can drive the loop with a fake clock and a fake load.
_clock_ns = time.perf_counter_ns


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(float(v) for v in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):  # not on Windows
        return None


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency in milliseconds over ``runs`` timed samples.

    ``calls_per_sample`` is the inner-loop length used for sub-millisecond callables (1 when each
    call was timed on its own); each sample is the mean over that many back-to-back calls.
    ``samples_ms`` holds the samples in round order, so two callables timed together can be
    compared round by round.
    """

    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int
    calls_per_sample: int = 1
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def p95_over_p50(self) -> float:
        return self.p95_ms / self.p50_ms if self.p50_ms > 0 else math.inf

    def to_dict(self) -> dict[str, float | int]:
        return {"p50": self.p50_ms, "p95": self.p95_ms, "mean": self.mean_ms, "runs": self.runs,
                "p95_over_p50": self.p95_over_p50}


def _calls_per_sample(fn: Callable[[], object], warmup: int) -> int:
    """Run the warm-up calls and pick the inner-loop length from the fastest of them."""
    fastest = math.inf
    for _ in range(max(warmup, 1)):  # one call is needed to know the duration, even with warmup=0
        start = _clock_ns()
        fn()
        fastest = min(fastest, _clock_ns() - start)
    # The fastest warm-up call is the closest to steady state; earlier ones pay one-time costs.
    return max(1, math.ceil(_MIN_SAMPLE_NS / max(fastest, 1)))


def _round_order(names: list[str], round_index: int) -> list[str]:
    return names if round_index % 2 == 0 else names[::-1]


class _Rounds:
    """Warm-up once, then run interleaved rounds on demand, keeping every sample."""

    def __init__(self, fns: dict[str, Callable[[], object]], warmup: int) -> None:
        self.fns = fns
        self.names = list(fns)
        self.inner = {name: _calls_per_sample(fns[name], warmup) for name in self.names}
        self.samples_ns: dict[str, list[float]] = {name: [] for name in self.names}
        self.spent_ns = dict.fromkeys(self.names, 0)
        self.count = 0

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            for name in _round_order(self.names, self.count):
                fn, k = self.fns[name], self.inner[name]
                start = _clock_ns()
                for _ in range(k):
                    fn()
                elapsed = _clock_ns() - start
                self.samples_ns[name].append(elapsed / k)
                self.spent_ns[name] += elapsed
            self.count += 1

    def ms(self, name: str) -> np.ndarray:
        return np.asarray(self.samples_ns[name]) / 1e6

    def stats(self) -> dict[str, LatencyStats]:
        result = {}
        for name in self.names:
            ms = self.ms(name)
            p50, p95 = np.percentile(ms, [50, 95])
            result[name] = LatencyStats(
                p50_ms=float(p50), p95_ms=float(p95), mean_ms=float(ms.mean()), runs=len(ms),
                calls_per_sample=self.inner[name], samples_ms=tuple(float(v) for v in ms),
            )
        return result


def _check_settings(fns: dict, warmup: int, repeats: int, min_repeat_s: float = 0.0) -> None:
    if repeats < _MIN_REPEATS:
        raise ValueError(f"repeats must be at least {_MIN_REPEATS} for a median and p95, found {repeats}")
    if warmup < 0 or min_repeat_s < 0:
        raise ValueError(f"warmup and min_repeat_s must not be negative, found {warmup} and {min_repeat_s}")
    if not fns:
        raise ValueError("fns is empty: give at least one callable to time")


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
    _check_settings(fns, warmup, repeats, min_repeat_s)
    rounds = _Rounds(fns, warmup)
    rounds.run(repeats)
    min_repeat_ns = min_repeat_s * 1e9
    while min(rounds.spent_ns.values()) < min_repeat_ns:
        rounds.run(1)
    return rounds.stats()


@dataclass(frozen=True)
class StableTiming:
    """The result of ``time_until_stable``: stats per callable and how the timing went.

    ``widest_rel_half_width`` is the widest 95% interval that decided when to stop (of a speedup
    over the reference, or of the p50 when only one callable was timed), as a fraction of its
    value; ``cap_hit`` is true when the time cap stopped the rounds before it reached
    ``rel_tolerance``. Load averages are ``os.getloadavg()`` (1, 5, 15 minutes) before and after.
    """

    stats: dict[str, LatencyStats]
    reference: str
    rounds: int
    timed_s: float
    rel_tolerance: float
    max_time_s: float
    widest_rel_half_width: float
    cap_hit: bool
    load_average_before: tuple[float, float, float] | None
    load_average_after: tuple[float, float, float] | None
    cpu_count: int | None

    @property
    def unstable_reasons(self) -> list[str]:
        """Why these figures may not be trusted; empty when nothing was seen."""
        reasons = [f"{name}: p95 is {s.p95_over_p50:.2f}x the p50 (more than {UNSTABLE_SPREAD}x)"
                   for name, s in self.stats.items() if s.p95_over_p50 > UNSTABLE_SPREAD]
        loads = [load[0] for load in (self.load_average_before, self.load_average_after) if load is not None]
        if self.cpu_count and loads and max(loads) > self.cpu_count:
            reasons.append(f"the 1-minute load average reached {max(loads):.2f} on {self.cpu_count} CPUs:"
                           " other processes competed for the cores")
        if self.cap_hit:
            reasons.append(f"the {self.max_time_s:g} s time cap stopped the rounds before the 95% interval"
                           f" narrowed to ±{100 * self.rel_tolerance:g}% (it is"
                           f" ±{100 * self.widest_rel_half_width:.1f}%)")
        return reasons

    def to_dict(self) -> dict[str, Any]:
        reasons = self.unstable_reasons
        return {
            "rounds": self.rounds,
            "timed_s": self.timed_s,
            "rel_tolerance": self.rel_tolerance,
            "max_time_s": self.max_time_s,
            "widest_ci95_rel_half_width": self.widest_rel_half_width,
            "cap_hit": self.cap_hit,
            "load_average_before": None if self.load_average_before is None else list(self.load_average_before),
            "load_average_after": None if self.load_average_after is None else list(self.load_average_after),
            "cpu_count": self.cpu_count,
            "unstable": bool(reasons),
            "unstable_reasons": reasons,
        }


def _widest(rounds: _Rounds, reference: str, seed: int) -> float:
    """The widest relative 95% half-width among the speedups over ``reference`` (the p50's when
    ``reference`` is the only callable)."""
    ref = rounds.ms(reference)
    others = [name for name in rounds.names if name != reference]
    if not others:
        return relative_half_width(*bootstrap_median_ci(ref, n_resamples=_CHECK_RESAMPLES, seed=seed))
    return max(relative_half_width(*paired_speedup_ci(ref, rounds.ms(name), n_resamples=_CHECK_RESAMPLES, seed=seed))
               for name in others)


def time_until_stable(
    fns: dict[str, Callable[[], object]],
    *,
    reference: str | None = None,
    warmup: int = 3,
    repeats: int = 20,
    rel_tolerance: float = 0.05,
    max_time_s: float = 20.0,
    seed: int = 0,
) -> StableTiming:
    """Time ``fns`` interleaved like ``time_interleaved``, then add rounds until every speedup
    over ``reference`` (default: the first callable) has a 95% interval within ±``rel_tolerance``
    of its value, or the timed rounds have taken ``max_time_s`` seconds.

    At least ``repeats`` rounds always run. More are added in blocks of half the rounds so far,
    so the stop check (a bootstrap) costs little next to the timing. Pin threads before calling.

    >>> timing = time_until_stable({"fp32": lambda: model(x), "int8": lambda: qmodel(x)})  # doctest: +SKIP
    >>> timing.rounds, timing.cap_hit, timing.unstable_reasons  # doctest: +SKIP
    (40, False, [])
    """
    _check_settings(fns, warmup, repeats)
    if rel_tolerance < 0 or max_time_s < 0:
        raise ValueError(f"rel_tolerance and max_time_s must not be negative, found {rel_tolerance} and {max_time_s}")
    reference = next(iter(fns)) if reference is None else reference
    if reference not in fns:
        raise ValueError(f"reference {reference!r} is not among the callables {list(fns)}")

    load_before = _load_average()
    rounds = _Rounds(fns, warmup)
    start = _clock_ns()
    rounds.run(repeats)
    cap_ns = max_time_s * 1e9
    while True:
        widest = _widest(rounds, reference, seed)
        elapsed = _clock_ns() - start
        if widest <= rel_tolerance or elapsed >= cap_ns:
            break
        per_round = elapsed / rounds.count
        remaining = math.ceil((cap_ns - elapsed) / per_round) if per_round > 0 else rounds.count
        rounds.run(max(1, min(rounds.count // 2, remaining)))
    return StableTiming(
        stats=rounds.stats(),
        reference=reference,
        rounds=rounds.count,
        timed_s=elapsed / 1e9,
        rel_tolerance=rel_tolerance,
        max_time_s=max_time_s,
        widest_rel_half_width=widest,
        cap_hit=bool(widest > rel_tolerance),
        load_average_before=load_before,
        load_average_after=_load_average(),
        cpu_count=os.cpu_count(),
    )
