"""``shrinkml.search`` (this package: ``shrinkml.recipe_search``): targets in, the best recipe out, on one machine or many.

One search is one Optuna study of recipes drawn from the registered techniques
(``shrinkml.recipe_search.space``), each trial applied and measured on the validation split
(``shrinkml.recipe_search.trial``). At the end the best feasible trial's recipe is run as a full
``compress`` (``Pipeline.run``), which measures it on the test split: the only read of the test split
in a search. The output folder holds ``search.{json,md,html}`` (trials, Pareto front, plots),
``best/`` (the compressed model, its report and ``recipe.yaml``) and the study itself
(``study.journal``), committed whole like every output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shrinkml.budget import Budget
from shrinkml.errors import InputError, ShrinkmlError
from shrinkml.progress import SILENT, Progress
from shrinkml.recipe_search.trial import OBJECTIVES, Targets, TrialStopped
from shrinkml.settings import RunSettings

JOURNAL = "study.journal"
DEFAULT_STUDY = "shrinkml-search"
SCHEMA = "shrinkml.search/1"
MAX_CONSECUTIVE_FAILURES = 5
MAX_REPEATS = 20  # a worker stops after this many trials in a row that only redrew measured recipes


class SearchRequest(BaseModel):
    """Everything a worker process needs to join the search (JSON, so workers can be spawned)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    data: str
    weights: str | None = None
    task: str = "classification"
    settings: RunSettings = RunSettings()
    max_size_bytes: int | None = Field(None, ge=1)
    max_latency_ms: float | None = Field(None, gt=0)
    min_throughput: float | None = Field(None, gt=0)
    batch: int = Field(1, ge=1)
    budget: Budget = Budget()
    objectives: tuple[str, ...] = ()
    prefer: str | None = None
    trials: int | None = Field(None, ge=1)
    time_budget_s: float | None = Field(None, gt=0)
    space: str | None = None
    sampler: str = "tpe"
    storage: str | None = None
    study: str = DEFAULT_STUDY
    workers: int = Field(1, ge=1, le=64)
    cache: bool = True
    pruning: bool = True

    def targets(self) -> Targets:
        return Targets(self.max_size_bytes, self.max_latency_ms, self.min_throughput, self.batch, self.budget)

    def chosen_objectives(self) -> tuple[str, ...]:
        if self.objectives:
            return self.objectives
        return ("size", "throughput" if self.min_throughput is not None else "latency", "metric")

    def chosen_prefer(self) -> str:
        objectives = self.chosen_objectives()
        if self.prefer:
            return self.prefer
        for name in ("latency", "throughput", "size"):
            if name in objectives and (name == "size" or getattr(self, {"latency": "max_latency_ms",
                                                                          "throughput": "min_throughput"}[name])):
                return name
        return objectives[0]


def check_request(r: SearchRequest) -> None:
    """Refuse, before any work, a search that cannot run."""
    if r.trials is None and r.time_budget_s is None:
        raise InputError("a search needs a stopping rule", where="shrinkml search",
                         expected="--trials N or --time-budget (e.g. 30m)", fix="add --trials 20 or --time-budget 30m")
    for name in r.objectives:
        if name not in OBJECTIVES:
            raise InputError(f"unknown objective {name!r}", where="--objectives", expected=", ".join(OBJECTIVES),
                             fix="name objectives from that list, comma-separated")
    if len(set(r.objectives)) != len(r.objectives):
        raise InputError("an objective is named twice", where="--objectives", found=",".join(r.objectives),
                         fix="name each objective once")
    if "latency" in r.chosen_objectives() and "throughput" in r.chosen_objectives():
        raise InputError("latency and throughput are the same measurement", where="--objectives",
                         fix="optimise one of them")
    if r.prefer is not None and r.prefer not in r.chosen_objectives():
        raise InputError(f"--prefer {r.prefer} is not one of the objectives", where="--prefer",
                         expected=", ".join(r.chosen_objectives()), fix="prefer one of the objectives")
    if r.sampler not in ("tpe", "nsga2"):
        raise InputError(f"unknown sampler {r.sampler!r}", where="--sampler", expected="tpe or nsga2",
                         fix="pass --sampler tpe (the default) or nsga2")


