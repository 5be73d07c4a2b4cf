"""Linear layers of the exported relax model: a low-bit `QuantLinear` (fused dequantize + matmul, fp16 outlier
columns as a separate small NT-matmul, optional bias) and an fp16 `DenseLinear` (unquantized exports, lm_head), and
the embedding: fp16 `Embedding` or `QuantEmbedding` (`--embed-bits`: the gathered rows dequantized by
`tvm_schedules/gather.py`; tied to the output layer, its table also runs `quant_matmul` for the logits).

Both accumulate in fp32. The dequantize is a TE compute named "dequantize" so that the export pipeline fuses it into
the matmul (one kernel reads the packed words, never an fp16 copy of the weight), and the outlier gather (`take`)
stays its own kernel: a data-dependent read inside the reduction would stop dlight's GEMV/Matmul rules.

On CUDA (`decode_gemv=True`) a one-row call (decode) uses the hand-scheduled GEMV of `tvm_schedules/gemv.py`
instead. Like the CPU exports it rounds the activations to int8 per 32 values and multiplies with dp4a (3-bit weights
in dp4a3r4, dp4a3 or planes3), unless EDGEQUANT_ACT_DTYPE=fp16 (`pipeline.int8_decode_enabled`) asks for the exact
fp16 kernel (3 bits then in words3x32 only; dp4a3r4, dp4a3 and planes3 fall back to dlight).
On an H200, LLaMA-7B shapes: W4 63% of the read bandwidth, 1.76x torch's int4 GEMV; fp16 activations 49%, 1.35x
(benchmarks/results/gpu-nvidia-h200.md). The GEMV adds the fp16 outlier columns itself (one kernel, one rounding of
the fp32 sum): no extra launches. `QuantLinear.decode_fused` also takes the RMSNorm before a linear, the SiLU-gated
product before down_proj and the residual add after it into the GEMV (export/models/llama.py, DECODE_FUSIONS).
A [1, m]-row call on CUDA (prefill, all-position logits) at 4 or 2 bits runs the tensor-core GEMM of
`tvm_schedules/mma_gemm.py` (fp16 mma.sync, weights dequantized in registers; the outlier columns stay their own small
matmul, added in fp32); 3-bit weights keep dlight's fused kernel for prefill.
On x86 CPUs the export pipeline replaces one-row matmuls of the dequantize (found by the spec attribute it carries)
with the int8 dot-product GEMV of `tvm_schedules/cpu_int8.py`; see `export/pipeline.py`.
"""
from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgequant.tvm_schedules import dense_gemv, gemv, mma_gemm
from edgequant.tvm_schedules.dequant import QuantSpec, dequantize_te
from edgequant.tvm_schedules.gather import gather_dequantize_te

SPEC_ATTR = "edgequant.quant_spec"


def spec_to_str(spec: QuantSpec) -> str:
    return f"{spec.n},{spec.k},{spec.bits},{spec.group_size},{int(spec.sym)},{spec.layout},{int(spec.zeros_packed)}"


def spec_from_str(s: str) -> QuantSpec:
    n, k, bits, group, sym, layout, zeros_packed = str(s).split(",")
    return QuantSpec(int(n), int(k), int(bits), int(group), bool(int(sym)), layout, bool(int(zeros_packed)))


def take_clipped(x: Tensor, indices: Tensor, axis: int) -> Tensor:
    """`op.take` with out-of-range indices clamped to the edge. nn's take uses TVM's "fast" mode, which reads out
    of bounds on a bad index (and prints a segfault warning at every export); a clamp costs one min/max per index
    and turns a bad token id or outlier index into a wrong row instead of a crash."""
    from tvm import relax
    return op.wrap_nested(relax.op.take(x._expr, indices._expr, axis, mode="clip"), name="take")


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter name and shape) whose lookup is `take_clipped`."""

    def forward(self, x: Tensor) -> Tensor:
        return take_clipped(self.weight, x, axis=0)


GPU_MODES = ("gpu", "gpu-pdl")   # decode_gemv values that build the CUDA kernels


class _Packed(nn.Module):
    """A packed weight's parameters `qweight`, `scales`[, `zeros`], shaped by its spec."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        shapes = spec.param_shapes()
        self.qweight = nn.Parameter(*shapes["qweight"])
        self.scales = nn.Parameter(*shapes["scales"])
        self.zeros = nn.Parameter(*shapes["zeros"]) if "zeros" in shapes else None

    def params(self) -> list:
        return [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])


