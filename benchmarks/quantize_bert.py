"""Quantizing a BERT-shaped text encoder: file size, CPU latency and output fidelity, side by side.

The model is shrinkml's BERT-shaped encoder (MiniLM-L6 shape by default: hidden 384, 6 layers,
12 heads, vocab 30522, intermediate 1536; random seeded weights), on int64 token ids. In one
process, with threads pinned and every variant timed interleaved, it measures ONNX Runtime FP32,
ONNX Runtime's own ``quantize_dynamic`` (per-channel QInt8), shrinkml ``quantize.dynamic``,
shrinkml ``quantize.static`` (when that technique is present) and shrinkml ``quantize.weight_only``
(INT8, INT4, INT4 with the embedding tables quantized too), plus PyTorch eager FP32.

    python3 benchmarks/quantize_bert.py                        # batch 32, seq 128, 2 threads
    python3 benchmarks/quantize_bert.py --repeats 20 --gptq    # also INT4 GPTQ

Size is the bytes of each saved ``.onnx`` file. Cosine is the mean over the batch of each output
row's cosine similarity with PyTorch FP32 (random weights and token ids: a fidelity figure, not an
accuracy). Writes benchmarks/out/quantize_bert.json and the ``quantize_bert`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from shrinkml.atomic import write_text  # noqa: E402
from shrinkml.data.arrays import ArrayData, Splits  # noqa: E402
from shrinkml.environment import cpu_name  # noqa: E402
from shrinkml.examples.bert import bert_encoder  # noqa: E402
from shrinkml.measure.latency import time_interleaved  # noqa: E402
from shrinkml.progress import SILENT  # noqa: E402
from shrinkml.runtimes.export import export_verified  # noqa: E402
from shrinkml.runtimes.onnxruntime import OrtRunner  # noqa: E402
from shrinkml.tasks import get_task  # noqa: E402
from shrinkml.techniques import quantize_dynamic, quantize_weight_only  # noqa: E402
from shrinkml.techniques.base import ModelState, StepContext  # noqa: E402
from common import update_docs  # benchmarks/common.py (scripts run from benchmarks/)



def cosine_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def ort_quantize_dynamic(float_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out_path), weight_type=QuantType.QInt8, per_channel=True)


def findings(variants: dict[str, dict], model: torch.nn.Module) -> str:
    """The issue's targets, checked against this run's figures (written from the numbers, not by hand)."""

    def ok(name: str) -> bool:
        return name in variants and "error" not in variants[name]

    lines = []
    table = model.embeddings.word.weight
    table_mb = table.numel() * 4 / 1e6
    fp32_mb = variants["ort_fp32"]["size_bytes"] / 1e6
    if ok("wo_int4"):
        lines.append(
            f"- INT4 weight-only on the Linear layers alone makes the file {variants['wo_int4']['smaller_than_fp32']:.2f}x"
            f" smaller: the {table.shape[0]}x{table.shape[1]} word-embedding table ({table_mb:.1f} MB of the"
            f" {fp32_mb:.1f} MB FP32 file) stays float."
        )
    for name, label in (("wo_int4_emb", "group 32"), ("wo_int4_g128_emb", "group 128"), ("wo_int4_gptq_emb", "GPTQ, group 32")):
        if ok(name):
            v = variants[name]
            verdict = "meets" if v["smaller_than_fp32"] >= 6 else "misses"
            lines.append(
                f"- With `quantize_embeddings: true` (tables as `GatherBlockQuantized`), INT4 {label}:"
                f" {v['smaller_than_fp32']:.2f}x smaller ({verdict} the 6x target), cosine {v['cosine_vs_fp32']:.4f}."
            )
    for name in ("shrinkml_dynamic", "shrinkml_static", "ort_quantize_dynamic"):
        if ok(name):
            v = variants[name]
            verdict = "meets" if v["speedup_vs_ort_fp32"] >= 1.3 else "misses"
            lines.append(f"- `{name}`: {v['speedup_vs_ort_fp32']:.2f}x the speed of ONNX Runtime FP32 ({verdict} the"
                         " 1.3x target for INT8 at batch 32 x 128).")
    wo = [variants[n]["speedup_vs_ort_fp32"] for n in variants if n.startswith("wo_") and ok(n)]
    if wo:
        lines.append(
            f"- Weight-only models run at {min(wo):.2f}-{max(wo):.2f}x the speed of FP32 here: `MatMulNBits` dequantizes"
            " weight blocks and multiplies in float32, and at 4,096 tokens per batch the products are compute-bound."
            " Their gain is the file size; small-batch latency was not measured by this benchmark."
        )
    return "\n".join(lines)


def make_ctx(calibration: ArrayData, threads: int, seed: int, workdir: Path) -> StepContext:
    empty = calibration.subset(np.arange(0))
    return StepContext(
        splits=Splits(calibration, empty, calibration, source="random token ids", seed=seed),
        task=get_task("fidelity"), teacher=None, example_input=calibration.x[:2], seed=seed,
        threads=threads, progress=SILENT, workdir=workdir,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed interleaved rounds (>= 10)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences (static, GPTQ, SQNR)")
    parser.add_argument("--gptq", action="store_true", help="also INT4 GPTQ (adds ~1 min of quantization)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "quantize_bert.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error("--repeats must be at least 10 (median and p95 need them)")

    import onnxruntime as ort

    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    model = bert_encoder(seed=args.seed)
    vocab = model.embeddings.word.num_embeddings
    rng = np.random.default_rng(args.seed)
    calibration = ArrayData(rng.integers(0, vocab, (args.calibration, args.seq)).astype(np.int64))
    x = rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int64)  # timed batch, not calibration
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()

    try:  # written by another part of the project; measured when present
        from shrinkml.techniques import quantize_static
    except ImportError as exc:
        quantize_static = None
        print(f"note: shrinkml quantize.static not measured ({exc})", flush=True)

    variants: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ctx = make_ctx(calibration, args.threads, args.seed, tmp)
        paths: dict[str, Path] = {}

        def save(name: str, proto: onnx.ModelProto, seconds: float, summary: dict | None = None) -> None:
            paths[name] = tmp / f"{name}.onnx"
            onnx.save(proto, paths[name])
            variants[name] = {"quantize_seconds": seconds, "summary": summary or {}}
            print(f"[{name}] ready in {seconds:.1f} s, {paths[name].stat().st_size / 1e6:.1f} MB", flush=True)

        t0 = time.perf_counter()
        float_model, export_diff = export_verified(model, ctx.example_input, tolerance=1e-4, threads=args.threads)
        save("ort_fp32", float_model, time.perf_counter() - t0, {"export_max_abs_diff": export_diff})

        t0 = time.perf_counter()
        ort_quantize_dynamic(paths["ort_fp32"], tmp / "ort_quantize_dynamic.onnx")
        paths["ort_quantize_dynamic"] = tmp / "ort_quantize_dynamic.onnx"
        variants["ort_quantize_dynamic"] = {"quantize_seconds": time.perf_counter() - t0, "summary": {}}

        state = ModelState("torch", torch_model=model)
        steps = [("shrinkml_dynamic", quantize_dynamic.apply, quantize_dynamic.QuantizeDynamicConfig())]
        if quantize_static is not None:
            steps.append(("shrinkml_static", quantize_static.apply,
                          quantize_static.QuantizeStaticConfig(calibration_size=args.calibration)))
        wo = quantize_weight_only.QuantizeWeightOnlyConfig
        steps += [
            ("wo_int8", quantize_weight_only.apply, wo(bits=8, calibration_size=args.calibration)),
            ("wo_int4", quantize_weight_only.apply, wo(bits=4, calibration_size=args.calibration)),
            ("wo_int4_emb", quantize_weight_only.apply, wo(bits=4, quantize_embeddings=True,
                                                          calibration_size=args.calibration)),
            ("wo_int4_g128_emb", quantize_weight_only.apply, wo(bits=4, group_size=128, quantize_embeddings=True,
                                                               calibration_size=args.calibration)),
        ]
        if args.gptq:
            steps.append(("wo_int4_gptq_emb", quantize_weight_only.apply,
                          wo(bits=4, method="gptq", quantize_embeddings=True, calibration_size=args.calibration)))
        for name, apply, config in steps:
            t0 = time.perf_counter()
            try:
                result = apply(state, config, ctx)
            except Exception as exc:  # one failing variant must not hide the others' figures
                print(f"[{name}] FAILED: {type(exc).__name__}: {exc}", flush=True)
                variants[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            summary = {k: v for k, v in result.summary.items() if k != "layers"}
            save(name, result.state.onnx_model, time.perf_counter() - t0, summary)
            variants[name]["config"] = config.model_dump(mode="json")

        runners = {name: OrtRunner(path, threads=args.threads) for name, path in paths.items()}
        for name, runner in runners.items():
            variants[name]["size_bytes"] = paths[name].stat().st_size
            variants[name]["cosine_vs_fp32"] = cosine_rows(runner.run(x), reference)

        def eager():
            with torch.inference_mode():
                return model(torch.from_numpy(x))

        fns = {"pytorch_fp32": eager, **{name: (lambda r=runner: r.run(x)) for name, runner in runners.items()}}
        print(f"timing {len(fns)} variants, {args.repeats} interleaved rounds ...", flush=True)
        t0 = time.perf_counter()
        stats = time_interleaved(fns, warmup=2, repeats=args.repeats)
        timing_s = time.perf_counter() - t0
        del runners
    variants["pytorch_fp32"] = {"cosine_vs_fp32": 1.0}
    base = stats["ort_fp32"].p50_ms
    fp32_size = variants["ort_fp32"]["size_bytes"]
    for name, s in stats.items():
        variants[name]["latency_ms"] = s.to_dict()
        variants[name]["speedup_vs_ort_fp32"] = base / s.p50_ms
        if "size_bytes" in variants[name]:
            variants[name]["smaller_than_fp32"] = fp32_size / variants[name]["size_bytes"]

    given = argv if argv is not None else sys.argv[1:]
    report = {
        "benchmark": "quantize_bert",
        "command": " ".join(["python3 benchmarks/quantize_bert.py", *map(shlex.quote, given)]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "threads": args.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        "settings": {"batch": args.batch, "seq": args.seq, "calibration_sequences": args.calibration,
                     "repeats": args.repeats, "warmup": 2, "seed": args.seed,
                     "model": "bert_encoder(hidden=384, layers=6, heads=12, vocab=30522, intermediate=1536)"},
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "timing_seconds": timing_s,
        "variants": variants,
    }
    write_text(args.out, json.dumps(report, indent=2, default=float) + "\n")

    labels = {
        "pytorch_fp32": "PyTorch FP32 (eager)",
        "ort_fp32": "ONNX Runtime FP32",
        "ort_quantize_dynamic": "ORT `quantize_dynamic` (QInt8, per-channel)",
        "shrinkml_dynamic": "shrinkml `quantize.dynamic`",
        "shrinkml_static": "shrinkml `quantize.static`",
        "wo_int8": "shrinkml `quantize.weight_only` INT8 g32",
        "wo_int4": "shrinkml `quantize.weight_only` INT4 g32",
        "wo_int4_emb": "... INT4 g32 + embeddings INT4",
        "wo_int4_g128_emb": "... INT4 g128 + embeddings INT4",
        "wo_int4_gptq_emb": "... INT4 g32 GPTQ + embeddings INT4",
    }
    rows = []
    for name, v in variants.items():
        if "error" in v:
            rows.append(f"| {labels.get(name, name)} | failed: {v['error'][:80]} | | | | |")
            continue
        lat = v["latency_ms"]
        size = f"{v['size_bytes'] / 1e6:.1f} MB ({v['smaller_than_fp32']:.2f}x)" if "size_bytes" in v else "—"
        rows.append(f"| {labels.get(name, name)} | {size} | {lat['p50']:.0f} | {lat['p95']:.0f} | "
                    f"{v['speedup_vs_ort_fp32']:.2f}x | {v['cosine_vs_fp32']:.4f} |")
    table = ("| variant | `.onnx` size (smaller vs FP32) | p50 ms | p95 ms | speed vs ORT FP32 | cosine vs FP32 |\n"
             "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    print(table)

    load = report["load_average"]
    section = f"""## Quantizing a BERT-shaped encoder (MiniLM-L6 shape), batch {args.batch} x {args.seq} tokens

- Command: `{report['command']}`
- Machine: {report['machine']['cpu']}, {os.cpu_count()} logical cores, {args.threads} threads pinned (torch and
  ONNX Runtime intra-op); load average (1/5/15 min) {load['start'][0]:.2f}/{load['start'][1]:.2f}/{load['start'][2]:.2f}
  before, {load['end'][0]:.2f}/{load['end'][1]:.2f}/{load['end'][2]:.2f} after.
- Versions: torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__},
  Python {platform.python_version()}. Date: {report['date']}.
- Model: `{report['settings']['model']}`, random seeded weights, random token ids; {args.calibration} calibration
  sequences (static ranges, GPTQ, SQNR), a separate timed batch. Latency: every variant interleaved in one
  process, 2 warm-up calls discarded, {args.repeats} timed rounds, p50 and p95 per batch of {args.batch}.
- Size: bytes of the saved `.onnx` file. Cosine: mean over the batch of the cosine similarity of each output
  row with PyTorch FP32.

{table}

{findings(variants, model)}
"""
    if not args.no_docs:
        update_docs(args.docs, "quantize_bert", section)
    return report


if __name__ == "__main__":
    main()
