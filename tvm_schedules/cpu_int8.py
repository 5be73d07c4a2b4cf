"""Decode GEMV for CPUs with integer dot products: one activation row times a 2-, 3- or 4-bit weight, as a TIR prim
func that reaches `vpdpbusd` (AVX-VNNI / AVX-512 VNNI) or `vpmaddubsw` + `vpmaddwd` (AVX2) on x86, and NEON `sdot`
(Armv8.2 dotprod) on aarch64, through LLVM intrinsics.

The float GEMV of `cpu.py` converts every weight to fp32 and spends one FMA lane per weight. Here, as in llama.cpp's
Q8_0 dot products, the activations are quantized at run time to int8 per block of 32 (one fp32 scale per block), and
the weights' codes stay integers: one `vpdpbusd` multiplies 32 unsigned codes by 32 signed activations and adds them
four at a time into 8 int32 lanes. Per weight that is a shift and a mask shared by 4-8 codes instead of a
convert + FMA each.

Layout. At 4 bits a vector lane is one packed uint32 word of a row (8 codes). Masking the word with 0x0F0F0F0F after a
shift of `4j` leaves one code per byte: byte i holds code `2i + j`. At 2 bits a lane is two consecutive words of the
checkpoint's own layout (32 codes, one activation block; no repacked layout): one load of 2L words is split into the
even and the odd words by two shuffles, and word w of the lane masked with 0x03030303 after a shift of `2m` gives part
j = 4w + m, byte i holding code `16w + 4i + m` (`_weight_codes_words2`). A lane of one word (16 codes) did the
int32-to-fp32 scaling twice per block and ran the W2 GEMV at 1.2-1.3x W4's time; with 32-value lanes, a packed 2-lane
tail (`_tail_words2`) and the zero-point terms of its 9-24 groups per row taken 8 at a time, 0.7-0.9x
(benchmarks/results/decode_cpu_issue9_w3.md). No code moves between lanes, so the activations are stored in the same
order instead: the quantization step writes x's int8 values permuted to [chunk][part j][lane][byte i], and each part of
a chunk is one contiguous load. A chunk is L = 8 lanes (256-bit registers); a row of 8m + 4 lanes (K = 576 in 3-bit bit
planes) ends with one 4-lane (128-bit) chunk, one of 8m + 2 lanes of 32 values (K = 576 at 2 bits and in bytes3) with a
packed 2-lane tail, and where groups fit neither, all chunks are 4 words (`chunk_plan`). A
chunk lies inside one group or holds whole groups (their scales spread over its lanes by a shuffle). 256-bit rather
than 512-bit registers: rows of K = 576 hold 72 words at 4 bits, not a multiple of 16, and AVX-VNNI CPUs without
AVX-512 get the same code. NEON has 128-bit registers: its kernel keeps the same layout and chunks and runs the
integer part in 4-lane steps (`_chunk`), so its int32 sums, and the fp32 arithmetic after them, are the x86 kernel's.
(`smmla` (i8mm) multiplies 2x8 by 8x2 blocks: it pays for two activation rows or more, i.e. prefill, not here.)
CPU 3-bit exports ("bytes3", dequant.py) take a lane per 32 values: one word of each of three planes, loaded as three
vectors; parts 0-5 are a plane masked with 0x07070707 (after a shift by 3 for the odd ones), parts 6 and 7 two planes'
spare bits 6-7 shifted, masked and ORed. A chunk of 8 lanes is 256 weights in 8 dots, 3 loads and 17 bit operations,
with one int32-to-fp32 scaling per 256 weights where W4 has four; its dots go to two accumulators (`_accumulators`; so
do W2's 8). Rows of 8m + 2 lanes (K = 576) end with a packed tail (`_tail_bytes3`: the two lanes' 6 words in one
vector, 3 dots). Per row of SmolLM2's 960 x 576 that is 149 instructions against W4's 148 (x86 VNNI; NEON 274 against
278), where the bit-plane layout "planes3" (a lane per 2-bit-plane word of 16 values, the third bit ORed in from a
shared 1-bit-plane word by a shuffle and per-lane shifts; still accepted here) took 203.

Arithmetic. With x_k ~= d_b * a_k (block b) and W = s_g (q - z_g),
    y = sum_g s_g * (sum_{b in g} d_b * dot(q, a)_b - z_g * sum_{b in g} d_b * sum_{k in b} a_k).
Every lane belongs to one block, so the int32 lane sums are converted once per chunk and multiplied by that lane's
block scale (`xsw`, one fp32 per lane) and the chunk's group scale; the zero-point term is one product per group with
per-group sums of `d_b * a_k` that the quantization step also leaves (shared by all rows).

The whole linear is one prim func with the fused float kernel's arguments (x, qweight, scales, [zeros], y): a
quantization prologue (vector code per block of 32, `_quantize_row`) into scratch buffers, then rows in parallel.
A row ends in vectors (`_finish_row`: zero-point terms 8 groups at a time, a tree sum). 8-bit weights (quantized
vocabulary tables as the output layer) have their own GEMV, `cpu_int8_w8.py`.
The prefill GEMM (`int8_gemm_func`) runs the same arithmetic for m rows: activation rows quantized in parallel, then
tiles of 32 weight rows in parallel, each meeting blocks of 8 activation rows (codes unpacked once per 8 rows, the
8-row block in L1 across the tile, the 8 rows' sums finished together by a shuffle tree). At 4 bits it hands over
to `cpu_int8_rows.py`, which puts 8 weight rows instead of K in the vector lanes (one block scaling per 8 dots, no
horizontal sums: 2.0-2.25x faster on SmolLM2's shapes, benchmarks/results/decode_cpu_issue9_w3.md). int8
activations move each activation by up to half a step (1/254 of its block's largest value); the exact fp path
remains the fused float kernel (`dequant.py`), used for shapes this kernel does not cover (`supports`) and on
request (EDGEQUANT_ACT_DTYPE=fp16, `export/pipeline.py`).
"""
from __future__ import annotations

import functools

from .dequant import QuantSpec
from .tvmscript import parse_tir

BLOCK = 32               # activation values per int8 scale (llama.cpp's Q8_0 block)
ISAS = ("vnni", "avx2", "sdot")  # vpdpbusd; vpmaddubsw + vpmaddwd; NEON sdot (Armv8.2 dotprod)


def _lane_values(spec: QuantSpec) -> int | None:
    """Weights per vector lane: one word of the 4-bit words layout (8 values), two words of the 2-bit one (32 values,
    `_weight_codes_words2`), one 2-bit-plane word (16 values) of planes3, one word of each of the three planes
    (32 values) of bytes3."""
    if spec.layout == "words" and spec.bits in (2, 4):
        return 8 if spec.bits == 4 else 32
    return {"planes3": 16, "bytes3": 32}.get(spec.layout)


