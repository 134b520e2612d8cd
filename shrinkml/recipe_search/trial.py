"""One search trial: apply a sampled recipe (reusing cached step prefixes), reject it cheaply when
it cannot meet a target, else score it on the validation split and time it.

Everything here reads the validation split. The steps of a trial get the run's splits with the test
split sealed (any read raises), so no choice made during a search can depend on the test split; the
search's final report, which re-measures the best recipe on the test split, is made elsewhere.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shrinkml.budget import Budget
from shrinkml.errors import InputError, ShrinkmlError

OBJECTIVES = {  # name -> Optuna direction
    "size": "minimize",
    "latency": "minimize",
    "throughput": "maximize",
    "metric": "maximize",
}


class SealedSplitError(ShrinkmlError):
    """Something read the test split during a search (a bug: only the final report may)."""

    exit_code = 2


class SealedData:
    """Stands in for the test split while trials run: any use raises ``SealedSplitError``."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:  # its size is no data
        return self._n

    def _refuse(self, *_: Any, **__: Any):
        raise SealedSplitError("the test split was read during a search; only the final report may read it")

    subset = batches = _refuse

    def __getattr__(self, name: str):
        self._refuse()


class TrialStopped(Exception):
    """Raised to stop a trial early (tells Optuna it was pruned); ``reason`` says why."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind
        self.intermediate: list = []


@dataclass(frozen=True)
class Targets:
    """What the user asked for: hard constraints, and the batch latency is timed at."""

    max_size_bytes: int | None = None
    max_latency_ms: float | None = None
    min_throughput: float | None = None  # examples per second at ``batch``
    batch: int = 1
    budget: Budget = Budget()

    def allowed_drop(self, baseline_value: float) -> float:
        if self.budget.drop_type == "relative":
            return self.budget.max_drop * baseline_value
        return self.budget.max_drop

    def constraint_names(self) -> list[str]:
        names = ["drop"]
        for name, value in (("size", self.max_size_bytes), ("latency", self.max_latency_ms),
                            ("throughput", self.min_throughput)):
            if value is not None:
                names.append(name)
        return names

    def describe(self) -> dict[str, Any]:
        return {"max_size_bytes": self.max_size_bytes, "max_latency_ms": self.max_latency_ms,
                "min_throughput_per_s": self.min_throughput, "batch": self.batch,
                "max_drop": self.budget.max_drop, "drop_type": self.budget.drop_type}


@dataclass
class Outcome:
    """A measured trial: objective values, constraint values (<= 0 satisfied) and details."""

    values: dict[str, float]
    constraints: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints.values())


def _predict(runner, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([runner.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def _batch(x: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n] if reps > 1 else x[:n])


class PrefixCache:
    """Model states after each recipe prefix, least recently used dropped first. Steps never change
    the state they are given and are deterministic for a seed, so a cached state is exactly what
    recomputing the prefix would give."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[Any, list[dict], float]] = OrderedDict()

    @staticmethod
    def key(steps: list[dict]) -> str:
        return json.dumps(steps, sort_keys=True, default=str)

    def longest(self, steps: list[dict]) -> tuple[int, Any]:
        for k in range(len(steps), 0, -1):
            item = self._items.get(self.key(steps[:k]))
            if item is not None:
                self._items.move_to_end(self.key(steps[:k]))
                return k, item
        return 0, None

    def put(self, steps: list[dict], state, reports: list[dict], seconds: float) -> None:
        if self.size <= 0:
            return
        self._items[self.key(steps)] = (state, reports, seconds)
        self._items.move_to_end(self.key(steps))
        while len(self._items) > self.size:
            self._items.popitem(last=False)


def apply_cached(cache: PrefixCache, pipe, splits, budget: Budget, steps: list[dict], *, workdir: Path,
                 on_epoch=None, teacher: bool = True, before_step=None,
                 seconds: dict[str, Any] | None = None) -> tuple[Any, list[dict], dict[str, float]]:
    """The state after ``steps`` on ``pipe``'s model, with ``splits`` (the test split sealed),
    starting from the longest prefix ``cache`` holds and caching every new prefix. Returns
    ``(state, step reports, {"steps_s", "saved_by_cache_s", "cached_steps"})``. ``seconds`` is filled
    with what the cache saved before any step runs (so a trial stopped in a step still says it)."""
    from shrinkml.pipeline import _initial_state, _step_context
    from shrinkml.recipe import as_recipe
    from shrinkml.techniques.base import registry

    p, s = pipe.prepared, pipe.settings
    recipe = as_recipe([dict(step) for step in steps])
    configs = [step.model_dump(mode="json") for step in recipe.steps]
    cached, item = cache.longest(configs)
    state, reports, saved = (item[0], list(item[1]), item[2]) if item else (_initial_state(p.loaded), [], 0.0)
    prefix_seconds = saved
    if seconds is not None:
        seconds.clear()
        seconds.update({"saved_by_cache_s": round(saved, 3), "cached_steps": cached})
    ctx = _step_context(p.loaded, splits, p.task, p.example, s, pipe.progress, workdir, budget, teacher=teacher)
    ctx = replace(ctx, on_epoch=on_epoch)
    techniques = registry()
    spent = 0.0
    for i in range(cached, len(recipe.steps)):
        step = recipe.steps[i]
        if before_step is not None:
            before_step(step)
        start = time.perf_counter()
        result = techniques[step.technique].apply(state, step, ctx)
        took = time.perf_counter() - start
        spent += took
        prefix_seconds += took
        state = result.state
        reports.append({"technique": step.technique, "summary": result.summary})
        cache.put(configs[: i + 1], state, reports, prefix_seconds)
    return state, reports, {"steps_s": spent, "saved_by_cache_s": saved, "cached_steps": cached}


