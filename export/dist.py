"""Read a DIST folder as hostile input: every field, path, offset and index is checked before TVM sees it.

TVM's loaders trust their files: a `dataPath` of `../x` is opened, a `byteOffset` past the shard is read (segfault),
and an outlier column index past K makes the gather kernel read outside its input. So the runner opens nothing that
this module has not checked: paths must name a file inside the folder (symlinks resolved), every tensor record must
fit its shard and match the shape and dtype the library was compiled for, and the values that kernels use as indices
(outlier columns) or as small integers (zero points) must be in range. Each failure is one line naming the file and
the fix. Nothing here imports tvm.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from edgequant.checkpoint import (EXPORT_JSON, MAX_DIM, _is_count as _int, _is_shape as _shape, number_problem,
                                  value_problem)
from edgequant.atomic import check_not_stranded, register_owner
from edgequant.errors import EdgequantError
from edgequant.memory import DEFAULT_CONTEXT, Shapes, kv_bytes
from edgequant.models import FAMILIES, Dims, family_for
from edgequant.paths import inside_folder

TENSOR_CACHE = "tensor-cache.json"
FORMAT_VERSION = 1   # the edgequant-export.json layout this reader understands (export/build.py writes it)
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 32  # the files are a few levels deep; a parser must not recurse 100,000 levels
RUNNER_FUNCTIONS = ("embed", "prefill", "decode", "create_paged_kv_cache")
DEVICES = ("cpu", "cuda", "metal", "opencl", "vulkan", "webgpu")
_DTYPES = {"float16": np.float16, "float32": np.float32, "uint32": np.uint32, "uint8": np.uint8, "int32": np.int32,
           "bfloat16": None}


def itemsize(dtype: str) -> int:
    """Bytes per element of a DIST dtype name (bfloat16 has no NumPy type)."""
    return 2 if dtype == "bfloat16" else np.dtype(_DTYPES.get(dtype, dtype)).itemsize


_FIX = "export the model again with `edgequant export`"


def is_dist_file(name: str) -> bool:
    """Whether `name` is a file that `edgequant export` writes into a DIST (so `-o` over a DIST holding anything else
    is refused instead of deleting it)."""
    from .build import TOKENIZER_FILES
    from .cuda import FATBIN
    libraries = {p.library for p in _targets().values()} | {"lib.so", "lib.tar"}
    return (name in (EXPORT_JSON, TENSOR_CACHE, "mlc-chat-config.json", FATBIN) or name in libraries
            or name in TOKENIZER_FILES or re.fullmatch(r"params_shard_\d+\.bin", name) is not None)


register_owner(EXPORT_JSON, is_dist_file)


def _damaged(f: Path, what: str) -> EdgequantError:
    return EdgequantError(f"{f} is damaged ({what}); {_FIX}")


def inside(folder: Path, name, f: Path, field: str) -> Path:
    """`folder / name` when `name` is a plain relative path that stays inside `folder` (symlinks resolved)."""
    p = inside_folder(folder, name)
    if p is None:
        raise EdgequantError(f"{f} names {name!r} as its {field}, which is not a file inside {folder}; refusing "
                             f"to open it; {_FIX}")
    return p


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _json_depth(text: str) -> int:
    """Deepest [ / { nesting of `text`, brackets inside strings ignored (checked before a recursive parser runs)."""
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", _JSON_STRING.sub('""', text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def load_json(f: Path):
    """The JSON value of a DIST file, bounded in size and nesting; damaged otherwise."""
    if f.stat().st_size > MAX_JSON_BYTES:
        raise _damaged(f, f"larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        text = f.read_text()
    except (OSError, UnicodeDecodeError):
        raise _damaged(f, "not valid JSON") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise _damaged(f, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _damaged(f, "not valid JSON") from None


_ELF_CLASS = {1: ("<I", 32, 40), 2: ("<Q", 56, 64)}   # ELF32/ELF64: word format, program and section header sizes


def check_elf(f: Path) -> None:
    """A truncated ELF shared object faults (SIGBUS) inside dlopen, which maps it and touches pages past the end:
    its header tables and loadable segments must lie inside the file (see the ELF specification, gABI ch. 4-5)."""
    import struct
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[4] not in _ELF_CLASS or head[5] != 1:
        raise EdgequantError(f"{f} is not a little-endian ELF shared library; it is damaged or built for another "
                             f"machine; {_FIX}")
    word, phsize, shsize = _ELF_CLASS[head[4]]
    w = struct.calcsize(word)
    phoff, shoff = (struct.unpack_from(word, head, 24 + i * w)[0] for i in (1, 2))
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 24 + 3 * w + 6)
    ok = (phnum > 0 and phentsize >= phsize and phoff + phentsize * phnum <= size
          and (shnum == 0 or (shentsize >= shsize and shoff + shentsize * shnum <= size)))
    if ok:
        with open(f, "rb") as fh:   # every loadable segment's bytes must be in the file
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
        for i in range(phnum):
            e = table[i * phentsize:(i + 1) * phentsize]
            if head[4] == 2:
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", e)
            else:
                p_type, p_offset, _, _, p_filesz = struct.unpack_from("<IIIII", e)
            if p_type == 1 and p_offset + p_filesz > size:
                ok = False
    if not ok:
        raise EdgequantError(f"{f} is truncated or damaged (its ELF headers point past its {size} bytes); {_FIX}")


def read_export_info(dist) -> dict:
    """`edgequant-export.json` of `dist`, with every field the runner uses checked for type and range."""
    p = Path(str(dist)).expanduser()
    f = p / EXPORT_JSON
    if not f.is_file():
        check_not_stranded(p)
        raise EdgequantError(f"{p} is not an exported model folder (no {EXPORT_JSON}); create one with "
                             "`edgequant export CHECKPOINT --target cpu -o DIST`")
    info = load_json(f)
    if not isinstance(info, dict):
        raise _damaged(f, "not a JSON object")
    version = info.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != FORMAT_VERSION:   # true == 1 in Python
        raise EdgequantError(f"{f} has format_version {info.get('format_version')!r}; this edgequant reads version "
                             f"{FORMAT_VERSION}: export the model again with this edgequant (or upgrade it)")
    for key, ok, want in (
            ("target", lambda v: isinstance(v, str) and v in _targets(), "one of " + ", ".join(_targets())),
            ("device", lambda v: isinstance(v, str) and v in DEVICES, "one of " + ", ".join(DEVICES)),
            ("library", lambda v: isinstance(v, str), "a file name"),
            ("prefill_chunk_size", lambda v: _int(v, 1) and v <= MAX_DIM, f"a positive integer up to {MAX_DIM}"),
            ("tvm_version", lambda v: isinstance(v, str), "a string"),
            ("functions", lambda v: isinstance(v, list) and all(n in v for n in RUNNER_FUNCTIONS),
             "a list naming " + ", ".join(RUNNER_FUNCTIONS)),
            ("weight_bytes", _int, "a byte count"), ("model", lambda v: isinstance(v, dict), "an object"),
            ("params", lambda v: isinstance(v, list) and all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and _shape(x.get("shape"))
                and isinstance(x.get("dtype"), str) and x["dtype"] in _DTYPES for x in v),
             "a list of {name, shape, dtype} records")):
        if key not in info:
            raise _damaged(f, f"field '{key}' is missing")
        if not ok(info[key]):
            raise _damaged(f, f"field '{key}' is {_short(info[key])}; it must be {want}")
    m = info["model"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "context_window"):
        if key not in m:
            raise _damaged(f, f"model field '{key}' is missing")
        if not _int(m[key], 1) or m[key] > MAX_DIM:
            raise _damaged(f, f"model field '{key}' is {_short(m[key])}; it must be a positive integer up to {MAX_DIM}")
    # the C runtime accepts the same set (apps/runtime)
    if not (isinstance(m.get("model_type"), str) and m["model_type"] in FAMILIES):
        raise _damaged(f, f"model field 'model_type' is {_short(m.get('model_type'))}; it must be one of "
                          + ", ".join(FAMILIES))
    bad = number_problem(m)   # the same ranges as the checkpoint's config.json (apps/runtime checks them too)
    if bad:
        raise _damaged(f, f"model field {bad}")
    if m.get("rope_long_factors"):   # longrope: the runner switches to the *_long functions past this length
        if not _int(m.get("rope_original_context"), 1) or m["rope_original_context"] > MAX_DIM:
            raise _damaged(f, f"model field 'rope_original_context' is {_short(m.get('rope_original_context'))}; it "
                              f"must be a positive integer up to {MAX_DIM}")
        if not all(n in info["functions"] for n in ("prefill_long", "prefill_logits_long")):
            raise _damaged(f, "field 'functions' lacks prefill_long or prefill_logits_long, which a longrope model "
                              "needs")
    elif "prefill_long" in info["functions"]:   # without the switch, long prompts would get the short factors
        raise _damaged(f, "model field 'rope_long_factors' is missing, but the library is a longrope model's "
                          "(prefill_long)")
    if _targets()[info["target"]].device != info["device"]:
        raise _damaged(f, f"target '{info['target']}' does not run on device '{info['device']}'")
    if info["prefill_chunk_size"] > m["context_window"]:
        raise _damaged(f, "prefill_chunk_size is larger than the context window")
    _check_model_against_params(f, m, info["params"])
    inside(p, info["library"], f, "library")
    return info


def _short(v) -> str:
    """A JSON value for an error line (a damaged file may hold a huge one)."""
    text = json.dumps(v) if not isinstance(v, float) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def kv_cache_len(info: dict, max_total_seq_len: int = 0) -> int:
    """Tokens the KV cache holds: the request, else memory.DEFAULT_CONTEXT, never past the context window
    (apps/runtime agrees)."""
    return min(int(info["model"]["context_window"]), max_total_seq_len or DEFAULT_CONTEXT)


def kv_cache_bytes(info: dict, tokens: int) -> int:
    """fp16 K and V of `tokens` tokens for the model of an export record (apps/runtime reports the same)."""
    return kv_bytes(Shapes.from_export_model(info["model"]), tokens)


def _targets():
    from .targets import PRESETS
    return PRESETS


def _check_model_against_params(f: Path, m: dict, params: list) -> None:
    """The sizes the runners use (vocabulary, layers, hidden width) must be those of the compiled parameters: the
    library's own list, which the runners compare to `params` before running."""
    shapes = {p["name"]: p["shape"] for p in params}
    emb = shapes.get("model.embed_tokens.weight")
    if emb is None and shapes.get("model.embed_tokens.scales") and shapes.get("model.norm.weight"):
        # a quantized table (--embed-bits): its rows are the vocabulary, the final norm has the hidden width
        emb = [shapes["model.embed_tokens.scales"][0], *shapes["model.norm.weight"][:1]]
    layers = {int(x) for x in re.findall(r"^model\.layers\.(\d+)\.", "\n".join(shapes), re.M)}
    for key, want in (("vocab_size", emb[0] if emb and len(emb) == 2 else None),
                      ("hidden_size", emb[1] if emb and len(emb) == 2 else None),
                      ("num_layers", len(layers) if layers == set(range(len(layers))) else None)):
        if m[key] != want:
            raise _damaged(f, f"model field '{key}' is {m[key]}, the library's parameters say {want}")
    # heads, head width and MLP width: every first block linear's rows (and an fp16 one's columns) and norm widths
    # must be what the family derives from the model block (the runners size the KV cache from these numbers)
    family = family_for(m["model_type"])
    dims = Dims(m["hidden_size"], m["intermediate_size"], m["num_heads"], m["num_kv_heads"], m["head_dim"])
    linears = family.linear_shapes(dims)
    pre = family.layer_prefix(0)
    for export, members in family.export_fusions.items():
        n, k = sum(linears[x][0] for x in members), linears[members[0]][1]
        got = shapes.get(f"{pre}.{export}.scales") or shapes.get(f"{pre}.{export}.weight")
        if got and (got[0] != n or (f"{pre}.{export}.weight" in shapes and got[1:] != [k])):
            raise _damaged(f, f"the model fields hidden_size/intermediate_size/num_heads/num_kv_heads/head_dim give "
                              f"'{pre}.{export}' {n} rows of {k} columns; the library's parameters have {got[0]} rows"
                              + (f" of {got[1]} columns" if f"{pre}.{export}.weight" in shapes else ""))
    for norm, width in family.norm_shapes(dims).items():
        got = shapes.get(f"{pre}.{norm}.weight")
        if got and got != [width]:
            raise _damaged(f, f"the model fields give '{pre}.{norm}' width {width}, the library's parameters say "
                              f"{got[0] if got else None}")


def library_path(dist: Path, info: dict) -> Path:
    return inside(dist, info["library"], dist / EXPORT_JSON, "library")


def _in_features(model: dict, param: str) -> int:
    """K of the export linear that `param` belongs to (one of the family's `export_fusions`)."""
    family = family_for(str(model.get("model_type")))
    members = family.export_fusions.get(family.relative_name(param.rsplit(".", 1)[0]))
    if members is None:
        raise EdgequantError(f"{EXPORT_JSON}: parameter '{param}' belongs to no linear of a {family.name}-family "
                             f"model; the export is damaged; {_FIX}")
    dims = Dims(model["hidden_size"], model["intermediate_size"], model["num_heads"], model["num_kv_heads"],
                model["head_dim"])
    return family.linear_shapes(dims)[members[0]][1]


def _bits(info: dict) -> int | None:
    m = re.match(r"w(\d+)", str(info.get("quantization", "")))   # the scheme's name (older DISTs: w4g128a)
    return int(m.group(1)) if m else None


def check_tensor_cache(dist: Path, info: dict) -> None:
    """Check `tensor-cache.json` and its shards against the library's parameter list, and the index-like values."""
    f = dist / TENSOR_CACHE
    if not f.is_file():
        raise EdgequantError(f"{dist} has no {TENSOR_CACHE}: the weights are missing; {_FIX}")
    cache = load_json(f)
    if not isinstance(cache, dict) or not isinstance(cache.get("records"), list):
        raise _damaged(f, "no list of 'records'")
    where: dict[str, tuple[Path, int, dict]] = {}
    for shard in cache["records"]:
        if not isinstance(shard, dict) or not isinstance(shard.get("records"), list):
            raise _damaged(f, "a shard record is not an object with 'records'")
        path = inside(dist, shard.get("dataPath"), f, "dataPath")
        if not path.is_file():
            raise EdgequantError(f"weight shard {shard['dataPath']} is missing from {dist}; copy the whole folder "
                                 f"again or {_FIX}")
        size = path.stat().st_size
        # TVM's loader reads both keys unchecked (a missing one was its KeyError traceback: fifteenth re-run)
        if shard.get("format") != "raw-shard":
            raise _damaged(f, f"the shard record of {shard['dataPath']} has format {_short(shard.get('format'))}, "
                              "not 'raw-shard'")
        if shard.get("nbytes") != size:
            raise EdgequantError(f"weight shard {shard['dataPath']} has {size} bytes, {TENSOR_CACHE} says "
                                 f"{shard.get('nbytes')}: it is truncated or replaced; {_FIX}")
        if not isinstance(shard.get("md5sum"), str) or _md5(path) != shard["md5sum"].lower():
            raise EdgequantError(f"weight shard {shard['dataPath']} does not match the md5sum {TENSOR_CACHE} records "
                                 f"for it: its bytes were changed or damaged in a copy; {_FIX}")
        for r in shard["records"]:
            if not (isinstance(r, dict) and isinstance(r.get("name"), str) and _shape(r.get("shape"))
                    and isinstance(r.get("dtype"), str) and r["dtype"] in _DTYPES and _int(r.get("byteOffset"))
                    and _int(r.get("nbytes"))
                    and r.get("format") == "raw"):
                raise _damaged(f, f"a record in {shard['dataPath']} lacks name/shape/dtype/byteOffset/nbytes")
            if r["nbytes"] != math.prod(r["shape"]) * itemsize(r["dtype"]):   # Python ints: a dimension of 2^64 overflowed numpy
                raise _damaged(f, f"'{r['name']}' has nbytes {r['nbytes']} for shape {r['shape']} {r['dtype']}")
            if r["byteOffset"] + r["nbytes"] > size:
                raise _damaged(f, f"'{r['name']}' lies past the end of {shard['dataPath']}")
            if r["name"] in where:   # which copy would a runner use? (each used the last one, silently)
                raise _damaged(f, f"'{r['name']}' is listed twice")
            where[r["name"]] = (path, r["byteOffset"], r)
        spans = sorted((r["byteOffset"], r["byteOffset"] + r["nbytes"], r["name"]) for r in shard["records"])
        for (_, end, _), (start, _, name) in zip(spans, spans[1:]):
            if start < end:
                raise _damaged(f, f"'{name}' overlaps another tensor in {shard['dataPath']}")
    for p in info["params"]:
        rec = where.get(p["name"])
        if rec is None:
            raise EdgequantError(f"weight '{p['name']}' is missing from {TENSOR_CACHE}; {_FIX}")
        r = rec[2]
        if r["shape"] != p["shape"] or r["dtype"] != p["dtype"]:
            raise _damaged(f, f"'{p['name']}' is {r['shape']} {r['dtype']}, the library expects "
                              f"{p['shape']} {p['dtype']}")
    _check_values(dist, info, where)


def _md5(path: Path) -> str:
    """The shard's MD5 as TVM's tensor cache records it (integrity, not authenticity: bit flips in a weight run
    without an error otherwise; one pass over the weights, ~0.2 s per 100 MB)."""
    import hashlib
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read(where, name) -> np.ndarray:
    path, off, r = where[name]
    return np.fromfile(path, dtype=_DTYPES[r["dtype"]], count=int(np.prod(r["shape"])), offset=off).reshape(r["shape"])


def _check_values(dist: Path, info: dict, where: dict):
    """Values that kernels use as indices or small integers; small tensors only (no pass over the big weights)."""
    base = _bits(info)
    for p in info["params"]:
        name = p["name"]
        bits = p.get("bits", base)   # the module's own width (per-module schemes), else the DIST's
        if "bits" in p and not (_int(bits) and 1 <= bits <= 8):
            raise _damaged(Path(dist) / EXPORT_JSON, f"parameter '{name}' has bits {bits!r}, not 1..8")
        leaf = name.rpartition(".")[2]
        # every fp tensor (scales, embedding, lm_head, norms, biases, outlier columns): read once, cheap
        if leaf in ("outlier_idx", "zeros") or p["dtype"] in ("float16", "float32"):
            bad = value_problem(leaf, _read(where, name), bits, lambda: _in_features(info["model"], name))
            if bad:
                raise EdgequantError(f"{TENSOR_CACHE}: '{name}' holds {bad}; the weights are damaged; {_FIX}")
