"""Ctrl-C at any moment of the `edgequant` command, including while it is still importing its libraries (the first
fraction of a second), ends it with one `error: interrupted` line and status 130: no traceback, no output folder.
Ctrl-C once the command has finished (its output written and printed) leaves its own status and prints nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# what the installed console script runs (pip writes this wrapper from pyproject's [project.scripts])
CONSOLE = "import sys; from edgequant_console import main; sys.exit(main())"


def test_console_script_is_the_interrupt_safe_entry():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edgequant"] == "edgequant_console:main"


# Ctrl-C lands while `module` is being imported: a finder on sys.meta_path sends SIGINT to its own process at the
# first import of that module, which makes the early window (about 0.1 s on an idle machine) hit every time
AT_IMPORT = """
import os, signal, sys
class _Hit:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, _Hit())
""" + CONSOLE


def _check(p, out, tmp_path):
    stdout, stderr = p.communicate(timeout=120)
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert "Traceback" not in stderr + stdout, stderr
    if p.returncode == 0:   # a fast machine finished before the signal: nothing to check but the output
        assert out.is_dir()
        return
    assert p.returncode in (130, -signal.SIGINT), (p.returncode, stderr)
    assert len(lines) <= 1 and all(x.startswith("error: interrupted") for x in lines), stderr
    assert not out.exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".q.tmp-")]


def _as_at_a_terminal():
    """In the child: the default actions of Ctrl-C, SIGTERM and SIGHUP, as a terminal's command has them. A runner
    that starts pytest in the background of a non-interactive shell hands its children SIGINT ignored (and `nohup`
    SIGHUP); the command keeps an ignored signal ignored, so these tests' signals were lost and the command finished
    with 0, which `_check` accepts from a fast machine."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _quantize(model_dirs, out, code):
    return subprocess.Popen([sys.executable, "-c", code, "quantize", str(model_dirs["llama"]), "-o", str(out),
                             "--method", "rtn", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_at_a_terminal)


# edgequant.hf_hook / edgequant.entry: the package's own import, before entry's handler (the third re-run's T1)
@pytest.mark.parametrize("module", ["edgequant.hf_hook", "edgequant.entry", "click", "edgequant.methods",
                                    "edgequant.export.cli", "torch", "torch.nn"])
def test_sigint_while_importing_is_one_line(tmp_path, model_dirs, module):
    out = tmp_path / "q"
    _check(_quantize(model_dirs, out, AT_IMPORT.format(module=module)), out, tmp_path)


def test_sigint_during_a_held_import_is_raised_as_it_returns(tmp_path, monkeypatch):
    """Torch's C++ start-up calls back into Python; a KeyboardInterrupt raised in such a callback ended the command
    with std::terminate (-6). A package of `DEFERRED_IMPORTS` runs its import to the end and then raises."""
    from edgequant import entry
    pkg = tmp_path / "heldpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nimport heldpkg.rest\n")
    (pkg / "rest.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(entry, "_sigints", 0)
    finder = entry._DeferredImport(["heldpkg"])
    old = signal.signal(signal.SIGINT, entry._on_sigint)
    sys.meta_path.insert(0, finder)
    try:
        with pytest.raises(KeyboardInterrupt):
            __import__("heldpkg")
        assert "heldpkg.rest" in sys.modules   # the code after the signal ran
        assert entry.interrupted() and finder not in sys.meta_path
    finally:
        signal.signal(signal.SIGINT, old)
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        for name in ("heldpkg", "heldpkg.rest"):
            sys.modules.pop(name, None)


# Ctrl-C lands inside a weakref callback (where Python can only print "Exception ignored"), as it did in the import
# system's module-lock cleanup (`_get_module_lock.<locals>.cb`): the command printed a traceback and finished, status 0
IN_CALLBACK = """
import os, signal, sys, weakref
class _Hit:
    def find_spec(self, name, path=None, target=None):
        if name == "edgequant.methods":
            sys.meta_path.remove(self)
            class Obj:
                pass
            o = Obj()
            r = weakref.ref(o, lambda _: os.kill(os.getpid(), signal.SIGINT))
            del o
        return None
sys.meta_path.insert(0, _Hit())
""" + CONSOLE


def test_sigint_inside_a_callback_is_one_line(tmp_path, model_dirs):
    out = tmp_path / "q"
    p = _quantize(model_dirs, out, IN_CALLBACK)
    _check(p, out, tmp_path)
    assert p.returncode == 130


# a library that turns the KeyboardInterrupt into an error of its own, as TVM's callbacks do during export's compile
# (a RuntimeError and a traceback: the twelfth re-run's T22), and native code that logs on stderr as it unwinds and
# as Python's shutdown frees what it held (TVM's "BlockBuilder destroyed with remaining blocks!")
REWRAPPED = """
import atexit, os, signal, time
import edgequant.loading
from edgequant.entry import native_code
class Held:   # freed with the interrupted frame, after the error line (the thirteenth re-run's T22b)
    def __del__(self):
        os.write(2, b"[native] Warning: destroyed with remaining blocks\\n")
def load_model(*a, **k):
    atexit.register(lambda: os.write(2, b"[native] Warning: freed at shutdown\\n"))
    held = Held()
    with native_code():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            os.write(2, b"[native] Warning: destroyed with remaining blocks\\n")
            raise {error}
edgequant.loading.load_model = load_model
""" + CONSOLE


# a library's own error, or one of our checks reporting what the interrupt broke as a damaged input (a model build
# in tune-weak-columns said "config.json does not describe a valid model": the fourteenth re-run)
@pytest.mark.parametrize("error", ["RuntimeError(\"a library's own error for the interrupt\")",
                                   "__import__('edgequant.errors').errors.CheckpointError('config.json is damaged')"])
def test_sigint_a_library_rewraps_is_one_line(tmp_path, model_dirs, error):
    out = tmp_path / "q"
    p = _quantize(model_dirs, out, REWRAPPED.replace("{error}", error))
    _check(p, out, tmp_path)
    assert p.returncode == 130


# SIGTERM (kill, timeout) and SIGHUP (the terminal closed) while the command works: their default action killed it
# with no line, leaving its lock and temporary folder for the next run to remove
ENDED = """
import os, signal, time
import edgequant.loading
def load_model(*a, **k):
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
edgequant.loading.load_model = load_model
""" + CONSOLE


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_end_a_command_as_ctrl_c_does(tmp_path, model_dirs, sig):
    out = tmp_path / "q"
    p = _quantize(model_dirs, out, ENDED.format(sig=sig))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, sig), (p.returncode, stderr)
    assert stderr.strip() == f"error: interrupted ({sig}) rtn quantization; no checkpoint was written", stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def startup_s():
    """Seconds Python takes to start (site and .pth files) before any edgequant code can run: an interrupt in that
    window is Python's own "Fatal Python error: init_import_site", outside what a program can handle."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
def test_sigint_early_is_one_line(tmp_path, model_dirs, startup_s, delay):
    out = tmp_path / "q"
    p = _quantize(model_dirs, out, CONSOLE)
    time.sleep(2 * startup_s + delay)
    p.send_signal(signal.SIGINT)
    _check(p, out, tmp_path)


def test_interrupted_quantize_names_its_method_and_kept_blocks(tmp_path):
    """RTN's message spoke of OmniQuant's resume; only a method that kept finished blocks mentions them."""
    from edgequant.api import interrupted_note, resume_state_dir
    out = tmp_path / "q"
    assert interrupted_note("rtn", out) == "interrupted rtn quantization; no checkpoint was written"
    state = resume_state_dir(out)
    state.mkdir()
    (state / "block_0000.safetensors").write_bytes(b"x")
    note = interrupted_note("omniquant", out)
    assert note.startswith("interrupted omniquant quantization") and str(state) in note and "continues" in note


# Ctrl-C lands at the swap that replaces an existing output: just after it (the new checkpoint is in place) or just
# before it (the old one is intact); the third re-run saw "no checkpoint was written" over a new checkpoint (L4)
AT_SWAP = """
import os, signal
import edgequant.atomic as atomic
real = atomic._exchange
def _exchange(a, b):
    if {after}:
        done = real(a, b)
        os.kill(os.getpid(), signal.SIGINT)
        return done
    os.kill(os.getpid(), signal.SIGINT)
    return real(a, b)
