"""Decode GEMV for 8-bit weights on CPUs with integer dot products: the quantized embedding table run as the output
layer (`--embed-bits 8`, tied or an untied 8-bit head), one activation row times [N, K] codes of one byte each,
reaching `vpdpbusd` (AVX-VNNI / AVX-512 VNNI) or NEON `sdot` through LLVM intrinsics.

Without it, 8-bit tables ran the float GEMV of `cpu.py` (every code converted to fp32, one FMA lane per weight): on
SmolLM2-135M the 49152 x 576 output layer made W4 g128 e8 decode slower than W4 g128 with an fp16 table although it
reads 24 MiB less per token (benchmarks/results/decode_cpu_issue9_idle6.md). Here the arithmetic is llama.cpp's
Q8_0 x Q8_0 dot product: the activations quantized to int8 per block of 32 (`cpu_int8.quantize_act_np`, the same
codes and scales as the 2/3/4-bit kernels), one 256-bit dot per block and row, its int32 sums converted once and
scaled by s_g * d_b.

Layout. The checkpoint's 8-bit words hold codes 4w .. 4w + 3 in bytes 0-3, so the 8 words of one block, loaded as
one vector, are 32 unsigned bytes in the activations' own order: no permutation and no repacking. `vpdpbusd`
multiplies unsigned by signed bytes exactly (products summed four at a time into int32); NEON's `sdot` is signed x
signed, so there the codes are flipped to q - 128 (XOR 0x80) and the zero point with them. (AVX2's `vpmaddubsw`
would saturate its int16 pair sums at 255 x 127 x 2: AVX2 CPUs keep the float kernel for 8-bit tables.)

Arithmetic (x_k ~= d_b a_k, W = s_g (q - z_g), o = 0 or 128 the code offset):
    y = sum_b s_{g(b)} d_b * (dot(q - o, a)_b - (z_g - o) * sum_{k in b} a_k).
Per block and row: one load, one dot, one int32-to-fp32 conversion and one FMA with s_g d_b broadcast from a row
vector of them (converted and multiplied 18 at a time at SmolLM2's g32); blocks go to two accumulators in turn
(their FMA chains overlap). The zero-point terms s_g (z_g - o) sum_{b in g} d_b sum_k a_k (the sums shared by all
rows) go into the accumulator lanes 8 groups at a time; one horizontal sum per row. (Starting each dot at
-(z_g - o) times its lanes' activation sums instead, exact in int32, cost 4 more instructions per block and ran
the 49152 x 576 table in 1.5x the CPU time: 1.96 against 1.33 ms, one thread.)
"""
from __future__ import annotations

from .dequant import QuantSpec
from .tvmscript import parse_tir

ISAS = ("vnni", "sdot")


def supports(spec: QuantSpec, isa: str | None) -> bool:
    """8-bit words with byte zero points, K and the group whole activation blocks, on an ISA whose dot takes full
    unsigned bytes exactly."""
    from .cpu_int8 import BLOCK
    return (isa in ISAS and spec.bits == 8 and spec.layout == "words" and not spec.zeros_packed
            and spec.k % BLOCK == 0 and spec.group_len % BLOCK == 0)


def gemv_func(spec: QuantSpec, isa: str = "vnni", out_dtype: str = "float32", lead: tuple[int, ...] = (1,),
              name: str = "main"):
    """y[lead..., N] = x[lead..., K] @ dq(W)^T for one row, int8 activations (module docstring). Arguments: x fp16,
    qweight, scales, [zeros], y (`out_dtype`)."""
    if not supports(spec, isa):
        raise ValueError(f"no 8-bit int8 GEMV for {spec} on {isa!r}")
    return parse_tir(_source(spec, isa, out_dtype, lead, name))


