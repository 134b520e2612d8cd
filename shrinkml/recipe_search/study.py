"""The Optuna study behind a search: its storage, its workers, and the choice of the best trial.

* Storage: by default Optuna's journal file in the output folder (``OUT/study.journal``), which
  needs no server, takes several processes on one machine, and survives a crash: ``--resume``
  continues it. ``--storage URL`` (PostgreSQL, MySQL, SQLite) uses Optuna's RDB storage, which is
  how any number of workers on any number of machines join one study; a heartbeat marks the trials
  of a killed worker failed.
* Objectives are Optuna directions; constraints (<= 0 satisfied) reach the sampler through
  ``Trial.set_constraint``, so an infeasible trial is infeasible, not penalised.
* A worker runs trials until the study holds the requested number (all workers' together) or its
  time is up; it starts no trial after the deadline.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from shrinkml.errors import InputError

FINGERPRINT_ATTR = "shrinkml.search"


def optuna_module():
    try:
        import optuna
    except ImportError:
        raise InputError(
            "shrinkml search needs Optuna, which is not installed",
            where="shrinkml search", fix="pip install 'shrinkml[search]' (or 'shrinkml[postgres]' for --storage postgresql://)",
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # shrinkml reports each trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage(journal: Path | None, url: str | None):
    """Optuna storage: the RDB at ``url``, else the journal file ``journal``."""
    optuna = optuna_module()
    if url:
        try:
            return _rdb(optuna, url)
        except ImportError as exc:
            raise InputError(f"the storage driver is not installed ({exc})", where=f"--storage {_safe_url(url)}",
                             fix="pip install 'shrinkml[postgres]' for postgresql:// URLs") from None
        except Exception as exc:  # sqlalchemy's OperationalError, ArgumentError, ...
            raise InputError(f"cannot open the study storage: {str(exc).splitlines()[0][:300]}",
                             where=f"--storage {_safe_url(url)}",
                             expected="a reachable database URL, e.g. postgresql://user@host/db",
                             fix="check the URL, that the server runs and that the user may connect") from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(journal)))


def _rdb(optuna, url: str, attempts: int = 5):
    """Optuna's RDB storage at ``url``. Workers that start together on a new database race to create
    its tables; the loser's IntegrityError is retried (the tables are there by then)."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=10, grace_period=40)
        except Exception as exc:
            if "IntegrityError" not in type(exc).__name__ or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _safe_url(url: str) -> str:
    """``url`` with any password hidden, for messages."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def constraints_of(trial) -> dict[str, float]:
    """The trial's constraint values by name (<= 0 satisfied); set on Optuna's trial too
    (``Trial.set_constraint``), which is how its samplers tell feasible trials apart."""
    return dict(trial.user_attrs.get("constraints", {}))


def sampler(name: str, seed: int, trials: int | None):
    optuna = optuna_module()
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=max(4, min(20, (trials or 40) // 4)), seed=seed)
    startup = max(4, min(10, (trials or 30) // 3))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup)


def open_study(store, name: str, directions: list[str], fingerprint: dict[str, Any], chosen_sampler, *,
               must_exist: bool, where: str):
    """Create or join study ``name``; refuse one made for a different search."""
    optuna = optuna_module()
    existing = {s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)}
    if must_exist and name not in existing:
        raise InputError(f"there is no study {name!r} to resume", where=where,
                         fix="run without --resume to start the search")
    study = optuna.create_study(storage=store, study_name=name, directions=directions, sampler=chosen_sampler,
                                load_if_exists=True)
    found = study.user_attrs.get(FINGERPRINT_ATTR)
    if found is None:
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
    elif found != fingerprint:
        differs = sorted(k for k in set(found) | set(fingerprint) if found.get(k) != fingerprint.get(k))
        raise InputError(
            f"study {name!r} belongs to another search: {', '.join(differs)} differ",
            where=where, expected="the same model, data, task, runtime, targets, objectives and space",
            found="; ".join(f"{k}: {json.dumps(found.get(k))[:80]} there, {json.dumps(fingerprint.get(k))[:80]} here"
                            for k in differs[:3]),
            fix="give the same options as the run that started it, or another --study / --out",
        )
    return study


def worker_tag() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_lost_trials(study) -> int:
    """Mark failed the running trials of this machine's dead workers (a killed run's); return how
    many. Trials of live workers, or of other machines, are left alone."""
    optuna = optuna_module()
    host, lost = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tag = t.user_attrs.get("worker") or {}
        if tag.get("host") == host and not _alive(int(tag.get("pid", -1))):
            study._storage.set_trial_user_attr(t._trial_id, "lost", "its worker stopped (killed?) while it ran")
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            lost += 1
    return lost


def counts(study) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False)))


def feasible(trial) -> bool:
    constraints = constraints_of(trial)
    return trial.state.name == "COMPLETE" and bool(constraints) and all(c <= 0 for c in constraints.values())


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    better = False
    for x, y, d in zip(a, b, directions):
        x, y = (x, y) if d == "minimize" else (-x, -y)
        if x > y:
            return False
        better = better or x < y
    return better


def pareto(trials: list, directions: list[str]) -> list:
    """The trials no other trial of ``trials`` dominates, in trial order."""
    return [t for t in trials if not any(_dominates(o.values, t.values, directions) for o in trials if o is not t)]


def choose_best(trials: list, objectives: tuple[str, ...], prefer: str):
    """Of the feasible Pareto trials, the best by ``prefer`` (an objective), then by metric, then the
    earliest: deterministic for a given set of trials."""
    from shrinkml.recipe_search.trial import OBJECTIVES

    directions = [OBJECTIVES[o] for o in objectives]
    measured = [t for t in trials if "duplicate_of" not in t.user_attrs]  # a redrawn recipe is its first trial
    front = pareto([t for t in measured if feasible(t)], directions)
    if not front:
        return None, front

    def key(t):
        values = dict(zip(objectives, t.values))
        sign = 1 if OBJECTIVES[prefer] == "minimize" else -1
        metric = -values["metric"] if "metric" in values else 0.0
        return (sign * values[prefer], metric, t.number)

    return min(front, key=key), front


def run_trials(study, objective, *, n_trials: int | None, deadline: float | None, catch: tuple, callbacks=()) -> None:
    """Trials until the study holds ``n_trials`` (every worker's) or ``deadline`` (epoch seconds)."""
    optuna = optuna_module()
    TS = optuna.trial.TrialState
    started = (TS.COMPLETE, TS.PRUNED, TS.FAIL, TS.RUNNING)  # enqueued (waiting) trials are still to run
    if n_trials is not None and len(study.get_trials(deepcopy=False, states=started)) >= n_trials:
        return
    timeout = None if deadline is None else deadline - time.time()
    if timeout is not None and timeout <= 0:
        return
    stops = [optuna.study.MaxTrialsCallback(n_trials, states=started)] if n_trials is not None else []
    study.optimize(objective, timeout=timeout, catch=catch, callbacks=[*stops, *callbacks], gc_after_trial=False)