atomic._exchange = _exchange
""" + CONSOLE


@pytest.mark.parametrize("after", [True, False])
def test_sigint_at_the_swap_tells_what_the_output_holds(tmp_path, model_dirs, after):
    out = tmp_path / "q"
    first = _quantize(model_dirs, out, CONSOLE)
    assert first.communicate(timeout=300) and first.returncode == 0
    p = subprocess.Popen([sys.executable, "-c", AT_SWAP.format(after=after), "quantize", str(model_dirs["llama"]),
                          "-o", str(out), "--method", "rtn", "--bits", "3", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_as_at_a_terminal)
    _, stderr = p.communicate(timeout=300)
    lines = [x for x in stderr.splitlines() if x.strip()]
    bits = json.loads((out / "config.json").read_text())["quantization_config"]["bits"]
    assert p.returncode == 130 and len(lines) == 1 and "Traceback" not in stderr, stderr
    if after:
        assert bits == 3 and lines[0].startswith(f"error: interrupted after {out} was written"), lines
        assert lines[0].endswith("(the old one is gone)"), lines
    else:
        assert bits == 4 and "no checkpoint was written" in lines[0], lines
    assert sorted(q.name for q in tmp_path.iterdir()) == ["q"]   # no .q.tmp-*, no lock left


# Ctrl-C after the command has finished (its "wrote" line is out): inside Python's shutdown, from an atexit callback or
# while the interpreter joins its threads, and from outside at delays after the last line. The output is complete, so
# the command's own status (0) and nothing on stderr; it used to be "Exception ignored ..." tracebacks or a silent -2.
AT_EXIT = {
    "atexit": "import atexit, os, signal\natexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\n",
    # SIGTERM/SIGHUP after the command returned: their default action ended it with -15 and no line (fifteenth)
    "atexit_sigterm": "import atexit, os, signal\natexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n",
    "atexit_sighup": "import atexit, os, signal\natexit.register(lambda: os.kill(os.getpid(), signal.SIGHUP))\n",
    "thread_join": """import os, signal, threading, time
