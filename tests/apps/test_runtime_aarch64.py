"""apps/runtime on aarch64: cross-compiled with Debian's aarch64-linux-gnu-g++ against the TVM runtime of the aarch64
apache-tvm / apache-tvm-ffi wheels, run under qemu-aarch64 on a `cpu-arm64` export of the tiny OWQ model. Its greedy
tokens must equal those of the x86-64 `cpu` export run by `edgequant run`'s Runner, on the exact fp decode path and
on the default int8 decode path (vpdpbusd/vpmaddubsw on x86, NEON sdot on aarch64: the same integer sums and the same
fp32 operations after them, tvm_schedules/cpu_int8.py). The aarch64 library is disassembled with Debian's
aarch64-linux-gnu-objdump to find the sdot instructions.

.ci/install-cross.sh installs what this needs (apt: g++-aarch64-linux-gnu, qemu-user-static; PyPI: the aarch64
wheels, unpacked into the cache); the test calls it and skips, with the script's one-line reason, only where an
install failed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from .runtime_capi import ROOT, cmake_build, export_cli

pytestmark = pytest.mark.tvm

PROMPT = [1, 5, 9, 200, 17, 42, 3]
LONG = [(i * 37 + 11) % 320 for i in range(300)]    # > prefill_chunk_size (256): two prefill chunks


@pytest.fixture(scope="module")
def cross():
    """(qemu, sysroot, folder of the aarch64 TVM libraries), after .ci/install-cross.sh."""
    from edgequant.loading import cache_dir
    r = subprocess.run([str(ROOT / ".ci" / "install-cross.sh")], capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "PYTHON": sys.executable})
    reason = (r.stderr.strip().splitlines() or [f"install-cross.sh exited with {r.returncode}"])[0]
    libs = cache_dir() / "aarch64-tvm"
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    sysroot = "/usr/aarch64-linux-gnu"
    if not (shutil.which("aarch64-linux-gnu-g++") and qemu and shutil.which("cmake")
            and (libs / "tvm/lib/libtvm_runtime.so").is_file() and (libs / "tvm_ffi/lib/libtvm_ffi.so").is_file()):
        pytest.skip(reason)
    return qemu, sysroot, libs


@pytest.fixture(scope="module")
def arm_build(cross):
    _, _, libs = cross
    return cmake_build(ROOT / "build" / "test-runtime-aarch64",
                       f"-DCMAKE_TOOLCHAIN_FILE={ROOT / 'apps/runtime/cmake/aarch64-linux-gnu.cmake'}",
                       f"-DTVM_LIB_DIR={libs / 'tvm/lib'}", f"-DTVM_FFI_LIB_DIR={libs / 'tvm_ffi/lib'}")


def _elf_aarch64(path) -> bool:
    b = path.read_bytes()[:20]
    return b[:4] == b"\x7fELF" and int.from_bytes(b[18:20], "little") == 183   # EM_AARCH64


@pytest.mark.parametrize("act", [pytest.param("fp16", marks=pytest.mark.slow), "int8"])   # CI time: int8 is the default
def test_aarch64_greedy_tokens_equal_x86(cross, arm_build, checkpoint, tmp_path, monkeypatch, act):
    _greedy_tokens_equal_x86(cross, arm_build, checkpoint, tmp_path, monkeypatch, act)


@pytest.mark.slow
def test_aarch64_e8_output_layer_greedy_tokens_equal_x86(cross, arm_build, tokenizer, tmp_path, monkeypatch):
    """A tied 8-bit table (`--embed-bits 8`): its decode GEMV (tvm_schedules/cpu_int8_w8.py) is NEON sdot on codes
    flipped by 128 on aarch64, vpdpbusd on the codes themselves on x86 (same integer sums up to the offset's exact
    term; fp32 order differs slightly): greedy tokens still agree."""
    sys.path.insert(0, str(ROOT / "tests" / "export"))
    from test_export_permodule import mixed_checkpoint
    ckpt = mixed_checkpoint(tmp_path / "e8", tokenizer, "llama", True, 8)
    _greedy_tokens_equal_x86(cross, arm_build, ckpt, tmp_path, monkeypatch, "int8")


def _greedy_tokens_equal_x86(cross, arm_build, checkpoint, tmp_path, monkeypatch, act):
    from edgequant.export.runtime import Runner
    qemu, sysroot, _ = cross
    monkeypatch.setenv("EDGEQUANT_ACT_DTYPE", act)
    cpu_dist = export_cli(checkpoint, "cpu", tmp_path / "x86")
    dist = export_cli(checkpoint, "cpu-arm64", tmp_path / "arm64")
    assert (dist / "lib.so").is_file() and _elf_aarch64(dist / "lib.so")   # linked by the aarch64 linker
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        asm = subprocess.run([objdump, "-d", str(dist / "lib.so")], capture_output=True, text=True, check=True).stdout
        n_sdot = len(re.findall(r"\tsdot\s+v\d+\.4s", asm))
        assert (n_sdot > 0) == (act == "int8"), n_sdot
    cli = arm_build / "edgequant-runtime-cli"
    assert _elf_aarch64(cli)
    x86 = Runner(cpu_dist, load_tokenizer=False)
    env = {**os.environ, "TVM_NUM_THREADS": "2"}

    def run(*args):
        return subprocess.run([qemu, "-L", sysroot, str(cli), str(dist), *map(str, args)], capture_output=True,
                              text=True, timeout=300, env=env)

    for ids, n in ((PROMPT, 32), (LONG, 8)):
        r = run(*ids, n)
        assert r.returncode == 0, r.stderr
        assert [int(t) for t in r.stdout.strip().split(",")] == x86.generate(ids, n, stop_ids=()).tokens
        assert "target cpu-arm64" in r.stderr
    if act == "fp16":
        r = run(1, 320, 4)   # the aarch64 build refuses ids past the vocabulary too
        assert r.returncode == 1 and "outside the vocabulary" in r.stderr and r.stdout.strip() == ""
    if not objdump:
        pytest.skip("aarch64-linux-gnu-objdump missing (binutils-aarch64-linux-gnu, .ci/install-cross.sh): "
                    "tokens checked, instructions not")
