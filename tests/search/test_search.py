"""``shrinkml search`` end to end on a trained digits MLP: the space, the study in the output folder,
the Pareto front and the best recipe's compress result, resume, and the test split left alone."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from shrinkml.cli import main
from shrinkml.errors import InputError

MODEL = "shrinkml.examples.demo:digits_mlp"

FAST_SPACE = """\
exclude: [prune.magnitude, quantize.qat, quantize.weight_only]
stages:
  structure: [none, prune.channels]
  quantize: [quantize.dynamic, quantize.static]
params:
  prune.channels__channel_ratio: {choices: [0.25, 0.5]}
  finetune__epochs: 4
  finetune__lr: 0.003
"""


@pytest.fixture(scope="module")
def project(mlp_weights):
    """The trained MLP's folder, with a small search space file."""
    (mlp_weights.parent / "space.yaml").write_text(FAST_SPACE)
    return mlp_weights.parent


def _run(project, out, *extra):
    return main(["search", "--model", MODEL, "--weights", str(project / "mlp.safetensors"), "--data", "builtin:digits",
                 "--out", str(out), "--space", str(project / "space.yaml"), "--threads", "1", "--repeats", "10",
                 *extra])


def test_search_writes_front_best_and_study(project, tmp_path):
    out = tmp_path / "out"
    code = _run(project, out, "--trials", "5", "--max-size", "120KB", "--max-drop", "0.05")
    report = json.loads((out / "search.json").read_text())
    assert code == (0 if report["met"] else 1)
    assert report["schema"] == "shrinkml.search/1"
    assert report["trials"]["finished"] == 5
    assert report["data"]["trials_scored_on"] == "validation"
    assert (out / "study.journal").stat().st_size > 0
    assert set(report["space"]["stages"]) == {"structure", "recovery", "quantize"}
    assert "prune.channels__channel_ratio" in report["space"]["params"]
    # every complete trial has its objectives and constraints; the front holds feasible trials only
    for row in report["all_trials"]:
        if row["state"] == "complete":
            assert set(row["values"]) == {"size", "latency", "metric"}
            assert "drop" in row["constraints"] and "size" in row["constraints"]
    assert report["front"] and all(row["feasible"] for row in report["front"])
    best = report["best"]
    assert best is not None and best["trial"] in {row["number"] for row in report["front"]}
    # the best recipe's full compress result, measured on the test split
    final = json.loads((out / "best" / "report.json").read_text())
    assert final["data"]["splits"]["test"] == report["data"]["splits"]["test"]
    assert final["compressed"]["size_bytes"] == best["test"]["size_bytes"] <= 120_000
    assert (out / "best" / "model.onnx").is_file() and (out / "best" / "recipe.yaml").is_file()
    assert "<svg" in (out / "search.html").read_text()
    assert "Pareto front" in (out / "search.md").read_text()


def test_an_existing_study_needs_resume_and_resume_continues_it(project, tmp_path, capsys):
    out = tmp_path / "out"
    _run(project, out, "--trials", "2", "--objectives", "size,metric")
    first = json.loads((out / "search.json").read_text())
    assert _run(project, out, "--trials", "2", "--objectives", "size,metric") == 2
    assert "--resume" in capsys.readouterr().err
    # a different search cannot resume this study
    assert _run(project, out, "--trials", "3", "--objectives", "size,metric", "--max-drop", "0.2", "--resume") == 2
    assert "belongs to another search" in capsys.readouterr().err
    _run(project, out, "--trials", "4", "--objectives", "size,metric", "--resume")
    second = json.loads((out / "search.json").read_text())
    assert second["trials"]["finished"] == 4 and second["trials"]["this_run"] == 2 and second["trials"]["resumed"]
    before = {r["number"]: r["recipe"] for r in first["all_trials"]}
    assert {r["number"]: r["recipe"] for r in second["all_trials"] if r["number"] in before} == before


def test_resume_without_a_study_and_no_stopping_rule_are_refused(project, tmp_path, capsys):
    assert _run(project, tmp_path / "new", "--trials", "2", "--resume") == 2
    assert "no search to resume" in capsys.readouterr().err
    assert _run(project, tmp_path / "new2") == 2
    assert "--trials" in capsys.readouterr().err
    assert not (tmp_path / "new2").exists()


