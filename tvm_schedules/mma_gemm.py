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
  with KSPLIT > 1 ("sliced K", CUTLASS) KSPLIT warps share each sub-tile, each taking its part of every k-tile's MMA
  steps (and dequantizing only the B fragments of those), their fp32 sums added through shared memory at the end:
  more warps per SM where the grid has few blocks (o and down at 256-512 tokens), no second kernel;
- x tiles (BM x BK fp16, BK 32 or 64) and the packed weight tiles (BN rows x BK values) go global -> shared with
  `cp.async`, STAGES tiles in flight; the x tile's 16-byte chunks are XOR-swizzled by row so that `ldmatrix` reads
  them without bank conflicts;
- no fp16 copy of the weights exists anywhere: each thread reads, for its MMA B fragment (row n = lane / 4, values
  k = 2t, 2t+1, 2t+8, 2t+9 of a 16-wide step, t = lane % 4), the packed words of its row from shared memory and
  turns two codes at a time into a half2 in four instructions (`lane_fields`): a byte permute (`prmt`) copies the
  byte holding both codes into bytes 0 and 2, one LOP3 keeps the first code in the low half's mantissa and the second
  in the high half's (at a lane-fixed bit offset) and ORs in the exponent of 1024.0 (`0x6400 | q << o` is exactly
  1024 + q * 2^o in fp16), one half2 FMA `h * 2^-o - (1024 * 2^-o + z)` gives q - z exactly (powers of two scale
  exactly; the result is a small integer) and one half2 multiply by the scale rounds once: the weight is the
  correctly rounded fp16 of (q - z) * s, bit-identical to the dequantize kernel's (`dequant.weight_te`). (Marlin's
  LOP3 trick, without its repacked layout: the byte permute stands in for the interleaving);
- the checkpoint's LSB-first words are used as they are (no repacking): at 4 and 2 bits a thread's pair of codes
  sits in one byte of one word (`lane_fields`).
The NumPy model `mma_gemm_np` follows the same lane fields, fp16 dequantization and per-16-column fp32
accumulation; the CPU tests check it against `dequant.quant_matmul_np`, and `benchmarks/gpu_decode.py run` checks the
compiled kernel against a torch reference on the GPU.

For CUDA archs below sm_80 (no m16n8k16 / cp.async) the same function compiles to a plain loop (correct, slow).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .dequant import QuantSpec

