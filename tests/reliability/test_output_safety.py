"""No lost or stranded output: a kill at any moment of replacing an output folder leaves the old or the new folder
under its name (the next run puts an old one set aside back), killed runs' temporary folders are cleaned up, two runs
cannot write the same folder at once, and output folders get the user's usual permissions."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from edgequant import api
from edgequant.atomic import atomic_output_dir, output_lock
from edgequant.errors import EdgequantError


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("kill_at", [1, 2])
def test_kill_during_replace_keeps_old_or_new_output(tmp_path, kill_at):
    """SIGKILL right before the first rename (old aside) or the second (new into place)."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "MARK").write_text("old")
    p = _child(f"""
        import os, signal
        from edgequant import atomic
        calls = [0]
        real = os.replace
        def replace(a, b):
            calls[0] += 1
            if calls[0] == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
        atomic.os.replace = replace
        with atomic.atomic_output_dir({str(final)!r}, marker="MARK") as tmp:
            (tmp / "MARK").write_text("new")
    """)
    p.wait(timeout=60)
    assert p.returncode == -9
    with output_lock(final, "MARK"):   # what the next run does first
        assert (final / "MARK").read_text() == "old"
        assert _leftovers(tmp_path, "out") == [".out.lock"]
    assert _leftovers(tmp_path, "out") == []


def test_killed_run_temporary_folders_are_removed_by_the_next_run(tmp_path):
    final = tmp_path / "out"
    p = _child(f"""
        import os, signal
        from edgequant.atomic import atomic_output_dir
        with atomic_output_dir({str(final)!r}, marker="MARK") as tmp:
            (tmp / "half").write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    p.wait(timeout=60)
    assert any(n.startswith(".out.tmp-") for n in _leftovers(tmp_path, "out"))
    with atomic_output_dir(final, marker="MARK") as tmp:
        (tmp / "MARK").write_text("done")
    assert _leftovers(tmp_path, "out") == [] and (final / "MARK").read_text() == "done"


def test_concurrent_runs_to_one_output_are_refused(tmp_path, model_dirs):
    final = tmp_path / "q"
    p = _child(f"""
        import sys, time
        from edgequant.atomic import output_lock
        with output_lock({str(final)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(EdgequantError, match="another edgequant run is writing"):
            api.quantize(model_dirs["llama"], final, method="rtn", progress=False)
        assert not final.exists()
    finally:
        p.kill()
        p.wait()
    time.sleep(0.1)
    api.quantize(model_dirs["llama"], final, method="rtn", progress=False)   # the lock dies with its holder
    assert (final / "model.safetensors").is_file()


def test_output_folder_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o755


def test_replacing_a_checkpoint_that_holds_a_users_file_is_refused(tmp_path, model_dirs):
    """`quantize -o` onto a checkpoint folder replaces it; a file the checkpoint never held (the user's notes) would
    be deleted with it, so the run is refused before any work, naming the file, and the folder stays as it was."""
    out = api.quantize(model_dirs["llama"], tmp_path / "q", method="rtn", group_size=32, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EdgequantError, match="notes.txt"):
        api.quantize(model_dirs["llama"], out, method="rtn", bits=3, group_size=32, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"} == before
    (out / "notes.txt").unlink()
    api.quantize(model_dirs["llama"], out, method="rtn", bits=3, group_size=32, progress=False)   # now it may
    assert (out / "notes.txt").exists() is False and (out / "edgequant.json").is_file()
