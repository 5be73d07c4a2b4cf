"""A PyTorch model to and from a quantized checkpoint (the folder itself and its file format: `checkpoint.py`).

Per quantized linear `L`: `L.qweight` uint32
[N, ceil(K/vpw)] packed LSB-first along K, `L.scales` fp16 [N, n_groups], `L.zeros` uint8 [N, n_groups] (asymmetric
only), `L.outlier_idx` int32 [J] + `L.outlier_weight` fp16 [N, J] (OWQ only), `L.bias` fp16 where present. Every other
tensor is stored in fp16 under its usual name. Writing goes to a temporary folder renamed into place when complete;
reading checks every tensor's presence, dtype and shape and names the first one that is wrong.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import pack
from .atomic import check_not_stranded
from .checkpoint import (FORMAT_VERSION, PROVENANCE_NAME, QUANT_METHOD, WEIGHTS_NAME, _is_count, check_model_config,
                         table_names, declares_checkpoint, quantization_config, read_config, read_overrides, read_provenance,
                         read_scheme, tensor_headers, value_problem, weight_files, write_tensors)
from .errors import CheckpointError, first_line
from .models import Family, family_for
from .quantizer import QuantizedWeight
from .schemes import QuantScheme

_QUANT_LEAVES = ("qweight", "scales", "zeros", "outlier_idx", "outlier_weight")   # a quantized linear's tensors


# --------------------------------------------------------------------------------------------------- writing
def quantized_linear_tensors(name: str, qw: QuantizedWeight, bias: torch.Tensor | None) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one quantized linear."""
    s = qw.scheme
    out = {f"{name}.qweight": pack.pack(qw.q.to(torch.int64), s.bits),
           f"{name}.scales": qw.scale.detach().to(torch.float16).cpu().numpy()}
    if not s.sym:
        out[f"{name}.zeros"] = qw.zero.detach().round().to(torch.uint8).cpu().numpy()
    if qw.outlier_idx is not None and len(qw.outlier_idx):
        out[f"{name}.outlier_idx"] = qw.outlier_idx.detach().to(torch.int32).cpu().numpy()
        out[f"{name}.outlier_weight"] = qw.outlier_weight.detach().to(torch.float16).cpu().numpy()
    if bias is not None:
        out[f"{name}.bias"] = bias.detach().to(torch.float16).cpu().numpy()
    return out


def _plain_tensors(model, skip: set[str]) -> dict[str, np.ndarray]:
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if mod in skip:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:  # tied weights (lm_head = embed_tokens) are stored once
            continue
        seen.add(key)
        arr = t.detach().cpu()
        arr = arr.to(torch.float16) if arr.is_floating_point() else arr
        out[name] = arr.numpy()
    return out


