"""End to end through the public API and the CLI on a small model: the report contract, the files
in --out, the budget logic and the honesty of the measured figures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml

import shrinkml
from shrinkml.api import Budget, RunSettings
from shrinkml.cli import main
from shrinkml.data import make_splits
from shrinkml.measure.stats import speedup_verdict
from shrinkml.recipe import Recipe
from shrinkml.report import validate_report
from tests.conftest import tiny_cnn, toy_data

FAST = RunSettings(repeats=10, warmup=1, batch_n=8, threads=1, bootstrap_resamples=500, max_timing_s=0)


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained on the toy data, and its splits."""
    import torch

    from shrinkml.techniques.base import ModelState
    from shrinkml.techniques.finetune import FinetuneConfig, apply
    from tests.conftest import make_ctx

    model = tiny_cnn()
    splits = make_splits(toy_data(500), seed=0)
    ctx = make_ctx(model, __import__("pathlib").Path("."), data=toy_data(500))
    out = apply(ModelState("torch", torch_model=model), FinetuneConfig(epochs=20, lr=1e-2, distill=False, patience=None), ctx)
    torch.manual_seed(0)
    return out.state.torch_model, splits


def test_compress_report_contract_and_files(trained, tmp_path):
    model, splits = trained
    recipe = [
        {"technique": "prune.channels", "channel_ratio": 0.5},
        {"technique": "finetune", "epochs": 3, "patience": None, "validation_fraction": 0.0},
        {"technique": "quantize.dynamic", "op_types": ["Conv", "Gemm", "MatMul"]},
    ]
    result = shrinkml.compress(model, recipe, data=splits, out=tmp_path / "out", settings=FAST, budget=Budget(max_drop=1.0))
    report = result.report
    validate_report(report)
    b, c = report["baseline"], report["compressed"]
    # sizes are the files' bytes on disk
    assert c["size_bytes"] == (tmp_path / "out" / "model.onnx").stat().st_size
    assert report["delta"]["size_ratio"] == pytest.approx(b["size_bytes"] / c["size_bytes"])
    assert c["params"] < b["params"] and c["macs"] < b["macs"]
    speedup = report["delta"]["speedup_batch_n"]  # median of per-round ratios, CI over the same rounds
    assert speedup["ci95"][0] <= speedup["value"] <= speedup["ci95"][1]
    assert speedup["verdict"] == speedup_verdict(*speedup["ci95"])
    assert speedup["rounds"] == b["latency_ms"]["batch_n"]["runs"] == report["timing"]["batch_n"]["rounds"]
    assert b["artifact"]["file"] is None and (tmp_path / "out" / c["artifact"]["file"]).is_file()
    assert b["latency_ms"]["batch_n"]["n"] == 8 and b["latency_ms"]["batch_1"]["runs"] >= 10
    acc = c["metrics"]["accuracy"]
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    drop = report["delta"]["accuracy_drop"]
    assert drop["value"] == pytest.approx(b["metrics"]["accuracy"]["value"] - acc["value"], abs=1e-9)
    assert report["budget"]["met"] == (drop["ci95"][1] <= 1.0)
    assert b["peak_memory_bytes"] > 0
    assert report["cost"]["compressed"]["cost_per_million_inferences"] > 0
    assert report["environment"]["threads"] == 1
    assert report["export"]["baseline_max_abs_diff"] < 1e-4
    assert report["export"]["compressed_max_abs_diff"] < 1e-4  # the float export, before INT8
    # files: artifact, resolved recipe that round-trips, reports; nothing partial
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [".shrinkml-output.json", "manifest.json", "model.onnx", "recipe.yaml", "report.html", "report.json", "report.md"]
    saved = Recipe.from_yaml(tmp_path / "out" / "recipe.yaml")
    assert saved == Recipe.from_steps(recipe)
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text()) == report["recipe"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["schema"] == "shrinkml.report/2"
    assert not list(tmp_path.glob(".out.partial-*"))
    onnx.checker.check_model(onnx.load(str(tmp_path / "out" / "model.onnx")))


def test_budget_not_met_is_reported_not_raised(trained):
    model, splits = trained
    # destroy the model: random-importance pruning of 90% of channels, no recovery
    recipe = [{"technique": "prune.channels", "channel_ratio": 0.9, "importance": "random"}]
    settings = FAST.model_copy(update={"measure_memory": False})
    result = shrinkml.compress(model, recipe, data=splits, settings=settings, budget=Budget(max_drop=0.0))
    assert result.budget_met is False
    assert result.report["budget"]["worst_case_drop"] > 0


def test_magnitude_pruning_shrinks_the_file_for_real(trained):
    model, splits = trained
    settings = FAST.model_copy(update={"measure_memory": False})
    result = shrinkml.compress(model, [{"technique": "prune.magnitude", "sparsity": 0.9}], data=splits, settings=settings, budget=Budget(max_drop=1.0))
    b, c = result.report["baseline"], result.report["compressed"]
    assert c["nonzero_params"] <= 0.2 * b["nonzero_params"]
    assert c["params"] == b["params"]  # same dense shapes...
    assert c["size_bytes"] < b["size_bytes"]  # ...but a sparse encoding on disk


def test_torch_runtime_saves_safetensors_that_reload(trained, tmp_path):
    import torch

    from shrinkml.models.safetensors_io import fit_module_to_state_dict, load_state_dict

    model, splits = trained
    settings = FAST.model_copy(update={"runtime": "torch"})
    result = shrinkml.compress(model, [{"technique": "prune.channels", "channel_ratio": 0.5}], data=splits, out=tmp_path / "o", settings=settings, budget=Budget(max_drop=1.0))
    path = tmp_path / "o" / "model.safetensors"
    assert result.report["compressed"]["size_bytes"] == path.stat().st_size
    fresh = tiny_cnn(seed=5)
    state = load_state_dict(path)
    fit_module_to_state_dict(fresh, state)
    fresh.load_state_dict(state)
    x = torch.from_numpy(splits.test.x[:4])
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), result.model.eval()(x), atol=1e-6)


