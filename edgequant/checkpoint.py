"""The checkpoint folder, the contract between calibration and export (DESIGN.md): its file names, what kind of
folder a path is, its config and safetensors headers read as hostile input, tensors written so that the bytes depend
only on the contents, plain (unquantized) weights read without torch, and `inspect`. Rebuilding a PyTorch model from a
checkpoint is `artifact.py`'s job; this module imports neither torch nor transformers at load time.

A Hugging Face-style folder: `config.json` with a `quantization_config` block (the scheme's `to_dict`, the method,
the quantized modules), tokenizer files, `model.safetensors` (sharded with an index when large) and `edgequant.json`
(provenance).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .atomic import register_owner
from .errors import CheckpointError, EdgequantError, first_line, name_list
from .paths import inside_folder
from .schemes import QuantScheme

FORMAT_VERSION = 1
PACK = "uint32-lsb-first-along-k"   # the only packing (edgequant/pack.py); checkpoints before issue 12 name it
QUANT_METHOD = "edgequant"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PROVENANCE_NAME = "edgequant.json"
EXPORT_JSON = "edgequant-export.json"   # marks a DIST folder (written by `edgequant export`)
CONVERTED_NAME = "edgequant-convert.json"   # marks an unquantized folder written by `edgequant convert`

_OWNED = re.compile(r"config\.json|generation_config\.json|edgequant(-convert)?\.json|model(-\d+-of-\d+)?\.safetensors|"
                    r"model\.safetensors\.index\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
                    r"vocab\.json|merges\.txt|chat_template\.(jinja|json)")


def is_checkpoint_file(name: str) -> bool:
    """Whether `name` is a file that saving a checkpoint writes (weights, config, provenance, tokenizer)."""
    return _OWNED.fullmatch(name) is not None


register_owner(PROVENANCE_NAME, is_checkpoint_file)
register_owner(CONVERTED_NAME, is_checkpoint_file)


def read_config(folder: Path) -> dict:
    """`config.json` of `folder` as a dict, or a one-line CheckpointError."""
    f = Path(folder) / "config.json"
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({first_line(e)}); restore it or re-run `edgequant "
                              "quantize`") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{f} is not a JSON object; restore it or re-run `edgequant quantize`")
    bad = number_problem(config)
    if bad:
        raise CheckpointError(f"{f}: {bad}; restore the config.json written by `edgequant quantize` (or the model's "
                              "original one)")
    return config


def _between(lo, hi, hi_closed=False):
    return lambda v: lo < v and (v <= hi if hi_closed else v < hi)


_POSITIVE = (lambda v: v > 0, "a positive number")
_EPS = (_between(0, 1), "a number between 0 and 1, e.g. 1e-05")
_FRACTION = (_between(0, 1, True), "a number in (0, 1]")
_PROBABILITY = (lambda v: 0 <= v < 1, "a number in [0, 1)")
MAX_DIM = 1 << 24   # bound on every model size (both runners: products such as KV bytes and shapes stay small)
# the context a DIST is built for: export copies it into the DIST, whose runners refuse more than MAX_DIM
_POSITIONS = (lambda v: isinstance(v, int) and 0 < v <= MAX_DIM, f"a positive integer up to {MAX_DIM}")
# The numbers of a config.json (and of a DIST's `model` block, which copies them) that a model computes with, and the
# range each must lie in: an epsilon of 0 or -1, a RoPE base of 0 or a NaN anywhere gives NaN logits, not an error.
NUMBER_RULES = {
    "rms_norm_eps": _EPS, "layer_norm_eps": _EPS, "norm_eps": _EPS,
    "rope_theta": _POSITIVE, "rope_local_base_freq": _POSITIVE, "rope_scale": _POSITIVE,
    "partial_rotary_factor": _FRACTION, "query_pre_attn_scalar": _POSITIVE,
    "attn_logit_softcapping": _POSITIVE, "final_logit_softcapping": _POSITIVE,
    "attention_dropout": _PROBABILITY, "hidden_dropout": _PROBABILITY,
    "max_position_embeddings": _POSITIONS, "sliding_window": _POSITIONS,
    # rope_scaling / rope_parameters members (Gemma 3 has one such block per layer type inside rope_parameters);
    # a scaling factor past the largest context stretches RoPE into nothing
    "factor": (_between(0, MAX_DIM, True), f"a positive number up to {MAX_DIM}"), "low_freq_factor": _POSITIVE,
    "high_freq_factor": _POSITIVE, "original_max_position_embeddings": _POSITIVE, "beta_fast": _POSITIVE,
    "beta_slow": _POSITIVE, "attention_factor": _POSITIVE,
    # longrope: one frequency divisor per RoPE pair (each entry; 0 divides by zero, a negative one flips the angle)
    "short_factor": _POSITIVE, "long_factor": _POSITIVE,
}
_LISTS = ("short_factor", "long_factor")
_ROPE_BLOCKS = ("rope_scaling", "rope_parameters")
# The RoPE types transformers computes (its ROPE_INIT_FUNCTIONS, plus "default" and Phi-3's old "su"), written out so
# that opening a checkpoint for export does not import transformers; tests/test_loading.py checks it against the
# installed transformers
ROPE_TYPES = frozenset({"default", "su", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"})


# RoPE types whose frequencies depend on original_max_position_embeddings; under the others (default, linear) the
# field is unused, and transformers fills it in for Phi-3 configs that lack it (4096, past a shorter context)
_ORIGINAL_CONTEXT_ROPE = ("longrope", "su", "yarn", "llama3", "dynamic")


def _reads_original_context(config: dict, block: dict) -> bool:
    """Whether `block`'s original_max_position_embeddings is used: its own RoPE type, or at the top level the type of
    the config's RoPE block."""
    kind = block.get("rope_type") or block.get("type")
    if kind is None and block is config:
        rope = next((config[n] for n in _ROPE_BLOCKS if isinstance(config.get(n), dict)), {})
        kind = rope.get("rope_type") or rope.get("type")
    return kind in _ORIGINAL_CONTEXT_ROPE


