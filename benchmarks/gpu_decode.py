"""Decode GEMV speed on a CUDA GPU: our TIR kernels (`tvm_schedules/gemv.py`) for the LLaMA-7B linears at W4 g128 /
W3 g128 / W2 g64 / W3 g128 with OWQ's fp16 outlier columns (3.1 bits), against the copy bandwidth, torch's int4 GEMV
and cuBLAS fp16, measured in one run.

Two steps, because TVM compiles here and the GPU machine has only torch (no TVM compiler):

    python benchmarks/gpu_decode.py build [--out .device/gpu-decode] [--baseline OLD_GEMV.py] [--quick]   # here
    python3 benchmarks/gpu_decode.py run [--out .device/gpu-decode] [--save [DIR]]      # on the GPU machine

`build` compiles every (rows, steps) config of the sweep (or only `default_config`'s with --quick) from TIR to CUDA C
to an sm_90 cubin and records ptxas' register counts; `--baseline` adds the default kernels of an earlier gemv.py
(`git show REV:tvm_schedules/gemv.py`), so old and new kernels meet in the same run. `run` loads the cubin through the
CUDA driver (ctypes), checks every kernel against a torch dequantize reference on the device (output poisoned with
NaN first), and times each linear as CUDA-graph replays over enough weight copies (>= 512 MiB) that nothing is served
from L2. Bytes per linear = packed weights + scales + zeros (+ outlier columns); "% roofline" divides their rate by
the faster of a streaming-read kernel and a device-to-device copy ((read + write bytes) / time), both over 1 GiB. The
step table adds up all 32 layers' linears: the decode tokens/s a model would reach if nothing but these linears ran.
The whole step is also measured as one CUDA graph of
the 128 launches (each layer its own weights), plainly and with programmatic dependent launch (PDL: the int8 kernels
carry griddepcontrol, launched here through cuLaunchKernelEx, as TVM's runtime launches an sm_90 export's GEMVs:
export/pdl.py), and
torch int4 the same way, and two floors of the step's 128 dependent launches: empty kernels of the W4 GEMVs' grid
and block shapes and of uniform grids of 132 to 1376 blocks (plain and PDL; the PDL trigger after or before the
wait), and the grid barriers one persistent kernel would pay instead (one counter or 32, 792 or 132 blocks).
`--acts ...,dense` adds the decode kernels of an fp16 (unquantized) export: `tvm_schedules/dense_gemv.py` (PDL;
its default config and, without --quick, DENSE_SWEEP) and, as the previous kernel, each linear as dlight's GEMV rule
schedules it, with cuBLAS fp16 over the same step as the peer. `run --repeat N`
measures the whole-step graphs N times (one pass over all schemes after another) and reports each time's median.
Writes benchmarks/results/gpu-<device>.md.

Prefill (`tvm_schedules/mma_gemm.py`, tensor cores): the same linears at W4 g128 and W2 g64 for prompts of
32/128/256/512/2048 tokens, each kernel config of PREFILL_SWEEP checked against the torch reference and timed the same
way, with torch fp16 (`torch.matmul`, cuBLAS) as the peer in the same run; the prefill table adds up the 32 layers'
linears (tokens / time: the prefill rate a model would reach if nothing but these linears ran). `run --prefill-only`
skips decode (and then writes gpu-<device>-prefill.md).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import re
import sys
import time
from pathlib import Path

SHAPES = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
SCHEMES = [("W4 g128", 4, 128, 0.0, None), ("W3 g128", 3, 128, 0.0, None), ("W2 g64", 2, 64, 0.0, None),
           ("W3 g128 + OWQ 3.1", 3, 128, 0.1, None),   # fp16 outlier columns worth 0.1 bit per weight
           ("W3 g128 planes3", 3, 128, 0.0, "planes3"), ("W3 g128 + OWQ 3.1 planes3", 3, 128, 0.1, "planes3"),
           ("W3 g128 dp4a3", 3, 128, 0.0, "dp4a3")]
# (name, bits, group, outlier bits, 3-bit layout: None = the export's (with int8 activations the CUDA preset's
# packing3, dp4a3r4: 4 rows interleaved; gemv.LAYOUT otherwise); planes3 and dp4a3 (one row at a time: what CUDA
# exports stored before dp4a3r4): earlier layouts, int8 activations only, for comparison; `build --layouts3` picks)
ACTS = ("int8", "fp16", "dense")   # int8: activations quantized per 32 values in the kernel, dp4a; fp16: exact
# float kernel; dense: the fp16-weight decode kernels of an unquantized export (dense_gemv, and dlight's GEMV rule
# as before: DenseLinear through the export's scheduling passes)
DENSE_SCHEME = "fp16 (export: dense_gemv)"   # tvm_schedules/dense_gemv.py (PDL)
DENSE_PREV = "fp16 (previous export: dlight GEMV)"
DENSE_SWEEP = tuple((r, w, u, d) for r in (2, 4, 8) for w in (4, 8) for u, d in ((2, 1), (4, 1), (1, 2), (2, 2)))
# (rows per block, warps per block, 8-value pieces per batch, register buffers): dense_gemv.DenseConfig, per linear
SWEEP = ((4, 2, 2, 32, 0, 0, 1, 1, 0), (4, 4, 2, 32, 0, 0, 1, 1, 0), (4, 8, 2, 32, 0, 0, 1, 1, 0),
         (2, 8, 2, 32, 0, 0, 1, 1, 0), (4, 4, 2, 64, 0, 0, 1, 1, 0), (4, 8, 2, 64, 0, 0, 1, 1, 0),
         (4, 4, 2, 32, 8, 0, 1, 1, 0), (4, 2, 2, 32, 8, 0, 1, 1, 0), (4, 4, 2, 32, 0, 1, 1, 1, 0),
         (4, 4, 2, 32, 0, 0, 0, 1, 0), (4, 2, 2, 32, 0, 1, 1, 1, 0))
QUICK = ((4, 4, 2, 32, 0, 0, 1, 1, 0), (4, 4, 2, 32, 6, 0, 1, 1, 0), (4, 4, 2, 32, 7, 0, 1, 1, 0),
         (4, 2, 2, 32, 0, 0, 1, 1, 0),
         (4, 4, 2, 32, 0, 0, 1, 2, 0), (4, 4, 2, 32, 6, 0, 1, 2, 0), (4, 2, 2, 32, 0, 0, 1, 2, 0),
         (4, 2, 2, 32, 6, 0, 1, 2, 0), (4, 4, 2, 32, 0, 0, 1, 1, 1), (4, 4, 2, 32, 0, 0, 1, 1, 3),
         (4, 2, 2, 32, 0, 0, 1, 1, 1))
# --quick: the default and these
# (rows per step, steps per block, buffers, values per thread (32 or 64 at 2 and 3 bits; 4 bits: 32), blocks per SM
# that ptxas must fit (0: no cap; only where a block has <= 4 warps), L2 prefetch of the block's rows at its start
# (gemv.prefetch_plan; 1: tag "p"), transposed warp reduction (gemv.xreduce_stages; 0: tag "x"), steps loaded into
# registers before the activations and the PDL wait (GemvConfig.ahead; tag "aN" unless 1), further steps each thread
# asks L2 for at the start (GemvConfig.l2ahead; tag "lN")[, blocks of rows per thread block (GemvConfig.groups; tag
# "gN"; 1 if absent)]) tried per linear
# besides the default; `--baseline` adds the previous gemv.py's default kernels. An earlier sweep (results of
# 2026-11-29 19:39) also tried 8 and 16 rows, 8 steps x 8 rows and buffers 3: never more than noise ahead
LAYERS = 32
PREFILL_SCHEMES = [("W4 g128", 4, 128), ("W2 g64", 2, 64)]   # 3 bits: no tensor-core kernel (dlight)
PREFILL_TOKENS = (32, 128, 256, 512, 2048)   # 256: the export's prefill chunk (edgequant/memory.py PREFILL_CHUNK)
PREFILL_SWEEP = ((128, 128, 128, 16, 4, 2), (128, 64, 128, 16, 4, 3), (128, 64, 128, 16, 4, 4), (64, 64, 64, 16, 4, 4),
                 (64, 128, 64, 16, 4, 2), (128, 128, 128, 16, 2, 2, 64), (128, 64, 128, 16, 2, 3, 64),
                 (64, 64, 64, 16, 4, 4, 64), (128, 64, 128, 16, 2, 2, 64, 2), (128, 64, 128, 16, 4, 2, 32, 2),
                 (64, 64, 64, 16, 4, 2, 64, 2))
# (bm, bn, wm, wn, stages, min blocks per SM[, K per stage[, warps along K]]): mma_gemm.MmaConfig. The sweep of
# 2026-11-29 16:47 also tried 128x128 in 3 stages, 64x64 tiles of 32x32 warps and 128x64 of 64x32 warps: never the best
RESULTS = Path(__file__).resolve().parent / "results"


def n_outliers(k: int, extra_bits: float) -> int:
    """fp16 columns that add `extra_bits` per weight to a row of K (OWQ's 3.1 bits: 26 of 4096)."""
    return round(extra_bits * k / 16)


# ------------------------------------------------------------------------------------------------ build (here)
def _load_baseline(path: str):
    """An earlier gemv.py (e.g. `git show REV:tvm_schedules/gemv.py > /tmp/gemv_prev.py`) as a module of the package,
    so that its kernels run in the same benchmark run as the current ones."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("edgequant.tvm_schedules._gemv_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _load_baseline_mma(path: str):
    """An earlier mma_gemm.py, its CUDA symbols renamed (eq_mma_ -> eq_mmaprev_, its include guard) so that its
    kernels and the current ones share one CUDA module."""
    import types
    src = open(path).read().replace("EDGEQUANT_MMA_GEMM", "EDGEQUANT_MMAPREV_GEMM").replace("eq_mma_", "eq_mmaprev_")
    mod = types.ModuleType("edgequant.tvm_schedules._mma_baseline")
    mod.__package__ = "edgequant.tvm_schedules"
    sys.modules[mod.__name__] = mod  # its dataclasses look their module up by name
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def build(out: Path, arch: str, baseline: str | None, quick: bool, device_nvcc: bool, prefill_only: bool = False,
          acts: tuple[str, ...] = ACTS, decode_only: bool = False, jobs: int = 1, export_layouts: bool = False,
          configs: tuple[tuple[int, ...], ...] | None = None, linears: tuple[str, ...] | None = None,
          baseline_mma: str | None = None, prefill_sweep: bool = False, layouts3: tuple[str, ...] | None = None):
    import tvm

    from edgequant.export.targets import PRESETS
    from edgequant.tvm_schedules.dequant import QuantSpec, layout_for_rows
    from edgequant.tvm_schedules.gemv import (LAYOUT, LAYOUT_INT8, GemvConfig, chunk_of, default_config, gemv_func,
                                              warps_for)

    out.mkdir(parents=True, exist_ok=True)
    funcs, manifest = {}, []

    def add(name, func, scheme, bits, g, lin, n, k, spec, cfg, dflt, nout, grid, block, act="fp16", pdl=False):
        funcs[name] = func.with_attr("global_symbol", name)
        manifest.append({"name": name, "kernel": f"{name}_kernel", "scheme": scheme, "act": act, "bits": bits,
                         "pdl": pdl,
                         "group": g,
                         "linear": lin, "n": n, "k": k, "config": cfg, "default": dflt, "words": spec.words,
                         "n_groups": spec.n_groups, "layout": spec.layout, "n_outliers": nout,
                         "grid": grid, "block": block})

    for (scheme, bits, g, extra, lay), act in [(s, a) for a in acts if a != "dense" for s in SCHEMES] \
            if not prefill_only else []:
        if lay and (act != "int8" or (lay not in layouts3 if layouts3 is not None else export_layouts)):
            continue
        for lin, n, k in SHAPES:
            export3 = layout_for_rows(PRESETS["cuda"].packing3, n) if act == "int8" and bits == 3 else None
            spec = QuantSpec(n, k, bits, g, False, lay or export3 or (LAYOUT_INT8 if act == "int8" else LAYOUT)[bits])
            nout = n_outliers(k, extra)
            dflt = default_config(spec, act=act, n_outliers=nout)
            dchunk = chunk_of(bits, act, dflt)
            dkey = (dflt.rows, dflt.steps, dflt.depth, dchunk, dflt.min_blocks, int(dflt.prefetch), int(dflt.xreduce),
                    dflt.ahead, dflt.l2ahead, dflt.groups)
            tried = {dkey}
            if act == "int8":  # fp16 activations run their default config only
                sweep = [tuple(c) + (1,) * (10 - len(c)) for c in (configs if configs is not None else
                                                                    QUICK if quick else SWEEP)]
                tried |= {c for c in sweep if (not linears or lin in linears) and n % c[0] == 0
                          and (spec.layout != "dp4a3r4" or (c[0] % 4 == 0 and c[3] == 32 and not c[5] and not c[8]))
                          and -(-n // c[0] // c[1]) >= 132
                          and (bits != 4 or c[3] == 32) and (not c[4] or warps_for(spec, act, c[3]) <= 4)
                          and c[7] <= min(c[1], c[2]) and c[8] < c[1] and _groups_fit(n, c, warps_for(spec, act, c[3]))}
            for rows, steps, depth, chunk, minb, pf, xr, ahead, l2, grp in sorted(tried):
                cfg = GemvConfig(rows, warps_for(spec, act, chunk), steps, depth,
                                 chunk if chunk != chunk_of(bits, act) else 0, minb, bool(pf), bool(xr), ahead, l2,
                                 groups=grp)
                tag = ("o" if nout else "") + ("i8" if act == "int8" else "")
                cname = (f"r{rows}s{steps}" + (f"d{depth}" if depth != 2 else "") + (f"c{chunk}" if bits != 4 else "")
                         + (f"b{minb}" if minb else "") + ("p" if pf else "") + ("" if xr else "x")
                         + (f"a{ahead}" if ahead != 1 else "") + (f"l{l2}" if l2 else "")
                         + (f"g{grp}" if grp > 1 else ""))
                name = f"w{bits}{tag}{lay or ''}_{lin}_{cname}"
                pdl = act == "int8"   # griddepcontrol: a no-op unless launched with programmatic serialization
                add(name, gemv_func(spec, cfg, n_outliers=nout, name=name, act=act, pdl=pdl),
                    scheme + (" int8 act" if act == "int8" else ""), bits, g, lin, n, k, spec,
                    cname, (rows, steps, depth, chunk, minb, pf, xr, ahead, l2, grp) == dkey, nout,
                    [cfg.blocks(n), 1, 1],
                    [32, cfg.warps, grp], act, pdl)
            if baseline and act == "int8" and not lay:   # the previous gemv.py's default kernel, in the same run
                prev = _load_baseline(baseline)
                # in the layout the export stored with it where the earlier gemv.py does not read today's
                pspec = spec if prev.supports(spec, act) else QuantSpec(n, k, bits, g, False, LAYOUT_INT8[bits])
                pc = prev.default_config(pspec, act=act, n_outliers=nout)
                name = f"w{bits}{'o' if nout else ''}prev_{lin}"
                add(name, prev.gemv_func(pspec, pc, name=name, act=act, n_outliers=nout, pdl=True),
                    f"{scheme} int8 act (previous kernel)", bits, g, lin, n, k, pspec,
                    f"r{pc.rows}s{pc.steps}", True, nout, [-(-n // pc.rows // pc.steps), 1, 1], [32, pc.warps, 1],
                    act, True)
    from edgequant.tvm_schedules.dense_gemv import DenseConfig, dense_gemv_func
    from edgequant.tvm_schedules.dense_gemv import default_config as dense_default
    for lin, n, k in SHAPES if "dense" in acts and not prefill_only else []:
        dflt = dense_default(n, k)
        for cfg in sorted({dflt} | ({DenseConfig(*c) for c in DENSE_SWEEP if n % c[0] == 0} if not quick else set()),
                          key=lambda c: (c.rows, c.warps, c.unroll, c.depth)):
            cname = f"r{cfg.rows}w{cfg.warps}u{cfg.unroll}d{cfg.depth}"
            name = f"f16g_{lin}_{cname}"
            add(name, dense_gemv_func(n, k, cfg, name=name, pdl=True), DENSE_SCHEME, 16, 0, lin, n, k,
                _DenseSpec(n, k), cname, cfg == dflt, 0, [-(-n // cfg.rows), 1, 1], [32, cfg.warps, 1], "dense", True)
        name = f"f16_{lin}"   # the previous fp16 export's kernel: dlight's GEMV rule, in the same run
        func, grid, block = dense_func(n, k, arch)
        add(name, func, DENSE_PREV, 16, 0, lin, n, k, _DenseSpec(n, k), "dlight", True, 0, grid, block, "dense")
        manifest[-1]["out_param"] = func.params[-1].name
    from edgequant.tvm_schedules.mma_gemm import MmaConfig, config_tag, default_config as mma_default, gemm_func
    for scheme, bits, g in PREFILL_SCHEMES if not decode_only else []:
        for lin, n, k in SHAPES:
            spec = QuantSpec(n, k, bits, g, False)
            picks = {m_: mma_default(spec, m_) for m_ in PREFILL_TOKENS}   # the export's kernel per prompt length
            sweep = set() if quick and not prefill_sweep else {MmaConfig(*c) for c in PREFILL_SWEEP if n % c[1] == 0}
            cfgs = {c for c in set(picks.values()) | sweep if c.fits(spec)}
            for cfg in sorted(cfgs, key=lambda c: (c.bm, c.bn, c.wm, c.wn, c.stages, c.min_blocks)):
                cname = config_tag(cfg)
                name = f"p{bits}_{lin}_{cname}"
                add(name, gemm_func(spec, cfg, name=name), scheme, bits, g, lin, n, k, spec, cname,
                    [m_ for m_, c in picks.items() if c == cfg], 0,
                    [cfg.bm, n // cfg.bn, 1], [cfg.threads, 1, 1], "prefill")   # grid[0]: rows per block (x)
            if baseline_mma:   # the previous mma_gemm.py's default kernels, in the same run
                prev = _load_baseline_mma(baseline_mma)
                ppicks = {m_: prev.default_config(spec, m_) for m_ in PREFILL_TOKENS}
                for cfg in dict.fromkeys(ppicks.values()):
                    cname = "prev-" + prev.config_tag(cfg)
                    name = f"p{bits}prev_{lin}_{prev.config_tag(cfg)}"
                    add(name, prev.gemm_func(spec, cfg, name=name), scheme + " (previous kernel)", bits, g, lin, n, k,
                        spec, cname, [m_ for m_, c in ppicks.items() if c == cfg], 0, [cfg.bm, n // cfg.bn, 1],
                        [cfg.threads, 1, 1], "prefill")
    t = time.time()
    ex = tvm.compile(tvm.IRModule(funcs), target={**PRESETS["cuda"].target, "arch": arch})
    src = next(m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda")
    for m in manifest:  # the kernel's parameters in TVM's order, by name
        sig = re.search(r"void __launch_bounds__\([\d, ]+\) " + m["kernel"] + r"\(([^)]*)\)", src).group(1)
        m["params"] = [p.strip().split()[-1].removesuffix("_ptr") for p in sig.split(",")]
        if m.get("out_param"):   # dlight's names: x, weight and the output (TVM orders a kernel's parameters by name)
            m["params"] = ["y" if p == m["out_param"] else p for p in m["params"]]
    (out / "kernels.cu").write_text(src + READ_BW_CU)
    (out / "manifest.json").write_text(json.dumps({"arch": arch, "tvm": tvm.__version__, "kernels": manifest},
                                                  indent=1))
    print(f"generated {len(manifest)} kernels in {time.time() - t:.0f} s -> {out}")
    if not device_nvcc:
        compile_cubins(out, arch, jobs=jobs)


def _groups_fit(n: int, c: tuple, warps: int, sms: int = 132) -> bool:
    """A config's groups (c[9]) divide its blocks of rows and the grouped grid fits one wave of thread blocks of
    <= 24 warps at 80 registers per SM (H200: 6 blocks of 4 warps, as the ungrouped kernels)."""
    nb = -(-(n // c[0]) // c[1])
    per_sm = 24 // (warps * c[9])
    return c[9] == 1 or (nb % c[9] == 0 and per_sm >= 1 and nb // c[9] <= per_sm * sms)


class _DenseSpec:
    """The manifest fields of an fp16 weight (no packed words, scales or zero points)."""
    words, n_groups, layout = 0, 0, None

    def __init__(self, n, k):
        self.n, self.k = n, k


def dense_func(n: int, k: int, arch: str):
    """The decode kernel of an fp16 export's linear (export/quant_linear.DenseLinear: matmul in fp32, cast to fp16)
    for one row, scheduled by the export's own passes (export/pipeline.scheduling_passes: dlight's GEMV rule), and
    its (grid, block) read from the thread bindings."""
    import tvm
    from tvm import tirx
    from tvm.relax.frontend import nn

    from edgequant.export.pipeline import scheduling_passes
    from edgequant.export.quant_linear import DenseLinear
    from edgequant.export.targets import PRESETS
    mod, _ = DenseLinear(k, n).export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, 1, k], "float16")}})
    target = tvm.target.Target({**PRESETS["cuda"].target, "arch": arch})
    with target:
        mod = tvm.transform.Sequential(scheduling_passes(target))(mod)
    prims = [f for _, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    if len(prims) != 1:
        raise RuntimeError(f"the fp16 linear {n}x{k} became {len(prims)} kernels, not one")
    text = prims[0].script()

    def ext(tag):
        m = re.search(r'T\.thread_binding\((?:T\.int64\()?(\d+)\)?, thread="' + tag + '"\)', text)
        return int(m.group(1)) if m else 1
    return prims[0], [ext("blockIdx.x"), 1, 1], [ext("threadIdx.x"), ext("threadIdx.y"), 1]


def compile_cubins(out: Path, arch: str, jobs: int):
    """kernels.cu -> kernels-<i>.cubin in `jobs` parts compiled in parallel (nvcc is single-threaded; the GPU
    machine has 16 cores and this one 2), with ptxas' register counts added to the manifest."""
    import subprocess
    src = (out / "kernels.cu").read_text()
    # kernel definitions (TVM declares them all first: those lines end in ';' and stay in the shared head)
    starts = [m.start() for m in re.finditer(r'^extern "C" __global__.*\{\s*$', src, re.M)]
    head, bodies = src[:starts[0]], [src[a:b] for a, b in zip(starts, starts[1:] + [len(src)])]
    parts = [bodies[i::jobs] for i in range(jobs) if bodies[i::jobs]]
    procs = []
    for i, part in enumerate(parts):
        (out / f"kernels-{i}.cu").write_text(head + "".join(part))
        procs.append(subprocess.Popen(["nvcc", "-cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o",
                                       str(out / f"kernels-{i}.cubin"), str(out / f"kernels-{i}.cu")],
                                      stderr=subprocess.PIPE, text=True))
    regs = {}  # ptxas' report: registers and spills per kernel
    for p in procs:
        err = p.communicate()[1]
        if p.returncode:
            raise RuntimeError(f"nvcc failed: {err[-2000:]}")
        for fn, body in re.findall(r"Compiling entry function '(\w+)'(.*?)(?=Compiling entry|\Z)", err, re.S):
            used = re.search(r"Used (\d+) registers", body)
            spill = re.search(r"(\d+) bytes spill stores", body)
            regs[fn] = (int(used.group(1)) if used else -1, int(spill.group(1)) if spill else -1)
    man = json.loads((out / "manifest.json").read_text())
    for m in man["kernels"]:
        m["regs"], m["spill"] = regs.get(m["kernel"], (-1, -1))
    man["cubins"] = [f"kernels-{i}.cubin" for i in range(len(parts))]
    (out / "manifest.json").write_text(json.dumps(man, indent=1))


