"""quantize.gguf's measured choices: importance-weighted codes (imatrix), and a bits-per-weight
budget spent where the next-token KL says it matters."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

from shrinkml.data.lm import LMEncoding, lm_splits, read_texts  # noqa: E402
from shrinkml.formats import gguf_blocks as gb  # noqa: E402
from shrinkml.models import load_model  # noqa: E402
from shrinkml.techniques.quantize_gguf import QuantizeGGUFConfig, allocate, quantize_model  # noqa: E402


def _options(rng, n: int) -> dict[str, list[tuple[int, float, str]]]:
    out = {}
    for i in range(n):
        size = int(rng.integers(10, 100))
        kl = float(rng.gamma(1.0, 1.0))
        out[f"t{i}"] = [(int(size * 4.5), kl, "Q4_0"), (int(size * 5.5), kl * rng.uniform(0.1, 0.6), "Q5_0"),
                        (int(size * 8.5), kl * rng.uniform(0.0, 0.05), "Q8_0")]
    return out


def _cost(options, chosen) -> tuple[int, float]:
    pick = {n: next(o for o in options[n] if o[2] == f) for n, f in chosen.items()}
    return sum(o[0] for o in pick.values()), sum(o[1] for o in pick.values())


@pytest.mark.parametrize("seed", range(5))
def test_allocation_keeps_to_the_budget_and_is_near_the_best_choice(seed):
    rng = np.random.default_rng(seed)
    options = _options(rng, 6)
    low = sum(o[0][0] for o in options.values())
    high = sum(o[-1][0] for o in options.values())
    assert _cost(options, allocate(options, low)[0]) == (low, pytest.approx(sum(o[0][1] for o in options.values())))
    assert allocate(options, high)[0] == {n: "Q8_0" for n in options}
    previous = np.inf
    for budget in np.linspace(low, high, 7):
        chosen, used = allocate(options, budget)
        size, kl = _cost(options, chosen)
        assert size == used <= budget
        assert kl <= previous + 1e-12  # more bytes never cost quality
        previous = kl
        # against every one of the 3^6 choices within the budget: within the last upgrade's worth
        best = min(_cost(options, dict(zip(options, combo)))[1] for combo in itertools.product(*[
            [o[2] for o in opts] for opts in options.values()]) if _cost(options, dict(zip(options, combo)))[0] <= budget)
        worst_step = max(o[0][1] for o in options.values())
        assert kl <= best + worst_step
    with pytest.raises(ValueError, match="over the budget"):
        allocate(options, low - 1)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tiny_texts):
    loaded = load_model(str(tiny_llama_dir))
    splits = lm_splits(read_texts(str(tiny_texts)), LMEncoding(loaded.lm.tokenizer, context=32), seed=0,
                       fractions=None, source="t")
    return loaded, splits


def _output_error(model, quantized, windows) -> float:
    """Mean squared error of the logits of ``quantized`` against ``model`` on ``windows``."""
    ids = torch.as_tensor(windows)
    with torch.inference_mode():
        return float(((model(input_ids=ids).logits - quantized(input_ids=ids).logits) ** 2).mean())


def test_imatrix_codes_track_the_float_model_better_than_round_to_nearest(tiny):
    loaded, splits = tiny
    calib = splits.calibration.x
    errors = {}
    for method in ("rtn", "imatrix"):
        model = copy.deepcopy(loaded.module)
        codes, summary = quantize_model(model, QuantizeGGUFConfig(format="Q4_0", embedding_format="Q4_0", method=method),
                                        calib)
        assert {c.fmt.name for c in codes.values()} == {"Q4_0"}
        assert method in summary["method"]
        for name, param in model.named_parameters():  # the model holds exactly what the codes dequantize to
            if name in codes:
                np.testing.assert_array_equal(param.detach().numpy(), gb.dequantize(codes[name]))
        errors[method] = _output_error(loaded.module, model, splits.test.x)  # read on text it did not see
    assert errors["imatrix"] < errors["rtn"]


def test_a_bits_per_weight_budget_is_kept_and_spent_on_the_most_sensitive_tensors(tiny):
    loaded, splits = tiny
    model = copy.deepcopy(loaded.module)
    budget = 5.5
    config = QuantizeGGUFConfig(bits_per_weight=budget, method="imatrix", sensitivity_windows=2)
    codes, summary = quantize_model(model, config, splits.calibration.x)
    alloc = summary["allocation"]
    assert summary["bits_per_weight"] <= budget and alloc["bits_per_weight"] == pytest.approx(summary["bits_per_weight"], abs=1e-3)
    assert {c.fmt.name for c in codes.values()} <= {"Q4_0", "Q5_0", "Q8_0"}
    assert len({c.fmt.name for c in codes.values()}) > 1  # the budget bought some upgrades
    upgraded = [u["tensor"] for u in alloc["upgraded"]]
    assert upgraded and all(codes[t].fmt.name != "Q4_0" for t in upgraded)
    assert sum(alloc["tensors_by_format"].values()) == len(codes) == summary["tensors"]
    # every tensor in Q4_0 takes fewer bytes than the budget allows
    total = sum(c.codes.size for c in codes.values())
    assert summary["stored_bytes"] <= budget * total / 8


def test_budget_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="below the cheapest"):
        QuantizeGGUFConfig(bits_per_weight=4.2)
    with pytest.raises(ValueError, match="promote"):
        QuantizeGGUFConfig(bits_per_weight=5.0, promote=3)
    with pytest.raises(ValueError, match="gptq"):
        QuantizeGGUFConfig(bits_per_weight=5.0, method="gptq")
    with pytest.raises(ValueError, match="256"):
        QuantizeGGUFConfig(bits_per_weight=5.0, candidate_formats=("Q4_0", "Q6_K"))


def test_awq_scaling_keeps_the_float_function_and_lowers_the_output_error(tiny, tmp_path):
    from shrinkml.techniques.quantize_gguf import _awq_groups, awq_scale, calibration_hessians

    loaded, splits = tiny
    calib = splits.calibration.x
    model = copy.deepcopy(loaded.module)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    h, owner, _ = calibration_hessians(model, calib, names)
    chosen = awq_scale(model, h, owner, lambda m: "Q4_0",
                       lambda w, f, imp: gb.dequantize(gb.quantize_weighted(w, f, imp)))
    assert len(chosen) == len(_awq_groups(model)) and any(g["alpha"] > 0 for g in chosen)
    ids = torch.as_tensor(splits.test.x)
    with torch.inference_mode():  # scales folded into the norms and up_proj: the float model computes the same
        np.testing.assert_allclose(model(input_ids=ids).logits.numpy(), loaded.module(input_ids=ids).logits.numpy(),
                                   rtol=1e-4, atol=1e-4)
    errors = {}
    for awq in (False, True):
        m = copy.deepcopy(loaded.module)
        codes, summary = quantize_model(m, QuantizeGGUFConfig(format="Q4_0", embedding_format="Q8_0", method="imatrix",
                                                              awq=awq), calib)
        errors[awq] = _output_error(loaded.module, m, splits.test.x)
        if awq:
            assert summary["awq"]["groups"] == len(chosen)
            norms = [n for n in codes if n.endswith("layernorm.weight")]
            assert norms and all(np.array_equal(codes[n], dict(m.named_parameters())[n].detach().numpy()) for n in norms)
    assert errors[True] < errors[False]