def _parts(spec: QuantSpec) -> int:
    """Codes per byte of a lane's words: a lane of 32 values holds 8 per byte position i (one per part j)."""
    return {"planes3": 4, "bytes3": 8}.get(spec.layout) or (8 if spec.bits == 2 else 2)


def _wide(spec: QuantSpec) -> bool:
    """Lanes of 32 values (bytes3, 2-bit words): one activation block each."""
    return _lane_values(spec) == 32


def chunk_plan(spec: QuantSpec) -> tuple[int, int, int] | None:
    """(L, chunks of L words, words of a 4-lane tail chunk or 0) covering a row, or None where the kernel does not
    apply. A chunk lies inside one group or holds whole groups (scales spread over its lanes by a shuffle)."""
    lv = _lane_values(spec)
    if lv is None or spec.k % BLOCK:
        return None
    if spec.group_size != -1 and spec.group_size % BLOCK:
        return None
    row_w = spec.k // lv
    grp_w = spec.group_len // lv

    def fits(L):
        return grp_w % L == 0 or L % grp_w == 0 or grp_w == row_w

    # lanes of 32 values leave rows of 8m + 2 lanes (K=576): a tail of 2 lanes, for bytes3 packed into one 8-lane
    # vector (`_tail_bytes3`) after 8-lane chunks, else run in 4-lane vectors whose activation bytes past the row
    # are zero
    tails = (0, 2, 4) if _wide(spec) else (0, 4)
    if fits(8) and row_w % 8 in tails and row_w >= 8:
        # a row of 8m + 4 lanes (K=576 in 3-bit bit planes) ends with one 128-bit chunk
        return 8, row_w // 8, row_w % 8
    if fits(4) and row_w % 4 in tails[:2] and row_w:
        return 4, row_w // 4, row_w % 4
    return None


def supports(spec: QuantSpec) -> bool:
    return chunk_plan(spec) is not None


def target_isa(target) -> str | None:
    """The integer dot-product flavour an llvm target allows: "vnni", "avx2", "sdot" (aarch64 with dotprod) or None."""
    from tvm.target import codegen
    if target is None or target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    arch = (triple or codegen.llvm_get_system_triple()).split("-")[0]
    if arch in ("aarch64", "arm64"):
        try:
            return "sdot" if codegen.target_has_features("dotprod", target) else None
        except Exception:  # noqa: BLE001 - a target LLVM cannot describe: no integer path
            return None
    if not arch.startswith(("x86_64", "i686", "i386")):
        return None
    try:
        if codegen.target_has_features("avxvnni", target) or \
                codegen.target_has_features(["avx512vnni", "avx512vl"], target):
            return "vnni"
        if codegen.target_has_features("avx2", target):
            return "avx2"
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: no integer path
        return None
    return None


