"""Run the kernels an `android` (OpenCL C) or `webgpu` (WGSL) export emits on software drivers: PoCL through pyopencl
and Mesa's lavapipe through wgpu. The TVM wheel has neither device runtime, so this module plays the host: it walks
the model's call_tir graph after the export's scheduling passes, lowers each kernel with `kernel_launch.py`
(source + the launch extents TVM's host code computes) and launches it with those extents.

PoCL (Debian's 3.1 CPU device) has no cl_khr_fp16. Where the device lacks it, TVM's OpenCL C is compiled unchanged
but with `half` #defined as `float` in a prelude and fp16 tensors uploaded as fp32: the bit unpacking, group and zero-point
indexing, outlier gathers and launch geometry run as written, the fp16 rounding of intermediates does not (a phone's
driver compiles the same source with real half). `OpenCLRunner.fp16` says which happened.
"""
from __future__ import annotations

import re

import numpy as np


# prepended to the source (not -D options, which would also rename the driver's own builtin declarations)
_HALF_AS_FLOAT = "".join(f"#define {a}{n} {b}{n}\n" for n in ("", 2, 3, 4, 8, 16)
                         for a, b in (("half", "float"), ("convert_half", "convert_float"))) + "#define cl_khr_fp16 1\n"


def resolve(lowered, arrays) -> list[dict]:
    """The launches of `lowered` for these arrays as plain data (no TVM objects): kernel, args ("buffer", index) or
    ("scalar", value), grid and block; what `execute` needs, and what `record` writes for replay elsewhere."""
    from tests.export import kernel_launch
    env = lowered.env(arrays)
    plan = []
    for launch in lowered.launches:
        grid, block = launch.dims(env)
        args = [[kind, v if kind == "buffer" else kernel_launch.evaluate(v, env)] for kind, v in launch.args]
        plan.append({"kernel": launch.kernel, "args": args, "grid": grid, "block": block})
    return plan


def scheduled_module(model, spec: dict, target):
    """The relax module of `model` (an nn.Module) after the export's scheduling passes for `target`."""
    import tvm
    from edgequant.export.pipeline import scheduling_passes
    mod, _ = model.export_tvm(spec=spec)
    with target:
        return tvm.transform.Sequential(scheduling_passes(target))(mod)


def run_graph(mod, fn: str, inputs: dict, runner, target):
    """Evaluate relax function `fn` (a dataflow block of call_tir) with `inputs` (parameter name -> array)."""
    import tvm
    from tests.export import kernel_launch
    func = mod[fn]
    env = {p.name: inputs[p.name.replace(".", "_")] for p in func.params}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    lowered_cache = {}
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if not (isinstance(call, tvm.relax.Call) and call.op == call_tir):
                raise AssertionError(f"{b.var.name}: only call_tir is interpreted here, got {call}")
            gv = call.args[0]
            if gv.name_hint not in lowered_cache:
                lowered_cache[gv.name_hint] = kernel_launch.lower(mod[gv], target)
            lowered = lowered_cache[gv.name_hint]
            arrays = [env[a.name] for a in call.args[1].fields]
            name, shape, dtype = lowered.params[-1]
            sizes = kernel_launch.bind_shapes(lowered.params[:-1], arrays)
            out = np.zeros([kernel_launch.evaluate(d, sizes) for d in shape], dtype)
            runner.run(lowered, arrays + [out])
            env[b.var.name] = out
    return env[func.body.body.name]


def _pyopencl():
    import pyopencl as cl
    return cl