def _late():
    while threading.main_thread().is_alive():
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
threading.Thread(target=_late).start()
""",
}


def _check_complete(p, out, stdout, stderr, may_be_cut_short=False):
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert stdout.startswith(f"wrote {out}"), stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    if may_be_cut_short and p.returncode == 130:   # it landed before the command had returned: the usual line
        assert len(lines) == 1 and lines[0].startswith(f"error: interrupted after {out} was written"), stderr
        return
    assert p.returncode == 0 and lines == [], (p.returncode, stderr)


@pytest.mark.parametrize("where", list(AT_EXIT))
def test_sigint_during_shutdown_keeps_the_commands_status(tmp_path, model_dirs, where):
    out = tmp_path / "q"
    p = _quantize(model_dirs, out, AT_EXIT[where] + CONSOLE)
    _check_complete(p, out, *p.communicate(timeout=300))


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_sigint_after_the_last_line_keeps_the_commands_status(tmp_path, model_dirs, delay):
    out = tmp_path / "q"
    p = _quantize(model_dirs, out, CONSOLE)
    first = p.stdout.readline()
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    _check_complete(p, out, first + stdout, stderr, may_be_cut_short=delay == 0)


def test_second_sigint_while_exiting_after_the_line(tmp_path, model_dirs):
    """Ctrl-C, the `error: interrupted` line, then Ctrl-C again while Python exits (the fourth re-run's T8 'double'):
    one line and 130, not a KeyboardInterrupt traceback from the shutdown."""
    out = tmp_path / "q"
    code = AT_EXIT["atexit"] + AT_IMPORT.format(module="edgequant.methods")
    p = _quantize(model_dirs, out, code)
    _check(p, out, tmp_path)
    assert p.returncode == 130


def test_the_interrupt_line_says_an_old_output_is_gone_only_when_there_was_one(tmp_path):
    """A Ctrl-C just after a first output landed said "(the old one is gone)" with no old one (a re-run's item)."""
    from edgequant.atomic import atomic_output_dir
    from edgequant.cli import interrupted_note
    out = tmp_path / "q"
    notes = []
    for _ in range(2):   # a fresh folder, then the same one again over the first
        with atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
        notes.append(interrupted_note("nothing"))
    assert notes[0] == f"interrupted after {out} was written; it holds the new, complete output", notes
    assert notes[1] == notes[0] + " (the old one is gone)", notes