def save_checkpoint(out_dir, model, tokenizer, quantized: dict[str, QuantizedWeight], scheme: QuantScheme,
                    method: str, provenance: dict | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Write the checkpoint atomically: fill a temporary sibling folder, then rename it onto `out_dir`.

    `quantized` maps module names (the block linears, and the embedding / untied output layer where those are
    quantized) to their weights; a weight whose scheme is not `scheme`, and every table, is recorded as a per-module
    override."""
    from .atomic import atomic_output_dir
    family = family_for(model.config.model_type)
    out = Path(out_dir).expanduser().resolve()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    # the checkpoint's scheme covers block linears only: a quantized table always names its own
    overrides = {name: qw.scheme for name, qw in quantized.items()
                 if qw.scheme != scheme or name in (family.embed, family.head)}
    with atomic_output_dir(out, marker=PROVENANCE_NAME) as tmp:
        # a quantized embedding that the output layer is tied to is stored once, as the embedding's tensors
        skip = set(quantized) | ({family.head} if tied and family.embed in quantized else set())
        tensors = _plain_tensors(model, skip=skip)
        modules = dict(model.named_modules())
        for name, qw in quantized.items():
            tensors.update(quantized_linear_tensors(name, qw, getattr(modules[name], "bias", None)))
        # calibration can push a value past fp16 (LET scales, OWQ columns): refused here, not by the next reader
        bad = next((n for n, a in tensors.items() if a.dtype.kind == "f" and not np.isfinite(a).all()), None)
        if bad is not None:
            raise CheckpointError(f"the new checkpoint's '{bad}' holds values past fp16's range or NaN; {out} was "
                                  "left as it was: check the model's weights, or quantize with other settings")
        write_tensors(tensors, tmp, max_shard_bytes)
        cfg = model.config.to_dict()
        cfg.pop("_name_or_path", None)
        head = family.embed if tied else family.head
        cfg["quantization_config"] = quantization_config(scheme, method, family.linear_names, overrides,
                                                         lm_head=head in quantized)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tokenizer is not None:
            from .loading import save_tokenizer
            save_tokenizer(tokenizer, tmp)
        prov = {"format_version": FORMAT_VERSION, "method": method, "scheme": scheme.to_dict(),
                "scheme_name": scheme.name, **(provenance or {})}
        (tmp / PROVENANCE_NAME).write_text(json.dumps(prov, indent=2, default=str))
        # opened as every reader opens it, before the swap: a result they would refuse must not replace -o
        try:
            open_checkpoint(tmp)
        except CheckpointError as e:
            raise CheckpointError(f"the new checkpoint would not load ({e}); {out} was left as it was") from None
    return out


# --------------------------------------------------------------------------------------------------- reading
@dataclass
class Checkpoint:
    """An opened, validated checkpoint folder."""
    path: Path
    config: dict
    scheme: QuantScheme
    method: str
    family: Family
    provenance: dict
    files: dict[str, Path] = field(default_factory=dict)   # tensor name -> file
    overrides: dict[str, QuantScheme] = field(default_factory=dict)   # module name -> its own scheme

    def scheme_for(self, name: str) -> QuantScheme | None:
        """The scheme of module `name`, the one question every reader of a checkpoint asks: its override, else the
        checkpoint's scheme for a block linear; None for a vocabulary table kept in fp16 (tied output: the
        embedding's)."""
        if name == self.family.head and self.config.get("tie_word_embeddings"):
            name = self.family.embed
        if name in self.overrides:
            return self.overrides[name]
        return None if name in (self.family.embed, self.family.head) else self.scheme

    @property
    def qconfig(self) -> dict:
        return self.config["quantization_config"]

    def hf_config(self):
        from transformers import AutoConfig
        d = {k: v for k, v in self.config.items() if k != "quantization_config"}
        return AutoConfig.for_model(d.pop("model_type"), **d)

    def read(self, names=None) -> dict[str, np.ndarray]:
        """Tensors as NumPy arrays (all of them, or the given names)."""
        from safetensors import safe_open
        names = list(self.files) if names is None else list(names)
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            try:
                with safe_open(str(f), framework="np") as sf:
                    for n in ns:
                        out[n] = sf.get_tensor(n)
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged data
                raise CheckpointError(f"cannot read tensors from {f.name} ({first_line(e)}); the file is damaged: "
                                      "re-run `edgequant quantize` to rewrite it") from None
        for n, arr in out.items():
            self._check_values(n, arr)
        return out

    def _check_values(self, name: str, arr: np.ndarray):
        base, _, leaf = name.rpartition(".")
        s = self.scheme_for(base) if leaf in _QUANT_LEAVES else None
        bad = value_problem(leaf, arr, s.bits if s is not None else None, lambda: _in_features(self, base))
        if bad:
            raise CheckpointError(f"tensor '{name}' holds {bad}; the checkpoint is damaged: re-run `edgequant "
                                  "quantize` to rewrite it")

    def quantized_linears(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[0] for n in self.files if n.endswith(".qweight")}, key=_natural_key)


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in s.split(".")]


def open_checkpoint(path, config: dict | None = None) -> Checkpoint:
    """Open a checkpoint folder and validate every tensor against its config (`config`: its config.json when the
    caller has read it already); raise CheckpointError if anything is off."""
    p = Path(path).expanduser()
    if not p.exists():
        check_not_stranded(p)
        raise CheckpointError(f"checkpoint not found: {p}; pass the folder written by `edgequant quantize`")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} has no config.json: it is not a checkpoint written by `edgequant quantize`")
    config = read_config(p) if config is None else config
    qc = config.get("quantization_config") or {}
    if not declares_checkpoint(config):
        raise CheckpointError(f"{p} is not an edgequant checkpoint (no quantization_config with quant_method "
                              f"'{QUANT_METHOD}'); quantize the model first with `edgequant quantize`")
    if not _is_count(qc.get("format_version", 1)):
        raise CheckpointError(f"{p / 'config.json'}: quantization_config.format_version must be an integer")
    if qc.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{p} uses checkpoint format {qc['format_version']}, newer than this edgequant "
                              f"understands ({FORMAT_VERSION}); upgrade edgequant")
    check_model_config(p / "config.json", config)
    family = family_for(config.get("model_type", "?"))
    scheme = read_scheme(p / "config.json", qc)
    overrides = read_overrides(p / "config.json", qc, family, config)
    prov = read_provenance(p)
    files = weight_files(p)
    headers = {}
    for f in sorted(set(files.values())) or [p / WEIGHTS_NAME]:
        for name, h in tensor_headers(f).items():
            headers[name] = h
            files.setdefault(name, f)
    # the layer count bounds the model built to check shapes: 10**9 layers would grow memory without end
    stem = re.escape(family.layer_prefix(0).rsplit(".", 1)[0])
    layers = {int(m.group(1)) for n in headers if (m := re.match(stem + r"\.(\d+)\.", n))}
    if config["num_hidden_layers"] != len(layers):
        raise CheckpointError(f"{p / 'config.json'}: num_hidden_layers is {config['num_hidden_layers']}, the weights "
                              f"hold {len(layers)} layers; restore the config.json written by `edgequant quantize`")
    ckpt = Checkpoint(p, config, scheme, qc.get("method", "?"), family, prov, files, overrides)
    _validate(ckpt, headers)
    return ckpt