# the read roofline: a plain streaming read (4 x 128-bit loads in flight per thread), XOR-folded so nothing is dropped
READ_BW_CU = r"""
extern "C" __global__ void __launch_bounds__(512) read_bw_kernel(const uint4* __restrict__ p, unsigned long long n,
                                                                 unsigned* __restrict__ out) {
  unsigned acc = 0;
  unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) { uint4 a = p[i]; acc ^= a.x ^ a.y ^ a.z ^ a.w; }
  if (acc == 0x9E3779B9u) out[0] = acc;
}

// the launch floor: a GEMV's grid and block shape, its PDL calls, one store per block and nothing else
extern "C" __global__ void __launch_bounds__(1024) empty_kernel(float* __restrict__ out) {
  cudaGridDependencySynchronize();
  cudaTriggerProgrammaticLaunchCompletion();
  if (threadIdx.x == 0 && threadIdx.y == 0) out[blockIdx.x] = 0.0f;
}

// what a persistent decode kernel would pay instead of a launch: `phases` grid-wide barriers (one counter, zeroed
// before the launch; every block co-resident), each a fence, an atomic add and a spin on the counter
extern "C" __global__ void __launch_bounds__(1024) barrier_kernel(unsigned* __restrict__ ctr, int phases) {
  for (int p = 1; p <= phases; ++p) {
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      __threadfence();
      atomicAdd(ctr, 1u);
      while (*(volatile unsigned*)ctr < p * gridDim.x) { }
      __threadfence();
    }
    __syncthreads();
  }
}

// the launch floor with the trigger first: the next kernel may launch once every block has started
extern "C" __global__ void __launch_bounds__(1024) empty_first_kernel(float* __restrict__ out) {
  cudaTriggerProgrammaticLaunchCompletion();
  cudaGridDependencySynchronize();
  if (threadIdx.x == 0 && threadIdx.y == 0) out[blockIdx.x] = 0.0f;
}

// barrier_kernel with the arrivals spread over 32 counters 128 bytes apart (block b adds to counter b % 32, so no
// single L2 line takes every atomic), warp 0 of each block polling all 32 and summing them with one warp reduction
extern "C" __global__ void __launch_bounds__(1024) barrier_spread_kernel(unsigned* __restrict__ ctr, int phases) {
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int p = 1; p <= phases; ++p) {
    __syncthreads();
    if (tid == 0) {
      __threadfence();
      atomicAdd(ctr + (blockIdx.x % 32) * 32, 1u);
    }
    if (tid < 32) {
      const unsigned target = p * gridDim.x;
      while (__reduce_add_sync(0xFFFFFFFFu, *(volatile unsigned*)(ctr + tid * 32)) < target) { }
      __threadfence();
    }
    __syncthreads();
  }
}
"""