@dataclass
class SearchResult:
    """What ``search`` returns: the search report, the best recipe (or None) and the written files."""

    report: dict[str, Any]
    best_recipe: list[dict] | None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return bool(self.report["met"])


# ---------------------------------------------------------------------------- one worker's session

class _Session:
    """A prepared pipeline, its trial evaluator, the space and the joined study."""

    def __init__(self, request: SearchRequest, workdir: Path, journal: Path | None, *, worker: int,
                 must_exist: bool, progress: Progress, deadline: float | None, prepared=None) -> None:
        from shrinkml.pipeline import Pipeline
        from shrinkml.recipe_search import study as st
        from shrinkml.recipe_search.space import build_space, load_space_file
        from shrinkml.recipe_search.trial import TrialEvaluator

        self.request, self.progress, self.deadline = request, progress, deadline
        space_file = load_space_file(request.space) if request.space else None
        self.pipe = prepared or Pipeline.prepare(request.model, data=request.data, task=request.task,
                                                 weights=request.weights, settings=request.settings, progress=progress)
        self.space = build_space(self.pipe.prepared.loaded, request.settings.runtime, space_file,
                                 where=request.space or "search space")
        self.objectives = request.chosen_objectives()
        workdir.mkdir(parents=True, exist_ok=True)
        if self.pipe.prepared.task.causal_lm:
            from shrinkml.recipe_search.lm_trial import LMTrialEvaluator

            self.evaluator = LMTrialEvaluator(self.pipe, request.targets(), self.objectives,
                                              cache_size=2 if request.cache else 0, workdir=workdir)
        else:
            self.evaluator = TrialEvaluator(self.pipe, request.targets(), self.objectives,
                                            cache_size=6 if request.cache else 0, pruning=request.pruning, workdir=workdir)
        self.store = st.storage(journal, request.storage)
        directions = [OBJECTIVES[o] for o in self.objectives]
        sampler = st.sampler(request.sampler, request.settings.seed + worker, request.trials)
        where = f"--storage {st._safe_url(request.storage)} --study {request.study}" if request.storage else str(journal)
        self.study = st.open_study(self.store, request.study, directions, self.fingerprint(), sampler,
                                   must_exist=must_exist, where=where)
        self.failures = 0
        self.repeats = 0  # trials in a row that drew an already measured recipe
        self.converged = False
        self.last_error = ""

    def fingerprint(self) -> dict[str, Any]:
        r = self.request
        return {
            "model": r.model, "weights": r.weights, "data": r.data, "task": r.task,
            "runtime": r.settings.runtime, "threads": r.settings.threads, "seed": r.settings.seed,
            "targets": r.targets().describe(), "objectives": list(self.objectives),
            "space": self.space.describe(),
        }

    def objective(self, trial):
        from shrinkml.report.json_report import to_jsonable
        from shrinkml.recipe_search import study as st

        optuna = st.optuna_module()
        trial.set_user_attr("worker", st.worker_tag())
        steps = self.space.suggest(trial)
        trial.set_user_attr("recipe", to_jsonable(steps))
        same = self._measured_before(trial)
        if same is not None:  # the sampler drew a recipe already tried: same steps, same seed, same result
            self.repeats += 1
            trial.set_user_attr("duplicate_of", same.number)
            if same.state == st_states().PRUNED:  # stopped early, refused, too large: the same again
                stopped = same.user_attrs["stopped"]
                trial.set_user_attr("stopped", stopped)
                trial.set_user_attr("details", same.user_attrs.get("details"))
                for key in self.evaluator.targets.constraint_names():
                    trial.set_constraint(key, 1.0)
                raise optuna.TrialPruned(stopped["reason"])
            for key in ("constraints", "measured", "details"):
                trial.set_user_attr(key, same.user_attrs.get(key))
            for key, value in same.user_attrs.get("constraints", {}).items():
                trial.set_constraint(key, float(value))
            return list(same.values)
        self.repeats = 0
        try:
            try:
                self.evaluator.check_recipe(steps)
                outcome = self.evaluator.evaluate(steps, label=f"trial-{trial.number}")
            except InputError as exc:
                # a step refused what the steps before it made (share.embeddings after a quantizer that
                # turned the tables into integers, say): the sampled steps do not compose. Infeasible
                # and said so, not a failure: the space holds other recipes worth trying.
                reason = f"the steps do not compose: {(str(exc).strip().splitlines() or [''])[0][:300]}"
                raise TrialStopped(reason, "incompatible") from None
        except TrialStopped as stop:
            trial.set_user_attr("stopped", {"kind": stop.kind, "reason": stop.reason})
            trial.set_user_attr("details", {"seconds": dict(self.evaluator.last_seconds),
                                            "intermediate": list(getattr(stop, "intermediate", []))})
            for key in self.evaluator.targets.constraint_names():
                trial.set_constraint(key, 1.0)
            self.failures = 0
            raise optuna.TrialPruned(stop.reason) from None
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # a sampled recipe the model cannot take, or a step's own failure
            message = (str(exc).strip().splitlines() or [""])[0][:400]
            trial.set_user_attr("error", f"{type(exc).__name__}: {message}")
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {message}"
            raise _TrialFailed(message) from exc
        self.failures = 0
        for key, value in outcome.constraints.items():
            trial.set_constraint(key, float(value))
        trial.set_user_attr("constraints", to_jsonable(outcome.constraints))
        trial.set_user_attr("measured", to_jsonable(outcome.values))
        trial.set_user_attr("details", to_jsonable(outcome.details))
        return [float(outcome.values[o]) for o in self.objectives]

    def _measured_before(self, trial):
        """A finished trial of this study with the same recipe, if any: complete with its values, or
        stopped early with its reason (steps are deterministic for a seed, so either outcome would
        repeat). Read from the storage, so a recipe another worker tried counts too."""
        recipe = trial.user_attrs.get("recipe") if hasattr(trial, "user_attrs") else None
        states = st_states()
        for other in self.study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)):
            if other.number == trial.number or other.user_attrs.get("recipe") != recipe:
                continue
            stopped = other.user_attrs.get("stopped", {})
            if stopped.get("kind") == "pruned" and not self.request.pruning:
                continue  # stopped by the training rule, which this run turned off: measure it
            if (other.state == states.COMPLETE and other.values) or stopped:
                return other
        return None

    def run(self, on_trial=None) -> None:
        from shrinkml.recipe_search import study as st

        def guard(study, trial) -> None:
            if self.failures >= MAX_CONSECUTIVE_FAILURES:
                study.stop()
            if self.repeats >= MAX_REPEATS:  # the sampler only redraws measured recipes: the space is spent
                self.converged = True
                study.stop()
            if on_trial is not None:
                on_trial(study, trial)

        st.run_trials(self.study, self.objective, n_trials=self.request.trials, deadline=self.deadline,
                      catch=(_TrialFailed,), callbacks=[guard])
        if self.failures >= MAX_CONSECUTIVE_FAILURES:
            raise ShrinkmlError(
                f"the search stopped: {self.failures} trials in a row failed, the last with {self.last_error}."
                " Rerun with --debug, or narrow the space with --space to leave the failing technique out"
            )