def number_problem(config: dict) -> str | None:
    """What is wrong with the numbers of a model config (None: nothing): a NaN or infinity anywhere in it, or one of
    `NUMBER_RULES`' fields (top level or in its RoPE block) that is not a number in its range. A null field is
    "not set", as transformers reads it."""
    def walk(v, where):
        if isinstance(v, float) and not math.isfinite(v):
            return f"'{where}' is {v}; it must be a finite number"
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            bad = walk(x, f"{where}.{k}" if where else str(k))
            if bad:
                return bad
        return None

    def ranged(block: dict, prefix: str):
        for k, (ok, want) in NUMBER_RULES.items():
            v = block.get(k)
            if v is None:
                continue
            for i, x in enumerate(v) if isinstance(v, list) and k in _LISTS else [(None, v)]:
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not ok(x):
                    at = "" if i is None else f"[{i}]"
                    return f"'{prefix}{k}{at}' is {x!r}; it must be {want}"
        low, high = block.get("low_freq_factor"), block.get("high_freq_factor")
        if low is not None and high is not None and low >= high:   # llama3 RoPE divides by high - low
            return (f"'{prefix}low_freq_factor' is {low!r}, not below '{prefix}high_freq_factor' {high!r}; llama3 "
                    "RoPE needs low < high")
        orig, window = block.get("original_max_position_embeddings"), config.get("max_position_embeddings")
        if orig is not None and isinstance(window, int) and orig > window and _reads_original_context(config, block):
            return (f"'{prefix}original_max_position_embeddings' is {orig!r}, more than max_position_embeddings "
                    f"{window}; the extended context must be at least the original one")
        return None

    try:
        bad = walk(config, "") or ranged(config, "")
    except RecursionError:
        return "it is nested too deeply to be a model config"
    for name in _ROPE_BLOCKS:
        block = config.get(name)
        if bad is None and isinstance(block, dict):
            bad = ranged(block, f"{name}.")
            for kind, inner in block.items():   # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
                if bad is None and isinstance(inner, dict):
                    bad = ranged(inner, f"{name}.{kind}.")
    return bad


