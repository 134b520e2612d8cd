"""Hugging Face directories shrinkml refuses, and says why, before transformers reads any weight:
generative language models that are no causal LM (nothing to mean-pool; causal LMs load as
such), weights stored only as pickles (loading one can
run code; the message gives the conversion command, which works), and JSON files of the wrong shape
or size (an InputError naming the file, never "unexpected X ... probably a bug")."""

from __future__ import annotations

import json
import os
import shlex
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from shrinkml.errors import InputError
from shrinkml.models import load_model

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue"]


def _tiny_bert_dir(path, *, classifier=False):
    """A random 2-layer BERT with a 17-token WordPiece vocabulary, saved as transformers writes it."""
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(str(path))
    config = transformers.BertConfig(vocab_size=17, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    cls(config).eval().save_pretrained(str(path))
    return path


def _error(path) -> InputError:
    with pytest.raises(InputError) as info:
        load_model(str(path))
    return info.value


# --- generative language models --------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_saved_causal_lm_loads_as_a_causal_lm_never_as_an_encoder(tmp_path, arch):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path))
    loaded = load_model(str(tmp_path))
    assert loaded.text is None and loaded.lm is not None and loaded.lm.kind == "causal_lm"
    assert type(loaded.module).__name__ == type(model).__name__  # the LM head kept, nothing pooled
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(ids).logits, model.eval()(ids).logits)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    err = _error(tmp_path)
    assert "could not load the causal language model" in err.what and err.where == str(tmp_path)


@pytest.mark.parametrize(
    "config, found",
    [
        ({"model_type": "bert", "is_decoder": True}, "is_decoder: true"),
        ({"model_type": "t5", "is_encoder_decoder": True}, "is_encoder_decoder: true"),
        ({"model_type": "mistral", "architectures": ["MistralModel"]}, "model_type 'mistral'"),
        ({"model_type": "bart", "architectures": ["BartForConditionalGeneration"]},
         "architectures BartForConditionalGeneration"),
    ],
)
def test_generative_configs_are_refused_however_they_say_it(tmp_path, config, found):
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = _error(tmp_path)
    assert "generative language model" in err.what and found in err.found


def test_a_sentence_transformers_dir_around_a_decoder_is_refused(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaModel"]}))
    assert "generative language model" in _error(tmp_path).what


# --- pickle weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["pytorch_model.bin"],
                                   ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                    "pytorch_model.bin.index.json"],
                                   ["model.ckpt"], ["weights.pt"]])
def test_pickle_only_weights_are_refused_with_the_conversion_command(tmp_path, names):
    model_dir = _tiny_bert_dir(tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    for name in names:
        (model_dir / name).write_bytes(b"\x80\x04 never unpickled")
    err = _error(model_dir)
    assert "pickle" in err.what and "arbitrary code" in err.what
    assert err.where == str(model_dir) and "model.safetensors" in err.expected
    assert next(n for n in names if not n.endswith(".json")) in err.found
    assert "python -c" in err.fix and "DIR-safetensors" in err.fix and "AutoModel," in err.fix


def test_the_conversion_command_in_the_message_works(tmp_path, monkeypatch):
    """The fix, run on a pickle (written here, so trusted), gives a directory shrinkml loads."""
    model_dir = _tiny_bert_dir(tmp_path / "m", classifier=True)
    reference = load_model(str(model_dir)).module
    state = transformers.BertForSequenceClassification.from_pretrained(str(model_dir)).state_dict()
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    err = _error(model_dir)
    assert "AutoModelForSequenceClassification" in err.fix
    command = err.fix[err.fix.index("python -c"):err.fix.index(" DIR ") + 4]
    _, _, code, _ = shlex.split(command)
    monkeypatch.setattr(sys, "argv", ["-c", str(model_dir)])
    exec(code, {})  # noqa: S102 - what the user runs in the environment they trust
    converted = load_model(str(model_dir) + "-safetensors")
    assert converted.text.kind == "classifier"
    ids = torch.tensor([[2, 5, 7, 8, 3, 0, 0]])
    with torch.inference_mode():
        assert torch.allclose(converted.module(ids), reference(ids), atol=1e-6)


def test_safetensors_beside_a_pickle_is_what_loads(tmp_path):
    """use_safetensors=True: transformers never falls back to (or opens) the pickle."""
    model_dir = _tiny_bert_dir(tmp_path / "m")
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    loaded = load_model(str(model_dir))
    assert loaded.text.kind == "embedding"
    with torch.inference_mode():
        assert loaded.module(torch.tensor([[2, 5, 6, 3]])).shape == (1, 32)


def test_no_weights_at_all_is_named(tmp_path):
    model_dir = _tiny_bert_dir(tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    err = _error(model_dir)
    assert "no safetensors weights" in err.what and err.found == "no weights file"


# --- JSON files of the wrong shape --------------------------------------------------------------

_ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]


def _st_dir(tmp_path, *, modules=None, pooling=None, sbert=None, config=None):
    (tmp_path / "modules.json").write_text(json.dumps(_ST_MODULES if modules is None else modules))
    (tmp_path / "1_Pooling").mkdir(exist_ok=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling or {"pooling_mode_mean_tokens": True}))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps(sbert or {"max_seq_length": 128}))
    (tmp_path / "config.json").write_text(json.dumps(config or {"model_type": "bert"}))
    return tmp_path


