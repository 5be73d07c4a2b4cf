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
    """Where the one-step swap is unavailable: SIGKILL right before the first rename (old aside) or the second (new
    into place)."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "MARK").write_text("old")
    p = _child(f"""
        import os, signal
        from edgequant import atomic
        atomic._exchange = lambda a, b: False
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


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_around_the_swap_leaves_a_folder_under_the_name(tmp_path, when):
    """The swap is one step: killed just before it the old output is in place, just after it the new one (issue 15's
    second re-run: a kill 0.01 s into the replace window left no folder under the name)."""
    final = tmp_path / "out"
    final.mkdir()
    (final / "MARK").write_text("old")
    p = _child(f"""
        import os, signal
        from edgequant import atomic
        real = atomic._exchange
        def exchange(a, b):
            if {when!r} == "after":
                assert real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
        atomic._exchange = exchange
        with atomic.atomic_output_dir({str(final)!r}, marker="MARK") as tmp:
            (tmp / "MARK").write_text("new")
    """)
    p.wait(timeout=60)
    assert p.returncode == -9
    assert (final / "MARK").read_text() == ("old" if when == "before" else "new")
    with output_lock(final, "MARK"):
        pass
    assert _leftovers(tmp_path, "out") == []


def test_reading_an_output_stranded_by_a_kill_says_where_it_is(tmp_path, good_ckpt, good_dist, text_file):
    """A kill between the two renames of the fallback leaves NAME missing and the old output in `.NAME.old-*`:
    `inspect`, `eval`, `export` and `run` of NAME say where it is and how to put it back, instead of "not found"."""
    from .harness import assert_one_line_error, run_commands
    import shutil
    ck, dist = tmp_path / "ck", tmp_path / "dist"
    shutil.copytree(good_ckpt, tmp_path / ".ck.old-x1y2")
    shutil.copytree(good_dist, tmp_path / ".dist.old-a1b2")
    res = run_commands([["inspect", str(ck)], ["eval", str(ck), "--data", text_file, "-q"],
                        ["export", str(ck), "--target", "cpu", "-o", str(tmp_path / "d2"), "-q"],
                        ["run", str(dist), "--prompt", "hi"]], tmp_path)
    for r in res[:3]:
        assert_one_line_error(r, str(tmp_path / ".ck.old-x1y2"), "mv ")
    assert_one_line_error(res[3], str(tmp_path / ".dist.old-a1b2"), "mv ")
    assert not ck.exists() and not dist.exists()   # reading changes nothing


def test_export_over_a_dist_holding_a_users_file_is_refused(tmp_path, good_ckpt, good_dist):
    """L2 of issue 15's second re-run: `export -o` over a DIST deleted the user's extra files in it without a word;
    like a checkpoint, a DIST is replaced only while it holds nothing but what export writes."""
    from .harness import assert_one_line_error, run_commands
    import shutil
    d = tmp_path / "dist"
    shutil.copytree(good_dist, d)
    (d / "notes.txt").write_text("keep")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    r = run_commands([["export", str(good_ckpt), "--target", "cpu", "-o", str(d), "-q"]], tmp_path)[0]
    assert_one_line_error(r, "notes.txt", "choose another output folder")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    from edgequant.export.dist import is_dist_file
    assert all(is_dist_file(p.name) for p in good_dist.iterdir())   # a plain DIST is still replaceable


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


def test_converted_weights_follow_the_umask(tmp_path, model_dirs):
    """transformers writes model.safetensors 0600 whatever the umask (eighteenth re-run, U10)."""
    old = os.umask(0o022)
    try:
        out = api.convert(model_dirs["llama"], tmp_path / "c", progress=False)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}["model.safetensors"] == 0o644