def test_a_search_never_reads_the_test_split_before_its_final_report(project, tmp_path, monkeypatch):
    """Every read of the test split's data is recorded with the phase it happened in: all of them
    come from the final compress run (and there are some, so this test can fail)."""
    from shrinkml.pipeline import Pipeline

    phase, reads = {"now": "search"}, []

    class Guard:
        def __init__(self, data):
            object.__setattr__(self, "_data", data)

        def __len__(self):
            return len(self._data)

        def __getattr__(self, name):
            reads.append((phase["now"], name))
            return getattr(self._data, name)

    real_prepare, real_run = Pipeline.prepare.__func__, Pipeline.run

    def prepare(cls, *args, **kwargs):
        pipe = real_prepare(cls, *args, **kwargs)
        splits = pipe.prepared.splits
        pipe.prepared = replace(pipe.prepared, splits=replace(splits, test=Guard(splits.test)))
        return pipe

    def run(self, *args, **kwargs):
        phase["now"] = "final"
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "prepare", classmethod(prepare))
    monkeypatch.setattr(Pipeline, "run", run)
    _run(project, tmp_path / "out", "--trials", "3", "--objectives", "size,metric", "--max-drop", "0.2")
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert report["trials"]["complete"] >= 1 and report["best"] is not None
    assert reads and {p for p, _ in reads} == {"final"}


def test_steps_in_a_trial_see_a_sealed_test_split():
    from shrinkml.recipe_search.trial import SealedData, SealedSplitError

    sealed = SealedData(7)
    assert len(sealed) == 7
    for read in (lambda: sealed.x, lambda: sealed.y, lambda: sealed.subset([0]), lambda: list(sealed.batches(2))):
        with pytest.raises(SealedSplitError):
            read()


def test_training_that_cannot_meet_the_budget_is_stopped_early(project, tmp_path):
    (tmp_path / "space.yaml").write_text(
        "stages:\n  structure: [prune.channels]\n  recovery: [finetune]\n  quantize: [quantize.dynamic]\n"
        "params:\n  prune.channels__channel_ratio: 0.8\n  finetune__epochs: 12\n  finetune__lr: 0.000001\n"
        "  finetune__patience: null\n"
    )
    code = main(["search", "--model", MODEL, "--weights", str(project / "mlp.safetensors"), "--data", "builtin:digits",
                 "--out", str(tmp_path / "out"), "--space", str(tmp_path / "space.yaml"), "--threads", "1",
                 "--trials", "1", "--max-drop", "0.001"])
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert code == 1 and report["best"] is None
    (row,) = report["all_trials"]
    assert row["state"] == "pruned" and row["stopped"]["kind"] == "pruned"
    epochs = [e for e, _ in row["details"]["intermediate"]]
    assert epochs == [1, 2, 3]  # stopped after the warm-up epochs (12 // 4 = 3), long before 12
    assert report["pruning"]["trials_stopped"] == 1


def test_the_prefix_cache_reuses_a_pruned_and_finetuned_model(project, tmp_path):
    from shrinkml.pipeline import Pipeline
    from shrinkml.recipe_search.trial import Targets, TrialEvaluator
    from shrinkml.settings import RunSettings

    pipe = Pipeline.prepare(MODEL, data="builtin:digits", weights=project / "mlp.safetensors",
                            settings=RunSettings(threads=1, repeats=10))
    ev = TrialEvaluator(pipe, Targets(), ("size", "metric"), workdir=tmp_path)
    prefix = [{"technique": "prune.channels", "channel_ratio": 0.5}, {"technique": "finetune", "epochs": 2}]
    a = ev.evaluate(prefix + [{"technique": "quantize.dynamic"}])
    b = ev.evaluate(prefix + [{"technique": "quantize.static"}])
    assert a.details["seconds"]["cached_steps"] == 0 and b.details["seconds"]["cached_steps"] == 2
    assert b.details["seconds"]["saved_by_cache_s"] > 0 and b.details["seconds"]["steps_s"] < a.details["seconds"]["steps_s"]
    uncached = TrialEvaluator(pipe, Targets(), ("size", "metric"), cache_size=0, workdir=tmp_path / "u")
    c = uncached.evaluate(prefix + [{"technique": "quantize.static"}])
    assert c.details["seconds"]["cached_steps"] == 0
    assert c.values["size"] == b.values["size"] and c.values["metric"] == b.values["metric"]


