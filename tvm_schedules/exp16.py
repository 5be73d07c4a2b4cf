"""exp of float16 values on CPUs (llvm) as inline arithmetic that LLVM vectorises, with the results of the libm call it
replaces, bit for bit.

LLVM lowers an fp16 `exp` (the sigmoid of SiLU in the MLP's `silu(gate) * up` kernel: TVM's `tirx.sigmoid` becomes
1 / (1 + exp(-x)) in the input's type) to `fptrunc(expf(fpext(x)))`, one scalar libm call per element, which also
keeps the loop around it from being vectorised: on a 128-token SmolLM2 prefill with the int8 GEMMs that kernel was
12% of the CPU time. Here exp(x) is evaluated in float64 (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-9 Taylor
polynomial of exp(r) in Horner form, 2^n by building the exponent bits), rounded to float32 and then to float16 as
LLVM's promotion does: the float64 value is within ~1e-11 (relative) of exp(x), so after the float32 and float16
roundings it can only differ from libm's where exp(x) lies that close to a float16 rounding boundary. There are only
65536 float16 inputs: tests/tvm_schedules/test_exp16.py compares all of them with LLVM's own lowering, bit for bit
(a degree-6 polynomial already passes).

`register()` installs it as the llvm lowering of `tirx.exp` for float16 operands (scalar or vector); every other
dtype keeps LLVM's intrinsic. It is idempotent and, being exact, changes no exported model's results.
"""
from __future__ import annotations

import math

_LEVEL = 99        # above TVM's own llvm rule (10)
_TAYLOR = 9        # |r| <= 0.347: r^10 / 10! < 1e-11
_registered = False


def _dtype(e) -> tuple[str, int]:
    """(dtype string, lanes) of a PrimExpr."""
    dt = str(e.ty.dtype)
    return dt, int(dt.split("x")[1]) if "x" in dt else 1


def _exp_f64(x, lanes: int):
    """A float64 PrimExpr: exp(x) for float64 x (of `lanes` lanes) in [-120, 100] (clamped by the caller)."""
    from tvm import tirx

    def c(v, dt="float64"):
        e = tirx.const(v, dt)
        return tirx.Broadcast(e, lanes) if lanes > 1 else e
    n = tirx.round(x * c(1 / math.log(2)))
    # ln 2 split so that n * LN2_HI is exact for |n| < 2^11
    ln2_hi = float.fromhex("0x1.62e42fee00000p-1")
    ln2_lo = math.log(2) - ln2_hi
    r = x - n * c(ln2_hi) - n * c(ln2_lo)
    p = c(1 / math.factorial(_TAYLOR))
    for k in range(_TAYLOR - 1, -1, -1):
        p = p * r + c(1 / math.factorial(k))
    i64 = "int64" if lanes == 1 else f"int64x{lanes}"
    bits = tirx.shift_left(tirx.Cast(i64, n) + c(1023, "int64"), c(52, "int64"))
    return p * tirx.call_intrin("float64" if lanes == 1 else f"float64x{lanes}", "tirx.reinterpret", bits)


def _lower(op):
    from tvm import tirx
    x = op.args[0]
    dt, lanes = _dtype(x)
    if not dt.startswith("float16"):
        return tirx.call_llvm_pure_intrin(dt, "llvm.exp", x)   # what TVM's own llvm rule emits
    sfx = "" if lanes == 1 else f"x{lanes}"

    def b(v):
        e = tirx.const(v, "float64")
        return tirx.Broadcast(e, lanes) if lanes > 1 else e
    xd = tirx.Cast(f"float64{sfx}", x)
    # outside [-120, 100] float32 gives 0 or inf anyway; the clamp keeps 2^n's exponent bits in range
    e = _exp_f64(tirx.Min(tirx.Max(xd, b(-120.0)), b(100.0)), lanes)
    y = tirx.Cast(f"float16{sfx}", tirx.Cast(f"float32{sfx}", e))
    return tirx.Select(tirx.isnan(x), x, y)


def register():
    """Install the float16 exp lowering for llvm targets (once per process)."""
    global _registered
    if _registered:
        return
    from tvm.tirx.op import register_intrin_lowering
    register_intrin_lowering("tirx.exp", target="llvm", f=_lower, level=_LEVEL)
    _registered = True
