"""Search efficiency: trials per hour, and what the prefix cache and training pruning save.

The same search (demo CNN, the targets of ``benchmarks/search_demo.py``, the same seed and number of
trials) runs three times in one process: with the prefix cache and pruning on (the default), with
the cache off, and with both off. Each reports its wall time, trials per hour, the step time the
cache saved (the recorded compute time of every reused prefix) and the trials pruning stopped.
The samplers see different outcomes once a trial is pruned, so the three searches do not draw
exactly the same recipes; the wall times compare searches of equal length, not identical trials.

A replay then isolates each mechanism on identical work: every recipe the default search drew is
evaluated again, in the order drawn, by a fresh trial evaluator with the cache and pruning on and
off (four passes, one process), counting the seconds spent and the trials stopped in training.

    python3 benchmarks/search_efficiency.py --trials 40
    python3 benchmarks/search_efficiency.py --trials 6 --no-docs

Writes benchmarks/out/search_efficiency.json and the ``search_efficiency`` section of docs/benchmarks.md.
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

from common import DEMO_CNN as MODEL  # noqa: E402
from common import demo_cnn_search_setup, update_docs  # noqa: E402

VARIANTS = (("cache and pruning (default)", True, True), ("no cache", False, True), ("no cache, no pruning", False, False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "search_efficiency.json")
    args = ap.parse_args()

    from shrinkml.environment import environment
    from shrinkml.progress import Progress
    from shrinkml.recipe_search.run import search
    from shrinkml.settings import RunSettings

    progress = Progress(enabled=True)
    settings = RunSettings(threads=args.threads, seed=args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="search-eff-") as tmp:
        tmp = Path(tmp)
        weights, pipe, base, targets = demo_cnn_search_setup(tmp, seed=args.seed, settings=settings, progress=progress)
        drawn: list[list[dict]] = []
        for i, (label, cache, pruning) in enumerate(VARIANTS):
            started = time.time()
            result = search(MODEL, data="builtin:digits", weights=str(weights), out=tmp / f"s{i}",
                            max_size_bytes=targets["max_size_bytes"], max_latency_ms=targets["max_latency_ms"],
                            budget=targets["budget"], trials=args.trials, cache=cache, pruning=pruning, settings=settings,
                            progress=progress)
            wall = time.time() - started
            r = result.report
            trial_s = [row.get("seconds", 0.0) for row in r["all_trials"]]
            rows.append({
                "variant": label, "cache": cache, "pruning": pruning, "trials": r["trials"]["finished"],
                "search_s": r["duration_s"], "wall_s_with_final_report": round(wall, 1),
                "trials_per_hour": r["trials_per_hour"], "trial_seconds_total": round(sum(trial_s), 1),
                "steps_reused": r["cache"]["steps_reused"], "step_seconds_saved": r["cache"]["seconds_saved"],
                "stopped_by_pruning": r["pruning"]["trials_stopped"], "rejected_on_size": r["trials"]["not_feasible_because"].get("too large (rejected before timing)", 0),
                "repeated_recipes": r["trials"]["repeated_recipes"], "feasible": r["trials"]["feasible"],
                "best": r["best"]["recipe"] if r["best"] else None,
            })
            if i == 0:
                drawn = [row["recipe"] for row in r["all_trials"] if row.get("recipe")]
        replay = _replay(pipe, targets, drawn, tmp, progress)
    out = {"command": "python3 " + " ".join(shlex.quote(a) for a in sys.argv), "rows": rows, "replay": replay,
           "environment": environment(threads=args.threads, seed=args.seed)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(json.dumps({k: v for k, v in row.items() if k != "best"}))
    for row in replay:
        print(json.dumps(row))
    if not args.no_docs:
        env = out["environment"]
        lines = ["| variant | trials | search min | trials/hour | steps reused | step time saved (s) | stopped in training | rejected on size | repeated recipes | feasible |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['trials']} | {r['search_s'] / 60:.1f} | {r['trials_per_hour']} | {r['steps_reused']} |"
                         f" {r['step_seconds_saved']:.0f} | {r['stopped_by_pruning']} | {r['rejected_on_size']} | {r['repeated_recipes']} | {r['feasible']} |")
        replay_lines = ["| cache | pruning | recipes | seconds | steps reused | step time saved (s) | stopped in training | rejected on size |",
                        "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in replay:
            replay_lines.append(f"| {'on' if r['cache'] else 'off'} | {'on' if r['pruning'] else 'off'} | {r['recipes']} |"
                                f" {r['seconds']:.1f} | {r['steps_reused']} | {r['step_seconds_saved']:.1f} |"
                                f" {r['stopped_in_training']} | {r['rejected_on_size']} |")
        update_docs(ROOT / "docs" / "benchmarks.md", "search_efficiency", f"""## Search efficiency: the prefix cache and pruning (`benchmarks/search_efficiency.py`)

Command: `{out['command']}` on a 2-core {env['cpu']} ({', '.join(env['cpu_isa'])}), 2 threads; the demo CNN
with the targets of the section above, {args.trials} trials per search, seed {args.seed}, one process.
"step time saved" is the recorded compute time of the recipe prefixes the cache handed back instead
of recomputing; the samplers diverge once outcomes differ, so the rows are searches of equal
length, not the same trials.

{chr(10).join(lines)}

Replay of the {replay[0]['recipes'] if replay else 0} recipes the default search drew (same recipes, same order, one
process; "seconds" is the time spent in the evaluator, steps to scoring and timing):

{chr(10).join(replay_lines)}
""")
    return 0


def _replay(pipe, targets: dict, recipes: list[list[dict]], tmp: Path, progress) -> list[dict]:
    """Evaluate the same ``recipes`` with the cache and pruning on and off; seconds and counts."""
    from shrinkml.recipe_search.trial import Targets, TrialEvaluator, TrialStopped

    t = Targets(max_size_bytes=targets["max_size_bytes"], max_latency_ms=targets["max_latency_ms"], batch=1,
                budget=targets["budget"])
    out = []
    for cache, pruning in ((True, True), (False, True), (True, False), (False, False)):
        ev = TrialEvaluator(pipe, t, ("size", "latency", "metric"), cache_size=6 if cache else 0, pruning=pruning,
                            workdir=tmp / f"replay-{cache}-{pruning}")
        stopped, rejected, failed, reused, saved = 0, 0, 0, 0, 0.0
        started = time.perf_counter()
        for steps in recipes:
            try:
                ev.evaluate(steps)
            except TrialStopped as stop:
                stopped += stop.kind == "pruned"
                rejected += stop.kind == "size"
            except Exception as exc:  # a recipe that failed in the search fails here too; counted, not hidden
                failed += 1
                progress.log(f"replay: {steps} failed: {type(exc).__name__}: {str(exc)[:120]}")
            reused += ev.last_seconds.get("cached_steps", 0)
            saved += ev.last_seconds.get("saved_by_cache_s", 0.0)
        seconds = time.perf_counter() - started
        progress.log(f"replay cache={cache} pruning={pruning}: {len(recipes)} recipes in {seconds:.1f} s, {stopped} stopped")
        out.append({"cache": cache, "pruning": pruning, "recipes": len(recipes), "seconds": round(seconds, 2),
                    "steps_reused": reused, "step_seconds_saved": round(saved, 2), "stopped_in_training": stopped,
                    "rejected_on_size": rejected, "failed": failed})
    return out


if __name__ == "__main__":
    sys.exit(main())
