"""keep_float: auto on a constructed case: one layer carries a weight outlier that plain INT8
cannot represent; keeping that layer (and only it) in float meets the budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from shrinkml.budget import Budget
from shrinkml.quant.sensitivity import choose_keep_float, sqnr_db
from shrinkml.runtimes.export import export_onnx
from shrinkml.techniques.base import ModelState
from shrinkml.techniques.finetune import FinetuneConfig
from shrinkml.techniques.finetune import apply as finetune
from tests.conftest import make_ctx, toy_data


def outlier_mlp(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    data = toy_data(600)
    ctx = make_ctx(model, tmp_path, data=data)
    model = finetune(ModelState("torch", torch_model=model), FinetuneConfig(epochs=15, lr=1e-2, distill=False, patience=None), ctx).state.torch_model
    # function-preserving outlier: hidden unit 0 of layer "1" shrinks 1000x, its weights in layer "3" grow 1000x
    with torch.no_grad():
        model[1].weight[0] /= 1000
        model[1].bias[0] /= 1000
        model[3].weight[:, 0] *= 1000
    return model.eval(), data


def dynamic_quantizer(float_model: onnx.ModelProto, workdir):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = workdir / "float.onnx"
    onnx.save(float_model, src)

    def quantize(keep: list[str]) -> onnx.ModelProto:
        dst = workdir / "q.onnx"
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"],
                         # ORT's dynamic quantizer rewrites Gemm to "<name>_MatMul" after reading this list
                         nodes_to_exclude=[*keep, *(name + "_MatMul" for name in keep)])
        return onnx.load(str(dst))

    return quantize


def test_sqnr_db():
    x = np.ones(100)
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)


def test_auto_keeps_only_the_outlier_layer(tmp_path):
    model, data = outlier_mlp(tmp_path)
    ctx = make_ctx(model, tmp_path, data=data)
    ctx = ctx.__class__(**{**ctx.__dict__, "budget": Budget(max_drop=0.02)})
    float_model = export_onnx(model, data.x[:2])
    quantize = dynamic_quantizer(float_model, tmp_path)

    kept, summary = choose_keep_float(float_model, quantize, ctx, where="test.keep_float")

    # plain INT8 misses the budget on the selection data...
    assert summary["trials"][0]["kept_float"] == 0
    assert summary["trials"][0]["drop_ci95_upper"] > 0.02
    # ...keeping exactly the outlier layer in float meets it
    assert summary["kept_float"] == ["3"]
    assert summary["budget_met_on_selection"] is True
    by_layer = {row["layer"]: row for row in summary["sensitivity"]}
    assert set(by_layer) == {"1", "3", "5"}
    assert by_layer["3"]["output_sqnr_db"] < min(by_layer["1"]["output_sqnr_db"], by_layer["5"]["output_sqnr_db"])
    # and it holds on the untouched test split too
    from shrinkml.runtimes.onnxruntime import OrtRunner

    test = ctx.splits.test
    with torch.no_grad():
        ref = model(torch.from_numpy(test.x)).argmax(1).numpy()
    plain = OrtRunner(quantize([]).SerializeToString(), threads=1).run(test.x).argmax(1)
    mixed = OrtRunner(quantize(kept).SerializeToString(), threads=1).run(test.x).argmax(1)
    assert (mixed == test.y).mean() >= (ref == test.y).mean() - 0.02
    assert (plain == test.y).mean() < (ref == test.y).mean() - 0.02


def test_nothing_kept_when_plain_int8_meets_the_budget(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    data = toy_data(300)
    ctx = make_ctx(model, tmp_path, data=data, task="fidelity")
    ctx = ctx.__class__(**{**ctx.__dict__, "budget": Budget(max_drop=0.5)})
    float_model = export_onnx(model, data.x[:2])
    kept, summary = choose_keep_float(float_model, dynamic_quantizer(float_model, tmp_path), ctx, where="t")
    assert kept == [] and summary["selection_split"] == "validation"


def test_explain_points_at_the_outlier_layer(tmp_path):
    import json

    import shrinkml
    from shrinkml.api import RunSettings
    from shrinkml.data import make_splits

    model, data = outlier_mlp(tmp_path)
    splits = make_splits(data, seed=0)
    result = shrinkml.explain(
        model, [{"technique": "quantize.dynamic", "per_channel": True}], data=splits,
        out=tmp_path / "ex", settings=RunSettings(threads=1),
    )
    assert result["layers"][0]["layer"] == "3"  # most sensitive first
    assert result["layers"][0]["metric_drop"] > 0.1
    assert all(r["metric_drop"] < 0.02 for r in result["layers"][1:])
    assert result["data"]["evaluated_on"] == "test"
    assert result["all_quantized"]["drop_ci95_upper"] > 0.1
    saved = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert saved["layers"][0]["layer"] == "3"
    html = (tmp_path / "ex" / "explain.html").read_text()
    assert "<svg" in html and "Per-layer sensitivity" in html
    assert "| 3 | Gemm |" in (tmp_path / "ex" / "explain.md").read_text()


def test_explain_rejects_a_recipe_without_a_quantizer(tmp_path):
    import shrinkml
    from shrinkml.errors import InputError

    with pytest.raises(InputError, match="explain analyses a quantization step"):
        shrinkml.explain(nn.Linear(4, 2), [{"technique": "finetune"}], data=(np.zeros((20, 4), np.float32), np.zeros(20, int)))


def test_static_keep_float_auto_meets_a_budget_plain_int8_misses(tmp_path):
    """The issue's acceptance case, through compress(): judged on the untouched test split."""
    import shrinkml
    from shrinkml.api import RunSettings
    from shrinkml.data import make_splits

    model, data = outlier_mlp(tmp_path)
    splits = make_splits(data, seed=0)
    settings = RunSettings(threads=1, repeats=10, batch_n=8, measure_memory=False, bootstrap_resamples=500, max_timing_s=0)
    budget = Budget(max_drop=0.03)
    plain = shrinkml.compress(model, [{"technique": "quantize.static"}], data=splits, settings=settings, budget=budget)
    auto = shrinkml.compress(model, [{"technique": "quantize.static", "keep_float": "auto"}], data=splits,
                             settings=settings, budget=budget)
    assert not plain.budget_met
    assert auto.budget_met
    summary = auto.report["steps"][0]["summary"]
    assert "3" in summary["kept_float"]
    assert len(summary["kept_float"]) < 3  # not everything: the point is the fewest layers
    assert summary["quantized_ops"]
    assert auto.report["compressed"]["size_bytes"] < auto.report["baseline"]["size_bytes"]
