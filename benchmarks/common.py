"""Shared by the benchmark scripts: keep each script's section of docs/benchmarks.md current."""

from __future__ import annotations

from pathlib import Path

from shrinkml.atomic import write_text

TITLE = "# shrinkml benchmarks\n\nEvery figure names the command, machine and library versions that produced it.\n"


def update_docs(path: Path, name: str, section: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else TITLE
    block = f"{start}\n{section.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)


DEMO_CNN = "shrinkml.examples.demo:digits_cnn"


def demo_cnn_search_setup(tmp: Path, *, seed: int, settings, progress, max_drop: float = 0.02):
    """The demo CNN trained into ``tmp`` and the mobile case study's targets scaled to it, shared by
    the search benchmarks: size at most a tenth of the FP32 ONNX, batch-1 p50 at most 0.6x the FP32
    model's (measured on the validation split, as trials are), ``max_drop`` accuracy points.

    Returns ``(weights, pipe, baseline, targets)`` with ``targets`` holding ``max_size_bytes``,
    ``max_latency_ms`` and ``budget``."""
    from shrinkml.budget import Budget
    from shrinkml.examples.demo import build_demo_model, demo_data
    from shrinkml.pipeline import Pipeline
    from shrinkml.recipe_search.trial import Targets, TrialEvaluator

    weights = tmp / "cnn.safetensors"
    build_demo_model(demo_data(seed), seed=seed, progress=progress, weights_out=weights)
    pipe = Pipeline.prepare(DEMO_CNN, data="builtin:digits", weights=weights, settings=settings, progress=progress)
    budget = Budget(max_drop=max_drop)
    base = TrialEvaluator(pipe, Targets(budget=budget), ("size", "latency", "metric"), workdir=tmp / "probe").baseline
    targets = {"max_size_bytes": base["size_bytes"] // 10, "max_latency_ms": 0.6 * base["latency_ms"], "budget": budget}
    progress.log(f"targets: size <= {targets['max_size_bytes']:,} bytes, batch-1 p50 <= {targets['max_latency_ms']:.4f} ms"
                 f" (0.6 x {base['latency_ms']:.4f}), drop <= {max_drop}")
    return weights, pipe, base, targets
