"""Decode GEMV with a weight ring in shared memory fed by bulk copies (CUDA sm_90+), as a hand-scheduled TIR prim
func: one row of int8-rounded activations times a 4-bit g128 weight, y = x @ dq(W)^T.

Why: the export's decode GEMVs (`gemv.py`) are grids of many small blocks, so the next linear's blocks become resident
only as this one's leave, and every dependent launch in the 128-linear LLaMA-7B step costs ~2.3 us over the kernel's
bytes (71-72% of the memory roofline on the H200). Here each linear is ONE block per SM, taking just under half of its
shared memory, that triggers its dependents at its start: the next linear's blocks are resident beside it, past their
launch, and their producer warps stream the first part of their weights before the dependency resolves. Measured as
hand-written CUDA (`benchmarks/gpu_ring.py`, `benchmarks/results/gpu-ring-h200.md`): 77.7% of the roofline at W4
against 71-72%.

The block: a producer warp (`cfg.warps`, whose lane 0 issues `cp.async.bulk` copies of `cfg.rows` rows into a ring
of `cfg.warps * cfg.depth` slots, each completing a "full" mbarrier; after `cfg.pre` quarters of the ring it waits
for the previous kernel too, before refilling a slot it waits for that slot's "empty" mbarrier) and `cfg.warps`
consumer warps (they wait for the previous kernel (`griddepcontrol.wait`), round x to int8 per 32 values into shared
memory as `cpu_int8.quantize_act_np` does, then warp w takes the block's slots w, w + warps, ...). A lane owns one
group of 128 weights of K per pass of 4096 (its 128 int8 activations in 32 registers), a warp owns whole rows: a row
costs a lane four 16-byte shared loads, 16 x (two masks, two dp4a: the high nibbles stay in place, x16, in a second
chain) and one scale-and-zero step per 32 values, then 5 shuffles per row.

Row layout (`repack_np`; an export-time repacking of the checkpoint's codes, which do not change): per row, for each
pass p of 32 groups (the last may have fewer, `lp`), for each piece c of 32 values, for each lane L (group 32 p + L):
16 bytes, in word q byte b the low nibble element 8 q + b and the high nibble element 8 q + 4 + b of the piece; then
the row's fp16 scales per group, its uint8 zero points per group (asymmetric schemes), zero bytes up to a multiple of
16 (bulk copies move 16-byte units). `ring_gemv_np` is the NumPy model of the kernel's reads and math: the CPU tests
check it against `cpu_int8.int8_gemv_np`, the GPU check (`benchmarks/gpu_ring.py --tir`) the kernel against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .tvmscript import parse_tir

GROUP = 128                 # values per group: one lane's slot of K per pass
PASS = 32 * GROUP           # values of K per pass of a warp
WAIT = 'T.evaluate(T.call_extern("void", "cudaGridDependencySynchronize"))'
TRIGGER = 'T.evaluate(T.call_extern("void", "cudaTriggerProgrammaticLaunchCompletion"))'
BULK = 'T.ptx["cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"]'


@dataclass(frozen=True)
class RingConfig:
    rows: int = 2       # rows per slot (one bulk copy)
    depth: int = 3      # slots per consumer warp
    warps: int = 8      # consumer warps (+ one producer warp)
    pre: int = 2        # quarters of the ring the producer fills before it waits for the previous kernel
    blocks: int = 132   # one block per SM (the H100 SXM / H200 count)

    def __post_init__(self):
        if not (1 <= self.rows <= 4 and self.depth >= 1 and 1 <= self.warps <= 31 and 0 <= self.pre <= 4
                and self.blocks >= 1):
            raise ValueError(f"not a ring GEMV config: {self}")


def default_config(k: int) -> RingConfig:
    """~100 KB of ring, so that two blocks (this linear's and the next one's) fit an SM's 228 KB."""
    return RingConfig(2, 3) if k <= PASS else RingConfig(1, 2)


def groups(k: int) -> int:
    return k // GROUP


