"""Searches that outlive one process: a killed search resumes from its journal, and two workers share
one study on a real PostgreSQL server (``postgres_url`` in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shrinkml.cli import main

MODEL = "shrinkml.examples.demo:digits_mlp"
SPACE = """\
stages:
  structure: [none, prune.channels]
  quantize: [quantize.dynamic, quantize.static]
params:
  prune.channels__channel_ratio: {choices: [0.25, 0.5, 0.75]}
  finetune__epochs: 4
  finetune__lr: 0.003
"""


@pytest.fixture(scope="module")
def project(mlp_weights):
    """The trained MLP's folder, with a small search space file."""
    (mlp_weights.parent / "space.yaml").write_text(SPACE)
    return mlp_weights.parent


def _args(project, out, *extra):
    return ["search", "--model", MODEL, "--weights", str(project / "mlp.safetensors"), "--data", "builtin:digits",
            "--out", str(out), "--space", str(project / "space.yaml"), "--threads", "1", "--repeats", "10",
            "--objectives", "size,metric", "--max-drop", "0.05", *extra]


def _journal_trials(path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name="shrinkml-search", storage=storage).get_trials(deepcopy=False)


def test_a_killed_search_resumes_and_loses_at_most_the_running_trial(project, tmp_path):
    out = tmp_path / "out"
    # every trial trains for a second or more, so the kill lands mid-search even on a loaded machine
    (tmp_path / "space.yaml").write_text(SPACE.replace("[none, prune.channels]", "[prune.channels]")
                                         .replace("finetune__epochs: 4", "finetune__epochs: 20"))
    args = _args(project, out, "--trials", "8")
    args[args.index("--space") + 1] = str(tmp_path / "space.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "shrinkml.cli", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal = out / "study.journal"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if journal.exists() and sum(t.state.name == "COMPLETE" for t in _journal_trials(journal)) >= 1:
                break
            assert proc.poll() is None, "the search ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no trial completed within 240 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {t.number: t.params for t in _journal_trials(journal) if t.state.name == "COMPLETE"}
    assert not (out / "search.json").exists()  # killed: no result, only the live study
    assert main([*args, "--resume"]) in (0, 1)
    report = json.loads((out / "search.json").read_text())
    assert report["trials"]["resumed"] and report["trials"]["finished"] == 8
    assert report["trials"]["lost_when_resumed"] <= 1  # at most the trial that was running
    after = {t.number: (t.params, t.state.name) for t in _journal_trials(out / "study.journal")}
    assert all(after[n] == (params, "COMPLETE") for n, params in before.items())
    assert not list(tmp_path.glob(".out.partial-*"))  # the killed run's scratch folder was cleared


def test_two_workers_share_one_postgres_study_and_find_what_one_worker_finds(project, tmp_path, postgres_url):
    import optuna

    from shrinkml.budget import Budget
    from shrinkml.recipe_search.run import search
    from shrinkml.settings import RunSettings

    # every trial trains (a second or two), and the parent starts cold like its worker (a CLI process),
    # so both are up before the trials run out
    (tmp_path / "space.yaml").write_text(SPACE.replace("[none, prune.channels]", "[prune.channels]")
                                         .replace("finetune__epochs: 4", "finetune__epochs: 30"))
    args = _args(project, tmp_path / "two", "--trials", "8", "--workers", "2", "--storage", postgres_url,
                 "--study", "shared")
    args[args.index("--space") + 1] = str(tmp_path / "space.yaml")
    done = subprocess.run([sys.executable, "-m", "shrinkml.cli", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = json.loads((tmp_path / "two" / "search.json").read_text())
    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    # the study holds the asked-for trials (a worker may start one more while another finishes the last)
    assert 8 <= len(finished) <= 9 and len({t.number for t in trials}) == len(trials)
    workers = {(t.user_attrs["worker"]["host"], t.user_attrs["worker"]["pid"]) for t in finished}
    assert len(workers) == 2  # both processes ran trials, each trial once
    assert report["storage"].startswith("postgresql") and report["trials"]["finished"] == len(finished)
    # one worker given the same trials (same parameters, in order) chooses the same best recipe
    single = search(MODEL, weights=str(project / "mlp.safetensors"), data="builtin:digits", out=tmp_path / "one",
                    space=tmp_path / "space.yaml", objectives=("size", "metric"), budget=Budget(max_drop=0.05),
                    trials=len(finished), settings=RunSettings(threads=1, repeats=10),
                    enqueue=[t.params for t in sorted(finished, key=lambda t: t.number)])
    assert single.report["trials"]["finished"] == len(finished)
    assert report["best"] is not None and single.best_recipe == report["best"]["recipe"]
