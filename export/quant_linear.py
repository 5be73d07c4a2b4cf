"""Linear layers of the exported relax model: a low-bit `QuantLinear` (fused dequantize + matmul, fp16 outlier
columns as a separate small NT-matmul, optional bias) and an fp16 `DenseLinear` (unquantized exports, lm_head).

Both accumulate in fp32. The dequantize is a TE compute named "dequantize" so that the export pipeline fuses it into
the matmul (one kernel reads the packed words, never an fp16 copy of the weight), and the outlier gather (`take`)
stays its own kernel: a data-dependent read inside the reduction would stop dlight's GEMV/Matmul rules.

On CUDA (`decode_gemv=True`) a one-row call (decode) uses the hand-scheduled GEMV of `tvm_schedules/gemv.py`
instead; prefill keeps the fused kernel and dlight. Like the CPU exports it rounds the activations to int8 per 32
values and multiplies with dp4a (3-bit weights in planes3), unless EDGEQUANT_ACT_DTYPE=fp16 (`pipeline.
int8_decode_enabled`) asks for the exact fp16 kernel (3 bits then in words3x32 only; planes3 falls back to dlight).
On an H200, LLaMA-7B shapes: W4 63% of the read bandwidth, 1.76x torch's int4 GEMV; fp16 activations 49%, 1.35x
(benchmarks/results/gpu-nvidia-h200.md). The GEMV adds the fp16 outlier columns itself (one kernel, one rounding of
the fp32 sum): no extra launches.
On x86 CPUs the export pipeline replaces one-row matmuls of the dequantize (found by the spec attribute it carries)
with the int8 dot-product GEMV of `tvm_schedules/cpu_int8.py`; see `export/pipeline.py`.
"""
from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from edgequant.tvm_schedules import gemv
from edgequant.tvm_schedules.dequant import QuantSpec, dequantize_te

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


class QuantLinear(nn.Module):
    """y = x @ dequant(qweight, scales, zeros)^T + x[..., outlier_idx] @ outlier_weight^T + bias."""

    def __init__(self, spec: QuantSpec, n_outliers: int = 0, bias: bool = False, decode_gemv: str | None = None):
        """`decode_gemv`: "gpu" (CUDA), "twin" (its serial CPU twin, for tests) or None (dlight everywhere)."""
        from .pipeline import int8_decode_enabled
        self.spec, self.n_outliers = spec, n_outliers
        self.decode_act = "int8" if int8_decode_enabled() and gemv.supports(spec, "int8") else "fp16"
        self.decode_gemv = decode_gemv if decode_gemv and gemv.supports(spec, self.decode_act) else None
        shapes = spec.param_shapes()
        self.qweight = nn.Parameter(*shapes["qweight"])
        self.scales = nn.Parameter(*shapes["scales"])
        self.zeros = nn.Parameter(*shapes["zeros"]) if "zeros" in shapes else None
        self.outlier_idx = nn.Parameter((n_outliers,), "int32") if n_outliers else None
        self.outlier_weight = nn.Parameter((spec.n, n_outliers), "float16") if n_outliers else None
        self.bias = nn.Parameter((spec.n,), "float16") if bias else None

    def forward(self, x: Tensor) -> Tensor:
        args = [self.qweight, self.scales] + ([self.zeros] if self.zeros is not None else [])
        lead = tuple(x.shape[:-1])
        if self.decode_gemv and all(isinstance(d, int) and d == 1 for d in lead):
            # without a global symbol of its own: the builder names (and dedupes) it per shape
            f = gemv.gemv_func(self.spec, lead=lead, gpu=self.decode_gemv == "gpu", n_outliers=self.n_outliers,
                               act=self.decode_act).without_attr("global_symbol")
            if self.n_outliers:
                args += [self.outlier_idx, self.outlier_weight]
            y = op.tensor_ir_op(f, "decode_gemv", [x, *args], Tensor.placeholder((*lead, self.spec.n), "float16"))
        else:
            # the spec rides on the dequantize kernel: the CPU pipeline swaps one-row matmuls of it for the int8
            # GEMV (export/pipeline.py), knowing the target that this module is built without
            w = op.tensor_expr_op(dequantize_te(self.spec), "dequantize", args,
                                  attrs={SPEC_ATTR: spec_to_str(self.spec)})
            y = op.matmul(x, op.permute_dims(w), out_dtype="float32")
            if self.n_outliers:
                xo = take_clipped(x, self.outlier_idx, axis=x.ndim - 1)
                y = y + op.matmul(xo, op.permute_dims(self.outlier_weight), out_dtype="float32")
        if y.dtype != "float16":
            y = y.astype("float16")
        return y + self.bias if self.bias is not None else y


class DenseLinear(nn.Module):
    """fp16 weight [N, K], fp32 accumulation; `out_dtype` float32 keeps logits unrounded."""

    def __init__(self, k: int, n: int, bias: bool = False, out_dtype: str = "float16"):
        self.weight = nn.Parameter((n, k), "float16")
        self.bias = nn.Parameter((n,), "float16") if bias else None
        self.out_dtype = out_dtype

    def forward(self, x: Tensor) -> Tensor:
        y = op.matmul(x, op.permute_dims(self.weight), out_dtype="float32")
        if self.out_dtype != "float32":
            y = y.astype(self.out_dtype)
        return y + self.bias if self.bias is not None else y