def st_states():
    from shrinkml.recipe_search.study import optuna_module

    return optuna_module().trial.TrialState


class _TrialFailed(Exception):
    """A trial whose recipe could not be applied or measured (recorded on the trial)."""


# ---------------------------------------------------------------------------- workers

def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn_workers(request: SearchRequest, n: int, workdir: Path, journal: Path | None, deadline: float | None):
    spec = workdir / "worker-request.json"
    spec.write_text(json.dumps({"request": request.model_dump(mode="json"), "journal": str(journal) if journal else None,
                                "deadline": deadline}), encoding="utf-8")
    procs = []
    for i in range(1, n):
        log = open(workdir / f"worker-{i}.log", "wb")
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "shrinkml.recipe_search.worker", str(spec), str(i), str(workdir / f"worker-{i}")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            cwd=os.getcwd(),
        ), log))
    return procs


def _stop_workers(procs) -> None:
    for proc, log in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc, log in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# ---------------------------------------------------------------------------- the search

def _fmt_trial(trial, objectives) -> str:
    values = dict(zip(objectives, trial.values or []))
    parts = []
    if "size" in values:
        parts.append(f"{values['size'] / 1e6:.3g} MB")
    if "latency" in values:
        parts.append(f"{values['latency']:.3g} ms")
    if "throughput" in values:
        parts.append(f"{values['throughput']:.4g}/s")
    if "metric" in values:
        parts.append(f"metric {values['metric']:.4f}")
    return ", ".join(parts)


