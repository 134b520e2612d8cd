"""One prepared pipeline serves many recipes: the model and data are loaded once, and no run
changes what the next one starts from."""

from __future__ import annotations

import torch

from shrinkml.pipeline import Pipeline
from shrinkml.settings import RunSettings

from conftest import tiny_cnn, toy_data

FAST = RunSettings(repeats=10, warmup=1, batch_n=8, threads=1, bootstrap_resamples=300, max_timing_s=0,
                   measure_memory=False)


def test_prepare_once_run_many_recipes(tmp_path):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline.prepare(model, data=toy_data(200), settings=FAST)
    reports = [pipe.run(recipe)[0] for recipe in (
        [{"technique": "prune.magnitude", "sparsity": 0.5}],
        [{"technique": "quantize.dynamic"}],
        [{"technique": "prune.magnitude", "sparsity": 0.5}],
    )]
    # the loaded model is the start of every run, never changed by one
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    base = [r["baseline"]["metrics"]["accuracy"]["value"] for r in reports]
    assert base[0] == base[1] == base[2]
    assert reports[0]["compressed"]["size_bytes"] == reports[2]["compressed"]["size_bytes"]
    assert reports[1]["recipe"]["steps"][0]["technique"] == "quantize.dynamic"
    assert reports[0]["data"]["splits"] == reports[1]["data"]["splits"]


def test_bench_from_the_same_pipeline(tmp_path):
    pipe = Pipeline.prepare(tiny_cnn(), data=toy_data(120), settings=FAST)
    bench = pipe.bench()
    report, _, _ = pipe.run([{"technique": "quantize.dynamic"}])
    assert bench["measurement"]["size_bytes"] == report["baseline"]["size_bytes"]
    assert bench["measurement"]["metrics"]["accuracy"]["value"] == report["baseline"]["metrics"]["accuracy"]["value"]