def value_problem(leaf: str, arr: np.ndarray, bits: int | None, in_features) -> str | None:
    """What is wrong with a stored tensor's values (None: nothing) that would silently corrupt results or index out of
    bounds in a kernel: NaN/Inf in a float tensor, zero points past the `bits` width (in uint32 words, as OpenCL and
    WebGPU exports store them, four a word: every byte is checked), outlier columns outside [0, K) or not strictly
    increasing (`in_features()` gives K), 3-bit words with their unused top bits set. Checkpoints and DISTs both
    check their tensors with it."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return "NaN or infinite values"
    if leaf == "zeros" and bits is not None and arr.size:
        z = arr.astype("<u4").view(np.uint8) if arr.dtype == np.uint32 else arr
        if int(z.max()) >= 1 << bits:
            return f"zero points above {(1 << bits) - 1}, the largest {bits}-bit value"
    elif leaf == "outlier_idx" and arr.size:
        k = in_features()
        if arr.min() < 0 or arr.max() >= k or np.any(np.diff(arr.astype(np.int64)) <= 0):
            return f"column indices outside [0, {k}) or not strictly increasing"
    elif leaf == "qweight" and bits == 3 and arr.size and int((arr >> 30).max()):
        return "3-bit words with their two unused top bits set"
    return None


def kind(path) -> str:
    """What `path` is: "missing", "dist" (an export), "checkpoint" (its config.json declares an edgequant checkpoint),
    "model" (another folder with a config.json) or "other" (a .gguf file, ...). The one place that decides."""
    p = Path(str(path)).expanduser()
    if not p.exists():
        return "missing"
    if (p / EXPORT_JSON).is_file():
        return "dist"
    if (p / "config.json").is_file():
        return "checkpoint" if declares_checkpoint(read_config(p)) else "model"
    return "other"


def declares_checkpoint(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_scheme(f: Path, qc: dict) -> QuantScheme:
    """The scheme of a `quantization_config` block (written by `quantization_config`)."""
    missing = [k for k in ("bits", "group_size") if k not in qc]
    if missing:
        raise CheckpointError(f"{f}: quantization_config lacks {', '.join(missing)}; re-run `edgequant quantize`")
    try:
        scheme = QuantScheme.from_dict({"sym": False, **qc})
    except EdgequantError as e:
        raise CheckpointError(f"{f}: quantization_config: {e}") from None
    from .methods import METHODS
    # older checkpoints also state the packing; any other value would unpack into wrong weights
    for key, ok, want in (("pack", lambda v: v == PACK, repr(PACK)),
                          ("values_per_word", lambda v: v == scheme.values_per_word, str(scheme.values_per_word)),
                          ("lm_head", lambda v: isinstance(v, bool), "true or false"),
                          # a composition is written with '+' (e.g. rtn+owq)
                          ("method", lambda v: isinstance(v, str) and all(m in METHODS for m in v.split("+")),
                           "one of " + ", ".join(METHODS) + " (or several joined by '+')")):
        if key in qc and not ok(qc[key]):
            raise CheckpointError(f"{f}: quantization_config.{key} is {qc[key]!r}, edgequant writes {want}; "
                                  "restore the config.json written by `edgequant quantize`")
    return scheme


def read_overrides(f: Path, qc: dict, family, config: dict) -> dict[str, QuantScheme]:
    """The per-module schemes of a `quantization_config` block ({} when it has none): full module names of the
    model's quantized linears, its embedding table and (untied) output layer, each with a scheme object."""
    ov = qc.get("overrides", {})
    if not isinstance(ov, dict):
        raise CheckpointError(f"{f}: quantization_config.overrides must be an object of module name -> scheme; "
                              "restore the config.json written by `edgequant quantize`")
    allowed = set(table_names(family, config))
    layers, linears = config.get("num_hidden_layers"), qc.get("modules", family.linear_names)
    out = {}
    for name, d in ov.items():
        rel = family.relative_name(name)
        i = name[len(family.layers_path) + 1:].partition(".")[0] if rel else ""
        in_block = (rel in linears and isinstance(layers, int) and i.isdigit() and i == str(int(i))
                    and int(i) < layers)
        if name not in allowed and not in_block:
            raise CheckpointError(f"{f}: quantization_config.overrides names {name[:80]!r}, which is no quantized "
                                  f"linear, embedding or untied output layer of this model; restore the config.json "
                                  "written by `edgequant quantize`")
        try:
            out[name] = QuantScheme.from_dict_strict(d)
        except EdgequantError as e:
            raise CheckpointError(f"{f}: quantization_config.overrides[{name!r}]: {first_line(e, 200)}") from None
    head = family.embed if config.get("tie_word_embeddings") else family.head
    if qc.get("lm_head", False) != (head in out):
        raise CheckpointError(f"{f}: quantization_config.lm_head is {qc.get('lm_head')!r} but the overrides "
                              f"{'do not ' if head not in out else ''}quantize {head}; restore the config.json "
                              "written by `edgequant quantize`")
    return out


def table_names(family, config: dict) -> tuple[str, ...]:
    """The vocabulary tables a scheme may cover: the embedding, and the output layer unless it is tied to it."""
    return (family.embed,) if config.get("tie_word_embeddings") else (family.embed, family.head)