def _progress_callback(session: _Session, started: float, deadline: float | None, total: int | None):
    from shrinkml.recipe_search import study as st

    def report(study, trial) -> None:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state.is_finished() for t in trials)
        best, _ = st.choose_best(trials, session.objectives, session.request.chosen_prefer())
        what = {"COMPLETE": "feasible" if st.feasible(trial) else "infeasible", "PRUNED": "stopped early",
                "FAIL": "failed"}.get(trial.state.name, trial.state.name.lower())
        if trial.state.name == "COMPLETE":
            what += f" ({_fmt_trial(trial, session.objectives)})"
        elif trial.state.name == "PRUNED":
            what += f" ({trial.user_attrs.get('stopped', {}).get('reason', '')})"
        elif trial.state.name == "FAIL":
            what += f" ({trial.user_attrs.get('error', '')[:120]})"
        left = ""
        if deadline is not None:
            left = f", {max(0.0, deadline - time.time()) / 60:.1f} min left"
        count = f"{done}/{total}" if total else f"{done}"
        best_text = f"best feasible: trial {best.number} ({_fmt_trial(best, session.objectives)})" if best else "no feasible trial yet"
        session.progress.log(f"trial {trial.number}: {what}; {count} trials done{left}; {best_text}")

    return report


def _capture(workdir: Path):
    class Capture:
        """Stands in for an output folder: ``Pipeline.run`` writes into ``workdir`` and hands us its files."""

        def __init__(self) -> None:
            self.workdir = workdir
            self.files: dict[str, Any] = {}

        def commit(self, files):
            self.files = dict(files)
            return {name: workdir / name for name in files}

    workdir.mkdir(parents=True, exist_ok=True)
    return Capture()


def _prefixed(files: dict[str, Any], prefix: str) -> dict[str, Any]:
    from shrinkml.packaging.output import SameAs

    return {f"{prefix}/{name}": SameAs(f"{prefix}/{content.name}") if isinstance(content, SameAs) else content
            for name, content in files.items()}


