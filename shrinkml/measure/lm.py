"""Measure causal language models side by side: perplexity, KL divergence and top-1 agreement
against the first (original) model on the same test windows, and the speed figures LLM users
compare, all in one process, same threads.

Quality: every window runs through every model in turn, so KL(original || candidate) is exact over
the whole vocabulary while both logits are in hand. CIs bootstrap whole windows; the drop is the
relative perplexity increase with a paired bootstrap (the same resampled windows for both).

Speed (``time_generation``): for each model, interleaved rounds (order reversed every other round)
of a greedy generation from a fixed prompt with the KV cache: prompt processing tokens/s (the
prefill of ``prompt_tokens``), time to first token (prefill plus the first sampled token), and
generation tokens/s (the ``new_tokens - 1`` decode steps after it). Medians over rounds, with
percentile-bootstrap CIs, and the ratio of each model's per-round figures to the original's.

>>> figures = score_windows({"fp32": lm_a, "int4": lm_b}, test_windows)  # doctest: +SKIP
>>> figures["int4"]["perplexity"]["value"], figures["int4"]["kl_divergence"]["value"]  # doctest: +SKIP
(13.9, 0.021)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkml.data import ArrayData
from shrinkml.progress import SILENT, Progress
from shrinkml.tasks.perplexity import window_statistics

Logits = Callable[[np.ndarray], Any]  # (B, T) int64 token ids -> (B, T, V) logits (torch or numpy)


def _bootstrap_index(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.quantile(values, [0.025, 0.975])
    return [float(lo), float(hi)]


def score_windows(models: dict[str, Logits], data: ArrayData, *, batch_size: int = 1, resamples: int = 2000,
                  seed: int = 0, progress: Progress = SILENT) -> dict[str, dict[str, Any]]:
    """Perplexity (with CI) of every model on ``data``'s windows; for all but the first: KL and top-1
    agreement against the first, and the relative perplexity increase with a paired CI.

    ``batch_size`` windows are scored at once: each model's logits of a batch are
    ``batch x context x vocabulary`` float32 (one 512-token window of a 49,152-token vocabulary is
    100 MB), held for the reference and the model compared.

    ``data.x``: ``(n, T)`` windows; ``data.y``: each window's first scored position."""
    if data.y is None or not len(data):
        raise ValueError("score_windows needs windows with their first scored positions (shrinkml.data.lm)")
    names = list(models)
    reference = names[0]
    sums: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in names}
    n_batches = -(-len(data) // batch_size)
    for b, (x, first) in enumerate(data.batches(batch_size), start=1):
        ref_logits = models[reference](x)
        for name in names:
            logits = ref_logits if name == reference else models[name](x)
            stats = window_statistics(logits, x, first, None if name == reference else ref_logits)
            for key, value in stats.items():
                sums[name].setdefault(key, []).append(value)
            del logits
        if b == n_batches or b % 10 == 0:
            progress.log(f"scored window batch {b}/{n_batches}")
    per = {name: {k: np.concatenate(v) for k, v in s.items()} for name, s in sums.items()}
    idx = _bootstrap_index(len(data), resamples, seed)
    out: dict[str, dict[str, Any]] = {}
    base = per[reference]
    base_boot = base["nll"][idx].sum(1) / base["tokens"][idx].sum(1)
    for name in names:
        p = per[name]
        tokens = float(p["tokens"].sum())
        mean_nll = float(p["nll"].sum() / tokens)
        boot = p["nll"][idx].sum(1) / p["tokens"][idx].sum(1)
        entry: dict[str, Any] = {
            "windows": len(data), "scored_tokens": int(tokens),
            "perplexity": {"value": float(np.exp(mean_nll)), "ci95": _ci(np.exp(boot))},
            "mean_nll": mean_nll,
            "per_window": {k: v.tolist() for k, v in p.items()},
        }
        if name != reference:
            kl_boot = p["kl"][idx].sum(1) / p["tokens"][idx].sum(1)
            top_boot = p["top1"][idx].sum(1) / p["tokens"][idx].sum(1)
            increase = float(np.exp(mean_nll - base["nll"].sum() / tokens) - 1.0)
            entry["kl_divergence"] = {"value": float(p["kl"].sum() / tokens), "ci95": _ci(kl_boot)}
            entry["top1_agreement"] = {"value": float(p["top1"].sum() / tokens), "ci95": _ci(top_boot)}
            entry["perplexity_increase"] = {"value": increase, "ci95": _ci(np.exp(boot - base_boot) - 1.0),
                                            "type": "relative"}
            entry["perplexity_increase_absolute"] = {
                "value": float(np.exp(mean_nll) - np.exp(base["nll"].sum() / tokens)),
                "ci95": _ci(np.exp(boot) - np.exp(base_boot)), "type": "absolute"}
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------- speed
@dataclass(frozen=True)
class Generation:
    """One timed greedy generation."""

    prefill_s: float
    first_token_s: float  # prefill plus choosing the first new token
    decode_s: float  # the decode steps after the first new token
    prompt_tokens: int
    new_tokens: int
    tokens: tuple[int, ...]  # the generated ids (greedy: the same every round for one model)


class TorchGenerator:
    """Greedy generation with the KV cache on a Hugging Face ``*ForCausalLM`` (PyTorch eager)."""

    def __init__(self, model, threads: int) -> None:
        import inspect

        import torch

        torch.set_num_threads(threads)
        self.model = model.eval()
        self.threads = threads
        # transformers 5.x names the KV cache ``cache`` (``past_key_values`` is deprecated); 4.x does not
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def logits(self, ids: np.ndarray):
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        import torch

        ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64)[None, :])
        out_tokens: list[int] = []
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - start
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter() - start
            out_tokens.append(int(token))
            arg = self._cache_arg
            past = getattr(out, arg)
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=token, use_cache=True, **{arg: past})
                past = getattr(out, arg)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out_tokens.append(int(token))
            decode = time.perf_counter() - t0
        return Generation(prefill, first, decode, ids.shape[1], new_tokens, tuple(out_tokens))