def _walk(m):
    yield m
    for i in m.imports:
        yield from _walk(i)


# ------------------------------------------------------------------------------------------------ run (GPU machine)
class Driver:
    """The few CUDA driver calls needed to launch a cubin's kernels on torch's current stream."""

    def __init__(self, cubins: list[bytes]):
        import torch
        torch.zeros(1, device="cuda")  # makes torch's primary context current
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.mods = []
        for cubin in cubins:
            self.mods.append(ctypes.c_void_p())
            self._check(self.lib.cuModuleLoadData(ctypes.byref(self.mods[-1]), cubin))
        self.fns = {}

    def _check(self, rc):
        if rc:
            raise RuntimeError(f"CUDA driver error {rc}")

    def fn(self, name):
        if name not in self.fns:
            for mod in self.mods:
                f = ctypes.c_void_p()
                if self.lib.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()) == 0:
                    self.fns[name] = f
                    break
            else:
                raise RuntimeError(f"no kernel {name} in the cubins")
        return self.fns[name]

    def launcher(self, name, grid, block, tensors, pdl=False):
        """A no-argument callable launching `name` on the current stream with these tensors' pointers (or ctypes
        values); `pdl`: with programmatic stream serialization (cuLaunchKernelEx), so that the kernel may start
        while the previous one finishes (its griddepcontrol.wait orders what must wait)."""
        import torch
        ptrs = [t if isinstance(t, ctypes._SimpleCData) else ctypes.c_void_p(t.data_ptr()) for t in tensors]
        args = (ctypes.c_void_p * len(ptrs))(*[ctypes.addressof(p) for p in ptrs])
        f = self.fn(name)
        if pdl:
            attr = _LaunchAttr(id=6, val=1)   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, allowed
            cfg = _LaunchConfig(*grid, *block, 0, None, ctypes.pointer(attr), 1)

            def go():
                cfg.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
                self._check(self.lib.cuLaunchKernelEx(ctypes.byref(cfg), f, args, None))
            go.keep = (ptrs, args, attr, cfg)
            return go

        def go():
            s = torch.cuda.current_stream().cuda_stream
            self._check(self.lib.cuLaunchKernel(f, *grid, *block, 0, ctypes.c_void_p(s), args, None))
        go.keep = (ptrs, args)
        return go


