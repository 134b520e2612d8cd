"""Output safety: --out is checked before any work, never overlaps an input, is locked for the run,
and is committed whole (old complete result or new complete result, never a mix)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shrinkml.cli import main
from shrinkml.errors import InputError
from shrinkml.packaging import OutputFolder, check_out, read_marker
from shrinkml.packaging import output as output_mod

REPO = Path(__file__).resolve().parents[2]
MODEL = "usermodels_for_tests:good"


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _run(capsys, args):
    code = main(args)
    return code, capsys.readouterr().err


def _compress_args(out, *, weights="weights.safetensors", data="data.npz", recipe="recipe.yaml", model=MODEL):
    args = ["compress", "--model", model, "--data", data, "--recipe", recipe, "--out", str(out), "--repeats", "10", "--max-timing-s", "0"]
    return args + (["--weights", weights] if weights else [])


@pytest.fixture
def sentinel_project(user_project):
    """The user project plus a factory that leaves a file behind when it is called (work started)."""
    (user_project / "sentinel_models.py").write_text(textwrap.dedent(
        """
        from pathlib import Path
        import usermodels_for_tests

        def good():
            Path("factory-called").write_text("yes")
            return usermodels_for_tests.good()
        """
    ))
    return user_project


# ----------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("layout", ["out_is_inputs_folder", "out_is_parent_of_inputs", "out_is_recipe"])
def test_out_overlapping_an_input_is_refused_and_inputs_are_untouched(sentinel_project, capsys, layout):
    p = sentinel_project
    (p / "d").mkdir()
    shutil.move(p / "weights.safetensors", p / "d" / "weights.safetensors")
    shutil.move(p / "data.npz", p / "d" / "data.npz")
    out = {"out_is_inputs_folder": "d", "out_is_parent_of_inputs": ".", "out_is_recipe": "recipe.yaml"}[layout]
    before = _digest(p / "d") | _digest(p / "recipe.yaml")
    args = _compress_args(out, weights="d/weights.safetensors", data="d/data.npz", model="sentinel_models:good")
    code, err = _run(capsys, args)
    assert code == 2, err
    assert f"--out {out}" in err and "input" in err and "Fix:" in err and "Traceback" not in err
    assert not (p / "factory-called").exists(), "work started before --out was checked"
    assert _digest(p / "d") | _digest(p / "recipe.yaml") == before


@pytest.mark.parametrize(
    "out, inputs, message",
    [
        ("d", {"--model": "d/model.onnx"}, "contains an input"),
        ("d/model.onnx", {"--model": "d/model.onnx"}, "is an input"),
        ("hf/out", {"--model": "hf"}, "inside an input folder"),  # a model directory
        ("hf/sub/out", {"--model": "hf"}, "inside an input folder"),
        ("elsewhere", {"--model": "d/model.onnx", "--model2": "hf"}, None),
    ],
)
def test_check_out_overlap_rules(tmp_path, monkeypatch, out, inputs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "hf" / "sub").mkdir(parents=True)
    if message is None:
        assert check_out(out, inputs) == (tmp_path / out).resolve()
        return
    with pytest.raises(InputError, match=message):
        check_out(out, inputs)


@pytest.mark.parametrize("layout", ["existing_file", "under_a_file", "foreign_folder"])
def test_unusable_out_fails_before_any_work(sentinel_project, capsys, layout):
    p = sentinel_project
    (p / "afile").write_text("keep me")
    (p / "foreign").mkdir()
    (p / "foreign" / "notes.txt").write_text("my notes")
    out = {"existing_file": "afile", "under_a_file": "afile/out", "foreign_folder": "foreign"}[layout]
    expected = {"existing_file": "is an existing file", "under_a_file": "lies under a file",
                "foreign_folder": "shrinkml did not write"}[layout]
    code, err = _run(capsys, _compress_args(out, model="sentinel_models:good"))
    assert code == 2, err
    assert expected in err and f"--out {out}" in err and "Fix:" in err
    assert not (p / "factory-called").exists()
    assert (p / "afile").read_text() == "keep me" and (p / "foreign" / "notes.txt").read_text() == "my notes"


def test_unwritable_parent_is_refused(tmp_path, monkeypatch):
    # root ignores permission bits, so the permission answer is what the check reads
    monkeypatch.setattr(output_mod.os, "access", lambda path, mode: False)
    with pytest.raises(InputError, match="not writable"):
        check_out(tmp_path / "out", {})


# ----------------------------------------------------------------- the commit


def _commit(out, files, inputs=None):
    with OutputFolder(out, inputs or {}) as folder:
        return folder.commit(files)


def _leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_commit_replaces_a_previous_result_whole(tmp_path):
    _commit(tmp_path / "out", {"a.txt": "old a", "b.txt": "old b"})
    assert read_marker(tmp_path / "out")["files"] == {"a.txt": 5, "b.txt": 5}
    _commit(tmp_path / "out", {"a.txt": "new a!", "c.txt": b"new c"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".shrinkml-output.json", "a.txt", "c.txt"]
    assert (tmp_path / "out" / "a.txt").read_text() == "new a!"
    assert _leftovers(tmp_path) == []


def test_error_while_staging_leaves_the_old_result(tmp_path, monkeypatch):
    _commit(tmp_path / "out", {"a.txt": "old a", "b.txt": "old b"})
    real = output_mod._write_entry
    calls = []

    def failing(target, content, stage=None):
        calls.append(target.name)
        if len(calls) == 2:
            raise OSError("disk full")
        real(target, content, stage)

    monkeypatch.setattr(output_mod, "_write_entry", failing)
    with pytest.raises(OSError, match="disk full"):
        _commit(tmp_path / "out", {"a.txt": "new a", "b.txt": "new b"})
    assert (tmp_path / "out" / "a.txt").read_text() == "old a"
    assert (tmp_path / "out" / "b.txt").read_text() == "old b"
    assert _leftovers(tmp_path) == []


def test_kill_between_the_two_renames_is_recovered_by_the_next_run(tmp_path, monkeypatch):
    """Where the system cannot exchange two folders, the old result goes aside first; a crash then
    leaves --out absent, and the next run into it puts the old result back before starting."""
    _commit(tmp_path / "out", {"a.txt": "old a"})
    monkeypatch.setattr(output_mod, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise SystemExit("killed")  # the process dies here: no cleanup of ours may run
        real_rename(src, dst)

    folder = OutputFolder(tmp_path / "out", {})
    folder.__enter__()
    monkeypatch.setattr(output_mod.os, "rename", crash_on_second)
    with pytest.raises(SystemExit):
        folder.commit({"a.txt": "new a"})
    monkeypatch.setattr(output_mod.os, "rename", real_rename)
    folder._lock.release()  # what the kernel does when the process dies
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path)  # the old result is aside in the partial folder
    with OutputFolder(tmp_path / "out", {}) as again:
        assert (tmp_path / "out" / "a.txt").read_text() == "old a"  # put back first
        assert again.had_result
    assert _leftovers(tmp_path) == []


def test_second_run_into_a_locked_out_fails_naming_the_holder(user_project, capsys):
    with OutputFolder(user_project / "out", {}):
        code, err = _run(capsys, _compress_args("out"))
    assert code == 2
    assert f"PID {os.getpid()}" in err and "another shrinkml run" in err and "Fix:" in err
    assert not (user_project / "out").exists()


def test_lock_is_released_and_removed_after_the_run(tmp_path):
    _commit(tmp_path / "out", {"a.txt": "x"})
    assert not (tmp_path / ".out.lock").exists()
    _commit(tmp_path / "out", {"a.txt": "y"})  # and can be taken again
    assert (tmp_path / "out" / "a.txt").read_text() == "y"


# ----------------------------------------------------------------- signals and child processes

SLOW_DATA = textwrap.dedent(
    """
    import time
    from pathlib import Path
    import numpy as np

    def slow():
        Path("data-started").write_text("yes")
        time.sleep(60)
        return np.zeros((10, 1, 8, 8), np.float32), np.zeros(10, np.int64)
    """
)


def _env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(project), env.get("PYTHONPATH", "")])
    env["TMPDIR"] = str(project / "tmp")
    (project / "tmp").mkdir(exist_ok=True)
    return env


def _own_temp(tmp: Path) -> list[str]:
    """shrinkml's folders in the temporary directory (libraries may keep their own files there)."""
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("shrinkml"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("previous", [False, True])
def test_signal_prints_one_line_about_out_and_cleans_up(user_project, sig, code, word, previous):
    (user_project / "slow_data.py").write_text(SLOW_DATA)
    if previous:
        _commit(user_project / "out", {"report.json": '{"schema": "shrinkml.report/1"}'})
    before = _digest(user_project / "out") if previous else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "shrinkml.cli", *_compress_args("out", data="slow_data:slow")],
        cwd=user_project, env=_env(user_project), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job inherits SIGINT ignored (then Ctrl-C rightly does nothing): the
        # child gets the default disposition a user's terminal gives it, wherever pytest runs
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    _wait_for(user_project / "data-started", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    expected = "out still holds the previous result" if previous else "nothing was written to out"
    assert lines == [f"{word}; {expected}"], err
    assert _leftovers(user_project) == []
    assert (_digest(user_project / "out") if previous else None) == before
    assert not (user_project / "out").exists() or previous
    assert _own_temp(user_project / "tmp") == []


def test_peak_memory_child_dies_with_its_parent(tmp_path):
    """A parent killed with SIGKILL cannot clean up; the child asked the kernel to kill it too."""
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        code = ("import os, sys, time; sys.path.insert(0, {str(REPO)!r});"
                "from shrinkml.measure.memory import _die_with_parent;"
                "_die_with_parent(int(sys.argv[1])); print(os.getpid(), flush=True); time.sleep(60)")
        child = subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdout=subprocess.PIPE, text=True)
        print(child.stdout.readline().strip(), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(child_pid, 0)  # alive
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it became our zombie (it is not our child, so this usually raises)
            os.waitpid(child_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        with open(f"/proc/{child_pid}/stat") as stat:
            if stat.read().split()[2] == "Z":
                return
        time.sleep(0.05)
    raise AssertionError("the child outlived its killed parent")


# ----------------------------------------------------------------- SIGKILL at random moments


def _complete(out: Path) -> str | None:
    """'old' or 'new' when ``out`` is a complete result (every listed file, at its size), else None."""
    marker = read_marker(out)
    if marker is None:
        return None
    on_disk = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != ".shrinkml-output.json"}
    if on_disk != marker["files"]:
        return None
    seed = json.loads((out / "report.json").read_text())["data"]["seed"]
    return {1: "old", 2: "new"}.get(seed)


def test_sigkill_at_ten_moments_leaves_out_old_new_or_absent(user_project):
    """SIGKILL a short compress at 10 seeded moments, with and without a previous result in --out:
    --out is always absent, the complete old result or the complete new one, and the next run
    leaves no staging, lock or temporary folders behind."""
    import random

    env = _env(user_project)
    cmd = [sys.executable, "-m", "shrinkml.cli", *_compress_args("out")]

    def run(seed: int) -> float:
        start = time.monotonic()
        subprocess.run(cmd + ["--seed", str(seed)], cwd=user_project, env=env, check=True, capture_output=True)
        return time.monotonic() - start

    duration = run(1)
    shutil.copytree(user_project / "out", user_project / "old-copy")
    rng = random.Random(8)
    seen = []
    for i in range(10):
        with_previous = i % 2 == 0
        shutil.rmtree(user_project / "out", ignore_errors=True)
        if with_previous:
            shutil.copytree(user_project / "old-copy", user_project / "out")
        proc = subprocess.Popen(cmd + ["--seed", "2"], cwd=user_project, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, duration * 1.05))
        proc.kill()
        proc.wait()
        state = _complete(user_project / "out") if (user_project / "out").exists() else "absent"
        assert state in ({"old", "new", "absent"} if with_previous else {"new", "absent"}), (i, state)
        seen.append(state)
    run(2)  # the next run cleans up after the killed ones
    assert _complete(user_project / "out") == "new"
    assert _leftovers(user_project) == []
    assert _own_temp(user_project / "tmp") == []
    print("states after SIGKILL:", seen)
