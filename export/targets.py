"""Every export target in one table: the TVM target dict, how the library is packaged, and where it can run.

`cpu` builds for this machine's CPU (llvm with the host's -mcpu) as a shared library; `cpu-arm64` cross-builds one for
aarch64 Linux (or a `.tar` of its objects when no aarch64 linker is installed). GPU targets pick the paged-KV-cache GPU kernels and the dlight GPU schedules; mobile targets produce a
`.tar` of objects for static linking with a system-lib prefix (the app registers the library under that prefix).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from edgequant.errors import EdgequantError

CUDA_DEFAULT_ARCHS = ("sm_80", "sm_90")


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict                    # TVM target dict (host llvm settings under "host")
    library: str                    # file name of the compiled library in the dist folder
    device: str                     # runtime device: cpu, cuda, metal, opencl, webgpu
    system_lib: bool = False        # static .tar with a system-lib prefix
    packing3: str = "words"         # 3-bit runtime layout: the checkpoint's words, "bytes3" (the CPUs' int8 decode
                                    # GEMV), "dp4a3r4" (CUDA's int8 one; "dp4a3" where N % 4), "words3x32" (CUDA's
                                    # fp16 one) or the earlier
                                    # bit planes "planes3"; see tvm_schedules/dequant.py
    zeros_packed: bool = False      # zero points four per uint32 word: OpenCL / WGSL cannot gather uint8 (dequant.py)
    app: str | None = None          # the apps/ recipe that runs this target's library outside `edgequant run`
    memory_limit: int | None = None  # bytes an app usually gets on the device; export warns past it (edgequant.memory)
    memory_limit_note: str = ""


_GPU_CUDA = {"kind": "cuda", "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
             "thread_warp_size": 32}
_METAL = {"kind": "metal", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768, "thread_warp_size": 32}

_IPHONE_MEMORY = dict(memory_limit=3 << 30, memory_limit_note="an iPhone app's usual limit on a 6 GiB device without the "
                                                              "increased-memory-limit entitlement")

PRESETS: dict[str, TargetPreset] = {p.name: p for p in [
    TargetPreset("cpu", "this machine's CPU (LLVM, host -mcpu), shared library", {"kind": "llvm"}, "lib.so", "cpu",
                 packing3="bytes3"),
    # Armv8.2 dotprod (every phone and board core since Cortex-A55/A75) for the int8 decode GEMV's `sdot`
    TargetPreset("cpu-arm64", "aarch64 Linux CPU (LLVM, Armv8.2 + dotprod), shared library (lib.tar of objects "
                 "without an aarch64 linker)",
                 {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, "lib.so", "cpu",
                 packing3="bytes3"),
    TargetPreset("cuda", "NVIDIA GPU (CUDA; --arch, default sm_80 and sm_90), shared library with fatbin",
                 _GPU_CUDA, "lib.so", "cuda", packing3="dp4a3r4", app="apps/cuda/README.md"),
    TargetPreset("metal", "macOS on Apple silicon (Metal + arm64-apple-macos), shared-object .tar",
                 {**_METAL, "max_threads_per_block": 1024, "host": {"kind": "llvm", "mtriple": "arm64-apple-macos"}},
                 "lib.tar", "metal"),
    # the iOS triples give the objects an LC_BUILD_VERSION (platform iOS / iOS simulator), which Xcode needs to place
    # a static library in an XCFramework; arm64-apple-darwin (as MLC-LLM uses) leaves it out
    TargetPreset("iphone", "iPhone/iPad (Metal + arm64-apple-ios), static system library .tar",
                 {**_METAL, "host": {"kind": "llvm", "mtriple": "arm64-apple-ios14.0", "libs": ["iphoneos"]}},
                 "lib.tar", "metal", system_lib=True, app="apps/ios/README.md", **_IPHONE_MEMORY),
    TargetPreset("iphone-sim", "iOS simulator on Apple silicon (Metal + arm64-apple-ios-simulator), static system "
                 "library .tar (the simulator slice of apps/ios's XCFramework)",
                 {**_METAL, "host": {"kind": "llvm", "mtriple": "arm64-apple-ios14.0-simulator"}},
                 "lib.tar", "metal", system_lib=True, app="apps/ios/README.md", **_IPHONE_MEMORY),
    TargetPreset("android", "Android (OpenCL + aarch64-linux-android), static system library .tar",
                 {"kind": "opencl", "max_threads_per_block": 256, "max_shared_memory_per_block": 16384,
                  "thread_warp_size": 1, "host": {"kind": "llvm", "mtriple": "aarch64-linux-android"}},
                 "lib.tar", "opencl", system_lib=True, zeros_packed=True, app="apps/android/README.md",
                 memory_limit=4 << 30, memory_limit_note="a cautious budget for one app on an 8 GiB Android phone (the "
                                                         "low-memory killer decides; there is no fixed limit)"),
    TargetPreset("webgpu", "browser WebGPU (WGSL + wasm32 objects, experimental; linking needs emscripten)",
                 {"kind": "webgpu", "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}},
                 "lib.tar", "webgpu", system_lib=True, zeros_packed=True),
]}


def target_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> TargetPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise EdgequantError(f"unknown target '{name}'; valid targets: {', '.join(PRESETS)}") from None


def parse_archs(arch: str | None) -> list[str]:
    """`--arch sm_90` or `sm_80,sm_90` (or `90`) -> ['sm_90', ...]; None -> the CUDA defaults."""
    if not arch:
        return list(CUDA_DEFAULT_ARCHS)
    out = []
    for a in str(arch).split(","):
        a = a.strip()
        a = a if a.startswith("sm_") else f"sm_{a}"
        # sm_XY: major.minor compute capability; TVM and nvcc know 5.0 and later
        if not re.fullmatch(r"sm_[1-9]\d{1,2}", a) or int(a[3:]) < 50:
            raise EdgequantError(f"--arch '{arch}' is not a CUDA architecture; use e.g. sm_80, sm_90 or sm_80,sm_90")
        out.append(a)
    return out


def tvm_target(preset: TargetPreset, arch: str | None = None):
    """The tvm.target.Target for a preset (imports tvm: call only at export time)."""
    import tvm
    d = dict(preset.target)
    if preset.name == "cpu":
        # tune for this machine's CPU; without -mcpu LLVM emits generic x86-64 with no AVX
        d["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        d["num-cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if preset.name == "cuda":
        # the kernels are compiled once per arch into one fatbin; the target's own arch is the lowest one
        d["arch"] = sorted(parse_archs(arch), key=lambda a: int(a[3:]))[0]
    return tvm.target.Target(d)
