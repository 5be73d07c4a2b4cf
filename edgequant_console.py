"""The `edgequant` console script's target. Its first statements make Ctrl-C in the first moments (while the script
imports the `edgequant` package, before `edgequant.entry` takes over) one `error: interrupted` line and exit status 130
instead of a KeyboardInterrupt traceback. It lives outside the package because a package's `__init__` runs before
any of its modules; nothing has been written when this handler fires, so it exits at once.
"""
import os
import signal


def _early_interrupt(signum, frame):
    os.write(2, b"error: interrupted; no output was written\n")
    os._exit(130)


if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # a shell that ignores SIGINT keeps it ignored
    signal.signal(signal.SIGINT, _early_interrupt)


def main():
    from edgequant.entry import main as entry   # entry.main hands Ctrl-C back to KeyboardInterrupt, in its try
    return entry()
