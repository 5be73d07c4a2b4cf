"""Checkpoint -> DIST folder: build the relax model, compile it for a target preset, write the library, weights,
tokenizer and the MLC/edgequant metadata. The folder is filled under a temporary sibling name and renamed into place
only when complete, so an interrupted export never leaves a half-written DIST.
"""
from __future__ import annotations

import json
import shutil
import sys
import re
import time
from pathlib import Path

from edgequant.api import load_tokenizer
from edgequant.atomic import atomic_output_dir, check_not_the_input, output_lock, scratch_inside
from edgequant.entry import native_code
from edgequant.errors import EdgequantError
from edgequant.memory import PREFILL_CHUNK   # the memory plan sizes temporaries by it too

from . import graph_decode, pdl, targets
from .dist import EXPORT_JSON
from .params import open_source, write_tensor_cache

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json")   # one of them makes a usable tokenizer


def _log(progress: bool, msg: str):
    if progress:
        print(f"[export] {msg}", file=sys.stderr, flush=True)


def _add_metadata(mod, meta: dict):
    """`_metadata()` -> JSON string, as MLC's model libraries carry it."""
    import tvm
    from tvm import relax
    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(meta, sort_keys=True)))
    mod = bb.get()
    gv = mod.get_global_var("_metadata")
    mod[gv] = mod[gv].with_attr("global_symbol", "_metadata")
    return mod


def _param_list(named_params, plans: dict) -> list[dict]:
    """name, shape, dtype of each parameter; a quantized module's packed words, scales and zero points also carry
    their bit width (schemes may differ per module), which the DIST checks bound zero points by."""
    out = []
    for n, p in named_params:
        mod, _, leaf = n.rpartition(".")
        plan = plans.get(mod)
        bits = plan.spec.bits if plan is not None and plan.spec is not None and leaf in ("qweight", "scales", "zeros") \
            else None
        out.append({"name": n, "shape": [int(x) for x in p.shape], "dtype": p.dtype, **({"bits": bits} if bits else {})})
    return out


def _walk(mod):
    for m in mod.imports:
        yield m
        yield from _walk(m)


def prefill_chunk(arch) -> int:
    """Tokens per prefill call: never more than the context, nor than a sliding window (the cache's kernel for a
    chunk's attention to itself has no window: tvm_schedules/workarounds.py own_attention)."""
    return min(PREFILL_CHUNK, arch.context_window, arch.sliding_window or PREFILL_CHUNK)


def build_module(source, preset, arch=None, system_lib_prefix=None):
    """(compiled executable, named params, tvm target, function names) for a weight source."""
    tgt = targets.tvm_target(preset, arch)
    with native_code():
        return _build(source, preset, tgt, system_lib_prefix)


def _build(source, preset, tgt, system_lib_prefix):
    import tvm
    from tvm import relax

    from .models import graph_for
    from .pipeline import relax_pipeline
    model = graph_for(source.config)[1](source.arch, source.plans(), tgt)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    mod = graph_decode.mark_static(mod)
    meta = {"model_type": source.arch.model_type, "quantization": source.quantization,
            "context_window_size": source.arch.context_window, "prefill_chunk_size": prefill_chunk(source.arch),
            "sliding_window_size": -1, "attention_sink_size": -1, "tensor_parallel_shards": 1,
            "kv_state_kind": "kv_cache", "params": _param_list(named_params, source.plans())}
    mod = _add_metadata(mod, meta)
    functions = sorted(gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function))
    if preset.system_lib:
        # the app registers the library under this prefix (tvm.runtime.system_lib(prefix) / the C++ equivalent)
        mod = mod.with_attr("system_lib_prefix", system_lib_prefix)
        ex = relax.build(mod, tgt, relax_pipeline=relax_pipeline(tgt), system_lib=True)
    else:
        # CUDA: relax's RewriteCUDAGraph captures the static parts of prefill and decode once and replays them as
        # CUDA graphs; SmolLM2-135M decode on an H200 went from ~370 to ~850 tok/s (apps/cuda/README.md)
        cfg = {"relax.backend.use_cuda_graph": True} if preset.name == "cuda" else {}
        with tvm.transform.PassContext(config=cfg):
            # sm_90+: the GEMV kernels launch with PDL (export/pdl.py)
            tir = pdl.register() if pdl.supported(tgt) else "default"
            ex = tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt), tir_pipeline=tir)
    return ex, named_params, tgt, functions


