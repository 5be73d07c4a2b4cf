"""Prefill GEMM for 4-bit weights on CPUs with integer dot products, vector lanes over output rows: y[1, m, N] =
x[1, m, K] @ dq(W)^T with int8 activations (the arithmetic of `cpu_int8.py`), reaching `vpdpbusd` (VNNI),
`vpmaddubsw` + `vpmaddwd` (AVX2) or NEON `sdot` through LLVM intrinsics.

`cpu_int8.py`'s GEMM puts K in the vector lanes (a lane = one weight word of one row), so every lane's int32 sum
belongs to one activation block and needs its own int32-to-fp32 conversion and scaling after every 2 dots, and each
output value ends with a horizontal sum: about 4 instructions per dot, the dots a fifth of the loop. Here, as in the
register-tiled GEMMs of BLAS libraries and llama.cpp's tinyBLAS, the 8 lanes of a vector are 8 weight rows (output
columns; 16 rows in 512-bit vectors where the target has AVX-512 VNNI, `lanes_for`: 1.4-1.7x the 8-row kernel on
SmolLM2's linears, benchmarks/results/cpu_kernels_gemm16.md), and one dot multiplies word w of those 8 rows by 4
activation bytes broadcast to every lane: the 8 dots of one activation block (32 values: 4 words x 2 nibbles)
accumulate into the same int32 vector, which is converted and scaled once per block (`fma(cvt(sum), d_b)`), the
group scale and zero-point term once per group for all 8 rows, and no horizontal sums remain (the lanes are the
outputs).

Layout. The checkpoint's words are not moved: each parallel item copies its tile of TILE_BLOCKS x 8 weight rows
transposed into a local buffer (word w of 8 rows contiguous; the copy is paid once per tile and prompt, the tile
then stays in L1 for every activation row) with its group scales and scale x zero products per lane. Word w of a row
masked with 0x0F0F0F0F holds codes 8w + 2i in byte i, shifted by 4 codes 8w + 2i + 1, so the quantization step
stores each activation block as 8 int32 words, word 2w + j holding activations 8w + 2i + j in byte i: one broadcast
load per dot.

Register tile: ROWS activation rows x 8 weight rows: ROWS int32 and ROWS fp32 accumulators plus two code vectors;
the codes of a word are unpacked once for all ROWS rows. NEON registers hold 4 lanes: the integer part runs in two
4-lane halves (each its own `sdot` over the same bytes), so the int32 sums and the fp32 arithmetic after them are
the x86 kernel's lane for lane.

Arithmetic (x_k ~= d_b a_k, W = s_g (q - z_g); `cpu_int8.int8_gemv_np` is the model):
    y = sum_g [ s_g * (sum_{b in g} d_b * dot(q, a)_b) - s_g z_g * gsum_g ],  gsum_g = sum_{b in g} d_b sum_k a_k.
"""
from __future__ import annotations

from .dequant import QuantSpec

ROWS = {"vnni": 8, "avx2": 4, "sdot": 4}   # activation rows per register tile (AVX2 has 16 vector registers)
TILE_BYTES = 12 * 1024     # transposed weights per parallel item: L1 room left for ROWS activation rows


def supports(spec: QuantSpec, lanes: int = 8) -> bool:
    """4-bit words, output rows a multiple of `lanes`, K and the group whole activation blocks."""
    from .cpu_int8 import BLOCK
    return (spec.layout == "words" and spec.bits == 4 and spec.n % lanes == 0 and spec.k % BLOCK == 0
            and spec.group_len % BLOCK == 0)


def lanes_for(target, isa: str) -> int:
    """Weight rows per vector: 16 where the target has 512-bit VNNI (AVX-512 VNNI and BW), else 8."""
    if isa != "vnni":
        return 8
    from tvm.target import codegen
    try:
        return 16 if codegen.target_has_features(["avx512vnni", "avx512bw"], target) else 8
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: the 256-bit kernel
        return 8


