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
The zero-point term is an integer: each lane's accumulator starts at -(z_g - o) times the sum of its 4 activation
codes (`asl`, shared by all rows), so the dot leaves the exact block sum and the row has no separate zero-point
loop. Blocks go to two accumulators in turn (their FMA chains overlap); one horizontal sum per row.
"""
from __future__ import annotations

from .dequant import QuantSpec

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
    import tvm
    from tvm.script import tirx as T
    if not supports(spec, isa):
        raise ValueError(f"no 8-bit int8 GEMV for {spec} on {isa!r}")
    return tvm.script.from_source(_source(spec, isa, out_dtype, lead, name), extra_vars={"T": T})


def _source(spec: QuantSpec, isa: str, out_dtype: str, lead: tuple[int, ...], name: str) -> str:
    from .cpu_int8 import BLOCK, _dot, _signature, _tree
    n, k, G = spec.n, spec.k, spec.group_len
    NB = k // BLOCK
    off = 128 if isa == "sdot" else 0
    W = 4 if isa == "sdot" else 8     # lanes of one dot
    lo = ", ".join(str(d) for d in lead)
    ix = ", ".join("0" for _ in lead)
    V = f"T.ramp(0, 1, {BLOCK})"
    S = _signature(spec, name, f'x: T.Buffer(({lo}, {k}), "float16")', f'y: T.Buffer(({lo}, {n}), "{out_dtype}")')
    S += [f'    xq = T.alloc_buffer(({k},), "int8")',
          f'    xd = T.alloc_buffer(({NB},), "float32")',
          f'    asl = T.alloc_buffer(({k // 4},), "int32")',
          f"    for b in T.serial({NB}):",
          f'        fx = T.alloc_buffer(({BLOCK},), "float32")',
          f'        am = T.alloc_buffer(({BLOCK},), "float32")',
          f'        qv = T.alloc_buffer(({BLOCK},), "int32")',
          f'        fx[{V}] = T.Cast("float32x{BLOCK}", x[{ix}, T.ramp(b * {BLOCK}, 1, {BLOCK})])',
          f"        am[{V}] = T.fabs(fx[{V}])"]
    S += _tree("am", BLOCK, "max", " " * 8)
    # the numerics of cpu_int8._quantize_row (and quantize_act_np): same codes, same scales
    S += ["        mx = T.max(am[0], am[1])",
          "        inv = T.Select(mx > T.float32(0), T.float32(127) / mx, T.float32(0))",
          f'        qv[{V}] = T.Cast("int32x{BLOCK}", T.round(fx[{V}] * T.broadcast(inv, {BLOCK})))',
          f'        xq[T.ramp(b * {BLOCK}, 1, {BLOCK})] = T.Cast("int8x{BLOCK}", qv[{V}])',
          "        for t in T.serial(8):",
          f"            asl[b * 8 + t] = qv[4 * t] + qv[4 * t + 1] + qv[4 * t + 2] + qv[4 * t + 3]",
          "        xd[b] = mx / T.float32(127)",
          f"    for nn in T.parallel({n}):",
          '        acc = T.alloc_buffer((16,), "float32")',
          '        ia = T.alloc_buffer((16,), "int32")',
          "        acc[T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)"]

    def block(b: str, h: int, ind: str) -> list[str]:
        """Block b into accumulator h (lanes 8h .. 8h + 7)."""
        g = f"({b}) * {BLOCK} // {G}"
        zo = (f"T.int32({off - int(spec.sym_zero)})" if spec.sym else
              f'T.int32({off}) - T.Cast("int32", zeros[nn, {g}])')
        out = []
        for h0 in range(0, 8, W):
            code = f"qweight[nn, T.ramp(({b}) * 8 + {h0}, 1, {W})]"
            if off:
                code = f"T.bitwise_xor({code}, T.broadcast(T.uint32(0x80808080), {W}))"
            init = f"T.broadcast({zo}, {W}) * asl[T.ramp(({b}) * 8 + {h0}, 1, {W})]"
            act = f"xq[T.ramp(({b}) * {BLOCK} + {4 * h0}, 1, {4 * W})]"
            out.append(f"{ind}ia[T.ramp({8 * h + h0}, 1, {W})] = {_dot(isa, W, init, code, act)}")
        La = f"T.ramp({8 * h}, 1, 8)"
        out.append(f'{ind}acc[{La}] = acc[{La}] + T.Cast("float32x8", ia[{La}]) * '
                   f'T.broadcast(T.Cast("float32", scales[nn, {g}]) * xd[{b}], 8)')
        return out

    if NB // 2:
        S.append(f"        for c in T.serial({NB // 2}):")
        S += block("2 * c", 0, " " * 12) + block("2 * c + 1", 1, " " * 12)
    if NB % 2:
        S += block(str(NB - 1), 0, " " * 8)
    S += ["        acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + acc[T.ramp(8, 1, 8)]"]
    S += _tree("acc", 8, "+", " " * 8)
    S.append(f'        y[{ix}, nn] = T.Cast("{out_dtype}", acc[0] + acc[1])')
    return "\n".join(S) + "\n"