# ------------------------------------------------------------------------------------------------ writing
def quantization_config(scheme: QuantScheme, method: str, modules, overrides: dict | None = None,
                        lm_head: bool = False) -> dict:
    """The block written into config.json; `overrides` (module name -> scheme) only when there are any, so a
    checkpoint without them keeps its bytes. `lm_head`: whether the output layer (or the table tied to it) is
    quantized (by an override)."""
    qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method, **scheme.to_dict(),
          "modules": list(modules), "lm_head": bool(lm_head)}
    if overrides:
        qc["overrides"] = {k: overrides[k].to_dict() for k in sorted(overrides)}
    return qc


def save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str]):
    """Write one safetensors file whose bytes depend only on its contents.

    The safetensors library keeps `__metadata__` in a hash map, so the header's key order (and with it the
    file's bytes) changes from run to run; re-serialising the header with sorted keys fixes that."""
    from safetensors.numpy import save
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.write(memoryview(blob)[8 + n:])


def write_tensors(tensors: dict[str, np.ndarray], folder: Path, max_shard_bytes: int = 2 << 30):
    """Write `tensors` as model.safetensors, or as numbered shards plus an index past `max_shard_bytes`."""
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        if cur and size + v.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.nbytes
    shards.append(cur)
    meta = {"format": "pt", "edgequant_format": str(FORMAT_VERSION)}
    if len(shards) == 1:
        save_safetensors(shards[0], folder / WEIGHTS_NAME, meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, folder / fname, meta)
        weight_map.update({k: fname for k in shard})
    total = sum(v.nbytes for v in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_copy(src: Path, out: Path, tensors: dict[str, np.ndarray], provenance: dict):
    """A copy of checkpoint folder `src` at `out` (atomically) with new `tensors` and provenance (WCT writes its
    tuned checkpoint so)."""
    import shutil

    from .atomic import atomic_output_dir
    with atomic_output_dir(out, marker=PROVENANCE_NAME) as tmp:
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
                # contents only: copy2 kept the source's 0644 under a umask of 077 (nineteenth re-run, U14)
                shutil.copyfile(f, tmp / f.name)
        write_tensors(tensors, tmp)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ reading
def tensor_headers(f: Path) -> dict:
    """Header of a safetensors file, checked against the file's size (catches truncation and corruption)."""
    if not f.is_file():   # a FIFO or device would block the read below
        raise CheckpointError(f"{f.name} is not a regular file; copy the model or checkpoint folder again")
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 << 20):
                raise ValueError("header length out of range")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{f.name} is corrupt or truncated ({first_line(e)}); re-run `edgequant quantize` "
                              "to rewrite the checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{f.name} is corrupt (its header is not a JSON object); re-run `edgequant quantize`")
    spans = []
    for k, v in header.items():
        if k == "__metadata__":
            # safetensors' readers (eval, export) refuse any other metadata: inspect said nothing (fourteenth, S36)
            if not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
                raise CheckpointError(f"{f.name} is corrupt: its header's __metadata__ is not a map of strings; "
                                      "re-run `edgequant quantize` to rewrite the checkpoint")
            continue
        ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and v["dtype"] in _ST_ITEMSIZE
              and _is_shape(v.get("shape"))
              and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
              and all(_is_count(x) for x in v["data_offsets"]) and v["data_offsets"][0] <= v["data_offsets"][1])
        if ok:
            a, b = v["data_offsets"]
            ok = b - a == math.prod(v["shape"]) * _ST_ITEMSIZE[v["dtype"]]
        if not ok:
            raise CheckpointError(f"{f.name} is corrupt: the header entry of tensor '{k}' is malformed (dtype, shape "
                                  "and byte offsets disagree); re-run `edgequant quantize`")
        spans.append((a, b, k))
    prev = 0
    for a, b, k in sorted(spans):
        if a < prev:
            raise CheckpointError(f"{f.name} is corrupt: tensor '{k}' overlaps another tensor's bytes; re-run "
                                  "`edgequant quantize`")
        prev = b
    if 8 + n + prev != size:
        raise CheckpointError(f"{f.name} is truncated or padded: {size} bytes on disk, its header describes "
                              f"{8 + n + prev}; re-run `edgequant quantize` (or copy the file again)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


_POSITIVE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def check_model_config(f: Path, c: dict, fix: str | None = None):
    """The architecture fields that shapes are computed from: present, positive integers, consistent (checkpoints
    and model folders alike: transformers builds a model from them and divides by some). `fix`: what the error
    line tells the user to do, where restoring a config.json is not it (a GGUF's metadata)."""
    restore = fix or "restore the original config.json"
    for k in _POSITIVE_FIELDS + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = c.get(k)
        if (k in _POSITIVE_FIELDS or v is not None) and not (_is_count(v) and v > 0):
            raise CheckpointError(f"{f}: '{k}' must be a positive integer, not {v!r}; "
                                  + (fix or "re-run `edgequant quantize` or restore the original config.json"))
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if heads % kv or c["hidden_size"] % heads:   # transformers refuses the latter for every supported family
        raise CheckpointError(f"{f}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}) "
                              f"and divide hidden_size ({c['hidden_size']}); " + restore)
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if head_dim % 2:   # rotary embeddings rotate pairs of a head's channels
        raise CheckpointError(f"{f}: the head size ({head_dim}: 'head_dim', or hidden_size / num_attention_heads) "
                              "must be even; " + restore)
    # the last five steer what transformers' forward returns: a return_dict of null gave a tuple, where the logits
    # were expected (eval: AttributeError; fourteenth re-run's sweep)
    for k in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "return_dict",
              "output_hidden_states", "output_attentions", "use_cache", "is_encoder_decoder"):
        if k in c and not isinstance(c[k], bool):   # "false" is a true value to Python
            raise CheckpointError(f"{f}: '{k}' must be true or false, not {c[k]!r}; " + restore)
    types = c.get("layer_types")
    if types is not None and not (isinstance(types, list) and len(types) == c["num_hidden_layers"]
                                  and all(t in ("full_attention", "sliding_attention") for t in types)):
        # transformers refuses these itself (quantize, eval); export read the window from other fields
        raise CheckpointError(f"{f}: 'layer_types' must list 'full_attention' or 'sliding_attention' for each of the "
                              f"{c['num_hidden_layers']} layers; " + restore)
    if types is not None and c.get("model_type") == "mistral":
        raise CheckpointError(f"{f}: a mistral config.json with 'layer_types' describes a Ministral model "
                              "(transformers builds MinistralForCausalLM for it), which edgequant does not support; "
                              "remove layer_types if the model is a plain Mistral, or " + restore)
    if types is not None and "sliding_attention" in types:
        if c.get("model_type") in _NO_LAYER_TYPES:
            # transformers' forward ignores them, while its generation slides the cache of those layers: no one
            # model to quantize or export (mistral's are refused above, whatever they name)
            raise CheckpointError(f"{f}: 'layer_types' names sliding-window layers, which a {c['model_type']} model "
                                  "does not have (transformers' forward and generation disagree on them); " + restore)
        if c.get("model_type") in ("qwen2", "qwen3") and not (c.get("use_sliding_window") is True
                                                               and c.get("sliding_window")):
            raise CheckpointError(f"{f}: 'layer_types' names sliding-window layers, but use_sliding_window is not "
                                  "true or sliding_window is null (transformers cannot run that); " + restore)
    _check_windows(f, c, restore)
    _check_rope_types(f, c, restore)
    for key in _ROPE_BLOCKS:
        rp = c.get(key)
        if isinstance(rp, dict) and rp.get("rope_type", rp.get("type")) in ("longrope", "su"):
            # transformers only warns and broadcasts a list of another length over the rotary frequencies
            part = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
            pairs = int(head_dim * (part if _is_number(part) else 1.0)) // 2
            for name in ("short_factor", "long_factor"):
                v = rp.get(name)
                if not (isinstance(v, list) and len(v) == pairs and all(_is_number(x) for x in v)):
                    raise CheckpointError(f"{f}: {key}.{name} must be a list of {pairs} numbers (one per pair of "
                                          "rotary channels); " + restore)
    if not isinstance(c.get("model_type"), str):
        raise CheckpointError(f"{f}: 'model_type' is " + ("missing" if c.get("model_type") is None else
                                                          f"{c['model_type']!r}, not a model type name") + "; " + restore)


