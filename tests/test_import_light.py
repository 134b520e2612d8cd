import subprocess
import sys


def test_import_shrinkml_stays_light():
    code = (
        "import sys, shrinkml, shrinkml.recipe, shrinkml.report, shrinkml.measure;"
        "heavy = [m for m in ('transformers', 'onnxruntime', 'matplotlib', 'sentence_transformers', 'optuna', 'torch')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    # shrinkml.recipe imports the technique modules, which import torch (needed to run any step);
    # the top-level import and the report/measure packages must not pull in anything heavy
    top = subprocess.run(
        [sys.executable, "-c", "import sys, shrinkml; print(','.join(m for m in ('torch','onnxruntime','matplotlib','transformers') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert top == ""
    assert "onnxruntime" not in out and "matplotlib" not in out and "transformers" not in out
