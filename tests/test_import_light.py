"""What must stay importable without the heavy libraries: each check runs in a fresh interpreter,
so modules imported by other tests in this process cannot hide an import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Libraries that cost seconds to import (torch alone ~2 s) or that only some runs need.
HEAVY = ("torch", "onnx", "onnxruntime", "transformers", "openvino", "matplotlib")


def _heavy_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the ``HEAVY`` modules it left in ``sys.modules``."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import sys
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return [m for m in last.split(",") if m]


def test_import_shrinkml_stays_light():
    assert _heavy_after("import shrinkml, shrinkml.recipe, shrinkml.report, shrinkml.measure") == []


def test_validating_a_recipe_and_documenting_techniques_import_no_heavy_library(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        steps:
          - technique: prune.magnitude
            sparsity: 0.5
          - technique: prune.channels
            channel_ratio: 0.25
          - technique: finetune
            epochs: 1
          - technique: quantize.weight_only
            bits: 4
            group_size: 64
          - technique: quantize.static
            calibration: percentile
    """))
    heavy = _heavy_after(f"""
        from shrinkml.errors import InputError
        from shrinkml.recipe import Recipe
        from shrinkml.technique_docs import render_technique_table, technique_schema
        from shrinkml.techniques.base import get_technique, registry

        recipe = Recipe.from_yaml({str(recipe)!r})
        recipe.check_model_kind("torch")
        assert [s.technique for s in recipe.steps][-1] == "quantize.static"
        try:  # a validator (group_size: a power of two) runs too
            Recipe.from_dict({{"steps": [{{"technique": "quantize.weight_only", "group_size": 48}}]}})
        except InputError as exc:
            assert "group_size" in str(exc)
        else:
            raise AssertionError("group_size 48 was accepted")
        techniques = registry()
        assert len(techniques) >= 13 and get_technique("quantize.bf16").runtime == "torch"
        for name, technique in sorted(techniques.items()):
            render_technique_table(name, technique.config_cls)
            technique_schema(technique.config_cls)
    """)
    assert heavy == []


def test_the_techniques_command_imports_no_heavy_library():
    heavy = _heavy_after("""
        import contextlib, io
        from shrinkml.cli import main
        from shrinkml.techniques.base import registry

        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["techniques"]) == 0
            for name in sorted(registry()):
                assert main(["techniques", name]) == 0
                assert main(["techniques", name, "--json"]) == 0
    """)
    assert heavy == []


def test_moved_int8_modules_still_import_from_the_technique():
    code = """
        import shrinkml.techniques.quantize_bf16 as bf16
        from shrinkml.nn import int8
        assert bf16.Int8Linear is int8.Int8Linear and bf16.dequantized_copy is int8.dequantized_copy
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