def test_torch_runtime_rejects_onnx_quantization(trained):
    from shrinkml.errors import InputError

    model, splits = trained
    with pytest.raises(InputError, match="--runtime onnxruntime"):
        shrinkml.compress(model, [{"technique": "quantize.dynamic"}], data=splits, settings=FAST.model_copy(update={"runtime": "torch"}))


def test_fidelity_task_without_labels(trained):
    model, splits = trained
    unlabeled = splits.__class__(
        *(s.__class__(s.x, None) for s in (splits.calibration, splits.finetune, splits.test)), source="x", seed=0
    )
    settings = FAST.model_copy(update={"measure_memory": False})
    result = shrinkml.compress(model, [{"technique": "quantize.dynamic", "op_types": ["Conv", "Gemm"]}], data=unlabeled, task="fidelity", settings=settings)
    metrics = result.report["compressed"]["metrics"]
    assert set(metrics) == {"cosine_similarity", "relative_error", "top1_agreement"}
    assert metrics["cosine_similarity"]["value"] > 0.95
    assert result.report["baseline"]["metrics"]["top1_agreement"]["value"] == 1.0
    assert result.report["task"]["primary_metric"] == "top1_agreement"


def test_cli_compress_and_bench_json(user_project, capsys):
    code = main(["compress", "--model", "usermodels_for_tests:good", "--weights", "weights.safetensors", "--data", "data.npz",
                 "--recipe", "recipe.yaml", "--out", "out", "--repeats", "10", "--max-timing-s", "0", "--batch-n", "4", "--json", "--max-drop", "1.0",
                 "--price-per-hour", "1.0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["cost"]["assumptions"]["price_per_hour"] == 1.0
    assert (user_project / "out" / "model.onnx").is_file()
    code = main(["bench", "--model", "usermodels_for_tests:good", "--weights", "weights.safetensors", "--data", "data.npz",
                 "--repeats", "10", "--max-timing-s", "0", "--json", "--runtime", "torch"])
    bench = json.loads(capsys.readouterr().out)
    assert code == 0 and bench["measurement"]["params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert bench["measurement"]["metrics"]["accuracy"]["value"] < 0.5  # an untrained model: chance level


def test_cli_exit_1_when_budget_not_met(user_project, capsys):
    (user_project / "r.yaml").write_text("steps:\n  - technique: prune.channels\n    channel_ratio: 0.9\n    importance: random\n")
    # the user model is untrained: force a measurable change with a zero budget on agreement
    code = main(["compress", "--model", "usermodels_for_tests:good", "--weights", "weights.safetensors", "--data", "data.npz",
                 "--recipe", "r.yaml", "--out", "out", "--repeats", "10", "--max-timing-s", "0", "--task", "fidelity", "--max-drop", "0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert (user_project / "out" / "report.json").is_file()
    assert json.loads((user_project / "out" / "report.json").read_text())["budget"]["met"] is False


@pytest.mark.slow
def test_demo_meets_its_targets(tmp_path):
    code = main(["demo", "--out", str(tmp_path / "demo")])
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert code == 0
    assert report["delta"]["size_ratio"] >= 4
    assert report["delta"]["accuracy_drop"]["ci95"][1] <= 0.01
    assert report["budget"]["met"]