def expected_layout(ckpt: Checkpoint) -> tuple[dict[str, tuple], dict[str, tuple[int, int, bool]]]:
    """Shapes the checkpoint must hold: plain tensors {name: shape} and quantized modules {name: (N, K, has_bias)}:
    the block linears, then the vocabulary tables that an override quantizes (`Checkpoint.scheme_for`)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ckpt.hf_config())
    quant = {}
    modules = dict(model.named_modules())
    for i in range(ckpt.config["num_hidden_layers"]):
        for lin in ckpt.qconfig.get("modules", ckpt.family.linear_names):
            name = f"{ckpt.family.layer_prefix(i)}.{lin}"
            m = modules[name]
            quant[name] = (m.out_features, m.in_features, m.bias is not None)
    for name in table_names(ckpt.family, ckpt.config):
        if ckpt.scheme_for(name) is not None:
            quant[name] = tuple(modules[name].weight.shape) + (False,)
    plain = {name: tuple(t.shape) for name, t in model.state_dict().items() if name.rsplit(".", 1)[0] not in quant}
    if ckpt.config.get("tie_word_embeddings"):
        plain.pop(f"{ckpt.family.head}.weight", None)
    return plain, quant


def _validate(ckpt: Checkpoint, headers: dict):
    try:
        plain, quant = expected_layout(ckpt)
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises many types
        raise CheckpointError(f"{ckpt.path / 'config.json'} does not describe a valid model ({first_line(e)}); "
                              "restore the original config.json or re-run `edgequant quantize`") from None
    fix = "re-run `edgequant quantize` to rewrite the checkpoint"

    def check(name, shape, dtype):
        h = headers.get(name)
        if h is None:
            raise CheckpointError(f"tensor '{name}' is missing from the checkpoint; {fix}")
        if tuple(h["shape"]) != tuple(shape):
            raise CheckpointError(f"tensor '{name}' has shape {tuple(h['shape'])}, expected {tuple(shape)}; {fix}")
        if dtype is not None and h["dtype"] != dtype:
            raise CheckpointError(f"tensor '{name}' has dtype {h['dtype']}, expected {dtype}; {fix}")

    for name, shape in plain.items():   # edgequant writes them fp16; another dtype was put there by hand
        check(name, shape, "F16")
    for name, (n, k, has_bias) in quant.items():
        s = ckpt.scheme_for(name)
        if f"{name}.weight" in headers:   # an fp16 table beside the packed one was loaded in its place
            raise CheckpointError(f"tensor '{name}.weight' is stored beside its quantized form '{name}.qweight'; "
                                  f"the checkpoint was altered: {fix}")
        check(f"{name}.qweight", (n, s.packed_words(k)), "U32")
        check(f"{name}.scales", (n, s.groups(k)), "F16")
        if not s.sym:
            check(f"{name}.zeros", (n, s.groups(k)), "U8")
        elif f"{name}.zeros" in headers:
            raise CheckpointError(f"tensor '{name}.zeros' is present but the scheme is symmetric (sym: true stores "
                                  f"no zero points); the config and tensors disagree: {fix}")
        if has_bias:
            check(f"{name}.bias", (n,), "F16")
        elif f"{name}.bias" in headers:   # export would add it; the model config.json describes has none there
            raise CheckpointError(f"tensor '{name}.bias' is present but the model config.json describes has no bias "
                                  f"there (attention_bias / mlp_bias, or weights of another model); {fix}")
        if f"{name}.outlier_idx" in headers:
            j = headers[f"{name}.outlier_idx"]["shape"][0]
            check(f"{name}.outlier_idx", (j,), "I32")
            check(f"{name}.outlier_weight", (n, j), "F16")
    known = set(plain) | {f"{name}.{leaf}" for name in quant for leaf in (*_QUANT_LEAVES, "bias")}
    extra = sorted(set(headers) - known)
    if extra:   # a tensor nothing reads: the model computed would not be the one the files hold
        tied = " (config.json ties the output layer to the embedding)" if ckpt.config.get("tie_word_embeddings") \
            and extra[0] == f"{ckpt.family.head}.weight" else ""
        raise CheckpointError(f"tensor '{extra[0]}' has no place in this {ckpt.config['model_type']} model{tied}; "
                              f"the checkpoint was altered: {fix}")


def load_quantized_weight(ckpt: Checkpoint, name: str, tensors: dict | None = None) -> QuantizedWeight:
    """One linear's integers and group parameters, unpacked from the checkpoint."""
    keys = [f"{name}.{leaf}" for leaf in _QUANT_LEAVES if f"{name}.{leaf}" in ckpt.files]
    t = tensors if tensors is not None else ckpt.read(keys)
    s = ckpt.scheme_for(name)
    k = _in_features(ckpt, name)
    q = torch.from_numpy(pack.unpack(t[f"{name}.qweight"], s.bits, k).astype(np.int64))
    scale = torch.from_numpy(t[f"{name}.scales"].astype(np.float32))
    zero = (torch.from_numpy(t[f"{name}.zeros"].astype(np.float32)) if not s.sym
            else torch.full_like(scale, float(s.sym_zero)))
    qw = QuantizedWeight(q, scale, zero, s)
    if f"{name}.outlier_idx" in t:
        qw.outlier_idx = torch.from_numpy(t[f"{name}.outlier_idx"].astype(np.int64))
        qw.outlier_weight = torch.from_numpy(t[f"{name}.outlier_weight"].astype(np.float32))
    return qw