def search(
    model: str,
    *,
    data: str,
    out: str | Path,
    task: str = "classification",
    weights: str | None = None,
    max_size_bytes: int | None = None,
    max_latency_ms: float | None = None,
    min_throughput: float | None = None,
    batch: int = 1,
    budget: Budget | None = None,
    objectives: tuple[str, ...] = (),
    prefer: str | None = None,
    trials: int | None = None,
    time_budget_s: float | None = None,
    space: str | Path | None = None,
    sampler: str = "tpe",
    storage: str | None = None,
    study: str = DEFAULT_STUDY,
    workers: int = 1,
    resume: bool = False,
    cache: bool = True,
    pruning: bool = True,
    settings: RunSettings | None = None,
    progress: Progress | None = None,
    enqueue: list[dict[str, Any]] | None = None,
) -> SearchResult:
    """Search recipes for ``model`` under the targets; write the study, the Pareto front and the best
    recipe's full ``compress`` result to ``out``. ``enqueue``: trials' parameters (Optuna names, e.g.
    ``{"stage__structure": "prune.channels", "prune.channels__channel_ratio": 0.5, ...}``) to run first. ``result.met`` is False when no trial was feasible or
    the best one missed a target when re-measured on the test split (the report is written anyway).

    >>> result = search("mypkg:make_net", weights="net.safetensors", data="data.npz", out="search-out",
    ...                 max_size_bytes=10_000_000, max_latency_ms=50, trials=30)  # doctest: +SKIP
    """
    from shrinkml.packaging.output import MARKER, MARKER_SCHEMA, OutputFolder

    progress = progress or SILENT
    request = SearchRequest(
        model=str(model), data=str(data), weights=None if weights is None else str(weights), task=task,
        settings=settings or RunSettings(), max_size_bytes=max_size_bytes, max_latency_ms=max_latency_ms,
        min_throughput=min_throughput, batch=batch, budget=budget or Budget(), objectives=tuple(objectives),
        prefer=prefer, trials=trials, time_budget_s=time_budget_s, space=None if space is None else str(space),
        sampler=sampler, storage=storage, study=study, workers=workers, cache=cache, pruning=pruning,
    )
    check_request(request)
    inputs = {"--model": model, "--weights": weights, "--data": data, "--space": space}
    with OutputFolder(out, inputs) as folder:
        journal = None if storage else folder.out / JOURNAL
        if journal is not None:
            if journal.exists() and not resume:
                raise InputError(
                    "the output folder holds a search study already", where=f"--out {out}",
                    found=f"{JOURNAL} ({journal.stat().st_size:,} bytes)",
                    fix="pass --resume to continue that search, or another --out for a new one",
                )
            if resume and not journal.exists():
                raise InputError("there is no search to resume in the output folder", where=f"--out {out}",
                                 expected=f"{JOURNAL} from an earlier search", fix="run without --resume")
            if not journal.exists():  # a live study, resumable after a crash: the folder is shrinkml's
                created = not folder.out.exists()
                folder.out.mkdir(parents=True, exist_ok=True)
                marker = folder.out / MARKER
                if not marker.exists():
                    marker.write_text(json.dumps({"schema": MARKER_SCHEMA, "files": {}, "search_in_progress": True}),
                                      encoding="utf-8")
                    try:
                        return _search_in(request, folder, journal, resume, storage, workers, enqueue, trials,
                                          time_budget_s, progress)
                    except BaseException:
                        # refused before any trial was stored (bad model, data or space): leave nothing
                        if not journal.exists() or journal.stat().st_size == 0:
                            journal.unlink(missing_ok=True)
                            marker.unlink(missing_ok=True)
                            if created and not any(folder.out.iterdir()):
                                folder.out.rmdir()
                        raise
        return _search_in(request, folder, journal, resume, storage, workers, enqueue, trials, time_budget_s,
                          progress)


def _search_in(request, folder, journal, resume, storage, workers, enqueue, trials, time_budget_s,
               progress) -> SearchResult:
    """The search proper, inside the locked output folder (see ``search``)."""
    started = time.time()
    deadline = None if time_budget_s is None else started + time_budget_s
    from shrinkml.recipe_search import study as st

    if storage:
        st.storage(None, storage)  # a new database's tables, made once before the workers join
    # the other workers load the model and data while this one does: all start trials together
    procs = _spawn_workers(request, workers, folder.workdir, journal, deadline) if workers > 1 else []
    try:
        session = _Session(request, folder.workdir / "worker-0", journal, worker=0,
                           must_exist=resume and storage is None, progress=progress, deadline=deadline)
        lost = st.fail_lost_trials(session.study)
        if lost:
            progress.log(f"resuming: {lost} trial(s) that were running when the search stopped are marked failed")
        before = len(session.study.get_trials(deepcopy=False))
        for params in enqueue or ():
            session.study.enqueue_trial(params, skip_if_exists=True)
        progress.log(f"search space: {json.dumps(session.space.describe()['stages'])}")
        session.run(_progress_callback(session, started, deadline, trials))
        if procs:
            progress.log(f"waiting for {len(procs)} other worker(s) to finish their trials")
            for i, (proc, log) in enumerate(procs, start=1):
                if proc.wait() != 0:
                    tail = Path(log.name).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                    progress.log(f"worker {i} exited with code {proc.returncode}: {' | '.join(tail)[:600]}")
    finally:
        _stop_workers(procs)
    duration = time.time() - started
    report, best_steps, best_files = _finish(session, folder.workdir / "best", duration=duration, lost=lost,
                                              trials_before=before, resumed=resume)
    files: dict[str, Any] = {"search.json": json.dumps(report, indent=2) + "\n"}
    from shrinkml.report.search import render_search_html, render_search_markdown

    files["search.md"] = render_search_markdown(report)
    files["search.html"] = render_search_html(report)
    if journal is not None:
        files[JOURNAL] = journal
    files.update(_prefixed(best_files, "best"))
    written = folder.commit(files)
    return SearchResult(report, best_steps, written)


