"""Paths read from files: a name written inside a folder's own files may only point inside that folder.

Checkpoint indexes and DIST manifests name their shards and libraries by path; a crafted `../../x` or an absolute
path would make us open, or load code from, anywhere on the machine.
"""
from __future__ import annotations

from pathlib import Path


def inside_folder(folder: Path, name) -> Path | None:
    """`folder / name` when `name` is a non-empty relative path without `..` that resolves (symlinks included)
    inside `folder`; None otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return None
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    p = folder / rel
    try:
        return p if p.resolve().is_relative_to(folder.resolve()) else None
    except (OSError, RuntimeError):   # a symlink loop (RuntimeError before Python 3.13) names nothing usable
        return None