def _in_features(ckpt: Checkpoint, name: str) -> int:
    if name in table_names(ckpt.family, ckpt.config):
        return ckpt.family.dims(ckpt.config).hidden
    shape = ckpt.family.linear_shapes(ckpt.config).get(ckpt.family.relative_name(name))
    if shape is None:
        raise CheckpointError(f"'{name}' is no linear of a {ckpt.config.get('model_type')} model; the checkpoint is "
                              "damaged: re-run `edgequant quantize` to rewrite it")
    return shape[1]


def load_quantized_model(path, dtype=torch.float32, device="cpu"):
    """A PyTorch model rebuilt from the saved checkpoint: each quantized linear's weight is dequantized from its
    packed integers, scales, zero points and fp16 outlier columns. Returns (model, checkpoint)."""
    from transformers import AutoModelForCausalLM
    ckpt = open_checkpoint(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ckpt.hf_config(), dtype=dtype)
    model = model.to_empty(device=device)
    tensors = ckpt.read()
    state = {}
    for name in ckpt.quantized_linears():
        state[f"{name}.weight"] = load_quantized_weight(ckpt, name, tensors).dequantize()
        if f"{name}.bias" in tensors:
            state[f"{name}.bias"] = torch.from_numpy(tensors[f"{name}.bias"].astype(np.float32))
    quant_keys = {f"{n}.{leaf}" for n in ckpt.quantized_linears() for leaf in (*_QUANT_LEAVES, "bias")}
    for name, arr in tensors.items():
        if name not in quant_keys:
            state[name] = torch.from_numpy(arr.astype(np.float32) if arr.dtype == np.float16 else arr)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and ckpt.config.get("tie_word_embeddings"))]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match its config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); re-run `edgequant quantize`")
    if ckpt.config.get("tie_word_embeddings"):
        model.tie_weights()
    # buffers such as rotary inv_freq were left empty by to_empty: recompute them
    _reinit_buffers(model)
    model.eval()
    model.requires_grad_(False)
    return model, ckpt


def _reinit_buffers(model):
    """Rebuild modules whose buffers are computed at construction (rotary inv_freq, Gemma 3's one per layer type;
    Gemma's embedding scale), which `to_empty` left empty."""
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "scalar_embed_scale") and hasattr(mod, "embed_scale"):
            mod.embed_scale.fill_(mod.scalar_embed_scale)
        if hasattr(mod, "config") and any(b.endswith("inv_freq") for b, _ in mod.named_buffers(recurse=False)):
            model.set_submodule(name, type(mod)(config=mod.config).to(next(mod.buffers()).device))
