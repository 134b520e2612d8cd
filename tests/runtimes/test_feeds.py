"""Named feeds: one data batch becomes a multi-input model's inputs by the spec in its metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from shrinkml.errors import InputError
from shrinkml.runtimes.feeds import feeds, model_feeds, onnx_spec, set_onnx_spec, text_spec


def _text_like(tmp_path, with_spec: bool):
    """sum over tokens of ids * mask + 1000 * token types: shows which feed each input got."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])
    types = helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["b", "s"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, ["b"])
    k = helper.make_tensor("k", TensorProto.INT64, [], [1000])
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["m"]),
             helper.make_node("Mul", ["token_type_ids", "k"], ["t"]),
             helper.make_node("Add", ["m", "t"], ["a"]),
             helper.make_node("ReduceSum", ["a"], ["y"], keepdims=0, axes=[1])]
    model = helper.make_model(helper.make_graph(nodes, "g", [ids, mask, types], [out], [k]),
                              opset_imports=[helper.make_opsetid("", 11)])
    if with_spec:
        set_onnx_spec(model, text_spec(1))  # RoBERTa-style pad id 1
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return model, path


def test_text_feeds_derive_mask_and_token_types_from_ids(tmp_path):
    from shrinkml.runtimes.onnxruntime import OrtRunner

    model, path = _text_like(tmp_path, with_spec=True)
    assert onnx_spec(model) == {"kind": "text", "ids": "input_ids", "pad_token_id": 1}
    x = np.array([[0, 5, 7, 1, 1], [0, 3, 1, 1, 1]])
    f = model_feeds(model, x)
    assert f["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert not f["token_type_ids"].any()
    assert OrtRunner(path, threads=1).run(x).tolist() == [12, 3]  # pads (id 1) masked out
    # named feeds pass through as they are (what a tokenizer returns)
    given = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
    assert OrtRunner(path, threads=1).run(given).tolist() == [14, 6]


def test_a_multi_input_model_without_a_spec_is_refused_with_the_fix(tmp_path):
    from shrinkml.models.load import load_model

    _, path = _text_like(tmp_path, with_spec=False)
    with pytest.raises(InputError) as info:
        load_model(str(path))
    text = str(info.value)
    assert "takes 3 inputs" in text and "input_ids, attention_mask, token_type_ids" in text
    assert "model directory" in text
    with pytest.raises(ValueError, match="carries no shrinkml.inputs metadata"):
        feeds(np.zeros((1, 3), np.int64), [("a", None), ("b", None)], None)


def test_one_input_models_get_the_batch_cast_to_their_dtype():
    got = feeds(np.ones((2, 3), np.float64), [("input", np.dtype(np.float16))], None)
    assert list(got) == ["input"] and got["input"].dtype == np.float16
