"""Write an output folder all at once: fill a temporary sibling, then rename it into place.

An interrupted or failed run leaves no half-written output, and an existing folder is replaced only when it is empty
or carries `marker` (a file that our own tools write), so a mistyped `-o` never deletes a user's folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgequantError


def check_replaceable(final: Path, marker: str | None):
    if final.exists() and not final.is_dir():
        raise EdgequantError(f"{final} is a file; choose a folder name for the output")
    if final.is_dir() and marker and any(final.iterdir()) and not (final / marker).exists():
        raise EdgequantError(f"{final} exists and was not written by edgequant (no {marker}); choose another "
                             "output folder")


@contextmanager
def atomic_output_dir(final, marker: str | None = None):
    """Yield a temporary folder; when the block completes it replaces `final` in one rename."""
    final = Path(final).expanduser().resolve()
    check_replaceable(final, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
