"""Does a persistent decode step reach the memory roofline? A measured prototype (hand-written CUDA, not the export's
TIR) of the LLaMA-7B W4 g128 decode step's 128 linears as ONE kernel: each SM's block streams its share of every
linear's weights through a ring of shared-memory slots by bulk copies (TMA, `cp.async.bulk`, one producer warp),
independently of the activations, while its consumer warps wait for the previous linear to finish (a grid-wide
counter, as the real step's data dependencies would) and then multiply the slots they find filled. The DRAM need not
wait for a dependency: the weights of linear l+1 can arrive while linear l's last tiles and the barrier finish (as
long as the consumers keep up: the results file measures where they do not). This is the structure the kernel
benchmark (`gpu_decode.py`) says the 128-launch step lacks: its ~1.7 us per kernel over its bytes is launch, ramp and
tail, paid 128 times per token.

Tiles: up to TILE_ROWS rows x K, laid out for the kernel (a possible export layout: the checkpoint's codes repacked
per tile): per 1024-wide chunk of K, per row, 32 lanes x 16 bytes (32 codes; in word q byte b's low nibble is element
8q + b, its high nibble 8q + 4 + b, so `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` meet the int8 activations in
natural order in dp4a); then per row and group of 128 a half2 (scale, zero). Each linear's rows are split evenly over
the blocks, a block's share in equal tiles. Activations: the fp16 vector rounded to int8 per 32 values by each block
after its wait (as the export's int8 GEMVs do). Every block's arrival after its last tile of linear l and the wait
for all arrivals of l - 1 before its first tile of l keep the real step's order. Results and the versions that led
here: benchmarks/results/gpu-persistent-h200.md.

    python benchmarks/gpu_persistent.py build [--out .device/pers]          # here (nvcc)
    python3 benchmarks/gpu_persistent.py run [--out .device/pers] [--save DIR]   # on the GPU machine

`run` checks the last layer's outputs against a torch dequantize reference, times the step as a CUDA graph, and
prints it against the roofline (same definition as gpu_decode.py: the faster of a streaming read and a copy, same
run) and torch's int4 step.
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
from gpu_decode import LAYERS, READ_BW_CU, SHAPES, Driver, _timed, copy_bandwidth, read_bandwidth, torch_int4_step  # noqa: E402

GROUP = 128
CHUNK = 1024         # K per lane-row pass: 32 lanes x 32 codes
SLOTS = 4            # ring depth (slots of the largest tile)

KERNEL_CU = r"""
#include <cuda_fp16.h>
#include <stdint.h>

struct Tile { unsigned long long src; unsigned bytes; unsigned char lin, rows; unsigned short row0; };
struct Lin { int k, r, kind, pad; };

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
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v; asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void red_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" :: "r"(WARPS * 32) : "memory"); }

// one lane's 32 codes of a row (four words; in word q byte b's low nibble is element 8q + b, its high nibble
// element 8q + 4 + b) against its 32 int8 activations (two uint4, natural order): the integer dot product
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