BK = 32                  # the smallest K per pipeline stage: groups (g32 and up) hold whole stages
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
    bk: int = BK       # K per pipeline stage (32 or 64: 64 halves the barriers and waits per K)
    ksplit: int = 1    # warps along K ("sliced K"): each takes bk / 16 / ksplit of a stage's MMA steps of the same
    #                    tile, summed through shared memory at the end: more warps for grids of few blocks

    @property
    def threads(self) -> int:
        return (self.bm // self.wm) * (self.bn // self.wn) * self.ksplit * 32

    def smem(self, bits: int) -> int:
        return max(self.stages * (self.bm * self.bk * 2 + self.bn * bits * self.bk // 8),
                   (self.ksplit - 1) * self.bm * self.bn * 4)   # the slices' fp32 sums reuse the stages

    def check(self, bits: int):
        if (self.bm % self.wm or self.bn % self.wn or self.wm % 16 or self.wn % 8 or self.stages < 2
                or self.min_blocks < 1 or self.bk not in (32, 64) or self.ksplit < 1
                or (self.bk // 16) % self.ksplit):
            raise ValueError(f"bad MMA GEMM config {self}")
        if self.smem(bits) > SMEM_LIMIT:
            raise ValueError(f"{self} needs {self.smem(bits)} bytes of shared memory (> {SMEM_LIMIT})")

    def fits(self, spec: QuantSpec) -> bool:
        """Stages hold whole groups and K holds whole stages."""
        return spec.k % self.bk == 0 and spec.group_len % self.bk == 0


def supports(spec: QuantSpec) -> bool:
    """The checkpoint's words at 4 or 2 bits, K in whole 32-value tiles, groups of whole tiles, N in 64-column
    tiles, one uint8 zero point per group (or symmetric)."""
    return (spec.bits in BITS and spec.layout == "words" and not spec.zeros_packed and spec.k % BK == 0
            and spec.group_len % BK == 0 and spec.n % 64 == 0)


SMALL = MmaConfig(64, 64, 64, 16, 4, 4, 64)              # few tiles: more blocks, weights streamed
MEDIUM = MmaConfig(128, 64, 128, 16, 2, 3, 64)            # 4 warps, each B fragment feeds 8 MMAs
SLICED = MmaConfig(128, 64, 128, 16, 2, 2, 64, 2)         # MEDIUM's tile by 8 warps, 2 along K
LARGE = MmaConfig(128, 128, 128, 16, 2, 2, 64)            # 8 warps, fewer passes over the weights
FEW_TILES = 256     # fewer 128 x 64 tiles than this leave SMs of a 132-SM GPU (H100, H200) with < 2 blocks: 64 x 64
ONE_WAVE = 396      # 128 x 64 tiles of 3 blocks per SM on 132 SMs: below it, with long K, 2 warps along K
LONG_K = 8192       # K from which the sliced tile's final sum through shared memory pays
LARGE_FROM = 1024   # prompt lengths beyond this take 128 x 128 tiles


def _fit(cfg: MmaConfig, spec: QuantSpec) -> MmaConfig:
    """The config, or its 32-wide-stage twin (4 stages) where groups or K do not hold whole 64-wide stages."""
    return cfg if cfg.fits(spec) else replace(cfg, bk=BK, stages=4)


def default_configs(spec: QuantSpec) -> list[tuple[int | None, MmaConfig]]:
    """[(largest m, config)], the last for any m: the kernel the prim func launches for a prompt of m tokens, from the
    H200 sweep (benchmarks/results/gpu-nvidia-h200.md, gpu7 section): 64-wide k-tiles throughout; 64 x 64 tiles while
    128 x 64 tiles would be fewer than FEW_TILES (and up to 64 tokens: 128-row tiles would be mostly padding), then
    128 x 64 (sliced along K while under one wave with long K), 128 x 128 beyond LARGE_FROM tokens (128 x 64 where
    N is not a multiple of 128). On the LLaMA-7B shapes, W4 g128 and W2 g64 at 128-2048 tokens, each pick is the
    sweep's best or within 4% of it, and all linears of a prefill within 1.6% of the best config per linear."""
    rows = -(-FEW_TILES * 64 // spec.n)                  # 128-row tiles needed for FEW_TILES tiles of 64 columns
    tiers = [(max(64, 128 * (rows - 1)), SMALL)]
    if spec.k >= LONG_K:
        tiers.append((128 * ((ONE_WAVE - 1) // (spec.n // 64)), SLICED))
    tiers += [(LARGE_FROM, MEDIUM), (None, LARGE if spec.n % LARGE.bn == 0 else MEDIUM)]
    out = []
    for top, cfg in tiers:   # a tier that ends where an earlier one did is empty
        if top is None or not out or top > out[-1][0]:
            out.append((top, _fit(cfg, spec)))
    # one launch per distinct kernel: a tier that repeats the next one's config merges into it
    return [t for i, t in enumerate(out) if i + 1 == len(out) or t[1] != out[i + 1][1]]


def default_config(spec: QuantSpec, m: int = 512) -> MmaConfig:
    """The config `default_configs` picks for a prompt of m tokens."""
    return next(c for top, c in default_configs(spec) if top is None or m <= top)


# ------------------------------------------------------------------------------------------------ fragment math
def fragment_fields(bits: int, t: int):
    """For lane quad position t: the two half2 B-fragment registers of one 16-wide k step as
    [(word offset in the step, shift of the first code)]; the pair's second code sits `bits` higher. Values 2t, 2t+1
    (register b0) and 2t + 8, 2t + 9 (b1), LSB-first in words of 32 / bits codes."""
    vpw = 32 // bits
    return [(c // vpw, ((c % vpw) + 2 * t) * bits) for c in (0, 8)]


def lane_fields(bits: int, t: int):
    """How lane quad position t builds its two half2 registers of a 16-wide k step: ([(word offset in the step, byte
    holding the pair)] for b0, b1; the LOP3 mask applied after the byte is copied into bytes 0 and 2; the FMA's
    multipliers (2^-o for the low and the high half)). The pair's codes sit at bit offsets o_lo, o_hi of the
    mantissas (4 bits: 0 and 4; 2 bits: 0 and 2, or 4 and 6 for odd t)."""
    fields = fragment_fields(bits, t)
    if any(sh % 8 + 2 * bits > 8 for _, sh in fields):
        raise ValueError(f"{bits}-bit pairs straddle bytes")
    o = fields[0][1] % 8                       # the same for b0 and b1 (their shifts differ by whole bytes)
    mask = ((1 << bits) - 1) << o | ((1 << bits) - 1) << (16 + o + bits)
    return [(wo, sh // 8) for wo, sh in fields], mask, (2.0 ** -o, 2.0 ** -(o + bits))


def x_chunk(bk: int, r: int, ch: int) -> int:
    """Where 16-byte chunk `ch` of row r of an x stage sits in that row (the kernel's `swz`): XOR-swizzled by
    (r / 2) % 4 in 64-byte rows (bk 32), by r % 8 in 128-byte rows (bk 64)."""
    return ch ^ ((r >> 1) & 3 if bk == 32 else r & 7)


def warp_steps(cfg: MmaConfig, wk: int) -> list[int]:
    """The 16-wide MMA steps of a stage that warp slice wk takes (the kernel's `wk * KW + kk`); its packed words are
    those of these steps, `wk * OWN` on in the row."""
    kw = cfg.bk // 16 // cfg.ksplit
    return [wk * kw + kk for kk in range(kw)]


def _pair_half2(words: np.ndarray, byte: int, mask: int) -> np.ndarray:
    """The kernel's half2 of two codes: `(prmt(w, 0, byte in bytes 0 and 2) & mask) | 0x64006400`, as two fp16
    values (1024 + q0 * 2^o_lo, 1024 + q1 * 2^o_hi)."""
    r = ((words >> np.uint32(8 * byte)) & np.uint32(0xFF)).astype(np.uint32) * np.uint32(0x00010001)
    u = (r & np.uint32(mask)) | np.uint32(0x64006400)
    return u.astype("<u4").view(np.float16).reshape(*u.shape, 2)


def mma_gemm_np(spec: QuantSpec, x, qweight, scales, zeros=None) -> np.ndarray:
    """NumPy model of the kernel's arithmetic: B fragments built per lane from `lane_fields` and the 1024-magic
    half2, `(h * 2^-o - (1024 * 2^-o + z)) * s` in fp16, products accumulated in fp32 one 16-wide k step at a time.
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
        z = (np.full(n, spec.sym_zero) if spec.sym else zeros[:, grp]).astype(np.float32)
        for t in range(4):
            fields, mask, mul = lane_fields(bits, t)
            mul = np.array(mul, np.float32)
            add = -(1024 * mul[None, :] + z[:, None])           # exact small numbers, as the kernel's half2
            for h, (wo, byte) in enumerate(fields):
                word = qweight[:, ks * 16 // vpw + wo]
                pair = _pair_half2(word, byte, mask).astype(np.float32)       # [n, 2]: 1024 + q * 2^o
                qz = (pair * mul + add).astype(np.float16)   # the half2 FMA: q - z, exact
                w[:, ks * 16 + 8 * h + 2 * t: ks * 16 + 8 * h + 2 * t + 2] = (qz * s).astype(np.float16)
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
template <int BITS, int N, int K, int NG, int G, int ZERO, int BM, int BN, int WM, int WN, int STAGES, int BK,
          int KSPLIT, typename OutT>
__device__ __forceinline__ void eq_mma_gemm(const half* __restrict__ x, const unsigned* __restrict__ qw,
                                            const half* __restrict__ scales, const unsigned char* __restrict__ zeros,
                                            OutT* __restrict__ y, int m, int bm, int bn, int tid) {
  constexpr int VPW = 32 / BITS, WPR = K / VPW, BW = BK / VPW, MASK = (1 << BITS) - 1;
  constexpr int WARPS_N = BN / WN, WARPS_MN = (BM / WM) * WARPS_N, THREADS = WARPS_MN * KSPLIT * 32;
  constexpr int MT = WM / 16, NT = WN / 8, KT = K / BK;
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
      const float w = __half2float(__float2half((float)(q - z) * __half2float(scales[c * NG + k / G])));
      acc += __half2float(x[(size_t)r * K + k]) * w;
    }
    y[(size_t)r * N + c] = (OutT)acc;
  }
#else
  // x: BM rows x CH chunks of 8 halves, the chunk index XOR-swizzled by row (4 chunks: by (row / 2) % 4, two rows
  // share a 128-byte line; 8 chunks: by row % 8) so that ldmatrix's 8 rows hit 8 different bank groups
  constexpr int CH = BK / 8, KS = BK / 16, KW = KS / KSPLIT;   // KW: the MMA steps of a stage one warp takes
  // packed weights: BN rows x BW words, copied in pieces of BCB bytes (16, or 8 for 2-bit 32-wide stages)
  constexpr int BCB = BW >= 4 ? 16 : 8, BCR = BW * 4 / BCB;
  constexpr int ACH = (BM * CH + THREADS - 1) / THREADS, BCH = (BN * BCR + THREADS - 1) / THREADS;
  constexpr unsigned SA_STAGE = BM * CH * 16, SB_STAGE = BN * BW * 4, STAGE_BYTES = STAGES * (SA_STAGE + SB_STAGE);
  constexpr unsigned RED_BYTES = (KSPLIT - 1) * BM * BN * 4;   // the K slices' partial sums, after the main loop
  __shared__ __align__(128) unsigned char smem[STAGE_BYTES > RED_BYTES ? STAGE_BYTES : RED_BYTES];
  const unsigned* sb = reinterpret_cast<const unsigned*>(smem + STAGES * SA_STAGE);
  auto swz = [](int r) { return CH == 4 ? (r >> 1) & 3 : r & 7; };
  const int lane = tid & 31, warp = tid >> 5, wk = warp / WARPS_MN, wmn = warp % WARPS_MN;
  const int wm = wmn / WARPS_N, wn = wmn % WARPS_N;
  const int g = lane >> 2, t = lane & 3;
  const unsigned sa0 = (unsigned)__cvta_generic_to_shared(smem);
  const unsigned sb0 = sa0 + STAGES * SA_STAGE;

  // the copies' addresses, fixed per thread: a k-tile only adds kt * BK to the sources and a stage offset to the
  // destinations (row m - 1 stands in for rows past the prompt, whose bytes are zero-filled)
  const half* a_src[ACH];
  unsigned a_dst[ACH], a_len[ACH];
#pragma unroll
  for (int i = 0; i < ACH; ++i) {
    const int c = min(tid + i * THREADS, BM * CH - 1), r = c / CH, ch = c % CH, row = row0 + r;
    a_src[i] = x + (size_t)(row < m ? row : m - 1) * K + ch * 8;
    a_dst[i] = sa0 + (unsigned)(r * CH + (ch ^ swz(r))) * 16;
    a_len[i] = row < m ? 16 : 0;
  }
  const unsigned* b_src[BCH];
  unsigned b_dst[BCH];
#pragma unroll
  for (int i = 0; i < BCH; ++i) {
    const int c = min(tid + i * THREADS, BN * BCR - 1), r = c / BCR, part = c % BCR;
    b_src[i] = qw + (size_t)(col0 + r) * WPR + part * (BCB / 4);
    b_dst[i] = sb0 + (unsigned)(r * BW + part * (BCB / 4)) * 4;
  }

  auto load = [&](int s, int kt) {
#pragma unroll
    for (int i = 0; i < ACH; ++i)
      if ((BM * CH) % THREADS == 0 || tid + i * THREADS < BM * CH)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(a_dst[i] + s * SA_STAGE), "l"(a_src[i] + kt * BK), "r"(a_len[i]));
#pragma unroll
    for (int i = 0; i < BCH; ++i)
      if ((BN * BCR) % THREADS == 0 || tid + i * THREADS < BN * BCR) {
        const unsigned dst = b_dst[i] + s * SB_STAGE;
        if (BCB == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(dst), "l"(b_src[i] + kt * BW));
        else asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" :: "r"(dst), "l"(b_src[i] + kt * BW));
      }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // ldmatrix rows of this lane: r = wm * WM + i * 16 + lane % 16, chunk kk * 2 + lane / 16, swizzled by swz(r),
  // which i does not change
  const int ar = wm * WM + (lane & 15);
  unsigned a_off[KW];   // this warp's steps of a stage: wk * KW + kk
#pragma unroll
  for (int kk = 0; kk < KW; ++kk)
    a_off[kk] = (unsigned)(ar * CH + ((2 * (wk * KW + kk) + (lane >> 4)) ^ swz(ar))) * 16;
  const int b_row = wn * WN + g;                                   // + j * 8
  // lane_fields: the byte holding this lane's pair of codes (b0, b1) copied into bytes 0 and 2 (prmt selectors), the
  // mask keeping the low half's code at bit o and the high half's at bit 16 + o + BITS, the FMA's 2^-o multipliers
  const int o = BITS == 4 ? 0 : 4 * (t & 1);
  const unsigned psel0 = 0x4040u | (unsigned)(BITS == 4 ? t : t >> 1) * 0x0101u;
  const unsigned psel1 = 0x4040u | (unsigned)(BITS == 4 ? t : 2 + (t >> 1)) * 0x0101u;
  const unsigned pmask = ((unsigned)MASK << o) | ((unsigned)MASK << (16 + o + BITS));
  const float mlo = 1.f / (float)(1 << o), mhi = 1.f / (float)(1 << (o + BITS));
  const half2 pmul = __floats2half2_rn(mlo, mhi);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load(s, s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  half2 ss[NT], zz[NT];
  for (int kt = 0; kt < KT; ++kt) {
    // scales and zero points when a group starts (every G / BK tiles): issued before the wait, so their latency
    // hides behind it
    if (kt % (G / BK) == 0) {
      const int grp = kt * BK / G;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = col0 + b_row + j * 8;
        ss[j] = __half2half2(scales[n * NG + grp]);
        const float z = (float)(ZERO >= 0 ? ZERO : (int)zeros[n * NG + grp]);
        zz[j] = __floats2half2_rn(-(1024.f * mlo + z), -(1024.f * mhi + z));   // small integers: exact
      }
    }
    asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));
    __syncthreads();
    {
      const int nk = kt + STAGES - 1;
      if (nk < KT) load(nk % STAGES, nk);
      asm volatile("cp.async.commit_group;\n" ::);
    }
    const int s = kt % STAGES;
    // the packed words of this warp's steps of the k-tile in this lane's rows: 16-, 8- or 4-byte shared loads
    constexpr int WS = 16 / VPW, OWN = KW * WS;   // words per MMA step, per warp and stage
    unsigned wv[NT][OWN];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const unsigned* wr = sb + s * (BN * BW) + (b_row + j * 8) * BW + wk * OWN;
      if (OWN % 4 == 0) {
#pragma unroll
        for (int q = 0; q < OWN / 4; ++q) {
          const uint4 v = reinterpret_cast<const uint4*>(wr)[q];
          wv[j][4 * q] = v.x; wv[j][4 * q + 1 < OWN ? 4 * q + 1 : 0] = v.y;
          wv[j][4 * q + 2 < OWN ? 4 * q + 2 : 0] = v.z; wv[j][4 * q + 3 < OWN ? 4 * q + 3 : 0] = v.w;
        }
      } else if (OWN % 2 == 0) {
        const uint2 v = *reinterpret_cast<const uint2*>(wr);
        wv[j][0] = v.x; wv[j][OWN > 1 ? 1 : 0] = v.y;
      } else {
        wv[j][0] = wr[0];
      }
    }
    // every B fragment of the k-tile first: NT x KW x 2 independent dequantization chains for the scheduler to
    // overlap, each prmt -> lop3 -> hfma2 -> hmul2 (lane_fields)
    unsigned b[NT][KW][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int kk = 0; kk < KW; ++kk)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // codes 2t + 8h and the next of step kk: word kk * WS + 8h / VPW of the warp's words, one byte of it
          const unsigned v = __byte_perm(wv[j][kk * WS + (8 * h) / VPW], 0u, h ? psel1 : psel0);
          const unsigned u = (v & pmask) | 0x64006400u;
          const half2 w = __hmul2(__hfma2(*reinterpret_cast<const half2*>(&u), pmul, zz[j]), ss[j]);
          b[j][kk][h] = *reinterpret_cast<const unsigned*>(&w);
        }
    const unsigned a_stage = sa0 + s * SA_STAGE;
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
      unsigned a[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const unsigned addr = a_stage + a_off[kk] + i * 16 * CH * 16;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a[i][0]), "=r"(a[i][1]), "=r"(a[i][2]), "=r"(a[i][3]) : "r"(addr));
      }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < MT; ++i)
          asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                       "{%8,%9}, {%0,%1,%2,%3};\n"
                       : "+f"(acc[i][j][0]), "+f"(acc[i][j][1]), "+f"(acc[i][j][2]), "+f"(acc[i][j][3])
                       : "r"(a[i][0]), "r"(a[i][1]), "r"(a[i][2]), "r"(a[i][3]), "r"(b[j][kk][0]), "r"(b[j][kk][1]));
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  if (KSPLIT > 1) {
    // slices 1.. leave their sums in shared memory (element-major: lanes write consecutive words), slice 0 adds them
    // and stores the tile
    constexpr int E = MT * NT * 4;
    float* red = reinterpret_cast<float*>(smem);
    __syncthreads();   // every warp is done with the stages
    if (wk > 0) {
      float* dst = red + ((wk - 1) * WARPS_MN + wmn) * E * 32 + lane;
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) dst[((i * NT + j) * 4 + e) * 32] = acc[i][j][e];
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int sl = 1; sl < KSPLIT; ++sl) {
      const float* src = red + ((sl - 1) * WARPS_MN + wmn) * E * 32 + lane;
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] += src[((i * NT + j) * 4 + e) * 32];
    }
  }
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
    return (f"{cfg.bm}x{cfg.bn}w{cfg.wm}x{cfg.wn}s{cfg.stages}b{cfg.min_blocks}"
            + ("" if cfg.bk == BK else f"k{cfg.bk}") + ("" if cfg.ksplit == 1 else f"x{cfg.ksplit}"))


def cuda_source(spec: QuantSpec, cfg: MmaConfig, out_dtype: str = "float16") -> tuple[str, str]:
    """(device function name, its CUDA source: the shared template and one instance for this spec)."""
    name = kernel_name(spec, cfg, out_dtype)
    out = "float" if out_dtype == "float32" else "half"
    zero = int(spec.sym_zero) if spec.sym else -1
    zarg = "" if spec.sym else "const unsigned char* __restrict__ zeros, "
    inst = (f"\n__device__ __forceinline__ void {name}(const half* __restrict__ x, const unsigned* __restrict__ qw, "
            f"const half* __restrict__ scales, {zarg}{out}* __restrict__ y, int m, int bm, int bn, int tid) {{\n"
            f"  eq_mma_gemm<{spec.bits}, {spec.n}, {spec.k}, {spec.n_groups}, {spec.group_len}, {zero}, {cfg.bm}, "
            f"{cfg.bn}, {cfg.wm}, {cfg.wn}, {cfg.stages}, {cfg.bk}, {cfg.ksplit}, {out}>(x, qw, scales, "
            f"{'nullptr' if spec.sym else 'zeros'}, y, m, bm, bn, tid);\n}}\n")
    return name, TEMPLATE + inst


def gemm_func(spec: QuantSpec, cfg: MmaConfig | None = None, out_dtype: str = "float16", name: str = "main"):
    """The prim func: x [1, m, K] fp16 (m symbolic), qweight, scales, [zeros], y [1, m, N] `out_dtype`. With `cfg`
    None it launches the kernel `default_configs` picks for m (a host-side branch on m), else the one of `cfg`."""
    import tvm
    from tvm.script import tirx as T

    if not supports(spec):
        raise ValueError(f"no tensor-core GEMM for {spec}")
    if out_dtype not in ("float16", "float32"):
        raise ValueError(f"output type {out_dtype!r}: float16 or float32")
    tiers = [(None, cfg)] if cfg is not None else default_configs(spec)
    for _, c in tiers:
        c.check(spec.bits)
        if not c.fits(spec):
            raise ValueError(f"{c.bk}-wide stages do not divide K={spec.k} into whole groups of {spec.group_len}")
        if spec.n % c.bn:
            raise ValueError(f"{c.bn}-column tiles do not divide N={spec.n}")
    ins = [f'qweight: T.Buffer(({spec.n}, {spec.words}), "uint32")',
           f'scales: T.Buffer(({spec.n}, {spec.n_groups}), "float16")']
    if not spec.sym:
        ins.append(f'zeros: T.Buffer(({spec.n}, {spec.n_groups}), "uint8")')
    ptrs = "x.data, qweight.data, scales.data, " + ("" if spec.sym else "zeros.data, ") + "y.data"
    i64 = "T.int64"
    srcs = {}

    def launch(c: MmaConfig, ind: str) -> list[str]:
        fname, srcs[f"SRC{len(srcs)}"] = cuda_source(spec, c, out_dtype)
        return [f'{ind}for by in T.thread_binding({i64}({spec.n // c.bn}), thread="blockIdx.y"):',
                f'{ind}    for bx in T.thread_binding((m + {i64}({c.bm - 1})) // {i64}({c.bm}), thread="blockIdx.x"):',
                f'{ind}        for tx in T.thread_binding({i64}({c.threads}), thread="threadIdx.x"):',
                f'{ind}            with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", {c.min_blocks}):',
                f'{ind}                T.evaluate(T.cuda.func_call("{fname}", {ptrs}, T.Cast("int32", m), '
                f'T.Cast("int32", bx), T.Cast("int32", by), T.Cast("int32", tx), source_code=SRC{len(srcs) - 1}))']

    lines = ["@T.prim_func", f"def {name}(var_x: T.handle, {', '.join(ins)}, var_y: T.handle):",
             # op_pattern 8 (opaque): relax's FuseOps must not fuse neighbours into a kernel it cannot see into
             '    T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})', "    m = T.int64()",
             f'    x = T.match_buffer(var_x, ({i64}(1), m, {i64}({spec.k})), "float16")',
             f'    y = T.match_buffer(var_y, ({i64}(1), m, {i64}({spec.n})), "{out_dtype}")']
    ind = "    "
    for i, (top, c) in enumerate(tiers):
        if top is None:
            lines += launch(c, ind)
        else:
            lines += [f"{ind}if m <= {i64}({top}):"] + launch(c, ind + "    ") + [f"{ind}else:"]
            ind += "    "
    return tvm.script.from_source("\n".join(lines) + "\n", extra_vars={"T": T, **srcs})
