"""Bootstrap confidence intervals for per-example scores.

Accuracy figures in reports are means of per-example values (1/0 for correct, a similarity, ...).
A percentile bootstrap gives their uncertainty without assuming a distribution; the paired version
resamples the same examples for both models, so the noise shared by two models on one test set
cancels out of the difference.
"""

from __future__ import annotations

import numpy as np

# Resampled means are computed in chunks of at most this many gathered values, so that 2000
# resamples of a 1M-example test set do not need 16 GB at once.
_MAX_GATHERED = 4_000_000


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of per-example values, found shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a mean and its interval need at least one example")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; per-example scores must be finite")
    return arr


def _check_settings(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, found {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, found {confidence}")


def bootstrap_mean_ci(
    values: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-example ``values`` and its percentile-bootstrap interval: ``(mean, lo, hi)``.

    >>> bootstrap_mean_ci(np.array([1.0, 0.0, 1.0, 1.0]))  # doctest: +SKIP
    (0.75, 0.25, 1.0)
    """
    arr = _as_scores(values, "values")
    _check_settings(n_resamples, confidence)
    if arr.min() == arr.max():
        # Every resample is the same constant. Returning it exactly avoids float summation
        # error (0.1 * 37 / 37 != 0.1), which would report a spurious nonzero width.
        constant = float(arr[0])
        return constant, constant, constant
    mean = float(arr.mean())
    rng = np.random.default_rng(seed)
    n = arr.size
    chunk = max(1, _MAX_GATHERED // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = arr[index].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return mean, float(lo), float(hi)


def paired_bootstrap_diff_ci(
    a: np.ndarray, b: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same examples, with a paired bootstrap interval: ``(diff, lo, hi)``.

    ``a[i]`` and ``b[i]`` must score the same example ``i`` (e.g. correctness of the baseline and
    of the compressed model). Resampling example indices jointly for both arrays is the same as
    resampling the per-example differences, which is what this does.

    >>> paired_bootstrap_diff_ci(baseline_correct, compressed_correct)  # doctest: +SKIP
    (0.012, 0.004, 0.021)
    """
    a_arr = _as_scores(a, "a")
    b_arr = _as_scores(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"a and b must score the same examples, found lengths {a_arr.size} and {b_arr.size}"
        )
    return bootstrap_mean_ci(a_arr - b_arr, n_resamples=n_resamples, confidence=confidence, seed=seed)


def bootstrap_statistic_ci(
    values: np.ndarray,
    statistic,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic(values)`` and its percentile-bootstrap interval, for statistics other than the
    mean (e.g. the mean of the worst 5%): ``(value, lo, hi)``. Resamples one at a time.

    >>> bootstrap_statistic_ci(cosines, lambda v: np.sort(v)[: len(v) // 20 or 1].mean())  # doctest: +SKIP
    """
    arr = _as_scores(values, "values")
    _check_settings(n_resamples, confidence)
    value = float(statistic(arr))
    if arr.min() == arr.max():
        return value, value, value
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(arr[rng.integers(0, arr.size, arr.size)]) for _ in range(n_resamples)])
    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return value, float(lo), float(hi)


# --- timing: medians and paired ratios over interleaved rounds -----------------------------------

SPEEDUP_VERDICTS = ("faster", "slower", "no measurable difference")


def _as_samples(values: np.ndarray, name: str) -> np.ndarray:
    arr = _as_scores(values, name)
    if np.any(arr <= 0):
        raise ValueError(f"{name} must hold positive durations, found a minimum of {arr.min()}")
    return arr


def _bootstrap_medians(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Medians of ``n_resamples`` resamples (with replacement) of ``values``, chunked like the mean."""
    rng = np.random.default_rng(seed)
    n = values.size
    chunk = max(1, _MAX_GATHERED // n)
    medians = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        medians[start:stop] = np.median(values[rng.integers(0, n, size=(stop - start, n))], axis=1)
    return medians


def _median_ci(values: np.ndarray, n_resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    median = float(np.median(values))
    if values.min() == values.max():
        return median, median, median
    alpha = 1.0 - confidence
    lo, hi = np.quantile(_bootstrap_medians(values, n_resamples, seed), [alpha / 2, 1 - alpha / 2])
    return median, float(lo), float(hi)


def bootstrap_median_ci(
    samples: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Median of timed ``samples`` (e.g. per-call milliseconds) and its percentile-bootstrap
    interval: ``(p50, lo, hi)``.

    >>> bootstrap_median_ci(np.array([4.1, 3.9, 4.0, 4.2, 3.8, 4.0]))  # doctest: +SKIP
    (4.0, 3.9, 4.1)
    """
    arr = _as_samples(samples, "samples")
    _check_settings(n_resamples, confidence)
    return _median_ci(arr, n_resamples, confidence, seed)


def paired_speedup_ci(
    reference: np.ndarray, candidate: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Speedup of ``candidate`` over ``reference`` from interleaved rounds: ``(value, lo, hi)``.

    ``reference[i]`` and ``candidate[i]`` are the two durations timed in round ``i``. The speedup is
    the median over rounds of ``reference[i] / candidate[i]`` (above 1: the candidate is faster);
    the interval resamples whole rounds. Taking the ratio inside each round first is what makes
    interleaving pay off: load or frequency drift that slows one round slows both of its samples
    and cancels, where a ratio of two separate medians would carry it.

    >>> paired_speedup_ci(fp32_ms, int8_ms)  # doctest: +SKIP
    (1.41, 1.36, 1.47)
    """
    ref = _as_samples(reference, "reference")
    cand = _as_samples(candidate, "candidate")
    if ref.shape != cand.shape:
        raise ValueError(
            f"reference and candidate must come from the same rounds, found {ref.size} and {cand.size} samples"
        )
    _check_settings(n_resamples, confidence)
    return _median_ci(ref / cand, n_resamples, confidence, seed)


def speedup_verdict(lo: float | None, hi: float | None) -> str:
    """``"faster"`` or ``"slower"`` only when the whole interval lies on one side of 1.0; otherwise
    (1.0 inside it, or no interval) ``"no measurable difference"``.

    >>> speedup_verdict(0.97, 1.06)
    'no measurable difference'
    """
    if lo is not None and lo > 1.0:
        return "faster"
    if hi is not None and hi < 1.0:
        return "slower"
    return "no measurable difference"


def relative_half_width(value: float, lo: float, hi: float) -> float:
    """Half the interval's width as a fraction of the value: 0.05 for 2.0 (1.9 to 2.1)."""
    return (hi - lo) / 2.0 / abs(value) if value else float("inf")
