"""Per-linear decode GEMVs that stream their weights before the dependency is met: a measured prototype (hand-written
CUDA, not the export's TIR) of the LLaMA-7B W4 g128 decode step as 128 launches, each a one-wave grid of one block per
SM with a producer warp that moves the block's rows into a ring of shared-memory slots by bulk copies (TMA,
`cp.async.bulk`) from the block's first instruction, and consumer warps that wait for the previous kernel
(`griddepcontrol.wait`) and then multiply the slots as they fill. Every block triggers its dependents at its start,
and a block takes just under half an SM's shared memory, so the next linear's blocks are resident beside the running
ones and their producers fill their rings while this linear computes and while the launch dependency resolves: the
DRAM need not idle at a kernel boundary. (The 128-launch kernels of the export start their loads only when their
blocks become resident, as the previous kernel's blocks leave; `gpu_decode.py` measures ~2.3 us per kernel over its
bytes. The persistent prototype, `gpu_persistent.py`, showed the ring alone at 98% of the roofline but consumers
too slow to absorb the waits.)

Consumers here are built to be several times faster than the DRAM: a lane owns one group of 128 weights of K per pass
(its 128 int8 activations stay in registers), a row costs it four 16-byte shared loads, 16 x (LOP3, SHF, LOP3, two
dp4a) and one scale-and-zero FMA per group, and a warp owns whole rows (one warp reduction per row, no cross-warp
sums). Row layout (a possible export repacking; the checkpoint format does not change): per row, per pass p of 32
groups, per piece c of 32 values, per lane L (group 32 p + L): 16 bytes, in word q byte b the low nibble element
8 q + b and the high nibble 8 q + 4 + b of the piece; then the row's (scale, zero) half2 per group; rows padded to 16
bytes. Activations: the fp16 vector rounded to int8 per 32 values by each block after its wait (as the export's int8
GEMVs).

    python benchmarks/gpu_ring.py build [--out .device/ring]                     # here (nvcc)
    python3 benchmarks/gpu_ring.py run [--out .device/ring] [--save DIR]        # on the GPU machine

`run` checks every variant's last layer against a torch dequantize reference, times the step (one CUDA graph, PDL
launches), and prints it against the roofline (as gpu_decode.py: the faster of a streaming read and a copy, same run)
and torch's int4 step.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tvm_schedules import ring_gemv as rg  # noqa: E402  (NumPy only: the device has no TVM)
from gpu_decode import (LAYERS, READ_BW_CU, SHAPES, Driver, _LaunchAttr, _LaunchConfig, _timed,  # noqa: E402
                        copy_bandwidth, read_bandwidth, torch_int4_step)

GROUP = 128
# per K: rows per slot, slots per consumer warp, consumer warps (+ one producer warp); the ring holds warps x depth
# slots, ~100 KB, so that two blocks fit an SM
RING = {4096: (2, 3, 8), 11008: (1, 2, 8)}
# (name, #defines): what each build measures
BIG = {4096: (2, 6, 8), 11008: (1, 4, 8)}   # ~200 KB: one block per SM, nothing co-resident
VARIANTS = {   # "pre": quarters of the ring filled before the wait, per linear (qkv, o, gate_up, down)
    "W4 ring 4,4,2,2, two-chain dot": {"pre": [4, 4, 2, 2], "FASTDOT": 1},
    "W4 ring, PDL through the CUDA runtime's device calls": {"pre": [4, 4, 2, 2], "FASTDOT": 1, "RT_PDL": 1},
    "W4 TIR ring, dp4a.u32.s32 (high nibbles in place)": {"tir": True, "inplace": True},
    "W4 TIR ring, PDL calls as inline griddepcontrol": {"tir": True, "inplace": True, "asm_pdl": True},
}

KERNEL_CU = r"""
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  asm volatile("{\n .reg .pred P1;\nLAB_WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1, 10000000;\n"
               " @P1 bra DONE;\n bra LAB_WAIT;\nDONE:\n}" :: "r"(smem(b)), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, unsigned bytes, uint64_t* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem(dst)), "l"(src), "r"(bytes), "r"(smem(b)) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(src), "r"(bytes) : "memory");
}
template <int W> __device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "r"(W * 32) : "memory"); }
#if RT_PDL
__device__ __forceinline__ void pdl_wait() { cudaGridDependencySynchronize(); }
#else
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#endif
__device__ __forceinline__ unsigned long long now() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
#if RT_PDL
__device__ __forceinline__ void pdl_trigger() { cudaTriggerProgrammaticLaunchCompletion(); }
#else
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#endif

__device__ __forceinline__ int dot_word(unsigned w, unsigned xlo, unsigned xhi, int a) {
  a = __dp4a((int)(w & 0x0F0F0F0Fu), (int)xlo, a);
  return __dp4a((int)((w >> 4) & 0x0F0F0F0Fu), (int)xhi, a);
}
__device__ __forceinline__ int dot32(uint4 w, uint4 x0, uint4 x1) {
  int a = dot_word(w.x, x0.x, x0.y, 0);
  a = dot_word(w.y, x0.z, x0.w, a);
  a = dot_word(w.z, x1.x, x1.y, a);
  return dot_word(w.w, x1.z, x1.w, a);
}