def act_perm(spec: QuantSpec):
    """Position of activation k in the permuted int8 buffer (NumPy int array over k = 0..K-1)."""
    import numpy as np
    L, n_main, _ = chunk_plan(spec)
    mw, P, bw = L * n_main, _parts(spec), BLOCK // _lane_values(spec)
    _, off_main, off_tail = _block_positions(spec)
    b, t = np.arange(spec.k) // BLOCK, np.arange(spec.k) % BLOCK
    w = b * bw                                             # first lane word of block b
    base = np.where(w < mw, w // L * L * P * 4 + w % L * 4, mw * P * 4 + (w - mw) * 4)
    return base + np.where(w < mw, np.array(off_main)[t], np.array(off_tail or off_main)[t])


def _packed_tail(spec: QuantSpec) -> bool:
    """A row of 8m + 2 lanes of 32 values: its 2-lane tail runs as 3 dots of 8 lanes (bytes3, `_tail_bytes3`) or 2
    (2-bit words, `_tail_words2`) instead of 8 of 4."""
    plan = chunk_plan(spec)
    return _wide(spec) and plan is not None and plan[0] == 8 and plan[2] == 2


def _tail_slot(j: int) -> tuple[int, int]:
    """bytes3's packed 2-lane tail: (vector, slot of lane 0) of part j; lane l sits in slot + l. Vector 0 holds the
    planes' low fields (parts 0, 2, 4), vector 1 their high fields (1, 3, 5), vector 2 parts 6 and 7."""
    return (j % 2, j // 2 * 2) if j < 6 else (2, (j - 6) * 2)


def quantize_act_np(x):
    """x [K] -> (int8 a [K], fp32 block scale d [K/32]): d = max|x| / 127, a = round(x * 127 / max|x|)."""
    import numpy as np
    xf = x.astype(np.float32).reshape(-1, BLOCK)
    amax = np.abs(xf).max(axis=1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    a = np.round(xf * inv[:, None]).astype(np.int8)   # |a| <= 127 since |x| * 127 / max|x| <= 127
    return a.reshape(-1), (amax / np.float32(127)).astype(np.float32)


def int8_gemv_np(spec: QuantSpec, x, qweight, scales, zeros=None):
    """NumPy model of the kernel (int8 activations, exact integer dots, fp32 scaling): x [K] -> y [N] fp32."""
    import numpy as np
    from .dequant import unpack_np
    a, d = quantize_act_np(x)
    q = unpack_np(qweight, spec.bits, spec.k, spec.layout).astype(np.int64)
    nb = spec.k // BLOCK
    dots = (q.reshape(spec.n, nb, BLOCK) * a.reshape(nb, BLOCK).astype(np.int64)).sum(axis=2).astype(np.float32)
    blk_g = np.arange(nb) * BLOCK // spec.group_len
    s = scales.astype(np.float32)[:, blk_g]
    z = (np.full((spec.n, spec.n_groups), spec.sym_zero, np.float32) if spec.sym
         else zeros.astype(np.float32))[:, blk_g]
    asum = a.reshape(nb, BLOCK).astype(np.float32).sum(axis=1)
    return (s * (dots * d - z * (d * asum))).sum(axis=1)


def int8_gemv_func(spec: QuantSpec, isa: str = "vnni", out_dtype: str = "float32", lead: tuple[int, ...] = (1,),
                   name: str = "main"):
    """y[lead..., N] = x[lead..., K] @ dq(W)^T for one row with int8 activations (module docstring).

    Arguments: x fp16, qweight, scales, [zeros], y (`out_dtype`). `isa` ("vnni", "avx2", "sdot") picks the
    instructions."""
    return _from_source(spec, isa, "decode GEMV", lambda: _source(spec, isa, out_dtype, lead, name))


def _from_source(spec: QuantSpec, isa: str, what: str, source):
    """The prim func of the TVMScript text `source()`, after checking that `isa` and `spec` are covered."""

    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; one of {ISAS}")
    if not supports(spec):
        raise ValueError(f"no int8 {what} for {spec}")
    return parse_tir(source())


def _dot(isa: str, L: int, acc: str, a: str, b: str) -> str:
    """TIR expression: int32xL `acc` plus the 4-byte dot products of u8 `a` and s8 `b` (both uint32xL/int8x4L)."""
    B = 4 * L
    if isa == "sdot":  # codes 0..15 are valid signed bytes: the signed x signed dot is exact
        return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot"), {acc}, '
                f'T.reinterpret({a}, dtype="int8x{B}"), {b}, dtype="int32x{L}")')
    if isa == "vnni":
        from tvm.target import codegen
        width = 32 * L
        # LLVM 22 retyped the VNNI intrinsics' byte operands from <N x i32> to <4N x i8>
        if codegen.llvm_version_major() >= 22:
            a_op, b_op = f'T.reinterpret({a}, dtype="int8x{B}")', b
        else:
            a_op, b_op = a, f'T.reinterpret({b}, dtype="int32x{L}")'
        return (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.{width}"), '
                f'{acc}, {a_op}, {b_op}, dtype="int32x{L}")')
    # AVX2: u8*s8 pairs -> i16 (no saturation: 15 * 127 * 2 < 2^15), then i16 pairs -> i32
    ub, wd = (("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd") if L == 8 else
              ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"))
    p16 = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("{ub}"), T.reinterpret({a}, dtype="int8x{B}"), '
           f'{b}, dtype="int16x{2 * L}")')
    p32 = (f'T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("{wd}"), {p16}, '
           f'T.broadcast(T.int16(1), {2 * L}), dtype="int32x{L}")')
    return f"{acc} + {p32}"


def _group_scale(grp_w: int, Lc: int, start: str) -> str:
    """The fp32 group scales of Lc lane words from word `start` of row nn (groups of grp_w lane words), as a vector
    of _width(Lc) lanes (lanes past Lc repeat lane 0: their integer sums are 0)."""
    Wc = _width(Lc)
    if grp_w >= Lc:
        return f'T.broadcast(T.Cast("float32", scales[nn, ({start}) // {grp_w}]), {Wc})'
    gpc = Lc // grp_w  # groups per chunk: their scales, each repeated over its grp_w lanes
    sv = f'T.Cast("float32x{gpc}", scales[nn, T.ramp(({start}) // {grp_w}, 1, {gpc})])'
    idx = [lane // grp_w if lane < Lc else 0 for lane in range(Wc)]
    return f"T.Shuffle([{', '.join([sv] * max(grp_w, 2))}], {idx})"


def _width(Lc: int) -> int:
    """Vector lanes of a chunk of Lc lanes: a 2-lane tail (bytes3) runs in 4-lane vectors."""
    return max(Lc, 4)


def _padded(load, Lc: int, W: int, zero: str | None = None) -> str:
    """`load(n)`, the TIR load of n lanes, as a W-lane vector when only Lc < W lanes exist: lanes past Lc are `zero`'s
    (a broadcast lane value) or, without it, repeat lane 0 (a value whose product with a zero sum is zero)."""
    if Lc >= W:
        return load(W)
    if zero is None:
        return f"T.Shuffle([{load(Lc)}, {load(Lc)}], {[lane if lane < Lc else 0 for lane in range(W)]})"
    return f"T.Shuffle([{load(Lc)}, T.broadcast({zero}, {Lc})], {[lane if lane < Lc else Lc for lane in range(W)]})"


def _gemm_head(spec: QuantSpec, name: str, out_dtype: str) -> list[str]:
    """A prefill GEMM's signature and its x [1, m, k] / y [1, m, n] buffers (m: the prompt's rows)."""
    return _signature(spec, name, "x_h: T.handle", "y_h: T.handle") + [
        "    m = T.int64()",
        f'    x = T.match_buffer(x_h, (T.int64(1), m, T.int64({spec.k})), "float16")',
        f'    y = T.match_buffer(y_h, (T.int64(1), m, T.int64({spec.n})), "{out_dtype}")']


def _zero(spec: QuantSpec) -> str:
    """Row nn's zero point of group g as fp32 TVMScript: the scheme's constant when symmetric."""
    return f"T.float32({float(spec.sym_zero)})" if spec.sym else 'T.Cast("float32", zeros[nn, g])'


def _signature(spec: QuantSpec, name: str, x: str, y: str) -> list[str]:
    """The prim func's first lines: arguments x, qweight, scales, [zeros], y."""
    n, NG = spec.n, spec.n_groups
    ins = [x, f'qweight: T.Buffer(({n}, {spec.words}), "uint32")', f'scales: T.Buffer(({n}, {NG}), "float16")']
    if not spec.sym:
        ins.append(f'zeros: T.Buffer(({n}, {NG}), "uint8")')
    return ["@T.prim_func", f"def {name}({', '.join(ins + [y])}):",
            '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})']


def _block_positions(spec: QuantSpec):
    """(TIR expression of block b's first byte in the permuted buffer, the other 31 bytes' offsets from it in a main
    chunk, in the 4-word tail chunk): a block of 32 activations lies inside one chunk (chunks hold 4 or 8 words, a
    block 2 or 4), so its layout (act_perm) is one base per block plus constant offsets."""
    L, n_main, tail = chunk_plan(spec)
    mw, P, vpw = L * n_main, _parts(spec), _lane_values(spec)
    bw = BLOCK // vpw      # words per block

    def off(t, lanes, packed=False):
        r = t % vpw
        if spec.layout == "planes3":
            i_, j_ = r % 8 // 2, r % 8 % 2 * 2 + r // 8
        elif spec.layout == "words" and spec.bits == 2:   # word r // 16 of the lane, byte r % 16 // 4, field r % 4
            i_, j_ = r % 16 // 4, r // 16 * 4 + r % 4
        else:
            i_, j_ = r // P, r % P
        if packed and spec.layout == "bytes3":   # vectors of 6, 6 and 4 slots of 4 bytes (`_tail_slot`)
            v, slot = _tail_slot(j_)
            return v * 24 + slot * 4 + i_
        if packed:   # 2-bit words: two vectors of 8 slots (`_tail_words2`)
            return j_ % 4 // 2 * 32 + (j_ // 4 * 4 + j_ % 2 * 2) * 4 + i_
        return (j_ * lanes + t // vpw) * 4 + i_
    base = f"(b * {bw} // {L} * {P * L * 4} + b * {bw} % {L} * 4)"
    if tail:
        base = f"T.Select(b * {bw} < {mw}, {base}, {mw * P * 4} + (b * {bw} - {mw}) * 4)"
    return base, [off(t, L) for t in range(BLOCK)], \
        [off(t, tail, _packed_tail(spec)) for t in range(BLOCK)] if tail else None


def _tree(buf: str, n: int, op: str, ind: str) -> list[str]:
    """Statements folding buf[0:n] (n a power of two) in halves with `op` ("max" or "+") down to buf[0:2]."""
    S, w = [], n // 2
    while w > 1:
        a, b = f"{buf}[T.ramp(0, 1, {w})]", f"{buf}[T.ramp({w}, 1, {w})]"
        S.append(f"{ind}{a} = " + (f"T.max({a}, {b})" if op == "max" else f"{a} + {b}"))
        w //= 2
    return S


# the per-group sum term of one quantized block: d_b * sum of its codes (qv[0] + qv[1] after `_quantize_block`)
BLOCK_SUM = 'mx / T.float32(127) * T.Cast("float32", qv[0] + qv[1])'


def _quantize_block(x_block: str, stores: list[str], ind: str) -> list[str]:
    """Statements (inside a loop over blocks) quantizing one block of 32 activations, `x_block` (a 32-lane load), to
    int8 per block (the numerics of `quantize_act_np`): its codes in qv, max |x| in mx, then `stores` (the caller's
    layout of the codes), then the code sum folded into qv[0] + qv[1] (`BLOCK_SUM`). Vector code: max |x| and the sum
    by halving trees. The one emitter of the activation quantization for every int8 CPU kernel."""
    V = f"T.ramp(0, 1, {BLOCK})"
    S = [f'{ind}fx = T.alloc_buffer(({BLOCK},), "float32")',
         f'{ind}am = T.alloc_buffer(({BLOCK},), "float32")',
         f'{ind}qv = T.alloc_buffer(({BLOCK},), "int32")',
         f'{ind}fx[{V}] = T.Cast("float32x{BLOCK}", {x_block})',
         f"{ind}am[{V}] = T.fabs(fx[{V}])"]
    S += _tree("am", BLOCK, "max", ind)
    S += [f"{ind}mx = T.max(am[0], am[1])",
          f"{ind}inv = T.Select(mx > T.float32(0), T.float32(127) / mx, T.float32(0))",
          f'{ind}qv[{V}] = T.Cast("int32x{BLOCK}", T.round(fx[{V}] * T.broadcast(inv, {BLOCK})))']
    return S + [ind + line for line in stores] + _tree("qv", BLOCK, "+", ind)


def _quantize_row(spec: QuantSpec, xr: str, r: str | None, ind: str) -> list[str]:
    """Statements quantizing activation row `r` (None: the only one; `xr` formats its values at indices {kk}) to int8
    per block of 32: the permuted codes at xq[r * K ...] (32 byte stores at constant offsets from the block's base,
    `_block_positions`), each lane word's block scale at xsw[r * row_w ...] and the per-group sums of d_b * a_k at
    gsum[r * NG ...]."""
    k, NG, G = spec.k, spec.n_groups, spec.group_len
    row_w, wpb = k // _lane_values(spec), BLOCK // _lane_values(spec)
    at = lambda size: f"{r} * {size} + " if r is not None else ""  # noqa: E731 - the row's offset in a buffer
    base, off_main, off_tail = _block_positions(spec)
    stores = [f"bs = {base}"]
    for t in range(BLOCK):
        o = str(off_main[t]) if off_tail is None else \
            f"T.Select(b * {wpb} < {chunk_plan(spec)[0] * chunk_plan(spec)[1]}, {off_main[t]}, {off_tail[t]})"
        stores.append(f'xq[{at(k)}bs + {o}] = T.Cast("int8", qv[{t}])')
    S = [f"{ind}for g in T.serial({NG}):",
         f"{ind}    gsum[{at(NG)}g] = T.float32(0)",
         f"{ind}for b in T.serial({k // BLOCK}):"]
    S += _quantize_block(xr.format(kk=f"T.ramp(b * {BLOCK}, 1, {BLOCK})"), stores, ind + "    ")
    S += [f"{ind}    for t in T.serial({wpb}):",
          f"{ind}        xsw[{at(row_w)}b * {wpb} + t] = mx / T.float32(127)",
          f"{ind}    gsum[{at(NG)}b * 32 // {G}] = gsum[{at(NG)}b * 32 // {G}] + {BLOCK_SUM}"]
    return S


def _finish_row(spec: QuantSpec, L: int, y: str, out_dtype: str, ind: str, yt: bool = True) -> list[str]:
    """Statements writing `y` for the row: its chunks' partial sums (yv and, with `yt`, yt) minus the zero-point term
    (module docstring), in vectors: the zero-point terms of L groups per vector into yv's lanes (the last vector
    padded; gsum's padding is zero), the tail's lanes added in, then a halving tree. The scalar loops this replaced
    (3-4 instructions per group and one per lane: a third of a K=576 row's instructions at 4 bits) left W4 g128's
    GEMVs 1.2-1.7x slower (weights in cache), and with them at 4 bits only W3 g128's GEMVs took 1.11x W4's time per
    layer, W2 g64's 0.92x; in vectors everywhere 0.85-0.98x and 0.72x
    (benchmarks/results/decode_cpu_issue9_cpu7_gemv_bits*.md). Only the fp32 summation order changed."""
    NG = spec.n_groups
    Lv = f"T.ramp(0, 1, {L})"
    S = []
    for q in range(-(-NG // L)):
        cnt = min(L, NG - q * L)

        def vec(buf, q=q, cnt=cnt):   # lanes past the groups repeat lane 0 (times a zero gsum)
            if cnt == 1:
                return f'T.broadcast(T.Cast("float32", {buf}[nn, {q * L}]), {L})'
            ld = f'T.Cast("float32x{cnt}", {buf}[nn, T.ramp({q * L}, 1, {cnt})])'
            if cnt == L:
                return ld
            return f"T.Shuffle([{', '.join([ld] * -(-L // cnt))}], {[i if i < cnt else 0 for i in range(L)]})"
        zv = f"T.broadcast(T.float32({float(spec.sym_zero)}), {L})" if spec.sym else vec("zeros")
        S.append(f"{ind}yv[{Lv}] = yv[{Lv}] - {vec('scales')} * {zv} * gsum[T.ramp({q * L}, 1, {L})]")
    if yt:
        S.append(f"{ind}yv[T.ramp(0, 1, 4)] = yv[T.ramp(0, 1, 4)] + yt[T.ramp(0, 1, 4)]")
    S += _tree("yv", L, "+", ind)
    return S + [f'{ind}{y} = T.Cast("{out_dtype}", yv[0] + yv[1])']


def _source(spec: QuantSpec, isa: str, out_dtype: str, lead: tuple[int, ...], name: str) -> str:
    n, k = spec.n, spec.k
    L, n_main, tail = chunk_plan(spec)
    gscale = functools.partial(_group_scale, spec.group_len // _lane_values(spec))
    lo = ", ".join(str(d) for d in lead)
    ix = ", ".join("0" for _ in lead)
    S = _signature(spec, name, f'x: T.Buffer(({lo}, {k}), "float16")', f'y: T.Buffer(({lo}, {n}), "{out_dtype}")')
    NG, NGp = spec.n_groups, -(-spec.n_groups // L) * L   # gsum padded for `_finish_row`'s vectors
    S += [f'    xq = T.alloc_buffer(({k},), "int8")',
          f'    xsw = T.alloc_buffer(({k // _lane_values(spec)},), "float32")',
          f'    gsum = T.alloc_buffer(({NGp},), "float32")']
    if NGp > NG:   # the padding: zero terms
        S += [f"    for g in T.serial({NG}, {NGp}):", "        gsum[g] = T.float32(0)"]
    # --- quantize x to int8 per block of 32 (serial: K values)
    S += _quantize_row(spec, f"x[{ix}, {{kk}}]", None, "    ")
    # --- rows in parallel
    S += [f"    for nn in T.parallel({n}):",
          f'        yv = T.alloc_buffer(({L},), "float32")',
          '        yt = T.alloc_buffer((4,), "float32")',
          f'        ia = T.alloc_buffer(({_accumulators(spec) * L},), "int32")',
          f'        wq = T.alloc_buffer(({L},), "uint32")',
          f'        hq = T.alloc_buffer(({L},), "uint32")',
          f'        tq = T.alloc_buffer(({L},), "uint32")',
          f"        yv[T.ramp(0, 1, {L})] = T.broadcast(T.float32(0), {L})",
          "        yt[T.ramp(0, 1, 4)] = T.broadcast(T.float32(0), 4)",
          f"        for c in T.serial({n_main}):"]
    S += _chunk(spec, isa, L, L, f"c * {L}", "yv", gscale, " " * 12)
    # a tail of 32-value lanes adds into lanes 0..3 of yv (one horizontal sum less); W4 and planes3 keep their own yt
    # (and their fp32 summation order)
    yt = not _wide(spec)
    if tail:
        S += _chunk(spec, isa, tail, 4 if yt else L, str(L * n_main), "yt" if yt else "yv", gscale, " " * 8,
                    acc_stride=None if yt else L)
    S += _finish_row(spec, L, f"y[{ix}, nn]", out_dtype, " " * 8, yt)
    return "\n".join(S) + "\n"


def _weight_codes(spec: QuantSpec, isa: str, Lc: int, start: str, ind: str):
    """The loads of a chunk of Lc words from word `start` of row nn (statements), and for each 4-lane (sdot) or
    Lc-lane step h0 and each part j the expression of its unsigned codes, as (h0, j, W, code)."""
    if spec.layout == "bytes3":
        return _weight_codes_bytes3(spec, isa, Lc, start, ind)
    if _wide(spec):
        return _weight_codes_words2(spec, isa, Lc, start, ind)
    planes = spec.layout == "planes3"
    mask = {4: 0x0F0F0F0F, 2: 0x03030303, 3: 0x03030303}[spec.bits]
    Lr = f"T.ramp(0, 1, {Lc})"
    S = [f"{ind}wq[{Lr}] = qweight[nn, T.ramp({start}, 1, {Lc})]"]
    if planes:  # lanes 2m and 2m+1 (lo-plane words) take their third bit from the same 1-bit-plane word
        # one load of Lc/2 words and a lane shuffle (an index vector of ramp // 2 becomes a gather)
        dup = ", ".join(str(lane // 2) for lane in range(Lc))
        half = f"qweight[nn, T.ramp({spec.lo_words} + ({start}) // 2, 1, {Lc // 2})]"
        S.append(f"{ind}hq[{Lr}] = T.Shuffle([{half}, {half}], [{dup}])")  # two inputs: Lc lanes to pick from
    W = 4 if isa == "sdot" else Lc
    codes = []
    for h0 in range(0, Lc, W):
        Lh = f"T.ramp({h0}, 1, {W})"
        for j in range(_parts(spec)):
            code = (f"T.bitwise_and(T.shift_right(wq[{Lh}], T.broadcast(T.uint32({j * (2 if planes else spec.bits)}), "
                    f"{W})), T.broadcast(T.uint32({mask}), {W}))")
            if planes:
                # value k of lo word wl, part j, byte i has its third bit at 8i + 4(j//2) + j%2 + 2(wl%2) of its
                # 1-bit word (h0 is even: lane parity is that of the ramp)
                hs = f'T.Cast("uint32x{W}", T.ramp(0, 1, {W}) % 2 * 2 + {4 * (j // 2) + j % 2})'
                hi = (f"T.shift_left(T.bitwise_and(T.shift_right(hq[{Lh}], {hs}), "
                      f"T.broadcast(T.uint32(0x01010101), {W})), T.broadcast(T.uint32(2), {W}))")
                code = f"T.bitwise_or({code}, {hi})"
            codes.append((h0, j, W, code))
    return S, codes


def _weight_codes_bytes3(spec: QuantSpec, isa: str, Lc: int, start: str, ind: str):
    """_weight_codes for bytes3 (dequant.py): the three planes' words of the chunk's lanes in wq, hq, tq; parts 0-5
    are one plane's bytes shifted by 0 or 3 and masked, parts 6 and 7 take the spare bits 6-7 of two planes."""
    lanes, Wc = spec.k // _lane_values(spec), _width(Lc)
    Lr = f"T.ramp(0, 1, {Wc})"
    S = [f"{ind}{buf}[{Lr}] = " + _padded(lambda m, p=p: f"qweight[nn, T.ramp({p * lanes} + {start}, 1, {m})]", Lc, Wc,
                                          "T.uint32(0)") for p, buf in enumerate(("wq", "hq", "tq"))]
    W = 4 if isa == "sdot" else Wc
    u = lambda v: f"T.broadcast(T.uint32({v}), {W})"  # noqa: E731
    codes = []
    for h0 in range(0, Wc, W):
        Lh = f"T.ramp({h0}, 1, {W})"
        pl = [f"{buf}[{Lh}]" for buf in ("wq", "hq", "tq")]
        field = lambda p, sh, m: (f"T.bitwise_and(T.shift_right({pl[p]}, {u(sh)}), {u(m)})" if sh  # noqa: E731
                                  else f"T.bitwise_and({pl[p]}, {u(m)})")
        for j in range(6):
            codes.append((h0, j, W, field(j // 2, 3 * (j % 2), 0x07070707)))
        codes.append((h0, 6, W, f"T.bitwise_or({field(0, 6, 0x03030303)}, {field(1, 4, 0x04040404)})"))
        codes.append((h0, 7, W, f"T.bitwise_or({field(1, 7, 0x01010101)}, {field(2, 5, 0x06060606)})"))
    return S, codes


def _weight_codes_words2(spec: QuantSpec, isa: str, Lc: int, start: str, ind: str):
    """_weight_codes for 2-bit words read two per lane (32 values, one activation block): the checkpoint's words
    2l and 2l + 1 of lane l, split from one load of 2Lc words into wq (even words: parts 0-3) and hq (odd: parts
    4-7); part j is its word shifted by 2 (j % 4) and masked with 0x03030303. A lane of one word (16 values) did the
    int32-to-fp32 scaling and zero-point work twice per block; this needs no repacked layout, only the split
    (two shuffles per chunk of 256 weights)."""
    Wc = _width(Lc)
    Lr = f"T.ramp(0, 1, {Wc})"
    both = f"qweight[nn, T.ramp(2 * ({start}), 1, {2 * Lc})]"
    if Lc < Wc:   # a 2-lane tail in 4-lane vectors: lanes past Lc read zero words (their dots are zero)
        srcs, pad = f"[{both}, T.broadcast(T.uint32(0), {2 * Lc})]", 2 * Lc
    else:
        srcs, pad = f"[{both}]", None
    S = [f"{ind}{buf}[{Lr}] = T.Shuffle({srcs}, {[2 * lane + odd if lane < Lc else pad for lane in range(Wc)]})"
         for odd, buf in ((0, "wq"), (1, "hq"))]
    W = 4 if isa == "sdot" else Wc
    u = lambda v: f"T.broadcast(T.uint32({v}), {W})"  # noqa: E731
    codes = []
    for h0 in range(0, Wc, W):
        Lh = f"T.ramp({h0}, 1, {W})"
        for j in range(8):
            w = f"{'wq' if j < 4 else 'hq'}[{Lh}]"
            w = f"T.shift_right({w}, {u(2 * (j % 4))})" if j % 4 else w
            codes.append((h0, j, W, f"T.bitwise_and({w}, {u(0x03030303)})"))
    return S, codes


def _tail_bytes3(spec: QuantSpec, isa: str, start: str, acc: str, ind: str, rows: int | None,
                 acc_stride: int | None) -> list[str]:
    """_chunk for bytes3's 2-lane tail (`_packed_tail`): the 6 words of its two lanes in one 8-lane vector
    V = [plane 0, plane 1, plane 2, 0] x 2 lanes. V & 7s gives parts 0, 2, 4 of both lanes, (V >> 3) & 7s parts 1,
    3, 5, and per-lane shifts of V and of V moved by two lanes (plane p + 1) parts 6 and 7: 3 dots of 8 lanes instead
    of 8 of 4. Slot s of every vector belongs to tail lane s % 2, whose block and group scales the lanes take."""
    lanes, R, W = spec.k // _lane_values(spec), rows or 1, 4 if isa == "sdot" else 8
    u = lambda v: f"T.broadcast(T.uint32({v}), {W})"  # noqa: E731
    two = lambda p: f"qweight[nn, T.ramp({p * lanes} + {start}, 1, 2)]"  # noqa: E731
    S = [f"{ind}wq[T.ramp(0, 1, 8)] = T.Shuffle([{two(0)}, {two(1)}, {two(2)}, T.broadcast(T.uint32(0), 2)], "
         f"{list(range(8))})",
         f"{ind}hq[T.ramp(0, 1, 8)] = T.Shuffle([wq[T.ramp(0, 1, 8)]], {[2, 3, 4, 5, 6, 7, 6, 7]})",
         f"{ind}ia[T.ramp(0, 1, {R * 8})] = T.broadcast(0, {R * 8})"]
    row = lambda ri, size: f"(rb * {R} + {ri}) * {size} + " if rows else ""  # noqa: E731 - the row's buffer offset
    for h0 in range(0, 8, W):
        Lh = f"T.ramp({h0}, 1, {W})"
        odd = f'T.Cast("uint32x{W}", T.ramp({h0}, 1, {W}) // 2 % 2)'   # 0 in the slots of part 6, 1 in part 7's
        codes = [f"T.bitwise_and(wq[{Lh}], {u(0x07070707)})",
                 f"T.bitwise_and(T.shift_right(wq[{Lh}], {u(3)}), {u(0x07070707)})",
                 # part 6: bits 6-7 of plane 0 | bit 6 of plane 1 << 2; part 7: bit 7 of plane 1 | bits 6-7 of
                 # plane 2 << 1
                 f"T.bitwise_or(T.bitwise_and(T.shift_right(wq[{Lh}], {u(6)} + {odd}), "
                 f"{u(0x03030303)} - {u(0x02020202)} * {odd}), "
                 f"T.bitwise_and(T.shift_right(hq[{Lh}], {u(4)} + {odd}), {u(0x04040404)} + {u(0x02020202)} * {odd}))"]
        for v, code in enumerate(codes):
            real = min(max((24 if v < 2 else 16) - 4 * h0, 0), 4 * W)   # bytes of real slots in this step
            if not real:
                continue
            for ri in range(R):
                base = f"{row(ri, spec.k)}({start}) * {_parts(spec) * 4} + {v * 24 + 4 * h0}"
                act = _padded(lambda m, b=base: f"xq[T.ramp({b}, 1, {m})]", real, 4 * W, "T.int8(0)")
                Li = f"T.ramp({ri * 8 + h0}, 1, {W})"
                S.append(f"{ind}ia[{Li}] = {_dot(isa, W, f'ia[{Li}]', code, act)}")
    return S + _tail_finish(spec, start, acc, ind, rows, acc_stride)


def _tail_words2(spec: QuantSpec, isa: str, start: str, acc: str, ind: str, rows: int | None,
                 acc_stride: int | None) -> list[str]:
    """_chunk for the 2-lane tail of 2-bit words read two per lane (`_packed_tail`): the tail's 4 words a0 a1 b0 b1
    (lanes a, b) as one 8-lane vector V = [a0, b0, a0, b0, a1, b1, a1, b1]; (V >> [0, 0, 2, 2] x 2) & 3s gives parts
    0, 1, 4, 5 of both lanes and (V >> [4, 4, 6, 6] x 2) & 3s parts 2, 3, 6, 7: 2 dots of 8 lanes instead of 8 of 4.
    Slot s belongs to tail lane s % 2 (`_tail_finish`)."""
    R, W = rows or 1, 4 if isa == "sdot" else 8
    four = f"qweight[nn, T.ramp(2 * ({start}), 1, 4)]"   # twice: a shuffle's inputs hold at least its output lanes
    S = [f"{ind}wq[T.ramp(0, 1, 8)] = T.Shuffle([{four}, {four}], [0, 2, 0, 2, 1, 3, 1, 3])",
         f"{ind}ia[T.ramp(0, 1, {R * 8})] = T.broadcast(0, {R * 8})"]
    row = lambda ri, size: f"(rb * {R} + {ri}) * {size} + " if rows else ""  # noqa: E731 - the row's buffer offset
    for h0 in range(0, 8, W):
        Lh = f"T.ramp({h0}, 1, {W})"
        for v in range(2):
            sh = f'T.Cast("uint32x{W}", T.ramp({h0}, 1, {W}) // 2 % 2 * 2 + {4 * v})'
            code = f"T.bitwise_and(T.shift_right(wq[{Lh}], {sh}), T.broadcast(T.uint32({0x03030303}), {W}))"
            for ri in range(R):
                act = f"xq[T.ramp({row(ri, spec.k)}({start}) * {_parts(spec) * 4} + {v * 32 + 4 * h0}, 1, {4 * W})]"
                Li = f"T.ramp({ri * 8 + h0}, 1, {W})"
                S.append(f"{ind}ia[{Li}] = {_dot(isa, W, f'ia[{Li}]', code, act)}")
    return S + _tail_finish(spec, start, acc, ind, rows, acc_stride)


def _tail_finish(spec: QuantSpec, start: str, acc: str, ind: str, rows: int | None,
                 acc_stride: int | None) -> list[str]:
    """A packed 2-lane tail's int32 sums ia[ri * 8 ...] into `acc`: slot s takes tail lane s % 2's block and group
    scales."""
    R, lanes = rows or 1, spec.k // _lane_values(spec)
    S = []
    row = lambda ri, size: f"(rb * {R} + {ri}) * {size} + " if rows else ""  # noqa: E731 - the row's buffer offset
    grp_w = spec.group_len // _lane_values(spec)
    pairs = lambda ld: f"T.Shuffle([{', '.join([ld] * 4)}], {[0, 1] * 4})"  # noqa: E731 - slot s: tail lane s % 2
    for ri in range(R):
        La = f"T.ramp({ri * (acc_stride or 8)}, 1, 8)"
        xs = pairs(f"xsw[T.ramp({row(ri, lanes)}{start}, 1, 2)]")
        gs = (f'T.broadcast(T.Cast("float32", scales[nn, ({start}) // {grp_w}]), 8)' if grp_w >= 2 else
              pairs(f'T.Cast("float32x2", scales[nn, T.ramp({start}, 1, 2)])'))
        S.append(f'{ind}{acc}[{La}] = {acc}[{La}] + T.Cast("float32x8", ia[T.ramp({ri * 8}, 1, 8)]) * {xs} * {gs}')
    return S


def _chunk(spec: QuantSpec, isa: str, Lc: int, L: int, start: str, acc: str, gscale, ind: str,
           rows: int | None = None, acc_stride: int | None = None) -> list[str]:
    """Statements for one chunk of Lc words from word `start` of row nn: integer dots, then `acc` += their scaled sum.
    The chunk's activations sit at byte start * P * 4 in the order [part j][lane][byte i]. NEON registers hold 4
    lanes: `sdot` runs the integer part in 4-lane steps over the same layout (lanes h0..h0+3 of part j are 16
    contiguous bytes), so the int32 sums and everything after them are those of the x86 kernel. With `rows` (the
    GEMM: activation rows rb * rows + ri) the codes are unpacked once for every row's dots; row ri's int32 sums sit
    in ia[ri * L ...], its fp32 partial sums in acc[ri * acc_stride ...] (default: Lc)."""
    if Lc == 2 and _packed_tail(spec):
        tail = _tail_bytes3 if spec.layout == "bytes3" else _tail_words2
        return tail(spec, isa, start, acc, ind, rows, acc_stride)
    P, R, Wc = _parts(spec), rows or 1, _width(Lc)
    NA = 1 if rows else _accumulators(spec)
    S, codes = _weight_codes(spec, isa, Lc, start, ind)
    S.append(f"{ind}ia[T.ramp(0, 1, {NA * R * L})] = T.broadcast(0, {NA * R * L})")
    row = lambda ri, size: f"(rb * {R} + {ri}) * {size} + " if rows else ""  # noqa: E731 - the row's buffer offset
    for h0, j, W, code in codes:
        for ri in range(R):
            base = f"{row(ri, spec.k)}({start}) * {P * 4} + {j * 4 * Lc + 4 * h0}"
            # a 2-lane tail: the bytes past the chunk's part are zero, so its padded lanes' sums are 0
            act = _padded(lambda m, b=base: f"xq[T.ramp({b}, 1, {m})]", 4 * min(Lc - h0, W), 4 * W, "T.int8(0)")
            Li = f"T.ramp({(j % NA * R + ri) * L + h0}, 1, {W})"
            S.append(f"{ind}ia[{Li}] = {_dot(isa, W, f'ia[{Li}]', code, act)}")
    for ri in range(R):
        La = f"T.ramp({ri * (acc_stride or Wc)}, 1, {Wc})"
        xs = _padded(lambda m, ri=ri: f"xsw[T.ramp({row(ri, spec.k // _lane_values(spec))}{start}, 1, {m})]", Lc, Wc)
        isum = " + ".join(f"ia[T.ramp({(a * R + ri) * L}, 1, {Wc})]" for a in range(NA))
        S.append(f'{ind}{acc}[{La}] = {acc}[{La}] + T.Cast("float32x{Wc}", {isum}) * {xs} * {gscale(Lc, start)}')
    return S


def _accumulators(spec: QuantSpec) -> int:
    """int32 accumulators of a GEMV chunk, its parts dealt over them in turn: the 8 dots of a bytes3 chunk in one
    chain wait on each other's latency (integer sums: the order changes nothing). Two took the 3-bit GEMVs from
    1.09x to 1.05x W4's time on SmolLM2's shapes (benchmarks/cpu_gemv_bits.py, before the packed tail); W4's 2 parts
    and W2's 4 (then a lane per word) lost 2-10% with two. W2's 8 parts per 32-value lane take two as bytes3's do."""
    return 2 if _wide(spec) else 1


GEMM_ROWS = 8   # activation rows per pass over a weight row: codes unpacked once for 8 rows of dots
# weight rows per parallel item: a block of 8 activation rows (int8 codes and scales, under 20 KiB at K <= 1536) stays
# in L1 while it meets the tile's 32 rows in turn. Looping every weight row over all activation rows instead streamed
# the whole quantized prompt from L2 once per weight row (about 300 KB per row of the 1536-wide down projection).
GEMM_TILE = 32


def int8_gemm_func(spec: QuantSpec, isa: str = "vnni", out_dtype: str = "float32", name: str = "main",
                   lanes: int = 8):
    """y[1, m, N] = x[1, m, K] @ dq(W)^T for m rows (prefill; m symbolic) with int8 activations: each row is
    quantized as in the GEMV and gets the GEMV's integer sums; rows go GEMM_ROWS at a time through each weight chunk
    so that its codes are unpacked once per 8 rows, and the 8 rows finish together in vector registers (`_finish_rows`:
    lane sums by a shuffle tree, the zero-point terms of 8 rows in one vector per group). `lanes`: weight rows per
    vector of the 4-bit row-lane GEMM (`cpu_int8_rows.lanes_for`)."""
    from . import cpu_int8_rows
    if cpu_int8_rows.supports(spec):   # 4 bits: output rows in the vector lanes (cpu_int8_rows.py); N not a
        # multiple of `lanes`: 8 rows per vector
        return cpu_int8_rows.gemm_func(spec, isa, out_dtype, name, lanes if cpu_int8_rows.supports(spec, lanes) else 8)
    return _from_source(spec, isa, "GEMM", lambda: _source_gemm(spec, isa, out_dtype, name))


def _hsum_rows(L: int, R: int, buf: str, out: str, ind: str) -> list[str]:
    """Statements: out[r] = sum of the L lanes buf[r * L ...] for rows r < R (R a multiple of L), L rows at a time
    by a tree of shuffles (log2 L levels; each level adds the even- and odd-indexed halves of pairs of vectors)."""
    S = []
    for r0 in range(0, R, L):
        vec = [f"{buf}[T.ramp({(r0 + i) * L}, 1, {L})]" for i in range(L)]
        width = 1   # lanes of one row's partial sums that sit together in a vector
        while len(vec) > 1:
            nxt = []
            for a, b in zip(vec[0::2], vec[1::2]):
                # a holds rows' runs of `width` lanes (lanes 0..L-1), b the next rows' (L..2L-1): runs alternately
                # from a and b, first and second run of each pair of runs, so that the sum halves the partial sums
                even = [i // width // 2 * 2 * width + i % width + (L if i // width % 2 else 0) for i in range(L)]
                odd = [e + width for e in even]
                nxt.append(f"(T.Shuffle([{a}, {b}], {even}) + T.Shuffle([{a}, {b}], {odd}))")
            vec, width = nxt, width * 2
        S.append(f"{ind}{out}[T.ramp({r0}, 1, {L})] = {vec[0]}")
    return S


def _source_gemm(spec: QuantSpec, isa: str, out_dtype: str, name: str) -> str:
    n, k, R, NG = spec.n, spec.k, GEMM_ROWS, spec.n_groups
    NT = next(t for t in (GEMM_TILE, 16, 8, 4, 2, 1) if n % t == 0)
    L, n_main, tail = chunk_plan(spec)
    gscale = functools.partial(_group_scale, spec.group_len // _lane_values(spec))
    mp = f"((m + {R - 1}) // {R} * {R})"   # rows padded to whole blocks: pad rows repeat the last row, never stored
    z = _zero(spec)
    S = _gemm_head(spec, name, out_dtype)
    S += [f'    xq = T.alloc_buffer(({mp} * {k},), "int8")',
          f'    xsw = T.alloc_buffer(({mp} * {k // _lane_values(spec)},), "float32")',
          f'    gsum = T.alloc_buffer(({mp} * {NG},), "float32")',
          f'    gst = T.alloc_buffer(({NG} * {mp},), "float32")',
          f"    for r in T.parallel({mp}):"]   # rows are independent: both threads quantize
    S += _quantize_row(spec, "x[0, T.min(r, m - 1), {kk}]", "r", " " * 8)
    # the group sums row-minor, so that one vector load holds L rows' sums of a group
    S += [f"        for g in T.serial({NG}):",
          f"            gst[g * {mp} + r] = gsum[r * {NG} + g]",
          f"    for nt in T.parallel({n // NT}):",
          f'        yv = T.alloc_buffer(({R * L},), "float32")',
          f'        ia = T.alloc_buffer(({R * L},), "int32")',
          f'        wq = T.alloc_buffer(({L},), "uint32")',
          f'        hq = T.alloc_buffer(({L},), "uint32")',
          f'        tq = T.alloc_buffer(({L},), "uint32")',
          f'        sz = T.alloc_buffer(({NG},), "float32")',
          f'        ys = T.alloc_buffer(({R},), "float32")',
          f"        for rb in T.serial({mp} // {R}):",
          f"            for ni in T.serial({NT}):",
          f"                nn = nt * {NT} + ni",
          f"                for g in T.serial({NG}):",
          f'                    sz[g] = T.Cast("float32", scales[nn, g]) * {z}',
          f"                yv[T.ramp(0, 1, {R * L})] = T.broadcast(T.float32(0), {R * L})",
          f"                for c in T.serial({n_main}):"]
    S += _chunk(spec, isa, L, L, f"c * {L}", "yv", gscale, " " * 20, R)
    if tail:   # the tail chunk adds into lanes 0..3 (a packed bytes3 tail: 0..7) of each row's sums
        S += _chunk(spec, isa, tail, L, str(L * n_main), "yv", gscale, " " * 16, R, acc_stride=L)
    S += _hsum_rows(L, R, "yv", "ys", " " * 16)
    for r0 in range(0, R, L):
        Lr = f"T.ramp({r0}, 1, {L})"
        S += [f"                for g in T.serial({NG}):",
              f"                    ys[{Lr}] = ys[{Lr}] - T.broadcast(sz[g], {L}) * "
              f"gst[T.ramp(g * {mp} + rb * {R} + {r0}, 1, {L})]"]
    S += [f"                for ri in T.serial({R}):",
          f"                    if rb * {R} + ri < m:",
          f'                        y[0, rb * {R} + ri, nn] = T.Cast("{out_dtype}", ys[ri])']
    return "\n".join(S) + "\n"
