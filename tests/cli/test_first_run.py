"""What a new user meets first: --version, --debug anywhere, technique tables, bench output,
help written per command."""

from __future__ import annotations

import json
import re
from importlib.metadata import version

import pytest

from shrinkml.cli import main
from shrinkml.errors import InputError


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"shrinkml {version('shrinkml')}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_taken_before_or_after_the_command(user_project, where):
    args = ["compress", "--model", "m.onnx", "--data", "nope.npz", "--recipe", "recipe.yaml"]
    with pytest.raises(InputError):  # --debug re-raises instead of printing one paragraph
        main(["--debug", *args] if where == "before" else [*args, "--debug"])


def test_technique_table_lists_every_key_with_its_meaning(capsys):
    assert main(["techniques", "prune.magnitude"]) == 0
    out = capsys.readouterr().out
    for heading in ("key", "type", "default", "range", "description"):
        assert heading in out
    assert "sparsity" in out and "[0, 1)" in out


def test_technique_json_is_its_schema(capsys):
    assert main(["techniques", "prune.magnitude", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert all(field.get("description") for field in schema["properties"].values())


def test_unknown_technique_names_the_list(capsys):
    assert main(["techniques", "prune.nope"]) == 2
    err = capsys.readouterr().err
    assert "prune.magnitude" in err and "Fix:" in err


def test_each_command_has_its_own_help(capsys):
    helps = {}
    for command in ("compress", "bench", "explain", "demo", "techniques"):
        assert main([command, "--help"]) == 0
        helps[command] = capsys.readouterr().out
    first_lines = {c: next(line for line in h.splitlines() if line.strip() and "Usage" not in line) for c, h in helps.items()}
    assert len(set(first_lines.values())) == len(first_lines), first_lines
    assert "--random-weights" in helps["bench"] and "--max-drop" not in helps["bench"]


def test_bench_prints_units_and_cis(user_project, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one row per line
    code = main(["bench", "--model", "usermodels_for_tests:good", "--weights", "weights.safetensors",
                 "--data", "data.npz", "--repeats", "10", "--max-timing-s", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert " ms" in out and " MB" in out and "95% CI" in out
    assert not re.search(r"\$0\.0+(?![0-9])", out)  # a cost is never printed as a bare $0.0000
