"""The `edgequant` console command: turns Ctrl-C at any moment, including while the command line is still importing
click, torch and transformers, into one `error: interrupted` line and exit status 130 instead of a traceback.

This module imports nothing heavy, so its handler is in place within milliseconds of the interpreter starting; the
commands themselves (`edgequant.cli`) are imported inside it. Output folders are written atomically
(`edgequant.atomic`), so an interrupt at any point leaves nothing half-written.

Ctrl-C after the command has finished changes nothing: once the command has returned, its output folder is in place
and its printed output is flushed here, so the process exits with the command's own status (0 for success) and prints
nothing more. Python's shutdown that follows (atexit callbacks, torch's finalizers, thread joins, the last flush) runs
with SIGINT ignored: a KeyboardInterrupt there printed "Exception ignored ..." tracebacks, and a Ctrl-C after Python had
restored the default handler killed the process with status -2 and no message. A Ctrl-C in the instant between the
command's return and the flush still gives the usual line and 130, naming an output that was already written. After
the `error: interrupted` line the exit is not interruptible either: a second Ctrl-C printed a traceback. A Ctrl-C that
lands in a weakref callback or finalizer (where Python can only report it) is delivered again (`_unraisable`). A
Ctrl-C that a library turns into an error of its own (TVM re-raises a KeyboardInterrupt from its Python callbacks as
a RuntimeError) still ends the command as interrupted: the handler counts Ctrl-Cs (`interrupted`), and the commands'
error handling asks it before calling an unexpected error a bug.

A Ctrl-C while torch is first imported is held until that import returns (`_DeferredImport`): torch's C++ start-up
calls back into Python through pybind11, and a KeyboardInterrupt raised inside such a callback ended the process
with `std::terminate` (status -6, no line) about twice in 120 interrupted commands.

SIGTERM (`kill`, `timeout`, a service manager stopping it) and SIGHUP (its terminal closed) end a command the same way,
unless they were ignored when it started (`nohup`): the old output stays as it was, the temporary folder and lock
go, and the line names the signal (`error: interrupted (SIGTERM); ...`), with status 128 + its number. Killed by
their default action, a command left its lock and temporary folder for the next run to remove.
"""
import os
import signal
import sys
from contextlib import contextmanager

INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
_ENDING = (signal.SIGTERM, signal.SIGHUP)   # handled as Ctrl-C is (see the docstring)
_sigints = 0
_signal = signal.SIGINT   # the last of them that arrived
_deferring = 0            # depth of imports that hold a signal until they return (`_DeferredImport`)
_pending = False          # a signal arrived while one was held
DEFERRED_IMPORTS = ("torch",)   # packages whose import runs native code that calls back into Python


def interrupted() -> bool:
    """Whether Ctrl-C (or SIGTERM, SIGHUP) reached the command (through `main`'s handler)."""
    return _sigints > 0


def interrupt_status() -> int:
    """The exit status for the interrupt: 128 + the signal's number, as a shell reports a process it ended."""
    return 128 + int(_signal)


def interrupt_line(note: str) -> str:
    """`note` ("interrupted; ...") naming the signal when it was not Ctrl-C."""
    if _signal == signal.SIGINT or not note.startswith("interrupted"):
        return note
    return f"interrupted ({signal.Signals(_signal).name}){note[len('interrupted'):]}"


def _quiet_exit():
    """Once the command has returned or said it was interrupted, Ctrl-C, SIGTERM and SIGHUP change nothing: the
    process exits with the command's own status (their default action ended a finished command with -15 and no
    line: fifteenth re-run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in _ENDING:
        if signal.getsignal(sig) is _on_sigint:
            signal.signal(sig, signal.SIG_IGN)


_console = False     # set by `main`: this process is the `edgequant` command
_native = 0          # depth of `native_code` blocks
_saved_stderr = None   # stderr's descriptor while a Ctrl-C inside native code points it at /dev/null


def _on_sigint(signum, frame):
    global _sigints, _saved_stderr, _signal, _pending
    _sigints += 1
    _signal = signum
    if _deferring:
        _pending = True   # raised when the import returns
        return
    if _native and _saved_stderr is None:
        try:
            sys.stderr.flush()
            _saved_stderr = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)
            os.close(null)
        except (OSError, ValueError):
            pass
    signal.default_int_handler(signum, frame)


class _DeferredImport:
    """A `sys.meta_path` finder that runs the first import of each of `names` with signals held: the module's code
    runs to its end and the KeyboardInterrupt is raised as its import returns."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name not in self.names:
            return None
        self.names.discard(name)
        if not self.names:
            sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)   # asks the finders after this one (this name is no longer ours)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _held(spec.loader.exec_module)
        return spec