def _trial_row(t, objectives) -> dict[str, Any]:
    from shrinkml.recipe_search import study as st

    row: dict[str, Any] = {"number": t.number, "state": t.state.name.lower(), "recipe": t.user_attrs.get("recipe")}
    if t.state.name == "COMPLETE":
        row["values"] = dict(zip(objectives, t.values))
        row["constraints"] = t.user_attrs.get("constraints", {})
        row["feasible"] = st.feasible(t)
    if "details" in t.user_attrs:
        row["details"] = t.user_attrs["details"]
    for key in ("stopped", "error", "lost", "duplicate_of"):
        if key in t.user_attrs:
            row[key] = t.user_attrs[key]
    if t.datetime_start and t.datetime_complete:
        row["seconds"] = round((t.datetime_complete - t.datetime_start).total_seconds(), 3)
    return row


def _why(t) -> str:
    """Why a trial is not feasible, in a word or two."""
    if t.state.name == "COMPLETE":
        broken = [k for k, v in t.user_attrs.get("constraints", {}).items() if v > 0]
        return "breaks " + " and ".join(broken) if broken else "feasible"
    if t.state.name == "PRUNED":
        kind = t.user_attrs.get("stopped", {}).get("kind", "pruned")
        return {"size": "too large (rejected before timing)", "pruned": "stopped early (training)",
                "empty": "no step sampled", "incompatible": "steps do not compose"}.get(kind, kind)
    if t.state.name == "FAIL":
        return "lost (worker stopped)" if "lost" in t.user_attrs else "failed: " + t.user_attrs.get("error", "?")[:80]
    return t.state.name.lower()


