"""Prefill GEMM on tensor cores for CUDA: y[1, M, N] = x[1, M, K] @ dq(W)^T with 4- or 2-bit weights, fp16 `mma.sync`.

The wheel's own tensor-core path (s_tir Tensorize behind dlight's MatmulTensorization) segfaults
(`workarounds.py`, bug 1), so prefill ran on dlight's SIMT schedule, ~20x below what the GPU does in fp16. This
kernel is CUDA C++ carried inside a TIR prim func through `T.cuda.func_call` (TVM emits the source into the module's
CUDA code; the export compiles it with nvcc like every other kernel, `export/cuda.py`), so no schedule primitive and
no Tensorize is involved. The prim func only binds the grid and passes the buffers; it carries "tirx.is_scheduled",
so dlight leaves it alone.

The kernel is the usual multistage tensor-core GEMM (CUTLASS's sm80 mainloop; for the in-register dequantization
Marlin, Frantar et al. 2024, "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on Large Language Models"):
- a block computes a BM x BN tile of y; its warps a WM x WN sub-tile each, as m16n8k16 fp16 MMAs accumulating fp32;
- x tiles (BM x 32 fp16) and the packed weight tiles (BN rows x 32 values: 16 bytes a row at 4 bits, 8 at 2) go
  global -> shared with `cp.async`, STAGES tiles in flight; the x tile's 16-byte chunks are XOR-swizzled by row so
  that `ldmatrix` reads them without bank conflicts;
- no fp16 copy of the weights exists anywhere: each thread reads, for its MMA B fragment (row n = lane / 4, values
  k = 2t, 2t+1, 2t+8, 2t+9 of a 16-wide step, t = lane % 4), the packed word(s) of its row from shared memory and
  turns two codes at a time into a half2 by OR-ing them into the mantissa of 1024.0 (`0x6400 | q` is exactly
  1024 + q in fp16), then `(h - (1024 + z)) * s` with two half2 instructions: (q - z) is exact, so the weight is the
  correctly rounded fp16 of (q - z) * s, bit-identical to the dequantize kernel's (`dequant.weight_te`);
- the checkpoint's LSB-first words are used as they are (no repacking): at 4 and 2 bits a thread's four codes of a
  step sit in one or two words at shifts 2t * bits + constants (`fragment_fields`), so one shift and a few masks
  give them.
The NumPy model `mma_gemm_np` follows the same fragment fields, fp16 dequantization and per-32-column fp32
accumulation; the CPU tests check it against `dequant.quant_matmul_np`, and `benchmarks/gpu_decode.py run` checks the
compiled kernel against a torch reference on the GPU.

For CUDA archs below sm_80 (no m16n8k16 / cp.async) the same function compiles to a plain loop (correct, slow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dequant import QuantSpec

BK = 32                  # K per pipeline stage: a group (g32 and up) never changes inside one
BITS = (4, 2)            # codes per word 8 / 16: a thread's pair (2t, 2t+1) never straddles a word
SMEM_LIMIT = 48 * 1024   # static shared memory per block without an opt-in attribute


@dataclass(frozen=True)
class MmaConfig:
    bm: int = 128      # rows of x (tokens) per block
    bn: int = 128      # output columns per block
    wm: int = 64       # rows per warp: each B fragment feeds wm / 16 MMAs (dequantization amortised)
    wn: int = 32       # columns per warp
    stages: int = 4    # k-tiles in flight (cp.async)
    min_blocks: int = 1  # __launch_bounds__(threads, min_blocks): ptxas caps registers so that many blocks fit an SM

    @property
    def threads(self) -> int:
        return (self.bm // self.wm) * (self.bn // self.wn) * 32

    def smem(self, bits: int) -> int:
        return self.stages * (self.bm * BK * 2 + self.bn * bits * 4)

    def check(self, bits: int):
        if (self.bm % self.wm or self.bn % self.wn or self.wm % 16 or self.wn % 8 or self.stages < 2
                or self.min_blocks < 1):
            raise ValueError(f"bad MMA GEMM config {self}")
        if self.smem(bits) > SMEM_LIMIT:
            raise ValueError(f"{self} needs {self.smem(bits)} bytes of shared memory (> {SMEM_LIMIT})")


def supports(spec: QuantSpec) -> bool:
    """The checkpoint's words at 4 or 2 bits, K in whole 32-value tiles, groups of whole tiles, N in 64-column
    tiles, one uint8 zero point per group (or symmetric)."""
    return (spec.bits in BITS and spec.layout == "words" and not spec.zeros_packed and spec.k % BK == 0
            and spec.group_len % BK == 0 and spec.n % 64 == 0)


def default_config(spec: QuantSpec) -> MmaConfig:
    """128 x 128 tiles where N allows, 128 x 64 otherwise (SmolLM2's N = 576 / 960)."""
    return MmaConfig() if spec.n % 128 == 0 else MmaConfig(bn=64)


# ------------------------------------------------------------------------------------------------ fragment math
def fragment_fields(bits: int, t: int):
    """For lane quad position t: the two half2 B-fragment registers of one 16-wide k step as
    [(word offset in the step, shift of the first code)]; the pair's second code sits `bits` higher. Values 2t, 2t+1
    (register b0) and 2t + 8, 2t + 9 (b1), LSB-first in words of 32 / bits codes."""
    vpw = 32 // bits
    return [(c // vpw, ((c % vpw) + 2 * t) * bits) for c in (0, 8)]


def _pair_half2(words: np.ndarray, shift: int, bits: int) -> np.ndarray:
    """The kernel's half2 of two codes: `(v & mask) | ((v << (16 - bits)) & (mask << 16)) | 0x64006400`, as two
    fp16 values (1024 + q0, 1024 + q1)."""
    mask = (1 << bits) - 1
    v = (words >> np.uint32(shift)).astype(np.uint32)
    u = (v & np.uint32(mask)) | ((v << np.uint32(16 - bits)) & np.uint32(mask << 16)) | np.uint32(0x64006400)
    return u.astype("<u4").view(np.float16).reshape(*u.shape, 2)


def mma_gemm_np(spec: QuantSpec, x, qweight, scales, zeros=None) -> np.ndarray:
    """NumPy model of the kernel's arithmetic: B fragments built per lane from `fragment_fields` and the 1024-magic
    half2, `(h - (1024 + z)) * s` in fp16, products accumulated in fp32 one 16-wide k step at a time.
    x [M, K] fp16 -> [M, N] fp32."""
    if not supports(spec):
        raise ValueError(f"no tensor-core GEMM for {spec}")
    n, k, bits = spec.n, spec.k, spec.bits
    vpw, g = 32 // bits, spec.group_len
    w = np.zeros((n, k), np.float16)
    qweight = np.asarray(qweight, np.uint32)
    for ks in range(k // 16):
        grp = ks * 16 // g
        s = scales[:, grp].astype(np.float16)[:, None]
        z = (np.full(n, spec.sym_zero) if spec.sym else zeros[:, grp]).astype(np.uint16)
        zz = (z | np.uint16(0x6400)).view(np.float16)[:, None]
        for t in range(4):
            for h, (wo, sh) in enumerate(fragment_fields(bits, t)):
                word = qweight[:, ks * 16 // vpw + wo]
                pair = _pair_half2(word, sh, bits)              # [n, 2] fp16: 1024 + q
                vals = ((pair - zz).astype(np.float16) * s).astype(np.float16)
                w[:, ks * 16 + 8 * h + 2 * t: ks * 16 + 8 * h + 2 * t + 2] = vals
    x32 = np.asarray(x, np.float16).astype(np.float32)
    y = np.zeros((x32.shape[0], n), np.float32)
    for ks in range(k // 16):   # one MMA k step at a time, fp32 accumulator
        y += x32[:, ks * 16:(ks + 1) * 16] @ w[:, ks * 16:(ks + 1) * 16].astype(np.float32).T
    return y


# ------------------------------------------------------------------------------------------------ CUDA source
TEMPLATE = r"""
#ifndef EDGEQUANT_MMA_GEMM
#define EDGEQUANT_MMA_GEMM
// edgequant tvm_schedules/mma_gemm.py: y[m, N] = x[m, K] @ dq(W)^T, W 4/2-bit LSB-first words, fp16 mma.sync.
template <int BITS, int N, int K, int NG, int G, int ZERO, int BM, int BN, int WM, int WN, int STAGES, typename OutT>
__device__ __forceinline__ void eq_mma_gemm(const half* __restrict__ x, const unsigned* __restrict__ qw,
                                            const half* __restrict__ scales, const unsigned char* __restrict__ zeros,
                                            OutT* __restrict__ y, int m, int bm, int bn, int tid) {
  constexpr int BK = 32, VPW = 32 / BITS, WPR = K / VPW, BW = BK / VPW, MASK = (1 << BITS) - 1;
  constexpr int WARPS_N = BN / WN, THREADS = (BM / WM) * WARPS_N * 32, MT = WM / 16, NT = WN / 8, KT = K / BK;
  const int row0 = bm * BM, col0 = bn * BN;
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
  // no m16n8k16 / cp.async before sm_80: a plain loop, one output at a time
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int r = row0 + e / BN, c = col0 + e % BN;
    if (r >= m) continue;
    float acc = 0.f;
    for (int k = 0; k < K; ++k) {
      const int q = (qw[(size_t)c * WPR + k / VPW] >> (k % VPW * BITS)) & MASK;
      const int z = ZERO >= 0 ? ZERO : zeros[c * NG + k / G];
      acc += __half2float(x[(size_t)r * K + k]) * __half2float(__float2half((float)(q - z) * __half2float(scales[c * NG + k / G])));
    }
    y[(size_t)r * N + c] = (OutT)acc;
  }
#else
  __shared__ __align__(128) uint4 sa[STAGES][BM * 4];      // x: BM rows x 4 chunks of 8 halves, swizzled
  __shared__ __align__(128) unsigned sb[STAGES][BN * BW];  // packed weights: BN rows x BW words
  const int lane = tid & 31, warp = tid >> 5, wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int g = lane >> 2, t = lane & 3;

  auto load = [&](int s, int kt) {
#pragma unroll
    for (int i = 0; i < (BM * 4 + THREADS - 1) / THREADS; ++i) {
      const int c = tid + i * THREADS;
      if ((BM * 4) % THREADS == 0 || c < BM * 4) {
        const int r = c >> 2, ch = c & 3, row = row0 + r;
        const half* src = x + (size_t)(row < m ? row : m - 1) * K + kt * BK + ch * 8;
        const unsigned dst = (unsigned)__cvta_generic_to_shared(&sa[s][r * 4 + (ch ^ ((r >> 1) & 3))]);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(row < m ? 16 : 0));
      }
    }
#pragma unroll
    for (int i = 0; i < (BN + THREADS - 1) / THREADS; ++i) {
      const int c = tid + i * THREADS;
      if (BN % THREADS == 0 || c < BN) {
        const unsigned* src = qw + (size_t)(col0 + c) * WPR + kt * BW;
        const unsigned dst = (unsigned)__cvta_generic_to_shared(&sb[s][c * BW]);
        if (BW == 4) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(src));
        else asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" :: "r"(dst), "l"(src));
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load(s, s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  for (int kt = 0; kt < KT; ++kt) {
    // this tile's scales and zero points: issued before the wait, so their latency hides behind it
    const int grp = kt * BK / G;
    half2 ss[NT], zz[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = col0 + wn * WN + j * 8 + g;
      ss[j] = __half2half2(scales[n * NG + grp]);
      const int z = ZERO >= 0 ? ZERO : (int)zeros[n * NG + grp];
      zz[j] = __half2half2(__ushort_as_half((unsigned short)(0x6400 | z)));
    }
    asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));
    __syncthreads();
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load(nk % STAGES, nk);
      asm volatile("cp.async.commit_group;\n" ::);
    }
    const int s = kt % STAGES;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      unsigned a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = wm * WM + i * 16 + (lane & 15), ch = kk * 2 + (lane >> 4);
        const unsigned addr = (unsigned)__cvta_generic_to_shared(&sa[s][r * 4 + (ch ^ ((r >> 1) & 3))]);
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a[i][0]), "=r"(a[i][1]), "=r"(a[i][2]), "=r"(a[i][3]) : "r"(addr));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const unsigned* wr = &sb[s][(wn * WN + j * 8 + g) * BW + kk * (BW / 2)];
        unsigned b[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // fragment_fields: codes 2t + 8h and the next, at word (8h) / VPW, shift ((8h) % VPW + 2t) * BITS
          const unsigned v = wr[(8 * h) / VPW] >> (((8 * h) % VPW + 2 * t) * BITS);
          const unsigned u = (v & MASK) | ((v << (16 - BITS)) & (MASK << 16)) | 0x64006400u;
          const half2 w = __hmul2(__hsub2(*reinterpret_cast<const half2*>(&u), zz[j]), ss[j]);
          b[h] = *reinterpret_cast<const unsigned*>(&w);
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
          asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                       "{%8,%9}, {%0,%1,%2,%3};\n"
                       : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]), "+f"(acc[i][j][3])
                       : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[0]), "r"(b[1]));
      }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int r = row0 + wm * WM + i * 16 + g, c = col0 + wn * WN + j * 8 + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (r + 8 * h < m) {
          OutT* p = y + (size_t)(r + 8 * h) * N + c;
          p[0] = (OutT)acc[i][j][2 * h];
          p[1] = (OutT)acc[i][j][2 * h + 1];
        }
      }
    }
#endif
}
#endif  // EDGEQUANT_MMA_GEMM
"""


def kernel_name(spec: QuantSpec, cfg: MmaConfig, out_dtype: str) -> str:
    z = "s" if spec.sym else "a"
    return (f"eq_mma_w{spec.bits}{z}_n{spec.n}_k{spec.k}_g{spec.group_len}_{config_tag(cfg)}_"
            f"{'f32' if out_dtype == 'float32' else 'f16'}")


def config_tag(cfg: MmaConfig) -> str:
    return f"{cfg.bm}x{cfg.bn}w{cfg.wm}x{cfg.wn}s{cfg.stages}b{cfg.min_blocks}"


def cuda_source(spec: QuantSpec, cfg: MmaConfig, out_dtype: str = "float16") -> tuple[str, str]:
    """(device function name, its CUDA source: the shared template and one instance for this spec)."""
    name = kernel_name(spec, cfg, out_dtype)
    out = "float" if out_dtype == "float32" else "half"
    zero = int(spec.sym_zero) if spec.sym else -1
    zarg = "" if spec.sym else "const unsigned char* __restrict__ zeros, "
    inst = (f"\n__device__ __forceinline__ void {name}(const half* __restrict__ x, const unsigned* __restrict__ qw, "
            f"const half* __restrict__ scales, {zarg}{out}* __restrict__ y, int m, int bm, int bn, int tid) {{\n"
            f"  eq_mma_gemm<{spec.bits}, {spec.n}, {spec.k}, {spec.n_groups}, {spec.group_len}, {zero}, {cfg.bm}, "
            f"{cfg.bn}, {cfg.wm}, {cfg.wn}, {cfg.stages}, {out}>(x, qw, scales, {'nullptr' if spec.sym else 'zeros'}"
            f", y, m, bm, bn, tid);\n}}\n")
    return name, TEMPLATE + inst


def gemm_func(spec: QuantSpec, cfg: MmaConfig | None = None, out_dtype: str = "float16", name: str = "main"):
    """The prim func: x [1, m, K] fp16 (m symbolic), qweight, scales, [zeros], y [1, m, N] `out_dtype`."""
    import tvm
    from tvm.script import tirx as T

    if not supports(spec):
        raise ValueError(f"no tensor-core GEMM for {spec}")
    if out_dtype not in ("float16", "float32"):
        raise ValueError(f"output type {out_dtype!r}: float16 or float32")
    cfg = cfg or default_config(spec)
    cfg.check(spec.bits)
    if spec.n % cfg.bn:
        raise ValueError(f"{cfg.bn}-column tiles do not divide N={spec.n}")
    fname, src = cuda_source(spec, cfg, out_dtype)
    ins = [f'qweight: T.Buffer(({spec.n}, {spec.words}), "uint32")',
           f'scales: T.Buffer(({spec.n}, {spec.n_groups}), "float16")']
    if not spec.sym:
        ins.append(f'zeros: T.Buffer(({spec.n}, {spec.n_groups}), "uint8")')
    ptrs = "x.data, qweight.data, scales.data, " + ("" if spec.sym else "zeros.data, ") + "y.data"
    i64 = "T.int64"
    text = f"""
@T.prim_func
def {name}(var_x: T.handle, {', '.join(ins)}, var_y: T.handle):
    T.func_attr({{"tir.noalias": True, "tirx.is_scheduled": True}})
    m = T.int64()
    x = T.match_buffer(var_x, ({i64}(1), m, {i64}({spec.k})), "float16")
    y = T.match_buffer(var_y, ({i64}(1), m, {i64}({spec.n})), "{out_dtype}")
    for by in T.thread_binding({i64}({spec.n // cfg.bn}), thread="blockIdx.y"):
        for bx in T.thread_binding((m + {i64}({cfg.bm - 1})) // {i64}({cfg.bm}), thread="blockIdx.x"):
            for tx in T.thread_binding({i64}({cfg.threads}), thread="threadIdx.x"):
                with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", {cfg.min_blocks}):
                    T.evaluate(T.cuda.func_call("{fname}", {ptrs}, T.Cast("int32", m), T.Cast("int32", bx),
                                                T.Cast("int32", by), T.Cast("int32", tx), source_code=SRC))
"""
    return tvm.script.from_source(text, extra_vars={"T": T, "SRC": src})
