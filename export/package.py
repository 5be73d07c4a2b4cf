"""`edgequant package CONFIG`: several checkpoints, exported for one or more app platforms, gathered into one app
bundle folder (the role of `mlc_llm package`).

CONFIG (JSON):

    {"output": "bundle",                                  # relative to CONFIG's folder; default "dist-bundle"
     "targets": ["iphone", "iphone-sim", "android"],      # system-library targets (mobile, webgpu)
     "models": [{"checkpoint": "q-smollm2-w4",            # relative to CONFIG's folder
                 "id": "smollm2-w4",                      # letters, digits, - and _
                 "system_lib_prefix": "smollm2_w4_",      # default: the id as a C identifier + "_"
                 "max_total_seq_len": 2048}]}             # KV-cache tokens the app will ask for; default 4096

The bundle:

    lib/<target>/libedgequant_models.a   every model's objects for that target in one static library (member names
                                         carry the model id: each export has its own lib0.o)
    weights/<id>/<layout>/               the DIST folder without its library: tensor cache, tokenizer,
                                         edgequant-export.json; targets whose weights are byte-identical share one
    edgequant-app-config.json            per model: id, prefix, quantization, per target the library and weights
                                         folder, and the estimated memory (weights + KV cache at max_total_seq_len)

The app links `libedgequant_models.a` whole (-all_load / --whole-archive) with apps/runtime and the TVM runtime
(apps/ios/scripts/make_xcframework.sh, apps/android's CMake file), then opens `weights/<id>/...` with the model's
prefix. The bundle is written under a temporary name and renamed into place only when complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from edgequant.atomic import atomic_output_dir, output_lock
from edgequant.checkpoint import MAX_DIM
from edgequant.errors import EdgequantError, first_line
from edgequant.memory import DEFAULT_CONTEXT

from . import targets
from .dist import EXPORT_JSON, kv_cache_bytes, kv_cache_len

APP_CONFIG = "edgequant-app-config.json"
LIBRARY = "libedgequant_models.a"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DARWIN = ("iphone", "iphone-sim", "metal")   # Mach-O objects: a darwin-format archive (ranlib symbol table)


def _fail(config: Path, what: str) -> EdgequantError:
    return EdgequantError(f"{config}: {what}")


def read_config(config) -> dict:
    """The package CONFIG, checked; paths resolved against its folder."""
    f = Path(str(config)).expanduser()
    if not f.is_file():
        raise EdgequantError(f"package config not found: {f}; write a JSON file with \"targets\" and \"models\" "
                             "(see `edgequant package --help`)")
    try:
        c = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:   # 100,000 nested lists overflow the parser
        raise _fail(f, f"is not valid JSON ({first_line(e)}); fix the file") from None
    if not isinstance(c, dict):
        raise _fail(f, "must hold a JSON object with \"targets\" and \"models\"")
    unknown = set(c) - {"output", "targets", "models"}
    if unknown:
        raise _fail(f, f"unknown keys {sorted(unknown)}; valid: output, targets, models")
    tlist = c.get("targets")
    if not isinstance(tlist, list) or not tlist or not all(isinstance(t, str) for t in tlist):
        raise _fail(f, "\"targets\" must be a non-empty list of target names, e.g. [\"iphone\", \"android\"]")
    for t in tlist:
        preset = targets.get_preset(t)
        if not preset.system_lib:
            libs = [n for n, p in targets.PRESETS.items() if p.system_lib]
            raise _fail(f, f"target '{t}' builds a shared library, not one that links into an app; package "
                           f"targets: {', '.join(libs)}")
    if len(set(tlist)) != len(tlist):
        raise _fail(f, "\"targets\" lists a target twice")
    models = c.get("models")
    if not isinstance(models, list) or not models:
        raise _fail(f, "\"models\" must be a non-empty list of {\"checkpoint\": ..., \"id\": ...}")
    out_models, ids, prefixes = [], set(), set()
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("checkpoint"), str) or not isinstance(m.get("id"), str):
            raise _fail(f, f"models[{i}] needs \"checkpoint\" (a path) and \"id\" (a name)")
        extra = set(m) - {"checkpoint", "id", "system_lib_prefix", "max_total_seq_len"}
        if extra:
            raise _fail(f, f"models[{i}] has unknown keys {sorted(extra)}; valid: checkpoint, id, "
                           "system_lib_prefix, max_total_seq_len")
        mid = m["id"]
        if not _ID.fullmatch(mid):
            raise _fail(f, f"models[{i}].id {mid!r} must be letters, digits, '-' and '_' (at most 64), e.g. smollm2-w4")
        prefix = m.get("system_lib_prefix", re.sub(r"\W", "_", mid) + "_")
        if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
            raise _fail(f, f"models[{i}].system_lib_prefix {prefix!r} must be a C identifier, e.g. smollm2_")
        seq = m.get("max_total_seq_len", 0)   # 0: left out, the runtime's default
        if "max_total_seq_len" in m and (not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq <= MAX_DIM):
            raise _fail(f, f"models[{i}].max_total_seq_len is {seq!r}; it must be a positive integer (tokens) up to "
                           f"{MAX_DIM}, or left out for {DEFAULT_CONTEXT}")
        if mid in ids or prefix in prefixes:
            raise _fail(f, f"models[{i}] repeats the id {mid!r} or the prefix {prefix!r}; each model needs its own "
                           "(the prefixes keep their symbols apart in one static library)")
        ids.add(mid)
        prefixes.add(prefix)
        out_models.append({"checkpoint": (f.parent / m["checkpoint"]).expanduser(), "id": mid,
                           "system_lib_prefix": prefix, "max_total_seq_len": seq})
    output = c.get("output", "dist-bundle")
    if not isinstance(output, str) or not output:
        raise _fail(f, "\"output\" must be a folder name")
    return {"output": (f.parent / output).expanduser().resolve(), "targets": tlist, "models": out_models}


def _archiver() -> str:
    ar = shutil.which("llvm-ar") or next((shutil.which(f"llvm-ar-{v}") for v in range(20, 13, -1)
                                          if shutil.which(f"llvm-ar-{v}")), None)
    if ar is None:
        raise EdgequantError("llvm-ar is not installed (it writes static libraries of any object format); install "
                             "LLVM (Debian: apt-get install llvm) and run `edgequant package` again")
    return ar


def merge_static_library(tars: list[tuple[str, Path]], target: str, out: Path, ar: str) -> list[str]:
    """One static library of the objects of each (model id, lib.tar); returns its member names. The objects are
    unpacked beside `out` (inside the caller's temporary output, never the system's temp folder)."""
    with tempfile.TemporaryDirectory(prefix=".objects-", dir=out.parent) as tmp:
        members = []
        for mid, tar in tars:
            with tarfile.open(tar) as tf:
                for m in tf.getmembers():
                    name = Path(m.name).name
                    # a lib.tar holds plain .o files at its top level; anything else is not ours to link
                    if not m.isfile() or m.name != name or not name.endswith(".o"):
                        raise EdgequantError(f"{tar} holds {m.name!r}, not an object file; export the model again")
                    dst = Path(tmp) / f"{mid}_{name}"
                    dst.write_bytes(tf.extractfile(m).read())
                    members.append(dst.name)
        fmt = "darwin" if target in _DARWIN else "gnu"
        r = subprocess.run([ar, "rcs", f"--format={fmt}", str(out), *members], cwd=tmp, capture_output=True,
                           text=True)
        if r.returncode != 0:
            full = next((n for n in (errno.ENOSPC, errno.EDQUOT) if os.strerror(n) in r.stderr), None)
            if full is not None:   # the caller's output folder says a full disk in its one line (T38)
                raise OSError(full, os.strerror(full))
            # llvm-ar's own failures append a crash report of many lines (eighteenth re-run, T38)
            raise EdgequantError(f"{ar} could not write {out.name} for {target}: {(r.stderr.strip().splitlines() or [f'exit status {r.returncode}'])[0][:300]}")
    return members


def _weights_digest(dist: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(dist.iterdir()):
        if f.is_file() and f.name not in (EXPORT_JSON, "lib.tar"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:12]


def package(config, progress: bool = True) -> Path:
    """Build the app bundle that CONFIG describes; returns its folder."""
    from .build import export_model
    cfg = read_config(config)
    ar = _archiver()
    for m in cfg["models"]:
        if not m["checkpoint"].exists():
            raise EdgequantError(f"{config}: checkpoint not found: {m['checkpoint']}; pass the folder written by "
                                 "`edgequant quantize`")
    out = cfg["output"]
    with output_lock(out, APP_CONFIG), atomic_output_dir(out, marker=APP_CONFIG) as tmp:
        # the per-model exports live inside the output's own temporary folder, which a rerun removes after a kill -9
        # (in the system's temp folder they stayed for good: eighteenth re-run, L9)
        work = tmp / ".exports"
        app = {"format_version": 1, "targets": {}, "models": []}
        tars: dict[str, list[tuple[str, Path]]] = {t: [] for t in cfg["targets"]}
        for m in cfg["models"]:
            entry = {"id": m["id"], "system_lib_prefix": m["system_lib_prefix"], "targets": {}}
            layouts: dict[str, str] = {}   # weights digest -> folder name inside weights/<id>/
            for t in cfg["targets"]:
                try:
                    dist = export_model(m["checkpoint"], t, work / m["id"] / t,
                                        system_lib_prefix=m["system_lib_prefix"], progress=progress)
                except EdgequantError as e:   # name the output the user chose, not a hidden folder gone by now (U13)
                    raise type(e)(str(e).replace(str(work / m["id"] / t),
                                                 f"{out} (model {m['id']}, target {t})")) from None
                info = json.loads((dist / EXPORT_JSON).read_text())
                tars[t].append((m["id"], dist / info["library"]))
                digest = _weights_digest(dist)
                if digest not in layouts:
                    layouts[digest] = t
                    wdir = tmp / "weights" / m["id"] / t
                    shutil.copytree(dist, wdir, ignore=shutil.ignore_patterns(info["library"]))
                tokens = kv_cache_len(info, m["max_total_seq_len"])
                kv = kv_cache_bytes(info, tokens)
                entry.update(quantization=info["quantization"], model_type=info["model"]["model_type"])
                entry["targets"][t] = {
                    "library": f"lib/{t}/{LIBRARY}", "weights": f"weights/{m['id']}/{layouts[digest]}",
                    "device": info["device"], "weight_bytes": info["weight_bytes"], "kv_cache_tokens": tokens,
                    "kv_cache_bytes": kv, "estimated_memory_bytes": info["weight_bytes"] + kv}
            app["models"].append(entry)
        for t, items in tars.items():
            (tmp / "lib" / t).mkdir(parents=True)
            members = merge_static_library(items, t, tmp / "lib" / t / LIBRARY, ar)
            preset = targets.get_preset(t)
            app["targets"][t] = {"library": f"lib/{t}/{LIBRARY}", "device": preset.device, "objects": members,
                                 "app": preset.app}
        shutil.rmtree(work)
        (tmp / APP_CONFIG).write_text(json.dumps(app, indent=2))
    return out
