"""What a device API needs to launch the kernels of one scheduled TIR function: the device source TVM emits
(OpenCL C, WGSL, Metal, CUDA), and for each kernel call the host code makes, its arguments and launch extents.

`lower` runs the same TIR pipeline and host/device split as `tvm.compile` (tvm/tirx/build.py) and reads the host
function's `call_ffi_kernel` calls (LowerDeviceKernelLaunch): name, pointer and scalar arguments, and the grid/block
extents as expressions of the function's shape variables, tagged `blockIdx.x` ... `threadIdx.z`. With those,
`tests/export/test_mobile_gpu_kernels.py` runs an exported model's OpenCL kernels on PoCL and its WGSL on wgpu
(lavapipe), where this TVM wheel has neither device runtime. Test support only (apps launch kernels through the TVM
runtime): it lives beside its user, `mobile_gpu.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

AXES = ("x", "y", "z")


@dataclass
class Launch:
    kernel: str
    args: list          # per kernel argument: ("buffer", param index) or ("scalar", PrimExpr)
    tags: list[str]     # "blockIdx.x", "threadIdx.y", ...
    extents: list       # PrimExpr per tag

    def dims(self, env: dict[str, int]) -> tuple[list[int], list[int]]:
        """(grid, block) as 3 ints each, with the shape variables bound by `env` (name -> value)."""
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, e in zip(self.tags, self.extents):
            v = evaluate(e, env)
            kind, axis = tag.split(".")
            (grid if kind == "blockIdx" else block)[AXES.index(axis)] = v
        return grid, block


@dataclass
class Lowered:
    source: str                          # the device module's source
    params: list[tuple[str, tuple, str]]  # the prim func's buffers in call order: name, shape (IntImm/Var), dtype
    launches: list[Launch]               # in the order the host calls them
    lets: dict                           # host scalars the launches may use (name -> expression)
    offsets: tuple = ()                  # the buffers' element-offset variables

    def env(self, arrays) -> dict:
        """Names -> values for `evaluate`: the shape variables bound by `arrays`, the scalar parameters' values
        (passed in `arrays` at their places), element offsets 0 (whole arrays), then the host's let scalars."""
        scalars = {name: a.item() if hasattr(a, "item") else a
                   for (name, shape, _), a in zip(self.params, arrays) if shape is None}
        return {**self.lets, **dict.fromkeys(self.offsets, 0), **bind_shapes(self.params, arrays), **scalars}


_BINARY = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
           "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b, "Min": min, "Max": max,
           "Div": lambda a, b: int(a / b), "Mod": lambda a, b: a - int(a / b) * b}


def evaluate(expr, env: dict[str, int]) -> int:
    """The integer value of an index expression of the host code, with variables looked up by name in `env`."""
    kind = type(expr).__name__
    if isinstance(expr, (int, float)):   # a bound variable's value (float: a scalar parameter such as a scale)
        return expr
    if kind == "IntImm":
        return int(expr.value)
    if kind == "Var":
        if expr.name not in env:
            raise ValueError(f"launch expression needs {expr.name}, which is none of {sorted(env)}")
        v = env[expr.name]
        return evaluate(v, env) if not isinstance(v, (int, float)) else v
    if kind == "Cast":
        return evaluate(expr.value, env)
    if kind in _BINARY:
        return _BINARY[kind](evaluate(expr.a, env), evaluate(expr.b, env))
    raise ValueError(f"cannot evaluate {kind} in launch expression {expr}")


def bind_shapes(params, arrays) -> dict[str, int]:
    """Shape variables (name -> value) from the arrays passed for the prim func's buffers (same order)."""
    env: dict[str, int] = {}
    for (name, shape, _), a in zip(params, arrays):
        for d, n in zip(shape or (), getattr(a, "shape", ())):
            if type(d).__name__ == "Var":
                if env.setdefault(d.name, n) != n:
                    raise ValueError(f"{name}: {d.name} = {n}, bound to {env[d.name]} by an earlier buffer")
    return env


def _walk(node, found: list, lets: dict):
    """Collect the kernel launches and the let-bound scalars of host code (tvm 0.27 has no TIR visitor in Python)."""
    if type(node).__name__ == "Array" or isinstance(node, (list, tuple)):
        for x in node:
            _walk(x, found, lets)
        return
    if type(node).__name__ == "Call" and getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
        found.append(node)
        return
    if hasattr(node, "var") and hasattr(node, "value") and type(node.var).__name__ == "Var":
        lets[node.var.name] = node.value
    for field in ("seq", "body", "then_case", "else_case", "value"):
        child = getattr(node, field, None)
        if child is not None and not isinstance(child, (int, float, str)):
            _walk(child, found, lets)


def lower(func, target) -> Lowered:
    """Lower `func` (a scheduled PrimFunc) for `target` (a tvm.target.Target with a host) like tvm.compile does."""
    import importlib

    import tvm
    from tvm import tirx
    build = importlib.import_module("tvm.tirx.build")   # the name tvm.tirx.build is the function

    name = "main"
    # tvm 0.27: buffer parameters are Vars of BufferType (name, shape, dtype)
    # scalar parameters (attention kernels' flags and scales) have shape None; their values come with the arrays
    params = [(p.name, tuple(p.shape), str(p.dtype)) if type(p.ty).__name__ == "BufferType"
              else (p.name, None, str(p.ty.dtype)) for p in func.params]
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    mod = tirx.transform.BindTarget(target.with_host(target.host or "llvm"))(mod)
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    with target:
        mod = pipeline(mod)
    host, devices = build.split_host_device_mods(mod)
    sources = [build.codegen_build(finalize_device()(d), t).inspect_source() for t, d in devices.items()]
    if len(sources) != 1:
        raise ValueError(f"expected one device module for {target.kind.name}, got {len(sources)}")

    by_name = {p[0]: i for i, p in enumerate(params)}
    calls, lets = [], {}
    for _, f in host.functions.items():
        _walk(f.body, calls, lets)
    launches = []
    for call in calls:
        tags = [str(t) for t in call.attrs.launch_params]
        kernel, body = str(call.args[0].value), list(call.args[1:len(call.args) - len(tags)])
        args = []
        for a in body:
            if type(a).__name__ == "Call" and a.op.name == "tirx.buffer_data":
                buf = a.args[0].name
                if buf not in by_name:
                    raise ValueError(f"kernel {kernel}: buffer argument {buf} is none of {sorted(by_name)}")
                args.append(("buffer", by_name[buf]))
            else:
                args.append(("scalar", a))
        launches.append(Launch(kernel, args, tags, list(call.args[len(call.args) - len(tags):])))
    if not launches:
        raise ValueError("the host code launches no kernel")
    offsets = tuple(p.elem_offset.name for p in func.params
                    if type(p.ty).__name__ == "BufferType" and type(p.elem_offset).__name__ == "Var")
    return Lowered(sources[0], params, launches, lets, offsets)
