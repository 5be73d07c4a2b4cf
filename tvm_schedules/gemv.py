"""Decode GEMV for GPUs: one activation row times a 2/3/4-bit weight, written as a hand-scheduled TIR prim func.

At batch 1 a linear layer only streams its packed weights, so the kernel is built around the loads:
- every thread owns one "chunk" of K (fp16 activations: 32 values at 4 bits, 64 at 2 and 3 bits) for every row of
  its block: one 128-bit load per row at 4 and 2 bits, three 64-bit loads in the words3x32 layout at 3 bits;
  consecutive threads read consecutive chunks (coalesced), and the block's warps cover K once (split-K inside the
  block);
- the thread converts its chunk of x to fp32 once (kept in registers up to 64 values) and sums it per field class,
  then streams `steps` steps of `rows` rows: the next step's weights, scales and zero points are loaded into a second
  register buffer before this step's math (double buffering; the steps are unrolled, so buffer indices stay
  constants), so each thread keeps 2 x rows independent loads in flight while it computes; the grid's last block
  may have fewer steps (guarded);
- optionally (`GemvConfig.prefetch`, off: on the H200 every linear got 10-25% slower) each block asks L2 for all of
  its rows' weights, scales and zero points at its start with a few bulk prefetches (`cp.async.bulk.prefetch.L2`,
  sm_90; `prefetch_plan`), so that its bytes are all in flight from the start without the registers a deeper buffer
  would take; likewise off: the first two steps' rows loaded before the activations (`GemvConfig.ahead`, 94-117
  registers at 4 bits) and each thread asking L2 for its next steps' rows (`GemvConfig.l2ahead`): neither made a
  linear faster (the kernel boundaries, not the loads in flight, are what the LLaMA-7B step lacks);
- after each step the rows' partial sums meet through warp shuffles (transposed: each exchange halves the rows a
  lane holds, `xreduce_stages`: 6 shuffles for 4 rows instead of 20) and one shared-memory slot per warp and row;
  one barrier at the end adds the warps' slots per row (and OWQ's fp16 outlier columns, see below);
- no integer-to-float conversion per weight: a field of q bits is masked into the mantissa of the float 1.0
  (`0x3F800000 | (q << b)` is exactly `1 + q * 2^(b-23)`), so `x * f = x + x * q * 2^(b-23)` costs one mask (LOP3)
  and one FMA per weight; each field position b has its own accumulator, and fields sit high in the mantissa
  (b >= 14) so the `x` term is at most 2^9 times the `x * q` term and fp32 keeps the difference to ~2^-15;
- the zero point and the `x` terms are folded into per-chunk sums of x shared by all rows:
  `sum_k x_k (q_k - z) s = s * (sum_b 2^(23-b) (dot_b - sx_b) - z * sx)`, a few FMAs per row and chunk instead of a
  subtraction per weight (the same folding as the "bit tricks" dequantizers of FasterTransformer and Marlin).

With `act="int8"` the activations are rounded to int8 per 32 values inside the kernel (each thread its own chunk,
once per block; llama.cpp's Q8_0 block and the formula of `cpu_int8.quantize_act_np`, which the CPU exports already
decode with) and packed in the order in which one shift and one mask leave four weight codes in the bytes of a word;
CUDA's `__dp4a` then multiplies and adds four weights per instruction (~0.6-0.7 instructions per weight at 4 and 2
bits instead of ~2.25; 3-bit weights come in the dp4a3 layout (dequant.py), whose bytes hold two whole 3-bit codes
and two bits of a third, ~0.8; planes3, whose 1-bit plane's bit is ORed in as bit 2 of each byte, ~1.2, also
works). CUDA exports store dp4a3's words with 4 rows interleaved ("dp4a3r4", dequant.py: a thread loads its 4 rows'
12 words of a chunk with three 128-bit loads instead of 4 x (64 + 32 bits); steps of a multiple of 4 rows), and
dp4a3's second field of each byte (bits 3-5) is masked in place, without a shift: its bytes hold 8 x code, summed by
dp4a into a second accumulator that is divided by 8 once per row and chunk (H200, LLaMA-7B W3 step with PDL: 0.879
ms with both, 0.896 with the in-place field alone, 0.900 with neither; 1.17x W4; the first two with an x-rounding
variant since reverted, no faster at 4 bits; benchmarks/results/gpu-nvidia-h200.md, gpu12). Per 32-value block,
`d_b * (dot_b - z * sum_b a)` in fp32; the integer dots are exact. On the H200 this
made the LLaMA-7B step 1.3x (W4) to 1.4x (W2) faster (benchmarks/results/gpu-nvidia-h200.md); the fp16 path stays
the exact one. With int8 activations a thread's chunk is 32 values at every bit width (one activation block;
`GemvConfig.chunk` = 64 halves the threads at 2 and 3 bits): twice the warps of 64-value chunks over a row. Each block
rounds its own copy of x; x rounded once by its producer (each thread loading its 32 codes, scale and code sum) was
measured and is not worth a producer: 23% fewer executed instructions on W3 qkv, but the same time, since the
rounding runs in the shadow of the first weight loads (issued before it); with 40-64 registers instead of 75-80
more blocks fit an SM than the 6 that deal a grid evenly, and W4 gate_up and W2 qkv lost 10-12% (H200, LLaMA-7B
step with PDL: W3 0.888 vs 0.891 ms, W2 0.770 vs 0.774, W4 1.076 vs 1.039; benchmarks/results/gpu-nvidia-h200.md,
gpu13).

OWQ's fp16 outlier columns (`n_outliers`) are added in an epilogue, outside the steps: at its start the block copies
its rows of the outlier weights (one contiguous span of W_out [N, n_outliers]) into shared memory with `cp.async`
(no registers; with PDL before the wait), thread c gathers x at columns c, c + chunks, ... and stores it to shared
memory after the activations' math; `outlier_plan`'s lanes per row (8 for 16 rows and 128 threads) each add a few
columns' products, and a shuffle sums them into the lane that writes the row after the final barrier. With two or
more steps the products are computed before the last step, behind a barrier of their own, while that step's loads
are in flight (`GemvConfig.early_outliers`; after the final barrier they were the block's tail: H200, LLaMA-7B W3 +
OWQ step 0.939 vs 0.956 ms with PDL, now 1.3% over plain W3 instead of 3.2%). Before, each step loaded each row's
outlier weights into a second register buffer: ~16 more registers per thread, so W3 + OWQ ran a capped or smaller
grid than W3 (gpu6's note in benchmarks/results/gpu-nvidia-h200.md).

`GemvConfig.groups` (off) puts several blocks of rows into one thread block (threadIdx.z, each group with its own rows
and its own slice of the shared buffers): 1 / groups as many blocks per launch. 128 empty kernels cost 0.65 us per
PDL launch at 132 blocks and 1.18 us at 792 (H200), but the real GEMVs did not gain: whole W4 / W2 steps 0.3-0.7%
slower with PDL at the best grouping per linear, W3 4% (benchmarks/results/gpu-nvidia-h200.md, gpu9): under PDL
the next kernel's small blocks start in the previous kernel's tail, a large one waits for a whole large slot.

`epilogue="silu_mul"` (gate_up, where its blocks hold whole gate/up pairs) writes silu(gate) * up instead of the
two halves, so down_proj's GEMV reads a plain x: its "silu_mul" prologue, each of its blocks computing the product
for the whole row, cost about two dependent kernels per layer; whole-library LLaMA-7B W4 decode on the H200 597-600 ->
659-662 tok/s (benchmarks/results/gpu-e2e-split-attention-h200.md).

`pdl=True` adds programmatic dependent launch (sm_90): the next kernel may start before this one ends and waits
for it only after issuing its own first weight loads (they depend on no earlier kernel).

`gemv_func(spec, cfg, gpu=False)` emits the same loop body with the thread loops as serial loops and the shuffles as
a plain sum, so the index and bit math is tested on the CPU (compiled for llvm) against the NumPy reference.
The prim func carries "tirx.is_scheduled", so dlight leaves it alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dequant import QuantSpec
from .tvmscript import parse_tir

MAGIC = 0x3F800000                      # the float 1.0: fields are OR-ed into its mantissa
CHUNK = {4: 32, 2: 64, 3: 64}           # values per thread and row per step (fp16 activations)
CHUNK_INT8 = {4: 32, 2: 32, 3: 32}      # int8 activations: 32 (one activation block) or 64 per thread (GemvConfig)
CHUNK_WORDS = {4: 4, 2: 4, 3: 6}        # uint32 words per chunk
VEC_WORDS = {4: 4, 2: 4, 3: 2}          # words per load: one 128-bit load (4 and 2 bits), three 64-bit ones (3 bits)
SUB_WORDS = {4: 4, 2: 2, 3: 3}          # words of one 32-value sub-block (x is pre-scaled 32 values at a time)
LAYOUT = {4: "words", 2: "words", 3: "words3x32"}
# int8 activations (act="int8", see `_dp4a_terms`): 3 bits in dp4a3 (or bit planes), a 32-value chunk = 2 + 1 words
LAYOUT_INT8 = {4: "words", 2: "words", 3: "dp4a3"}   # one row at a time (CUDA exports: dp4a3r4 where N % 4 == 0,
# targets.py packing3 and dequant.layout_for_rows)
INT8_LAYOUTS3 = ("dp4a3", "planes3", "dp4a3r4")   # 3-bit layouts the int8 kernel reads (dequant.py; dp4a3r4: 4 rows
# interleaved, 32-value chunks and steps of a multiple of 4 rows only: three 128-bit loads per 4 rows and chunk)
ACTS = ("fp16", "int8")
PROLOGUES = (None, "rmsnorm", "silu_mul")
EPILOGUES = (None, "silu_mul")


WAIT = '{ind}T.evaluate(T.call_extern("void", "cudaGridDependencySynchronize"))'   # PDL: the previous kernel's end
RESIDENT_X = 64                         # chunks up to this many values keep x in fp32 registers for every row


@dataclass(frozen=True)
class GemvConfig:
    rows: int = 4     # output rows per step (each thread's x chunk reused by each)
    warps: int = 4    # warps per block: one K chunk per thread, so 32 * warps >= K / chunk
    steps: int = 1    # steps of `rows` rows per block; the next step's rows load during this one's math
    depth: int = 2    # register buffers of rows: loads run depth - 1 steps ahead of the math
    chunk: int = 0    # values of K per thread and row; 0: the bits' default (CHUNK, CHUNK_INT8); int8 act: 32 or 64
    min_blocks: int = 0  # > 0: __launch_bounds__(threads, min_blocks), ptxas caps registers so that many blocks fit
    prefetch: bool = False  # each block asks L2 for all its rows' weights, scales and zeros at its start (sm_90;
    # H200: 10-25% slower per linear, benchmarks/results/gpu-nvidia-h200.md, so off)
    xreduce: bool = True   # rows' partial sums meet in a transposed warp reduction (xreduce_stages), rows a power of 2
    ahead: int = 1    # steps whose weights load into registers before the activations (with PDL: before the wait);
    # at most `depth` (one buffer each); later steps load depth - 1 ahead as usual
    l2ahead: int = 0  # further steps whose weights, scales and zeros each thread asks L2 for at the start
    # (`prefetch.global.L2`, no registers; with PDL before the wait)
    early_outliers: bool = True  # OWQ (GPU, >= 2 steps): the outlier columns' products are computed before the last
    # step (one more barrier; the last step's loads are in flight meanwhile) instead of after the final barrier
    groups: int = 1   # blocks of rows per thread block (threadIdx.z): the grid launches 1 / groups as many blocks of
    # groups x as many warps, each group the block it replaces (own rows and shared slots); must divide the blocks.
    # Off: no step got faster on the H200 (module docstring)

    def blocks(self, n: int) -> int:
        """Thread blocks of the grid for N rows (each `groups` blocks of rows x steps rows; the last may be short)."""
        return -(-(n // self.rows) // self.steps) // self.groups

    def __post_init__(self):
        if (self.rows < 1 or self.warps < 1 or self.steps < 1 or self.depth < 2 or self.chunk not in (0, 32, 64)
                or self.min_blocks < 0 or not 1 <= self.ahead <= self.depth or self.l2ahead < 0 or self.groups < 1):
            raise ValueError(f"bad GEMV config {self}")


def chunk_of(bits: int, act: str = "fp16", cfg: GemvConfig | None = None) -> int:
    """Values of K per thread and row: the config's, else the default of the bits and activation type."""
    if cfg is not None and cfg.chunk:
        return cfg.chunk
    return (CHUNK_INT8 if act == "int8" else CHUNK)[bits]


