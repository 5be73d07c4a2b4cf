"""The `edgequant` console command: turns Ctrl-C at any moment, including while the command line is still importing
click, torch and transformers, into one `error: interrupted` line and exit status 130 instead of a traceback.

This module imports nothing heavy, so its handler is in place within milliseconds of the interpreter starting; the
commands themselves (`edgequant.cli`) are imported inside it. Output folders are written atomically
(`edgequant.atomic`), so an interrupt at any point leaves nothing half-written.
"""
import signal
import sys

INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C


def main():
    try:
        if getattr(signal.getsignal(signal.SIGINT), "__module__", None) == "edgequant_console":
            signal.signal(signal.SIGINT, signal.default_int_handler)   # from here on, KeyboardInterrupt cleans up
        from .cli import main as cli
        return cli()
    except KeyboardInterrupt:   # before the commands run (importing) or after they finished (exiting)
        try:
            note = "interrupted; no output was written"
            try:   # an output may be in place already (a half-imported cli is not asked)
                note = sys.modules["edgequant.cli"].interrupted_note(note)
            except (KeyError, AttributeError):
                pass
            sys.stderr.write(f"error: {note}\n")
            sys.stderr.flush()
        except (KeyboardInterrupt, OSError):
            pass
        return INTERRUPTED
