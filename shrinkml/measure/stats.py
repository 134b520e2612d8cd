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