class OpenCLRunner:
    def __init__(self):
        cl = _pyopencl()
        # a GPU first where one is installed (replay on a GPU machine), else PoCL's CPU device
        devices = sorted((d for p in cl.get_platforms() for d in p.get_devices()),
                         key=lambda d: not d.type & cl.device_type.GPU)
        if not devices:
            raise RuntimeError("no OpenCL device (install pocl-opencl-icd)")
        self.device = devices[0]
        self.ctx = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.ctx)
        self.fp16 = "cl_khr_fp16" in self.device.extensions
        self._programs = {}

    def program(self, source: str):
        cl = _pyopencl()
        if source not in self._programs:
            text = source if self.fp16 else _HALF_AS_FLOAT + source
            self._programs[source] = cl.Program(self.ctx, text).build()
        return self._programs[source]

    def run(self, lowered, arrays, outputs=(-1,)):
        """Launch every kernel of `lowered` on `arrays` (the prim func's buffers, then the values of its scalar
        parameters, if any); the arrays at `outputs` are written back."""
        self.execute(lowered.source, resolve(lowered, arrays), arrays, outputs)

    def execute(self, source: str, plan: list[dict], arrays, outputs=(-1,)):
        cl = _pyopencl()
        prog = self.program(source)
        host = [a.astype(np.float32) if a.dtype == np.float16 and not self.fp16 else np.ascontiguousarray(a)
                for a in arrays]
        mf = cl.mem_flags
        bufs = [cl.Buffer(self.ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=h) if h.nbytes
                else cl.Buffer(self.ctx, mf.READ_WRITE, 4) for h in host]
        for launch in plan:
            grid, block = launch["grid"], launch["block"]
            scalars = iter(_cl_scalar_types(source, launch["kernel"]))
            args = [bufs[v] if kind == "buffer" else next(scalars)(v) for kind, v in launch["args"]]
            kern = getattr(prog, launch["kernel"])
            kern(self.queue, [g * b for g, b in zip(grid, block)], block, *args)
        for i in outputs:
            cl.enqueue_copy(self.queue, host[i], bufs[i])
        self.queue.finish()
        for i in outputs:
            arrays[i][...] = host[i].astype(arrays[i].dtype)


_CL_SCALARS = {"long": np.int64, "int": np.int32, "uint": np.uint32, "ulong": np.uint64, "float": np.float32}


def _cl_scalar_types(source: str, kernel: str):
    """numpy types of the scalar (non-pointer) parameters of `kernel`, read from its OpenCL C signature."""
    m = re.search(rf"__kernel void {re.escape(kernel)}\(([^)]*)\)", source)
    out = []
    for p in m.group(1).split(","):
        p = p.strip()
        if "*" not in p:
            out.append(_CL_SCALARS[p.split()[0]])
    return out