def _check_rope_types(f, c: dict, restore: str):
    """Each RoPE block's type is one transformers computes (its own check only logs a warning for another one before
    the model build fails: two stderr lines, fifteenth re-run); Gemma 3 nests one block per layer kind."""
    known = ROPE_TYPES
    for key in _ROPE_BLOCKS:
        rp = c.get(key)
        blocks = [rp, *(v for v in rp.values() if isinstance(v, dict))] if isinstance(rp, dict) else []
        for b in blocks:
            # a null rope_type is not "unset" to transformers: it logs a line, then fails (sixteenth re-run, T33)
            kind = b["rope_type"] if "rope_type" in b else b.get("type")
            if ("rope_type" in b or kind is not None) and not (isinstance(kind, str) and kind in known):
                raise CheckpointError(f"{f}: {key}'s rope_type is {kind!r}, not one of {', '.join(sorted(known))}; "
                                      + restore)


def _check_windows(f, c: dict, restore: str):
    """Families whose layers slide by kind (Gemma: `Family.layer_types`, config.json's or transformers' default
    pattern) need a window for those layers: with `sliding_window` null quantize wrote a checkpoint that eval could
    not run (transformers' mask raised) and export refused (fourteenth re-run, S37)."""
    from .models import family_for
    pattern = c.get("sliding_window_pattern")
    if pattern is not None and not (_is_count(pattern) and pattern > 0):
        raise CheckpointError(f"{f}: 'sliding_window_pattern' must be a positive integer, not {pattern!r}; " + restore)
    try:
        kinds = family_for(c.get("model_type")).layer_types(c)
    except EdgequantError:   # an unsupported model type is refused where the family is needed
        return
    if kinds and "sliding_attention" in kinds and not (_is_count(c.get("sliding_window")) and c["sliding_window"] > 0):
        raise CheckpointError(f"{f}: its sliding-window layers need a positive 'sliding_window', not "
                              f"{c.get('sliding_window')!r}; " + restore)