class _LaunchAttr(ctypes.Structure):   # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("val", ctypes.c_uint),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint), ("bx", ctypes.c_uint),
                ("by", ctypes.c_uint), ("bz", ctypes.c_uint), ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("n_attrs", ctypes.c_uint)]


def _unpack_torch(qw, bits, k, layout):
    import torch
    n = qw.shape[0]
    w = qw.to(torch.int64) & 0xFFFFFFFF
    if layout == "planes3":  # dequant.py: a 2-bit plane of K/16 words, then a 1-bit plane of K/32 words
        lw = -(-k // 16)
        v, u = torch.arange(16, device=w.device), torch.arange(32, device=w.device)
        lo = (w[:, :lw, None] >> ((v % 8) * 4 + (v // 8) * 2)) & 3
        hi = (w[:, lw:, None] >> ((u % 8) * 4 + u // 8)) & 1
        return lo.reshape(n, -1)[:, :k] | (hi.reshape(n, -1)[:, :k] << 2)
    if layout in ("dp4a3", "dp4a3r4"):  # dequant.py: per 32 values w0, w1 in a first region, w2 in a second
        b = w.shape[1] // 3            # (dp4a3r4: a row's w0, w1, w2 at 12 b + 3 r of the span of 4 rows)
        ws = torch.stack([w[:, 0:2 * b:2], w[:, 1:2 * b:2], w[:, 2 * b:]], dim=2) if layout == "dp4a3" else \
            w.reshape(n // 4, b, 4, 3).transpose(1, 2).reshape(n, b, 3)   # [n, blocks, 3]
        out = torch.zeros(n, b, 32, dtype=torch.int64, device=w.device)
        for v in range(32):
            if v < 24:
                j, r = v // 8, v % 8
                out[:, :, v] = (ws[:, :, j] >> (8 * (r % 4) + 3 * (r // 4))) & 7
            else:
                t, lane = (v - 24) // 4, v % 4
                out[:, :, v] = ((ws[:, :, t] >> (8 * lane + 6)) & 3) | (((ws[:, :, 2] >> (8 * lane + 6 + t)) & 1) << 2)
        return out.reshape(n, -1)[:, :k]
    if layout == "words3x32":
        w = w.view(n, -1, 3)
        body = (w[:, :, :, None] >> (torch.arange(10, device=w.device) * 3)) & 7
        v30 = ((w[:, :, 0] >> 30) & 3) | (((w[:, :, 1] >> 30) & 1) << 2)
        v31 = ((w[:, :, 1] >> 31) & 1) | (((w[:, :, 2] >> 30) & 3) << 1)
        v = torch.cat([body.reshape(n, -1, 30), v30[:, :, None], v31[:, :, None]], dim=2)
        return v.reshape(n, -1)[:, :k]
    vpw = 32 // bits
    v = (w[:, :, None] >> (torch.arange(vpw, device=w.device) * bits)) & ((1 << bits) - 1)
    return v.reshape(n, -1)[:, :k]


def _timed(fns, reps=20):
    """Seconds per call of fns (a list of launches run in turn), replayed as one CUDA graph."""
    import torch
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for f in fns[:2]:
            f()  # warm-up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps / len(fns)


def copy_bandwidth():
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _timed([lambda: dst.copy_(src)] * 4, reps=10)
    return 2 * src.numel() / t


def read_bandwidth(drv):
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    out = torch.empty(1, dtype=torch.int32, device="cuda")
    best = 0
    for blocks in (132 * 4, 132 * 8, 132 * 16):
        f = drv.launcher("read_bw_kernel", [blocks, 1, 1], [512, 1, 1], [src, ctypes.c_uint64(src.numel() // 16), out])
        best = max(best, src.numel() / _timed([f] * 4, reps=10))
    return best


def _copies(nbytes):
    return max(4, -(-(512 << 20) // nbytes))


def torch_int4(n, k, g=128):
    """torch's int4 GEMV (tinygemm, behind gpt-fast and torchao int4 weight-only) for one shape, seconds per call."""
    import torch
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
    try:  # torch >= 2.5 packs from uint8 [N, K/2]
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    except RuntimeError:
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
    sz = torch.rand(k // g, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
    nbytes = n * k // 2 + sz.numel() * 2
    ws = [packed.clone() for _ in range(_copies(nbytes))]
    fns = [lambda w=w: torch.ops.aten._weight_int4pack_mm(x, w, g, sz) for w in ws]
    return _timed(fns), nbytes


def torch_fp16(n, k):
    import torch
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(_copies(n * k * 2))]
    return _timed([lambda w=w: torch.nn.functional.linear(x, w) for w in ws]), n * k * 2


def run(out: Path, only: str | None, results: Path | None, prefill_only: bool = False,
        tokens: tuple[int, ...] = PREFILL_TOKENS, repeat: int = 1):
    import torch
    man = json.loads((out / "manifest.json").read_text())
    if "cubins" not in man:  # built with --device-nvcc: compile here, on all cores
        import os
        t = time.time()
        compile_cubins(out, man["arch"], jobs=os.cpu_count() or 1)
        man = json.loads((out / "manifest.json").read_text())
        print(f"nvcc: {len(man['cubins'])} parts in {time.time() - t:.0f} s", flush=True)
    drv = Driver([(out / c).read_bytes() for c in man["cubins"]])
    dev = torch.cuda.get_device_name()
    cbw = copy_bandwidth()
    bw = max(cbw, read_bandwidth(drv))   # the roofline: whichever streams faster
    print(f"device {dev}; torch {torch.__version__}; copy bandwidth {cbw / 1e12:.2f} TB/s, roofline {bw / 1e12:.2f} "
          "TB/s", flush=True)
    rows, peer, configs = [], {}, []
    prefill = run_prefill(drv, man, only, tokens)
    if prefill_only:
        if not only:
            table = _prefill_table(prefill, dev, torch.__version__)
            print(table)
            if results:
                results.mkdir(parents=True, exist_ok=True)
                name = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
                (results / f"gpu-{name}-prefill.md").write_text(table)
                (results / f"gpu-{name}-prefill.rows.json").write_text(json.dumps(prefill, indent=1))
        return
    man = {**man, "kernels": [m for m in man["kernels"] if m["act"] != "prefill"]}
    for lin, n, k in SHAPES if not only else []:
        try:
            peer[lin, "int4"] = torch_int4(n, k)
        except Exception as e:  # noqa: BLE001 - report and go on without the peer
            print(f"torch int4 {lin}: {type(e).__name__}: {e}", flush=True)
        peer[lin, "fp16"] = torch_fp16(n, k)
    groups = list(dict.fromkeys((m["scheme"], m["linear"]) for m in man["kernels"]))
    for scheme, lin in groups:
        ks = [m for m in man["kernels"] if (m["scheme"], m["linear"]) == (scheme, lin)]
        ks = [m for m in ks if not only or re.search(only, m["name"])]
        if not ks:
            continue
        m0 = ks[0]
        n, k, bits = m0["n"], m0["k"], m0["bits"]
        nbytes = _nbytes(m0)
        gen = torch.Generator(device="cuda").manual_seed(bits * 1000 + n)
        sets = [_weights(m0, gen) for _ in range(_copies(nbytes))]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref, act_err = _reference(m0, sets[0], x)
        best = dflt = None
        byconf = {}
        for m in ks:
            y = torch.empty(1, n, device="cuda", dtype=torch.float16)
            fns = [drv.launcher(m["kernel"], m["grid"], m["block"], [{**s, "x": x, "y": y}[p] for p in m["params"]])
                   for s in sets]
            y.fill_(float("nan"))  # poisoned: an unwritten output fails the check
            fns[0]()
            torch.cuda.synchronize()
            err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
            t = _timed(fns)
            r = {"scheme": scheme, "linear": lin, "n": n, "k": k, "config": m["config"], "regs": m.get("regs", -1),
                 "default": m["default"], "us": t * 1e6, "gbs": nbytes / t / 1e9, "roof": nbytes / t / bw,
                 "rel_err": err, "act_err": act_err, "bytes": nbytes}
            configs.append(r)
            print(json.dumps(r), flush=True)
            if not err <= 3e-3:
                print(f"WRONG RESULT {m['name']}: rel err {err:.2e}", flush=True)
                continue
            byconf[m["config"]] = m
            if best is None or t < best["us"] / 1e6:
                best = r
            if m["default"]:
                dflt = r
        for r in (best, dflt) if best is not None and byconf[best["config"]].get("pdl") else ():
            # the same kernels launched with programmatic stream serialization: each copy's first weight loads
            # overlap the previous copy's tail; checked again on the output of the last copy
            if r is None or "us_pdl" in r:
                continue
            m = byconf[r["config"]]
            y = torch.empty(1, n, device="cuda", dtype=torch.float16)
            fns = [drv.launcher(m["kernel"], m["grid"], m["block"], [{**s, "x": x, "y": y}[p] for p in m["params"]],
                                pdl=True) for s in sets]
            r["us_pdl"] = _timed(fns) * 1e6
            y.fill_(float("nan"))
            for f in fns:
                f()
            torch.cuda.synchronize()
            r["rel_err_pdl"] = ((y.float() - _reference(m0, sets[-1], x)[0]).abs().max() / ref.abs().max()).item()
            print(json.dumps({"config": r["config"], "linear": lin, "scheme": scheme, "us_pdl": r["us_pdl"],
                              "rel_err_pdl": r["rel_err_pdl"]}), flush=True)
        if best is not None:
            best = {**best, "default_us": dflt["us"] if dflt else float("nan"),
                    "default_config": dflt["config"] if dflt else "-",
                    "default_us_pdl": dflt.get("us_pdl", float("nan")) if dflt else float("nan"),
                    "kernel": byconf[best["config"]]["name"],
                    "default_kernel": byconf[dflt["config"]]["name"] if dflt else None}
            rows.append(best)
        del sets
        torch.cuda.empty_cache()
    if only:
        return
    steps = _median_steps([whole_steps(drv, man, rows, peer_int4=not only) for _ in range(repeat)])
    table = _table(rows, peer, bw, cbw, dev, torch.__version__, steps) + "\n" + _prefill_table(prefill, dev,
                                                                                                 torch.__version__)
    print(table)
    if results:
        results.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^a-z0-9]+", "-", dev.lower()).strip("-")
        (results / f"gpu-{name}.md").write_text(table)
        (results / f"gpu-{name}.rows.json").write_text(json.dumps({"rows": rows, "configs": configs, "copy_bw": bw,
                                                                   "steps": steps,
                                                                   "copy_only_bw": cbw, "peer": {
            f"{a}/{b}": v for (a, b), v in peer.items()}}, indent=1))


def _nbytes(m0):
    """Bytes a decode kernel of the manifest streams: packed weights, scales, zero points, outlier columns (or the
    fp16 weight)."""
    n, k = m0["n"], m0["k"]
    if m0["act"] == "dense":
        return n * k * 2
    return n * m0["words"] * 4 + n * m0["n_groups"] * 3 + m0["n_outliers"] * (2 * n + 4)


def _weights(m0, gen):
    """Random packed weights, scales, zero points (and outlier columns) of one linear of the manifest."""
    import torch
    n, k, bits, nout = m0["n"], m0["k"], m0["bits"], m0["n_outliers"]
    if m0["act"] == "dense":
        return {"weight": (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()}
    st = {"qweight": torch.randint(-2**31, 2**31 - 1, (n, m0["words"]), device="cuda", dtype=torch.int32,
                                   generator=gen),
          "scales": (torch.rand(n, m0["n_groups"], device="cuda", generator=gen) * 0.009 + 0.001).half(),
          "zeros": torch.randint(0, 1 << bits, (n, m0["n_groups"]), device="cuda", dtype=torch.uint8, generator=gen)}
    if nout:
        st["oidx"] = torch.randperm(k, device="cuda", generator=gen)[:nout].to(torch.int32)
        st["ow"] = (torch.randn(n, nout, device="cuda", generator=gen) * 0.05).half()
    return st


def _reference(m0, st, x):
    """(what the kernel computes in fp32 from these weights and x, the int8 rounding's error against the exact
    product): int8 act rows round x per 32 values as the kernel does (cpu_int8.quantize_act_np)."""
    import torch
    k, g = m0["k"], m0["group"]
    if m0["act"] == "dense":
        return x.float() @ st["weight"].float().T, 0.0
    q = _unpack_torch(st["qweight"], m0["bits"], k, m0["layout"]).float()
    gi = torch.arange(k, device="cuda") // g
    wref = (q - st["zeros"].float()[:, gi]) * st["scales"].float()[:, gi]
    ref = x.float() @ wref.T
    exact = None
    if m0["act"] == "int8":
        xb = x.float().view(-1, 32)
        amax = xb.abs().amax(dim=1, keepdim=True)
        inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0)
        exact, ref = ref, ((torch.round(xb * inv) * (amax / 127)).view(1, k)) @ wref.T
    if m0["n_outliers"]:
        o = x.float()[:, st["oidx"].long()] @ st["ow"].float().T
        ref, exact = ref + o, (exact + o if exact is not None else None)
    act_err = ((ref - exact).abs().max() / exact.abs().max()).item() if exact is not None else 0.0
    return ref, act_err


def whole_steps(drv, man, rows, peer_int4=True):
    """Each scheme's whole decode step as one CUDA graph: 32 layers x (qkv, o, gate_up, down), each layer its own
    weights (GBs: nothing from L2), with the default kernels (the export's) and the best per linear, launched
    plainly and with programmatic stream serialization (PDL); the last layer's outputs are checked. torch int4
    the same way. Returns {scheme: {"default": s, "best": s, "default_pdl": s, "best_pdl": s, "bytes": b}}."""
    import torch
    kern = {m["name"]: m for m in man["kernels"]}
    out = {}
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        rs = {r["linear"]: r for r in rows if r["scheme"] == scheme}
        if len(rs) != len(SHAPES) or any(r.get("default_kernel") is None for r in rs.values()):
            continue
        gen = torch.Generator(device="cuda").manual_seed(77)
        x = torch.randn(1, max(k for _, _, k in SHAPES), device="cuda", dtype=torch.float16)
        layers = [{lin: _weights(kern[rs[lin]["kernel"]], gen) for lin, _, _ in SHAPES} for _ in range(LAYERS)]
        ys = {lin: torch.empty(1, n, device="cuda", dtype=torch.float16) for lin, n, _ in SHAPES}
        res = {"bytes": LAYERS * sum(r["bytes"] for r in rs.values())}
        for which, key in (("default", "default_kernel"), ("best", "kernel")):
            if which == "best" and all(r["kernel"] == r["default_kernel"] for r in rs.values()):
                res.update({k_.replace("default", "best"): v for k_, v in res.items() if k_.startswith("default")})
                continue
            for pdl in (False, True):
                ms = {lin: kern[rs[lin][key]] for lin, _, _ in SHAPES}
                if pdl and not all(m.get("pdl") for m in ms.values()):
                    continue
                fns = [drv.launcher(ms[lin]["kernel"], ms[lin]["grid"], ms[lin]["block"],
                                    [{**layer[lin], "x": x[:, :k], "y": ys[lin]}[p] for p in ms[lin]["params"]],
                                    pdl=pdl) for layer in layers for lin, _, k in SHAPES]
                t = _timed(fns) * len(fns)
                for y in ys.values():
                    y.fill_(float("nan"))
                for f in fns:
                    f()
                torch.cuda.synchronize()
                err = max(((ys[lin].float() - (ref := _reference(ms[lin], layers[-1][lin], x[:, :k])[0])).abs().max()
                           / ref.abs().max()).item() for lin, _, k in SHAPES)
                res[which + ("_pdl" if pdl else "")] = t
                res[which + ("_pdl" if pdl else "") + "_err"] = err
                print(json.dumps({"step": scheme, "kernels": which, "pdl": pdl, "ms": t * 1e3, "rel_err": err}),
                      flush=True)
                if not err <= 3e-3:
                    print(f"WRONG RESULT step {scheme} {which} pdl={pdl}: rel err {err:.2e}", flush=True)
        out[scheme] = res
        del layers
        torch.cuda.empty_cache()
    w4 = {r["linear"]: kern[r["default_kernel"]] for r in rows if r["scheme"] == "W4 g128 int8 act"}
    if len(w4) == len(SHAPES):   # the same 128 launch shapes with no work: what launches alone cost per step
        buf = torch.empty(max(m["grid"][0] for m in w4.values()), device="cuda", dtype=torch.float32)
        res = {"bytes": 0}
        for pdl in (False, True):
            fns = [drv.launcher("empty_kernel", w4[lin]["grid"], w4[lin]["block"], [buf], pdl=pdl)
                   for _ in range(LAYERS) for lin, _, _ in SHAPES]
            res["default" + ("_pdl" if pdl else "")] = _timed(fns) * len(fns)
        out["empty kernels of W4's launch shapes"] = res
        print(json.dumps({"step": "empty", "ms": res["default"] * 1e3, "ms_pdl": res["default_pdl"] * 1e3}),
              flush=True)
        out.update(launch_floors(drv))
    if peer_int4:
        try:
            out["torch int4 g128 (bf16)"] = {"default": torch_int4_step()}
        except Exception as e:  # noqa: BLE001 - report and go on without the peer
            print(f"torch int4 step: {type(e).__name__}: {e}", flush=True)
        if any(r["scheme"] == DENSE_SCHEME for r in rows):
            out["cuBLAS fp16"] = {"default": torch_fp16_step(), "bytes": LAYERS * sum(n * k * 2 for _, n, k in SHAPES)}
            print(json.dumps({"step": "cuBLAS fp16", "ms": out["cuBLAS fp16"]["default"] * 1e3}), flush=True)
    return out


def launch_floors(drv):
    """What 128 dependent launches cost per step, by launch shape (empty kernels: PDL wait then trigger, or the
    trigger first), and what 128 grid-wide barriers of one persistent kernel cost instead (one counter, or 32
    counters on their own L2 lines), at several grids of co-resident blocks. {row name: {"default": s (plain or
    the barriers), "default_pdl": s, "bytes": 0}}."""
    import torch
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = len(SHAPES) * LAYERS
    buf = torch.empty(8 * sms * 2, device="cuda", dtype=torch.float32)
    out = {}
    for blocks, threads in ((sms, 128), (sms, 768), (2 * sms, 384), (6 * sms, 128), (1376, 128)):
        for kern in ("empty_kernel", "empty_first_kernel"):
            res = {"bytes": 0}
            for pdl in (False, True):
                fns = [drv.launcher(kern, [blocks, 1, 1], [32, threads // 32, 1], [buf], pdl=pdl) for _ in range(n)]
                res["default" + ("_pdl" if pdl else "")] = _timed(fns) * len(fns)
            name = f"{n} {'empty' if kern == 'empty_kernel' else 'empty trigger-first'} kernels, {blocks} x {threads}"
            out[name] = res
            print(json.dumps({"step": name, "ms": res["default"] * 1e3, "ms_pdl": res["default_pdl"] * 1e3}),
                  flush=True)
    ctr = torch.zeros(32 * 32, device="cuda", dtype=torch.int32)
    for kern, blocks, threads in (("barrier_kernel", 6 * sms, 128), ("barrier_kernel", sms, 128),
                                  ("barrier_kernel", sms, 768), ("barrier_spread_kernel", 6 * sms, 128),
                                  ("barrier_spread_kernel", sms, 768)):
        t = {}
        for phases in (0, n):   # every block co-resident (at most 6 of 4 warps per SM, as the GEMVs)
            go = drv.launcher(kern, [blocks, 1, 1], [32, threads // 32, 1], [ctr, ctypes.c_int(phases)])
            t[phases] = _timed([lambda: ctr.zero_(), go] * 4, reps=10) * 2   # per zero + launch
        name = (f"{n} grid barriers ({'one counter' if kern == 'barrier_kernel' else '32 counters'}), "
                f"{blocks} x {threads}")
        out[name] = {"default": t[n] - t[0], "default_pdl": float("nan"), "bytes": 0}
        print(json.dumps({"step": name, "ms": (t[n] - t[0]) * 1e3}), flush=True)
    return out


def _median_steps(passes):
    """whole_steps' results of several passes: each time the median of the passes (all of them kept in
    "passes")."""
    if len(passes) == 1:
        return passes[0]
    out = {}
    for scheme in passes[0]:
        runs = [p[scheme] for p in passes if scheme in p]
        out[scheme] = {k: (sorted(r[k] for r in runs if k in r)[len(runs) // 2] if k != "bytes" else v)
                       for k, v in runs[0].items()}
        out[scheme]["passes"] = runs
    return out


def torch_int4_step(g=128):
    """torch's int4 GEMV over a whole step (32 layers x 4 linears, own weights each), one CUDA graph; seconds."""
    import torch
    fns = []
    for _ in range(LAYERS):
        for _, n, k in SHAPES:
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            q = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
            sz = torch.rand(k // g, n, 2, device="cuda", dtype=torch.bfloat16) * 0.01
            fns.append(lambda x=x, w=packed, sz=sz: torch.ops.aten._weight_int4pack_mm(x, w, g, sz))
    return _timed(fns) * len(fns)


def torch_fp16_step():
    """torch's fp16 linear (cuBLAS) over a whole step (32 layers x 4 linears, own weights each), one CUDA graph;
    seconds."""
    import torch
    x = torch.randn(1, 1, max(k for _, _, k in SHAPES), device="cuda", dtype=torch.float16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(LAYERS) for _, n, k in SHAPES]
    fns = [lambda w=w: torch.nn.functional.linear(x[..., :w.shape[1]], w) for w in ws]
    t = _timed(fns) * len(fns)
    del ws
    torch.cuda.empty_cache()
    return t


def run_prefill(drv, man, only, tokens):
    """Every prefill kernel of the manifest at every prompt length: checked against torch's fp32 product of the
    dequantized weights, timed over weight copies; torch fp16 matmul per linear and length as the peer."""
    import torch
    kernels = [m for m in man["kernels"] if m["act"] == "prefill" and (not only or re.search(only, m["name"]))]
    res = {"rows": [], "peer": {}}
    for lin, n, k in SHAPES if not only else []:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(_copies(n * k * 2))]
        for m_ in tokens:
            x = torch.randn(m_, k, device="cuda", dtype=torch.float16)
            res["peer"][f"{lin}/{m_}"] = _timed([lambda w=w: torch.matmul(x, w.t()) for w in ws], reps=10)
            print(json.dumps({"peer": "torch fp16", "linear": lin, "tokens": m_,
                              "us": res["peer"][f"{lin}/{m_}"] * 1e6}), flush=True)
        del ws
        torch.cuda.empty_cache()
    for scheme, lin in dict.fromkeys((m["scheme"], m["linear"]) for m in kernels):
        ks = [m for m in kernels if (m["scheme"], m["linear"]) == (scheme, lin)]
        m0 = ks[0]
        n, k, bits, g = m0["n"], m0["k"], m0["bits"], m0["group"]
        nbytes = n * m0["words"] * 4 + n * m0["n_groups"] * 3
        gen = torch.Generator(device="cuda").manual_seed(bits * 1000 + n + 7)
        sets = [{"qweight": torch.randint(-2**31, 2**31 - 1, (n, m0["words"]), device="cuda", dtype=torch.int32,
                                          generator=gen),
                 "scales": (torch.rand(n, m0["n_groups"], device="cuda", generator=gen) * 0.009 + 0.001).half(),
                 "zeros": torch.randint(0, 1 << bits, (n, m0["n_groups"]), device="cuda", dtype=torch.uint8,
                                        generator=gen)} for _ in range(_copies(nbytes))]
        s0 = sets[0]
        q = _unpack_torch(s0["qweight"], bits, k, m0["layout"]).float()
        gi = torch.arange(k, device="cuda") // g
        # the kernel multiplies the correctly rounded fp16 weights (as the export's dequantize kernel)
        wref = ((q - s0["zeros"].float()[:, gi]) * s0["scales"].float()[:, gi]).half().float()
        del q
        for m_ in tokens:
            x = torch.randn(1, m_, k, device="cuda", dtype=torch.float16)
            ref = x[0].float() @ wref.T
            y = torch.empty(1, m_, n, device="cuda", dtype=torch.float16)
            best = None
            for m in ks:
                grid = [-(-m_ // m["grid"][0]), m["grid"][1], 1]
                fns = [drv.launcher(m["kernel"], grid, m["block"],
                                    [{**s, "x": x, "y": y, "m": ctypes.c_int64(m_)}[p] for p in m["params"]])
                       for s in sets]
                y.fill_(float("nan"))
                fns[0]()
                torch.cuda.synchronize()
                err = ((y[0].float() - ref).abs().max() / ref.abs().max()).item()
                t = _timed(fns, reps=10)
                r = {"scheme": scheme, "linear": lin, "n": n, "k": k, "tokens": m_, "config": m["config"],
                     "default": m_ in m["default"], "regs": m.get("regs", -1), "us": t * 1e6,
                     "tflops": 2 * m_ * n * k / t / 1e12, "rel_err": err}
                res["rows"].append(r)
                print(json.dumps(r), flush=True)
                if not err <= 3e-3:
                    print(f"WRONG RESULT {m['name']} at {m_} tokens: rel err {err:.2e}", flush=True)
                elif best is None or r["us"] < best["us"]:
                    best = r
            if best is not None:
                best["best"] = True
        del sets, wref
        torch.cuda.empty_cache()
    return res


def _prefill_table(res, dev, torch_ver):
    if not res["rows"]:
        return ""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Prefill GEMM on tensor cores, LLaMA-7B linears ({dev})", "",
           f"{date}; torch {torch_ver}. Kernel: `tvm_schedules/mma_gemm.py` (fp16 mma.sync m16n8k16, cp.async "
           "stages, weights dequantized in registers); peer: torch fp16 `torch.matmul(x, W.t())` (cuBLAS) in the "
           "same run. Times per call, CUDA-graph replays over weight copies totalling >= 512 MiB. Config "
           "BMxBNwWMxWNsSbB: block tile, warp tile, cp.async stages, blocks per SM asked of ptxas (register cap); "
           "best of the configs tried, 'default' the one `mma_gemm.default_config` picks for that prompt length (the "
           "export's kernel). rel err: max |y - ref| / max |ref|, ref = x @ (fp16 dequantized W)^T in fp32 on the "
           "device.", "",
           "| weights | linear (N x K) | tokens | config | regs | us | TFLOP/s | default us | rel err | torch fp16 us "
           "| x torch fp16 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    best = [r for r in res["rows"] if r.get("best")]
    dflt = {(r["scheme"], r["linear"], r["tokens"]): r for r in res["rows"] if r["default"]}
    for r in best:
        p = res["peer"].get(f"{r['linear']}/{r['tokens']}", float("nan")) * 1e6
        d = dflt.get((r["scheme"], r["linear"], r["tokens"]), {"us": float("nan")})
        out.append(f"| {r['scheme']} | {r['linear']} {r['n']}x{r['k']} | {r['tokens']} | {r['config']} | {r['regs']} "
                   f"| {r['us']:.1f} | {r['tflops']:.0f} | {d['us']:.1f} | {r['rel_err']:.1e} | {p:.1f} | "
                   f"{p / r['us']:.2f} |")
    out += ["", "All linears of a prefill (32 layers x qkv, o, gate_up, down), from the per-linear times (best "
            "config; in brackets the default config):", "",
            "| weights | tokens | ms | tok/s | TFLOP/s | torch fp16 ms | torch fp16 tok/s | x torch fp16 |",
            "|---|---|---|---|---|---|---|---|"]
    for scheme in dict.fromkeys(r["scheme"] for r in best):
        for m_ in dict.fromkeys(r["tokens"] for r in best):
            rs = [r for r in best if r["scheme"] == scheme and r["tokens"] == m_]
            ds = [dflt.get((scheme, r["linear"], m_)) for r in rs]
            if len(rs) != len(SHAPES):
                continue
            t = LAYERS * sum(r["us"] for r in rs) / 1e6
            td = LAYERS * sum(d["us"] for d in ds) / 1e6 if all(ds) else float("nan")
            flop = LAYERS * sum(2 * m_ * r["n"] * r["k"] for r in rs)
            tp = LAYERS * sum(res["peer"].get(f"{lin}/{m_}", float("nan")) for lin, _, _ in SHAPES)
            out.append(f"| {scheme} | {m_} | {t * 1e3:.2f} ({td * 1e3:.2f}) | {m_ / t:.0f} ({m_ / td:.0f}) | "
                       f"{flop / t / 1e12:.0f} | {tp * 1e3:.2f} | {m_ / tp:.0f} | {tp / t:.2f} |")
    return "\n".join(out) + "\n"


def _table(rows, peer, bw, cbw, dev, torch_ver, whole=None):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Decode GEMV, LLaMA-7B linears, batch 1 ({dev})", "",
           f"{date}; torch {torch_ver}; roofline {bw / 1e12:.2f} TB/s = the faster of a 1 GiB streaming read "
           f"kernel and a 1 GiB device copy ((read + write) / time: {cbw / 1e12:.2f} TB/s).",
           "Command: `python benchmarks/gpu_decode.py build` (TVM 0.27, nvcc sm_90, on the build machine), then "
           "`python3 benchmarks/gpu_decode.py run --save` on the GPU.", "",
           "Times per call, CUDA-graph replays over weight copies totalling >= 512 MiB (no L2 reuse). % roofline = "
           "(weights + scales + zeros [+ fp16 outlier columns]) / time / roofline. Best of the configs tried "
           "(rNsM[dB]: N rows per step, M steps per block[, B register buffers: loads run B - 1 steps ahead; 2 if "
           "absent]); 'default' is the config `gemv.default_config` picks; regs "
           "from ptxas. rel err: max |y - ref| / max |ref| on the device, ref = the dequantized weights in fp32 "
           "times x "
           "(int8 act rows: times x rounded to int8 per 32 values, what the kernel computes); int8 act err: the same "

           "measure between that rounding's ref and the exact one. PDL us: the same kernel launched with programmatic "
           "stream serialization (cuLaunchKernelEx), its first weight loads overlapping the previous copy's tail.", "",
           "| weights | linear (N x K) | config | regs | us | PDL us | default | default us | default PDL us | GB/s | "
           "% roofline | rel err | int8 act err | torch int4 us | x torch int4 | cuBLAS fp16 us |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        i4 = peer.get((r["linear"], "int4"), (float("nan"),))
        f16 = peer.get((r["linear"], "fp16"), (float("nan"),))
        out.append(f"| {r['scheme']} | {r['linear']} {r['n']}x{r['k']} | {r['config']} | {r['regs']} | "
                   f"{r['us']:.1f} | {r.get('us_pdl', float('nan')):.1f} | {r['default_config']} | "
                   f"{r['default_us']:.1f} | {r.get('default_us_pdl', float('nan')):.1f} | {r['gbs']:.0f} | "
                   f"{100 * r['roof']:.0f}% | {r['rel_err']:.1e} | {r.get('act_err', 0):.1e} | {i4[0] * 1e6:.1f} | "
                   f"{i4[0] * 1e6 / r['us']:.2f} | "
                   f"{f16[0] * 1e6:.1f} |")
    out += ["", "All linears of one decode step (32 layers x qkv, o, gate_up, down), from the per-linear times "
            "(best config; in brackets the default config):", "",
            "| weights | ms per step | tok/s bound | % roofline | x torch int4 | x W4 g128 |", "|---|---|---|---|---|---|"]
    steps = {}
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        rs = [r for r in rows if r["scheme"] == scheme]
        if len(rs) != len(SHAPES):
            continue
        t = LAYERS * sum(r["us"] for r in rs) / 1e6
        td = LAYERS * sum(r["default_us"] for r in rs) / 1e6
        nbytes = LAYERS * sum(r["bytes"] for r in rs)
        steps[scheme] = (t, td)
        i4 = [peer.get((lin, "int4")) for lin, _, _ in SHAPES]
        ti4 = LAYERS * sum(p[0] for p in i4) if all(i4) else float("nan")
        w4, w4d = steps.get(_w4_of(scheme), (t, td))
        out.append(f"| {scheme} | {t * 1e3:.2f} ({td * 1e3:.2f}) | {1 / t:.0f} ({1 / td:.0f}) | "
                   f"{100 * nbytes / t / bw:.0f}% ({100 * nbytes / td / bw:.0f}%) | {ti4 / t:.2f} ({ti4 / td:.2f}) | "
                   f"{w4 / t:.2f} ({w4d / td:.2f}) |")
    i4 = [peer.get((lin, "int4")) for lin, _, _ in SHAPES]
    if all(i4):
        t = LAYERS * sum(p[0] for p in i4)
        nb = LAYERS * sum(p[1] for p in i4)
        out.append(f"| torch int4 g128 (bf16) | {t * 1e3:.2f} | {1 / t:.0f} | {100 * nb / t / bw:.0f}% | 1.00 | |")
    f16 = [peer.get((lin, "fp16")) for lin, _, _ in SHAPES]
    if all(f16):
        t = LAYERS * sum(p[0] for p in f16)
        out.append(f"| cuBLAS fp16 | {t * 1e3:.2f} | {1 / t:.0f} | "
                   f"{100 * LAYERS * sum(p[1] for p in f16) / t / bw:.0f}% | | |")
    if whole:
        out += _step_table(whole, bw)
    return "\n".join(out) + "\n"


def _w4_of(scheme):
    """The W4 g128 row that a scheme's row is compared with (the same activation type and kernel generation)."""
    return "W4 g128" + (scheme[scheme.index(" int8 act"):] if " int8 act" in scheme else "")


def _step_table(whole, bw):
    nan = float("nan")
    i4 = whole.get("torch int4 g128 (bf16)", {}).get("default", nan)
    out = ["", "The whole decode step measured as one CUDA graph (32 layers x qkv, o, gate_up, down, each layer its own "
           "weights; the last layer's outputs checked): with the default kernels (what the export ships; 'PDL' = "
           "launched with programmatic stream serialization, as TVM's runtime does for sm_90+ exports) and with the "
           "best config per linear. % roofline, tok/s, x torch int4 and x W4 from the 'default, PDL' column (in "
           "brackets: 'default', plain launches). torch int4: its GEMV over the same 128 linears, one graph.", "",
           "| weights | default ms | default PDL ms | best ms | best PDL ms | % roofline | tok/s bound | x torch int4 "
           "| x W4 g128 |", "|---|---|---|---|---|---|---|---|---|"]
    for scheme, r in whole.items():
        floor = scheme.startswith(("empty", "grid")) or scheme[0].isdigit()
        if floor:
            out.append(f"| {scheme} | {r['default'] * 1e3:.3f} | {r['default_pdl'] * 1e3:.3f} | | | | | | |")
        if floor or scheme.startswith("torch"):
            continue
        t, tp = r.get("default", nan), r.get("default_pdl", nan)
        if tp != tp:   # no PDL kernels (fp16 exports, cuBLAS): the plain launches
            tp = t
        w4 = whole.get(_w4_of(scheme), {})
        w4t, w4p = w4.get("default", nan), w4.get("default_pdl", nan)
        out.append(f"| {scheme} | {t * 1e3:.3f} | {tp * 1e3:.3f} | {r.get('best', nan) * 1e3:.3f} | "
                   f"{r.get('best_pdl', nan) * 1e3:.3f} | {100 * r['bytes'] / tp / bw:.0f}% "
                   f"({100 * r['bytes'] / t / bw:.0f}%) | {1 / tp:.0f} ({1 / t:.0f}) | {i4 / tp:.2f} ({i4 / t:.2f}) | "
                   f"{w4p / tp:.2f} ({w4t / t:.2f}) |")
    out.append(f"| torch int4 g128 (bf16) | {i4 * 1e3:.3f} | | | | | {1 / i4:.0f} | 1.00 | |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["build", "run"])
    ap.add_argument("--out", default=".device/gpu-decode")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--baseline", help="build: also the default configs of this earlier gemv.py, for the same run")
    ap.add_argument("--quick", action="store_true", help="build: default configs only")
    ap.add_argument("--configs", help="build: the int8 configs tried besides the default instead of QUICK / SWEEP, "
                    "';'-separated tuples of 9 integers as in SWEEP, or 10 (the 10th: GemvConfig.groups)")
    ap.add_argument("--linears", help="build: try --configs / QUICK / SWEEP on these linears only (comma-separated)")
    ap.add_argument("--acts", default=",".join(ACTS), help="build: decode activation types (int8,fp16)")
    ap.add_argument("--decode-only", action="store_true", help="build: no prefill kernels")
    ap.add_argument("--baseline-mma", help="build: also the default prefill kernels of this earlier mma_gemm.py "
                    "(`git show REV:tvm_schedules/mma_gemm.py`), for the same run")
    ap.add_argument("--prefill-sweep", action="store_true", help="build: the prefill sweep even with --quick")
    ap.add_argument("--jobs", type=int, default=1, help="build: parallel nvcc processes here")
    ap.add_argument("--export-layouts", action="store_true",
                    help="build: only the export's 3-bit layout (no planes3 comparison rows)")
    ap.add_argument("--layouts3", help="build: the comparison 3-bit layouts to add (comma-separated, of "
                    "planes3,dp4a3; default: all, or none with --export-layouts)")
    ap.add_argument("--device-nvcc", action="store_true", help="build: leave nvcc to `run` on the GPU machine")
    ap.add_argument("--only", help="run: only kernels whose name matches this regular expression (for ncu; "
                    "NAME$: that one)")
    ap.add_argument("--prefill-only", action="store_true",
                    help="build / run: only the prefill kernels (and their peer)")
    ap.add_argument("--tokens", help="run: prefill prompt lengths, comma-separated (default 32,128,256,512,2048)")
    ap.add_argument("--repeat", type=int, default=1, help="run: whole-step graphs measured this many times, one pass "
                    "over all schemes after another; the table gives each time's median")
    ap.add_argument("--save", nargs="?", const=str(RESULTS), help="run: write gpu-<device>.md there "
                    "(default benchmarks/results)")
    a = ap.parse_args()
    if a.step == "build":
        build(Path(a.out), a.arch, a.baseline, a.quick, a.device_nvcc, a.prefill_only,
              tuple(a.acts.split(",")), a.decode_only, a.jobs, a.export_layouts,
              tuple(tuple(int(v) for v in c.split(",")) for c in a.configs.split(";")) if a.configs else None,
              tuple(a.linears.split(",")) if a.linears else None, a.baseline_mma, a.prefill_sweep,
              tuple(a.layouts3.split(",")) if a.layouts3 is not None else None)
    else:
        run(Path(a.out), a.only, Path(a.save) if a.save else None, a.prefill_only,
            tuple(int(t) for t in a.tokens.split(",")) if a.tokens else PREFILL_TOKENS, a.repeat)


if __name__ == "__main__":
    sys.exit(main())