class WebGPURunner:
    def __init__(self):
        import wgpu
        self.wgpu = wgpu
        adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        if adapter is None:
            raise RuntimeError("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
        self.adapter_info = dict(adapter.info)
        features = ["shader-f16"] if "shader-f16" in adapter.features else []
        self.device = adapter.request_device_sync(required_features=features)
        self._modules = {}

    def run(self, lowered, arrays, outputs=(-1,)):
        self.execute(lowered.source, resolve(lowered, arrays), arrays, outputs)

    def execute(self, full_source: str, plan: list[dict], arrays, outputs=(-1,)):
        wgpu = self.wgpu
        dev = self.device
        usage = wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST
        bufs = []
        for a in arrays:
            data = np.ascontiguousarray(a).tobytes()
            data += b"\0" * (-len(data) % 4 or (4 if not data else 0))
            bufs.append(dev.create_buffer_with_data(data=data, usage=usage))
        for launch in plan:
            source = _wgsl_kernel_source(full_source, launch["kernel"])
            if source not in self._modules:
                self._modules[source] = dev.create_shader_module(code=source)
            module, bindings, pod_fields = self._modules[source], _wgsl_bindings(source), _wgsl_pod_fields(source)
            grid = launch["grid"]
            ptrs = [v for kind, v in launch["args"] if kind == "buffer"]
            scalars = [v for kind, v in launch["args"] if kind == "scalar"]
            # TVM's WebGPU runtime folds a grid x wider than the device limit into z and passes the last block index
            # of x as packGridDimX (the kernel returns early past it)
            gx = grid[0]
            limit = dev.limits["max-compute-workgroups-per-dimension"]
            dispatch = [min(gx, limit), grid[1], -(-gx // limit) * grid[2]]
            pod = [*scalars, gx - 1]
            assert len(pod) == len(pod_fields), (pod_fields, pod)
            packed = b"".join(np.array(v, {"i32": np.int32, "u32": np.uint32, "f32": np.float32}[t]).tobytes()
                              for v, t in zip(pod, pod_fields))
            packed += b"\0" * (-len(packed) % 16)
            uni = dev.create_buffer_with_data(data=packed, usage=wgpu.BufferUsage.UNIFORM)
            entries, layout_entries = [], []
            for i, (binding, access) in enumerate(bindings):
                buf = bufs[ptrs[i]] if access != "uniform" else uni
                btype = {"read": wgpu.BufferBindingType.read_only_storage,
                         "read_write": wgpu.BufferBindingType.storage,
                         "uniform": wgpu.BufferBindingType.uniform}[access]
                layout_entries.append({"binding": binding, "visibility": wgpu.ShaderStage.COMPUTE,
                                       "buffer": {"type": btype}})
                entries.append({"binding": binding, "resource": {"buffer": buf, "offset": 0, "size": buf.size}})
            bgl = dev.create_bind_group_layout(entries=layout_entries)
            pipeline = dev.create_compute_pipeline(
                layout=dev.create_pipeline_layout(bind_group_layouts=[bgl]),
                compute={"module": module, "entry_point": launch["kernel"]})
            bind_group = dev.create_bind_group(layout=bgl, entries=entries)
            enc = dev.create_command_encoder()
            cp = enc.begin_compute_pass()
            cp.set_pipeline(pipeline)
            cp.set_bind_group(0, bind_group)
            cp.dispatch_workgroups(*dispatch)
            cp.end()
            dev.queue.submit([enc.finish()])
        for i in outputs:
            out = np.frombuffer(dev.queue.read_buffer(bufs[i]), np.uint8)[:arrays[i].nbytes]
            arrays[i][...] = out.view(arrays[i].dtype).reshape(arrays[i].shape)


def _wgsl_kernel_source(source: str, kernel: str) -> str:
    """TVM's WebGPU module holds one shader per kernel; inspect_source joins them with a dashed comment line."""
    parts = [p for p in re.split(r"^//-{10,}$", source, flags=re.M) if re.search(rf"\bfn {re.escape(kernel)}\(", p)]
    if len(parts) != 1:
        raise ValueError(f"kernel {kernel}: {len(parts)} shaders define it")
    return parts[0]


def _wgsl_bindings(source: str) -> list[tuple[int, str]]:
    """(binding, "read" / "read_write" / "uniform") of the shader's group-0 resources, in binding order."""
    out = [(int(b), acc or "uniform") for b, acc in
           re.findall(r"@group\(0\) @binding\((\d+)\) var<(?:storage, (read|read_write)|uniform)>", source)]
    return sorted(out)


def _wgsl_pod_fields(source: str) -> list[str]:
    m = re.search(r"struct PODArgs \{([^}]*)\}", source)
    return [t.strip() for _, t in re.findall(r"(\w+):\s*(\w+)", m.group(1))] if m else []


class Recorder:
    """Wraps a runner and writes every call (source, plan, inputs, the output it produced) to `folder`, so the same
    launches can be replayed on another machine's driver without TVM (`python mobile_gpu.py replay FOLDER`)."""

    def __init__(self, runner, kind: str, folder):
        from pathlib import Path
        self.runner, self.kind, self.folder = runner, kind, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def run(self, lowered, arrays):
        import json
        plan = resolve(lowered, arrays)
        inputs = [a.copy() for a in arrays]
        self.runner.execute(lowered.source, plan, arrays)
        n = len(list(self.folder.glob("*.json")))
        (self.folder / f"{n:05d}.json").write_text(json.dumps({"kind": self.kind, "source": lowered.source,
                                                                "plan": plan}))
        np.savez(self.folder / f"{n:05d}.npz", *inputs, out=arrays[-1])


def replay(folder) -> int:
    """Run recorded calls on this machine's OpenCL / Vulkan drivers; print the largest difference to the recorded
    output of each call, relative to that output's largest magnitude. Returns the number of calls over 1e-2."""
    import json
    from pathlib import Path
    runners, bad = {}, 0
    for f in sorted(Path(folder).glob("*.json")):
        rec = json.loads(f.read_text())
        if rec["kind"] not in runners:
            runners[rec["kind"]] = OpenCLRunner() if rec["kind"] == "opencl" else WebGPURunner()
            r = runners[rec["kind"]]
            print(f"# {rec['kind']}: " + (f"{r.device.name} ({r.device.platform.name}), cl_khr_fp16 {r.fp16}"
                                          if rec["kind"] == "opencl" else str(r.adapter_info.get("device"))))
        data = np.load(f.with_suffix(".npz"))
        arrays = [data[f"arr_{i}"] for i in range(len(data.files) - 1)]
        want = data["out"].astype(np.float32)
        arrays[-1] = np.zeros_like(arrays[-1])
        runners[rec["kind"]].execute(rec["source"], rec["plan"], arrays)
        err = float(np.abs(arrays[-1].astype(np.float32) - want).max() / max(np.abs(want).max(), 1e-6))
        bad += err > 1e-2
        print(f"{f.stem} {rec['kind']:7} {rec['plan'][0]['kernel']:40} shape {tuple(want.shape)} rel.err {err:.2e}")
    return bad


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != "replay":
        sys.exit("usage: python tests/export/mobile_gpu.py replay FOLDER")
    sys.exit(1 if replay(sys.argv[2]) else 0)