def tile_blocks(spec: QuantSpec, lanes: int = 8) -> int:
    """Blocks of `lanes` weight rows per parallel item: the most (of 4, 2, 1) dividing N/lanes whose codes fit
    TILE_BYTES."""
    return next(t for t in (4, 2, 1)
                if (spec.n // lanes) % t == 0 and (t * lanes * spec.k // 2 <= TILE_BYTES or t == 1))


def gemm_func(spec: QuantSpec, isa: str = "vnni", out_dtype: str = "float32", name: str = "main", lanes: int = 8):
    from .cpu_int8 import _from_source
    if not supports(spec, lanes) or (lanes == 16 and isa != "vnni") or lanes not in (8, 16):
        raise ValueError(f"no row-lane int8 GEMM for {spec} with {lanes} lanes ({isa})")
    return _from_source(spec, isa, f"GEMM ({lanes} lanes)", lambda: _source(spec, isa, out_dtype, name, lanes))


def _source(spec: QuantSpec, isa: str, out_dtype: str, name: str, L: int = 8) -> str:
    from .cpu_int8 import BLOCK, BLOCK_SUM, _dot, _gemm_head, _quantize_block, _zero
    n, k, NG, R = spec.n, spec.k, spec.n_groups, ROWS[isa]
    K8, NB, bpg, TB = k // 8, k // BLOCK, spec.group_len // BLOCK, tile_blocks(spec, L)
    W = 4 if isa == "sdot" else L             # lanes of one dot
    mp = f"((m + {R - 1}) // {R} * {R})"     # rows padded to whole tiles: pad rows repeat the last row, never stored
    z = _zero(spec)
    V = f"T.ramp(0, 1, {BLOCK})"
    # activation block order: word o = 2w + j holds activations 8w + 2i + j in byte i
    perm = [8 * (o // 2) + 2 * i + o % 2 for o in range(8) for i in range(4)]
    S = _gemm_head(spec, name, out_dtype)
    S += [f'    xq = T.alloc_buffer(({mp} * {k // 4},), "int32")',
          f'    xd = T.alloc_buffer(({mp} * {NB},), "float32")',
          f'    gsum = T.alloc_buffer(({mp} * {NG},), "float32")',
          f"    for r in T.parallel({mp}):",
          f"        for g in T.serial({NG}):",
          f"            gsum[r * {NG} + g] = T.float32(0)",
          f"        for b in T.serial({NB}):"]
    S += _quantize_block(f"x[0, T.min(r, m - 1), T.ramp(b * {BLOCK}, 1, {BLOCK})]",
                         [f"xq[T.ramp((r * {NB} + b) * 8, 1, 8)] = T.reinterpret("
                          f'T.Cast("int8x{BLOCK}", T.Shuffle([qv[{V}]], {perm})), dtype="int32x8")'], " " * 12)
    S += [f"            xd[r * {NB} + b] = mx / T.float32(127)",
          f"            gsum[r * {NG} + b // {bpg}] = gsum[r * {NG} + b // {bpg}] + {BLOCK_SUM}",
          f"    for nt in T.parallel({n // (L * TB)}):",
          f'        wt = T.alloc_buffer(({TB * K8 * L},), "uint32")',
          f'        st = T.alloc_buffer(({TB * NG * L},), "float32")',
          f'        szt = T.alloc_buffer(({TB * NG * L},), "float32")',
          f'        isum = T.alloc_buffer(({R * L},), "int32")',
          f'        accf = T.alloc_buffer(({R * L},), "float32")',
          f'        yacc = T.alloc_buffer(({R * L},), "float32")',
          f"        for tb in T.serial({TB}):",
          f"            for l in T.serial({L}):",
          f"                nn = nt * {L * TB} + tb * {L} + l",
          f"                for w in T.serial({K8}):",
          f"                    wt[(tb * {K8} + w) * {L} + l] = qweight[nn, w]",
          f"                for g in T.serial({NG}):",
          f'                    st[(tb * {NG} + g) * {L} + l] = T.Cast("float32", scales[nn, g])',
          f"                    szt[(tb * {NG} + g) * {L} + l] = st[(tb * {NG} + g) * {L} + l] * {z}",
          f"        for rb in T.serial({mp} // {R}):",
          f"            for tb in T.serial({TB}):",
          f"                yacc[T.ramp(0, 1, {R * L})] = T.broadcast(T.float32(0), {R * L})",
          f"                for g in T.serial({NG}):",
          f"                    accf[T.ramp(0, 1, {R * L})] = T.broadcast(T.float32(0), {R * L})",
          # a ragged last group has fewer blocks
          f"                    for bi in T.serial(T.min({bpg}, {NB} - g * {bpg})):",
          f"                        b = g * {bpg} + bi",
          f"                        isum[T.ramp(0, 1, {R * L})] = T.broadcast(0, {R * L})"]
    ind = " " * 24
    u = lambda v: f"T.broadcast(T.uint32({v}), {W})"  # noqa: E731
    for w4 in range(BLOCK // 8):
        for h0 in range(0, L, W):
            wv = f"wt[T.ramp((tb * {K8} + b * {BLOCK // 8} + {w4}) * {L} + {h0}, 1, {W})]"
            codes = [f"T.bitwise_and({wv}, {u(0x0F0F0F0F)})",
                     f"T.bitwise_and(T.shift_right({wv}, {u(4)}), {u(0x0F0F0F0F)})"]
            for j, code in enumerate(codes):
                for ri in range(R):
                    act = (f"T.reinterpret(T.broadcast(xq[((rb * {R} + {ri}) * {NB} + b) * 8 + {2 * w4 + j}], {W}), "
                           f'dtype="int8x{4 * W}")')
                    Li = f"T.ramp({ri * L + h0}, 1, {W})"
                    S.append(f"{ind}isum[{Li}] = {_dot(isa, W, f'isum[{Li}]', code, act)}")
    for ri in range(R):
        Lr = f"T.ramp({ri * L}, 1, {L})"
        S.append(f'{ind}accf[{Lr}] = accf[{Lr}] + T.Cast("float32x{L}", isum[{Lr}]) * '
                 f"T.broadcast(xd[(rb * {R} + {ri}) * {NB} + b], {L})")
    ind = " " * 20
    sg = f"st[T.ramp((tb * {NG} + g) * {L}, 1, {L})]"
    szg = f"szt[T.ramp((tb * {NG} + g) * {L}, 1, {L})]"
    for ri in range(R):
        Lr = f"T.ramp({ri * L}, 1, {L})"
        S.append(f"{ind}yacc[{Lr}] = yacc[{Lr}] + {sg} * accf[{Lr}] - {szg} * "
                 f"T.broadcast(gsum[(rb * {R} + {ri}) * {NG} + g], {L})")
    for ri in range(R):
        S += [f"                if rb * {R} + {ri} < m:",
              f"                    y[0, rb * {R} + {ri}, T.ramp(nt * {L * TB} + tb * {L}, 1, {L})] = "
              f'T.Cast("{out_dtype}x{L}", yacc[T.ramp({ri * L}, 1, {L})])']
    return "\n".join(S) + "\n"