@pytest.mark.parametrize(
    "file, content, found",
    [
        ("config.json", [1, 2], "a JSON list"),
        ("config.json", "bert", "the JSON string 'bert'"),
        ("config.json", 3, "the JSON value 3"),
        ("config.json", None, "the JSON value None"),
        ("modules.json", {"0": "Transformer"}, "a JSON object"),
        ("modules.json", [1], "the JSON value 1"),
        ("modules.json", [{"idx": "zero", "type": "x.Transformer"}], "the JSON string 'zero'"),
        ("modules.json", [{"idx": 0, "type": ["Transformer"]}], "a JSON list"),
        ("modules.json", [], "[]"),
        ("sentence_bert_config.json", [256], "a JSON list"),
        ("sentence_bert_config.json", {"max_seq_length": "256"}, "the JSON string '256'"),
        ("sentence_bert_config.json", {"max_seq_length": True}, "the JSON value True"),
        ("1_Pooling/config.json", ["mean"], "a JSON list"),
    ],
)
def test_json_of_the_wrong_shape_names_the_file(tmp_path, file, content, found):
    _st_dir(tmp_path)
    (tmp_path / file).write_text(json.dumps(content))
    err = _error(tmp_path)
    assert err.where.startswith(str(tmp_path / file)) and err.found == found
    assert err.expected and "bug" not in str(err)


def test_a_plain_config_json_that_is_a_list_is_an_input_error(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    err = _error(tmp_path)
    assert err.what == "config.json is not a JSON object" and err.found == "a JSON list"


@pytest.mark.parametrize("config", [{"model_type": "bert", "architectures": "BertModel"},
                                    {"model_type": "bert", "architectures": [1]},
                                    {"model_type": 7}])
def test_config_fields_of_the_wrong_type(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    err = _error(tmp_path)
    assert err.where.startswith(str(tmp_path / "config.json") + ", key")


@pytest.mark.parametrize("text, what", [("[" * 200_000 + "]" * 200_000, "cannot parse config.json"),
                                        ('{"model_type": "bert",', "cannot parse config.json")])
def test_deeply_nested_or_broken_json_is_an_input_error(tmp_path, text, what):
    (tmp_path / "config.json").write_text(text)
    err = _error(tmp_path)
    assert err.what.startswith(what) and err.where == str(tmp_path / "config.json")


def test_an_oversized_or_non_utf8_config_is_refused_before_parsing(tmp_path):
    with open(tmp_path / "config.json", "wb") as f:
        f.truncate(17 * 1024 * 1024)  # sparse: nothing is written, nothing must be read
    err = _error(tmp_path)
    assert "too large" in err.what and "16,777,216" in err.expected
    (tmp_path / "config.json").write_bytes(b'{"model_type": "\xff"}')
    assert "not UTF-8" in _error(tmp_path).what


def test_module_paths_stay_inside_the_directory(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    _st_dir(model_dir, modules=[_ST_MODULES[0], {**_ST_MODULES[1], "path": "../../etc"}])
    err = _error(model_dir)
    assert "leads out of the model directory" in err.what and "../../etc" in err.found


def test_the_tiny_encoder_still_loads_and_matches_transformers(tmp_path):
    model_dir = _tiny_bert_dir(tmp_path / "m")
    loaded = load_model(str(model_dir))
    ref = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3, 0]])
    with torch.inference_mode():
        states = ref(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        mask = (ids != 0).unsqueeze(-1).float()
        mean = (states * mask).sum(1) / mask.sum(1)
        assert np.allclose(loaded.module(ids).numpy(), mean.numpy(), atol=1e-5)
    assert loaded.text.max_seq_length == 32  # min(tokenizer limit, max_position_embeddings)