class TrialEvaluator:
    """Measures trials against one prepared pipeline (see the module docstring)."""

    def __init__(self, pipe, targets: Targets, objectives: tuple[str, ...], *, cache_size: int = 6,
                 pruning: bool = True, workdir: Path) -> None:
        from shrinkml.runtimes import runtime

        self.pipe, self.targets, self.objectives = pipe, targets, objectives
        self.pruning, self.workdir = pruning, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache = PrefixCache(cache_size)
        self.last_seconds: dict[str, float] = {}
        p = pipe.prepared
        if p.task.causal_lm:
            raise InputError("shrinkml search does not take causal language models yet", where=p.loaded.source,
                             fix="compress a causal LM with a recipe (recipes/llm-*.yaml) and shrinkml compress")
        validation = p.splits.validation
        if validation is None or len(validation) < 2:
            raise InputError(
                "a search scores its trials on the validation split, and this data has none",
                where="--data", found=f"splits {p.splits.sizes()}",
                fix="give more data (the validation split is 10% by default), or an .npz with x_validation",
            )
        self.validation = validation
        self.splits = replace(p.splits, test=SealedData(len(p.splits.test)))
        self.runtime = runtime(pipe.settings.runtime)
        self.baseline = self._baseline()

    # ------------------------------------------------------------------ measuring
    def _runner(self, artifact):
        return self.runtime.runner(artifact, threads=self.pipe.settings.threads)

    def _time_ms(self, runner) -> tuple[float, float, float]:
        """p50 latency at the target batch and its bootstrap 95% CI, ``(p50, lo, hi)``. A latency
        or throughput target is met only when the CI's worst end is within it, like the accuracy
        budget: a p50 a hair under the line on a noisy machine is not a met target."""
        from shrinkml.measure.latency import time_interleaved
        from shrinkml.measure.stats import bootstrap_median_ci

        s = self.pipe.settings
        xb = _batch(self.validation.x, self.targets.batch)
        stats = time_interleaved({"trial": lambda: runner.run(xb)}, warmup=s.warmup, repeats=s.repeats, min_repeat_s=0.3)
        samples = np.asarray(stats["trial"].samples_ms, float)
        _, lo, hi = bootstrap_median_ci(samples, n_resamples=s.bootstrap_resamples, seed=s.seed)
        return float(stats["trial"].p50_ms), lo, hi

    def _scores(self, outputs: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return np.asarray(self.pipe.prepared.task.scores(outputs, self.validation, reference)[self.primary], float)

    def _baseline(self) -> dict[str, Any]:
        from shrinkml.pipeline import _initial_state

        p = self.pipe.prepared
        art = self.pipe._artifact(_initial_state(p.loaded), "baseline", self.workdir)
        runner = self._runner(art)
        outputs = _predict(runner, self.validation.x)
        self.reference = outputs
        self.primary = p.task.primary_metric(outputs.shape)
        self.base_scores = np.asarray(p.task.scores(outputs, self.validation, outputs)[self.primary], float)
        latency, lo, hi = self._time_ms(runner)
        return {"size_bytes": art.size_bytes, "latency_ms": latency, "latency_ms_ci95": [lo, hi],
                "throughput_per_s": self.targets.batch * 1000.0 / latency, "macs": art.macs,
                "metric": float(np.mean(self.base_scores)), "metric_name": self.primary,
                "validation_examples": len(self.validation)}

    def drop(self, scores: np.ndarray) -> tuple[float, float, float]:
        """Baseline minus trial, with a paired-bootstrap 95% CI, in the budget's units."""
        from shrinkml.measure.stats import paired_bootstrap_diff_ci

        s = self.pipe.settings
        value, lo, hi = paired_bootstrap_diff_ci(self.base_scores, scores, n_resamples=s.bootstrap_resamples, seed=s.seed)
        if self.targets.budget.drop_type == "relative":
            base = float(np.mean(self.base_scores))
            scale = 1.0 / base if base > 0 else float("inf")
            value, lo, hi = value * scale, lo * scale, hi * scale
        return value, lo, hi

    # ------------------------------------------------------------------ pruning
    def _epoch_check(self, intermediate: list) -> Callable[[int, Any], None] | None:
        """The threshold rule that stops hopeless training (Optuna's pruners do not take
        multi-objective studies): from a quarter of the epochs on (at least 2), a float student
        whose validation drop is over three budgets (and over 0.02) is stopped; quantization after
        it would only lose more."""
        if not self.pruning:
            return None
        from shrinkml.runtimes.torch_eager import TorchRunner

        allowed = self.targets.allowed_drop(self.baseline["metric"])
        threshold = max(3 * allowed, allowed + 0.02)

        def check(epoch: int, model) -> None:
            outputs = _predict(TorchRunner(model, threads=self.pipe.settings.threads), self.validation.x)
            scores = self._scores(outputs, self.reference)
            value = float(np.mean(self.base_scores) - np.mean(scores))
            if self.targets.budget.drop_type == "relative" and self.baseline["metric"] > 0:
                value /= self.baseline["metric"]
            intermediate.append([epoch, round(value, 6)])
            if epoch >= self._warmup and value > threshold:
                stop = TrialStopped(
                    f"pruned at epoch {epoch}: the student's validation drop {value:.4f} is over {threshold:.4f}"
                    f" (3 budgets) after {self._warmup} warm-up epochs", "pruned")
                stop.intermediate = list(intermediate)
                raise stop

        return check

    # ------------------------------------------------------------------ a trial
    def apply(self, steps: list[dict], on_epoch=None) -> tuple[Any, list[dict], dict[str, float]]:
        """The state after ``steps``, computing only what the cache does not hold."""
        return apply_cached(self.cache, self.pipe, self.splits, self.targets.budget, steps, workdir=self.workdir,
                            on_epoch=on_epoch, before_step=self._before_step, seconds=self.last_seconds)

    def _before_step(self, step) -> None:
        if step.technique == "finetune":
            self._warmup = max(2, step.epochs // 4)

    def check_recipe(self, steps: list[dict]) -> None:
        """Refuse a sampled combination that cannot run (a step after a torch-only quantizer, say)."""
        if not steps:
            return
        from shrinkml.pipeline import _check_recipe
        from shrinkml.recipe import as_recipe

        recipe = as_recipe([dict(step) for step in steps])
        _check_recipe(recipe, self.pipe.prepared.loaded.kind, self.pipe.settings)

    def evaluate(self, steps: list[dict], label: str = "trial") -> Outcome:
        """Apply, reject on size before anything else, score on validation, time. Raises
        ``TrialStopped`` for a trial stopped early."""
        if not steps:
            raise TrialStopped("no step was sampled: that is the original model", "empty")
        intermediate: list = []
        timings: dict[str, float] = {}
        self._warmup = 2
        state, reports, applied = self.apply(steps, self._epoch_check(intermediate))
        timings.update(applied)
        start = time.perf_counter()
        art = self.pipe._artifact(state, label, self.workdir)
        size = art.size_bytes
        t = self.targets
        details: dict[str, Any] = {"intermediate": intermediate, "steps": [r["technique"] for r in reports]}
        if t.max_size_bytes is not None and size > t.max_size_bytes:
            raise TrialStopped(f"size {size:,} bytes > {t.max_size_bytes:,} (rejected before scoring and timing)", "size")
        runner = self._runner(art)
        outputs = _predict(runner, self.validation.x)
        scores = self._scores(outputs, self.reference)
        drop, lo, hi = self.drop(scores)
        timings["score_s"] = time.perf_counter() - start
        start = time.perf_counter()
        latency, lat_lo, lat_hi = self._time_ms(runner)
        timings["timing_s"] = time.perf_counter() - start
        throughput = t.batch * 1000.0 / latency
        values = {"size": float(size), "latency": latency, "throughput": throughput, "metric": float(np.mean(scores))}
        constraints = {"drop": hi - t.allowed_drop(self.baseline["metric"])}
        if t.max_size_bytes is not None:
            constraints["size"] = float(size - t.max_size_bytes)
        if t.max_latency_ms is not None:  # the worst end of the p50's CI, as for the accuracy budget
            constraints["latency"] = lat_hi - t.max_latency_ms
        if t.min_throughput is not None:
            constraints["throughput"] = t.min_throughput - t.batch * 1000.0 / lat_hi
        details.update({"drop": drop, "drop_ci95": [lo, hi], "latency_ms_ci95": [lat_lo, lat_hi],
                        "params": art.params, "macs": art.macs,
                        "seconds": {k: round(v, 3) for k, v in timings.items()}})
        for path in (art.path,):  # trial artifacts are not kept
            Path(path).unlink(missing_ok=True)
        return Outcome(values, constraints, details)
