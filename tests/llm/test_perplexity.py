"""Causal LMs: loading (never as an encoder), windows that keep test text out of calibration,
perplexity equal to transformers' own loss, exact KL and top-1 agreement, and KV-cache generation."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shrinkml.data.lm import LMEncoding, lm_splits, read_texts, scored_tokens, windows  # noqa: E402
from shrinkml.errors import InputError  # noqa: E402
from shrinkml.measure.lm import TorchGenerator, score_windows, time_generation  # noqa: E402
from shrinkml.models import load_model  # noqa: E402
from shrinkml.tasks import get_task  # noqa: E402


@pytest.mark.parametrize("n, context, stride", [(10, 4, 2), (11, 4, 2), (100, 16, 5), (16, 16, 8), (33, 8, 7)])
def test_windows_score_every_token_after_the_first_exactly_once(n, context, stride):
    x, first = windows(np.arange(n), context=context, stride=stride)
    assert x.shape[1] == context
    scored = []
    starts = x[:, 0]
    for s, f in zip(starts.tolist(), first.tolist()):
        scored.extend(range(s + f, s + context))
    assert scored == list(range(1, n)) and scored_tokens(first, context) == n - 1


def test_splits_are_cut_by_text_before_windowing(tiny_llama_dir, tiny_texts):
    loaded = load_model(str(tiny_llama_dir))
    texts = read_texts(str(tiny_texts))
    splits = lm_splits(texts, LMEncoding(loaded.lm.tokenizer, context=32), seed=0, fractions=None, source="t")
    assert splits.test.x.shape[1] == 32 and len(splits.test) >= 2 and (splits.test.y >= 1).all()
    # the texts behind the calibration windows and the test windows are disjoint sets of lines
    from shrinkml.data.arrays import ArrayData, make_splits

    cut = make_splits(ArrayData(np.arange(len(texts))[:, None]), seed=0, source="t")
    assert not set(cut.calibration.x[:, 0]) & set(cut.test.x[:, 0])
    with pytest.raises(InputError, match="window settings"):
        lm_splits(texts, LMEncoding(loaded.lm.tokenizer, context=4), seed=0, fractions=None, source="t")


def test_perplexity_matches_transformers_loss_and_a_copy_agrees_exactly(tiny_llama_dir, tiny_texts):
    loaded = load_model(str(tiny_llama_dir))
    model = loaded.module
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    gen = TorchGenerator(model, threads=1)
    twin = TorchGenerator(copy.deepcopy(model), threads=1)
    figures = score_windows({"original": gen.logits, "copy": twin.logits}, splits.test, resamples=200)
    one = splits.test.x[:1]
    with torch.no_grad():
        loss = model(input_ids=torch.as_tensor(one), labels=torch.as_tensor(one)).loss
    first_only = score_windows({"m": gen.logits}, type(splits.test)(one, np.array([1])), resamples=50)["m"]
    assert first_only["perplexity"]["value"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    c = figures["copy"]
    assert c["kl_divergence"]["value"] == pytest.approx(0.0, abs=1e-7) and c["top1_agreement"]["value"] == 1.0
    assert c["perplexity_increase"]["value"] == pytest.approx(0.0, abs=1e-9)
    base = figures["original"]
    assert base["scored_tokens"] == scored_tokens(splits.test.y, 32)
    lo, hi = base["perplexity"]["ci95"]
    assert lo <= base["perplexity"]["value"] <= hi


def test_a_perturbed_model_has_positive_kl_and_a_perplexity_increase(tiny_llama_dir, tiny_texts):
    loaded = load_model(str(tiny_llama_dir))
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    noisy = copy.deepcopy(loaded.module)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
    figures = score_windows({"original": TorchGenerator(loaded.module, 1).logits,
                             "noisy": TorchGenerator(noisy, 1).logits}, splits.test, resamples=200)
    n = figures["noisy"]
    assert n["kl_divergence"]["value"] > 1e-3 and n["top1_agreement"]["value"] < 1.0
    # KL computed independently, token by token, for the first window
    x, f = splits.test.x[:1], int(splits.test.y[0])
    with torch.no_grad():
        p = torch.log_softmax(loaded.module(input_ids=torch.as_tensor(x)).logits[0, :-1].double(), -1)
        q = torch.log_softmax(noisy(input_ids=torch.as_tensor(x)).logits[0, :-1].double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)[f - 1:]
    assert n["per_window"]["kl"][0] == pytest.approx(float(kl.sum()), rel=1e-4)


def test_generation_with_the_kv_cache_matches_full_recompute(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    gen = TorchGenerator(loaded.module, threads=1)
    prompt = np.array([2, 5, 6, 7, 8, 9], np.int64)
    g = gen.generate(prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(loaded.module(input_ids=torch.as_tensor([ids])).logits[0, -1].argmax()))
    assert list(g.tokens) == ids[len(prompt):]
    figures = time_generation({"a": gen, "b": TorchGenerator(copy.deepcopy(loaded.module), 1)}, prompt,
                              new_tokens=6, rounds=3, resamples=100)
    for key in ("prompt_tokens_per_s", "generation_tokens_per_s", "time_to_first_token_ms"):
        assert figures["a"][key]["value"] > 0 and len(figures["a"][key]["samples"]) == 3
        assert f"{key}_ratio" in figures["b"]
    assert figures["b"]["generated"] == figures["a"]["generated"]


def test_the_perplexity_task_refuses_a_model_that_is_no_causal_lm():
    from shrinkml.models.loaded import LoadedModel

    with pytest.raises(InputError, match="not one"):
        get_task("perplexity").check_model(LoadedModel("onnx", "m.onnx"), None)


def test_bench_measures_a_causal_lm_and_compress_says_it_cannot_yet(tiny_llama_dir, tiny_texts, capsys):
    import json

    from shrinkml.cli import main

    args = ["--model", str(tiny_llama_dir), "--data", str(tiny_texts), "--task", "perplexity", "--threads", "1",
            "--max-length", "32"]
    assert main(["bench", *args, "--runtime", "torch", "--repeats", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    m = report["measurement"]
    assert report["task"]["name"] == "perplexity" and m["runtime"] == "torch"
    assert m["size_bytes"] == sum(p.stat().st_size for p in tiny_llama_dir.rglob("*") if p.is_file())
    assert m["windows"]["context"] == 32 and m["windows"]["scored_tokens"] > 0
    lo, hi = m["metrics"]["perplexity"]["ci95"]
    assert lo <= m["metrics"]["perplexity"]["value"] <= hi
    assert m["generation"]["generation_tokens_per_s"]["value"] > 0 and m["generation"]["rounds"] == 10
    assert m["generation"]["prompt_tokens"] + m["generation"]["new_tokens"] <= 128  # inside the context
    assert main(["bench", *args]) == 2  # onnxruntime: not for causal LMs in this version
    assert "runtime torch" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_llama_dir), "--data", str(tiny_texts), "--task", "embedding"]) == 2
    assert "--task perplexity" in capsys.readouterr().err


def test_gptq_codes_beat_round_to_nearest_on_the_layers_own_objective(tiny_llama_dir, tiny_texts):
    """quantize.gguf method gptq: Q4_0 blocks (fp16 scales, as llama.cpp stores them) whose summed
    layer error ||X W^T - X W_q^T||^2 on the calibration inputs is below llama.cpp's round to nearest."""
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.techniques.quantize_gguf import QuantizeGGUFConfig, calibration_hessians, quantize_model

    loaded = load_model(str(tiny_llama_dir))
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    calib = splits.calibration.x
    names = [n for n, m in loaded.module.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    accs, owner, tokens = calibration_hessians(loaded.module, calib, names)
    assert tokens == calib.size and set(owner) == set(names)
    assert owner["model.layers.0.self_attn.k_proj"] == owner["model.layers.0.self_attn.q_proj"]  # one input, one Gram
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(loaded.module)
        codes, summary = quantize_model(model, QuantizeGGUFConfig(method=method, format="Q4_0"), calib)
        total = 0.0
        for n in names:
            w = dict(loaded.module.named_modules())[n].weight.detach().double()
            wq = torch.from_numpy(gb.dequantize(codes[f"{n}.weight"])).double()
            assert torch.equal(dict(model.named_modules())[n].weight.detach().double(), wq)  # the model holds the codes
            h = accs[owner[n]].hessian()
            diff = w - wq
            total += float(torch.einsum("ij,jk,ik->", diff, h, diff))
        errors[method] = total
        assert {c.fmt.name for c in codes.values()} == {"Q4_0", "Q8_0"}  # Linear weights, embedding
        assert (method == "gptq") == summary["method"].startswith("gptq on")
    assert errors["gptq"] < 0.9 * errors["rtn"], errors
    with pytest.raises(ValueError, match="needs method rtn"):
        QuantizeGGUFConfig(method="gptq", format="Q4_1")


def test_the_task_scores_logits_in_hand_like_the_window_scorer(tiny_llama_dir, tiny_texts):
    from shrinkml.tasks.perplexity import TASK

    loaded = load_model(str(tiny_llama_dir))
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    test = type(splits.test)(splits.test.x[:3], splits.test.y[:3])
    gen = TorchGenerator(loaded.module, 1)
    noisy = copy.deepcopy(loaded.module)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.3 * p.std())
    logits, ref = TorchGenerator(noisy, 1).logits(test.x).numpy(), gen.logits(test.x).numpy()
    scores = TASK.scores(logits, test, ref)
    figures = score_windows({"ref": gen.logits, "noisy": TorchGenerator(noisy, 1).logits}, test, resamples=50)["noisy"]
    per = figures["per_window"]
    np.testing.assert_allclose(scores["kl_divergence"], np.array(per["kl"]) / np.array(per["tokens"]), rtol=1e-5)
    np.testing.assert_allclose(scores["nll_per_token"], np.array(per["nll"]) / np.array(per["tokens"]), rtol=1e-5)