// dp4a of unsigned bytes (codes) and signed bytes (activations)
__device__ __forceinline__ int dp4a_us(unsigned a, unsigned b, int c) {
  int d; asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
// dot32 with two independent chains: the low nibbles as they are, the high ones left in place (x 16), then summed
__device__ __forceinline__ int dot32_fast(uint4 w, uint4 x0, uint4 x1) {
  int lo = dp4a_us(w.x & 0x0F0F0F0Fu, x0.x, 0), hi = dp4a_us(w.x & 0xF0F0F0F0u, x0.y, 0);
  lo = dp4a_us(w.y & 0x0F0F0F0Fu, x0.z, lo); hi = dp4a_us(w.y & 0xF0F0F0F0u, x0.w, hi);
  lo = dp4a_us(w.z & 0x0F0F0F0Fu, x1.x, lo); hi = dp4a_us(w.z & 0xF0F0F0F0u, x1.y, hi);
  lo = dp4a_us(w.w & 0x0F0F0F0Fu, x1.z, lo); hi = dp4a_us(w.w & 0xF0F0F0F0u, x1.w, hi);
  return lo + (hi >> 4);
}

// v[R] per lane -> lane holds the sum over all 32 lanes of row (lane / (32 / R)) (transposed butterfly)
template <int N, int OFF, int R> __device__ __forceinline__ void fold(float (&v)[R], int lane) {
  if constexpr (N > 1) {
    const bool hi = lane & OFF;
    #pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      float send = hi ? v[i] : v[i + N / 2];
      float keep = hi ? v[i + N / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
    fold<N / 2, OFF / 2>(v, lane);
  }
}
template <int R> __device__ __forceinline__ float reduce_rows(float (&v)[R], int lane) {
  fold<R, 16>(v, lane);
  float s = v[0];
  #pragma unroll
  for (int off = 32 / R / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// a lane's 128 activations of group g: eight uint4 of int8 in smem at xq[(p * 8 + c) * 32 + lane] (conflict-free)
template <int P> __device__ __forceinline__ void load_x(uint4 (&xv)[8], const uint4* xq, int p, int lane) {
  #pragma unroll
  for (int c = 0; c < 8; ++c) xv[c] = xq[(p * 8 + c) * 32 + lane];
}

// the row layout: a lane slot is 128 values of K (4-bit: one group of 128, 2-bit: two groups of 64)
template <int K> struct Lay {
  static constexpr int GS = BITS == 4 ? 128 : 64, G = K / GS, NS = K / 128, P = (NS + 31) / 32;
  static constexpr int CB = K * BITS / 8, ROWB = (CB + 4 * G + 15) / 16 * 16, PASSB = 32 * 128 * BITS / 8;
};

// 2-bit: the codes of one word (16 values, code j of byte b = element 4 j + b) kept in place (x 4^j) against the
// x word per j, four chains; the 32-value block = two words
__device__ __forceinline__ int dot32_2b(unsigned w0, unsigned w1, uint4 x0, uint4 x1) {
  int a0 = dp4a_us(w0 & 0x03030303u, x0.x, 0), a1 = dp4a_us(w0 & 0x0C0C0C0Cu, x0.y, 0);
  int a2 = dp4a_us(w0 & 0x30303030u, x0.z, 0), a3 = dp4a_us(w0 & 0xC0C0C0C0u, x0.w, 0);
  a0 = dp4a_us(w1 & 0x03030303u, x1.x, a0); a1 = dp4a_us(w1 & 0x0C0C0C0Cu, x1.y, a1);
  a2 = dp4a_us(w1 & 0x30303030u, x1.z, a2); a3 = dp4a_us(w1 & 0xC0C0C0C0u, x1.w, a3);
  return a0 + (a1 >> 2) + (a2 >> 4) + (a3 >> 6);
}

// 2-bit rows (<= RS) of a slot: this lane's two groups of 64 of pass p
template <int K, int RS> __device__ __forceinline__ void slot_pass2(const unsigned char* slot, int rows, int p,
                                                                   const uint4 (&xv)[8], float4 s4, float2 xs2,
                                                                   int lane, float (&acc)[RS]) {
  using L = Lay<K>;
  const int lp = min(32, L::NS - 32 * p), ls = 32 * p + lane;
  #pragma unroll
  for (int i = 0; i < RS; ++i) {
    if (i < rows) {
      const unsigned char* rb = slot + i * L::ROWB + p * L::PASSB + lane * 16;
      const uint4 w0 = *reinterpret_cast<const uint4*>(rb), w1 = *reinterpret_cast<const uint4*>(rb + lp * 16);
      const uint2 szw = reinterpret_cast<const uint2*>(slot + i * L::ROWB + L::CB)[ls];
      const float2 sz0 = __half22float2(*reinterpret_cast<const half2*>(&szw.x));
      const float2 sz1 = __half22float2(*reinterpret_cast<const half2*>(&szw.y));
      const int d0 = dot32_2b(w0.x, w0.y, xv[0], xv[1]), d1 = dot32_2b(w0.z, w0.w, xv[2], xv[3]);
      const int d2 = dot32_2b(w1.x, w1.y, xv[4], xv[5]), d3 = dot32_2b(w1.z, w1.w, xv[6], xv[7]);
      const float f0 = fmaf(s4.y, (float)d1, s4.x * (float)d0), f1 = fmaf(s4.w, (float)d3, s4.z * (float)d2);
      acc[i] = fmaf(sz1.x, fmaf(-sz1.y, xs2.y, f1), fmaf(sz0.x, fmaf(-sz0.y, xs2.x, f0), acc[i]));
    }
  }
}

// rows (<= RS) of a slot: this lane's group of pass p, accumulated into acc[i]
template <int K, int RS> __device__ __forceinline__ void slot_pass(const unsigned char* slot, int rows, int p,
                                                                  const uint4 (&xv)[8], float4 s4, float xsm,
                                                                  int lane, float (&acc)[RS]) {
  constexpr int G = K / 128, ROWB = (K / 2 + 4 * G + 15) / 16 * 16;
  const int lp = min(32, G - 32 * p), g = 32 * p + lane;
  #pragma unroll
  for (int i = 0; i < RS; ++i) {
    if (i < rows) {
      const unsigned char* rb = slot + i * ROWB + p * 2048 + lane * 16;
      uint4 w[4];
      #pragma unroll
      for (int c = 0; c < 4; ++c) w[c] = *reinterpret_cast<const uint4*>(rb + c * lp * 16);
      const float2 sz = __half22float2(reinterpret_cast<const half2*>(slot + i * ROWB + K / 2)[g]);
      float f;
      if (FASTDOT) {
        const int d0 = dot32_fast(w[0], xv[0], xv[1]), d1 = dot32_fast(w[1], xv[2], xv[3]);
        const int d2 = dot32_fast(w[2], xv[4], xv[5]), d3 = dot32_fast(w[3], xv[6], xv[7]);
        f = fmaf(s4.w, (float)d3, fmaf(s4.z, (float)d2, fmaf(s4.y, (float)d1, s4.x * (float)d0)));
      } else {
        f = s4.x * (float)dot32(w[0], xv[0], xv[1]);
        f = fmaf(s4.y, (float)dot32(w[1], xv[2], xv[3]), f);
        f = fmaf(s4.z, (float)dot32(w[2], xv[4], xv[5]), f);
        f = fmaf(s4.w, (float)dot32(w[3], xv[6], xv[7]), f);
      }
      acc[i] = fmaf(sz.x, fmaf(-sz.y, xsm, f), acc[i]);
    }
  }
}

template <int K, int RS, int D, int WARPS>
__device__ __forceinline__ void ring_gemv(const unsigned char* __restrict__ wts, int n, const half* __restrict__ x,
                                          half* __restrict__ y, unsigned long long* trace, const uint4* __restrict__ xpre,
                                          const unsigned char* next_w, int next_n, int next_rowb, unsigned* ctr,
                                          int pre) {
  using L = Lay<K>;
  constexpr int G = L::NS, P = L::P, ROWB = L::ROWB, SLOTB = RS * ROWB;   // G: lane slots of 128 values
  constexpr int S = WARPS * D;
  const int PREK = pre >= 0 ? pre : K == 4096 ? PRE4096 : PRE11008;   // quarters of the ring before the wait
  extern __shared__ __align__(128) unsigned char sm[];
  unsigned char* slots = sm;
  uint4* xq = reinterpret_cast<uint4*>(sm + S * SLOTB);     // [P][8][32] uint4: int8 activations, per lane
  float4* xs4 = reinterpret_cast<float4*>(xq + P * 8 * 32);  // [P * 32]: per group, the scales of its 4 blocks
  float* xsb = reinterpret_cast<float*>(xs4 + P * 32);       // [P * 128]: per block of 32, scale x sum of codes
  float* xsum = xsb + P * 128;                               // [P * 32]: per group, the sum of its activations
  float2* xsum2 = reinterpret_cast<float2*>(xsum + P * 32);  // [P * 32]: per lane slot, its two 64-sums
  uint64_t* full = reinterpret_cast<uint64_t*>(xsum2 + P * 32);
  uint64_t* empty = full + S;
  int* rowidx = reinterpret_cast<int*>(empty + S);            // [S] (DYN): the tile each slot holds, -1: stop
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int lo = (int)((long long)n * blockIdx.x / gridDim.x), hi = (int)((long long)n * (blockIdx.x + 1) / gridDim.x);
  const int T = (hi - lo + RS - 1) / RS;
  unsigned long long* tr = trace ? trace + 6 * blockIdx.x : nullptr;   // start, after the wait, after x, end, SM
  if (tr && tid == 0) { tr[0] = now(); unsigned sm_id; asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_id)); tr[4] = sm_id; }
  if (tid == 0) {
    for (int i = 0; i < S; ++i) { mbar_init(full + i, 1); mbar_init(empty + i, 1); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (!TRIGGER_LAST) pdl_trigger();
  if (warp == WARPS) {                      // the producer: this block's rows, in order, into the ring
    if (PRODUCER_WAITS) pdl_wait();
    if (DYN && lane == 0) {     // tiles of CH slots from a counter: whoever streams faster takes more
      const int NT = (n + RS - 1) / RS;
      int t = 0, grab = (int)atomicAdd(ctr, (unsigned)CH);
      while (grab < NT) {
        const int nxt = (int)atomicAdd(ctr, (unsigned)CH);   // the next grab's round trip behind these copies
        for (int c = 0; c < CH && grab + c < NT; ++c, ++t) {
          const int s = t % S, tile = grab + c;
          if (t == PREK * S / 4) pdl_wait();
          if (t >= S) mbar_wait(empty + s, ((t / S) - 1) & 1);
          rowidx[s] = tile;
          const unsigned bytes = (unsigned)(min(RS, n - tile * RS) * ROWB);
          mbar_expect(full + s, bytes);
          bulk_load(slots + s * SLOTB, wts + (size_t)tile * RS * ROWB, bytes, full + s);
        }
        grab = nxt;
      }
      for (int c = 0; c < WARPS; ++c, ++t) {   // each consumer warp's next slot: stop
        const int s = t % S;
        if (t >= S) mbar_wait(empty + s, ((t / S) - 1) & 1);
        rowidx[s] = -1;
        mbar_arrive(full + s);
      }
    }
    if (SYNC_MIMIC) {   // as the TIR kernel: the first round, the wait, a block barrier with the consumers, refills
      if (lane == 0)
        for (int t = 0; t < min(T, S); ++t) {
          const int s = t % S;
          if (t == PREK * S / 4) pdl_wait();
          const unsigned bytes = (unsigned)(min(RS, hi - lo - t * RS) * ROWB);
          mbar_expect(full + s, bytes);
          bulk_load(slots + s * SLOTB, wts + (size_t)(lo + t * RS) * ROWB, bytes, full + s);
        }
      __syncwarp();
      pdl_wait();
      asm volatile("bar.arrive 2, %0;" :: "r"(WARPS * 32 + 32) : "memory");
      if (lane == 0)
        for (int t = S; t < T; ++t) {
          const int s = t % S;
          mbar_wait(empty + s, ((t / S) - 1) & 1);
          const unsigned bytes = (unsigned)(min(RS, hi - lo - t * RS) * ROWB);
          mbar_expect(full + s, bytes);
          bulk_load(slots + s * SLOTB, wts + (size_t)(lo + t * RS) * ROWB, bytes, full + s);
        }
      return;
    }
    if (!DYN && lane == 0) {
      for (int t = 0; t < T; ++t) {
        const int s = t % S;
        if (t == PREK * S / 4 && !PRODUCER_WAITS) pdl_wait();   // at most PRE quarters of the ring before the wait
        if (t >= S) mbar_wait(empty + s, ((t / S) - 1) & 1);
        const unsigned bytes = (unsigned)(min(RS, hi - lo - t * RS) * ROWB);
        mbar_expect(full + s, bytes);
        bulk_load(slots + s * SLOTB, wts + (size_t)(lo + t * RS) * ROWB, bytes, full + s);
      }
      if (PF && next_w) {   // the next linear's first PF bytes of this block's share, into L2 while this one ends
        const long long a = (long long)next_n * blockIdx.x / gridDim.x, b = (long long)next_n * (blockIdx.x + 1) / gridDim.x;
        const long long nb = min((long long)PF, (b - a) * next_rowb);
        for (long long o = 0; o < nb; o += 16384)
          prefetch_l2(next_w + a * next_rowb + o, (unsigned)min(16384LL, nb - o));
      }
    }
    if (PRODUCER_WAITS_END) pdl_wait();
    return;
  }
  pdl_wait();
  if (tr && tid == 0) tr[1] = now();
  if (XPRE) {                              // x already rounded, in this block's shared-memory image (an upper bound)
    constexpr int NU = P * (4096 + 512 + 512 + 128) / 16;
    uint4 v[(NU + WARPS * 32 - 1) / (WARPS * 32)];
    #pragma unroll
    for (int u = 0; u < (NU + WARPS * 32 - 1) / (WARPS * 32); ++u) {
      const int j = u * WARPS * 32 + tid;
      if (j < NU) v[u] = __ldg(xpre + j);
    }
    #pragma unroll
    for (int u = 0; u < (NU + WARPS * 32 - 1) / (WARPS * 32); ++u) {
      const int j = u * WARPS * 32 + tid;
      if (j < NU) xq[j] = v[u];
    }
  } else {
  // x as the previous kernel left it: int8 per 32 values, 16 per thread (its partner lane the other 16)
  constexpr int NJ = (K / 16 + WARPS * 32 - 1) / (WARPS * 32);   // 16-value halves per thread, loaded at once
  uint4 xv0[NJ], xv1[NJ];
  #pragma unroll
  for (int u = 0; u < NJ; ++u) {
    const int j = u * WARPS * 32 + tid;
    const bool ok = j < K / 16;
    xv0[u] = ok ? __ldg(reinterpret_cast<const uint4*>(x) + 2 * j) : make_uint4(0, 0, 0, 0);
    xv1[u] = ok ? __ldg(reinterpret_cast<const uint4*>(x) + 2 * j + 1) : make_uint4(0, 0, 0, 0);
  }
  #pragma unroll
  for (int u = 0; u < NJ; ++u) {   // every consumer thread in each pass (the shuffles)
    const int j = u * WARPS * 32 + tid;
    const bool ok = j < K / 16;
    const uint4 v0 = xv0[u], v1 = xv1[u];
    const unsigned wv[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
    float f[16];
    #pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float2 h = __half22float2(*reinterpret_cast<const half2*>(&wv[u]));
      f[2 * u] = h.x; f[2 * u + 1] = h.y;
    }
    float m = 0.f;
    #pragma unroll
    for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(f[i]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    const float sc = m > 0.f ? m / 127.f : 1.f, inv = 1.f / sc;
    unsigned q[4];
    int isum = 0;
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      int a = __float2int_rn(f[4 * i] * inv), b = __float2int_rn(f[4 * i + 1] * inv);
      int c = __float2int_rn(f[4 * i + 2] * inv), d = __float2int_rn(f[4 * i + 3] * inv);
      isum += a + b + c + d;
      q[i] = (unsigned)(a & 255) | (unsigned)(b & 255) << 8 | (unsigned)(c & 255) << 16 | (unsigned)(d & 255) << 24;
    }
    isum += __shfl_xor_sync(0xffffffffu, isum, 1);
    const int bi = j / 2, g = bi / 4, sub = bi % 4, c = sub * 2 + (j & 1);
    if (ok) xq[((g / 32) * 8 + c) * 32 + g % 32] = make_uint4(q[0], q[1], q[2], q[3]);
    if (ok && !(j & 1)) { reinterpret_cast<float*>(xs4)[bi] = sc; xsb[bi] = sc * (float)isum; }
  }
  consumers_sync<WARPS>();
  if (tid < G) {
    xsum[tid] = xsb[4 * tid] + xsb[4 * tid + 1] + xsb[4 * tid + 2] + xsb[4 * tid + 3];
    xsum2[tid] = make_float2(xsb[4 * tid] + xsb[4 * tid + 1], xsb[4 * tid + 2] + xsb[4 * tid + 3]);
  }
  }
  consumers_sync<WARPS>();
  if (SYNC_MIMIC) asm volatile("bar.sync 2, %0;" :: "r"(WARPS * 32 + 32) : "memory");
  uint4 xv[8];
  float4 s4 = make_float4(0.f, 0.f, 0.f, 0.f);
  float xsm = 0.f;
  float2 xs2 = make_float2(0.f, 0.f);
  if (tr && tid == 0) tr[2] = now();
  if constexpr (P == 1) { load_x<P>(xv, xq, 0, lane); s4 = xs4[lane]; xsm = xsum[lane]; xs2 = xsum2[lane]; }
  for (int t = warp; DYN || t < T; t += WARPS) {
    const int s = t % S;
    mbar_wait(full + s, (t / S) & 1);
    const int r0 = DYN ? rowidx[s] * RS : lo + t * RS;
    if (r0 < 0) break;
    const int rows = min(RS, (DYN ? n : hi) - r0);
    if (tr && tid == 0 && t == 0) tr[5] = now();
    const unsigned char* slot = slots + s * SLOTB;
    float acc[RS];
    #pragma unroll
    for (int i = 0; i < RS; ++i) acc[i] = 0.f;
    if (SKIP_MATH) {
      acc[0] = (float)slot[lane];
    } else {
      #pragma unroll
      for (int p = 0; p < P; ++p) {
        if (32 * p + lane < G) {
          if constexpr (P > 1) {
            load_x<P>(xv, xq, p, lane); s4 = xs4[32 * p + lane]; xsm = xsum[32 * p + lane]; xs2 = xsum2[32 * p + lane];
          }
          if constexpr (BITS == 2) slot_pass2<K, RS>(slot, rows, p, xv, s4, xs2, lane, acc);
          else slot_pass<K, RS>(slot, rows, p, xv, s4, xsm, lane, acc);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + s);   // the slot's bytes are in registers: the producer may refill it
    constexpr int FOLD = RS <= 1 ? 1 : RS <= 2 ? 2 : 4;
    float a[FOLD];
    #pragma unroll
    for (int i = 0; i < FOLD; ++i) a[i] = i < RS ? acc[i] : 0.f;
    const float r = reduce_rows<FOLD>(a, lane);
    const int i = lane / (32 / FOLD);
    if ((lane & (32 / FOLD - 1)) == 0 && i < rows) y[r0 + i] = __float2half_rn(r);
  }
  if (DYN) {   // the last block out zeroes the counters for the next launch
    consumers_sync<WARPS>();
    if (tid == 0) {
      __threadfence();
      if (atomicAdd(ctr + 1, 1u) == gridDim.x - 1) { ctr[0] = 0; ctr[1] = 0; __threadfence(); }
    }
  }
  if (TRIGGER_LAST) pdl_trigger();
  if (tr) { consumers_sync<WARPS>(); if (tid == 0) tr[3] = now(); }
}

extern "C" __global__ void __launch_bounds__(W4096 * 32 + 32, 2)
ring_k4096(const unsigned char* __restrict__ w, int n, const half* __restrict__ x, half* __restrict__ y,
           unsigned long long* trace, const uint4* __restrict__ xpre, const unsigned char* nw, int nn, int nr,
           unsigned* ctr, int pre) {
  ring_gemv<4096, RS4096, D4096, W4096>(w, n, x, y, trace, xpre, nw, nn, nr, ctr, pre);
}
extern "C" __global__ void __launch_bounds__(W11008 * 32 + 32, 2)
ring_k11008(const unsigned char* __restrict__ w, int n, const half* __restrict__ x, half* __restrict__ y,
            unsigned long long* trace, const uint4* __restrict__ xpre, const unsigned char* nw, int nn, int nr,
            unsigned* ctr, int pre) {
  ring_gemv<11008, RS11008, D11008, W11008>(w, n, x, y, trace, xpre, nw, nn, nr, ctr, pre);
}
"""


def group_size(bits: int) -> int:
    return GROUP if bits == 4 else 64


def row_bytes(k: int, bits: int = 4) -> int:
    """One row's codes, then its (scale, zero) half2 per group, padded to 16 bytes (bulk copies move 16-byte units)."""
    return -(-(k * bits // 8 + 4 * (k // group_size(bits))) // 16) * 16


def smem_bytes(k: int, ring=RING, bits: int = 4) -> int:
    rs, d, w = ring[k]
    p = -(-(k // GROUP) // 32)
    s = w * d
    return s * rs * row_bytes(k, bits) + p * 4096 + p * 32 * 16 + p * 128 * 4 + p * 32 * 12 + 2 * s * 8 + 4 * s


TIR_PRE = {"qkv": 4, "o": 4, "gate_up": 2, "down": 2}   # quarters of the ring before the wait (the CUDA's best)


def build_tir(out: Path, arch: str, i: int, name: str) -> dict:
    """The export's TIR ring GEMV (tvm_schedules/ring_gemv.py) for the four shapes, compiled by TVM to CUDA source
    and here by nvcc: one cubin, kernels ring_<n>_<k>_kernel, their parameter order read from the source."""
    import re

    import tvm

    funcs, kern = {}, {}
    for lin, n, k in SHAPES:
        cfg = rg.RingConfig(**{**rg.default_config(k).__dict__, "pre": TIR_PRE[lin]})
        nm = f"ring_{n}_{k}"
        funcs[nm] = rg.ring_gemv_func(n, k, cfg=cfg, name=nm, inplace=VARIANTS[name].get("inplace", False))
        kern[lin] = {"name": nm + "_kernel", "smem": rg.smem_bytes(k, False, cfg), "warps": cfg.warps,
                     "blocks": cfg.blocks, "row_bytes": rg.row_bytes(k, False), "cfg": cfg.__dict__}
    target = tvm.target.Target({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 232448,
                                "max_threads_per_block": 1024, "thread_warp_size": 32})
    src = tvm.compile(tvm.IRModule(funcs), target=target).mod.imports[0].inspect_source()
    if VARIANTS[name].get("asm_pdl"):   # the PDL calls as the CUDA prototype writes them
        src = src.replace("cudaGridDependencySynchronize();", 'asm volatile("griddepcontrol.wait;" ::: "memory");')
        src = src.replace("cudaTriggerProgrammaticLaunchCompletion();",
                          'asm volatile("griddepcontrol.launch_dependents;" ::: "memory");')
    for lin, kd in kern.items():
        m = re.search(r"void __launch_bounds__\([^)]*\) " + kd["name"] + r"\(([^)]*)\)", src)
        kd["params"] = [re.search(r"(\w+)_ptr$", a.strip()).group(1) for a in m.group(1).split(",")]
    (out / f"ring{i}.cu").write_text(src + (READ_BW_CU if i == 0 else ""))
    r = subprocess.run(["nvcc", "-cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o", str(out / f"ring{i}.cubin"),
                        str(out / f"ring{i}.cu")], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: nvcc failed on {name}:\n{r.stderr[-3000:]}")
    regs = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln]
    print(name, regs)
    return {"cubin": f"ring{i}.cubin", "ptxas": regs, "tir": kern, "bits": 4, "layout": "tir",
            "ring": {str(k): list(rg.default_config(k).__dict__.values())[:3] for _, _, k in SHAPES},
            "smem": {}, "pre": None}


def build(out: Path, arch: str, variants: list[str]):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "variants": {}}
    for i, name in enumerate(variants):
        if VARIANTS[name].get("tir"):
            meta["variants"][name] = {**build_tir(out, arch, i, name),
                                      "default_carveout": VARIANTS[name].get("default_carveout", False)}
            continue
        ring = VARIANTS[name].get("ring", RING)
        bits = VARIANTS[name].get("bits", 4)
        flags = {"BITS": bits, "TRIGGER_LAST": 0, "PRODUCER_WAITS": 0, "SKIP_MATH": 0, "PRE": 4, "XPRE": 0, "PF": 0, "DYN": 0, "CH": 4, "FASTDOT": 0, "PRODUCER_WAITS_END": 0, "SYNC_MIMIC": 0, "RT_PDL": 0,
                 **{k: v for k, v in VARIANTS[name].items() if k not in ("ring", "pre", "bits")}}
        flags.setdefault("PRE4096", flags["PRE"])
        flags.setdefault("PRE11008", flags["PRE"])
        defs = "".join(f"#define {k} {v}\n" for k, v in flags.items())
        defs += "".join(f"#define RS{k} {rs}\n#define D{k} {d}\n#define W{k} {w}\n" for k, (rs, d, w) in ring.items())
        src = out / f"ring{i}.cu"
        src.write_text(defs + KERNEL_CU + (READ_BW_CU if i == 0 else ""))
        r = subprocess.run(["nvcc", "-cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o", str(out / f"ring{i}.cubin"),
                            str(src)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"error: nvcc failed on {name}:\n{r.stderr[-3000:]}")
        regs = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln]
        meta["variants"][name] = {"cubin": f"ring{i}.cubin", "ptxas": regs, "ring": {str(k): v for k, v in ring.items()},
                                  "smem": {str(k): smem_bytes(k, ring, bits) for k in ring}, "bits": bits,
                                  "pre": VARIANTS[name].get("pre"),
                                  "default_carveout": VARIANTS[name].get("default_carveout", False)}
        print(name, regs)
    (out / "ring.json").write_text(json.dumps(meta, indent=1))
    print(f"built {len(variants)} variants in {out}")


# ------------------------------------------------------------------------------------------------ run (GPU machine)
def fill_weights(n: int, k: int, gen, bits: int = 4):
    """n rows of random codes with (scale, zero) per group written into their place: uint8 [n, row_bytes(k)]."""
    import torch
    g, cb = k // group_size(bits), k * bits // 8
    buf = torch.randint(0, 256, (n, row_bytes(k, bits)), device="cuda", dtype=torch.uint8, generator=gen)
    sz = torch.empty(n, g, 2, device="cuda", dtype=torch.float16)
    sz[..., 0] = torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 0.001
    sz[..., 1] = torch.randint(0, 1 << bits, (n, g), device="cuda", generator=gen).half()
    buf[:, cb:cb + 4 * g] = sz.view(torch.uint8).reshape(n, 4 * g)
    return buf


def dequantize(buf, k: int, bits: int = 4):
    """The rows' weights as float [n, k], read back from the row layout (the module docstring; 2-bit: per pass, per
    piece of 64 values (a group), per lane, 16 bytes: in word q, byte b, bits 2 j the element 16 q + 4 j + b)."""
    import torch
    n, gs = buf.shape[0], group_size(bits)
    g, ns, cb = k // gs, k // 128, k * bits // 8
    vals = []
    for p in range(-(-ns // 32)):
        lp = min(32, ns - 32 * p)
        if bits == 4:
            b = buf[:, p * 2048:p * 2048 + 4 * lp * 16].reshape(n, 4, lp, 4, 4).to(torch.int32)  # [n, c, lane, q, b]
            v = torch.stack([b & 15, b >> 4], dim=4)                     # [n, c, lane, q, lo/hi, b]
        else:
            b = buf[:, p * 1024:p * 1024 + 2 * lp * 16].reshape(n, 2, lp, 4, 4).to(torch.int32)  # [n, c, lane, q, b]
            v = torch.stack([(b >> (2 * j)) & 3 for j in range(4)], dim=4)  # [n, c, lane, q, j, b]
        vals.append(v.permute(0, 2, 1, 3, 4, 5).reshape(n, lp * 128))
    q = torch.cat(vals, dim=1).float()
    sz = buf[:, cb:cb + 4 * g].contiguous().view(torch.float16).reshape(n, g, 2).float()
    return ((q.reshape(n, g, gs) - sz[..., 1:]) * sz[..., :1]).reshape(n, k)


def timeline(tr):
    """Per-kernel times from the blocks' globaltimer stamps (ns; [kernels, blocks, (start, after the wait, after x,
    end, SM)]), medians over the 32 layers per linear, us: how early the kernel's blocks started before the previous
    kernel's last block ended ('lead': > 0 means co-resident), the dependency's resolution (first wait released -
    previous last end), the x prologue (median), the kernel's span (its last end - the previous last end)."""
    import statistics
    t = tr.double()
    start, wait, xd, end, first = t[..., 0], t[..., 1], t[..., 2], t[..., 3], t[..., 5]
    rows = {}
    for i in range(1, t.shape[0]):
        kind = SHAPES[i % len(SHAPES)][0]
        prev_end = end[i - 1].max()
        r = rows.setdefault(kind, {"lead_first": [], "lead_median": [], "resolve": [], "prologue": [], "span": [],
                                   "body": [], "tail": [], "first_slot": [], "sms": []})
        r["lead_first"].append((prev_end - start[i].min()).item() / 1e3)
        r["lead_median"].append((prev_end - start[i].median()).item() / 1e3)
        r["resolve"].append((wait[i].min() - prev_end).item() / 1e3)
        r["prologue"].append((xd[i] - wait[i]).median().item() / 1e3)
        r["body"].append((end[i].max() - xd[i].median()).item() / 1e3)
        r["span"].append((end[i].max() - prev_end).item() / 1e3)
        r["tail"].append((end[i].max() - end[i].median()).item() / 1e3)
        r["first_slot"].append((first[i] - xd[i]).median().item() / 1e3)
        r["sms"].append(len(set(tr[i, :, 4].tolist())))
    out = {kind: {k: statistics.median(v) for k, v in r.items()} for kind, r in rows.items()}
    for j, (kind, _, _) in enumerate(SHAPES):   # is the tail the same SMs each time? per SM: its end - the median
        lag = {}
        for i in range(j, t.shape[0], len(SHAPES)):
            if i == 0:
                continue
            med = end[i].median().item()
            for b in range(t.shape[1]):
                lag.setdefault(int(tr[i, b, 4]), []).append((end[i, b].item() - med) / 1e3)
        means = {sm: statistics.mean(v) for sm, v in lag.items()}
        within = statistics.mean(statistics.pstdev(v) for v in lag.values())
        slow = sorted(means, key=means.get)[-6:]
        out[kind]["sm_lag_std_us"] = statistics.pstdev(means.values())
        out[kind]["sm_lag_within_std_us"] = within
        out[kind]["slowest_sms"] = {sm: round(means[sm], 2) for sm in slow}
    print(json.dumps({"timeline_us": out}), flush=True)
    return out


def fill_weights_tir(n: int, k: int, gen):
    """n rows in tvm_schedules/ring_gemv.py's layout: random codes, scales in [0.001, 0.021], zeros 0..15."""
    import torch
    g, rb = k // GROUP, rg.row_bytes(k, False)
    buf = torch.randint(0, 256, (n, rb), device="cuda", dtype=torch.uint8, generator=gen)
    sc = (torch.rand(n, g, device="cuda", generator=gen) * 0.02 + 0.001).half()
    buf[:, k // 2:k // 2 + 2 * g] = sc.view(torch.uint8).reshape(n, 2 * g)
    buf[:, k // 2 + 2 * g:k // 2 + 3 * g] = torch.randint(0, 16, (n, g), device="cuda", dtype=torch.uint8,
                                                          generator=gen)
    return buf


def x_image(x, k: int):
    """x rounded as the kernels round it (int8 per 32 values, scale max / 127), laid out as their shared memory holds
    it (int8 [P][8][32 lanes][16], then per group the 4 block scales, per block scale x code sum, per group the sum):
    what a producer of x could write for them (the XPRE variants read it instead of rounding x)."""
    import torch
    g = k // GROUP
    p = -(-g // 32)
    f = x.float().reshape(-1, 32)
    m = f.abs().amax(dim=1)
    sc = torch.where(m > 0, m / 127.0, torch.ones_like(m))
    q = torch.round(f * (1.0 / sc)[:, None]).to(torch.int32)
    xsb = sc * q.sum(dim=1).float()
    xsum = ((xsb[0::4] + xsb[1::4]) + xsb[2::4]) + xsb[3::4]
    img = torch.zeros(p * 32, 128, dtype=torch.int8, device=x.device)
    img[:g] = q.reshape(g, 128).to(torch.int8)
    xq = img.reshape(p, 32, 8, 16).permute(0, 2, 1, 3).contiguous().view(torch.uint8).reshape(-1)
    pad = torch.zeros(p * 32 * 4, device=x.device)
    xs4 = pad.clone(); xs4[:4 * g] = sc
    xb = pad.clone(); xb[:4 * g] = xsb
    xs = torch.zeros(p * 32, device=x.device); xs[:g] = xsum
    return torch.cat([xq, xs4.view(torch.uint8), xb.view(torch.uint8), xs.view(torch.uint8)])


def launcher(drv, name, sms, warps, smem, tensors, pdl=True, block=None):
    """`block`: the thread block's shape, else (32 (warps + 1), 1, 1) (the CUDA kernels' flat thread index)."""
    import torch
    ptrs = [t if isinstance(t, ctypes._SimpleCData) else ctypes.c_void_p(t.data_ptr()) for t in tensors]
    args = (ctypes.c_void_p * len(ptrs))(*[ctypes.addressof(p) for p in ptrs])
    f = drv.fn(name)
    attr = _LaunchAttr(id=6, val=1 if pdl else 0)
    cfg = _LaunchConfig(sms, 1, 1, *(block or ((warps + 1) * 32, 1, 1)), smem, None, ctypes.pointer(attr), 1)

    def go():
        cfg.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        drv._check(drv.lib.cuLaunchKernelEx(ctypes.byref(cfg), f, args, None))
    go.keep = (ptrs, args, attr, cfg)
    return go


def run(out: Path, save: Path | None, repeat: int, trace_it: bool = True):
    import torch
    meta = json.loads((out / "ring.json").read_text())
    names = list(meta["variants"])
    drvs = {nm: Driver([(out / meta["variants"][nm]["cubin"]).read_bytes()]) for nm in names}
    dev = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cbw = copy_bandwidth()
    bw = max(cbw, read_bandwidth(drvs[names[0]]))
    print(f"device {dev}; {sms} SMs; copy {cbw / 1e12:.2f} TB/s, roofline {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(max(k for _, _, k in SHAPES), device="cuda", dtype=torch.float16, generator=gen)
    ys = [torch.full((n,), float("nan"), device="cuda", dtype=torch.float16) for _, n, _ in SHAPES]
    by_bits = {}
    for lay in sorted({v.get("layout", v["bits"]) for v in meta["variants"].values()}, key=str):
        if lay == "tir":
            lw = [[fill_weights_tir(n, k, gen) for _, n, k in SHAPES] for _ in range(LAYERS)]
            refs = [torch.from_numpy(rg.ring_gemv_np(w.cpu().numpy(), x[:k].cpu().numpy(), k, False)).cuda()
                    for w, (_, _, k) in zip(lw[-1], SHAPES)]
        else:
            lw = [[fill_weights(n, k, gen, lay) for _, n, k in SHAPES] for _ in range(LAYERS)]
            refs = [dequantize(w, k, lay) @ x[:k].float() for w, (_, _, k) in zip(lw[-1], SHAPES)]
        by_bits[lay] = (lw, sum(w.numel() for layer in lw for w in layer), refs)
    images = {k: x_image(x[:k], k) for k in RING}
    ctrs = torch.zeros(LAYERS * len(SHAPES), 32, dtype=torch.int32, device="cuda")   # (DYN) per launch, own line
    res = {"device": dev, "sms": sms, "roofline_TBps": bw / 1e12, "copy_TBps": cbw / 1e12,
           "bytes": {bits: v[1] for bits, v in by_bits.items()}, "host": platform.node(), **meta, "steps": {}}
    null = ctypes.c_void_p(0)
    for nm in names:
        drv, smem, ring = drvs[nm], meta["variants"][nm]["smem"], meta["variants"][nm]["ring"]
        bits = meta["variants"][nm]["bits"]
        tir = meta["variants"][nm].get("tir")
        layers, total, refs = by_bits[meta["variants"][nm].get("layout", bits)]
        pre = meta["variants"][nm].get("pre") or [-1] * len(SHAPES)   # per linear, quarters (-1: the build's)
        for f, size in ([(drv.fn(kd["name"]), kd["smem"]) for kd in tir.values()] if tir else
                        [(drv.fn(f"ring_k{k}"), smem[str(k)]) for k in RING]):
            drv._check(drv.lib.cuFuncSetAttribute(f, 8, size))   # MAX_DYNAMIC_SHARED_SIZE_BYTES
            if not meta["variants"][nm].get("default_carveout"):
                drv._check(drv.lib.cuFuncSetAttribute(f, 9, 100))   # PREFERRED_SHARED_MEMORY_CARVEOUT

        def chain_tir(pdl):
            seq = [(w, i) for layer in layers for i, w in enumerate(layer)]
            return [launcher(drv, kd["name"], kd["blocks"], kd["warps"], kd["smem"],
                             [{"w": w, "x": x[None, :SHAPES[i][2]], "y": ys[i]}[a] for a in kd["params"]], pdl=pdl,
                             block=(32, kd["warps"] + 1, 1))   # TIR: threadIdx.x the lane, threadIdx.y the warp
                    for w, i in seq for kd in (tir[SHAPES[i][0]],)]

        def chain(pdl, trace=None):
            if tir:
                return chain_tir(pdl)
            seq = [(w, i, n, k) for layer in layers for i, (w, (_, n, k)) in enumerate(zip(layer, SHAPES))]
            return [launcher(drv, f"ring_k{k}", sms, ring[str(k)][2], smem[str(k)],
                             [w, ctypes.c_int(n), x, ys[i],
                              null if trace is None else ctypes.c_void_p(trace[j].data_ptr()), images[k],
                              *((seq[j + 1][0], ctypes.c_int(seq[j + 1][2]), ctypes.c_int(row_bytes(seq[j + 1][3], bits)))
                                if j + 1 < len(seq) else (null, ctypes.c_int(0), ctypes.c_int(0))),
                              ctypes.c_void_p(ctrs[j].data_ptr()), ctypes.c_int(pre[i])], pdl=pdl)
                    for j, (w, i, n, k) in enumerate(seq)]
        for pdl in (True, False):
            fns = chain(pdl)
            for y in ys:
                y.fill_(float("nan"))
            for f in fns:
                f()
            torch.cuda.synchronize()
            err = max(((y.float() - ref).abs().max() / ref.abs().max()).item() for y, ref in zip(ys, refs))
            if repeat == 0:   # one eager pass per variant (for ncu), no timing
                print(json.dumps({"variant": nm, "rel_err": err}), flush=True)
                break
            times = [_timed(fns, reps=10) * len(fns) for _ in range(repeat)]
            t = sorted(times)[len(times) // 2]
            key = nm + ("" if pdl else ", plain launches")
            res["steps"][key] = {"ms": [v * 1e3 for v in times], "rel_err": err, "bits": bits, "bytes": total}
            print(json.dumps({"variant": key, "bits": bits, "ms": [round(v * 1e3, 4) for v in times], "rel_err": err,
                              "pct_roofline": round(total / t / bw * 100, 1)}), flush=True)
            if not nm.endswith("no math") and not err <= 8e-3:
                print(f"WRONG RESULT {key}: rel err {err:.2e}", flush=True)
        if repeat == 0:
            continue
        fns = chain(True)   # each linear alone: its 32 launches (own weights each) in one graph, us per launch
        res["steps"][nm]["per_linear_us"] = {lin: _timed(fns[i::len(SHAPES)], reps=10) * 1e6
                                             for i, (lin, _, _) in enumerate(SHAPES)}
        print(json.dumps({"variant": nm, "per_linear_us": res["steps"][nm]["per_linear_us"]}), flush=True)
        if trace_it and not tir:
            trace = torch.zeros(LAYERS * len(SHAPES), sms, 6, dtype=torch.int64, device="cuda")
            _timed(chain(True, trace), reps=3)
            res["steps"][nm]["timeline"] = timeline(trace.cpu())
    del layers, by_bits
    torch.cuda.empty_cache()
    if repeat == 0:
        return
    t_int4 = torch_int4_step()
    res["torch_int4_ms"] = t_int4 * 1e3
    lines = [f"# Ring GEMVs with early streaming, W4 g128 decode step (prototype, {dev}), "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"`python3 benchmarks/gpu_ring.py run` ({platform.node()}); roofline {bw / 1e12:.2f} TB/s (copy "
             f"{cbw / 1e12:.2f}); GB per step: " + ", ".join(f"W{b} {v / 1e9:.3f}" for b, v in res["bytes"].items())
             + "; one block per SM (a producer warp and consumer "
             f"warps); per variant and K (rows per slot, slots per consumer warp, consumer warps): "
             + "; ".join(f"{nm} {v['ring']}" for nm, v in meta["variants"].items()), "",
             "| variant | ms (median of runs) | runs | tok/s | % of roofline | x torch int4 | x the first W4 row | "
             "last layer rel err |", "|---|---|---|---|---|---|---|---|"]
    t_w4 = next((sorted(r["ms"])[len(r["ms"]) // 2] / 1e3 for r in res["steps"].values() if r["bits"] == 4), None)
    for key, r in res["steps"].items():
        t = sorted(r["ms"])[len(r["ms"]) // 2] / 1e3
        lines.append(f"| {key} | {t * 1e3:.3f} | {', '.join(f'{v:.3f}' for v in r['ms'])} | {1 / t:.0f} | "
                     f"{r['bytes'] / t / bw * 100:.1f}% | {t_int4 / t:.2f} | "
                     f"{t_w4 / t if t_w4 else float('nan'):.2f} | {r['rel_err']:.1e} |")
    lines += [f"| torch int4 g128 (128 launches, one graph) | {t_int4 * 1e3:.3f} | | {1 / t_int4:.0f} | | 1.00 | |", ""]
    lines += ["Each linear alone (its 32 launches with PDL in one graph; us per launch; ideal = bytes / roofline):", "",
              "| variant | " + " | ".join(lin for lin, _, _ in SHAPES) + " |", "|---|" + "---|" * len(SHAPES)]
    for key, r in res["steps"].items():
        if "per_linear_us" in r:
            lines.append(f"| {key} | " + " | ".join(f"{r['per_linear_us'][lin]:.2f}" for lin, _, _ in SHAPES) + " |")
    lines += ["", "Timelines (globaltimer per block, one traced replay; medians over the layers, us; lead: the previous "
              "kernel's last end - this kernel's first (or median) block start; resolve: first wait released - "
              "previous last end; span: last end - previous last end):", "",
              "| variant | linear | lead first | lead median | resolve | x prologue | first slot after x | body | "
              "tail (last - median end) | span | SMs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines_sm = []
    for key, r in res["steps"].items():
        for kind, v in r.get("timeline", {}).items():
            lines_sm.append(f"| {key} | {kind} | {v['sm_lag_std_us']:.2f} | {v['sm_lag_within_std_us']:.2f} | "
                            f"{v['slowest_sms']} |")
            lines.append(f"| {key} | {kind} | {v['lead_first']:.2f} | {v['lead_median']:.2f} | {v['resolve']:.2f} | "
                         f"{v['prologue']:.2f} | {v['first_slot']:.2f} | {v['body']:.2f} | {v['tail']:.2f} | "
                         f"{v['span']:.2f} | {v['sms']:.0f} |")
    lines += ["", "Is the tail the same SMs each time? Per SM its end minus the kernel's median end, over the 32 layers: "
              "the spread across SMs of its mean, the mean spread within an SM, the slowest SMs (mean lag, us):", "",
              "| variant | linear | across SMs | within an SM | slowest SMs |", "|---|---|---|---|---|", *lines_sm, ""]
    print("\n".join(lines), flush=True)
    if save:
        save.mkdir(parents=True, exist_ok=True)
        (save / "gpu-ring.md").write_text("\n".join(lines))
        (save / "gpu-ring.json").write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["build", "run"])
    ap.add_argument("--out", default=".device/ring")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--variants", default=";".join(VARIANTS), help="build: which variants (names separated by ;)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save", help="run: write gpu-ring.md and .json there")
    a = ap.parse_args()
    if a.step == "build":
        build(Path(a.out), a.arch, [v.strip() for v in a.variants.split(";")])
    else:
        run(Path(a.out), Path(a.save) if a.save else None, a.repeat)


if __name__ == "__main__":
    main()