// v[R] per lane -> lane holds the sum over all 32 lanes of row (lane / (32 / R)) (transposed butterfly)
template <int N, int OFF, int R> __device__ __forceinline__ void fold(float (&v)[R], int lane) {
  if constexpr (N > 1) {                  // lanes with bit OFF keep the upper half of the rows, the others the lower
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

// this warp's share of a tile of r rows of a K-wide linear: chunks c = warp % CW, + CW, ... of rows
// (warp / CW) * RW .. + RW (those below r): partial row sums -> red[warp % CW][row]. K is a template argument so
// that the chunk and group arithmetic folds into constants. Activations: int8 codes xq and a scale per 32, xsc.
template <int K, int RW> __device__ __forceinline__ void tile_rows(const unsigned char* slot, int r,
                                                                  const signed char* xq, const float* xsc,
                                                                  int warp, int lane, float (*red)[32]) {
  constexpr int nch = (K + CHUNK - 1) / CHUNK, groups = K / GROUP, tail = K - (nch - 1) * CHUNK;
  constexpr int FOLD = RW <= 1 ? 1 : RW <= 2 ? 2 : RW <= 4 ? 4 : RW <= 8 ? 8 : 16;
  const int row0 = (warp / CW) * RW, cw = warp % CW;
  const half2* sz = reinterpret_cast<const half2*>(slot + r * K / 2) + row0 * groups;
  float acc[FOLD];
  #pragma unroll
  for (int i = 0; i < FOLD; ++i) acc[i] = 0.f;
  if (row0 < r) {
    const int rows = r - row0;
    #pragma unroll 1
    for (int c = cw; c < nch; c += CW) {
      const int cb = c == nch - 1 ? tail / 2 : CHUNK / 2;   // bytes per row in this chunk
      if (lane * 16 >= cb) continue;
      const int e = c * CHUNK + lane * 32;
      const uint4 x0 = *reinterpret_cast<const uint4*>(xq + e), x1 = *reinterpret_cast<const uint4*>(xq + e + 16);
      const float xs = xsc[e / 32];
      const int ones = 0x01010101;
      int sx = __dp4a((int)x0.x, ones, 0);
      sx = __dp4a((int)x0.y, ones, sx); sx = __dp4a((int)x0.z, ones, sx); sx = __dp4a((int)x0.w, ones, sx);
      sx = __dp4a((int)x1.x, ones, sx); sx = __dp4a((int)x1.y, ones, sx); sx = __dp4a((int)x1.z, ones, sx);
      const float xsum = xs * (float)__dp4a((int)x1.w, ones, sx);
      const unsigned char* base = slot + c * r * (CHUNK / 2) + row0 * cb + lane * 16;
      const half2* szc = sz + e / GROUP;
      #pragma unroll
      for (int i = 0; i < RW; ++i) {
        if (i < rows) {
          const uint4 w = *reinterpret_cast<const uint4*>(base + i * cb);
          const float2 s = __half22float2(szc[i * groups]);   // (scale, zero)
          acc[i] = fmaf(s.x, fmaf((float)dot32(w, x0, x1), xs, -s.y * xsum), acc[i]);
        }
      }
    }
  }
  float s = reduce_rows<FOLD>(acc, lane);
  const int i = lane / (32 / FOLD);
  if ((lane & (32 / FOLD - 1)) == 0 && i < RW) red[cw][row0 + i] = s;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32 + 32, 1)
persistent_step(const Tile* __restrict__ tiles, const int* __restrict__ first, const Lin* __restrict__ lins,
                half* y0, half* y1, half* y2, half* y3, const half* __restrict__ x, unsigned* ctr, int slot_bytes) {
  extern __shared__ __align__(128) unsigned char sm[];
  unsigned char* slots = sm;
  signed char* xq = reinterpret_cast<signed char*>(sm + SLOTS * slot_bytes);
  float* xsc = reinterpret_cast<float*>(sm + SLOTS * slot_bytes + XS_BYTES);
  uint64_t* full = reinterpret_cast<uint64_t*>(xsc + XS_BYTES / 32);
  uint64_t* empty = full + SLOTS;
  unsigned* done = reinterpret_cast<unsigned*>(empty + SLOTS);          // [SLOTS] warps finished with the slot
  float (*red)[CW][32] = reinterpret_cast<float (*)[CW][32]>(done + SLOTS);   // [SLOTS][CW][32]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int t0 = first[blockIdx.x], t1 = first[blockIdx.x + 1];
  if (tid == 0) {
    for (int i = 0; i < SLOTS; ++i) { mbar_init(full + i, 1); mbar_init(empty + i, WARPS); done[i] = 0; }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == WARPS) {                      // the producer: every tile of this block, in order, into the ring
    if (lane == 0) {
      int slot = 0; unsigned phase = 0;
      for (int t = t0; t < t1; ++t) {
        mbar_wait(empty + slot, phase ^ 1);
        const Tile d = tiles[t];
        mbar_expect(full + slot, d.bytes);
        const unsigned piece = ((d.bytes + PIECES - 1) / PIECES + 15) / 16 * 16;
        for (unsigned o = 0; o < d.bytes; o += piece)
          bulk_load(slots + slot * slot_bytes + o, reinterpret_cast<const char*>(d.src) + o,
                    min(piece, d.bytes - o), full + slot);
        if (++slot == SLOTS) { slot = 0; phase ^= 1; }
      }
    }
    return;
  }
  int slot = 0, cur = -1, k = 0, kind = 0; unsigned phase = 0;
  Tile next = tiles[t0];
  for (int t = t0; t < t1; ++t) {
    const Tile d = next;                     // the descriptor read one tile ahead (its L2 latency off the path)
    if (t + 1 < t1) next = tiles[t + 1];
    const int r = d.rows;
    if (d.lin != cur) {
      consumers_sync();                      // this block's tiles of `cur` are summed and written
      if (cur >= 0 && tid == 0) red_release(ctr, 1);
      if (tid == 0 && !SKIP_WAIT) {          // every block done with linear d.lin - 1 (its outputs are our input)
        const unsigned target = gridDim.x * d.lin;
        while (ld_acquire(ctr) < target) { }
      }
      consumers_sync();
      cur = d.lin;
      const Lin L = lins[cur];
      k = L.k; kind = L.kind;
      for (int j0 = 0; j0 < k / 16; j0 += WARPS * 32) {   // x as the previous linear left it (L2): int8 per 32,
        const int j = j0 + tid;                                 // 16 values per thread, its partner lane the rest
        const bool ok = j < k / 16;
        uint4 v[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (ok) { v[0] = __ldcg(reinterpret_cast<const uint4*>(x) + 2 * j); v[1] = __ldcg(reinterpret_cast<const uint4*>(x) + 2 * j + 1); }
        float f[16];
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
          const unsigned wv[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
          #pragma unroll
          for (int u = 0; u < 4; ++u) {
            float2 h = __half22float2(*reinterpret_cast<const half2*>(&wv[u]));
            f[8 * i + 2 * u] = h.x; f[8 * i + 2 * u + 1] = h.y;
          }
        }
        float m = 0.f;
        #pragma unroll
        for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(f[i]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        const float sc = m > 0.f ? m / 127.f : 1.f, inv = 1.f / sc;
        unsigned q[4];
        #pragma unroll
        for (int i = 0; i < 4; ++i)
          q[i] = (unsigned)(__float2int_rn(f[4 * i] * inv) & 255) | (unsigned)(__float2int_rn(f[4 * i + 1] * inv) & 255) << 8 |
                 (unsigned)(__float2int_rn(f[4 * i + 2] * inv) & 255) << 16 | (unsigned)(__float2int_rn(f[4 * i + 3] * inv) & 255) << 24;
        if (ok) {
          reinterpret_cast<uint4*>(xq)[j] = make_uint4(q[0], q[1], q[2], q[3]);
          if (!(j & 1)) xsc[j / 2] = sc;
        }
      }
      consumers_sync();
    }
    mbar_wait(full + slot, phase);
    if (SKIP_MATH) { if (lane == 0) red[slot][warp % CW][warp / CW] = slots[slot * slot_bytes + warp]; }
    else if (k == 4096) tile_rows<4096, R4096 * CW / WARPS>(slots + slot * slot_bytes, r, xq, xsc, warp, lane, red[slot]);
    else tile_rows<11008, R11008 * CW / WARPS>(slots + slot * slot_bytes, r, xq, xsc, warp, lane, red[slot]);
    __syncwarp();
    unsigned last = 0;
    if (lane == 0) { __threadfence_block(); last = atomicAdd(done + slot, 1u) == WARPS - 1; }
    last = __shfl_sync(0xffffffffu, last, 0);
    if (last) {                              // the block's last warp on this tile: sum the warps' partial rows
      __threadfence_block();
      if (lane < r) {
        float s = 0.f;
        #pragma unroll
        for (int w = 0; w < CW; ++w) s += red[slot][w][lane];
        half* y = kind == 0 ? y0 : kind == 1 ? y1 : kind == 2 ? y2 : y3;
        y[d.row0 + lane] = __float2half_rn(s);
      }
      __syncwarp();
      if (lane == 0) done[slot] = 0;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + slot);
    if (++slot == SLOTS) { slot = 0; phase ^= 1; }
  }
  consumers_sync();
  if (tid == 0) {                           // the last arrival; the last block out zeroes the counters for the next launch
    red_release(ctr, 1);
    unsigned out = atomicAdd(ctr + 32, 1u);
    if (out == gridDim.x - 1) {
      while (ld_acquire(ctr) < gridDim.x * (unsigned)NLIN) { }
      ctr[0] = 0; ctr[32] = 0; __threadfence();
    }
  }
}
"""


TILE_ROWS = (24, 8)   # the most rows of a tile at K = 4096 and at K = 11008 (52 and 47 KB: a slot holds either)


def tile_rows(k: int, rows: tuple[int, int] = TILE_ROWS) -> int:
    return rows[0] if k <= 4096 else rows[1]


def tile_bytes(k: int, r: int) -> int:
    """Codes, then (scale, zero) per row and group, padded to 16 bytes (bulk copies move 16-byte multiples)."""
    return -(-(r * k // 2 + r * (k // GROUP) * 4) // 16) * 16


def block_tiles(n: int, k: int, blocks: int, rows: tuple[int, int] = TILE_ROWS) -> list[list[tuple[int, int]]]:
    """Per block, its (first row, rows) tiles of an n-row linear: block b takes rows n b / blocks to n (b + 1) /
    blocks (shares differ by at most one row), in tiles of at most tile_rows(k)."""
    out = []
    for b in range(blocks):
        lo, hi = n * b // blocks, n * (b + 1) // blocks
        nt = -(-(hi - lo) // tile_rows(k, rows))   # the share in equal tiles (sizes differ by one row at most)
        cuts = [lo + (hi - lo) * i // nt for i in range(nt + 1)]
        out.append([(a, z - a) for a, z in zip(cuts, cuts[1:])])
    return out


def build(out: Path, arch: str, warps: int, pieces: int = 1, skip_wait: bool = False, skip_math: bool = False,
          slots: int = SLOTS, rows: tuple[int, int] = TILE_ROWS):
    out.mkdir(parents=True, exist_ok=True)
    if any(r * 4 % warps for r in rows):
        raise SystemExit(f"error: tiles of {rows} rows do not split into {warps // 4} row groups; pick --rows to fit")
    slot = max(-(-tile_bytes(k, tile_rows(k, rows)) // 128) * 128 for _, _, k in SHAPES)
    xs = max(k for _, _, k in SHAPES)     # int8 activations, then a float scale per 32
    defs = (f"#define WARPS {warps}\n#define CW 4\n#define SLOTS {slots}\n#define CHUNK {CHUNK}\n#define GROUP {GROUP}\n"
            f"#define XS_BYTES {xs}\n#define NLIN {LAYERS * len(SHAPES)}\n#define PIECES {pieces}\n"
            f"#define SKIP_WAIT {int(skip_wait)}\n#define SKIP_MATH {int(skip_math)}\n"
            f"#define R4096 {rows[0]}\n#define R11008 {rows[1]}\n")
    (out / "persistent.cu").write_text(defs + KERNEL_CU + READ_BW_CU)
    r = subprocess.run(["nvcc", "-cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o", str(out / "persistent.cubin"),
                        str(out / "persistent.cu")], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: nvcc failed:\n{r.stderr[-3000:]}")
    print(r.stderr.strip().splitlines()[-3:])
    smem_bytes = slots * slot + xs + xs // 32 * 4 + 2 * slots * 8 + slots * 4 + slots * 4 * 32 * 4
    (out / "persistent.json").write_text(json.dumps({"warps": warps, "slot": slot, "smem": smem_bytes, "arch": arch,
                                                         "pieces": pieces, "slots": slots, "rows": list(rows), "skip_wait": skip_wait,
                                                         "skip_math": skip_math}))
    print(f"built {out / 'persistent.cubin'}: {warps} consumer warps, {slots} slots of {slot} B, {smem_bytes} B shared")


def plan_step(blocks: int, rows: tuple[int, int] = TILE_ROWS, layers: int = LAYERS):
    """The step's tiles in buffer order, (layer, kind, block, first row, rows, byte offset), and the bytes in all."""
    shares = [block_tiles(n, k, blocks, rows) for _, n, k in SHAPES]
    if not all(bt for share in shares for bt in share):   # a block arrives once per linear, after its last tile
        raise SystemExit(f"error: a linear has fewer rows than the {blocks} blocks; every block needs a tile of each")
    tiles, off = [], 0
    for layer in range(layers):
        for kind, ((_, _, k), share) in enumerate(zip(SHAPES, shares)):
            for b, bt in enumerate(share):
                for r0, r in bt:
                    tiles.append((layer, kind, b, r0, r, off))
                    off += tile_bytes(k, r)
    return tiles, off


def fill_scales(buf, tiles, gen):
    """Each tile's (scale, zero) pairs written over the random bytes that `buf` starts as (the codes stay random):
    one scatter per (layer, linear, rows), not four small writes for each of the ~97,000 tiles."""
    import torch
    sets = {}
    for layer, kind, _, _, r, off in tiles:
        sets.setdefault((layer, kind, r), []).append(off)
    for (_, kind, r), offs in sets.items():
        k = SHAPES[kind][2]
        g = k // GROUP
        sz = torch.empty(len(offs), r, g, 2, device=buf.device, dtype=torch.float16)
        sz[..., 0] = torch.rand(len(offs), r, g, device=buf.device, generator=gen) * 0.02 + 0.001
        sz[..., 1] = torch.randint(0, 16, (len(offs), r, g), device=buf.device, generator=gen).half()
        start = torch.tensor(offs, device=buf.device, dtype=torch.int64) + r * k // 2
        idx = start[:, None] + torch.arange(r * g * 4, device=buf.device)
        buf[idx.reshape(-1)] = sz.view(torch.uint8).reshape(-1)


def _decode_tile(v, k, r):
    """One tile's bytes (uint8 [tile_bytes(k, r)]) -> its rows dequantized, float [r, k]."""
    import torch
    nch = -(-k // CHUNK)
    tail = k - (nch - 1) * CHUNK
    vals = []
    for c in range(nch):
        cb = (tail if c == nch - 1 else CHUNK) // 2
        b = v[c * r * CHUNK // 2:c * r * CHUNK // 2 + r * cb].reshape(r, cb // 4, 4).to(torch.int32)
        vals.append(torch.cat([b & 15, b >> 4], dim=2).reshape(r, -1))   # per word: bytes' low, then high nibbles
    q = torch.cat(vals, dim=1).float()
    sz = v[r * k // 2:r * k // 2 + r * (k // GROUP) * 4].contiguous().view(torch.float16).reshape(r, k // GROUP, 2).float()
    return ((q.reshape(r, k // GROUP, GROUP) - sz[..., 1:]) * sz[..., :1]).reshape(r, k)


def run(out: Path, save: Path | None, repeat: int):
    import torch
    meta = json.loads((out / "persistent.json").read_text())
    drv = Driver([(out / "persistent.cubin").read_bytes()])
    dev = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cbw = copy_bandwidth()
    bw = max(cbw, read_bandwidth(drv))
    print(f"device {dev}; {sms} SMs; copy {cbw / 1e12:.2f} TB/s, roofline {bw / 1e12:.2f} TB/s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(5)
    rows = tuple(meta.get("rows", TILE_ROWS))
    tiles, total = plan_step(sms, rows)
    buf = torch.randint(0, 256, (total,), device="cuda", dtype=torch.uint8, generator=gen)
    fill_scales(buf, tiles, gen)
    per_block = [[] for _ in range(sms)]
    for layer, kind, b, r0, r, off in tiles:   # each block's tiles in step order
        k = SHAPES[kind][2]
        per_block[b].append((buf.data_ptr() + off, tile_bytes(k, r), layer * len(SHAPES) + kind, r, r0))
    lins = [(k, tile_rows(k, rows), kind, 0) for _ in range(LAYERS) for kind, (_, _, k) in enumerate(SHAPES)]
    last_layer = [(kind, off, SHAPES[kind][2], r, r0) for layer, kind, b, r0, r, off in tiles if layer == LAYERS - 1]
    first = [0]
    for bt in per_block:
        first.append(first[-1] + len(bt))
    tbl = torch.tensor(bytearray(b"".join(
        int(s).to_bytes(8, "little") + int(nb).to_bytes(4, "little") + bytes([lin, r]) + int(r0).to_bytes(2, "little")
        for bt in per_block for s, nb, lin, r, r0 in bt)), dtype=torch.uint8).cuda()
    first_t = torch.tensor(first, dtype=torch.int32).cuda()
    lin_t = torch.tensor(lins, dtype=torch.int32).cuda()
    x = torch.randn(max(k for _, _, k in SHAPES), device="cuda", dtype=torch.float16, generator=gen)
    ys = [torch.full((n,), float("nan"), device="cuda", dtype=torch.float16) for _, n, _ in SHAPES]
    ctr = torch.zeros(64, device="cuda", dtype=torch.int32)
    f = drv.fn("persistent_step")
    drv._check(drv.lib.cuFuncSetAttribute(f, 8, meta["smem"]))   # MAX_DYNAMIC_SHARED_SIZE_BYTES
    args_v = [ctypes.c_void_p(tbl.data_ptr()), ctypes.c_void_p(first_t.data_ptr()), ctypes.c_void_p(lin_t.data_ptr()),
              *[ctypes.c_void_p(y.data_ptr()) for y in ys], ctypes.c_void_p(x.data_ptr()),
              ctypes.c_void_p(ctr.data_ptr()), ctypes.c_int(meta["slot"])]
    args = (ctypes.c_void_p * len(args_v))(*[ctypes.addressof(a) for a in args_v])

    def go():
        s = torch.cuda.current_stream().cuda_stream
        drv._check(drv.lib.cuLaunchKernel(f, sms, 1, 1, (meta["warps"] + 1) * 32, 1, 1, meta["smem"],
                                          ctypes.c_void_p(s), args, None))
    go.keep = (args_v, args)
    go()
    torch.cuda.synchronize()
    refs = [torch.empty(n, device="cuda") for _, n, _ in SHAPES]
    for kind, o, k, r, r0 in last_layer:
        refs[kind][r0:r0 + r] = _decode_tile(buf[o:o + tile_bytes(k, r)], k, r) @ x[:k].float()
    err = max(((y.float() - ref).abs().max() / ref.abs().max()).item() for y, ref in zip(ys, refs))
    print(json.dumps({"check": "last layer vs torch dequantize", "rel_err": err}), flush=True)
    if repeat == 0:   # one launch (for ncu)
        return
    times = [_timed([go] * 4, reps=10) for _ in range(repeat)]
    assert int(ctr[0]) == 0, "the counters were not reset by the last block"
    t_int4 = torch_int4_step()
    rows = {"device": dev, "sms": sms, "roofline_TBps": bw / 1e12, "copy_TBps": cbw / 1e12, "bytes": total,
            "ms": [t * 1e3 for t in times], "torch_int4_ms": t_int4 * 1e3, "rel_err": err, **meta}
    best = min(times)
    lines = [f"# Persistent W4 g128 decode step (prototype, {dev}), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "", f"`python3 benchmarks/gpu_persistent.py run` ({platform.node()}); roofline {bw / 1e12:.2f} TB/s "
             f"(copy {cbw / 1e12:.2f}); {meta['warps']} consumer warps + 1 producer per SM, {SLOTS} slots of "
             f"{meta['slot']} B; last layer vs torch dequantize: rel err {err:.1e}", "",
             "| step | ms | tok/s | % of roofline |", "|---|---|---|---|",
             f"| persistent kernel, {total / 1e9:.2f} GB (runs: {', '.join(f'{t * 1e3:.3f}' for t in times)}) | "
             f"{best * 1e3:.3f} | {1 / best:.0f} | {total / best / bw * 100:.0f}% |",
             f"| torch int4 g128 (128 launches, one graph) | {t_int4 * 1e3:.3f} | {1 / t_int4:.0f} | |", ""]
    print("\n".join(lines), flush=True)
    if save:
        save.mkdir(parents=True, exist_ok=True)
        (save / "gpu-persistent.md").write_text("\n".join(lines))
        (save / "gpu-persistent.json").write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["build", "run"])
    ap.add_argument("--out", default=".device/pers")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--warps", type=int, default=16, help="build: consumer warps per block")
    ap.add_argument("--slots", type=int, default=SLOTS, help="build: ring depth")
    ap.add_argument("--rows", default=",".join(map(str, TILE_ROWS)),
                    help="build: the most rows of a tile at K = 4096 and at K = 11008")
    ap.add_argument("--pieces", type=int, default=1, help="build: bulk copies per tile")
    ap.add_argument("--skip-wait", action="store_true", help="build: no wait for the previous linear (diagnosis)")
    ap.add_argument("--skip-math", action="store_true", help="build: no dot products (diagnosis: streaming alone)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--save", help="run: write gpu-persistent.md and .json there")
    a = ap.parse_args()
    if a.step == "build":
        build(Path(a.out), a.arch, a.warps, a.pieces, a.skip_wait, a.skip_math, a.slots,
              tuple(int(v) for v in a.rows.split(",")))
    else:
        run(Path(a.out), Path(a.save) if a.save else None, a.repeat)


if __name__ == "__main__":
    main()
