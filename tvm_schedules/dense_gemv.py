"""Decode GEMV for GPUs with an fp16 weight (unquantized exports, the fp16 output layer): one activation row times
W [N, K], fp32 accumulation, written as a hand-scheduled TIR prim func.

dlight's CUDA GEMV rule (what these linears ran before) gives every row one warp that reads x from shared memory for
each FMA, in blocks of 16 rows, with 32-bit weight loads. On the LLaMA-7B step (H200) that left the N = 4096 linears
(o, down: 256 blocks, 45% of the warps resident) at 74% / 79% of the memory roofline and the step at 84.8%
(benchmarks/results/gpu-nvidia-h200.md, gpu9). With this kernel (`default_config`) the step reaches 94.3% with PDL
and 91.6% plain (3.028 / 3.115 ms against dlight's 3.363 in the same run; gpu9b). Here, as in `gemv.py`:
- the block's threads split K (split-K inside the block): thread c owns the 8-value pieces c, c + T, c + 2T, ... of
  every row of its block, one 128-bit load per row and piece, consecutive threads on consecutive pieces (coalesced);
- x's piece is loaded once (128-bit, from L1/L2), converted to fp32 once and reused by the block's `rows` rows, so x
  costs no shared memory and no load per FMA;
- the pieces come in batches of `unroll`: a batch's `rows x unroll` weight loads all go out before its math
  (independent loads in flight per thread without a deep unrolled loop the compiler may or may not hoist);
- the rows' partial sums meet through warp shuffles and one shared-memory slot per warp and row; the first `rows`
  threads add the warps' slots after one barrier;
- `pdl=True` (sm_90+, export/pdl.py): the first batch's weight loads go out before `griddepcontrol.wait` (they depend
  on no earlier kernel), the next kernel may launch once the last batch's loads are issued.

`dense_gemv_func(n, k, gpu=False)` gives the same body with the thread loops serial and the shuffles a plain sum, so
the index math is tested on the CPU (compiled for llvm) against NumPy. The prim func carries "tirx.is_scheduled", so
dlight leaves it alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from .tvmscript import parse_tir

VEC = 8   # halves per 128-bit load
WAIT = '{ind}T.evaluate(T.call_extern("void", "cudaGridDependencySynchronize"))'
TRIGGER = '{ind}T.evaluate(T.call_extern("void", "cudaTriggerProgrammaticLaunchCompletion"))'


@dataclass(frozen=True)
class DenseConfig:
    rows: int = 4     # output rows per block (each thread's x piece reused by each)
    warps: int = 8    # warps per block: its threads split K
    unroll: int = 2   # pieces per batch: rows x unroll weight loads in flight per thread
    depth: int = 1    # register buffers of batches: 2 loads the next batch (weights and x) before this one's math

    def __post_init__(self):
        if self.rows < 1 or not 1 <= self.warps <= 32 or self.unroll < 1 or self.depth not in (1, 2):
            raise ValueError(f"bad dense GEMV config {self}")


def supports(n: int, k: int) -> bool:
    """Whole 128-bit pieces per row (K a multiple of 8) and a static shape."""
    return isinstance(n, int) and isinstance(k, int) and n > 0 and k > 0 and k % VEC == 0


def default_config(n: int, k: int) -> DenseConfig:
    """The export's pick, from the H200 sweep of LLaMA-7B's linears (benchmarks/results/gpu-nvidia-h200.md, gpu9b:
    24 configs per linear): 4 rows per block of 8 warps won or tied on every linear (o: 9.45 us against 9.67-11.57
    for the others); a thread's pieces in one batch where they are at most 2 (K = 4096: 2 per thread),
    else one piece per batch, double-buffered (down, K = 11008: 6 per thread; 22.0 us against 22.4 in one batch of
    2). Small K takes fewer warps (at least 2 pieces per thread), odd N fewer rows."""
    nv = k // VEC
    warps = max(1, min(8, -(-nv // 64)))
    nit = -(-nv // (32 * warps))
    rows = 4 if n % 4 == 0 else 2 if n % 2 == 0 else 1
    return DenseConfig(rows, warps, nit, 1) if nit <= 2 else DenseConfig(rows, warps, 1, 2)


def dense_gemv_func(n: int, k: int, cfg: DenseConfig | None = None, gpu: bool = True, out_dtype: str = "float16",
                    lead: tuple[int, ...] = (1,), name: str = "main", pdl: bool = False):
    """y[lead..., N] = x[lead..., K] @ W^T in fp32, rounded to `out_dtype`, for one row (prod(lead) == 1).
    Arguments: x fp16 [lead..., K], weight fp16 [N, K], y. `gpu=False`: the CPU-testable serial twin."""

    if not supports(n, k):
        raise ValueError(f"no dense decode GEMV for N={n}, K={k} (K must be a multiple of {VEC})")
    cfg = cfg or default_config(n, k)
    src = _source(n, k, cfg, gpu, out_dtype, lead, name, pdl and gpu)
    return parse_tir(src)


def _source(n: int, k: int, cfg: DenseConfig, gpu: bool, out_dtype: str, lead: tuple[int, ...], name: str,
            pdl: bool) -> str:
    R, TY, U, D = cfg.rows, cfg.warps, cfg.unroll, cfg.depth
    tpb = 32 * TY
    nv = k // VEC                       # pieces per row
    nit = -(-nv // tpb)                 # pieces per thread (the last may be past the row: guarded)
    NB = -(-n // R)
    ragged_n = n % R != 0
    lo = ", ".join(str(d) for d in lead)
    ix = ", ".join("0" for _ in lead)
    local = '"local"' if gpu else '"global"'
    c = "(ty * 32 + tx)"

    def loop(extent, tag):
        return f'T.thread_binding({extent}, thread="{tag}")' if gpu else f"T.serial({extent})"

    def row(r):   # the block's row r, clamped into the weight on a short last block (its result is not written)
        return f"T.min(bx * {R} + {r}, {n - 1})" if ragged_n else f"bx * {R} + {r}"

    def live(it):   # the thread's piece `it` lies inside the row
        return f"{it} * {tpb} + {c} < {nv}" if (it + 1) * tpb > nv else ""

    L = ["@T.prim_func",
         f'def {name}(x: T.Buffer(({lo}, {k}), "float16"), weight: T.Buffer(({n}, {k}), "float16"), '
         f'y: T.Buffer(({lo}, {n}), "{out_dtype}")):',
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})',
         f'    for bx in {loop(NB, "blockIdx.x")}:',
         f'        red = T.alloc_buffer(({(TY if gpu else tpb) * R},), "float32"'
         + (', scope="shared")' if gpu else ")"),
         f'        for ty in {loop(TY, "threadIdx.y")}:',
         f'            for tx in {loop(32, "threadIdx.x")}:']
    ind = " " * 16
    L += [f'{ind}wh = T.alloc_buffer(({D * U * R * VEC},), "float16", scope={local})',
          f'{ind}xh = T.alloc_buffer(({D * U * VEC},), "float16", scope={local})',
          f'{ind}xf = T.alloc_buffer(({VEC},), "float32", scope={local})',
          f'{ind}acc = T.alloc_buffer(({R},), "float32", scope={local})']
    L += [f"{ind}acc[{r}] = T.float32(0)" for r in range(R)]

    def guarded(it, lines):
        cond = live(it)
        return [f"{ind}if {cond}:"] + ["    " + s for s in lines] if cond else lines

    def w_loads(it, u):
        return guarded(it, [f"{ind}wh[T.ramp({(u * R + r) * VEC}, 1, {VEC})] = "
                            f"weight[{row(r)}, T.ramp(({it} * {tpb} + {c}) * {VEC}, 1, {VEC})]" for r in range(R)])

    def x_load(it, u):
        return guarded(it, [f"{ind}xh[T.ramp({u * VEC}, 1, {VEC})] = "
                            f"x[{ix}, T.ramp(({it} * {tpb} + {c}) * {VEC}, 1, {VEC})]"])

    def math(it, u):
        out = [f'{ind}xf[{j}] = T.Cast("float32", xh[{u * VEC + j}])' for j in range(VEC)]
        for r in range(R):
            out.append(f"{ind}acc[{r}] = acc[{r}] + " + " + ".join(
                f'xf[{j}] * T.Cast("float32", wh[{(u * R + r) * VEC + j}])' for j in range(VEC)))
        return guarded(it, out)

    # batches unrolled, buffers alternating (depth 2): every buffer index is a constant (registers)
    batches = [list(range(b, min(b + U, nit))) for b in range(0, nit, U)]

    def slot(bi, u):
        return (bi % D) * U + u

    def loads(bi, first):
        out = [s_ for u, it in enumerate(batches[bi]) for s_ in w_loads(it, slot(bi, u))]
        if pdl and first:   # x (the previous kernel's output) and every write after it has finished
            out.append(WAIT.format(ind=ind))
        if pdl and bi == len(batches) - 1:   # every load of the block issued: the next kernel may launch
            out.append(TRIGGER.format(ind=ind))
        return out + [s_ for u, it in enumerate(batches[bi]) for s_ in x_load(it, slot(bi, u))]

    if D == 2:
        L += loads(0, True)
    for bi, its in enumerate(batches):
        if D == 1:
            L += loads(bi, bi == 0)
        elif bi + 1 < len(batches):
            L += loads(bi + 1, False)
        for u, it in enumerate(its):
            L += math(it, slot(bi, u))
    if gpu:
        for r in range(R):
            L += [f"{ind}acc[{r}] = acc[{r}] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), acc[{r}], {off}, 32, 32)"
                  for off in (16, 8, 4, 2, 1)]
        L.append(f"{ind}if tx == 0:")
        L += [f"{ind}    red[ty * {R} + {r}] = acc[{r}]" for r in range(R)]
        cond = f"{c} < {R}" + (f" and bx * {R} + {c} < {n}" if ragged_n else "")
        L += [f"{ind}if {cond}:",
              f'{ind}    y[{ix}, bx * {R} + {c}] = T.Cast("{out_dtype}", '
              + " + ".join(f"red[{t * R} + {c}]" for t in range(TY)) + ")"]
    else:
        L += [f"{ind}red[{c} * {R} + {r}] = acc[{r}]" for r in range(R)]
        L += ['        tot = T.alloc_buffer((1,), "float32")',
              f"        for r in T.serial({R}):",
              f"            if bx * {R} + r < {n}:",
              "                tot[0] = T.float32(0)",
              f"                for t in T.serial({tpb}):",
              f"                    tot[0] = tot[0] + red[t * {R} + r]",
              f'                y[{ix}, bx * {R} + r] = T.Cast("{out_dtype}", tot[0])']
    return "\n".join(L) + "\n"