def _source(spec: QuantSpec, isa: str, out_dtype: str, lead: tuple[int, ...], name: str) -> str:
    from .cpu_int8 import BLOCK, BLOCK_SUM, _dot, _quantize_block, _signature, _tree
    n, k, G, NG = spec.n, spec.k, spec.group_len, spec.n_groups
    NB, bpg = k // BLOCK, spec.group_len // BLOCK
    off = 128 if isa == "sdot" else 0
    W = 4 if isa == "sdot" else 8     # lanes of one dot
    lo = ", ".join(str(d) for d in lead)
    ix = ", ".join("0" for _ in lead)
    V = f"T.ramp(0, 1, {BLOCK})"
    S = _signature(spec, name, f'x: T.Buffer(({lo}, {k}), "float16")', f'y: T.Buffer(({lo}, {n}), "{out_dtype}")')
    S += [f'    xq = T.alloc_buffer(({k},), "int8")',
          f'    xd = T.alloc_buffer(({NB},), "float32")',
          f'    gsum = T.alloc_buffer(({NG},), "float32")',
          f"    for g in T.serial({NG}):",
          "        gsum[g] = T.float32(0)",
          f"    for b in T.serial({NB}):"]
    S += _quantize_block(f"x[{ix}, T.ramp(b * {BLOCK}, 1, {BLOCK})]",
                         [f'xq[T.ramp(b * {BLOCK}, 1, {BLOCK})] = T.Cast("int8x{BLOCK}", qv[{V}])'], " " * 8)
    S += ["        xd[b] = mx / T.float32(127)",
          f"        gsum[b // {bpg}] = gsum[b // {bpg}] + {BLOCK_SUM}",
          f"    for nn in T.parallel({n}):",
          '        acc = T.alloc_buffer((16,), "float32")',
          '        ia = T.alloc_buffer((16,), "int32")',
          f'        sv = T.alloc_buffer(({NB},), "float32")',
          '        zc = T.alloc_buffer((1,), "float32")',
          "        acc[T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)"]
    # each block's s_g * d_b, one vector for the whole row where a group is one block
    if bpg == 1:
        S.append(f'        sv[T.ramp(0, 1, {NB})] = T.Cast("float32x{NB}", scales[nn, T.ramp(0, 1, {NB})]) * '
                 f"xd[T.ramp(0, 1, {NB})]")
    else:
        S += [f"        for b in T.serial({NB}):",
              f'            sv[b] = T.Cast("float32", scales[nn, b // {bpg}]) * xd[b]']

    def block(b: str, h: int, ind: str) -> list[str]:
        """Block b into accumulator h (lanes 8h .. 8h + 7)."""
        out = []
        for h0 in range(0, 8, W):
            code = f"qweight[nn, T.ramp(({b}) * 8 + {h0}, 1, {W})]"
            if off:
                code = f"T.bitwise_xor({code}, T.broadcast(T.uint32(0x80808080), {W}))"
            act = f"xq[T.ramp(({b}) * {BLOCK} + {4 * h0}, 1, {4 * W})]"
            out.append(f"{ind}ia[T.ramp({8 * h + h0}, 1, {W})] = {_dot(isa, W, f'T.broadcast(0, {W})', code, act)}")
        La = f"T.ramp({8 * h}, 1, 8)"
        out.append(f'{ind}acc[{La}] = acc[{La}] + T.Cast("float32x8", ia[{La}]) * T.broadcast(sv[{b}], 8)')
        return out

    if NB // 2:
        S.append(f"        for c in T.serial({NB // 2}):")
        S += block("2 * c", 0, " " * 12) + block("2 * c + 1", 1, " " * 12)
    if NB % 2:
        S += block(str(NB - 1), 0, " " * 8)
    # zero-point terms s_g (z_g - o) gsum_g, 8 groups at a time into the lanes, the rest one by one
    def zo(w: int, g: str) -> str:
        """z - o of w groups from group g, as float32xw."""
        if spec.sym:
            return f"T.broadcast(T.float32({float(spec.sym_zero) - off}), {w})"
        return f'(T.Cast("float32x{w}", zeros[nn, T.ramp({g}, 1, {w})]) - T.broadcast(T.float32({off}), {w}))'

    if NG // 8:
        S += [f"        for q in T.serial({NG // 8}):",
              "            acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] - "
              f'T.Cast("float32x8", scales[nn, T.ramp(q * 8, 1, 8)]) * {zo(8, "q * 8")} * '
              "gsum[T.ramp(q * 8, 1, 8)]"]
    S += ["        acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + acc[T.ramp(8, 1, 8)]"]
    S += _tree("acc", 8, "+", " " * 8)
    S += ["        zc[0] = acc[0] + acc[1]"]
    if NG % 8:
        z1 = (f"T.float32({float(spec.sym_zero) - off})" if spec.sym else
              f'(T.Cast("float32", zeros[nn, g]) - T.float32({off}))')
        S += [f"        for g in T.serial({NG // 8 * 8}, {NG}):",
              f'            zc[0] = zc[0] - T.Cast("float32", scales[nn, g]) * {z1} * gsum[g]']
    S.append(f'        y[{ix}, nn] = T.Cast("{out_dtype}", zc[0])')
    return "\n".join(S) + "\n"
