"""Measure artifacts side by side on one runtime: outputs on the test split, task metrics with
bootstrap CIs, interleaved latency at batch 1 and batch N, throughput and peak memory.

Measurement never mutates a model; every artifact is timed in the same process, same threads,
interleaved, so drift cancels in the ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shrinkml.data import ArrayData
from shrinkml.measure.latency import StableTiming, time_until_stable
from shrinkml.measure.stats import (
    bootstrap_mean_ci,
    bootstrap_median_ci,
    bootstrap_statistic_ci,
    paired_bootstrap_diff_ci,
)
from shrinkml.progress import Progress
from shrinkml.tasks import Task


@dataclass
class Assessment:
    """One artifact's measurement (the report's dict) plus what is behind it: per-example scores,
    outputs, and per batch key (``"batch_1"``, ``"batch_n"``) the interleaved timing this artifact
    was part of, whose per-round samples give the speedups their intervals."""

    measurement: dict[str, Any]
    scores: dict[str, np.ndarray]
    outputs: np.ndarray
    label: str = ""
    timings: dict[str, StableTiming] = field(default_factory=dict)

    def latency_samples_ms(self, key: str) -> np.ndarray:
        """This artifact's per-round samples at ``key``, in round order."""
        return np.asarray(self.timings[key].stats[self.label].samples_ms)


def _runner(artifact, threads: int):
    from shrinkml.runtimes import runtime

    return runtime(artifact.runtime).runner(artifact, threads=threads)


def _predict(runner, data: ArrayData, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([runner.run(x) for x, _ in data.batches(batch_size)])


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` test inputs, repeated if the split is smaller than ``n``."""
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n]) if reps > 1 else np.ascontiguousarray(x[:n])


def _peak_memory(artifact, batch: np.ndarray, threads: int, workdir) -> int:
    from shrinkml.runtimes import runtime

    return runtime(artifact.runtime).peak_memory(artifact, batch, threads=threads, workdir=workdir)


def assess(
    artifacts: list,
    test: ArrayData,
    task: Task,
    *,
    threads: int,
    batch_n: int,
    warmup: int,
    repeats: int,
    seed: int,
    bootstrap_resamples: int,
    measure_memory: bool,
    workdir,
    progress: Progress,
    rel_tolerance: float = 0.05,
    max_time_s: float = 20.0,
) -> list[Assessment]:
    """Measure ``artifacts`` (the first is the reference for agreement, fidelity and speedups).

    Latency: after ``warmup`` calls and ``repeats`` interleaved rounds, rounds are added until every
    speedup over the first artifact has a 95% interval within ±``rel_tolerance`` (for one artifact
    alone: its p50), or the rounds have taken ``max_time_s`` seconds, per batch size.
    """
    runners = [_runner(a, threads) for a in artifacts]
    progress.log(f"evaluating on {len(test)} held-out test examples")
    outputs = [_predict(r, test) for r in runners]
    reference = outputs[0]

    timings: dict[str, StableTiming] = {}
    for key, n in (("batch_1", 1), ("batch_n", batch_n)):
        progress.log(f"timing at batch {n} (at least {repeats} interleaved rounds after {warmup} warm-up runs,"
                     f" up to {max_time_s:g} s until the 95% CI is within ±{100 * rel_tolerance:g}%)")
        xb = _batch(test.x, n)
        fns = {a.label: (lambda r=r, xb=xb: r.run(xb)) for a, r in zip(artifacts, runners)}
        timings[key] = time_until_stable(fns, reference=artifacts[0].label, warmup=warmup, repeats=repeats,
                                         rel_tolerance=rel_tolerance, max_time_s=max_time_s, seed=seed)
        for reason in timings[key].unstable_reasons:
            progress.log(f"timing at batch {n} is unstable: {reason}")

    def latency(stats) -> dict[str, Any]:
        _, lo, hi = bootstrap_median_ci(np.asarray(stats.samples_ms), n_resamples=bootstrap_resamples, seed=seed)
        return {**stats.to_dict(), "p50_ci95": [lo, hi]}

    from shrinkml.runtimes import runtime

    results = []
    for a, r, out in zip(artifacts, runners, outputs):
        scores = task.scores(out, test, reference)
        metrics = {}
        for name, values in scores.items():
            mean, lo, hi = bootstrap_mean_ci(values, n_resamples=bootstrap_resamples, seed=seed)
            metrics[name] = {"value": mean, "ci95": [lo, hi]}
        for name, (source, statistic) in task.statistics().items():
            value, lo, hi = bootstrap_statistic_ci(
                scores[source], statistic, n_resamples=bootstrap_resamples, seed=seed
            )
            metrics[name] = {"value": value, "ci95": [lo, hi]}
        lat1, latn = timings["batch_1"].stats[a.label], timings["batch_n"].stats[a.label]
        peak = None
        if measure_memory:
            progress.log(f"peak memory of {a.label} in a fresh process")
            peak = _peak_memory(a, _batch(test.x, batch_n), threads, workdir)
        measurement = {
            "runtime": a.runtime,
            "runtime_details": runtime(a.runtime).describe(r),
            "size_bytes": a.size_bytes,
            "params": a.params,
            "nonzero_params": a.nonzero_params,
            "macs": a.macs,
            "latency_ms": {
                "batch_1": latency(lat1),
                "batch_n": {"n": batch_n, **latency(latn)},
            },
            "throughput_per_s": {
                "batch_1": 1000.0 / lat1.p50_ms,
                "batch_n": batch_n * 1000.0 / latn.p50_ms,
            },
            "peak_memory_bytes": peak,
            "metrics": metrics,
        }
        if a is not artifacts[0]:
            measurement["agreement_with_baseline"] = agreement_with_baseline(
                task, out, reference, seed=seed, resamples=bootstrap_resamples
            )
        results.append(Assessment(measurement, scores, out, label=a.label, timings=timings))
    return results


def agreement_with_baseline(task: Task, outputs: np.ndarray, reference: np.ndarray, *, seed: int, resamples: int) -> dict[str, Any]:
    """How closely ``outputs`` follow the baseline's ``reference`` outputs, named by what it measures:
    ``top1_agreement`` (share of examples whose top-1 class is the baseline's) for class scores,
    ``cosine_similarity`` (mean per-example cosine to the baseline's output) for embeddings and any
    other output, where an arg-max over embedding dimensions would mean nothing.
    """
    from shrinkml.tasks import fidelity_scores

    fid = fidelity_scores(outputs, reference)
    metric = "top1_agreement" if task.name != "embedding" and "top1_agreement" in fid else "cosine_similarity"
    value, lo, hi = bootstrap_mean_ci(fid[metric], n_resamples=resamples, seed=seed)
    return {"metric": metric, "value": value, "ci95": [lo, hi]}


def metric_drop(
    baseline: Assessment, compressed: Assessment, metric: str, *, drop_type: str, seed: int, resamples: int
) -> dict[str, Any]:
    """Drop of ``metric`` (baseline - compressed) with a paired-bootstrap 95% CI.

    ``relative`` divides by the baseline's value (a point estimate), so the CI is the absolute CI
    scaled by the same constant.
    """
    b, c = baseline.scores[metric], compressed.scores[metric]
    value, lo, hi = paired_bootstrap_diff_ci(b, c, n_resamples=resamples, seed=seed)
    if drop_type == "relative":
        base = float(np.mean(b))
        scale = 1.0 / base if base > 0 else float("inf")
        value, lo, hi = value * scale, lo * scale, hi * scale
    return {"metric": metric, "type": drop_type, "value": value, "ci95": [lo, hi]}
