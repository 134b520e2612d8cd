"""Search trials for causal language models: apply a sampled recipe (``quantize.gguf`` steps), write
the artifact the run's LM runtime deploys (a GGUF file; on ``onnxruntime-genai`` the folder its
builder makes), reject it on size before anything else, else score it against the original on the
validation windows on that runtime and time its greedy generation.

The objectives keep the directions of ``shrinkml.recipe_search.trial.OBJECTIVES``:

- ``size``: the written artifact's bytes (the GGUF file, or every file of the folder);
- ``latency``: milliseconds per generated token (the median over rounds of the decode steps'
  time per token, batch 1, KV cache); a ``--max-latency`` target is met when the worst end of its
  bootstrap CI is within it, as for array models;
- ``throughput``: generated tokens per second (its CI's worst end for ``--min-throughput``);
- ``metric``: minus the relative perplexity increase on the validation windows (0 is the original;
  higher is better), so "maximize metric" reads as for every other task.

The budget reads the perplexity increase with its paired bootstrap CI, in the budget's units
(``relative``: ``ppl / ppl_original - 1``; ``absolute``: perplexity points), met at the CI's worst
end. Everything here reads the validation split; the test split is sealed as in ``trial.py``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError
from shrinkml.recipe_search.trial import Outcome, PrefixCache, SealedData, Targets, TrialStopped, apply_cached


class LMTrialEvaluator:
    """Measures causal-LM trials against one prepared pipeline (see the module docstring)."""

    rounds = 5  # generation rounds per trial (the final compress run times its own)

    def __init__(self, pipe, targets: Targets, objectives: tuple[str, ...], *, cache_size: int = 2,
                 pruning: bool = True, workdir: Path) -> None:
        from shrinkml.runtimes import runtime

        self.pipe, self.targets, self.objectives = pipe, targets, objectives
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache = PrefixCache(cache_size)
        self.last_seconds: dict[str, float] = {}
        p = pipe.prepared
        validation = p.splits.validation
        if validation is None or len(validation) < 2:
            raise InputError(
                "a search scores its trials on the validation windows, and this text has fewer than two",
                where="--data", found=f"splits {p.splits.sizes()}",
                fix="give more text (the validation split is 10% of the texts by default)")
        if targets.batch != 1:
            raise InputError("a causal LM's search times greedy generation at batch 1", where="--batch",
                             found=str(targets.batch), fix="leave --batch at 1")
        self.validation = validation
        self.splits = replace(p.splits, test=SealedData(len(p.splits.test)))
        from shrinkml.pipeline import refuse_lm_output

        refuse_lm_output(pipe.settings.runtime)
        self.runtime = runtime(pipe.settings.runtime)
        self.writes_own = hasattr(self.runtime, "write_lm")  # its own artifact (ORT GenAI's folder), not a GGUF
        self.context = int(validation.x.shape[1])
        self.prompt = validation.x[0]
        s = pipe.settings
        self.new_tokens = max(2, min(s.new_tokens, p.loaded.lm.context_length - len(self.prompt)))
        self._base = self._generator(loaded=p.loaded)
        self.baseline = self._baseline()

    def _generator(self, **where):
        s = self.pipe.settings
        return self.runtime.lm_generator(threads=s.threads, context=self.context, new_tokens=self.new_tokens, **where)

    def _speed(self, generators: dict[str, Any]) -> dict[str, dict[str, Any]]:
        from shrinkml.measure.lm import time_generation

        s = self.pipe.settings
        return time_generation(generators, self.prompt, new_tokens=self.new_tokens, rounds=self.rounds,
                               resamples=s.bootstrap_resamples, seed=s.seed)

    def _baseline(self) -> dict[str, Any]:
        from shrinkml.measure.lm import deployable_bytes, score_windows

        s = self.pipe.settings
        q = score_windows({"baseline": self._base.logits}, self.validation, resamples=s.bootstrap_resamples,
                          seed=s.seed)["baseline"]
        tps = self._speed({"baseline": self._base})["baseline"]["generation_tokens_per_s"]
        return {"size_bytes": deployable_bytes(self.pipe.prepared.loaded),
                "latency_ms": 1000.0 / tps["value"], "latency_ms_ci95": [1000.0 / tps["ci95"][1], 1000.0 / tps["ci95"][0]],
                "latency_unit": "ms per generated token (batch 1, KV cache)",
                "throughput_per_s": tps["value"], "metric": 0.0, "metric_name": "-(perplexity increase)", "budget_reads": "perplexity increase",
                "perplexity": q["perplexity"]["value"], "validation_windows": len(self.validation),
                "validation_scored_tokens": q["scored_tokens"]}

    # ------------------------------------------------------------------ a trial
    def apply(self, steps: list[dict]) -> tuple[Any, list[dict], dict[str, float]]:
        """The state after ``steps``, computing only what the cache does not hold (no teacher copy:
        no causal-LM step distils)."""
        return apply_cached(self.cache, self.pipe, self.splits, self.targets.budget, steps, workdir=self.workdir,
                            teacher=False, seconds=self.last_seconds)

    def check_recipe(self, steps: list[dict]) -> None:
        """Refuse a sampled recipe whose steps cannot take this model (the pipeline's own check)."""
        from shrinkml.pipeline import refuse_lm_recipe
        from shrinkml.recipe import as_recipe

        refuse_lm_recipe(as_recipe([dict(s) for s in steps]).steps, self.pipe.prepared.loaded, self.pipe.settings.runtime)

    def evaluate(self, steps: list[dict], label: str = "trial") -> Outcome:
        from shrinkml.measure.lm import artifact_bytes, score_windows
        from shrinkml.packaging.gguf_out import write_lm_gguf

        if not steps:
            raise TrialStopped("no step was sampled: that is the original model", "empty")
        p, s, t = self.pipe.prepared, self.pipe.settings, self.targets
        state, reports, timings = self.apply(steps)
        start = time.perf_counter()
        if self.writes_own:
            path = self.runtime.write_lm(state, p.loaded, self.workdir / label, threads=s.threads)
        else:
            path = write_lm_gguf(state, p.loaded, self.workdir / f"{label}.gguf")
        timings["write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            size = artifact_bytes(path)
            if t.max_size_bytes is not None and size > t.max_size_bytes:
                raise TrialStopped(f"size {size:,} bytes > {t.max_size_bytes:,} (rejected before scoring and timing)",
                                   "size")
            gen = self._generator(folder=path) if self.writes_own else self._generator(gguf_path=path)
            try:
                q = score_windows({"baseline": self._base.logits, "trial": gen.logits}, self.validation,
                                  resamples=s.bootstrap_resamples, seed=s.seed)["trial"]
                timings["score_s"] = time.perf_counter() - start
                start = time.perf_counter()
                speed = self._speed({"baseline": self._base, "trial": gen})["trial"]
                timings["timing_s"] = time.perf_counter() - start
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()
        finally:  # trial artifacts are not kept
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        key = "perplexity_increase" if t.budget.drop_type == "relative" else "perplexity_increase_absolute"
        drop, (lo, hi) = q[key]["value"], q[key]["ci95"]
        tps = speed["generation_tokens_per_s"]
        latency = 1000.0 / tps["value"]
        worst_latency = 1000.0 / tps["ci95"][0]
        values = {"size": float(size), "latency": latency, "throughput": tps["value"],
                  "metric": -q["perplexity_increase"]["value"]}
        constraints = {"drop": hi - t.budget.max_drop}
        if t.max_size_bytes is not None:
            constraints["size"] = float(size - t.max_size_bytes)
        if t.max_latency_ms is not None:
            constraints["latency"] = worst_latency - t.max_latency_ms
        if t.min_throughput is not None:
            constraints["throughput"] = t.min_throughput - tps["ci95"][0]
        details = {"steps": [r["technique"] for r in reports], "drop": drop, "drop_ci95": [lo, hi],
                   "perplexity": q["perplexity"], "kl_divergence": q["kl_divergence"]["value"],
                   "top1_agreement": q["top1_agreement"]["value"],
                   "latency_ms_ci95": [1000.0 / tps["ci95"][1], worst_latency],
                   "generation_ratio": speed["generation_tokens_per_s_ratio"],
                   "seconds": {k: round(v, 3) for k, v in timings.items()}}
        return Outcome(values, constraints, details)


def lm_test_figures(final: dict[str, Any], request) -> tuple[dict[str, Any], dict[str, bool]]:
    """The best recipe's test-split figures from its causal-LM compress report, and which targets
    they meet (latency and throughput at their CI's worst end)."""
    comp, delta = final["compressed"], final["delta"]
    tps = comp["generation"]["generation_tokens_per_s"]
    checks = {"budget": bool(final["budget"]["met"])}
    if request.max_size_bytes is not None:
        checks["size"] = comp["size_bytes"] <= request.max_size_bytes
    if request.max_latency_ms is not None:
        checks["latency"] = 1000.0 / tps["ci95"][0] <= request.max_latency_ms
    if request.min_throughput is not None:
        checks["throughput"] = tps["ci95"][0] >= request.min_throughput
    budget = final["budget"]
    increase = delta["perplexity_increase" if budget["drop_type"] == "relative" else "perplexity_increase_absolute"]
    test = {
        "size_bytes": comp["size_bytes"], "latency_ms_p50": 1000.0 / tps["value"],
        "latency_ms_p50_ci95": [1000.0 / tps["ci95"][1], 1000.0 / tps["ci95"][0]],
        "latency_unit": "ms per generated token", "throughput_per_s": tps["value"],
        "metric": -delta["perplexity_increase"]["value"], "metrics": comp["metrics"],
        "drop": {"metric": f"perplexity increase ({budget['drop_type']})", "value": increase["value"],
                 "ci95": increase["ci95"]},
        "speedup": delta["generation_tokens_per_s_ratio"], "size_ratio": delta["size_ratio"],
        "targets_met": checks,
    }
    return test, checks
