import numpy as np
import pytest

from shrinkml.measure.stats import (
    bootstrap_mean_ci,
    bootstrap_median_ci,
    paired_bootstrap_diff_ci,
    paired_speedup_ci,
    relative_half_width,
    speedup_verdict,
)


def _correct(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


def test_interval_contains_mean_and_is_near_normal_theory():
    values = _correct(2000, 0.8, seed=1)
    mean, lo, hi = bootstrap_mean_ci(values)
    assert mean == pytest.approx(values.mean())
    assert lo < mean < hi
    # A normal-theory 95% half-width is 1.96 * sd / sqrt(n); the bootstrap should be close.
    half = 1.96 * values.std() / np.sqrt(values.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_width_shrinks_as_one_over_sqrt_n():
    _, lo_small, hi_small = bootstrap_mean_ci(_correct(400, 0.7, seed=2))
    _, lo_big, hi_big = bootstrap_mean_ci(_correct(6400, 0.7, seed=3))
    assert (hi_small - lo_small) / (hi_big - lo_big) == pytest.approx(4.0, rel=0.2)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.1])
def test_constant_values_give_zero_width(value):
    assert bootstrap_mean_ci(np.full(37, value)) == (value, value, value)


def test_deterministic_with_seed_and_varies_without():
    values = _correct(300, 0.6, seed=4)
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    assert bootstrap_mean_ci(values, seed=7) != bootstrap_mean_ci(values, seed=8)


def test_chunking_does_not_change_the_answer(monkeypatch):
    import shrinkml.measure.stats as stats

    values = _correct(500, 0.5, seed=5)
    whole = bootstrap_mean_ci(values, n_resamples=300)
    monkeypatch.setattr(stats, "_MAX_GATHERED", 500 * 7)  # 7 resamples per chunk
    assert bootstrap_mean_ci(values, n_resamples=300) == pytest.approx(whole)


def test_higher_confidence_gives_wider_interval():
    values = _correct(500, 0.5, seed=6)
    _, lo90, hi90 = bootstrap_mean_ci(values, confidence=0.90)
    _, lo99, hi99 = bootstrap_mean_ci(values, confidence=0.99)
    assert lo99 < lo90 and hi90 < hi99


def test_paired_interval_is_narrower_than_unpaired_for_correlated_scores():
    rng = np.random.default_rng(9)
    difficulty = rng.random(1000)
    a = (difficulty < 0.80).astype(float)  # the two models fail on mostly the same examples
    b = ((difficulty + 0.03 * rng.standard_normal(1000)) < 0.77).astype(float)
    diff, lo, hi = paired_bootstrap_diff_ci(a, b)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo <= diff <= hi
    _, a_lo, a_hi = bootstrap_mean_ci(a)
    _, b_lo, b_hi = bootstrap_mean_ci(b, seed=1)
    unpaired_half = np.hypot((a_hi - a_lo) / 2, (b_hi - b_lo) / 2)
    assert (hi - lo) / 2 < 0.5 * unpaired_half


def test_identical_models_have_zero_difference():
    a = _correct(100, 0.5, seed=10)
    assert paired_bootstrap_diff_ci(a, a.copy()) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("values", "kwargs"),
    [
        (np.array([]), {}),
        (np.ones((3, 2)), {}),
        (np.array([1.0, np.nan]), {}),
        (np.ones(5), {"confidence": 1.0}),
        (np.ones(5), {"n_resamples": 0}),
    ],
)
def test_bad_input_is_rejected(values, kwargs):
    with pytest.raises(ValueError):
        bootstrap_mean_ci(values, **kwargs)


def test_paired_lengths_must_match():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap_diff_ci(np.ones(3), np.ones(4))


# --- timing: medians and paired speedups over interleaved rounds ---------------------------------
# Known sample arrays stand in for timings: nothing here is timed.


def _rounds(median_ms: float, noise: float, n: int, seed: int) -> np.ndarray:
    """Per-round durations around ``median_ms`` with multiplicative noise (log-normal)."""
    return median_ms * np.exp(noise * np.random.default_rng(seed).standard_normal(n))


def test_noisy_pair_around_one_is_no_measurable_difference():
    # The report: p50 485 ms vs p95 1,701 ms under load. Two models of equal speed whose
    # rounds scatter by a factor ~2 must not come out as "faster".
    reference = _rounds(485.0, 0.6, 20, seed=1)
    candidate = _rounds(485.0, 0.6, 20, seed=2)
    value, lo, hi = paired_speedup_ci(reference, candidate)
    assert lo < 1.0 < hi
    assert speedup_verdict(lo, hi) == "no measurable difference"
    assert value == pytest.approx(np.median(reference / candidate))


def test_clear_pair_is_faster_with_an_interval_excluding_one():
    reference = _rounds(10.0, 0.03, 20, seed=3)
    candidate = _rounds(7.0, 0.03, 20, seed=4)
    value, lo, hi = paired_speedup_ci(reference, candidate)
    assert 1.0 < lo <= value <= hi
    assert value == pytest.approx(10.0 / 7.0, rel=0.03)
    assert speedup_verdict(lo, hi) == "faster"
    _, lo_s, hi_s = paired_speedup_ci(candidate, reference)  # the other way round
    assert speedup_verdict(lo_s, hi_s) == "slower" and hi_s < 1.0


def test_pairing_cancels_drift_shared_by_a_round():
    # Load that slows whole rounds (both samples alike) by up to 3x spreads each model's samples
    # widely, but the per-round ratio stays 1.25: the interval must stay narrow.
    drift = np.exp(np.random.default_rng(5).uniform(0, np.log(3), 30))
    jitter = _rounds(1.0, 0.01, 30, seed=6)
    reference, candidate = 5.0 * drift * jitter, 4.0 * drift
    value, lo, hi = paired_speedup_ci(reference, candidate)
    assert value == pytest.approx(1.25, rel=0.01)
    assert relative_half_width(value, lo, hi) < 0.01
    _, a_lo, a_hi = bootstrap_median_ci(reference)
    assert relative_half_width(np.median(reference), a_lo, a_hi) > 0.1  # each side alone is wide


def test_median_interval_contains_the_median_and_shrinks_with_rounds():
    small = _rounds(4.0, 0.1, 20, seed=7)
    big = _rounds(4.0, 0.1, 320, seed=8)
    p50, lo, hi = bootstrap_median_ci(small)
    assert p50 == pytest.approx(np.median(small)) and lo <= p50 <= hi
    _, lo_big, hi_big = bootstrap_median_ci(big)
    assert (hi - lo) / (hi_big - lo_big) == pytest.approx(4.0, rel=0.5)  # ~1/sqrt(n)
    assert bootstrap_median_ci(np.full(12, 2.5)) == (2.5, 2.5, 2.5)


@pytest.mark.parametrize(("lo", "hi", "verdict"), [
    (1.01, 1.2, "faster"), (0.8, 0.99, "slower"), (0.97, 1.06, "no measurable difference"),
    (1.0, 1.3, "no measurable difference"),  # touching 1.0 is not excluding it
    (None, None, "no measurable difference"),
])
def test_speedup_verdict(lo, hi, verdict):
    assert speedup_verdict(lo, hi) == verdict


def test_speedup_inputs_are_checked():
    with pytest.raises(ValueError, match="same rounds"):
        paired_speedup_ci(np.ones(10), np.ones(11))
    with pytest.raises(ValueError, match="positive durations"):
        paired_speedup_ci(np.ones(10), np.zeros(10))
    assert relative_half_width(2.0, 1.9, 2.1) == pytest.approx(0.05)