def _held(exec_module):
    def run(module):
        global _deferring, _pending
        _deferring += 1
        try:
            exec_module(module)
        finally:
            _deferring -= 1
        if _pending and not _deferring:
            _pending = False
            raise KeyboardInterrupt
    return run


@contextmanager
def native_code():
    """A block that runs native code calling back into Python (TVM's graph building and compile): a Ctrl-C there
    unwinds C++ frames that log on stderr ("BlockBuilder destroyed with remaining blocks!") before the command's one
    `error: interrupted` line, so from the Ctrl-C to the end of the block stderr's descriptor points at /dev/null."""
    global _native, _saved_stderr
    _native += 1
    try:
        yield
    finally:
        _native -= 1
        if _saved_stderr is not None and not _native:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(_saved_stderr, 2)
            os.close(_saved_stderr)
            _saved_stderr = None


def main():
    global _console
    _console = True
    try:
        handler = signal.getsignal(signal.SIGINT)
        if handler is signal.default_int_handler or getattr(handler, "__module__", None) == "edgequant_console":
            signal.signal(signal.SIGINT, _on_sigint)   # from here on, KeyboardInterrupt cleans up
        for sig in _ENDING:
            if signal.getsignal(sig) is signal.SIG_DFL:   # ignored (nohup) stays ignored
                signal.signal(sig, _on_sigint)
        sys.unraisablehook = _unraisable
        held = [m for m in DEFERRED_IMPORTS if m not in sys.modules]
        if held:
            sys.meta_path.insert(0, _DeferredImport(held))
        from .cli import main as cli
        try:
            status = cli()
        except SystemExit as e:   # click ends every command this way, success included
            status = e.code
        _flush()
        _quiet_exit()   # complete: the shutdown is not interruptible (see the docstring)
        return status
    except KeyboardInterrupt:   # before the commands run (importing), or as they returned
        try:
            note = "interrupted; no output was written"
            try:   # an output may be in place already (a half-imported cli is not asked)
                note = sys.modules["edgequant.cli"].interrupted_note(note)
            except (KeyError, AttributeError):
                pass
            sys.stderr.write(f"error: {interrupt_line(note)}\n")
            sys.stderr.flush()
            _mute_stderr()
        except (KeyboardInterrupt, OSError):
            pass
        _quiet_exit()   # said once: a second Ctrl-C during the exit changes nothing
        return interrupt_status()


def _unraisable(info):
    """A Ctrl-C that lands in a callback Python cannot raise from (a weakref callback, such as the import system's
    module-lock cleanup, or a finalizer) was printed as "Exception ignored ... KeyboardInterrupt" and the command went
    on to finish: it is delivered again to the main flow, where it ends the command as any Ctrl-C does."""
    if issubclass(info.exc_type, KeyboardInterrupt):
        # from another thread, a moment later: at once, the main thread would take it while still in this hook,
        # again a place it cannot be raised from
        import _thread
        import threading
        t = threading.Timer(0.05, _thread.interrupt_main)
        t.daemon = True
        t.start()
        return
    sys.__unraisablehook__(info)


def after_interrupt_line():
    """Once the `error: interrupted` line is written: in the `edgequant` process (not a test calling the CLI in
    process), stderr is muted, as frames the interrupt still holds (a TVM BlockBuilder left mid-function) log
    warnings when they are freed, which happens after the line."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    if _console:
        _mute_stderr()


def _mute_stderr():
    """After the one `error: interrupted` line: objects native code still holds (a TVM BlockBuilder left mid-function)
    log warnings when Python's shutdown frees them; they would follow the line."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        pass


def _flush():
    """Hand what the command printed to the terminal or pipe now, while Ctrl-C can still say it was cut short."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: the interpreter's own flush reports it as before
            pass
