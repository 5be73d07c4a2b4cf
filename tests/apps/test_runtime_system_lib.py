"""apps/runtime's system-library path, the one the iOS and Android apps use: a model exported as a static system
library (lib.tar of objects, symbols under a prefix) is linked whole into a program together with the runtime, and
`edgequant_open` with `system_lib_prefix` finds it through ffi.SystemLib. Done here on x86-64 with an llvm target
(no phone needed): the greedy tokens equal those of the same target exported as a shared library."""
import dataclasses
import shutil
import subprocess
import tarfile

import pytest

from .runtime_capi import ROOT, export_cli

PREFIX = "tinysys_"


def test_system_library_linked_into_a_program(runtime_build, checkpoint, tmp_path, monkeypatch):
    import tvm
    import tvm_ffi
    from click.testing import CliRunner

    from edgequant.cli import main
    monkeypatch.setenv("EDGEQUANT_ACT_DTYPE", "fp16")   # the exact decode path in both builds
    from edgequant.export import targets
    shared = export_cli(checkpoint, "cpu", tmp_path / "shared")
    # the same `cpu` preset as a static system library (the DIST's target stays a name every runtime knows)
    monkeypatch.setitem(targets.PRESETS, "cpu", dataclasses.replace(targets.PRESETS["cpu"], library="lib.tar",
                                                                      system_lib=True))
    static = tmp_path / "static"
    r = CliRunner().invoke(main, ["export", str(checkpoint), "--target", "cpu", "-o", str(static),
                                  "--system-lib-prefix", PREFIX, "-q"])
    assert r.exit_code == 0, r.output
    objs = tmp_path / "objs"
    with tarfile.open(static / "lib.tar") as tf:
        tf.extractall(objs, filter="data")
    tvm_lib, ffi_lib = tvm.__file__.rsplit("/", 1)[0] + "/lib", tvm_ffi.__file__.rsplit("/", 1)[0] + "/lib"
    exe = tmp_path / "app"
    cmd = [shutil.which("g++") or "g++", "-std=c++17", "-o", str(exe), str(ROOT / "apps/runtime/cli/main.cc"),
           f"-I{ROOT / 'apps/runtime/include'}", "-Wl,--whole-archive", *map(str, sorted(objs.glob("*.o"))),
           "-Wl,--no-whole-archive", f"-L{runtime_build}", "-ledgequant_runtime", f"-L{tvm_lib}", "-ltvm_runtime",
           f"-L{ffi_lib}", "-ltvm_ffi", f"-Wl,-rpath,{runtime_build}:{tvm_lib}:{ffi_lib}", "-ldl", "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ids, n = ["1", "9", "40", "7", "3"], "10"

    def tokens(*args):
        p = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout.strip().replace(",", " ").split()

    want = tokens(runtime_build / "edgequant-runtime-cli", shared, *ids, n)
    assert len(want) == int(n)
    assert tokens(exe, "--system-lib-prefix", PREFIX, static, *ids, n) == want
    # a prefix that no linked library carries is refused with a status, not a crash
    p = subprocess.run([str(exe), "--system-lib-prefix", "other_", str(static), *ids, n], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "other_" in p.stderr and "Traceback" not in p.stderr