class QuantEmbedding(_Packed):
    """A quantized table [vocab, hidden] (parameters as a linear's): the lookup dequantizes the gathered rows only
    (ids clamped into the table)."""

    def forward(self, x: Tensor) -> Tensor:
        return op.tensor_expr_op(gather_dequantize_te(self.spec), "gather_dequantize", [x, *self.params()])


def quant_matmul(spec: QuantSpec, x: Tensor, params: list, decode_gemv: str | None = None, n_outliers: int = 0,
                 outliers: list | None = None, out_dtype: str = "float16", act: str = "fp16") -> Tensor:
    """x @ dequant(W)^T (+ the outlier columns' product) in fp32, as `out_dtype`: the kernels of `QuantLinear`, also
    run by a tied quantized table as the output layer; `act` picks the decode GEMV's activation type."""
    args = list(params)
    lead = tuple(x.shape[:-1])
    if decode_gemv and gemv.supports(spec, act) and all(isinstance(d, int) and d == 1 for d in lead):
        # without a global symbol of its own: the builder names (and dedupes) it per shape
        f = gemv.gemv_func(spec, lead=lead, gpu=decode_gemv in GPU_MODES, n_outliers=n_outliers,
                           out_dtype=out_dtype, act=act, pdl=decode_gemv == "gpu-pdl").without_attr("global_symbol")
        if n_outliers:
            args += outliers
        return op.tensor_ir_op(f, "decode_gemv", [x, *args], Tensor.placeholder((*lead, spec.n), out_dtype))
    if (decode_gemv in GPU_MODES and mma_gemm.supports(spec) and len(lead) == 2 and isinstance(lead[0], int)
            and lead[0] == 1 and not (isinstance(lead[1], int) and lead[1] == 1)):
        # prefill on tensor cores: one prim func for every prompt length (it picks its tile by m at launch)
        odt = "float32" if n_outliers else out_dtype
        f = mma_gemm.gemm_func(spec, out_dtype=odt).without_attr("global_symbol")
        y = op.tensor_ir_op(f, "prefill_gemm", [x, *args], Tensor.placeholder((*lead, spec.n), odt))
        if n_outliers:
            xo = take_clipped(x, outliers[0], axis=x.ndim - 1)
            y = y + op.matmul(xo, op.permute_dims(outliers[1]), out_dtype="float32")
        return y.astype(out_dtype) if y.dtype != out_dtype else y
    # the spec rides on the dequantize kernel: the CPU pipeline swaps one-row matmuls of it for the int8
    # GEMV (export/pipeline.py), knowing the target that this module is built without
    w = op.tensor_expr_op(dequantize_te(spec), "dequantize", args, attrs={SPEC_ATTR: spec_to_str(spec)})
    y = op.matmul(x, op.permute_dims(w), out_dtype="float32")
    if n_outliers:
        xo = take_clipped(x, outliers[0], axis=x.ndim - 1)
        y = y + op.matmul(xo, op.permute_dims(outliers[1]), out_dtype="float32")
    return y.astype(out_dtype) if y.dtype != out_dtype else y


