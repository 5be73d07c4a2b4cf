"""Low-bit dequantization as TE compute, the fused dequantize + matmul and outlier-column kernels built from it, and
their NumPy references.

The packed layout is the checkpoint's own (DESIGN.md): `qweight` uint32 [N, ceil(K/vpw)] with vpw = 32 // bits
values per word LSB-first along K (3-bit leaves the top 2 bits of each word unused). Group g covers inputs
[g*G, (g+1)*G); the last group may be ragged, and G = -1 means one group per row, so `k // G` (with G = K for
per-channel) picks a scale for every layout. Asymmetric schemes read a uint8 zero point per group; symmetric ones use
the constant 2^(b-1). Outlier columns are a separate small fp16 NT-matmul: the checkpoint already stores q == z at
those columns (they dequantize to 0), so `y = x @ dq(W)^T + x[:, idx] @ W_out^T` is exact.

"planes3" (exactly 3 bits per weight instead of 3.2; the first 3-bit layout of the int8 decode GEMVs, which no
target exports any more: `bytes3` and `dp4a3` below replaced it; kept for the benchmarks' comparisons): each row is a 2-bit plane of ceil(K/16) words followed by a 1-bit plane of ceil(K/32) words. Inside a word,
value k sits at bit `(k % 8) * 4 + (k // 8) % 2 * 2` (2-bit plane) or `(k % 8) * 4 + (k // 8) % 4` (1-bit plane): the
8 consecutive values an 8-lane vector takes together share one word and differ only by the constant shifts 0, 4, ...,
28. With the checkpoint's 10-values-per-word layout those 8 lanes straddle words, need a division by 10 and 8 scalar
loads each, and the CPU GEMV ran 4x slower than at 4 bits. `repack_planes3_np` converts.

CPU exports (the int8 GEMV of `cpu_int8.py`, x86 and NEON) store them as "bytes3" (also exactly 3 bits per weight):
each 32 consecutive values of a row (a "lane": one activation block of the int8 kernel) take one word in each of three
planes of ceil(K/32) words (row = plane 0, plane 1, plane 2). Value t of a lane has byte i = t // 8 and part
j = t % 8; byte i of plane p holds part 2p at bits 0-2 and part 2p + 1 at bits 3-5 of that byte, and the spare bits
6-7 of the three bytes hold parts 6 and 7: part 6 = bits 6-7 of plane 0 | bit 6 of plane 1 << 2, part 7 = bit 7 of
plane 1 | bits 6-7 of plane 2 << 1. For a vector of lanes, `(w >> 3j') & 0x07070707` of one plane gives 4 codes per
lane (parts 0-5: one mask, or a shift and a mask, each), and parts 6 and 7 take two shifts, two masks and an OR; a
lane covers 32 weights where a planes3 word covers 16, so the per-lane fp32 work of the int8 kernel happens half as
often, and 4 bits' 8 times as often. `repack_bytes3_np` converts.

CUDA's fp16-activation GEMV (`EDGEQUANT_ACT_DTYPE=fp16`) reads "words3x32" (also exactly 3 bits per weight): each 32 consecutive values of a row
take 3 words; word j holds values 10j..10j+9 at bits 3i (the checkpoint's own word), and the spare top 2 bits of the
three words hold values 30 and 31: value 30 = bits 30-31 of word 0 | bit 30 of word 1 << 2, value 31 = bit 31 of
word 1 | bits 30-31 of word 2 << 1. A GPU thread then reads 128 values as three aligned 128-bit loads, and 30 of
every 32 values are contiguous 3-bit fields that the decode GEMV (`gemv.py`) turns into floats with one mask each.
`repack_w3x32_np` converts.

The int8-activation GEMV of CUDA exports reads "dp4a3" (exactly 3 bits per weight; what the export stores where N
is not a multiple of 4, else dp4a3r4 below): each 32 values of a row take two words of
a first region (2 ceil(K/32) words) and one word of a second (ceil(K/32) words), w0, w1 and w2. Byte L of word j
(j < 3) holds value 8j + L at bits 0-2 and value 8j + 4 + L at bits 3-5; its bits 6-7 hold the two low bits of value
24 + L (in w0) or 28 + L (in w1), and bits 6 and 7 of w2's byte L their third bits. One shift and one mask then leave
four codes in the bytes of a word for 24 of the 32 values, and two of each for the last 8 (dp4a's operand order:
`gemv._dp4a_terms`), against two shifts and two masks per four codes in planes3. `repack_dp4a3_np` converts.

"dp4a3r4" (CUDA exports' 3-bit layout, `layout_for_rows`) holds the same three words per 32 values (w0, w1, w2, bit for bit as dp4a3), but interleaves four rows:
rows 4m..4m+3 take one span of 4 * 3 ceil(K/32) words (the tensor's rows 4m..4m+3, shape unchanged), in which block b
of row 4m + r is words 12b + 3r .. 12b + 3r + 2. A GPU thread that computes a 32-value chunk for 4 rows then reads
its 12 words with three aligned 128-bit loads instead of a 64-bit and a 32-bit load per row (N a multiple of 4):
on the H200 the LLaMA-7B W3 decode step took 1.9% less time than with dp4a3 (benchmarks/results/gpu-nvidia-h200.md,
gpu12). `repack_dp4a3r4_np` converts.

OpenCL (android) and WebGPU exports store asymmetric zero points four to a uint32 word ("zeros_packed": group g at
bits 8*(g % 4) of word g // 4): WGSL has no 8-bit type at all, and TVM 0.27's OpenCL codegen turns a vectorised
gather of uint8 zero points into a scalar bit-pack expression that no OpenCL compiler accepts (both found by running
the kernels, tests/export/test_mobile_gpu_kernels.py). A uint32 gather is what the weights already use; the size
is unchanged. `pack_zeros_np` converts.

The same TE function feeds two users: `export/quant_linear.py` wraps it in `op.tensor_expr_op` (the relax pipeline
then fuses it into the matmul), and `quant_matmul_func` below builds a standalone prim func for kernel tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgequant import pack
from edgequant.schemes import QuantScheme

LAYOUTS = ("words", "planes3", "words3x32", "dp4a3", "bytes3", "dp4a3r4")
ROWS_R4 = 4   # dp4a3r4: rows interleaved per span (module docstring)


@dataclass(frozen=True)
class QuantSpec:
    """Shape, scheme and runtime layout of one quantized weight [N, K]. The scheme's layout facts (values per word,
    group length, zero point) belong to `edgequant.schemes.QuantScheme`; build a spec with `from_scheme`."""
    n: int
    k: int
    bits: int
    group_size: int          # -1: per channel
    sym: bool
    layout: str = "words"    # "words" (the checkpoint's) or, for 3 bits, one of LAYOUTS (module docstring)
    zeros_packed: bool = False  # zero points four per uint32 word instead of one uint8 each (module docstring)

    def __post_init__(self):
        if self.layout not in LAYOUTS or (self.layout != "words" and self.bits != 3):
            raise ValueError(f"layout {self.layout!r} does not apply to {self.bits}-bit weights")
        if self.layout == "dp4a3r4" and self.n % ROWS_R4:
            raise ValueError(f"layout dp4a3r4 interleaves {ROWS_R4} rows; N={self.n} is not a multiple")

    @classmethod
    def from_scheme(cls, scheme: QuantScheme, n: int, k: int, layout: str = "words",
                    zeros_packed: bool = False) -> "QuantSpec":
        return cls(n, k, scheme.bits, scheme.group_size, scheme.sym, layout, zeros_packed)

    scheme = property(lambda self: QuantScheme(self.bits, self.group_size, self.sym))
    vpw = property(lambda self: self.scheme.values_per_word)
    group_len = property(lambda self: self.scheme.group_len(self.k))
    n_groups = property(lambda self: self.scheme.groups(self.k))
    sym_zero = property(lambda self: self.scheme.sym_zero)

    @property
    def words(self) -> int:
        if self.layout == "planes3":
            return self.lo_words + -(-self.k // 32)
        if self.layout in ("words3x32", "dp4a3", "bytes3", "dp4a3r4"):
            return 3 * -(-self.k // 32)
        return self.scheme.packed_words(self.k)

    @property
    def lo_words(self) -> int:
        """planes3: words of the 2-bit plane (the 1-bit plane follows them); dp4a3: of the first region."""
        return 2 * -(-self.k // 32) if self.layout == "dp4a3" else -(-self.k // 16)

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensors the kernel reads, in call order: name -> (shape, dtype)."""
        out = {"qweight": ((self.n, self.words), "uint32"), "scales": ((self.n, self.n_groups), "float16")}
        if not self.sym:
            out["zeros"] = ((self.n, -(-self.n_groups // 4)), "uint32") if self.zeros_packed else \
                ((self.n, self.n_groups), "uint8")
        return out


# ------------------------------------------------------------------------------------------------ NumPy references
def unpack_np(qweight: np.ndarray, bits: int, k: int, layout: str = "words") -> np.ndarray:
    if layout == "planes3":
        return _unpack_planes3_np(qweight, k)
    if layout == "words3x32":
        return _unpack_w3x32_np(qweight, k)
    if layout == "dp4a3":
        return _unpack_dp4a3_np(qweight, k)
    if layout == "dp4a3r4":
        return _unpack_dp4a3_np(_rows_from_r4(qweight), k)
    if layout == "bytes3":
        return _unpack_bytes3_np(qweight, k)
    return pack.unpack(qweight, bits, k)


def _plane_shifts(values_per_word: int) -> np.ndarray:
    """Bit position of each value of a word in the planes3 layout (2-bit plane: 16 values, 1-bit plane: 32)."""
    v = np.arange(values_per_word, dtype=np.uint32)
    return (v % 8) * 4 + (v // 8) % (values_per_word // 8) * (32 // values_per_word)  # x the plane's bits


def _pack_plane(vals: np.ndarray, values_per_word: int) -> np.ndarray:
    n, k = vals.shape
    words = -(-k // values_per_word)
    padded = np.zeros((n, words * values_per_word), np.uint32)
    padded[:, :k] = vals
    shifted = padded.reshape(n, words, values_per_word) << _plane_shifts(values_per_word)
    return np.bitwise_or.reduce(shifted, axis=2).astype(np.uint32)


def repack_planes3_np(qweight: np.ndarray, k: int) -> np.ndarray:
    """Checkpoint 3-bit words [N, ceil(K/10)] -> planes3 words [N, ceil(K/16) + ceil(K/32)]."""
    q = unpack_np(qweight, 3, k)
    return np.concatenate([_pack_plane(q & 3, 16), _pack_plane(q >> 2, 32)], axis=1)


def _unpack_planes3_np(words: np.ndarray, k: int) -> np.ndarray:
    lo_words = -(-k // 16)
    lo = (words[:, :lo_words, None] >> _plane_shifts(16)) & np.uint32(3)
    hi = (words[:, lo_words:, None] >> _plane_shifts(32)) & np.uint32(1)
    n = words.shape[0]
    return lo.reshape(n, -1)[:, :k] | (hi.reshape(n, -1)[:, :k] << np.uint32(2))


def repack_w3x32_np(qweight: np.ndarray, k: int) -> np.ndarray:
    """Checkpoint 3-bit words [N, ceil(K/10)] -> words3x32 [N, 3 * ceil(K/32)] (module docstring)."""
    q = unpack_np(qweight, 3, k)
    n, blocks = q.shape[0], -(-k // 32)
    v = np.zeros((n, blocks * 32), np.uint32)
    v[:, :k] = q
    v = v.reshape(n, blocks, 32)
    words = np.zeros((n, blocks, 3), np.uint32)
    for j in range(3):
        words[:, :, j] = np.bitwise_or.reduce(v[:, :, 10 * j:10 * j + 10] << (np.arange(10, dtype=np.uint32) * 3),
                                              axis=2)
    v30, v31 = v[:, :, 30], v[:, :, 31]
    words[:, :, 0] |= (v30 & 3) << 30
    words[:, :, 1] |= ((v30 >> 2) << 30) | ((v31 & 1) << 31)
    words[:, :, 2] |= (v31 >> 1) << 30
    return words.reshape(n, blocks * 3)


def _unpack_w3x32_np(words: np.ndarray, k: int) -> np.ndarray:
    n = words.shape[0]
    w = words.reshape(n, -1, 3)
    body = (w[:, :, :, None] >> (np.arange(10, dtype=np.uint32) * 3)) & np.uint32(7)
    v30 = (w[:, :, 0] >> 30) | (((w[:, :, 1] >> 30) & 1) << 2)
    v31 = (w[:, :, 1] >> 31) | ((w[:, :, 2] >> 30) << 1)
    v = np.concatenate([body.reshape(n, -1, 30), v30[:, :, None], v31[:, :, None]], axis=2)
    return v.reshape(n, -1)[:, :k]


def _dp4a3_bits() -> tuple[np.ndarray, np.ndarray]:
    """dp4a3: for each value of a 32-value block, the (word, bit) of its bits 0, 1, 2 (word 0, 1, 2 = w0, w1, w2)."""
    word, bit = np.zeros((32, 3), np.int64), np.zeros((32, 3), np.int64)
    for v in range(24):
        j, r = v // 8, v % 8
        word[v], bit[v] = j, 8 * (r % 4) + 3 * (r // 4) + np.arange(3)
    for v in range(24, 32):
        t, lane = (v - 24) // 4, v % 4
        word[v], bit[v] = (t, t, 2), (8 * lane + 6, 8 * lane + 7, 8 * lane + 6 + t)
    return word, bit


def repack_dp4a3_np(qweight: np.ndarray, k: int) -> np.ndarray:
    """Checkpoint 3-bit words [N, ceil(K/10)] -> dp4a3 words [N, 3 * ceil(K/32)] (module docstring)."""
    q = unpack_np(qweight, 3, k).astype(np.uint32)
    n, blocks = q.shape[0], -(-k // 32)
    v = np.zeros((n, blocks, 32), np.uint32)
    v.reshape(n, -1)[:, :k] = q
    word, bit = _dp4a3_bits()
    w = np.zeros((n, blocks, 3), np.uint32)
    for i in range(32):
        for b in range(3):
            w[:, :, word[i, b]] |= ((v[:, :, i] >> np.uint32(b)) & np.uint32(1)) << np.uint32(bit[i, b])
    return np.concatenate([w[:, :, :2].reshape(n, 2 * blocks), w[:, :, 2]], axis=1)


def _unpack_dp4a3_np(words: np.ndarray, k: int) -> np.ndarray:
    n, blocks = words.shape[0], words.shape[1] // 3
    w = np.stack([words[:, 0:2 * blocks:2], words[:, 1:2 * blocks:2], words[:, 2 * blocks:]], axis=2)
    word, bit = _dp4a3_bits()
    v = np.zeros((n, blocks, 32), np.uint32)
    for i in range(32):
        for b in range(3):
            v[:, :, i] |= ((w[:, :, word[i, b]] >> np.uint32(bit[i, b])) & np.uint32(1)) << np.uint32(b)
    return v.reshape(n, -1)[:, :k]


def _r4_from_rows(words: np.ndarray) -> np.ndarray:
    """dp4a3 words [N, 3B] (w0, w1 of each block, then the w2s) -> dp4a3r4 [N, 3B] (module docstring)."""
    n, blocks = words.shape[0], words.shape[1] // 3
    w = np.stack([words[:, 0:2 * blocks:2], words[:, 1:2 * blocks:2], words[:, 2 * blocks:]], axis=2)  # [n, b, 3]
    return np.ascontiguousarray(w.reshape(n // ROWS_R4, ROWS_R4, blocks, 3).transpose(0, 2, 1, 3)).reshape(n, -1)


def _rows_from_r4(words: np.ndarray) -> np.ndarray:
    """dp4a3r4 words [N, 3B] -> dp4a3 words [N, 3B]."""
    n, blocks = words.shape[0], words.shape[1] // 3
    w = words.reshape(n // ROWS_R4, blocks, ROWS_R4, 3).transpose(0, 2, 1, 3).reshape(n, blocks, 3)
    return np.concatenate([w[:, :, :2].reshape(n, 2 * blocks), w[:, :, 2]], axis=1)


def layout_for_rows(layout: str, n: int) -> str:
    """The 3-bit runtime layout a weight of N rows gets where the target asks for `layout`: dp4a3r4 falls back to
    dp4a3 (the same words, one row at a time) where N is not a multiple of 4."""
    return "dp4a3" if layout == "dp4a3r4" and n % ROWS_R4 else layout


def repack_dp4a3r4_np(qweight: np.ndarray, k: int) -> np.ndarray:
    """Checkpoint 3-bit words [N, ceil(K/10)] -> dp4a3r4 words [N, 3 * ceil(K/32)] (module docstring; N % 4 == 0)."""
    if qweight.shape[0] % ROWS_R4:
        raise ValueError(f"layout dp4a3r4 interleaves {ROWS_R4} rows; N={qweight.shape[0]} is not a multiple")
    return _r4_from_rows(repack_dp4a3_np(qweight, k))


def repack_bytes3_np(qweight: np.ndarray, k: int) -> np.ndarray:
    """Checkpoint 3-bit words [N, ceil(K/10)] -> bytes3 words [N, 3 * ceil(K/32)] (module docstring)."""
    q = unpack_np(qweight, 3, k)
    n, lanes = q.shape[0], -(-k // 32)
    v = np.zeros((n, lanes * 32), np.uint32)
    v[:, :k] = q
    v = v.reshape(n, lanes, 4, 8)                      # [row, lane, byte i, part j]
    planes = np.zeros((3, n, lanes, 4), np.uint32)      # one byte each
    for p in range(3):
        planes[p] = v[..., 2 * p] | (v[..., 2 * p + 1] << 3)
    v6, v7 = v[..., 6], v[..., 7]
    planes[0] |= (v6 & 3) << 6
    planes[1] |= ((v6 >> 2) << 6) | ((v7 & 1) << 7)
    planes[2] |= (v7 >> 1) << 6
    words = np.bitwise_or.reduce(planes << (np.arange(4, dtype=np.uint32) * 8), axis=3)   # [3, n, lanes]
    return np.concatenate(list(words), axis=1).astype(np.uint32)


def _unpack_bytes3_np(words: np.ndarray, k: int) -> np.ndarray:
    n = words.shape[0]
    b = (words.reshape(n, 3, -1)[..., None] >> (np.arange(4, dtype=np.uint32) * 8)) & np.uint32(0xFF)  # [n,3,lane,i]
    parts = [b[:, j // 2] >> (3 * (j % 2)) & 7 for j in range(6)]
    parts.append((b[:, 0] >> 6) | (((b[:, 1] >> 6) & 1) << 2))
    parts.append((b[:, 1] >> 7) | ((b[:, 2] >> 6) << 1))
    return np.stack(parts, axis=3).reshape(n, -1)[:, :k]        # [n, lane, i, j] -> value 32 lane + 8 i + j


def repack_3bit_np(qweight: np.ndarray, k: int, layout: str) -> np.ndarray:
    """Checkpoint 3-bit words [N, ceil(K/10)] -> the runtime `layout` (one of LAYOUTS other than "words")."""
    repack = {"planes3": repack_planes3_np, "words3x32": repack_w3x32_np, "dp4a3": repack_dp4a3_np,
              "bytes3": repack_bytes3_np,
              "dp4a3r4": repack_dp4a3r4_np}
    if layout not in repack:
        raise ValueError(f"unknown 3-bit layout {layout!r}; one of {', '.join(repack)}")
    return repack[layout](qweight, k)


def pack_zeros_np(zeros: np.ndarray) -> np.ndarray:
    """uint8 zero points [N, G] -> uint32 words [N, ceil(G/4)], group g at bits 8 * (g % 4) of word g // 4."""
    n, g = zeros.shape
    padded = np.zeros((n, -(-g // 4) * 4), np.uint32)
    padded[:, :g] = zeros
    return np.bitwise_or.reduce(padded.reshape(n, -1, 4) << (np.arange(4, dtype=np.uint32) * 8), axis=2)


def unpack_zeros_np(words: np.ndarray, n_groups: int) -> np.ndarray:
    return ((words[:, :, None] >> (np.arange(4, dtype=np.uint32) * 8)) & 0xFF).reshape(words.shape[0], -1)[
        :, :n_groups].astype(np.uint8)


def dequantize_np(spec: QuantSpec, qweight, scales, zeros=None) -> np.ndarray:
    """fp32 [N, K] weights, `(q - z) * s` per group."""
    if zeros is not None and spec.zeros_packed:
        zeros = unpack_zeros_np(zeros, spec.n_groups)
    q = unpack_np(qweight, spec.bits, spec.k, spec.layout).astype(np.float32)
    g = np.arange(spec.k) // spec.group_len
    s = scales.astype(np.float32)[:, g]
    z = np.float32(spec.sym_zero) if spec.sym else zeros.astype(np.float32)[:, g]
    return (q - z) * s


def quant_matmul_np(spec: QuantSpec, x, qweight, scales, zeros=None, outlier_idx=None, outlier_weight=None, bias=None):
    """fp32 reference of the whole quantized linear: x [M, K] -> [M, N]."""
    y = x.astype(np.float32) @ dequantize_np(spec, qweight, scales, zeros).T
    if outlier_idx is not None and len(outlier_idx):
        y = y + x[:, outlier_idx].astype(np.float32) @ outlier_weight.astype(np.float32).T
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y


# ------------------------------------------------------------------------------------------------ TE / TIR
def weight_te(spec: QuantSpec, qweight, scales, zeros, n, k):
    """The fp16 TIR value of weight [n, k], `(q - z) * s` from the packed tensors: the one expression that the
    dequantize kernel and the embedding's row gather (`gather.py`) both compute."""
    from tvm import tirx

    bits, vpw, g = spec.bits, spec.vpw, spec.group_len
    if spec.layout == "planes3":
        # the lane part of the shift ((k % 8) * 4) is kept apart from the word part so that, vectorised over
        # 8 consecutive k, it is a constant vector and the rest a scalar (one shift each, no per-lane build)
        lane = tirx.Cast("uint32", (k % 8) * 4)
        lo = ((qweight[n, k // 16] >> lane) >> tirx.Cast("uint32", (k // 8) % 2 * 2)) & tirx.const(3, "uint32")
        hi = ((qweight[n, spec.lo_words + k // 32] >> lane) >> tirx.Cast("uint32", (k // 8) % 4)) & \
            tirx.const(1, "uint32")
        code = lo | (hi << tirx.const(2, "uint32"))
    elif spec.layout == "words3x32":
        i, base = k % 32, k // 32 * 3
        u = lambda v: tirx.const(v, "uint32")  # noqa: E731
        # min() keeps the unused branch of the select in bounds (both sides are evaluated)
        body = (qweight[n, base + tirx.min(i // 10, 2)] >> tirx.Cast("uint32", i % 10 * 3)) & u(7)
        v30 = (qweight[n, base] >> u(30)) | (((qweight[n, base + 1] >> u(30)) & u(1)) << u(2))
        v31 = (qweight[n, base + 1] >> u(31)) | ((qweight[n, base + 2] >> u(30)) << u(1))
        code = tirx.Select(i < 30, body, tirx.Select(i == 30, v30, v31))
    elif spec.layout in ("dp4a3", "dp4a3r4"):
        i, b = k % 32, k // 32
        u = lambda v: tirx.const(v, "uint32")  # noqa: E731
        j = tirx.min(i // 8, 2)
        if spec.layout == "dp4a3":
            # w0, w1 at 2b + j, w2 at lo_words + b, as arithmetic: TVM 0.27's CUDA codegen writes the condition of a
            # vectorised Select as `uint2 v = make_ushort2(...)`, which nvcc rejects (dlight's prefill kernel)
            def wj(jj):
                return qweight[n, 2 * b + jj + jj // 2 * (spec.lo_words - b - 2)]
        else:  # word 12b + 3r + jj of the span of rows 4m..4m+3 (row n = 4m + r)
            def wj(jj):
                f = b * (3 * ROWS_R4) + n % ROWS_R4 * 3 + jj
                return qweight[n // ROWS_R4 * ROWS_R4 + f // spec.words, f % spec.words]
        body = (wj(j) >> tirx.Cast("uint32", i % 4 * 8 + i % 8 // 4 * 3)) & u(7)
        # values 24-27 take their low bits from w0, 28-31 from w1: t = (i // 4) % 2 (no subtraction: a uint cast
        # of an expression that may be negative stops TVM's CUDA device passes)
        t = i // 4 % 2
        top = ((wj(t) >> tirx.Cast("uint32", i % 4 * 8 + 6)) & u(3)) | \
            (((wj(2) >> tirx.Cast("uint32", i % 4 * 8 + 6 + t)) & u(1)) << u(2))
        sel = tirx.Cast("uint32", i // 24)     # 0 for values 0-23, 1 for 24-31 (no Select: see above)
        code = body * (u(1) - sel) + top * sel
    elif spec.layout == "bytes3":
        u = lambda v: tirx.const(v, "uint32")  # noqa: E731
        lanes, lane, j = -(-spec.k // 32), k // 32, k % 8
        sh = tirx.Cast("uint32", k % 32 // 8 * 8)   # byte i of each plane's word
        w = [qweight[n, p * lanes + lane] >> sh for p in range(3)]
        # min() keeps the unused branch of the select in bounds (both sides are evaluated)
        body = (qweight[n, tirx.min(j // 2, 2) * lanes + lane] >> (sh + tirx.Cast("uint32", j % 2 * 3))) & u(7)
        v6 = ((w[0] >> u(6)) & u(3)) | (((w[1] >> u(6)) & u(1)) << u(2))
        v7 = ((w[1] >> u(7)) & u(1)) | (((w[2] >> u(6)) & u(3)) << u(1))
        code = tirx.Select(j < 6, body, tirx.Select(j == 6, v6, v7))
    else:
        code = (qweight[n, k // vpw] >> tirx.Cast("uint32", (k % vpw) * bits)) & tirx.const((1 << bits) - 1, "uint32")
    q = tirx.Cast("float32", code)
    if zeros is None:
        z = tirx.const(float(spec.sym_zero), "float32")
    elif spec.zeros_packed:
        grp = k // g
        z = tirx.Cast("float32", (zeros[n, grp // 4] >> tirx.Cast("uint32", grp % 4 * 8)) & tirx.const(0xFF, "uint32"))
    else:
        z = tirx.Cast("float32", zeros[n, k // g])
    # fp32 arithmetic, one rounding to fp16 at the end: the checkpoint's exact (q - z) * s, and on CPUs
    # without fp16 arithmetic it avoids emulating each fp16 operation
    return tirx.Cast("float16", (q - z) * tirx.Cast("float32", scales[n, k // g]))


def dequantize_te(spec: QuantSpec):
    """A TE function (qweight, scales[, zeros]) -> W fp16 [N, K] for `op.tensor_expr_op`.

    The compute is named "dequantize": the pipeline's fusion pass and dlight's GEMV/LowBatchGEMV rules find the
    dequantize block by that name."""
    from tvm import te

    def f(qweight, scales, zeros=None):
        return te.compute((spec.n, spec.k), lambda n, k: weight_te(spec, qweight, scales, zeros, n, k),
                          name="dequantize")

    return f


def quant_matmul_func(spec: QuantSpec, m: int | None = None, n_outliers: int = 0):
    """Standalone prim func of the fused kernel, `y = x @ dq(W)^T (+ xo @ W_out^T)`, in fp32 accumulation.

    Arguments in order: x [m, K] fp16, qweight, scales, [zeros], [xo [m, J] fp16, W_out [N, J] fp16], y [m, N] fp16.
    m None gives a symbolic row count (prefill) and an int gives static rows (decode uses 1). This is the shape the
    model's linears reach after the relax pipeline fuses the dequantize into the matmul; tests compare it to NumPy."""
    from tvm import te, tirx

    rows = tirx.Var("m", "int64") if m is None else m
    x = te.placeholder((rows, spec.k), "float16", name="x")
    params = [te.placeholder(shape, dtype, name=name) for name, (shape, dtype) in spec.param_shapes().items()]
    w = dequantize_te(spec)(*params)
    r = te.reduce_axis((0, spec.k), name="k")
    acc = te.compute((rows, spec.n), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r].astype("float32"),
                                                       axis=r), name="matmul")
    extra = []
    if n_outliers:
        xo = te.placeholder((rows, n_outliers), "float16", name="xo")
        wo = te.placeholder((spec.n, n_outliers), "float16", name="w_out")
        ro = te.reduce_axis((0, n_outliers), name="j")
        acc_o = te.compute((rows, spec.n), lambda i, j: te.sum(xo[i, ro].astype("float32") * wo[j, ro].astype("float32"),
                                                             axis=ro), name="outlier_matmul")
        y = te.compute((rows, spec.n), lambda i, j: (acc[i, j] + acc_o[i, j]).astype("float16"), name="cast")
        extra = [xo, wo]
    else:
        y = te.compute((rows, spec.n), lambda i, j: acc[i, j].astype("float16"), name="cast")
    return te.create_prim_func([x, *params, *extra, y]).with_attr("global_symbol", "main")