def test_exported_tokenizer_files_follow_the_umask(tmp_path):
    """A DIST's tokenizer files kept the source's 0644 under a umask of 077 (a deviation the re-runs listed)."""
    from edgequant.export.build import _copy_tokenizer
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "src" / "tokenizer.json").chmod(0o644)
    old = os.umask(0o077)
    try:
        _copy_tokenizer(tmp_path / "src", tmp_path / "dst")
    finally:
        os.umask(old)
    assert (tmp_path / "dst" / "tokenizer.json").stat().st_mode & 0o777 == 0o600


def test_a_tuned_checkpoints_files_follow_the_umask(tmp_path, model_dirs):
    """`tune-weak-columns` copied the input's config.json, edgequant.json and tokenizer files with their 0644 under a
    umask of 077 (nineteenth re-run, U14); its own files were 0600."""
    from edgequant.checkpoint import write_copy
    src = api.quantize(model_dirs["llama"], tmp_path / "q", method="rtn", group_size=32, progress=False)
    for f in src.iterdir():
        f.chmod(0o644)
    old = os.umask(0o077)
    try:
        write_copy(src, tmp_path / "t", {}, {"method": "test"})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "t").iterdir()}
    assert "config.json" in modes and set(modes.values()) == {0o600}, modes


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


def test_convert_replaces_only_its_own_outputs(tmp_path, model_dirs):
    """`convert -o` onto any model folder (its marker was config.json) replaced it and deleted what it held, the input
    itself included (sixteenth re-run, L8). Now a folder convert did not write, or the model being converted, is
    refused before any work; its own output is replaced, unless it holds a user's file."""
    import shutil
    user = tmp_path / "user-model"
    shutil.copytree(model_dirs["llama"], user)
    (user / "NOTES.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    for src in (model_dirs["qwen2"], user):
        with pytest.raises(EdgequantError, match="not an output of this command|is the model being converted"):
            api.convert(src, user, progress=False)
        assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    out = api.convert(model_dirs["llama"], tmp_path / "plain", progress=False)
    assert (out / "edgequant-convert.json").is_file()
    api.convert(model_dirs["qwen2"], out, progress=False)   # its own output: replaced
    assert '"qwen2"' in (out / "config.json").read_text()
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(EdgequantError, match="NOTES.md"):
        api.convert(model_dirs["llama"], out, progress=False)
    assert (out / "NOTES.md").read_text() == "mine"


@pytest.mark.parametrize("what", ["folder", "dangling symlink"])
def test_something_else_where_the_lock_goes_is_one_line(tmp_path, what):
    """A folder or a dangling symlink at `.NAME.lock` was an IsADirectoryError / FileNotFoundError traceback from
    every command that writes NAME (seventeenth re-run, T36)."""
    lock = tmp_path / ".out.lock"
    if what == "folder":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "no-such-dir" / "lk")
    with pytest.raises(EdgequantError, match=r"cannot use .*\.out\.lock as the lock of out .*remove it"):
        with output_lock(tmp_path / "out", marker="edgequant.json"):
            pass
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("length", [242, 255, 256])
def test_an_output_name_too_long_for_its_working_files_is_one_line(tmp_path, model_dirs, length):
    """242-255 characters are legal names, but `.NAME.tmp-XXXXXXXX` beside them is not: quantize, export and convert
    ended in an OSError traceback (sixth hostile re-run, T12); 256 failed before the lock (`is_file`)."""
    from click.testing import CliRunner

    from edgequant.cli import main
    out = tmp_path / ("c" * length)
    with pytest.raises(EdgequantError, match=f"is {length} bytes long.*at most 241"):
        with output_lock(out):
            pass
    r = CliRunner().invoke(main, ["quantize", str(model_dirs["llama"]), "-o", str(out), "--method", "rtn", "-q"])
    assert r.exit_code == 1 and r.output.startswith("error: the output folder name") and "Traceback" not in r.output
    with output_lock(tmp_path / ("c" * 241)):   # the longest that fits
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", ["safetensors", "tvm"])
def test_a_full_disk_reported_by_a_library_is_one_line(tmp_path, error):
    """safetensors (convert's save_pretrained) and TVM (a failed link) report a full disk as their own exception
    types: convert ended in a SafetensorError traceback (eleventh hostile re-run, T20)."""
    from safetensors import SafetensorError
    text = "Error while serializing: I/O error: No space left on device (os error 28)"
    with pytest.raises(EdgequantError, match="cannot write .*o \\(No space left on device\\).*nothing was changed"):
        with atomic_output_dir(tmp_path / "o") as tmp:
            (tmp / "f").write_text("x")
            raise SafetensorError(text) if error == "safetensors" else RuntimeError(f"ld: {text}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="a bug"):   # anything else is not called a disk problem
        with atomic_output_dir(tmp_path / "o"):
            raise RuntimeError("a bug")


def test_export_keeps_its_temporary_files_inside_its_output(tmp_path, good_ckpt, monkeypatch):
    """TVM links the library in a temporary folder of its own (nvcc compiles in one too): in the system's temp
    folder, a kill -9 left it there for good (eighteenth re-run, L9's kind). Now every temporary folder of an export
    is inside the output's `.NAME.tmp-*`, which the next run removes."""
    import tempfile
    from pathlib import Path

    from edgequant.export.api import export
    made, real = [], tempfile.mkdtemp

    def mkdtemp(*a, **k):
        made.append(Path(real(*a, **k)))
        return str(made[-1])
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    export(good_ckpt, "cpu", tmp_path / "dist", progress=False)
    assert len(made) > 2 and all(p.is_relative_to(tmp_path) for p in made), made
    assert [p.name for p in tmp_path.iterdir()] == ["dist"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "dist").iterdir())


