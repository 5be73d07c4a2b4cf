"""Fixtures of the reliability corpus: one good OWQ checkpoint (zero points, fp16 outlier columns) and its cpu DIST,
built once; each case copies them, damages the copy and runs the real CLI on it (see harness.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def good_ckpt(owq_checkpoint):
    return owq_checkpoint


@pytest.fixture(scope="session")
def good_dist(good_ckpt, tmp_path_factory):
    from edgequant.export.api import export
    return export(good_ckpt, "cpu", tmp_path_factory.mktemp("reliability-dist") / "dist", progress=False)


def copy_case(src: Path, root: Path, name: str) -> Path:
    d = root / name / src.name
    shutil.copytree(src, d)
    return d


def edit_json(path: Path, fn):
    data = json.loads(path.read_text())
    out = fn(data)
    path.write_text(json.dumps(data if out is None else out))


def edit_header(path: Path, fn):
    """Rewrite a safetensors file's JSON header through `fn(header)` (the data bytes stay as they are)."""
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    header = fn(header) or header
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b[8 + n:])


def edit_tensor(folder: Path, name: str, fn):
    """Replace one tensor of model.safetensors by `fn(array)` (same dtype and shape), keeping everything else."""
    from safetensors.numpy import load_file, save_file
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    arr = tensors[name].copy()
    tensors[name] = np.ascontiguousarray(fn(arr)).astype(arr.dtype)
    save_file(tensors, str(f), metadata={"format": "pt"})


def dist_record(dist: Path, suffix: str) -> tuple[dict, dict]:
    """(shard record, tensor record) of the first parameter whose name ends with `suffix`."""
    cache = json.loads((dist / "tensor-cache.json").read_text())
    for shard in cache["records"]:
        for r in shard["records"]:
            if r["name"].endswith(suffix):
                return shard, r
    raise KeyError(suffix)


def edit_dist_tensor(dist: Path, suffix: str, fn):
    """Overwrite the bytes of one DIST parameter in its shard by `fn(array)`."""
    shard, r = dist_record(dist, suffix)
    path = dist / shard["dataPath"]
    data = bytearray(path.read_bytes())
    arr = np.frombuffer(bytes(data[r["byteOffset"]:r["byteOffset"] + r["nbytes"]]), dtype=r["dtype"]).copy()
    new = np.ascontiguousarray(fn(arr)).astype(r["dtype"]).tobytes()
    data[r["byteOffset"]:r["byteOffset"] + len(new)] = new
    path.write_bytes(bytes(data))
    # a consistent hostile file: the shard's md5sum follows its new bytes, so the check under test is reached
    import hashlib
    cache_file = dist / "tensor-cache.json"
    cache = json.loads(cache_file.read_text())
    for s in cache["records"]:
        if s["dataPath"] == shard["dataPath"]:
            s["md5sum"] = hashlib.md5(bytes(data)).hexdigest()
    cache_file.write_text(json.dumps(cache))
