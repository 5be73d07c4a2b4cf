"""Building apps/runtime with CMake, exporting through the CLI, and the C API of apps/runtime/include/edgequant_runtime.h
through ctypes (a module beside the tests, so that test files can import it)."""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "apps" / "runtime"


def cmake_build(build: Path, *defines: str, source: Path = RUNTIME) -> Path:
    """Configure and build `source` (apps/runtime) into `build` (incremental: a second call only rebuilds what
    changed)."""
    import tvm
    import tvm_ffi
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:   # parallel test workers must not configure one build folder at the same time
        build = build.with_name(f"{build.name}-{worker}")
    cmd = ["cmake", "-S", str(source), "-B", str(build), f"-DTVM_ROOT={Path(tvm.__file__).parent}",
           f"-DTVM_FFI_ROOT={Path(tvm_ffi.__file__).parent}", *defines]
    for c in (cmd, ["cmake", "--build", str(build), "-j2"]):   # two cores at most: the machine is shared
        r = subprocess.run(c, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(c)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return build


def export_cli(checkpoint, target: str, out: Path) -> Path:
    from click.testing import CliRunner
    from edgequant.cli import main
    r = CliRunner().invoke(main, ["export", str(checkpoint), "--target", target, "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return out


class Info(ctypes.Structure):
    _fields_ = [("vocab_size", ctypes.c_int32), ("context_window", ctypes.c_int32),
                ("max_total_seq_len", ctypes.c_int32), ("seq_len", ctypes.c_int32),
                ("weight_bytes", ctypes.c_uint64), ("kv_cache_bytes", ctypes.c_uint64),
                ("target", ctypes.c_char_p), ("device", ctypes.c_char_p)]


class Options(ctypes.Structure):
    _fields_ = [("max_total_seq_len", ctypes.c_int32), ("system_lib_prefix", ctypes.c_char_p)]


STATUS = {"OK": 0, "ARGUMENT": 1, "NOT_FOUND": 2, "DAMAGED": 3, "UNSUPPORTED": 4, "CAPACITY": 5, "STATE": 6,
          "RUNTIME": 7}


class CApi:
    """libedgequant_runtime.so through ctypes, with the signatures of include/edgequant_runtime.h."""

    def __init__(self, path: Path):
        L = self.lib = ctypes.CDLL(str(path))
        P, i32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)
        for name, args in (("edgequant_open", [ctypes.c_char_p, ctypes.POINTER(Options), ctypes.POINTER(P)]),
                           ("edgequant_prefill", [P, i32p, ctypes.c_size_t]),
                           ("edgequant_decode", [P, ctypes.c_float, ctypes.c_float, i32p]),
                           ("edgequant_logits", [P, ctypes.POINTER(ctypes.POINTER(ctypes.c_float)),
                                                 ctypes.POINTER(ctypes.c_size_t)]),
                           ("edgequant_reset", [P, ctypes.c_uint64]),
                           ("edgequant_get_info", [P, ctypes.POINTER(Info)])):
            getattr(L, name).argtypes, getattr(L, name).restype = args, ctypes.c_int
        L.edgequant_close.argtypes, L.edgequant_close.restype = [P], None
        L.edgequant_last_error.restype = ctypes.c_char_p
        L.edgequant_status_name.restype = ctypes.c_char_p

    def error(self) -> str:
        return self.lib.edgequant_last_error().decode()

    def open(self, dist, max_total_seq_len=0, system_lib_prefix=None):
        """(status, handle or None)"""
        h = ctypes.c_void_p()
        opts = Options(max_total_seq_len, system_lib_prefix.encode() if system_lib_prefix else None)
        s = self.lib.edgequant_open(str(dist).encode(), ctypes.byref(opts), ctypes.byref(h))
        return s, h if s == 0 else None

    def prefill(self, h, ids) -> int:
        arr = (ctypes.c_int32 * len(ids))(*ids)
        return self.lib.edgequant_prefill(h, arr, len(ids))

    def decode(self, h, temperature=0.0, top_p=1.0):
        """(status, token)"""
        tok = ctypes.c_int32(-1)
        return self.lib.edgequant_decode(h, temperature, top_p, ctypes.byref(tok)), tok.value

    def logits(self, h):
        import numpy as np
        p, n = ctypes.POINTER(ctypes.c_float)(), ctypes.c_size_t()
        assert self.lib.edgequant_logits(h, ctypes.byref(p), ctypes.byref(n)) == 0, self.error()
        return np.ctypeslib.as_array(p, shape=(n.value,)).copy()

    def info(self, h) -> Info:
        i = Info()
        assert self.lib.edgequant_get_info(h, ctypes.byref(i)) == 0, self.error()
        return i

    def generate(self, h, ids, n, temperature=0.0, top_p=1.0, seed=0):
        assert self.lib.edgequant_reset(h, seed) == 0, self.error()
        assert self.prefill(h, ids) == 0, self.error()
        out = []
        for _ in range(n):
            s, tok = self.decode(h, temperature, top_p)
            assert s == 0, self.error()
            out.append(tok)
        return out