def epilogue_fits(spec: QuantSpec, cfg: GemvConfig, n_outliers: int = 0, residual: bool = False,
                  out_dtype: str = "float16") -> bool:
    """Whether `cfg`'s blocks hold whole gate/up pairs for the silu_mul epilogue (`gemv_func`)."""
    half = cfg.rows * cfg.steps // 2
    return (cfg.steps % 2 == 0 and spec.n % 2 == 0 and (spec.n // 2) % half == 0 and cfg.groups == 1
            and not (n_outliers or residual or cfg.prefetch or cfg.l2ahead) and out_dtype == "float16")


def supports(spec: QuantSpec, act: str = "fp16", chunk: int = 0) -> bool:
    """The kernel covers whole chunks inside one group: K a multiple of the chunk, G a multiple of it (or -1)."""
    c = chunk or (CHUNK_INT8 if act == "int8" else CHUNK).get(spec.bits)
    layout = (LAYOUT_INT8 if act == "int8" else LAYOUT).get(spec.bits)
    ok = spec.layout == layout or (act == "int8" and spec.bits == 3 and spec.layout in INT8_LAYOUTS3)
    if spec.layout == "dp4a3r4" and c != 32:
        return False
    return (c is not None and ok and spec.k % c == 0
            and (spec.group_size == -1 or spec.group_size % c == 0))


def warps_for(spec: QuantSpec, act: str = "fp16", chunk: int = 0) -> int:
    """Warps that give each chunk of a row its own thread."""
    return -(-(spec.k // (chunk or chunk_of(spec.bits, act))) // 32)


CANDIDATES = ((8, 2), (4, 2), (8, 1), (4, 1), (2, 1), (1, 1))   # (rows, steps), most reuse first
CANDIDATES_INT8 = ((4, 4), (4, 2), (4, 1), (2, 1), (1, 1))


def default_config(spec: QuantSpec, sms: int = 132, act: str = "fp16", n_outliers: int = 0) -> GemvConfig:
    """The first of the candidates that keeps enough warps per SM in the grid (fewer rows per block otherwise), from
    the H200 sweeps in benchmarks/results/gpu-nvidia-h200*.md.

    fp16 activations (about 11 warps per SM): 8 rows x 2 steps was fastest or within 5% on qkv, gate_up and down at
    every bit width, while on o (N = K = 4096) it left too few warps and 4 rows won. More steps per block (3 and 4)
    won a few percent on some linears and lost more on others: their registers (up to 255) cut occupancy below what
    the extra loads in flight gain. The rule's LLaMA-7B step is within 3% of the best config per linear.

    int8 activations (32-value chunks, about 8.5 warps per SM): 4 rows and 4 steps, 2 where that leaves fewer warps
    (o: N = K = 4096). 8 steps tied on gate_up at 2 and 3 bits and lost up to 15% elsewhere, most where a few more
    registers (OWQ's outlier columns: 95) left a second, nearly empty wave of blocks; 8 rows cost registers
    (128) for nothing. The rule's LLaMA-7B step is within 2% of the best config per linear at 4 and 3 bits and
    W3 + OWQ, 3% at 2 bits (H200, benchmarks/results/gpu-nvidia-h200.md). At 2 and 3 bits a 4 x 4 grid of more than
    one wave takes more steps per block to fit one (`one_wave_steps`: gate_up). At 2 and 3 bits 8 rows x 1 step
    comes before 4 x 2: on LLaMA-7B o (N = K = 4096, 512 blocks of 4 warps either way) it ran 3.7 vs 3.9 us (W3) and
    3.2 vs 3.7 us (W2) with PDL, the whole W3 step 0.900 vs 0.922 ms (H200, benchmarks/results/gpu-nvidia-h200.md,
    gpu11); at 4 bits it tied (3.9 us), with OWQ's outlier columns it lost (94 registers: 5.0 vs 4.5 us plain).

    Otherwise `n_outliers` does not change the pick: OWQ's outlier columns are added in the epilogue from shared
    memory and take no registers in the steps (ptxas: the LLaMA-7B W3 + OWQ kernels at W3's configs use W3's 75-80),
    so they run W3's grid (before, ~16 more registers: capped at 6 blocks per SM, gate_up in 14 steps of 2 rows)."""
    warps = warps_for(spec, act)
    int8 = act == "int8"
    cands = CANDIDATES_INT8 if int8 else CANDIDATES
    if int8 and spec.bits < 4 and not n_outliers:   # 8 rows x 1 step where 4 x 4 leaves too few warps (o), above
        cands = cands[:1] + ((8, 1),) + cands[1:]
    fits = [(r, s) for r, s in cands if spec.n % (r * s) == 0 and (spec.layout != "dp4a3r4" or r % 4 == 0)]
    for r, s in fits:
        if spec.n // (r * s) * warps >= (8.5 if int8 else 11) * sms:
            if int8 and spec.bits < 4 and warps <= 4 and (r, s) == (4, 4) and one_wave_steps(spec.n // r, sms):
                s = one_wave_steps(spec.n // r, sms)
            return GemvConfig(r, warps, s)
    return GemvConfig(fits[-1][0], warps, fits[-1][1])


ONE_WAVE = 6          # blocks of 4 warps per SM at <= 80 registers (the int8 kernels' 72-80)
ONE_WAVE_STEPS = 8    # at most this many steps of 4 rows per block (unrolled)


def one_wave_steps(steps: int, sms: int = 132) -> int:
    """Steps of 4 rows per block that fit `steps` such steps into one wave of ONE_WAVE blocks per SM, where 4 steps per
    block would take more than one wave; 0 where that already fits or would need more than ONE_WAVE_STEPS. A grid of 1
    to 2 waves leaves the last wave's SMs unevenly loaded: LLaMA-7B gate_up (22016 rows) at 2 and 3 bits took 1376
    blocks of 4 steps (10 or 11 per SM over the kernel) and ran 4-13% slower than 787 blocks of 7 steps (6 per SM, one
    wave; whole step 2-4% faster; H200, benchmarks/results/gpu-nvidia-h200.md, gpu6); W3 + OWQ alike (its outlier
    columns take no registers in the steps; before, its 4-row steps took 96). Not at 4 bits: 7 steps take 87
    registers (5 blocks per SM, two waves), and capped at 80 the linear gained 5-7% alone but not the step (787
    blocks in 792 slots leave no slack for blocks whose SM still holds the previous kernel's blocks under PDL)."""
    wave = ONE_WAVE * sms
    if -(-steps // 4) <= wave:
        return 0
    s = -(-steps // wave)
    return s if s <= ONE_WAVE_STEPS else 0


def outlier_plan(n: int, n_out: int, rows: int, threads: int) -> dict:
    """OWQ's outlier columns in a block of `rows` rows and `threads` threads: {"piece": halves per copy into
    shared memory (8, 4 or 2: one 16-, 8- or 4-byte cp.async, the widest that divides both the block's span of
    W_out, rows * n_out halves, and the whole of it, N * n_out, so that no piece straddles its end; 1 where none
    does: plain copies), "pieces": pieces per block, "lanes": lanes that share one row in the epilogue (a power of
    2, at most 32, with rows * lanes <= threads where the block has that many threads)}."""
    if n_out <= 0:
        return {"piece": 0, "pieces": 0, "lanes": 0}
    piece = next(h for h in (8, 4, 2, 1) if rows * n_out % h == 0 and n * n_out % h == 0)
    lanes = 1
    while lanes < 32 and rows * lanes * 2 <= threads:
        lanes *= 2
    return {"piece": piece, "pieces": rows * n_out // piece, "lanes": lanes}


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


def _dp4a_terms(bits: int, sb: int, nsb: int = 2, layout: str = "planes3"):
    """The 8 dp4a operands of sub-block sb (32 values, one int8 activation block) of a chunk: ([(word, right shift,
    mask)], values) such that OR-ing `(word >> shift) & mask` leaves in byte L the code of value `values[L]` (index in
    the sub-block); the activations are packed in the same order once per thread. One shift and one LOP3 per 4 codes
    (two of each at 3 bits, where the third bit comes from the 1-bit plane) and one dp4a, instead of a mask and an
    FMA per code."""
    out = []
    if bits == 4:    # words: nibble i of word j is value 8j + i
        for j in range(4):
            for h in (0, 4):
                out.append(([(j, h, 0x0F0F0F0F)], [8 * j + 2 * lane + h // 4 for lane in range(4)]))
    elif bits == 2:  # words: field i of word j (bits 2i) is value 16j + i
        for j in range(2):
            for t in range(4):
                out.append(([(2 * sb + j, 2 * t, 0x03030303)], [16 * j + t + 4 * lane for lane in range(4)]))
    elif layout in ("dp4a3", "dp4a3r4"):  # dequant.py: the chunk's buffer holds its 2 nsb first-region words,
        # then nsb of w2 (dp4a3), or a row's w0, w1, w2 in turn (dp4a3r4, one sub-block)
        w0, w1, w2 = (2 * sb, 2 * sb + 1, 2 * nsb + sb) if layout == "dp4a3" else (0, 1, 2)
        for j, w in enumerate((w0, w1, w2)):
            out.append(([(w, 0, 0x07070707)], [8 * j + lane for lane in range(4)]))
            # bits 3-5 masked in place: bytes of 8 x code (<= 56, still a positive int8), one LOP3 and no shift;
            # their dp4a sum goes to a second accumulator, divided by 8 (exact) once per row (`_dp4a_shift`)
            out.append(([(w, 0, 0x38383838)], [8 * j + 4 + lane for lane in range(4)]))
        out.append(([(w0, 6, 0x03030303), (w2, 4, 0x04040404)], [24 + lane for lane in range(4)]))
        out.append(([(w1, 6, 0x03030303), (w2, 5, 0x04040404)], [28 + lane for lane in range(4)]))
    else:            # planes3 (dequant.py): value v of 2-bit word j at bit (v%8)*4 + (v//8)*2, value u of the 1-bit
        for j in range(2):  # word at bit (u%8)*4 + u//8; the chunk's buffer holds its 2 nsb plane words, then its
            for s in (0, 2, 4, 6):  # nsb bit words
                e, f = s // 4, s % 4 // 2
                out.append(([(2 * sb + j, s, 0x03030303), (2 * nsb + sb, 4 * e + 2 * j + f - 2, 0x04040404)],
                            [16 * j + 2 * lane + e + 8 * f for lane in range(4)]))
    return out


def _dp4a_shift(terms) -> int:
    """e such that the bytes of a `_dp4a_terms` operand hold code << e (0, or 3 for dp4a3's in-place bits 3-5)."""
    mask = 0
    for _, sh, m in terms:
        mask |= m if sh == 0 else 1
    return (mask & 0xFF & -(mask & 0xFF)).bit_length() - 1


def _dp4a(w: str, a: str, acc: str, gpu: bool) -> str:
    """acc + the dot of w's 4 unsigned bytes (codes < 128) with a's 4 signed bytes: CUDA's __dp4a, or its arithmetic
    for the CPU twin."""
    if gpu:
        return f'T.call_pure_extern("int32", "__dp4a", T.reinterpret("int32", {w}), {a}, {acc})'
    terms = [f'T.Cast("int32", T.bitwise_and({_shift(w, -8 * i)}, T.uint32(255))) * '
             f"T.shift_right(T.shift_left({a}, {24 - 8 * i}), 24)" for i in range(4)]
    return f"{acc} + " + " + ".join(terms)


def _code_bytes(word_of, terms) -> str:
    expr = None
    for j, sh, mask in terms:
        t = f"T.bitwise_and({_shift(word_of(j), -sh)}, T.uint32({mask}))"
        expr = t if expr is None else f"T.bitwise_or({expr}, {t})"
    return expr


def xreduce_stages(rows: int) -> list[tuple[int, int]]:
    """The exchanges of the transposed warp reduction of `rows` partial sums per lane (rows a power of 2 <= 32):
    [(lane offset, h)]: a lane whose `offset` bit is set keeps values h..2h-1 and sends 0..h-1 to its partner, the
    other keeps 0..h-1 and sends h..2h-1; each adds what it receives, so after the stages lane tx holds, summed over
    the lanes that share its top log2(rows) bits, the row tx // (32 / rows); a plain shuffle-down over the
    remaining offsets completes the sum (the reduce-scatter of the butterfly: rows - 1 + 5 - log2(rows) shuffles for
    all rows instead of 5 per row)."""
    out, off, h = [], 16, rows // 2
    while h:
        out.append((off, h))
        off, h = off // 2, h // 2
    return out


# ------------------------------------------------------------------------------------------------ L2 prefetch
# Each block's rows are contiguous in qweight, scales and zeros, so at its start lane 0 of each warp asks L2 for its
# share of the block's weight rows with one bulk prefetch (`cp.async.bulk.prefetch.L2`, sm_90: no registers, no
# shared memory), and lanes 1 and 2 of warp 0 for the block's scales and zero points. The block's register loads
# then find the bytes in L2 or already on their way: all of a block's bytes are in flight from its start instead of
# one step of rows at a time, and with PDL the prefetches go out before the wait for the previous kernel. Measured
# on the H200 (benchmarks/results/gpu-nvidia-h200.md, gpu5): the same DRAM bytes and 55% L2 hits, yet every linear
# 10-25% slower (the later steps' prefetches queue ahead of other blocks' current loads), hence off by default. The
# prefetch is a hint (the loads stay the loads): addresses must be 16-byte aligned and sizes multiples of 16, so a
# tensor whose per-block slice is not is simply not prefetched, and a size is rounded down to 16 bytes.
PF_ROWS = "T.min({rpw}, T.min({rs} - ty * {rpw}, {n} - (bx * {rs} + ty * {rpw})))"   # warp ty's rows of block bx
PF_BLOCK = "T.min({rs}, {n} - bx * {rs})"                                           # the rows of block bx


def prefetch_plan(spec: QuantSpec, cfg: GemvConfig) -> dict:
    """What the kernel prefetches into L2 per block: {"rpw": weight rows per warp, "qweight" / "scales" / "zeros":
    bytes per row, or 0 where the tensor is not prefetched (its per-block slice would not start 16-byte aligned)}."""
    rs = cfg.rows * cfg.steps
    if not cfg.prefetch:
        return {"rpw": 0, "qweight": 0, "scales": 0, "zeros": 0}
    row = {"qweight": spec.words * 4, "scales": spec.n_groups * 2, "zeros": 0 if spec.sym else spec.n_groups}
    rpw = -(-rs // cfg.warps)
    # qweight: every warp's slice starts at a multiple of rpw rows; scales and zeros: one slice per block
    return {"rpw": rpw, **{t: b if b and (b * (rpw if t == "qweight" else rs)) % 16 == 0 else 0
                           for t, b in row.items()}}


def prefetch_spans(spec: QuantSpec, cfg: GemvConfig, bx: int) -> dict[str, list[tuple[int, int]]]:
    """The (byte offset, bytes) ranges block bx prefetches per tensor, evaluated from the same expressions the
    kernel is built from (PF_ROWS, PF_BLOCK), for the CPU test of their index math."""
    plan, rs = prefetch_plan(spec, cfg), cfg.rows * cfg.steps
    env = {"T": type("T", (), {"min": staticmethod(min)}), "bx": bx}
    out = {"qweight": [], "scales": [], "zeros": []}
    if plan["qweight"]:
        for ty in range(cfg.warps):
            cnt = eval(PF_ROWS.format(rpw=plan["rpw"], rs=rs, n=spec.n), {**env, "ty": ty})  # noqa: S307
            if cnt > 0:
                out["qweight"].append(((bx * rs + ty * plan["rpw"]) * plan["qweight"], cnt * plan["qweight"]))
    for t in ("scales", "zeros"):
        if plan[t]:
            rows = eval(PF_BLOCK.format(rs=rs, n=spec.n), env)  # noqa: S307
            if rows * plan[t] // 16:
                out[t].append((bx * rs * plan[t], rows * plan[t] // 16 * 16))
    return out


# ------------------------------------------------------------------------------------------------ the prim func
def gemv_func(spec: QuantSpec, cfg: GemvConfig | None = None, gpu: bool = True, out_dtype: str = "float16",
              lead: tuple[int, ...] = (1,), name: str = "main", n_outliers: int = 0, act: str = "fp16",
              prologue: str | None = None, eps: float = 1e-6, residual: bool = False, pdl: bool = False,
              epilogue: str | None = None):
    """y[lead..., N] = x[lead..., K] @ dq(W)^T (+ x[..., idx] @ W_out^T) for one row (prod(lead) == 1), fp32
    accumulation, `out_dtype` output. act="int8": activations quantized per 32 values inside the kernel and integer
    dot products (dp4a), as `cpu_int8.int8_gemv_np` models; 3-bit weights then in dp4a3 or planes3.

    Arguments: x fp16, [norm_weight fp16 [K]], qweight, scales, [zeros], [outlier_idx int32 [n_outliers],
    outlier_weight fp16 [N, n_outliers]], [residual [lead..., N]], y. `gpu=False` gives the CPU-testable twin (same
    body, serial).

    Decode fusions (one kernel instead of two or three at batch 1, where each kernel costs more in launch and tail
    than in work): `prologue="rmsnorm"` normalizes x on load (x * rsqrt(mean(x^2) + eps) * norm_weight in fp32,
    rounded to fp16 as TVM's rms_norm kernel does; the block sums the squares of its own loads), `prologue="silu_mul"`
    takes x [lead..., 2K] = [gate | up] and uses silu(gate) * up (fp16, as the separate kernel); `residual=True`
    adds a tensor of y's shape to the rounded result. Neither prologue combines with outlier columns (they read x
    raw).

    `epilogue="silu_mul"` (W = [gate; up], N = 2 I): y[lead..., I] = silu(gate) * up, each block computing the
    products of its own rows: its first steps take gate rows and the rest the up rows of the same indices (the block's
    rows remapped, the weights as stored), and the pairs meet after the final barrier (the fp16 expression of the
    "silu_mul" prologue on the rounded gate and up, so down_proj then reads a plain x instead of each of its blocks
    recomputing the products for the whole row). Whole blocks of pairs only: an even number of steps dividing I.

    `pdl=True` (CUDA sm_90+): the kernel lets the next kernel of the stream launch at once
    (`griddepcontrol.launch_dependents`) and waits for the previous one (`griddepcontrol.wait`) only after issuing
    its first weight loads, which depend on no earlier kernel: launched with programmatic stream serialization
    (`cuLaunchKernelEx`), a linear's first loads overlap the previous linear's tail. Without that launch attribute
    both instructions do nothing; CUDA exports for sm_90+ set it (export/pdl.py), and with a prologue every read of
    x (and of the residual) comes after the wait."""

    if act not in ACTS:
        raise ValueError(f"unknown activation type {act!r}; one of {ACTS}")
    if not supports(spec, act):
        raise ValueError(f"no decode GEMV for {spec} with {act} activations")
    cfg = cfg or default_config(spec, act=act, n_outliers=n_outliers)
    chunk = chunk_of(spec.bits, act, cfg)
    if chunk != chunk_of(spec.bits, act) and (act != "int8" or spec.bits == 4):
        raise ValueError(f"fp16 activations take {CHUNK[spec.bits]}-value chunks at {spec.bits} bits, not {chunk}")
    if not supports(spec, act, chunk):
        raise ValueError(f"no decode GEMV for {spec} with {act} activations in {chunk}-value chunks")
    if spec.n % cfg.rows:
        raise ValueError(f"{cfg.rows} rows per step do not divide N={spec.n}")
    if spec.layout == "dp4a3r4" and (cfg.rows % 4 or cfg.prefetch or cfg.l2ahead):
        raise ValueError(f"dp4a3r4 weights take steps of a multiple of 4 rows and no L2 prefetch, not {cfg}")
    if (nb := -(-(spec.n // cfg.rows) // cfg.steps)) % cfg.groups:
        raise ValueError(f"{cfg.groups} groups do not divide the {nb} blocks of rows")
    if 32 * cfg.warps < spec.k // chunk:
        raise ValueError(f"{cfg.warps} warps do not cover the {spec.k // chunk} chunks of K={spec.k}")
    if prologue not in PROLOGUES:
        raise ValueError(f"unknown GEMV prologue {prologue!r}; one of {PROLOGUES}")
    if prologue and n_outliers:
        raise ValueError("a GEMV prologue does not combine with outlier columns")
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown GEMV epilogue {epilogue!r}; one of {EPILOGUES}")
    if epilogue and not epilogue_fits(spec, cfg, n_outliers, residual, out_dtype):
        raise ValueError(f"the {epilogue} epilogue takes whole blocks of gate/up pairs (an even number of steps "
                         f"dividing N / 2), no outlier columns, residual or L2 prefetch and fp16 out: not {cfg}")
    src = _source(spec, cfg, gpu, out_dtype, lead, name, n_outliers, act == "int8", prologue, eps, residual,
                  chunk, pdl and gpu, epilogue)
    return parse_tir(src)


def _source(spec: QuantSpec, cfg: GemvConfig, gpu: bool, out_dtype: str, lead: tuple[int, ...], name: str,
            n_out: int, int8: bool = False, prologue: str | None = None, eps: float = 1e-6,
            residual: bool = False, chunk: int = 0, pdl: bool = False, epilogue: str | None = None) -> str:
    bits, n, k, R, S, TY = spec.bits, spec.n, spec.k, cfg.rows, cfg.steps, cfg.warps
    C, CW, SW, VW = chunk or CHUNK[bits], CHUNK_WORDS[bits], SUB_WORDS[bits], VEC_WORDS[bits]
    c_ = "(ty * 32 + tx)"                         # the thread's chunk of K
    NSB = C // 32                                 # 32-value sub-blocks per chunk (int8: one activation scale each)
    if int8:  # (buffer offset, first word, words) per load: 128-bit where the row stride keeps them aligned
        CW = C * bits // 32
        lw = min(4 if spec.words % 4 == 0 else 2, CW)
        if bits == 3:  # planes3 / dp4a3: the chunk's first-region words (C / 16), then its second's (C / 32)
            lw = min(lw, 2 * NSB)
            loads = [(v, f"{c_} * {2 * NSB} + {v}", lw) for v in range(0, 2 * NSB, lw)]
            loads.append((2 * NSB, f"{spec.lo_words} + {c_} * {NSB}", NSB))
        else:
            loads = [(v, f"{c_} * {CW} + {v}", lw) for v in range(0, CW, lw)]
    else:
        loads = [(v, f"{c_} * {CW} + {v}", VW) for v in range(0, CW, VW)]
    RS = R * S                                    # rows per block
    NS = n // R                                   # steps in all; the last block may have fewer than S (guarded)
    NB = -(-NS // S)
    ragged = NS % S != 0
    nc = k // C                                   # chunks per row: one per thread
    tpb = 32 * TY
    G = spec.group_len
    resident = C <= RESIDENT_X                    # x kept in fp32 registers for all rows, else re-read per step
    lo = ", ".join(str(d) for d in lead)
    ix = ", ".join("0" for _ in lead)             # index of the single row
    local = '"local"' if gpu else '"global"'
    fields = _field_terms(bits)
    ins = [f'x: T.Buffer(({lo}, {2 * k if prologue == "silu_mul" else k}), "float16")']
    if prologue == "rmsnorm":
        ins.append(f'nw: T.Buffer(({k},), "float16")')
    ins += [f'qweight: T.Buffer(({n}, {spec.words}), "uint32")', f'scales: T.Buffer(({n}, {spec.n_groups}), "float16")']
    if not spec.sym:
        ins.append(f'zeros: T.Buffer(({n}, {spec.n_groups}), "uint8")')
    if n_out:
        ins += [f'oidx: T.Buffer(({n_out},), "int32")', f'ow: T.Buffer(({n}, {n_out}), "float16")']
    if residual:
        ins.append(f'res: T.Buffer(({lo}, {n}), "{out_dtype}")')
    ins.append(f'y: T.Buffer(({lo}, {n // 2 if epilogue else n}), "{out_dtype}")')

    def loop(extent, tag):
        return f'T.thread_binding({extent}, thread="{tag}")' if gpu else f"T.serial({extent})"

    classes = sorted({b for _, b in fields})       # one accumulator per field position: no x pre-scaling
    ncls = len(classes)
    nbuf = min(S, cfg.depth)               # buffers: the next nbuf - 1 steps' rows load during this one's math
    L0 = min(S, max(nbuf - 1, cfg.ahead))  # steps loaded before the activations (first_loads)
    c = "(ty * 32 + tx)"
    g = f"{c} * {C} // {G}" if G != k else "0"
    L = ["@T.prim_func", f"def {name}({', '.join(ins)}):",
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         f'    for bx in {loop(NB, "blockIdx.x")}:']
    L.append(f'        red = T.alloc_buffer(({(TY if gpu else tpb) * RS},), "float32"'
             + (', scope="shared")' if gpu else ")"))
    if n_out:  # OWQ: the block's rows of the outlier weights (copied in at the start) and x at the outlier columns
        sh = ', scope="shared")' if gpu else ")"
        L += [f'        osw = T.alloc_buffer(({RS * n_out},), "float16"' + sh,
              f'        oxs = T.alloc_buffer(({n_out},), "float32"' + sh]
    if prologue == "rmsnorm" and gpu:
        L.append(f'        nred = T.alloc_buffer(({TY},), "float32", scope="shared")')
    L += [f'        for ty in {loop(TY, "threadIdx.y")}:',
          f'            for tx in {loop(32, "threadIdx.x")}:']
    ind = " " * 16
    L += [f'{ind}wq = T.alloc_buffer(({nbuf * R * CW},), "uint32", scope={local})',
          f'{ind}sc = T.alloc_buffer(({nbuf * R},), "float16", scope={local})',
          f'{ind}xh = T.alloc_buffer((32,), "float16", scope={local})',
          f'{ind}xf = T.alloc_buffer(({32 if int8 or not resident else C},), "float32", scope={local})',
          f'{ind}acc = T.alloc_buffer(({R},), "float32", scope={local})']
    if prologue:  # the second operand of the prologue (up, or the norm weight), and the norm's scale
        L += [f'{ind}uh = T.alloc_buffer((32,), "float16", scope={local})',
              f'{ind}nr = T.alloc_buffer((1,), "float32", scope={local})']
    if int8:  # the chunk's activations: int8 codes packed in dp4a order, block scales, block sums of the codes
        L += [f'{ind}xi = T.alloc_buffer((32,), "int32", scope={local})',
              f'{ind}xa = T.alloc_buffer(({8 * NSB},), "int32", scope={local})',
              f'{ind}xd = T.alloc_buffer(({NSB},), "float32", scope={local})',
              f'{ind}xs = T.alloc_buffer(({NSB},), "int32", scope={local})',
              f'{ind}mx = T.alloc_buffer((2,), "float32", scope={local})',
              f'{ind}idot = T.alloc_buffer(({R},), "int32", scope={local})',
              f'{ind}idot8 = T.alloc_buffer(({R},), "int32", scope={local})']
    else:
        L += [f'{ind}dot = T.alloc_buffer(({R * ncls},), "float32", scope={local})',
              f'{ind}sx = T.alloc_buffer(({ncls},), "float32", scope={local})',
              f'{ind}mg = T.alloc_buffer((1,), "uint32", scope={local})']
    if not spec.sym:
        L.append(f'{ind}zr = T.alloc_buffer(({nbuf * R},), "uint8", scope={local})')
    NO = -(-n_out // nc)                          # outlier columns per thread: thread c takes c, c + nc, ...
    OW = outlier_plan(n, n_out, RS, tpb) if n_out else None
    NE = -(-RS * OW["lanes"] // tpb) if n_out else 1   # epilogue slots per thread
    early_out = bool(n_out) and gpu and cfg.early_outliers and S >= 2
    if n_out:  # their indices and x there (gathered once per block), and the epilogue's partial sum
        L += [f'{ind}oi = T.alloc_buffer(({NO},), "int32", scope={local})',
              f'{ind}xo = T.alloc_buffer(({NO},), "float32", scope={local})',
              f'{ind}op = T.alloc_buffer(({NE},), "float32", scope={local})']
    plan = prefetch_plan(spec, cfg) if gpu else {"qweight": 0, "scales": 0, "zeros": 0}
    if plan["qweight"]:  # see prefetch_plan: this warp's share of the block's weight rows, then scales and zeros
        cnt = PF_ROWS.format(rpw=plan["rpw"], rs=RS, n=n)
        L += [f"{ind}if tx == 0 and {cnt} > 0:",
              f"{ind}    T.ptx.cp.async_.bulk.prefetch.L2.global_(T.address_of(qweight[bx * {RS} + ty * {plan['rpw']}, "
              f"0]), T.Cast(\"uint32\", {cnt} * {plan['qweight']}))"]
    for lane, t in enumerate(("scales", "zeros"), 1):
        if plan[t]:
            size = f"{PF_BLOCK.format(rs=RS, n=n)} * {plan[t]} // 16 * 16"
            L += [f"{ind}if ty == 0 and tx == {lane} and {size} > 0:",
                  f"{ind}    T.ptx.cp.async_.bulk.prefetch.L2.global_(T.address_of({t}[bx * {RS}, 0]), "
                  f"T.Cast(\"uint32\", {size}))"]
    if int8:
        pass
    elif gpu:  # lane 0's `MAGIC | lane` through a shuffle: a value the compiler cannot fold (see _field_float)
        L.append(f"{ind}mg[0] = T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), T.bitwise_or(T.uint32({MAGIC}), "
                 f"T.Cast(\"uint32\", tx)), 0, 32, 32)")
    else:
        L.append(f"{ind}mg[0] = T.uint32({MAGIC})")
    if not int8:
        L += [f"{ind}sx[{i}] = T.float32(0)" for i in range(ncls)]

    def load_raw(body, sb):
        return [f"{body}xh[T.ramp({8 * v}, 1, 8)] = x[{ix}, T.ramp({c} * {C} + {sb * 32 + 8 * v}, 1, 8)]"
                for v in range(4)]

    def load_x(body, sb, dst):
        out = load_raw(body, sb)
        if prologue == "silu_mul":   # the same fp16 expression as the separate silu(gate) * up kernel
            out += [f"{body}uh[T.ramp({8 * v}, 1, 8)] = x[{ix}, T.ramp({k} + {c} * {C} + {sb * 32 + 8 * v}, 1, 8)]"
                    for v in range(4)]
            out += [f"{body}xh[{v}] = xh[{v}] * T.sigmoid(xh[{v}]) * uh[{v}]" for v in range(32)]
        elif prologue == "rmsnorm":  # topi's rms_norm: rsqrt(mean) * x * weight in fp32, rounded to fp16
            out += [f"{body}uh[T.ramp({8 * v}, 1, 8)] = nw[T.ramp({c} * {C} + {sb * 32 + 8 * v}, 1, 8)]"
                    for v in range(4)]
            out += [f'{body}xh[{v}] = T.Cast("float16", nr[0] * T.Cast("float32", xh[{v}]) * '
                    f'T.Cast("float32", uh[{v}]))' for v in range(32)]
        return out + [f'{body}xf[{dst + v}] = T.Cast("float32", xh[{v}])' for v in range(32)]

    def wrow(st, r):  # the weight row of the block's step st, row r (silu_mul epilogue: gate rows, then up rows)
        if not epilogue:
            return f"bx * {RS} + {st * R + r}"
        half = S // 2
        return (f"bx * {RS // 2} + {st * R + r}" if st < half else
                f"{n // 2} + bx * {RS // 2} + {(st - half) * R + r}")

    def load_rows(body, st, b):
        # R (x3 at 3 bits) independent 128-bit loads, plus the rows' scale and zero point, into buffer b
        out = []
        for r in range(0, R, 4) if spec.layout == "dp4a3r4" else ():
            # 4 rows' 12 words of this chunk are contiguous (dequant.py): three 128-bit loads, row r's 3 words at
            # (b R + r) CW in the buffer as with one row per load
            for v in range(3):
                f = f"{c_} * 12 + {4 * v}"
                out.append(f"{body}wq[T.ramp({(b * R + r) * CW + 4 * v}, 1, 4)] = qweight[{wrow(st, r)} + "
                           f"({f}) // {spec.words}, T.ramp(({f}) % {spec.words}, 1, 4)]")
        for r in range(R):
            row = wrow(st, r)
            for off, src, width in loads if spec.layout != "dp4a3r4" else ():
                out.append(f"{body}wq[T.ramp({(b * R + r) * CW + off}, 1, {width})] = "
                           f"qweight[{row}, T.ramp({src}, 1, {width})]" if width > 1 else
                           f"{body}wq[{(b * R + r) * CW + off}] = qweight[{row}, {src}]")
            out.append(f"{body}sc[{b * R + r}] = scales[{row}, {g}]")
            if not spec.sym:
                out.append(f"{body}zr[{b * R + r}] = zeros[{row}, {g}]")
        return out

    def first_loads(body):  # steps 0 .. L0 - 1 (those beyond a short last block guarded), then the L2 prefetches
        out = load_rows(body, 0, 0)
        for st in range(1, L0):
            if live(st):
                out += [f"{body}if {live(st)}:"] + load_rows(body + "    ", st, st)
            else:
                out += load_rows(body, st, st)
        for st in range(L0, min(S, L0 + cfg.l2ahead)) if gpu else ():
            if live(st):
                out += [f"{body}if {live(st)}:"] + l2_rows(body + "    ", st)
            else:
                out += l2_rows(body, st)
        return out

    def l2_rows(body, st):  # ask L2 for what load_rows(st) will load (one prefetch per load, scale and zero point)
        out = []
        for r in range(R):
            row = wrow(st, r)
            out += [f"{body}T.ptx.prefetch.global_.L2(T.address_of(qweight[{row}, {src}]))" for _, src, _ in loads]
            out += [f"{body}T.ptx.prefetch.global_.L2(T.address_of({t}[{row}, {g}]))"
                    for t in ("scales",) + (() if spec.sym else ("zeros",))]
        return out

    def outlier_copy(ind):
        # the block's rows of W_out are one contiguous span of RS * n_out halves: OW["piece"] halves per cp.async
        # (16, 8 or 4 bytes), pieces dealt round-robin over the block's threads; a piece past row N (the last
        # block of a ragged grid) is not copied, and its rows are not written
        h, npc = OW["piece"], OW["pieces"]
        out = []
        for u in range(-(-npc // tpb)):
            pc = f"({c} + {u * tpb})"
            conds = ([f"{pc} < {npc}"] if (u + 1) * tpb > npc else []) + (
                [f"bx * {RS * n_out} + ({pc} + 1) * {h} <= {n * n_out}"] if ragged else [])
            f = f"bx * {RS * n_out} + {pc} * {h}"
            src, dst = f"ow[({f}) // {n_out}, ({f}) % {n_out}]", f"osw[{pc} * {h}]"
            if gpu and h > 1:
                op_ = "cg" if h == 8 else "ca"
                cp = [f"T.ptx.cp.async_.{op_}.shared.global_(T.address_of({dst}), T.address_of({src}), {2 * h})"]
            else:   # the CPU twin (and halves that no cp.async width divides): plain copies, the same pieces
                cp = [f"for e in T.serial({h}):",
                      f"    osw[{pc} * {h} + e] = ow[({f} + e) // {n_out}, ({f} + e) % {n_out}]"]
            if conds:
                out += [f"{ind}if {' and '.join(conds)}:"] + [f"{ind}    {line}" for line in cp]
            else:
                out += [f"{ind}{line}" for line in cp]
        out.append(f"{ind}if {c} < {nc}:")
        out += [f"{ind}    oi[{i}] = oidx[T.min({c} + {i * nc}, {n_out - 1})]" for i in range(NO)]
        return out

    def outlier_part(slot):
        # slot s: row s // LPR of the block, columns s % LPR + LPR i; slots past the block's rows and columns past
        # n_out add 0 (their shared reads clamped in range)
        lpr = OW["lanes"]
        row, j = f"T.min({slot} // {lpr}, {RS - 1})", f"{slot} % {lpr}"
        terms = [f'T.Select({j} + {i * lpr} < {n_out}, oxs[T.min({j} + {i * lpr}, {n_out - 1})] * T.Cast("float32", '
                 f'osw[{row} * {n_out} + T.min({j} + {i * lpr}, {n_out - 1})]), T.float32(0))'
                 for i in range(-(-n_out // lpr))]
        return f"T.Select({slot} < {RS * lpr}, " + " + ".join(terms) + ", T.float32(0))"

    def live(st):  # the block's step st exists (only the last block of a ragged grid has fewer)
        return f"bx * {S} + {st} < {NS}" if ragged and st else ""

    body = ind + "    "
    if prologue == "rmsnorm":
        # the sum of squares of the whole row: each thread squares its chunk, the block adds them (a warp shuffle,
        # one shared slot per warp); the twin's threads run one after another, so each sums the row itself
        L.append(f"{ind}nr[0] = T.float32(0)")
        # the first rows' loads go out before the activations' (x's latency overlaps them)
        pre = first_loads(body) if int8 else []
        if pdl:  # the weight loads before the wait, x (the previous kernel's output) after it
            L += ([f"{ind}if {c} < {nc}:"] + pre if pre else []) + [WAIT.format(ind=ind)]
            pre = []
        if gpu:
            for sb in range(C // 32):
                pre += load_raw(body, sb)
                pre.append(f"{body}nr[0] = nr[0] + " + " + ".join(
                    f'T.Cast("float32", xh[{v}]) * T.Cast("float32", xh[{v}])' for v in range(32)))
        if pre:
            L += [f"{ind}if {c} < {nc}:"] + pre
        if gpu:
            L += [f"{ind}nr[0] = nr[0] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), nr[0], {off}, 32, 32)"
                  for off in (16, 8, 4, 2, 1)]
            L += [f"{ind}if tx == 0:", f"{ind}    nred[ty] = nr[0]",
                  f"{ind}nr[0] = " + " + ".join(f"nred[{t}]" for t in range(TY))]
        else:
            L += [f"{ind}for i in T.serial({k}):",
                  f'{ind}    nr[0] = nr[0] + T.Cast("float32", x[{ix}, i]) * T.Cast("float32", x[{ix}, i])']
        L.append(f"{ind}nr[0] = T.rsqrt(nr[0] / T.float32({k}) + T.float32({float(eps)!r}))")
    if n_out:  # OWQ: the block's outlier weights into shared memory and the thread's outlier indices, before the
        L += outlier_copy(ind)  # wait (neither depends on an earlier kernel); cp.async takes no registers
    # x once per thread: the per-class sums (zero point and the mantissa's leading 1) serve every row of the block
    early = int8 and prologue != "rmsnorm"   # the first rows' loads go out before the activations' (x's latency
    if pdl and prologue != "rmsnorm":        # and rounding overlap them), with PDL also before the wait
        if early:
            L += [f"{ind}if {c} < {nc}:"] + first_loads(body)
        # every thread: all reads of activations and all writes come after the previous kernel has finished
        L.append(WAIT.format(ind=ind))
    L.append(f"{ind}if {c} < {nc}:")
    if early and not pdl:
        L += first_loads(body)
    for i in range(NO):  # OWQ: x at this thread's outlier columns (a hostile index is clamped into [0, K)); into
        L.append(f'{body}xo[{i}] = T.Cast("float32", x[{ix}, T.max(T.min(oi[{i}], {k - 1}), 0)])')  # shared below
    for sb in range(C // 32):
        L += load_x(body, sb, 0 if int8 or not resident else sb * 32)
        if int8:  # cpu_int8.quantize_act_np: d = max|x| / 127, a = nearbyint(x * 127 / max|x|)
            L.append(f"{body}mx[0] = T.float32(0)")
            L += [f"{body}mx[0] = T.max(mx[0], T.fabs(xf[{v}]))" for v in range(32)]
            L.append(f"{body}mx[1] = T.Select(mx[0] > T.float32(0), T.float32(127) / mx[0], T.float32(0))")
            L += [f'{body}xi[{v}] = T.Cast("int32", T.nearbyint(xf[{v}] * mx[1]))' for v in range(32)]
            L.append(f"{body}xd[{sb}] = mx[0] / T.float32(127)")
            L.append(f"{body}xs[{sb}] = " + " + ".join(f"xi[{v}]" for v in range(32)))
            for d, (_, vals) in enumerate(_dp4a_terms(bits, sb, NSB, spec.layout)):
                L.append(f"{body}xa[{8 * sb + d}] = " + " | ".join(
                    f"T.shift_left(T.bitwise_and(xi[{v}], 255), {8 * i})" for i, v in enumerate(vals)))
            continue
        for i, b in enumerate(classes):
            L.append(f"{body}sx[{i}] = sx[{i}] + " + " + ".join(f"xf[{(sb * 32 if resident else 0) + v}]"
                                                                for v, (_, fb) in enumerate(fields) if fb == b))
    for i in range(NO):  # after the activations' math: the gather has long arrived, the store does not wait
        L += [f"{body}if {c} + {i * nc} < {n_out}:", f"{body}    oxs[{c} + {i * nc}] = xo[{i}]"]
    if not int8:
        L += first_loads(body)

    def step(ind, st, b, prefetch):
        """One step of R rows from buffer b; `prefetch` = (condition, next step, buffer) loads ahead first."""
        out = [f"{ind}if {c} < {nc}:"]
        body = ind + "    "
        if prefetch:
            cond, nst, nb = prefetch
            if cond:
                out.append(f"{body}if {cond}:")
                out += load_rows(body + "    ", nst, nb)
            else:
                out += load_rows(body, nst, nb)
        if int8:
            for r in range(R):
                wb = (b * R + r) * CW
                for sb in range(NSB):
                    started = set()   # one dp4a chain per byte shift e (idot: 0, idot8: 3), see _dp4a_shift
                    for d, (terms, _) in enumerate(_dp4a_terms(bits, sb, NSB, spec.layout)):
                        w = _code_bytes(lambda j, wb=wb: f"wq[{wb + j}]", terms)
                        a = f"idot{8 if _dp4a_shift(terms) else ''}[{r}]"
                        out.append(f"{body}{a} = " + _dp4a(w, f"xa[{8 * sb + d}]",
                                                           a if a in started else "T.int32(0)", gpu))
                        started.add(a)
                    z = f'T.Cast("int32", zr[{b * R + r}])' if not spec.sym else f"T.int32({int(spec.sym_zero)})"
                    dot = f"idot[{r}]" + (f" + T.shift_right(idot8[{r}], 3)" if f"idot8[{r}]" in started else "")
                    t = f'xd[{sb}] * T.Cast("float32", {dot} - {z} * xs[{sb}])'
                    out.append(f"{body}acc[{r}] = " + (f"acc[{r}] + {t}" if sb else t))
                out.append(f'{body}acc[{r}] = acc[{r}] * T.Cast("float32", sc[{b * R + r}])')
        else:
            out += step_fp(body, b)
        return out + reduce_(ind, st)

    def step_fp(body, b):
        out = [f"{body}dot[{i}] = T.float32(0)" for i in range(R * ncls)]
        for sb in range(C // 32):
            if not resident:
                out += load_x(body, sb, 0)
            x0 = sb * 32 if resident else 0
            for r in range(R):
                for v, (terms, fb) in enumerate(fields):
                    f = _field_float(lambda j, r=r, sb=sb: f"wq[{(b * R + r) * CW + sb * SW + j}]", terms)
                    d = f"dot[{r * ncls + classes.index(fb)}]"
                    out.append(f"{body}{d} = {d} + xf[{x0 + v}] * {f}")
        sxt = " + ".join(f"sx[{i}]" for i in range(ncls))
        for r in range(R):
            z = (f'T.Cast("float32", zr[{b * R + r}])' if not spec.sym else f"T.float32({float(spec.sym_zero)})")
            # dot_b = sum x (1 + q 2^(b-23)): sum x q = sum_b 2^(23-b) (dot_b - sx_b)
            qx = " + ".join(f"(dot[{r * ncls + i}] - sx[{i}]) * T.float32({float(2 ** (23 - fb))})"
                            for i, fb in enumerate(classes))
            out.append(f'{body}acc[{r}] = T.Cast("float32", sc[{b * R + r}]) * ({qx} - {z} * ({sxt}))')
        return out

    def reduce_(ind, st):
        body = ind + "    "
        out = [f"{ind}else:"]
        out += [f"{body}acc[{r}] = T.float32(0)" for r in range(R)]
        if gpu and cfg.xreduce and R > 1 and R & (R - 1) == 0 and R <= 32:
            # transposed: each exchange halves the rows a lane holds (it keeps one half and sends the other), so
            # R rows take R - 1 + 5 - log2(R) shuffles instead of 5 R; lane tx ends with row tx // (32 / R)
            for off, h in xreduce_stages(R):
                hi = f"T.bitwise_and(tx, {off}) != 0"
                out += [f"{ind}acc[{i}] = T.Select({hi}, acc[{i + h}], acc[{i}]) + T.tvm_warp_shuffle("
                        f"T.uint32(0xFFFFFFFF), T.Select({hi}, acc[{i}], acc[{i + h}]), T.bitwise_xor(tx, {off}), "
                        f"32, 32)" for i in range(h)]
            lanes = 32 // R
            out += [f"{ind}acc[0] = acc[0] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), acc[0], {off}, 32, 32)"
                    for off in (16, 8, 4, 2, 1) if off < lanes]
            out.append(f"{ind}if tx % {lanes} == 0:")
            out.append(f"{ind}    red[ty * {RS} + {st * R} + tx // {lanes}] = acc[0]")
        elif gpu:
            for r in range(R):
                for off in (16, 8, 4, 2, 1):
                    out.append(f"{ind}acc[{r}] = acc[{r}] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), "
                               f"acc[{r}], {off}, 32, 32)")
            out.append(f"{ind}if tx == 0:")
            out += [f"{ind}    red[ty * {RS} + {st * R + r}] = acc[{r}]" for r in range(R)]
        else:
            out += [f"{ind}red[{c} * {RS} + {st * R + r}] = acc[{r}]" for r in range(R)]
        return out

    def outlier_products(ind):
        # OWQ's epilogue products: `lanes` threads per row add the outlier columns' products from shared memory (no
        # buffers or loads in the steps, where they took ~16 registers), a shuffle sums them into the row's first
        # lane (op[e] of epilogue slot e * threads + c). The copy's pieces, then a barrier of our own: TVM's sync
        # planner does not see cp.async's writes to shared memory (where each lane reads only what it stored
        # itself, it would place none before them)
        out = [f"{ind}T.ptx.cp.async_.wait_all()", f'{ind}T.tvm_storage_sync("shared")']
        for e in range(NE):
            out.append(f"{ind}op[{e}] = {outlier_part(f'({e * tpb} + {c})')}")
            out += [f"{ind}op[{e}] = op[{e}] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), op[{e}], {off}, 32, 32)"
                    for off in (16, 8, 4, 2, 1) if off < OW["lanes"]]
        return out

    # steps unrolled, buffers alternating: every buffer index is a constant (registers, not local memory), and no
    # loop-carried state keeps registers alive across steps
    for st in range(S):
        nx = st + nbuf - 1
        pre = (live(nx), nx, nx % nbuf) if L0 <= nx < S else None
        if pdl and st == S - 1:
            # the next kernel may launch once every block is here (all of its loads issued): triggered at the
            # start, it launched while single-wave grids of long blocks were still running, and its early blocks
            # unbalanced them (H200: W3 1.15 -> 1.31 ms per step)
            L.append(f'{ind}T.evaluate(T.call_extern("void", "cudaTriggerProgrammaticLaunchCompletion"))')
        if early_out and st == S - 1:
            # before the last step, whose loads are in flight (issued during the previous step), not as the block's
            # tail after the final barrier (H200, LLaMA-7B W3 + OWQ: step 1.8% faster, qkv and o gained, down not:
            # benchmarks/results/gpu-nvidia-h200.md, gpu9)
            L += outlier_products(ind)
        if live(st):  # uniform over the block: the shuffles inside stay convergent
            L.append(f"{ind}if {live(st)}:")
            L += step(ind + "    ", st, st % nbuf, pre)
        else:
            L += step(ind, st, st % nbuf, pre)

    def add(row):   # the residual, added to the rounded output as a separate add kernel would
        return f" + res[{ix}, {row}]" if residual else ""

    def finish(ind, lin, nsum, extra=None):
        if epilogue:
            return finish_pair(ind, lin, nsum)
        row = f"bx * {RS} + {lin}"
        tot = " + ".join(f"red[{t * RS} + {lin}]" for t in range(nsum)) if gpu else "tot[0]"
        tot += f" + {extra}" if extra else ""
        out = []
        if not gpu:
            out += [f'{ind}tot = T.alloc_buffer((1,), "float32")', f"{ind}tot[0] = T.float32(0)",
                    f"{ind}for t in T.serial({nsum}):", f"{ind}    tot[0] = tot[0] + red[t * {RS} + {lin}]"]
        out.append(f'{ind}y[{ix}, {row}] = T.Cast("{out_dtype}", {tot}){add(row)}')
        return out

    def finish_pair(ind, lin, nsum):
        # output lin of the block: its gate row lin and up row RS / 2 + lin, rounded to fp16 as the gate_up GEMV's
        # output was, then the "silu_mul" prologue's fp16 expression
        if gpu:
            gate, up = (" + ".join(f"red[{t * RS} + {o}{lin}]" for t in range(nsum)) for o in ("", f"{RS // 2} + "))
            out = []
        else:
            gate, up = "tot[0]", "tot[1]"
            out = [f'{ind}tot = T.alloc_buffer((2,), "float32")', f"{ind}tot[0] = T.float32(0)",
                   f"{ind}tot[1] = T.float32(0)", f"{ind}for t in T.serial({nsum}):",
                   f"{ind}    tot[0] = tot[0] + red[t * {RS} + {lin}]",
                   f"{ind}    tot[1] = tot[1] + red[t * {RS} + {RS // 2} + {lin}]"]
        g16 = f'T.Cast("float16", {gate})'
        return out + [f'{ind}y[{ix}, bx * {RS // 2} + {lin}] = {g16} * T.sigmoid({g16}) * T.Cast("float16", {up})']

    outs = RS // 2 if epilogue else RS   # the block's outputs
    if n_out and gpu:
        # the products (computed here unless early_out: before the last step), added by each row's first lane
        # after the final barrier (TVM's sync planner places it before the reads of `red`; with the products here,
        # outlier_products' own barrier serves both)
        if not early_out:
            L += outlier_products(ind)
        lpr = OW["lanes"]
        for e in range(NE):
            lin = f"({e * tpb} + {c}) // {lpr}"
            L.append(f"{ind}if ({e * tpb} + {c}) % {lpr} == 0 and {lin} < {RS}"
                     + (f" and bx * {RS} + {lin} < {n}:" if ragged else ":"))
            L += finish(ind + "    ", lin, TY, f"op[{e}]")
    elif gpu:
        ne = -(-outs // tpb)
        L.append(f"{ind}for e in T.serial({ne}):")
        L.append(f"{ind}    if e * {tpb} + {c} < {outs}"
                 + (f" and bx * {RS} + e * {tpb} + {c} < {n}:" if ragged else ":"))
        L += finish(ind + "        ", f"(e * {tpb} + {c})", TY)
    else:
        if n_out:  # the GPU's epilogue slots one after another, the shuffle a plain sum per row
            lpr, slots = OW["lanes"], -(-RS * OW["lanes"] // tpb) * tpb
            L += [f'        opart = T.alloc_buffer(({RS},), "float32")',
                  f"        for r in T.serial({RS}):", "            opart[r] = T.float32(0)",
                  f"        for s in T.serial({slots}):",
                  f"            opart[T.min(s // {lpr}, {RS - 1})] = opart[T.min(s // {lpr}, {RS - 1})] + "
                  + outlier_part("s")]
        L.append(f"        for lin in T.serial({outs}):")
        if ragged:
            L.append(f"            if bx * {RS} + lin < {n}:")
        L += finish("                " if ragged else "            ", "lin", tpb, "opart[lin]" if n_out else None)
    if gpu and cfg.min_blocks:  # everything inside the thread loops, under the launch-bounds attribute
        at = next(i for i, line in enumerate(L) if "threadIdx.x" in line) + 1
        L = L[:at] + [f'{ind}with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", {cfg.min_blocks}):'] + [
            "    " + line for line in L[at:]]
    if cfg.groups > 1:
        L = _grouped(L, cfg.groups, NB, gpu)
    return "\n".join(L) + "\n"


SHARED = ("red", "osw", "oxs", "nred")   # the block's shared buffers: one slice per group


def _grouped(L: list[str], ng: int, nb: int, gpu: bool) -> list[str]:
    """The kernel of `L` with `ng` of its blocks in one thread block: group tz (threadIdx.z; the twin: a serial loop)
    of block bx runs the body of block bx * ng + tz; on the GPU each shared buffer gets one slice per group (the
    block's barriers then serve all groups, which all reach them: ng divides the blocks, so no group is idle)."""
    import re
    head = next(i for i, line in enumerate(L) if line.lstrip().startswith("for bx in"))
    L = L[:head] + [L[head].replace(f"({nb},", f"({nb // ng},").replace(f"({nb})", f"({nb // ng})")] + [
        re.sub(r"\bbx\b", f"(bx * {ng} + tz)", line) for line in L[head + 1:]]
    body = L[head + 1:]
    if not gpu:   # the twin: each group's buffers are its own
        return L[:head + 1] + [f"        for tz in T.serial({ng}):"] + ["    " + line for line in body]
    size = {}
    for i, line in enumerate(body):
        m = re.match(r"\s*(\w+) = T\.alloc_buffer\(\((\d+),\)", line)
        if m and m.group(1) in SHARED:
            size[m.group(1)] = int(m.group(2))
            body[i] = line.replace(f"(({m.group(2)},)", f"(({int(m.group(2)) * ng},)", 1)
    pat = re.compile(r"\b(" + "|".join(size) + r")\[")
    body = [pat.sub(lambda m: f"{m.group(1)}[tz * {size[m.group(1)]} + ", line) for line in body]
    at = next(i for i, line in enumerate(body) if "threadIdx.y" in line)
    return (L[:head + 1] + body[:at] + [f'        for tz in T.thread_binding({ng}, thread="threadIdx.z"):']
            + ["    " + line for line in body[at:]])
