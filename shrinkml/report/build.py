"""Assemble the report dicts from measurements: ``compress`` (baseline vs compressed) and ``bench``.

Measurement happens in ``shrinkml.measure``; this module only arranges what was measured into the
``shrinkml.report/2`` and ``shrinkml.bench/2`` records and derives the deltas, notes and costs.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from shrinkml.cost import cost_report, model_cost
from shrinkml.measure.stats import paired_speedup_ci, speedup_verdict
from shrinkml.report.json_report import REPORT_SCHEMA

BENCH_SCHEMA = "shrinkml.bench/2"  # /2: latency p50_ci95, artifact as {"file", "description"}, "timing"
BATCH_KEYS = ("batch_1", "batch_n")
TIMING_METHOD = (
    "Interleaved rounds: each round runs every model once, in alternating order, after discarded"
    " warm-up runs. Speedup = median over rounds of (baseline time / compressed time) within the same"
    " round; its 95% CI bootstraps whole rounds. Rounds are added until that CI is within"
    " ±rel_tolerance of the value or the rounds have taken max_time_s. A speedup whose CI includes 1.0"
    " is reported as 'no measurable difference'."
)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else float(a) / float(b)


def speedup(base, comp, key: str, *, resamples: int, seed: int) -> dict[str, Any]:
    """Speedup of ``comp`` over ``base`` (Assessments timed together) at ``key`` with its paired
    95% CI over the interleaved rounds, and what it allows one to say."""
    value, lo, hi = paired_speedup_ci(
        base.latency_samples_ms(key), comp.latency_samples_ms(key), n_resamples=resamples, seed=seed
    )
    return {"value": value, "ci95": [lo, hi], "verdict": speedup_verdict(lo, hi),
            "rounds": base.timings[key].rounds}


def timing_section(assessment) -> dict[str, Any]:
    """How latency was measured and whether it can be trusted, per batch size."""
    per_batch = {key: assessment.timings[key].to_dict() for key in BATCH_KEYS}
    return {"method": TIMING_METHOD, "unstable": any(t["unstable"] for t in per_batch.values()), **per_batch}


def compressed_artifact(runtime: str) -> dict[str, Any]:
    """The compressed file, named as ``compress`` writes it into ``--out``."""
    from shrinkml.runtimes import runtime as get_runtime

    name = f"model{get_runtime(runtime).artifact_suffix}"
    return {"file": name, "description": f"the compressed model, written to the output folder as {name}"}


def input_artifact(runtime: str, loaded, *, written: str = "not written to the output folder") -> dict[str, Any]:
    """The user's input model: no file of ours holds it, so ``file`` is None and the description
    says what was measured."""
    weights = f" with weights {loaded.weights}" if getattr(loaded, "weights", None) else ""
    from shrinkml.runtimes import runtime as get_runtime

    saved_as = get_runtime(runtime).artifact_format
    return {"file": None,
            "description": f"the input model {loaded.source}{weights}, saved as {saved_as} in a temporary folder"
            f" to be measured (size_bytes is that file's size); {written}"}


def data_section(splits, seed: int, loaded, example) -> dict[str, Any]:
    section: dict[str, Any] = {"source": splits.source, "seed": seed, "splits": splits.sizes()}
    if getattr(loaded, "text", None) is not None:  # every text is padded / truncated to this many tokens
        section["tokens_per_text"] = int(example.shape[1])
        section["padding"] = "every text padded (and truncated) to tokens_per_text; latency is measured on those"
    return section


def _batch_label(key: str, measurement: dict) -> str:
    return "batch 1" if key == "batch_1" else f"batch {measurement['latency_ms']['batch_n']['n']}"


def notes(baseline: dict, compressed: dict, steps: list[dict], delta: dict) -> list[str]:
    """Caveats a reader must see: what steps say about their own result, measured slowdowns (only
    where the speedup's CI lies below 1.0), a larger file. Unstable timing is in ``timing``."""
    # caveats a step states about its own result (e.g. FP16 without native FP16 arithmetic)
    out = [f"{s['technique']}: {s['summary']['note']}" for s in steps if s["summary"].get("note")]
    for key in BATCH_KEYS:
        label = _batch_label(key, compressed)
        entry = delta.get(f"speedup_{key}") or {}
        if entry.get("verdict") == "slower":
            b, c = baseline["latency_ms"][key]["p50"], compressed["latency_ms"][key]["p50"]
            lo, hi = entry["ci95"]
            out.append(f"The compressed model is slower than the baseline at {label} on this runtime"
                       f" ({c:.3g} ms vs {b:.3g} ms, median; speedup {entry['value']:.3g}x, 95% CI {lo:.3g}–{hi:.3g}x).")
    if compressed["size_bytes"] > baseline["size_bytes"]:
        out.append("The compressed artifact is larger on disk than the baseline.")
    return out


RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: the factory model ran with the untrained weights it is built with (--random-weights);"
    " accuracy figures describe the architecture, not a trained model"
)