def row_bytes(k: int, sym: bool) -> int:
    g = groups(k)
    return -(-(k // 2 + 2 * g + (0 if sym else g)) // 16) * 16


def _offsets(k: int, sym: bool, cfg: RingConfig) -> dict:
    """Byte offsets of the shared-memory regions: the slots, x's int8 codes ([pass][16-value chunk][lane] x 16
    bytes), per 32-value block its scale (fp32) and code sum (int32), the 2 x slots mbarriers (full, then empty)."""
    p = -(-groups(k) // 32)
    s = cfg.warps * cfg.depth
    slots = s * cfg.rows * row_bytes(k, sym)
    xq = slots
    xd = xq + p * 4096
    xsi = xd + p * 512
    bar = xsi + p * 512
    return {"slots": s, "xq": xq, "xd": xd, "xsi": xsi, "bar": bar, "total": bar + 2 * s * 8, "passes": p}


def smem_bytes(k: int, sym: bool, cfg: RingConfig | None = None) -> int:
    return _offsets(k, sym, cfg or default_config(k))["total"]


def supports(n: int, k: int, bits: int, group_size: int) -> bool:
    return bits == 4 and group_size == GROUP and k % GROUP == 0 and n >= 1


# ------------------------------------------------------------------------------------------------ layout (NumPy)
def repack_np(codes, scales, zeros=None):
    """codes uint8 [N, K] (values < 16), scales fp16 [N, K/128], zeros uint8 [N, K/128] or None -> uint8 [N,
    row_bytes(K)] in the ring layout (module docstring)."""
    import numpy as np
    n, k = codes.shape
    g = groups(k)
    c = codes.astype(np.uint8).reshape(n, g, 4, 4, 2, 4)           # [n, group, piece, word, lo/hi, byte]
    byte = c[..., 0, :] | (c[..., 1, :] << 4)                        # [n, group, piece, word, byte]
    byte = byte.reshape(n, g, 4, 16)
    parts = []
    for p in range(-(-g // 32)):
        parts.append(byte[:, 32 * p:32 * p + 32].transpose(0, 2, 1, 3).reshape(n, -1))   # [piece][lane][16]
    out = np.zeros((n, row_bytes(k, zeros is None)), np.uint8)
    out[:, :k // 2] = np.concatenate(parts, axis=1)
    out[:, k // 2:k // 2 + 2 * g] = np.ascontiguousarray(scales.astype(np.float16)).view(np.uint8)
    if zeros is not None:
        out[:, k // 2 + 2 * g:k // 2 + 3 * g] = zeros
    return out


def unpack_np(rows, k: int, sym: bool, sym_zero: int = 8):
    """The inverse of repack_np: (codes uint8 [N, K], scales fp16 [N, K/128], zeros uint8 [N, K/128])."""
    import numpy as np
    n, g = rows.shape[0], groups(k)
    parts = []
    for p in range(-(-g // 32)):
        lp = min(32, g - 32 * p)
        b = rows[:, p * 2048:p * 2048 + 64 * lp].reshape(n, 4, lp, 4, 4)     # [n, piece, lane, word, byte]
        v = np.stack([b & 15, b >> 4], axis=4)                               # [n, piece, lane, word, lo/hi, byte]
        parts.append(v.transpose(0, 2, 1, 3, 4, 5).reshape(n, lp * 128))
    codes = np.concatenate(parts, axis=1)
    scales = np.ascontiguousarray(rows[:, k // 2:k // 2 + 2 * g]).view(np.float16)
    zeros = (np.full((n, g), sym_zero, np.uint8) if sym else rows[:, k // 2 + 2 * g:k // 2 + 3 * g].copy())
    return codes, scales, zeros


def ring_gemv_np(rows, x, k: int, sym: bool, sym_zero: int = 8):
    """NumPy model of the kernel: x [K] fp16 rounded to int8 per 32 values (cpu_int8.quantize_act_np), integer dots
    per 32-value block against the rows' codes, y [N] fp32 = sum_g s_g sum_b d_b (dot_b - z_g sum_b a)."""
    import numpy as np

    from .cpu_int8 import quantize_act_np
    codes, scales, zeros = unpack_np(rows, k, sym, sym_zero)
    a, d = quantize_act_np(x)
    n, nb = codes.shape[0], k // 32
    dots = (codes.reshape(n, nb, 32).astype(np.int64) * a.reshape(nb, 32).astype(np.int64)).sum(axis=2)
    asum = a.reshape(nb, 32).astype(np.int64).sum(axis=1)
    z = np.repeat(zeros.astype(np.int64), 4, axis=1)                         # per block: its group's zero
    t = (d[None, :] * (dots - z * asum[None, :]).astype(np.float32)).reshape(n, groups(k), 4).sum(axis=2)
    return (scales.astype(np.float32) * t).sum(axis=1)


# ------------------------------------------------------------------------------------------------ the prim func
def ring_gemv_func(n: int, k: int, sym: bool = False, sym_zero: int = 8, cfg: RingConfig | None = None,
                   name: str = "main", inplace: bool = False):
    """prim func (x [1, K] fp16, w uint32 [N * row_bytes(K) / 4] in the ring layout, y [1, N] fp16); launched as
    cfg.blocks blocks of (32, cfg.warps + 1) threads with smem_bytes(K) of dynamic shared memory and programmatic
    stream serialization (sm_90+)."""
    if not supports(n, k, 4, GROUP):
        raise ValueError(f"no ring GEMV for a {n}x{k} 4-bit weight in groups of {GROUP}")
    return parse_tir(_source(n, k, sym, sym_zero, cfg or default_config(k), name, inplace))


def _source(n: int, k: int, sym: bool, sym_zero: int, cfg: RingConfig, name: str, inplace: bool = False) -> str:
    RS, W, B = cfg.rows, cfg.warps, cfg.blocks
    G, RB = groups(k), row_bytes(k, sym)
    o = _offsets(k, sym, cfg)
    S, P = o["slots"], o["passes"]
    SB = RS * RB                                   # slot bytes
    share = -(-n // B)                             # the most rows a block takes
    TMAX = -(-share // RS)                         # the most slots a block takes
    PRE = cfg.pre * S // 4                         # slots the producer fills before the dependency is met
    NJ = -(-(k // 16) // (32 * (W + 1)))           # 16-value halves of x per thread
    words = n * RB // 4
    lo, hi = f"({n} * bx // {B})", f"({n} * (bx + 1) // {B})"
    nt = f"(({hi} - {lo} + {RS - 1}) // {RS})"
    nrows = f"T.min({RS}, {hi} - {lo} - t * {RS})"
    L = [f"@T.prim_func",
         f'def {name}(x: T.Buffer((1, {k}), "float16"), w: T.Buffer(({words},), "uint32"), '
         f'y: T.Buffer((1, {n}), "float16")):',
         '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})',
         f'    for bx in T.thread_binding({B}, thread="blockIdx.x"):',
         f'        for ty in T.thread_binding({W + 1}, thread="threadIdx.y"):',
         '            for tx in T.thread_binding(32, thread="threadIdx.x"):',
         '                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 2):']
    ind = " " * 20
    L += [f'{ind}sm = T.alloc_buffer(({o["total"] // 4},), "uint32", scope="shared.dyn")',
          f'{ind}smf = T.decl_buffer(({o["total"] // 4},), "float32", data=sm.data)',
          f'{ind}smi = T.decl_buffer(({o["total"] // 4},), "int32", data=sm.data)',
          f'{ind}smh = T.decl_buffer(({o["total"] // 2},), "float16", data=sm.data)',
          f'{ind}smb = T.decl_buffer(({o["total"]},), "uint8", data=sm.data)',
          f'{ind}bar = T.decl_buffer(({2 * S},), "uint64", data=sm.data, elem_offset={o["bar"] // 8})',
          f'{ind}xv = T.alloc_buffer((32,), "uint32", scope="local")',     # the lane's 128 int8 activations
          f'{ind}xd = T.alloc_buffer((4,), "float32", scope="local")',     # their 4 block scales
          f'{ind}xsi = T.alloc_buffer((4,), "int32", scope="local")',      # their 4 block code sums
          f'{ind}wq = T.alloc_buffer(({16 * RS},), "uint32", scope="local")',
          f'{ind}acc = T.alloc_buffer(({RS},), "float32", scope="local")',
          f'{ind}dl = T.alloc_buffer((2,), "int32", scope="local")',
          f'{ind}fr = T.alloc_buffer((1,), "float32", scope="local")',
          f'{ind}xsg = T.alloc_buffer((1,), "float32", scope="local")',
          f'{ind}xh = T.alloc_buffer(({16 * NJ},), "float16", scope="local")',
          f'{ind}xi = T.alloc_buffer((16,), "int32", scope="local")',
          f'{ind}mx = T.alloc_buffer((2,), "float32", scope="local")',
          f'{ind}qa = T.alloc_buffer((5,), "int32", scope="local")',
          f"{ind}if ty == 0 and tx == 0:"]
    L += [f"{ind}    T.ptx.mbarrier.init.shared.b64(T.address_of(bar[{i}]), T.uint32(1))" for i in range(2 * S)]
    L += [f"{ind}    T.ptx.fence.mbarrier_init.release.cluster()",
          f'{ind}T.tvm_storage_sync("shared")',
          f"{ind}{TRIGGER}"]          # the next linear may launch now: its blocks fit beside these
    nb = f"{nrows} * {RB}"

    def fill(ind_, first):
        """The producer's slot t (its rows' bytes onto the slot's full barrier); refills wait for the slot."""
        out = []
        if not first:   # slots S, S + 1, ...: wait until slot t - S is consumed
            out += [f"{ind_}T.cuda.mbarrier_wait(T.address_of(bar[{S} + t % {S}]), (t // {S} + 1) % 2)"]
        return out + [
            f'{ind_}T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(bar[t % {S}]), T.Cast("uint32", {nb}))',
            f'{ind_}{BULK}(T.address_of(sm[(t % {S}) * {SB // 4}]), T.address_of(w[({lo} + t * {RS}) * {RB // 4}]), '
            f'T.Cast("uint32", {nb}), T.address_of(bar[t % {S}]))']
    # the producer's first PRE slots go out before the wait: weights depend on no earlier kernel
    first = min(PRE, TMAX)
    if first:
        L += [f"{ind}if ty == {W} and tx == 0:",
              f"{ind}    for t in T.serial({first}):",
              f"{ind}        if t < {nt}:"] + fill(ind + "            ", True)
    # every thread: x as the previous kernel left it, rounded per 32 values (two lanes a block) into shared memory
    # (the whole block takes part, so that TVM's own barrier after it is outside any condition)
    L.append(f"{ind}{WAIT}")
    # then the rest of the ring's first round at once (no slot to wait for), before the producer's share of x
    if min(S, TMAX) > first:
        L += [f"{ind}if ty == {W} and tx == 0:",
              f"{ind}    for t in T.serial({first}, {min(S, TMAX)}):",
              f"{ind}        if t < {nt}:"] + fill(ind + "            ", True)
    c_ind = ind
    j = f"({{u}} * {32 * (W + 1)} + ty * 32 + tx)"
    for u in range(NJ):
        ju = j.format(u=u)
        L += [f"{c_ind}if {ju} < {k // 16}:",
              f"{c_ind}    xh[T.ramp({16 * u}, 1, 8)] = x[0, T.ramp({ju} * 16, 1, 8)]",
              f"{c_ind}    xh[T.ramp({16 * u + 8}, 1, 8)] = x[0, T.ramp({ju} * 16 + 8, 1, 8)]",
              f"{c_ind}else:"]
        L += [f"{c_ind}    xh[{16 * u + v}] = T.float16(0)" for v in range(16)]
    for u in range(NJ):
        ju = j.format(u=u)
        L += [f"{c_ind}mx[0] = T.float32(0)"]
        L += [f'{c_ind}mx[0] = T.max(mx[0], T.fabs(T.Cast("float32", xh[{16 * u + v}])))' for v in range(16)]
        L += [f"{c_ind}mx[0] = T.max(mx[0], T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), mx[0], T.bitwise_xor(tx, 1), "
              f"32, 32))",
              f"{c_ind}mx[1] = T.Select(mx[0] > T.float32(0), T.float32(127) / mx[0], T.float32(0))"]
        L += [f'{c_ind}xi[{v}] = T.Cast("int32", T.nearbyint(T.Cast("float32", xh[{16 * u + v}]) * mx[1]))'
              for v in range(16)]
        L += [f"{c_ind}qa[4] = " + " + ".join(f"xi[{v}]" for v in range(16)),
              f"{c_ind}qa[4] = qa[4] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), qa[4], T.bitwise_xor(tx, 1), 32, 32)"]
        L += [f"{c_ind}qa[{i}] = " + " | ".join(f"T.shift_left(T.bitwise_and(xi[{4 * i + b}], 255), {8 * b})"
                                                  for b in range(4)) for i in range(4)]
        # half j of block j // 2: group g = j // 8, chunk (j // 2 % 4) * 2 + j % 2 of its lane's 8
        dst = f"{o['xq'] // 4} + (({ju} // 256 * 8 + {ju} % 8) * 32 + {ju} // 8 % 32) * 4"
        L += [f"{c_ind}if {ju} < {k // 16}:",
              f'{c_ind}    smi[T.ramp({dst}, 1, 4)] = qa[T.ramp(0, 1, 4)]',
              f"{c_ind}    if {ju} % 2 == 0:",
              f"{c_ind}        smf[{o['xd'] // 4} + {ju} // 2] = mx[0] / T.float32(127)",
              f"{c_ind}        smi[{o['xsi'] // 4} + {ju} // 2] = qa[4]"]
    L.append(f'{c_ind}T.tvm_storage_sync("shared")')
    # the producer: the rest of the block's slots, each after its consumer freed it
    if TMAX > S:
        L += [f"{ind}if ty == {W}:",
              f"{ind}    if tx == 0:",
              f"{ind}        for t in T.serial({S}, {TMAX}):",
              f"{ind}            if t < {nt}:"] + fill(ind + "                ", False)
    L += [f"{ind}if ty < {W}:"]
    c_ind = ind + "    "

    def load_x(ind_, p):
        out = [f"{ind_}xv[T.ramp({4 * c}, 1, 4)] = sm[T.ramp({o['xq'] // 4} + (({p * 8 + c}) * 32 + tx) * 4, 1, 4)]"
               for c in range(8)]
        out += [f"{ind_}xd[T.ramp(0, 1, 4)] = smf[T.ramp({o['xd'] // 4} + ({32 * p} + tx) * 4, 1, 4)]",
                f"{ind_}xsi[T.ramp(0, 1, 4)] = smi[T.ramp({o['xsi'] // 4} + ({32 * p} + tx) * 4, 1, 4)]",
                f"{ind_}xsg[0] = " + " + ".join(f'xd[{c}] * T.Cast("float32", xsi[{c}])' for c in range(4))]
        return out

    if P == 1:
        L += load_x(c_ind, 0)
    L += [f"{c_ind}for t0 in T.serial({-(-TMAX // W)}):",
          f"{c_ind}    if ty + t0 * {W} < {nt}:"]
    b_ind = c_ind + "        "
    t = f"(ty + t0 * {W})"
    slot = f"({t} % {S}) * {SB}"                   # the slot's first byte
    L += [f"{b_ind}T.cuda.mbarrier_wait(T.address_of(bar[{t} % {S}]), ({t} // {S}) % 2)"]
    L += [f"{b_ind}acc[{r}] = T.float32(0)" for r in range(RS)]
    rows_t = f"T.min({RS}, {hi} - {lo} - {t} * {RS})"
    for p in range(P):
        lp = min(32, G - 32 * p)
        pi = b_ind
        if lp < 32:
            L.append(f"{pi}if tx < {lp}:")
            pi += "    "
        if P > 1:
            L += load_x(pi, p)
        g = f"({32 * p} + tx)"
        for r in range(RS):
            ri = pi
            if r:
                L.append(f"{ri}if {r} < {rows_t}:")
                ri += "    "
            base = f"({slot} + {r * RB} + {p * 2048}) // 4 + tx * 4"
            L += [f"{ri}wq[T.ramp({16 * r + 4 * c}, 1, 4)] = sm[T.ramp({base} + {c * lp * 4}, 1, 4)]"
                  for c in range(4)]
            # s * sum_b d_b (dot_b - z asum_b) = s * (sum_b d_b dot_b - z * xsg): xsg = sum_b d_b asum_b per lane
            z = (f'T.Cast("float32", smb[{slot} + {r * RB + k // 2 + 2 * G} + {g}])' if not sym
                 else f"T.float32({sym_zero})")
            L.append(f"{ri}fr[0] = T.float32(0)")
            for c in range(4):
                L.append(f"{ri}dl[0] = T.int32(0)")
                L.append(f"{ri}dl[1] = T.int32(0)")
                for q in range(4):
                    wv = f"wq[{16 * r + 4 * c + q}]"
                    for h in (0, 1):
                        xw = f'T.reinterpret("int32", xv[{8 * c + 2 * q + h}])'
                        if inplace:   # the high nibbles in place (x 16, unsigned bytes): one mask, no shift
                            m = 0xF0F0F0F0 if h else 0x0F0F0F0F
                            L.append(f"{ri}T.ptx.dp4a.u32.s32(dl[{h}], T.bitwise_and({wv}, T.uint32({m})), {xw}, "
                                     f"dl[{h}])")
                        else:
                            wb = f"T.shift_right({wv}, T.uint32(4))" if h else wv
                            L.append(f'{ri}dl[{h}] = T.call_pure_extern("int32", "__dp4a", T.reinterpret("int32", '
                                     f'T.bitwise_and({wb}, T.uint32(0x0F0F0F0F))), {xw}, dl[{h}])')
                dot = f"dl[0] + {'T.shift_right(dl[1], 4)' if inplace else 'dl[1]'}"
                L.append(f'{ri}fr[0] = fr[0] + xd[{c}] * T.Cast("float32", {dot})')
            L.append(f'{ri}acc[{r}] = acc[{r}] + T.Cast("float32", smh[({slot} + {r * RB + k // 2}) // 2 + {g}]) * '
                     f"(fr[0] - {z} * xsg[0])")
    # the warp's reads of the slot are done: the producer may refill it
    L += [f"{b_ind}T.cuda.warp_sync()", f"{b_ind}if tx == 0:",
          f"{b_ind}    T.ptx.mbarrier.arrive.shared.b64(T.address_of(bar[{S} + {t} % {S}]), T.uint32(1))"]
    shfl = "T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), {v}, T.bitwise_xor(tx, {off}), 32, 32)"
    if RS == 2:   # one exchange halves the rows a lane holds (lanes 16-31 keep row 1), then 4 shuffles
        hi16 = "T.bitwise_and(tx, 16) != 0"
        L += [f"{b_ind}fr[0] = T.Select({hi16}, acc[1], acc[0]) + "
              + shfl.format(v=f"T.Select({hi16}, acc[0], acc[1])", off=16)]
        L += [f"{b_ind}fr[0] = fr[0] + " + shfl.format(v="fr[0]", off=off) for off in (8, 4, 2, 1)]
        L += [f"{b_ind}if tx % 16 == 0 and tx // 16 < {rows_t}:",
              f'{b_ind}    y[0, {lo} + {t} * {RS} + tx // 16] = T.Cast("float16", fr[0])']
    else:
        for r in range(RS):
            L += [f"{b_ind}acc[{r}] = acc[{r}] + " + shfl.format(v=f"acc[{r}]", off=off) for off in (16, 8, 4, 2, 1)]
            L += [f"{b_ind}if tx == 0 and {r} < {rows_t}:",
                  f'{b_ind}    y[0, {lo} + {t} * {RS} + {r}] = T.Cast("float16", acc[{r}])']
    return "\n".join(L) + "\n"

