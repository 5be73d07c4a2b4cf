"""Decode GEMV for GPUs: one activation row times a 2/3/4-bit weight, written as a hand-scheduled TIR prim func.

At batch 1 a linear layer only streams its packed weights, so the kernel is built around the loads:
- every thread owns a "chunk" of K (32 values at 4 bits, 64 at 2 bits, 128 at 3 bits in the words3x32 layout) and
  reads it with one 128-bit load per row (three at 3 bits); consecutive threads read consecutive chunks (coalesced);
- a block computes `rows` output rows, and each thread reuses its chunk of x (read once, 128-bit loads) for all of
  them; the block's `warps` split K between them (split-K inside the block) so that small-N linears still fill the
  GPU; partial sums meet through warp shuffles and one shared-memory step;
- no integer-to-float conversion per weight: a field of q bits is masked into the mantissa of the float 1.0
  (`0x3F800000 | (q << b)` is exactly `1 + q * 2^(b-23)`), so `x * f = x + x * q * 2^(b-23)` costs one mask (LOP3)
  and one FMA per weight; each field position b has its own accumulator, and fields sit high in the mantissa
  (b >= 14) so the `x` term is at most 2^9 times the `x * q` term and fp32 keeps the difference to ~2^-15;
- the zero point and the `x` terms are folded into per-chunk sums of x shared by all rows:
  `sum_k x_k (q_k - z) s = s * (sum_b 2^(23-b) (dot_b - sx_b) - z * sx)`, a few FMAs per row and chunk instead of a
  subtraction per weight (the same folding as the "bit tricks" dequantizers of FasterTransformer and Marlin).

`gemv_func(spec, cfg, gpu=False)` emits the same loop body with the thread loops as serial loops and the shuffles as
a plain sum, so the index and bit math is tested on the CPU (compiled for llvm) against the NumPy reference.
The prim func carries "tirx.is_scheduled", so dlight leaves it alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dequant import QuantSpec

MAGIC = 0x3F800000                      # the float 1.0: fields are OR-ed into its mantissa
CHUNK = {4: 32, 2: 64, 3: 128}          # values per thread and row per step
CHUNK_WORDS = {4: 4, 2: 4, 3: 12}       # uint32 words per chunk: one (4 and 2 bits) or three (3 bits) 128-bit loads
SUB_WORDS = {4: 4, 2: 2, 3: 3}          # words of one 32-value sub-block (x is pre-scaled 32 values at a time)
LAYOUT = {4: "words", 2: "words", 3: "words3x32"}


@dataclass(frozen=True)
class GemvConfig:
    rows: int = 4     # output rows per block (x chunk reused by each)
    warps: int = 4    # warps per block, splitting K

    def __post_init__(self):
        if self.rows < 1 or self.warps < 1:
            raise ValueError(f"bad GEMV config {self}")


def supports(spec: QuantSpec) -> bool:
    """The kernel covers whole chunks inside one group: K a multiple of the chunk, G a multiple of it (or -1)."""
    c = CHUNK.get(spec.bits)
    return (c is not None and spec.layout == LAYOUT[spec.bits] and spec.k % c == 0
            and (spec.group_size == -1 or spec.group_size % c == 0))


def warps_for(spec: QuantSpec, steps: int = 1) -> int:
    """Warps that cover a row's chunks in `steps` steps: a block of more threads than chunks would idle."""
    return -(-(spec.k // CHUNK[spec.bits]) // (32 * steps))


def default_config(spec: QuantSpec, sms: int = 132) -> GemvConfig:
    """Rows per block and warps, from the H100 sweep in benchmarks/results/gpu-h100-decode-gemv.md: two steps over K
    per thread at 4 and 2 bits (the second step's loads overlap the first's math), one at 3 bits (three 128-bit loads
    per row already); 8 rows at 2 bits (x reused more where weights are cheapest), else 4; fewer rows while the grid
    would leave SMs idle, more steps while a block would exceed 12 warps."""
    rows = 8 if spec.bits == 2 else 4
    while rows > 1 and (spec.n % rows or spec.n // rows < 2 * sms):
        rows //= 2
    steps = 1 if spec.bits == 3 else 2
    while warps_for(spec, steps) > 12:
        steps += 1
    return GemvConfig(rows, warps_for(spec, steps))


# ------------------------------------------------------------------------------------------------ field extraction
def _field_terms(bits: int):
    """For the 32 values of a sub-block: ([(word, shift, mask)], b) such that OR-ing `(word << shift) & mask` (right
    shift for negative `shift`) gives the value's bits at bit b. Two to four fields share a shift, so the compiler
    emits one shift per 2-4 weights; b stays in 14..21 (see the module docstring)."""
    out = []
    if bits == 4:
        for j in range(4):
            for i in range(8):
                b = 15 + 4 * (i % 2)
                out.append(([(j, 15 - 8 * (i // 2), 0xF << b)], b))
    elif bits == 2:
        for j in range(2):
            for i in range(16):
                b = 15 + 2 * (i % 4)
                out.append(([(j, 15 - 8 * (i // 4), 0x3 << b)], b))
    else:  # words3x32: 10 fields per word, then values 30 and 31 from the three spare 2-bit tops
        for j in range(3):
            for i in range(10):
                b = 14 + 3 * (i % 3)
                out.append(([(j, 14 - 9 * (i // 3), 0x7 << b)], b))
        out.append(([(0, -13, 0x3 << 17), (1, -11, 0x4 << 17)], 17))
        out.append(([(1, -14, 0x1 << 17), (2, -12, 0x6 << 17)], 17))
    return out


def _shift(w: str, s: int) -> str:
    if s > 0:
        return f"T.shift_left({w}, T.uint32({s}))"
    if s < 0:
        return f"T.shift_right({w}, T.uint32({-s}))"
    return w


def _field_float(word_of, terms) -> str:
    # the magic comes from a register (`mg`): with both it and the mask as immediates, ptxas spends two LOP3 per
    # weight (one immediate per LOP3) instead of one
    expr = "mg[0]"
    for j, s, mask in terms:
        expr = f"T.bitwise_or({expr}, T.bitwise_and({_shift(word_of(j), s)}, T.uint32({mask})))"
    return f'T.reinterpret("float32", {expr})'


# ------------------------------------------------------------------------------------------------ the prim func
def gemv_func(spec: QuantSpec, cfg: GemvConfig | None = None, gpu: bool = True, out_dtype: str = "float16",
              lead: tuple[int, ...] = (1,), name: str = "main"):
    """y[lead..., N] = x[lead..., K] @ dq(W)^T for one row (prod(lead) == 1), fp32 accumulation, `out_dtype` output.

    Arguments: x fp16, qweight, scales, [zeros], y. `gpu=False` gives the CPU-testable twin (same body, serial)."""
    import tvm
    from tvm.script import tirx as T

    if not supports(spec):
        raise ValueError(f"no decode GEMV for {spec}")
    cfg = cfg or default_config(spec)
    if spec.n % cfg.rows:
        raise ValueError(f"{cfg.rows} rows per block do not divide N={spec.n}")
    src = _source(spec, cfg, gpu, out_dtype, lead, name)
    return tvm.script.from_source(src, extra_vars={"T": T})


def _source(spec: QuantSpec, cfg: GemvConfig, gpu: bool, out_dtype: str, lead: tuple[int, ...], name: str) -> str:
    bits, n, k, R, TY = spec.bits, spec.n, spec.k, cfg.rows, cfg.warps
    C, CW, SW = CHUNK[bits], CHUNK_WORDS[bits], SUB_WORDS[bits]
    nc = k // C                                   # chunks per row
    tpb = 32 * TY
    nit = -(-nc // tpb)
    G = spec.group_len
    lo = ", ".join(str(d) for d in lead)
    ix = ", ".join("0" for _ in lead)             # index of the single row
    local = '"local"' if gpu else '"global"'
    fields = _field_terms(bits)
    ins = [f'x: T.Buffer(({lo}, {k}), "float16")', f'qweight: T.Buffer(({n}, {spec.words}), "uint32")',
           f'scales: T.Buffer(({n}, {spec.n_groups}), "float16")']
    if not spec.sym:
        ins.append(f'zeros: T.Buffer(({n}, {spec.n_groups}), "uint8")')
    ins.append(f'y: T.Buffer(({lo}, {n}), "{out_dtype}")')

    def loop(var, extent, tag):
        return f'T.thread_binding({extent}, thread="{tag}")' if gpu else f"T.serial({extent})"

    classes = sorted({b for _, b in fields})       # one accumulator per field position: no x pre-scaling
    ncls = len(classes)
    L = [f"@T.prim_func", f"def {name}({', '.join(ins)}):",
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         f'    for bx in {loop("bx", n // R, "blockIdx.x")}:']
    if gpu:
        L.append(f'        red = T.alloc_buffer(({TY * R},), "float32", scope="shared")')
    else:
        L.append(f'        red = T.alloc_buffer(({tpb * R},), "float32")')
    L += [f'        for ty in {loop("ty", TY, "threadIdx.y")}:',
          f'            for tx in {loop("tx", 32, "threadIdx.x")}:']
    ind = " " * 16
    L += [f"{ind}wq = T.alloc_buffer(({R * CW},), \"uint32\", scope={local})",
          f"{ind}xh = T.alloc_buffer((32,), \"float16\", scope={local})",
          f"{ind}xf = T.alloc_buffer((32,), \"float32\", scope={local})",
          f"{ind}acc = T.alloc_buffer(({R},), \"float32\", scope={local})",
          f"{ind}dot = T.alloc_buffer(({R * ncls},), \"float32\", scope={local})",
          f"{ind}sx = T.alloc_buffer(({ncls},), \"float32\", scope={local})",
          f"{ind}mg = T.alloc_buffer((1,), \"uint32\", scope={local})"]
    if gpu:  # lane 0's `MAGIC | lane` through a shuffle: a value the compiler cannot fold (see _field_float)
        L.append(f"{ind}mg[0] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), T.bitwise_or(T.uint32({MAGIC}), "
                 f"T.Cast(\"uint32\", tx)), 0, 32, 32)")
    else:
        L.append(f"{ind}mg[0] = T.uint32({MAGIC})")
    L += [f"{ind}acc[{r}] = T.float32(0)" for r in range(R)]
    c = f"(it * {tpb} + ty * 32 + tx)"
    L.append(f"{ind}for it in T.serial({nit}):")
    body = ind + "    "
    if nit * tpb != nc:
        L.append(f"{body}if {c} < {nc}:")
        body += "    "
    # weights of all rows first: R (x3 at 3 bits) independent 128-bit loads in flight per thread
    for r in range(R):
        for v in range(CW // 4):
            L.append(f"{body}wq[T.ramp({r * CW + 4 * v}, 1, 4)] = "
                     f"qweight[bx * {R} + {r}, T.ramp({c} * {CW} + {4 * v}, 1, 4)]")
    L += [f"{body}sx[{i}] = T.float32(0)" for i in range(ncls)]
    L += [f"{body}dot[{i}] = T.float32(0)" for i in range(R * ncls)]
    for sb in range(C // 32):
        for v in range(4):
            L.append(f"{body}xh[T.ramp({8 * v}, 1, 8)] = x[{ix}, T.ramp({c} * {C} + {sb * 32 + 8 * v}, 1, 8)]")
        L += [f'{body}xf[{v}] = T.Cast("float32", xh[{v}])' for v in range(32)]
        # per-class sums of x: the zero point and the mantissa's leading 1, shared by all rows
        for i, b in enumerate(classes):
            L.append(f"{body}sx[{i}] = sx[{i}] + " + " + ".join(f"xf[{v}]" for v, (_, fb) in enumerate(fields)
                                                                if fb == b))
        for r in range(R):
            for v, (terms, b) in enumerate(fields):
                f = _field_float(lambda j, r=r, sb=sb: f"wq[{r * CW + sb * SW + j}]", terms)
                d = f"dot[{r * ncls + classes.index(b)}]"
                L.append(f"{body}{d} = {d} + xf[{v}] * {f}")
    g = f"{c} * {C} // {G}" if G != k else "0"
    for r in range(R):
        row = f"bx * {R} + {r}"
        z = (f'T.Cast("float32", zeros[{row}, {g}])' if not spec.sym else f"T.float32({float(spec.sym_zero)})")
        # dot_b = sum x (1 + q 2^(b-23)): sum x q = sum_b 2^(23-b) (dot_b - sx_b)
        qx = " + ".join(f"(dot[{r * ncls + i}] - sx[{i}]) * T.float32({float(2 ** (23 - b))})"
                        for i, b in enumerate(classes))
        sxt = " + ".join(f"sx[{i}]" for i in range(ncls))
        L.append(f'{body}acc[{r}] = acc[{r}] + T.Cast("float32", scales[{row}, {g}]) * '
                 f"({qx} - {z} * ({sxt}))")
    if gpu:
        for r in range(R):
            for off in (16, 8, 4, 2, 1):
                L.append(f"{ind}acc[{r}] = acc[{r}] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), acc[{r}], "
                         f"{off}, 32, 32)")
        L.append(f"{ind}if tx == 0:")
        L += [f"{ind}    red[ty * {R} + {r}] = acc[{r}]" for r in range(R)]
        L.append(f"{ind}if ty == 0 and tx < {R}:")
        tot = " + ".join(f"red[{t * R} + tx]" for t in range(TY))
        L.append(f'{ind}    y[{ix}, bx * {R} + tx] = T.Cast("{out_dtype}", {tot})')
    else:
        L += [f"{ind}red[(ty * 32 + tx) * {R} + {r}] = acc[{r}]" for r in range(R)]
        L += [f"        for r in T.serial({R}):",
              '            tot = T.alloc_buffer((1,), "float32")',
              "            tot[0] = T.float32(0)",
              f"            for t in T.serial({tpb}):",
              f"                tot[0] = tot[0] + red[t * {R} + r]",
              f'            y[{ix}, bx * {R} + r] = T.Cast("{out_dtype}", tot[0])']
    return "\n".join(L) + "\n"