def test_search_refuses_a_causal_lm_no_technique_can_take_with_the_reason(tiny_llama_dir, tiny_texts, tmp_path, capsys):
    from shrinkml.cli import main

    code = main(["search", "--model", str(tiny_llama_dir), "--data", str(tiny_texts), "--task", "perplexity",
                 "--runtime", "torch", "--max-length", "32", "--out", str(tmp_path / "out"), "--trials", "1"])
    err = " ".join(capsys.readouterr().err.split())
    # quantize.gguf writes a GGUF, and this directory's WordPiece vocabulary has no GGUF form llama.cpp reads
    assert code == 2 and "quantize.gguf" in err and "byte-level BPE" in err, err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_promote_gives_the_most_sensitive_weights_the_higher_format(tiny_llama_dir, tiny_texts):
    from shrinkml.formats import gguf_blocks as gb
    from shrinkml.techniques.quantize_gguf import QuantizeGGUFConfig, _formats, _targets, quantize_model, sensitivities

    loaded = load_model(str(tiny_llama_dir))
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    calib = splits.calibration.x
    config = QuantizeGGUFConfig(format="Q4_0", promote=3, promote_format="Q8_0", sensitivity_windows=4)
    model = copy.deepcopy(loaded.module)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = _targets(model)
    formats = _formats(targets, config)[0]
    params = {n: p for n, p, _ in targets}
    kl = sensitivities(model, targets, lambda n: gb.dequantize(gb.quantize_rtn(params[n].detach().numpy(), formats[n])),
                       calib[:4])
    assert len(kl) == len(targets) - 1 and min(kl.values()) > 0
    # measuring sensitivity put every weight back as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    top = sorted(kl, key=kl.get, reverse=True)[:3]
    codes, summary = quantize_model(model, config, calib)
    assert [p["tensor"] for p in summary["promoted"]] == top
    assert {n for n, c in codes.items() if c.fmt.name == "Q8_0"} == set(top) | {"model.embed_tokens.weight"}
    assert summary["formats"] == {"Q8_0": 4, "Q4_0": len(codes) - 4}


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_decoder_families_load_and_score(tmp_path, tiny_texts, arch):
    """Not only Llama: a Qwen2 and a GPT-2 directory load as causal LMs and score their windows."""
    import transformers

    from tests.llm.conftest import WORDS

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path))
    torch.manual_seed(0)
    if arch == "qwen2":
        config = transformers.Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(config)
    model.eval().save_pretrained(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert loaded.lm.architecture == arch and loaded.text is None
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    gen = TorchGenerator(loaded.module, 1)
    figures = score_windows({"m": gen.logits}, splits.test, resamples=100)["m"]
    with torch.no_grad():
        one = torch.as_tensor(splits.test.x[:1])
        loss = loaded.module(input_ids=one, labels=one).loss
    first = score_windows({"m": gen.logits}, type(splits.test)(splits.test.x[:1], np.array([1])), resamples=50)["m"]
    assert first["perplexity"]["value"] == pytest.approx(float(torch.exp(loss)), rel=1e-5)
    assert figures["scored_tokens"] > 0 and len(gen.generate(splits.test.x[0][:8], 4).tokens) == 4
