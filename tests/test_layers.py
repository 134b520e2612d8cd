"""One layer selector: a glob selects the module it names and everything inside it, in PyTorch
modules and ONNX graphs alike, and a glob that selects nothing is an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from shrinkml.errors import InputError
from shrinkml.layers import matches, select, unmatched


def test_a_glob_selects_the_module_and_what_is_inside_it():
    assert matches("encoder.layer.0.attention.query", ["encoder.layer.0"])
    assert matches("encoder.layer.0", ["encoder.layer.0"])
    assert not matches("encoder.layer.10.output", ["encoder.layer.1"])
    assert matches("encoder.layer.10.output", ["encoder.layer.1*"])
    assert matches("classifier", ["classifier"]) and not matches("classifier_head", ["classifier"])


def test_a_glob_that_selects_nothing_is_an_error_listing_the_layers():
    names = ["features.0", "features.1", "classifier"]
    assert select(names, ["features"], where="x") == ["features.0", "features.1"]
    assert unmatched(names, ["head", "classifier"]) == ["head"]
    with pytest.raises(InputError) as info:
        select(names, ["head"], where="prune.magnitude.ignore")
    text = str(info.value)
    assert "no layer matches 'head'" in text and "classifier" in text and "prune.magnitude.ignore" in text


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4))


def test_every_technique_means_the_same_thing(tmp_path):
    """prune.magnitude's ignore, quantize.bf16's and quantize.dynamic's keep_float select the same
    layers for the same glob ('2' = the inner Sequential and its Linear)."""
    from shrinkml.runtimes.export import export_onnx
    from shrinkml.runtimes.onnx_names import module_name, select_nodes
    from shrinkml.techniques.prune_magnitude import PruneMagnitudeConfig, _prunable_weights

    model = _mlp()
    pruned = set(_prunable_weights(model, PruneMagnitudeConfig(ignore=("2",))))
    assert pruned == {"0.weight", "3.weight"}
    onnx_model = export_onnx(model, np.zeros((2, 8), np.float32))
    kept = {module_name(n) for n in select_nodes(onnx_model, ["2"], where="keep_float")}
    assert kept == {"2.0"}
    with pytest.raises(InputError, match="no layer matches 'head'"):
        select_nodes(onnx_model, ["head"], where="keep_float")


def test_prune_ignore_with_a_typo_is_refused():
    from shrinkml.techniques.prune_magnitude import PruneMagnitudeConfig, _prunable_weights

    with pytest.raises(InputError, match="no layer matches 'clasifier'"):
        _prunable_weights(_mlp(), PruneMagnitudeConfig(ignore=("clasifier",)))
