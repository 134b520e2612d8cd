"""What a compress run writes into ``--out``: the deployable model, its manifest (how to load it),
the resolved recipe and the reports; for text models the tokenizer and a loadable model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkml.progress import SILENT, Progress
from shrinkml.recipe import Recipe


def _text_outputs(
    loaded, state, workdir: Path, progress: Progress, *, runtime: str = "onnxruntime", threads: int = 1,
    tolerance: float = 1e-4,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """For text models: the tokenizer (to feed model.onnx) and, when the final model is still
    PyTorch, a directory sentence-transformers / transformers can load, verified in a subprocess."""
    from shrinkml.models.hf import save_text_model, verify_sentence_transformers
    from shrinkml.models.text import TextEncoder

    info = loaded.text
    tok_dir = workdir / "out-tokenizer"
    info.tokenizer.save_pretrained(str(tok_dir))
    files: dict[str, Path] = {"tokenizer": tok_dir}
    pad = info.tokenizer.pad_token_id if info.tokenizer.pad_token_id is not None else 0
    from shrinkml.runtimes import runtime as get_runtime

    prefix = "onnx" if get_runtime(runtime).artifact_format == "ONNX" else "model"  # model.onnx, or the safetensors file
    manifest: dict[str, Any] = {
        "tokenizer_dir": "tokenizer",
        f"{prefix}_input": f"int64 token ids (batch, sequence) from the tokenizer; positions equal to the pad id"
        f" {pad} are masked (the attention mask is derived inside the model); sequence length is dynamic",
        f"{prefix}_output": "L2-normalized pooled embedding (batch, hidden)" if info.kind == "embedding" and info.normalize
        else ("pooled embedding (batch, hidden)" if info.kind == "embedding" else "logits (batch, classes)"),
        "model_dir": None,
    }
    if state.kind != "torch" or not isinstance(state.torch_model, TextEncoder):
        manifest["model_dir_note"] = "the final model is an ONNX Runtime model: use model.onnx with tokenizer/"
        return files, manifest
    model_dir = workdir / "out-model"
    try:
        save_text_model(state.torch_model, info, model_dir)
    except Exception as exc:  # e.g. modules swapped for ones save_pretrained cannot write
        manifest["model_dir_note"] = f"not written: {type(exc).__name__}: {exc}"
        progress.log(f"could not write a model directory ({type(exc).__name__}); model.onnx is written")
        return files, manifest
    files["model"] = model_dir
    manifest["model_dir"] = "model"
    import torch

    if all(p.dtype == torch.float32 for p in state.torch_model.parameters()):
        from shrinkml.data.texts import generate_texts
        from shrinkml.models.hf import tokenize
        from shrinkml.models.hf_onnx import export_hf_layout

        ids = tokenize(info.tokenizer, generate_texts(4, seed=2), info.max_seq_length or 128)
        try:
            manifest["model_dir_onnx"] = export_hf_layout(
                state.torch_model, info.tokenizer, ids, model_dir / info.transformer_subdir, kind=info.kind,
                pad_token_id=pad, threads=threads, tolerance=tolerance,
            )
        except Exception as exc:  # the directory stays usable from its safetensors
            manifest["model_dir_onnx_note"] = f"onnx/model.onnx not written: {type(exc).__name__}: {exc}"
    else:
        manifest["model_dir_onnx_note"] = "no onnx/model.onnx: the model computes in bfloat16, which ONNX Runtime's CPU provider cannot run"
    import importlib.util

    if info.sentence_transformers and importlib.util.find_spec("sentence_transformers") is None:
        manifest["model_dir_note"] = "not verified: sentence-transformers is not installed (pip install 'shrinkml[text]')"
    elif info.sentence_transformers:
        from shrinkml.data.texts import generate_texts

        progress.log("checking that sentence-transformers loads the written model directory")
        min_cos = verify_sentence_transformers(model_dir, state.torch_model, info, generate_texts(8, seed=1), workdir)
        if min_cos < 0.999:
            raise RuntimeError(
                f"the written sentence-transformers directory disagrees with the compressed model"
                f" (min cosine {min_cos:.5f} < 0.999); this is a bug in shrinkml"
            )
        manifest["model_dir_load"] = "sentence_transformers.SentenceTransformer('model')"
        manifest["model_dir_min_cosine_vs_compressed"] = min_cos
    else:
        manifest["model_dir_load"] = "transformers.AutoModel.from_pretrained('model') (tokenizer in the same folder)"
    return files, manifest


def output_files(
    artifact, recipe: Recipe, report: dict, loaded, state=None, workdir: Path | None = None,
    progress: Progress = SILENT,
) -> dict[str, Path | str]:
    """Every entry of ``--out`` by name: a file or folder to copy, or the text to write."""
    import json

    from shrinkml.report import dumps_report, validate_report
    from shrinkml.report.html import render_html
    from shrinkml.report.markdown import render_markdown
    from shrinkml.runtimes import runtime as get_runtime
    from shrinkml.techniques.quantize_bf16 import is_bf16_model, load_instruction

    validate_report(report)
    model_name = "model" + artifact.path.suffix
    manifest = {
        "schema": "shrinkml.artifact/1",
        "model_file": model_name,
        "runtime": artifact.runtime,
        "source_model": loaded.source,
        "recipe_file": "recipe.yaml",
        "load": get_runtime(artifact.runtime).load_instruction(model_name),
    }
    if state is not None and state.kind == "torch" and is_bf16_model(state.torch_model):
        manifest["load"] = load_instruction(state.torch_model)
    extra: dict[str, Path] = {}
    if getattr(loaded, "text", None) is not None and state is not None and workdir is not None:
        extra, text_manifest = _text_outputs(
            loaded, state, workdir, progress, runtime=artifact.runtime,
            threads=report["runtime"]["threads"], tolerance=report["export"]["tolerance"],
        )
        manifest["text"] = text_manifest
    return {
        model_name: artifact.path,
        **extra,
        "recipe.yaml": recipe.to_yaml(),
        "manifest.json": json.dumps(manifest, indent=2) + "\n",
        "report.json": dumps_report(report),
        "report.md": render_markdown(report),
        "report.html": render_html(report),
    }