def test_a_latency_target_is_met_only_when_the_p50_ci_is_within_it(project, tmp_path, monkeypatch):
    """A p50 under the line with a CI that crosses it is infeasible: noise is not a met target."""
    import numpy as np

    import shrinkml.measure.latency as latency
    from shrinkml.pipeline import Pipeline
    from shrinkml.recipe_search.trial import Targets, TrialEvaluator
    from shrinkml.settings import RunSettings

    samples = tuple(float(v) for v in np.random.default_rng(0).normal(1.0, 0.15, 41).clip(0.5))
    p50 = float(np.median(samples))

    def fake(fns, **_):
        return {name: latency.LatencyStats(p50, max(samples), p50, len(samples), 1, samples) for name in fns}

    monkeypatch.setattr(latency, "time_interleaved", fake)
    pipe = Pipeline.prepare(MODEL, data="builtin:digits", weights=project / "mlp.safetensors",
                            settings=RunSettings(threads=1, repeats=10))
    steps = [{"technique": "quantize.dynamic"}]
    tight = TrialEvaluator(pipe, Targets(max_latency_ms=p50 * 1.01), ("size", "latency", "metric"), workdir=tmp_path)
    out = tight.evaluate(steps)
    lo, hi = out.details["latency_ms_ci95"]
    assert lo < p50 < p50 * 1.01 < hi and out.values["latency"] == p50
    assert out.constraints["latency"] == pytest.approx(hi - p50 * 1.01) and out.constraints["latency"] > 0
    loose = TrialEvaluator(pipe, Targets(max_latency_ms=hi * 1.01), ("size", "latency", "metric"), workdir=tmp_path / "l")
    assert loose.evaluate(steps).constraints["latency"] < 0


def test_steps_that_do_not_compose_are_infeasible_not_failures(project, tmp_path, monkeypatch):
    """A step that refuses what the steps before it made (share.embeddings after a quantizer that
    made the tables integers, on a text model) marks the trial infeasible with the reason, is not
    evaluated again when redrawn, and does not count toward the failures that stop a search."""
    from shrinkml.recipe_search.run import MAX_CONSECUTIVE_FAILURES, search
    from shrinkml.recipe_search.trial import TrialEvaluator
    from shrinkml.settings import RunSettings

    evaluated: list[str] = []
    real = TrialEvaluator.evaluate

    def evaluate(self, steps, label="trial"):
        names = [s["technique"] for s in steps]
        evaluated.append(json.dumps(steps, sort_keys=True))
        if "quantize.static" in names:
            raise InputError("quantize.static found nothing it can take", where="steps[-1]")
        return real(self, steps, label)

    monkeypatch.setattr(TrialEvaluator, "evaluate", evaluate)
    (tmp_path / "space.yaml").write_text(FAST_SPACE.replace("[quantize.dynamic, quantize.static]", "[quantize.static]"))
    trials = MAX_CONSECUTIVE_FAILURES + 3
    result = search(MODEL, data="builtin:digits", weights=str(project / "mlp.safetensors"), out=tmp_path / "out",
                    trials=trials, space=tmp_path / "space.yaml", settings=RunSettings(threads=1, repeats=10))
    report = result.report
    assert report["trials"]["finished"] == trials  # never stopped as failing
    assert report["trials"]["failed"] == 0
    assert report["trials"]["not_feasible_because"].get("steps do not compose", 0) >= MAX_CONSECUTIVE_FAILURES
    assert len(evaluated) == len(set(evaluated))  # a redrawn refused recipe is not evaluated again
    assert report["trials"]["repeated_recipes"] == trials - len(evaluated) > 0
    refused = [row for row in report["all_trials"] if row.get("stopped", {}).get("kind") == "incompatible"]
    assert refused and "do not compose" in refused[0]["stopped"]["reason"]
    assert "quantize.static found nothing" in refused[0]["stopped"]["reason"]


def test_a_search_refused_before_its_first_trial_leaves_no_output_folder(project, tmp_path, capsys):
    """Bad input found while preparing (here: a space naming an unknown technique) leaves nothing."""
    (tmp_path / "bad.yaml").write_text("exclude: [no.such.technique]\n")
    out = tmp_path / "out"
    code = main(["search", "--model", MODEL, "--weights", str(project / "mlp.safetensors"), "--data", "builtin:digits",
                 "--out", str(out), "--space", str(tmp_path / "bad.yaml"), "--trials", "2"])
    assert code == 2 and "no.such.technique" in capsys.readouterr().err
    assert not out.exists()