def _finish(session: _Session, best_dir: Path, *, duration: float, lost: int, trials_before: int, resumed: bool):
    """Choose the best trial, re-measure it on the test split (a full compress run), build the report."""
    from shrinkml.recipe_search import study as st
    from shrinkml.recipe_search.trial import OBJECTIVES as DIRS

    r, objectives = session.request, session.objectives
    trials = [t for t in session.study.get_trials(deepcopy=False) if t.state.is_finished()]
    prefer = r.chosen_prefer()
    best, front = st.choose_best(trials, objectives, prefer)
    why = Counter(_why(t) for t in trials if not st.feasible(t))
    states = Counter(t.state.name.lower() for t in trials)
    details = [t.user_attrs.get("details", {}).get("seconds", {}) for t in trials if "details" in t.user_attrs]
    saved = sum(d.get("saved_by_cache_s", 0.0) for d in details)
    cached_steps = sum(t.user_attrs.get("details", {}).get("seconds", {}).get("cached_steps", 0) for t in trials)
    finished_here = len(trials) - trials_before
    s = session.pipe.settings
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {"source": r.model, "weights": r.weights},
        "task": r.task,
        "data": {"source": session.pipe.prepared.splits.source, "splits": session.pipe.prepared.splits.sizes(),
                 "trials_scored_on": "validation", "final_report_on": "test"},
        "runtime": {"name": s.runtime, "threads": s.threads, "batch": r.batch},
        "targets": r.targets().describe(),
        "objectives": {o: DIRS[o] for o in objectives},
        "prefer": prefer,
        "sampler": r.sampler,
        "storage": st._safe_url(r.storage) if r.storage else JOURNAL,
        "study": r.study,
        "space": session.space.describe(),
        "baseline_validation": session.evaluator.baseline,
        "trials": {
            "finished": len(trials), "this_run": finished_here, "resumed": resumed, "lost_when_resumed": lost,
            "complete": states.get("complete", 0), "feasible": sum(st.feasible(t) for t in trials),
            "stopped_early": states.get("pruned", 0), "failed": states.get("fail", 0),
            "repeated_recipes": sum("duplicate_of" in t.user_attrs for t in trials),
            "not_feasible_because": dict(why.most_common()),
        },
        "duration_s": round(duration, 1),
        "stopped_because": ("converged: the sampler redrew only measured recipes "
                            f"{MAX_REPEATS} times in a row" if session.converged else
                            "time budget" if session.deadline is not None and time.time() >= session.deadline else
                            "trial count"),
        "trials_per_hour": round(3600 * finished_here / duration) if duration > 0 else None,
        "measured_per_hour": round(3600 * sum(1 for t in trials[-finished_here:] if "duplicate_of" not in t.user_attrs)
                                   / duration) if duration > 0 and finished_here > 0 else None,
        "cache": {"enabled": r.cache, "steps_reused": cached_steps, "seconds_saved": round(saved, 1)},
        "pruning": {"enabled": r.pruning, "trials_stopped": sum(
            1 for t in trials if t.user_attrs.get("stopped", {}).get("kind") == "pruned" and "duplicate_of" not in t.user_attrs)},
        "front": [_trial_row(t, objectives) for t in front],
        "all_trials": [_trial_row(t, objectives) for t in trials if "duplicate_of" not in t.user_attrs],
        "repeats_of": dict(Counter(str(t.user_attrs["duplicate_of"]) for t in trials if "duplicate_of" in t.user_attrs)),
        "best": None,
        "met": False,
    }
    if best is None:
        session.progress.log("no feasible trial: nothing to re-measure on the test split")
        return report, None, {}
    steps = best.user_attrs["recipe"]
    session.progress.log(f"best feasible trial {best.number}: {_fmt_trial(best, objectives)}; re-measuring it on"
                         " the test split with a full compress run")
    final_settings = s.model_copy(update={"batch_n": r.batch}) if r.batch >= 2 else s
    pipe = session.pipe
    if final_settings is not s:
        from dataclasses import replace

        from shrinkml.pipeline import Pipeline

        pipe = Pipeline(replace(session.pipe.prepared, settings=final_settings), session.progress)
    capture = _capture(best_dir)
    final, _, files = pipe.run(steps, folder=capture, budget=r.budget)
    if pipe.prepared.task.causal_lm:
        from shrinkml.recipe_search.lm_trial import lm_test_figures

        test, checks = lm_test_figures(final, r)
        report["best"] = {"trial": best.number, "recipe": steps, "validation": dict(zip(objectives, best.values)),
                          "test": test, "report": "best/report.json"}
        report["met"] = all(checks.values())
        return report, steps, capture.files
    key = "batch_1" if r.batch == 1 else "batch_n"
    comp = final["compressed"]
    checks = {"budget": bool(final["budget"]["met"])}
    if r.max_size_bytes is not None:
        checks["size"] = comp["size_bytes"] <= r.max_size_bytes
    worst_ms = comp["latency_ms"][key]["p50_ci95"][1]  # met only when the CI's worst end is within the target
    if r.max_latency_ms is not None:
        checks["latency"] = worst_ms <= r.max_latency_ms
    if r.min_throughput is not None:
        checks["throughput"] = r.batch * 1000.0 / worst_ms >= r.min_throughput
    report["best"] = {
        "trial": best.number, "recipe": steps, "validation": dict(zip(objectives, best.values)),
        "test": {
            "size_bytes": comp["size_bytes"], "latency_ms_p50": comp["latency_ms"][key]["p50"],
            "latency_ms_p50_ci95": comp["latency_ms"][key]["p50_ci95"],
            "throughput_per_s": comp["throughput_per_s"][key],
            "metric": final["budget"]["metric"], "metrics": comp["metrics"],
            "drop": final["delta"]["accuracy_drop"], "speedup": final["delta"][f"speedup_{key}"],
            "size_ratio": final["delta"]["size_ratio"],
            "targets_met": checks,
        },
        "report": "best/report.json",
    }
    report["met"] = all(checks.values())
    return report, steps, capture.files
