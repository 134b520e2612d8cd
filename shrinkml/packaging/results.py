"""What a compress run writes into ``--out``: the deployable model, its manifest (how to load it),
the resolved recipe and the reports; for text models the tokenizer and a loadable model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrinkml.progress import SILENT, Progress
from shrinkml.recipe import Recipe


def _ir_files(onnx_path: Path, workdir: Path) -> dict[str, Path]:
    """``openvino/openvino_model.xml`` and ``.bin``: the measured ONNX file converted to OpenVINO IR
    (weights as they are, not recompressed to float16), the files optimum-intel loads."""
    import openvino as ov

    ir = workdir / "out-openvino"
    ir.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(ir / "openvino_model.xml"), compress_to_fp16=False)
    return {"openvino_model.xml": ir / "openvino_model.xml", "openvino_model.bin": ir / "openvino_model.bin"}


def _text_outputs(
    loaded, state, artifact, workdir: Path, progress: Progress, *, threads: int = 1, tolerance: float = 1e-4,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """For text models: the tokenizer (to feed model.onnx) and ``model/``, a sentence-transformers /
    transformers directory. Its ``onnx/model.onnx`` is the measured ONNX file itself (hard-linked:
    ``SentenceTransformer(dir, backend="onnx")``), ``openvino/`` that file as OpenVINO IR when the run
    measured OpenVINO (``backend="openvino"``), and its safetensors weights when the final model is
    still PyTorch (the default backend; checked in a subprocess against the compressed model)."""
    import posixpath

    from shrinkml.models.hf import copy_text_dir, save_text_model, verify_sentence_transformers
    from shrinkml.models.text import TextEncoder
    from shrinkml.packaging.output import SameAs

    info = loaded.text
    tok_dir = workdir / "out-tokenizer"
    info.tokenizer.save_pretrained(str(tok_dir))
    files: dict[str, Any] = {"tokenizer": tok_dir}
    pad = info.tokenizer.pad_token_id if info.tokenizer.pad_token_id is not None else 0
    embedding = "L2-normalized pooled embedding (batch, hidden)" if info.kind == "embedding" and info.normalize \
        else ("pooled embedding (batch, hidden)" if info.kind == "embedding" else "logits (batch, classes)")
    manifest: dict[str, Any] = {"tokenizer_dir": "tokenizer", "model_dir": "model", "model_dir_load": {}}
    if artifact.path.suffix == ".onnx":
        manifest["onnx_inputs"] = ("input_ids, attention_mask and, for BERT-like models, token_type_ids: int64"
                                   " (batch, sequence) as the tokenizer returns them; batch and sequence are dynamic")
        manifest["onnx_outputs"] = {"logits": embedding} if info.kind == "classifier" else {
            "sentence_embedding": embedding, "last_hidden_state": "token states (batch, sequence, hidden), unpooled"}
    else:
        manifest["model_input"] = (f"int64 token ids (batch, sequence); positions equal to the pad id {pad} are"
                                   " masked (an attention mask may be passed too)")
        manifest["model_output"] = embedding
    encoder = state.kind == "torch" and isinstance(state.torch_model, TextEncoder)
    model_dir = workdir / "out-model"
    try:
        if encoder:
            save_text_model(state.torch_model, info, model_dir)
        else:
            copy_text_dir(info, model_dir)
    except Exception as exc:  # e.g. modules swapped for ones save_pretrained cannot write
        manifest.update(model_dir=None, model_dir_note=f"not written: {type(exc).__name__}: {exc}")
        progress.log(f"could not write a model directory ({type(exc).__name__}); the model file is written")
        return files, manifest
    files["model"] = model_dir
    sub = posixpath.join("model", info.transformer_subdir) if info.transformer_subdir else "model"
    st = info.sentence_transformers
    loader = "sentence_transformers.SentenceTransformer('model'{})" if st else (
        "optimum ORTModel / OVModel .from_pretrained('model'{})")
    if artifact.path.suffix == ".onnx":
        files[f"{sub}/onnx/model.onnx"] = SameAs("model.onnx")
        manifest["model_dir_load"]["onnx"] = loader.format(", backend='onnx'") + " (needs optimum)"
        if artifact.runtime == "openvino":
            for name, path in _ir_files(artifact.path, workdir).items():
                files[f"{sub}/openvino/{name}"] = path
            manifest["model_dir_load"]["openvino"] = loader.format(", backend='openvino'") + " (needs optimum-intel)"
    elif encoder:
        import torch

        if all(p.dtype == torch.float32 for p in state.torch_model.parameters()):
            import onnx

            from shrinkml.data.texts import generate_texts
            from shrinkml.models.hf import tokenize
            from shrinkml.runtimes.export import export_verified

            ids = tokenize(info.tokenizer, generate_texts(4, seed=2), info.max_seq_length or 128)
            try:
                model, _ = export_verified(state.torch_model, ids, tolerance=tolerance, threads=threads)
                onnx.save(model, str(workdir / "out-hf.onnx"))
                files[f"{sub}/onnx/model.onnx"] = workdir / "out-hf.onnx"
                manifest["model_dir_load"]["onnx"] = loader.format(", backend='onnx'") + " (needs optimum)"
            except Exception as exc:  # the directory stays usable from its safetensors
                manifest["model_dir_onnx_note"] = f"onnx/model.onnx not written: {type(exc).__name__}: {exc}"
        else:
            manifest["model_dir_onnx_note"] = ("no onnx/model.onnx: the model computes in bfloat16, which ONNX"
                                               " Runtime's CPU provider cannot run")
    if not encoder:
        return files, manifest
    import importlib.util

    if st and importlib.util.find_spec("sentence_transformers") is None:
        manifest["model_dir_note"] = "not verified: sentence-transformers is not installed (pip install 'shrinkml[text]')"
    elif st:
        from shrinkml.data.texts import generate_texts

        progress.log("checking that sentence-transformers loads the written model directory")
        min_cos = verify_sentence_transformers(model_dir, state.torch_model, info, generate_texts(8, seed=1), workdir)
        if min_cos < 0.999:
            raise RuntimeError(
                f"the written sentence-transformers directory disagrees with the compressed model"
                f" (min cosine {min_cos:.5f} < 0.999); this is a bug in shrinkml"
            )
        manifest["model_dir_load"]["torch"] = loader.format("")
        manifest["model_dir_min_cosine_vs_compressed"] = min_cos
    else:
        manifest["model_dir_load"]["torch"] = "transformers.AutoModel.from_pretrained('model') (tokenizer in the same folder)"
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
    extra: dict[str, Any] = {}
    if getattr(loaded, "text", None) is not None and state is not None and workdir is not None:
        extra, text_manifest = _text_outputs(
            loaded, state, artifact, workdir, progress,
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
