"""Write an output folder all at once: fill a temporary sibling, then rename it into place.

An interrupted or failed run leaves no half-written output, and an existing folder is replaced only when it is empty
or carries `marker` (a file that our own tools write), so a mistyped `-o` never deletes a user's folder.

Replacing swaps the new folder and the old one in one atomic rename (Linux renameat2 RENAME_EXCHANGE), then deletes
the old one, so a kill at any moment leaves either the old or the new output under NAME. Where that call is missing
it is rename-aside: the old folder becomes `.NAME.old-*`, the new one takes its name, then the old one is deleted; a
kill between the two renames leaves the old one aside, the next run puts it back before anything else, and commands
that read NAME meanwhile say where it is and how to restore it (`check_not_stranded`). One run at a time may write NAME: a
lock file `.NAME.lock` beside it is held from the start of the run (before hours of calibration) to the rename; while
holding it, left-overs of killed runs (`.NAME.tmp-*`, `.NAME.old-*`) are cleaned up.
"""
from __future__ import annotations

import errno
import glob
import os
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable
from pathlib import Path

from .errors import EdgequantError

_held: dict[Path, tuple[int, int]] = {}   # path -> (lock fd, depth): a process may re-enter its own lock
_owners: dict[str, Callable[[str], bool]] = {}   # marker -> which file names an output with that marker holds
_written: list[Path] = []   # outputs this process has put in place (an interrupt message must not deny them)
_replaced: set[Path] = set()   # those of them that took the place of an older output
_building: list[Path] = []   # temporary folders being filled: an output put in place inside one is a part of it


# what a full, read-only or failing disk looks like to a writer
_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES)


def as_os_error(e: BaseException) -> OSError | None:
    """`e` as the OSError it stands for: itself, or an I/O failure a library reports as its own exception type
    (safetensors' SafetensorError "I/O error: No space left on device", TVM's RuntimeError from a failed link);
    None for anything else."""
    if isinstance(e, shutil.Error):   # copytree's list of (src, dst, why) printed whole named our temp paths (T38)
        return next((OSError(n, os.strerror(n)) for n in _IO_ERRNOS if os.strerror(n) in str(e)),
                    OSError(errno.EIO, "cannot copy files"))
    if isinstance(e, OSError):
        return e
    if isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError":
        for n in _IO_ERRNOS:
            if os.strerror(n) in str(e):
                return OSError(n, os.strerror(n))
    return None


def written_outputs() -> list[Path]:
    """The output folders this process has already put in place, newest last: after Ctrl-C, what the user has."""
    return list(_written)


def replaced_an_older(final: Path) -> bool:
    """Whether putting output `final` in place removed an older output of that name."""
    return Path(final) in _replaced


def register_owner(marker: str, owns: Callable[[str], bool]):
    """Declare the files an output marked by `marker` consists of: replacing such a folder is refused while it holds
    anything else (a user's notes would be deleted with it)."""
    _owners[marker] = owns


def check_not_the_input(out: Path, source: Path, verb: str, product: str) -> None:
    """Refuse an output folder that is the input being read, or holds it: replacing it would delete the input."""
    source = Path(source).expanduser().resolve()
    if out == source or source.is_relative_to(out):
        raise EdgequantError(f"-o {out} is the model being {verb}; choose a new folder for the {product}")


def check_replaceable(final: Path, marker: str | None):
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise EdgequantError(f"{final} is a file; choose a folder name for the output")
    if final.is_dir() and marker and any(final.iterdir()) and not (final / marker).exists():
        raise EdgequantError(f"{final} exists and is not an output of this command (it has no {marker}); choose "
                             "another output folder, or remove that one")
    owns = _owners.get(marker)
    if final.is_dir() and owns is not None:
        extra = sorted(p.name for p in final.iterdir() if not (p.is_file() and owns(p.name)))
        if extra:
            raise EdgequantError(f"{final} holds {extra[0]!r}, which edgequant did not write there; replacing the "
                                 "folder would delete it: move it out, or choose another output folder")


def _check_writable(parent: Path):
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".edgequant-write-test-", dir=parent))
        probe.rmdir()
    except OSError as e:
        raise EdgequantError(f"cannot write in {parent} ({e.strerror or e}); choose another output folder") from None