def export_model(checkpoint, target: str = "cpu", output=None, arch: str | None = None,
                 system_lib_prefix: str | None = None, progress: bool = True) -> Path:
    """Export `checkpoint` (quantized checkpoint or HF folder) for `target` into `output`; returns the folder."""
    import tvm
    preset = targets.get_preset(target)
    if arch and preset.name != "cuda":
        raise EdgequantError(f"--arch applies to the cuda target only, not '{target}'")
    targets.parse_archs(arch)   # a bad --arch is refused before minutes of compiling
    if system_lib_prefix is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", system_lib_prefix):
        raise EdgequantError(f"--system-lib-prefix {system_lib_prefix!r} must be a C identifier (letters, digits, "
                             "underscores; not starting with a digit), e.g. mymodel_")
    source = open_source(checkpoint, preset.packing3, preset.zeros_packed)
    if not any((source.path / n).is_file() for n in TOKENIZER_VOCABS):
        raise EdgequantError(f"{source.path} has no tokenizer (tokenizer.json or tokenizer.model); `run`, `chat` and "
                             "`eval` of the DIST need it: save the model's tokenizer into that folder and export again")
    # loaded as the DIST's runners will load it: an unreadable tokenizer.json was copied into a DIST no runner could
    # use, without a word (sixteenth re-run, S41)
    load_tokenizer(source.path, "restore the model's tokenizer files in that folder and export again")
    out = Path(output or f"{Path(str(checkpoint)).name}-{target}").expanduser().resolve()
    check_not_the_input(out, source.path, "exported", "DIST")
    with output_lock(out, EXPORT_JSON):
        prefix = system_lib_prefix or _default_prefix(source)
        t0 = time.time()
        _log(progress, f"{source.path.name}: {source.arch.model_type}, {source.arch.num_layers} layers, "
                       f"{source.quantization} -> {preset.name}")
        ex, named_params, tgt, functions = build_module(source, preset, arch, prefix if preset.system_lib else None)
        t_compile = time.time() - t0
        _log(progress, f"compiled in {t_compile:.1f}s")
        with atomic_output_dir(out, marker=EXPORT_JSON) as tmp:
            _check_space(tmp, out, named_params)
            library, link_note, cc = preset.library, None, None
            if preset.name == "cpu-arm64":
                # a shared library for aarch64 needs an aarch64 linker; without one ship the objects (lib.tar)
                cc = shutil.which("aarch64-linux-gnu-g++") or shutil.which("aarch64-linux-gnu-gcc")
                if not cc:
                    library = "lib.tar"
                    link_note = "no aarch64 linker here: on the target run `tar xf lib.tar && g++ -shared -o lib.so *.o`"
                    _log(progress, link_note)
            with scratch_inside(tmp):
                ex.export_library(str(tmp / library), **({"cc": cc} if cc else {}))   # a full disk: atomic_output_dir
                cuda = None
                if preset.name == "cuda":
                    from .cuda import compile_fatbin
                    src = next((m.inspect_source() for m in _walk(ex.mod) if m.kind == "cuda"), None)
                    if src is None:
                        raise EdgequantError("the CUDA build produced no device code")
                    _log(progress, f"compiling device code with nvcc for {', '.join(targets.parse_archs(arch))}")
                    cuda = compile_fatbin(src, targets.parse_archs(arch), tmp)
            names = [n for n, _ in named_params]
            _log(progress, f"writing {len(names)} weight tensors")
            weight_bytes = write_tensor_cache(source, names, tmp, {n: [int(x) for x in p.shape] for n, p in named_params})
            _copy_tokenizer(source.path, tmp)
            device_code = sorted({m.kind for m in _walk(ex.mod) if m.kind in ("cuda", "metal", "opencl", "webgpu")})
            meta = {
                "format_version": FORMAT_VERSION, "target": preset.name, "tvm_target": str(tgt),
                "tvm_version": tvm.__version__, "device": preset.device, "library": library, "link_note": link_note,
                "system_lib_prefix": prefix if preset.system_lib else None, "device_code": device_code,
                "cuda": cuda, "source": str(source.path), "quantization": source.quantization,
                "packing3": preset.packing3, "zeros_packed": preset.zeros_packed,
                "model": {**source.arch.__dict__}, "functions": functions,
                "params": _param_list(named_params, source.plans()),
                "weight_bytes": weight_bytes, "prefill_chunk_size": prefill_chunk(source.arch),
                "build_time_s": round(time.time() - t0, 2), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            (tmp / "mlc-chat-config.json").write_text(json.dumps(_mlc_chat_config(source, meta), indent=2))
            (tmp / EXPORT_JSON).write_text(json.dumps(meta, indent=2))
            _check_own_output(tmp, out, source.path)
        _log(progress, f"wrote {out} ({weight_bytes / 2**20:.1f} MiB of weights) in {time.time() - t0:.1f}s")
        return out


def _check_own_output(tmp: Path, out: Path, source: Path) -> None:
    """Read the new DIST as its runners will, before it replaces anything at `out`: a DIST that export itself calls
    damaged (a config number out of the runners' range) must never be left behind."""
    from .dist import _FIX, read_export_info
    try:
        read_export_info(tmp)
    except EdgequantError as e:
        why = str(e).replace(str(tmp), str(out)).removesuffix(f"; {_FIX}")
        raise EdgequantError(f"the DIST built from {source} would be refused by its runners ({why}); nothing was "
                             f"written to {out}: check the model's config.json") from None


def _default_prefix(source) -> str:
    s = "".join(ch if ch.isalnum() else "_" for ch in f"{source.arch.model_type}_{source.quantization}")
    return f"{s}_"


# bytes for the library and its objects while TVM links them: the libraries are 1-3 MB (a tiny model's 0.9 MB, 61
# kernels), the objects as large again; 64 MiB refused exports that fit small volumes (eighteenth re-run, U9)
LINK_SPACE = 8 << 20


def _check_space(tmp: Path, out: Path, named_params) -> None:
    """Room for the weights and the library where the export writes them. LLVM ends the process when it cannot write
    an object ("LLVM ERROR: IO failure on output stream", no cleanup: eighteenth re-run, T39), so a disk too full
    for the export is found before anything is written, in one line."""
    import math

    from .dist import itemsize
    need = LINK_SPACE + sum(math.prod(int(x) for x in p.shape) * itemsize(str(p.dtype)) for _, p in named_params)
    free = shutil.disk_usage(tmp).free
    if free < need:
        raise EdgequantError(f"not enough space to write {out}: the export needs about {-(-need >> 20)} MiB, "
                             f"{free >> 20} MiB are free there; free some space or choose another output folder "
                             "(nothing was changed)")


def _copy_tokenizer(folder: Path, dst: Path):
    """The tokenizer files, made as the user's other files are (copy2 kept the source's 0644 under a umask of 077)."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dst / name)


def _mlc_chat_config(source, meta) -> dict:
    c, a = source.config, source.arch
    gen, folder = {}, source.path
    if (folder / "generation_config.json").is_file():
        gen = json.loads((folder / "generation_config.json").read_text())
    return {
        "version": "0.1.0", "model_type": a.model_type, "quantization": source.quantization,
        "model_config": {k: v for k, v in c.items() if k != "quantization_config"},
        "vocab_size": a.vocab_size, "context_window_size": a.context_window, "sliding_window_size": -1,
        "prefill_chunk_size": prefill_chunk(a), "attention_sink_size": -1, "tensor_parallel_shards": 1,
        "temperature": gen.get("temperature", 1.0), "top_p": gen.get("top_p", 1.0), "repetition_penalty": 1.0,
        "bos_token_id": c.get("bos_token_id"), "eos_token_id": c.get("eos_token_id"),
        "pad_token_id": c.get("pad_token_id"),
        "tokenizer_files": [n for n in TOKENIZER_FILES if (folder / n).is_file()],
        "conv_template": "tokenizer_chat_template", "model_lib": meta["library"],
    }