def time_generation(generators: dict[str, Any], prompt: np.ndarray, *, new_tokens: int = 128, rounds: int = 5,
                    warmup: int = 1, resamples: int = 2000, seed: int = 0,
                    progress: Progress = SILENT) -> dict[str, dict[str, Any]]:
    """Interleaved greedy generations from ``prompt`` (see the module docstring); the first
    generator is the reference of the ratios."""
    from shrinkml.measure.stats import bootstrap_median_ci

    names = list(generators)
    for name in names:
        for _ in range(max(warmup, 0)):
            generators[name].generate(prompt, min(new_tokens, 8))
    runs: dict[str, list[Generation]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(generators[name].generate(prompt, new_tokens))
        progress.log(f"generation round {r + 1}/{rounds}")
    ref = names[0]

    def figures(gens: list[Generation]) -> dict[str, np.ndarray]:
        return {
            "prompt_tokens_per_s": np.array([g.prompt_tokens / g.prefill_s for g in gens]),
            "generation_tokens_per_s": np.array([(g.new_tokens - 1) / g.decode_s for g in gens]),
            "time_to_first_token_ms": np.array([1000.0 * g.first_token_s for g in gens]),
        }

    ref_fig = figures(runs[ref])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        fig = figures(runs[name])
        entry: dict[str, Any] = {"rounds": rounds, "prompt_tokens": int(len(prompt)), "new_tokens": new_tokens,
                                 "generated": list(runs[name][0].tokens)}
        for key, values in fig.items():
            med, lo, hi = bootstrap_median_ci(values, n_resamples=resamples, seed=seed)
            entry[key] = {"value": med, "ci95": [lo, hi], "samples": values.tolist()}
            if name != ref:
                ratio = values / ref_fig[key]  # per round: both timed in the same round
                med, lo, hi = bootstrap_median_ci(ratio, n_resamples=resamples, seed=seed)
                entry[f"{key}_ratio"] = {"value": med, "ci95": [lo, hi]}
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------- one model
def deployable_bytes(loaded) -> int:
    """Bytes of the input model as a user deploys it: the ``.gguf`` file, or every file of the
    causal-LM directory (weights, config, tokenizer)."""
    from pathlib import Path

    path = Path(loaded.source)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def artifact_bytes(path) -> int:
    """Bytes on disk of a written artifact: a file, or every file of a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def runtime_details(generator) -> dict[str, Any]:
    """How ``generator`` computes, for the report (llama.cpp's build and settings, or PyTorch's)."""
    if hasattr(generator, "describe"):
        return generator.describe()
    import torch

    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in generator.model.parameters()})
    return {"runtime": "torch", "version": torch.__version__, "mode": "eager, inference_mode, KV cache",
            "parameter_dtypes": dtypes, "threads": torch.get_num_threads()}


def assess_lm(loaded, splits, generator, *, runtime: str, repeats: int, seed: int, resamples: int,
              new_tokens: int = 128, progress: Progress = SILENT) -> dict[str, Any]:
    """The ``bench`` measurement of one causal LM on ``generator`` (a runtime's loaded model): size,
    parameters, perplexity on the test windows (CI over windows), greedy generation speed from a
    test-window prompt with the KV cache, and this process's peak resident memory while generating."""
    from shrinkml.data.lm import scored_tokens
    from shrinkml.measure.memory import _PeakSampler

    progress.log(f"perplexity on {len(splits.test)} test windows of {splits.test.x.shape[1]} tokens ({runtime})")
    quality = score_windows({"model": generator.logits}, splits.test, resamples=resamples, seed=seed,
                            progress=progress)["model"]
    prompt = splits.test.x[0]
    new_tokens = max(2, min(new_tokens, loaded.lm.context_length - len(prompt)))  # stay inside the context
    progress.log(f"greedy generation: {len(prompt)}-token prompt, {new_tokens} new tokens, {repeats} rounds")
    with _PeakSampler() as sampler:
        speed = time_generation({"model": generator}, prompt, new_tokens=new_tokens, rounds=repeats,
                                resamples=resamples, seed=seed, progress=progress)["model"]
    context = int(splits.test.x.shape[1])
    return {
        "runtime": runtime,
        "runtime_details": runtime_details(generator),
        "size_bytes": deployable_bytes(loaded),
        "params": int(sum(p.numel() for p in loaded.module.parameters())),  # tied tensors once
        "metrics": {"perplexity": quality["perplexity"]},
        "windows": {"count": quality["windows"], "context": context,
                    "scored_tokens": scored_tokens(splits.test.y, context)},
        "generation": {k: v for k, v in speed.items() if k != "generated"},
        "process_peak_rss_bytes": int(sampler.peak),
    }


def assess_lm_pair(generators: dict[str, Any], splits, *, context_length: int, repeats: int, seed: int,
                   resamples: int, new_tokens: int = 128, progress: Progress = SILENT) -> dict[str, Any]:
    """Baseline and compressed causal LMs (``{"baseline": g, "compressed": g}``, one runtime's loaded
    models) measured together: perplexity of both on the test windows, KL and top-1 agreement of
    the compressed against the baseline, and interleaved generation timing (ratios per round)."""
    progress.log(f"perplexity, KL and top-1 agreement on {len(splits.test)} test windows")
    quality = score_windows({k: g.logits for k, g in generators.items()}, splits.test, resamples=resamples,
                            seed=seed, progress=progress)
    prompt = splits.test.x[0]
    new_tokens = max(2, min(new_tokens, context_length - len(prompt)))
    progress.log(f"greedy generation, interleaved: {len(prompt)}-token prompt, {new_tokens} new tokens, {repeats} rounds")
    speed = time_generation(generators, prompt, new_tokens=new_tokens, rounds=repeats, resamples=resamples, seed=seed,
                            progress=progress)
    return {name: {"quality": quality[name], "generation": speed[name], "runtime_details": runtime_details(g)}
            for name, g in generators.items()}