def test_an_export_that_cannot_fit_is_one_line_before_anything_is_written(tmp_path, good_ckpt, monkeypatch):
    """LLVM ends the process on a failed object write ("LLVM ERROR: IO failure on output stream", no `error:`, the
    temporary folders left: eighteenth re-run, T39): the space is checked first."""
    import shutil as sh
    from edgequant.export import build
    from edgequant.export.api import export
    monkeypatch.setattr(build.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(1 << 30, 1 << 30, 5 << 20))
    with pytest.raises(EdgequantError, match=r"not enough space to write .*dist: the export needs about \d+ MiB, "
                                             r"5 MiB are free there; free some space.*nothing was changed"):
        export(good_ckpt, "cpu", tmp_path / "dist", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_llvm_ar_on_a_full_disk_is_the_outputs_one_line(tmp_path):
    """llvm-ar out of space printed its crash report after our line; copytree's shutil.Error printed its whole list
    of (source, destination, reason) with our temporary paths (eighteenth re-run, T38)."""
    import shutil
    import tarfile

    from edgequant.atomic import as_os_error
    from edgequant.export.package import merge_static_library
    obj = tmp_path / "a.o"
    obj.write_bytes(b"\x7fELF")
    with tarfile.open(tmp_path / "lib.tar", "w") as tf:
        tf.add(obj, arcname="a.o")
    for stderr, want in [("LLVM ERROR: IO failure on output stream: No space left on device\nPLEASE submit a bug "
                          "report\nStack dump:", OSError), ("LLVM ERROR: something else\nStack dump:", EdgequantError)]:
        ar = tmp_path / "ar"
        ar.write_text(f"#!/bin/sh\nprintf '{stderr}' >&2\nexit 1\n")
        ar.chmod(0o755)
        with pytest.raises(want) as e:
            merge_static_library([("m", tmp_path / "lib.tar")], "android", tmp_path / "lib.a", str(ar))
        assert "Stack dump" not in str(e.value) and "PLEASE" not in str(e.value)
        assert want is EdgequantError or e.value.errno == 28
    err = shutil.Error([("/tmp/x/tokenizer.json", "/o/.out.tmp-1/tokenizer.json",
                         "[Errno 28] No space left on device: '/o/.out.tmp-1/tokenizer.json'")])
    assert as_os_error(err).errno == 28 and as_os_error(err).strerror == "No space left on device"