_NO_LAYER_TYPES = ("llama", "phi3")   # model types whose transformers model has no per-layer attention kinds


def _is_count(v, lo=0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_shape(v) -> bool:
    return isinstance(v, list) and all(_is_count(x) for x in v)


_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
                "U64": 8, "I64": 8, "F64": 8}


def weight_files(p: Path) -> dict[str, Path]:
    if (p / INDEX_NAME).is_file():
        try:
            wm = json.loads((p / INDEX_NAME).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{INDEX_NAME} is damaged ({first_line(e)}); re-run `edgequant quantize`") from None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{INDEX_NAME} is damaged (weight_map is not an object); re-run `edgequant quantize`")
        out = {}
        for name, fname in wm.items():
            f = inside_folder(p, fname)
            if f is None:
                raise CheckpointError(f"{INDEX_NAME} names {fname!r} as the shard of {name}, which is not a file "
                                      f"inside {p}; refusing to read it (re-run `edgequant quantize`)")
            if not f.is_file():
                raise CheckpointError(f"shard {fname} (holding {name}) is missing from {p}; copy the whole folder again")
            out[name] = f
        return out
    if not (p / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{p} has no {WEIGHTS_NAME}: the checkpoint is incomplete; re-run `edgequant quantize`")
    return {}


def plain_weight_headers(folder: Path) -> dict[Path, dict]:
    """{file: its checked header} of a model folder's safetensors weights (its index, or every `*.safetensors`),
    each tensor fp32, fp16 or bf16: an integer or bool tensor would be cast to float by transformers without a
    word, and a model's weights are never those."""
    files = sorted(set(weight_files(folder).values())) if (folder / INDEX_NAME).is_file() else []
    files = files or sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EdgequantError(f"{folder} has no .safetensors weights; convert the model with `edgequant convert MODEL "
                             "-o FOLDER` and use that folder")
    out = {}
    for f in files:
        headers = tensor_headers(f)
        packed = next((n for n in headers if n.endswith(".qweight")), None)
        if packed:
            raise EdgequantError(f"{folder} holds packed edgequant weights ({packed}) but its config.json has no "
                                 "edgequant quantization_config: restore the config.json written by `edgequant "
                                 "quantize`, or quantize the original model first")
        for name, h in headers.items():
            if h["dtype"] not in ("F32", "F16", "BF16"):
                raise EdgequantError(f"{f.name}: tensor '{name}' is {h['dtype']}; a model's weights are fp32, fp16 "
                                     "or bf16: restore the model's original files")
        out[f] = headers
    return out


def check_weight_shape(path, name: str, shape, want) -> None:
    """A weight of another shape than config.json makes it is refused before anything is built or written."""
    if list(shape) != list(want):
        raise EdgequantError(f"{path}: weight '{name}' is {list(shape)}, the model's config.json makes it "
                             f"{list(want)}; restore the model's original files or config.json")


def check_blocks_fit_config(folder: Path, config: dict, headers: dict | None = None) -> None:
    """A model folder's config.json (`check_model_config`) and its blocks, from the safetensors headers (no data
    read): as many as num_hidden_layers, each linear and norm (and the vocabulary tables) of the shape its sizes
    make, and the bias of every linear the config gives one. transformers (and export's compile) build what
    config.json says before the weights are compared: 1e6 layers or head_dim 1e9 never finished."""
    from .models import family_for
    check_model_config(folder / "config.json", config)
    family = family_for(config["model_type"])
    shapes = {n: h["shape"] for hs in (headers or plain_weight_headers(folder)).values() for n, h in hs.items()}
    pre = f"{family.layers_path}."
    held = {int(i) for i in (n[len(pre):].partition(".")[0] for n in shapes if n.startswith(pre)) if i.isdigit()}
    if not held:   # weights under other names (transformers maps some checkpoints' keys itself): it compares them
        return
    layers = config["num_hidden_layers"]
    # distinct ints, so count + ends say it is 0..layers-1 (a set of range(2**31) took minutes and 9 GB)
    if len(held) != layers or min(held) != 0 or max(held) != layers - 1:
        raise EdgequantError(f"{folder / 'config.json'}: num_hidden_layers is {layers}, the weights hold "
                             f"{len(held)} blocks (numbered {min(held)}..{max(held)}); restore the model's original "
                             "files or config.json")
    linears, norms = family.linear_shapes(config), family.norm_shapes(config)
    want = {f"{t}.weight": (config["vocab_size"], family.dims(config).hidden) for t in (family.embed, family.head)}
    for i in range(layers):
        pre = family.layer_prefix(i)
        want.update({f"{pre}.{lin}.weight": nk for lin, nk in linears.items()})
        want.update({f"{pre}.{norm}.weight": (n,) for norm, n in norms.items()})
    for name, shape in want.items():
        if name in shapes:   # a missing one is named by whatever reads the weights
            check_weight_shape(folder, name, shapes[name], shape)
    # a bias missing (`attention_bias: true` without biases) or one the config's model lacks (transformers drops
    # it with a warning) would make transformers and export build another model than the folder's weights
    biased = sorted(family.biased_linears(config))
    missing = [n for i in range(layers) for n in (f"{family.layer_prefix(i)}.{lin}.bias" for lin in biased)
               if n not in shapes]
    if missing:
        raise EdgequantError(f"{folder} lacks weight(s) its config.json's model has: {name_list(missing)} (an "
                             "incomplete download or copy, or options in config.json the weights were not made "
                             "with); restore the model's original files")
    extra = [n for i in range(layers) for n in (f"{family.layer_prefix(i)}.{lin}.bias" for lin in linears
                                                 if lin not in biased) if n in shapes]
    if extra:
        raise EdgequantError(f"{folder} holds bias(es) its config.json's model does not have: {name_list(extra)} "
                             "(config.json's attention_bias / mlp_bias, or weights of another model); restore the "
                             "model's original files")


def read_plain_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The fp32/fp16/bf16 tensors of a model folder's safetensors weights (`plain_weight_headers`) as NumPy arrays,
    bf16 widened to fp32 (NumPy has none)."""
    out = {}
    for f, headers in plain_weight_headers(folder).items():
        data = np.fromfile(f, dtype=np.uint8)
        start = 8 + int.from_bytes(data[:8].tobytes(), "little")
        for name, h in headers.items():
            raw = data[start + h["data_offsets"][0]:start + h["data_offsets"][1]]
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if h["dtype"] == "BF16" else \
                raw.view(np.float32 if h["dtype"] == "F32" else np.float16)
            out[name] = arr.reshape(h["shape"])
    return out


def inspect(checkpoint, context: int | None = None) -> dict:
    """Scheme, method, target and stored bits per weight (stored counts packed words, scales, zero points and fp16
    columns), size on disk, per-layer reconstruction errors, calibration settings of a checkpoint, and its memory plan
    (edgequant.memory) at `context` tokens."""
    from .artifact import expected_layout, open_checkpoint
    ck = open_checkpoint(checkpoint)
    _, quant = expected_layout(ck)
    tables = {n: ck.scheme_for(n).name for n in table_names(ck.family, ck.config) if n in quant}
    quant = {n: v for n, v in quant.items() if n not in tables}   # the figures below are the block linears'
    q_weights = sum(n * k for n, k, _ in quant.values())
    q_bits = sum((b - a) * 8 for f in set(ck.files.values()) for name, h in tensor_headers(f).items()
                 for a, b in [h["data_offsets"]] if name.rpartition(".")[0] in quant and not name.endswith(".bias"))
    idx_names = [n for n in ck.files if n.endswith(".outlier_idx")]
    outlier_cols = {n.rpartition(".")[0]: v.tolist() for n, v in ck.read(idx_names).items()}   # range-checked
    files = [p for p in ck.path.iterdir() if p.is_file()]
    s = ck.scheme
    ideal = sum(n * k * (t.bits + (16 + (0 if t.sym else 8)) / t.group_len(k))
                for name, (n, k, _) in quant.items() for t in [ck.scheme_for(name)]) / q_weights
    prov = ck.provenance
    f = ck.path / PROVENANCE_NAME
    # provenance is informative only (open_checkpoint ignores a damaged one); inspect reports its state
    provenance = "ok" if prov else "missing" if not f.is_file() else "damaged (unreadable or malformed)"
    opts = prov.get("options") or {}
    # the figure the user asked for: OWQ's budget, else the integer width; "stored" adds packing, scales, zeros
    target = opts.get("target_bits") or opts.get("owq_target_bits") or float(s.bits)
    if opts.get("width_budget"):   # OWQ under a width budget: the columns' share comes on top of the mean width
        target = opts["width_budget"] + (opts["target_bits"] - s.bits if opts.get("target_bits") else 0.0)
    return {
        "path": str(ck.path), "model_type": ck.config.get("model_type"), "method": ck.method,
        "scheme": s.name, "bits": s.bits, "group_size": s.group_size, "sym": s.sym,
        "quantized_linears": len(quant), "quantized_weights": q_weights,
        "bits_target": float(target), "bits_per_weight": q_bits / q_weights,
        "bits_per_weight_ideal": ideal,
        "overrides": {k: v.name for k, v in ck.overrides.items()} or None, "tables": tables or None,
        "outlier_columns": {k: len(v) for k, v in outlier_cols.items()} or None,
        "outlier_indices": outlier_cols or None,
        "size_on_disk_bytes": sum(p.stat().st_size for p in files),
        "calibration": prov.get("calibration"), "time_s": prov.get("time_s"),
        "layers": prov.get("layers", {}), "provenance": provenance,
        "memory": _memory_plan(ck, context).to_dict(),
    }


def _memory_plan(ck, context):
    from .memory import Shapes, memory_plan
    weights = sum(f.stat().st_size for f in set(ck.files.values()))   # every stored tensor (headers are tiny)
    return memory_plan(Shapes.from_hf_config(ck.config), weights, context)


# the sections of edgequant.json that inspect, report and tune read, with the type each must have
_PROVENANCE_SECTIONS = {"options": dict, "calibration": dict, "time_s": dict, "layers": dict, "evaluations": list}
_PROVENANCE_NUMBERS = ("target_bits", "owq_target_bits", "width_budget")   # options read as numbers


def read_provenance(folder: Path) -> dict:
    """The checkpoint's edgequant.json, or {} where it is missing or damaged (not a JSON object, or a section of
    another type than `_PROVENANCE_SECTIONS` says, a per-layer entry that is not an object): provenance is informative
    only, so a damaged one is ignored, not fatal."""
    f = folder / PROVENANCE_NAME
    try:
        prov = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(prov, dict) or any(prov.get(k) is not None and not isinstance(prov[k], t)
                                         for k, t in _PROVENANCE_SECTIONS.items()):   # null: not recorded (RTN)
        return {}
    opts = prov.get("options") or {}
    if any(not isinstance(v, dict) for v in (prov.get("layers") or {}).values()) or any(
            opts.get(k) is not None and not (_is_number(opts[k]) and opts[k] > 0) for k in _PROVENANCE_NUMBERS):
        return {}
    return prov


def record_evaluation(path, entry: dict) -> None:
    """Append an evaluation result to the checkpoint's edgequant.json `evaluations` list (`edgequant eval --record`;
    `edgequant report` plots it). The file is replaced atomically; the tensors are not touched."""
    import os
    p = Path(path).expanduser() / PROVENANCE_NAME
    prov = read_provenance(p.parent)
    evals = prov.get("evaluations") if isinstance(prov.get("evaluations"), list) else []
    prov["evaluations"] = evals + [entry]
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(json.dumps(prov, indent=2, default=str))
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EdgequantError(f"cannot record the result in {p} ({first_line(e)}); leave out --record for a "
                             "read-only checkpoint") from None