def _stranded(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{glob.escape(final.name)}.old-*"))


def check_not_stranded(path) -> None:
    """For commands that read `path`: when it is missing because a run was killed while replacing it (where
    `_exchange` is not available), say where the previous output is and how to put it back."""
    final = Path(str(path)).expanduser().absolute()
    if final.exists() or final.is_symlink():
        return
    olds = _stranded(final)
    if olds:
        raise EdgequantError(f"{final} is missing: a run that was replacing it was killed, and the previous one is "
                             f"at {olds[-1]}; restore it with `mv {shlex.quote(str(olds[-1]))} "
                             f"{shlex.quote(str(final))}` (the next run that writes {final.name} also does)")


def _recover(final: Path):
    """Undo what a killed run left behind (we hold the lock, so no other run is writing these)."""
    olds = _stranded(final)
    if olds and not final.exists():   # killed between the two renames: the old output goes back
        os.replace(olds.pop(), final)
    for p in olds + list(final.parent.glob(f".{glob.escape(final.name)}.tmp-*")):
        shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2   # linux/fs.h: swap the two names atomically


def _exchange(a: Path, b: Path) -> bool:
    """Swap folders `a` and `b` in one step with Linux's renameat2(RENAME_EXCHANGE), so that `b` holds the old or the
    new folder at every moment; False where the system or the file system cannot (then two renames are used)."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_cwd = -100
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


# the longest working name beside an output: `.NAME.tmp-` + mkdtemp's 8 characters (`.old-` alike, `.lock`, `.state`)
_SIBLING_EXTRA = len(".") + len(".tmp-") + 8


def _check_name_length(final: Path) -> None:
    """An output name the file system takes but its hidden siblings would not: refused before any work (242-255
    characters ended in an OSError traceback when the temporary folder was made)."""
    try:
        limit = os.pathconf(final.parent, "PC_NAME_MAX") if final.parent.exists() else 255
    except (OSError, ValueError):
        limit = 255
    longest = limit - _SIBLING_EXTRA
    if len(os.fsencode(final.name)) > longest:
        raise EdgequantError(f"the output folder name is {len(os.fsencode(final.name))} bytes long; edgequant keeps "
                             f"working files beside it named after it, so it may have at most {longest}: choose a "
                             "shorter name")


@contextmanager
def output_lock(final, marker: str | None = None):
    """Hold the write lock of output folder `final` for the block: checks that it may be replaced, that its parent
    is writable, that no other run is writing it, and cleans up after killed runs."""
    import fcntl
    final = Path(final).expanduser().resolve()
    if final in _held:
        fd, depth = _held[final]
        _held[final] = (fd, depth + 1)
        try:
            yield final
        finally:
            _held[final] = (fd, _held[final][1] - 1)
        return
    _check_name_length(final)
    _check_writable(final.parent)
    lock = final.parent / f".{final.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in _IO_ERRNOS:
            raise EdgequantError(f"cannot write in {final.parent} ({e.strerror or e}); choose another output "
                                 "folder") from None
        # a folder or a dangling symlink in its place was a traceback (seventeenth re-run, T36)
        raise EdgequantError(f"cannot use {lock} as the lock of {final.name} ({e.strerror or e}): it is not a lock "
                             "file edgequant made; remove it, or choose another output folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise EdgequantError(f"another edgequant run is writing {final} right now; wait for it to finish or "
                                 "choose another output folder") from None
        raise
    _held[final] = (fd, 1)
    try:
        _recover(final)
        check_replaceable(final, marker)
        yield final
    finally:
        del _held[final]
        try:
            lock.unlink()
        except OSError:
            pass
        os.close(fd)


def umask_mode() -> int:
    """The permission bits the user's umask leaves (0o755 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def atomic_output_dir(final, marker: str | None = None):
    """Yield a temporary folder; when the block completes it replaces `final` in one rename."""
    with output_lock(final, marker) as final:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.chmod(tmp, umask_mode())   # mkdtemp makes 0700; the output should look like any folder the user makes
        new_ino = None
        _building.append(tmp)
        try:
            try:
                yield tmp
            finally:
                _building.remove(tmp)
            new_ino = tmp.stat().st_ino   # after the swap, `final` is this inode: the new output is in place
            if final.exists():
                _replaced.add(final)
                if _exchange(tmp, final):   # the old output is now under the temporary name
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                    os.replace(final, aside)
                    os.replace(tmp, final)
                    shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _record_written(final)
        except BaseException as e:
            _note_if_in_place(final, new_ino)   # Ctrl-C just after the rename: `tmp` now holds the old output
            shutil.rmtree(tmp, ignore_errors=True)
            oe = as_os_error(e)
            if oe is None:
                raise
            raise EdgequantError(f"cannot write {final} ({oe.strerror or oe}); free some space or choose another "
                                 "output folder (nothing was changed)") from None


@contextmanager
def scratch_inside(folder: Path):
    """Python's temporary folder moved into `folder` (an output being built) for the block, so what libraries keep in
    temporary files (TVM's objects while it links, nvcc's source) goes with that output, also after a kill -9, when a
    rerun removes the stale `.NAME.tmp-*` (the system's temp folder kept them for good: eighteenth re-run, L9)."""
    scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=folder))
    old = tempfile.tempdir
    tempfile.tempdir = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = old
        shutil.rmtree(scratch, ignore_errors=True)


def _record_written(final: Path) -> None:
    """Remember `final` as an output the user has, unless it is a part of an output still being built (`package`'s
    per-model exports: Ctrl-C named one as "the new, complete output" just before it was deleted: eighteenth
    re-run, U7)."""
    if final not in _written and not any(final.is_relative_to(t) for t in _building):
        _written.append(final)


def _note_if_in_place(final: Path, new_ino) -> None:
    try:
        if new_ino is not None and final.stat().st_ino == new_ino:
            _record_written(final)
    except OSError:
        pass