def _model_section(loaded) -> dict[str, Any]:
    return {"source": loaded.source, "weights": loaded.weights, "kind": loaded.kind,
            "random_weights": bool(getattr(loaded, "random_weights", False))}


def _loading_notes(loaded) -> list[str]:
    """What loading decided (random weights first, float casts), for the report's notes."""
    return ([RANDOM_WEIGHTS_NOTE] if getattr(loaded, "random_weights", False) else []) + list(getattr(loaded, "notes", []))


def _runtime_section(settings) -> dict[str, Any]:
    # how each model was computed (e.g. OpenVINO's precision) is in its measurement's runtime_details
    return {"name": settings.runtime, "threads": settings.threads, "batch_n": settings.batch_n}


def build_report(
    *, loaded, task, primary: str, settings, splits, example, base, comp, drop: dict, budget, recipe,
    steps: list[dict], export: dict, environment: dict,
) -> dict[str, Any]:
    """The ``shrinkml.report/2`` dict of one compress run (``base``/``comp``: Assessments)."""
    b = {"artifact": input_artifact(base.measurement["runtime"], loaded), **base.measurement}
    c = {"artifact": compressed_artifact(comp.measurement["runtime"]), **comp.measurement}
    worst = drop["ci95"][1]
    speedups = {f"speedup_{key}": speedup(base, comp, key, resamples=settings.bootstrap_resamples, seed=settings.seed)
                for key in BATCH_KEYS}
    return {
        "schema": REPORT_SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": _model_section(loaded),
        "task": {"name": task.name, "primary_metric": primary},
        "runtime": _runtime_section(settings),
        "data": data_section(splits, settings.seed, loaded, example),
        "baseline": b,
        "compressed": c,
        "delta": {
            "size_ratio": ratio(b["size_bytes"], c["size_bytes"]),
            "params_ratio": ratio(b["params"], c["params"]),
            "nonzero_params_ratio": ratio(b["nonzero_params"], c["nonzero_params"]),
            "macs_ratio": ratio(b["macs"], c["macs"]),
            **speedups,
            "accuracy_drop": drop,
        },
        "budget": {
            "max_drop": budget.max_drop,
            "drop_type": budget.drop_type,
            "metric": primary,
            "worst_case_drop": worst,
            "met": bool(worst <= budget.max_drop),
        },
        "cost": cost_report(b, c, settings.cost),
        "recipe": recipe.to_dict(),
        "steps": steps,
        "export": export,
        "notes": _loading_notes(loaded) + notes(b, c, steps, speedups),
        "timing": timing_section(base),
        "environment": environment,
    }


def build_bench_report(*, loaded, task, settings, splits, example, assessment, export_max_abs_diff, environment) -> dict[str, Any]:
    """The ``shrinkml.bench/2`` dict: one model's assessment."""
    measurement = {"artifact": input_artifact(assessment.measurement["runtime"], loaded, written="bench writes no files"),
                   **assessment.measurement, "export_max_abs_diff": export_max_abs_diff}
    return {
        "schema": BENCH_SCHEMA,
        "model": _model_section(loaded),
        "task": {"name": task.name},
        "runtime": _runtime_section(settings),
        "data": data_section(splits, settings.seed, loaded, example),
        "measurement": measurement,
        "cost": {
            "currency": "USD",
            "assumptions": settings.cost.model_dump(),
            **model_cost(measurement["throughput_per_s"]["batch_n"], measurement["size_bytes"], settings.cost),
        },
        "timing": timing_section(assessment),
        "notes": _loading_notes(loaded),
        "environment": environment,
    }


def build_lm_bench_report(*, loaded, task, settings, splits, measurement: dict, environment: dict) -> dict[str, Any]:
    """The ``shrinkml.bench/2`` dict of one causal language model (``measurement`` from
    ``shrinkml.measure.lm.assess_lm``): perplexity and generation speed instead of latency."""
    lm = loaded.lm
    windows = measurement["windows"]
    return {
        "schema": BENCH_SCHEMA,
        "model": {**_model_section(loaded), "architecture": lm.architecture, "gguf_file_type": lm.file_type,
                  "tied_embeddings": lm.tied_embeddings},
        "task": {"name": task.name},
        "runtime": {"name": measurement["runtime"], "threads": settings.threads},
        "data": {"source": splits.source, "seed": settings.seed, "splits": splits.sizes(),
                 "windows": "texts split by text first, then cut into windows of the context; each split's"
                 " windows read only its own texts", "context_tokens": windows["context"],
                 "scored_tokens": windows["scored_tokens"]},
        "measurement": {"artifact": {"file": None, "description": f"the input model {loaded.source} as given"
                                     " (size_bytes: its files on disk); bench writes no files"}, **measurement},
        "notes": _loading_notes(loaded),
        "environment": environment,
    }