class QuantLinear(_Packed):
    """y = x @ dequant(qweight, scales, zeros)^T + x[..., outlier_idx] @ outlier_weight^T + bias."""

    def __init__(self, spec: QuantSpec, n_outliers: int = 0, bias: bool = False, decode_gemv: str | None = None,
                 out_dtype: str = "float16"):
        """`decode_gemv`: "gpu" (CUDA), "gpu-pdl" (CUDA sm_90+, the GEMV kernels with programmatic dependent
        launch, export/pdl.py), "twin" (its serial CPU twin, for tests) or None (dlight everywhere);
        `out_dtype` float32 keeps logits unrounded (a quantized output layer)."""
        from .pipeline import int8_decode_enabled
        super().__init__(spec)
        self.n_outliers, self.out_dtype = n_outliers, out_dtype
        self.decode_act = "int8" if int8_decode_enabled() and gemv.supports(spec, "int8") else "fp16"
        self.decode_gemv = decode_gemv if decode_gemv and gemv.supports(spec, self.decode_act) else None
        self.outlier_idx = nn.Parameter((n_outliers,), "int32") if n_outliers else None
        self.outlier_weight = nn.Parameter((spec.n, n_outliers), "float16") if n_outliers else None
        self.bias = nn.Parameter((spec.n,), "float16") if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = quant_matmul(self.spec, x, self.params(), self.decode_gemv, self.n_outliers,
                         [self.outlier_idx, self.outlier_weight], self.out_dtype, self.decode_act)
        return y + self.bias if self.bias is not None else y

    def decode_fused(self, x: Tensor, norm=None, glu: bool = False, residual: Tensor | None = None,
                     silu_out: bool = False) -> Tensor | None:
        """norm(x) or silu(gate) * up of x = [gate | up] through this linear, plus `residual`, as one decode GEMV
        kernel (`gemv.gemv_func`'s prologue and residual; `norm` an nn.RMSNorm without bias); with `silu_out` (this
        linear a fused [gate; up]) silu(gate) * up of its output instead (the GEMV's epilogue, [..., N / 2]). None where
        that kernel does not apply (prefill, no GPU GEMV, outlier columns under a prologue, a bias before the
        residual or the epilogue, a config whose blocks do not hold whole gate/up pairs), and the caller runs the
        separate ops."""
        lead = tuple(x.shape[:-1])
        prologue = "rmsnorm" if norm is not None else ("silu_mul" if glu else None)
        if (self.decode_gemv is None or not all(isinstance(d, int) and d == 1 for d in lead)
                or (prologue and self.n_outliers) or (residual is not None and self.bias is not None)
                or (norm is not None and (type(norm) is not nn.RMSNorm or norm.bias is not None))):
            return None
        cfg = gemv.default_config(self.spec, act=self.decode_act, n_outliers=self.n_outliers)
        if silu_out and (self.bias is not None or not gemv.epilogue_fits(self.spec, cfg, self.n_outliers,
                                                                         residual is not None, self.out_dtype)):
            return None
        f = gemv.gemv_func(self.spec, cfg, lead=lead, gpu=self.decode_gemv in GPU_MODES, n_outliers=self.n_outliers,
                           out_dtype=self.out_dtype, act=self.decode_act, prologue=prologue,
                           pdl=self.decode_gemv == "gpu-pdl",
                           eps=float(norm.epsilon) if norm is not None else 1e-6,
                           residual=residual is not None,
                           epilogue="silu_mul" if silu_out else None).without_attr("global_symbol")
        args = [x] + ([norm.weight] if norm is not None else []) + self.params()
        args += [self.outlier_idx, self.outlier_weight] if self.n_outliers else []
        args += [residual] if residual is not None else []
        n = self.spec.n // 2 if silu_out else self.spec.n
        y = op.tensor_ir_op(f, "decode_gemv", args, Tensor.placeholder((*lead, n), self.out_dtype))
        return y + self.bias if self.bias is not None else y


class DenseLinear(nn.Module):
    """fp16 weight [N, K], fp32 accumulation; `out_dtype` float32 keeps logits unrounded. `decode_gemv` as
    QuantLinear's: on CUDA a one-row call runs `tvm_schedules/dense_gemv.py` (128-bit loads, the block's threads
    splitting K; with "gpu-pdl" programmatic dependent launch) instead of dlight's GEMV rule."""

    def __init__(self, k: int, n: int, bias: bool = False, out_dtype: str = "float16",
                 decode_gemv: str | None = None):
        self.weight = nn.Parameter((n, k), "float16")
        self.bias = nn.Parameter((n,), "float16") if bias else None
        self.out_dtype = out_dtype
        self.decode_gemv = decode_gemv if decode_gemv and dense_gemv.supports(n, k) else None

    def forward(self, x: Tensor) -> Tensor:
        lead = tuple(x.shape[:-1])
        if self.decode_gemv and all(isinstance(d, int) and d == 1 for d in lead):
            n, k = self.weight.shape
            f = dense_gemv.dense_gemv_func(n, k, gpu=self.decode_gemv in GPU_MODES, out_dtype=self.out_dtype,
                                           lead=lead, pdl=self.decode_gemv == "gpu-pdl").without_attr("global_symbol")
            y = op.tensor_ir_op(f, "decode_gemv_dense", [x, self.weight],
                                Tensor.placeholder((*lead, n), self.out_dtype))
            return y + self.bias if self.bias is not None else y
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        if self.out_dtype != "float32":
            y = y.astype(self.out_dtype)
        return y + self.bias if self.bias is not None else y
