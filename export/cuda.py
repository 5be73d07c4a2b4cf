"""CUDA device code: compiled with nvcc at export time, loaded without a compiler at run time.

This TVM wheel has no CUDA runtime, so its CUDA build keeps the kernels as CUDA C source inside the library and the
runtime compiles that source when it loads the module, through the global `tvm_callback_cuda_compile`. We cannot
make the wheel embed a cubin, so export compiles the same source with nvcc into `kernels.fatbin` (one image per
--arch) and the runner registers a callback that hands TVM this fatbin when the source's hash matches: the GPU
machine needs no nvcc/NVRTC. Only a library whose source changed falls back to compiling (nvcc, cached by hash).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.loading import cache_dir

from .targets import CUDA_DEFAULT_ARCHS

FATBIN = "kernels.fatbin"


def source_hash(src: str) -> str:
    return hashlib.sha256(src.encode()).hexdigest()


def _find_nvcc() -> str | None:
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def _nvcc(src: str, archs: list[str], out: Path):
    nvcc = _find_nvcc()
    if nvcc is None:
        raise EdgequantError("nvcc not found: install the CUDA toolkit (or put nvcc on PATH) to export for cuda")
    with tempfile.TemporaryDirectory() as d:
        cu = Path(d) / "kernels.cu"
        cu.write_text(src)
        cmd = [nvcc, "-fatbin", "-O3", "-o", str(out), str(cu)]
        for a in archs:
            cmd += ["-gencode", f"arch=compute_{a[3:]},code=sm_{a[3:]}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise EdgequantError(f"nvcc failed to compile the device code: {(r.stderr.strip().splitlines() or ['?'])[-1]}")


def compile_fatbin(src: str, archs: list[str], dist: Path) -> dict:
    """Compile `src` into dist/kernels.fatbin; returns the record stored in edgequant-export.json."""
    _nvcc(src, archs, dist / FATBIN)
    return {"fatbin": FATBIN, "archs": archs, "source_sha256": source_hash(src), "kernels": src.count("__global__")}


def install_loader(dist: Path, record: dict | None):
    """Register `tvm_callback_cuda_compile` for loading this dist's library (call before load_module)."""
    import tvm_ffi
    from .dist import EXPORT_JSON, inside
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("source_sha256"), str)
                                   and isinstance(record.get("archs"), list)
                                   and all(isinstance(a, str) and re.fullmatch(r"sm_\d+a?", a) for a in record["archs"])):
        raise EdgequantError(f"{dist / EXPORT_JSON} is damaged (field 'cuda'); export the model again")
    fatbin = inside(dist, record.get("fatbin"), dist / EXPORT_JSON, "fatbin") if record else None
    want = record["source_sha256"] if record else None

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        h = source_hash(code)
        if fatbin is not None and h == want and fatbin.is_file():
            return bytearray(fatbin.read_bytes())
        if fatbin is not None and fatbin.is_file() and _find_nvcc() is None:
            # no compiler here: the shipped fatbin is the only option (its kernels are looked up by name)
            print(f"warning: CUDA source hash {h[:12]} differs from the exported {str(want)[:12]}; using the "
                  "shipped fatbin anyway", file=sys.stderr)
            return bytearray(fatbin.read_bytes())
        cache = cache_dir() / "cuda" / f"{h}.fatbin"
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            _nvcc(code, record["archs"] if record else list(CUDA_DEFAULT_ARCHS), cache)
        return bytearray(cache.read_bytes())