LM_REPORT_SCHEMA = "shrinkml.lm_report/1"
_LM_MEASURED = {
    "torch": "PyTorch eager on CPU, both models: the compressed model as loaded back from the written model.gguf"
             " (its blocks dequantized), so quality is the file's; speed is PyTorch's with float weights, not"
             " llama.cpp's",
    "llamacpp": "llama.cpp on CPU (llama-cpp-python), both models from their GGUF files: the original .gguf and"
                " the written model.gguf, each loaded on its own; quality from llama.cpp's logits (its kernels"
                " quantize activations to 8 bits for quantized matrix products), speed with llama.cpp's kernels",
    "onnxruntime-genai": "ONNX Runtime GenAI on CPU, both models as folders its model builder made: the input model"
                         " built at fp32, the compressed one from its block codes (a GPTQ checkpoint, MatMulNBits);"
                         " each loaded on its own, with ORT GenAI's KV cache; the baseline's size is the input's files",
}
_GGUF_ARTIFACT = {"file": "model.gguf", "description": "the compressed model, a GGUF file that loads on its own"
                  " (llama.cpp, transformers)"}


def build_lm_report(*, loaded, task, settings, splits, figures: dict, sizes: dict, budget, recipe, steps: list[dict],
                    environment: dict, memory: dict | None = None, artifact: dict | None = None) -> dict[str, Any]:
    """The ``shrinkml.lm_report/1`` dict of one causal-LM compress run: sizes, perplexity of both with
    CIs, KL and top-1 agreement of the compressed against the original, the perplexity increase with
    its paired CI (the budget reads its worst end), and interleaved generation speed."""
    base, comp = figures["baseline"], figures["compressed"]
    cq, bq = comp["quality"], base["quality"]
    increase = cq["perplexity_increase" if budget.drop_type == "relative" else "perplexity_increase_absolute"]
    worst = increase["ci95"][1]

    def side(f: dict, size: int, artifact: dict) -> dict[str, Any]:
        q = f["quality"]
        return {"artifact": artifact, "size_bytes": size,
                "metrics": {k: q[k] for k in ("perplexity", "kl_divergence", "top1_agreement") if k in q},
                "generation": {k: v for k, v in f["generation"].items() if k != "generated"}}

    gen = comp["generation"]
    return {
        "schema": LM_REPORT_SCHEMA,
        "model": {**_model_section(loaded), "architecture": loaded.lm.architecture,
                  "gguf_file_type": loaded.lm.file_type, "tied_embeddings": loaded.lm.tied_embeddings},
        "task": {"name": task.name, "primary_metric": "perplexity"},
        "runtime": {"name": settings.runtime, "threads": settings.threads, "measured": _LM_MEASURED.get(
                        settings.runtime, f"{settings.runtime}, both models, the compressed one from model.gguf"),
                    "baseline": base.get("runtime_details"), "compressed": comp.get("runtime_details")},
        "data": {"source": splits.source, "seed": settings.seed, "splits": splits.sizes(),
                 "context_tokens": int(splits.test.x.shape[1]), "scored_tokens": bq["scored_tokens"],
                 "windows": "texts split by text first, then cut into windows; the test windows read only test texts"},
        "baseline": side(base, sizes["baseline"], {"file": None, "description": f"the input model {loaded.source}"}),
        "compressed": side(comp, sizes["compressed"], artifact or _GGUF_ARTIFACT),
        "delta": {
            "size_ratio": ratio(sizes["baseline"], sizes["compressed"]),
            "perplexity_increase": cq["perplexity_increase"],
            "perplexity_increase_absolute": cq["perplexity_increase_absolute"],
            **{f"{k}_ratio": gen[f"{k}_ratio"] for k in ("prompt_tokens_per_s", "generation_tokens_per_s",
                                                          "time_to_first_token_ms")},
            "same_greedy_tokens": base["generation"]["generated"] == gen["generated"],
        },
        "budget": {"max_drop": budget.max_drop, "drop_type": budget.drop_type, "metric": "perplexity increase",
                   "worst_case_drop": worst, "met": bool(worst <= budget.max_drop)},
        "recipe": recipe.to_dict(),
        "steps": steps,
        "compression_memory": memory,
        "notes": _loading_notes(loaded),
        "environment": environment,
    }
