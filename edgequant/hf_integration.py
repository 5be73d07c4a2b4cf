"""transformers integration: `AutoModelForCausalLM.from_pretrained(checkpoint)` on an edgequant checkpoint.

`register()` adds a quantization config (`EdgequantConfig`, for `quant_method: "edgequant"`) and a quantizer
(`EdgequantHfQuantizer`) through transformers' public registration API. Before the weights load, the quantizer opens
and validates the folder with `edgequant.artifact.open_checkpoint` (a damaged checkpoint is refused with the same
message as `edgequant eval`) and swaps each quantized linear for an `EdgequantLinear` whose buffers carry the stored
tensors under their stored names, so transformers' own loader fills them (device_map, dtype, shards, offloading). The
linear keeps the packed words and expands them at every call: w = (q - z) * s per group, the fp16 outlier columns
written over their columns (OWQ), then the layer's bias. The arithmetic is the checkpoint's rebuild in
`edgequant.artifact.load_quantized_model` (what `edgequant eval` measures), so at float32 the logits are the same.
Each module takes its own scheme (`Checkpoint.scheme_for`: per-module overrides). A quantized embedding
(`--embed-bits`) becomes an `EdgequantEmbedding` that dequantizes only the rows it looks up; an untied quantized output
layer an `EdgequantLinear`; a tied one an `EdgequantTiedHead` computing the logits from the embedding's table.

`edgequant.hf_hook` calls `register()` lazily; use `import edgequant` before `from_pretrained`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import pack
from .checkpoint import QUANT_METHOD
from .errors import CheckpointError
from .quantizer import QuantizedWeight
from .schemes import QuantScheme


class EdgequantConfig(QuantizationConfigMixin):
    """The checkpoint's `quantization_config` block, kept as written (so `model.config` shows it unchanged)."""

    def __init__(self, bits: int = 4, group_size: int = 128, sym: bool = False, **kwargs):
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.scheme = QuantScheme(bits, group_size, sym)   # validates; raises a one-line EdgequantError
        kwargs.pop("quant_method", None)
        self.__dict__.update(kwargs)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "scheme"}


def _register_packed(mod: nn.Module, n: int, k: int, scheme: QuantScheme):
    """The buffers of a packed [n, k] weight, shaped as the checkpoint stores them."""
    mod.register_buffer("qweight", torch.empty(n, scheme.packed_words(k), dtype=torch.uint32))
    mod.register_buffer("scales", torch.empty(n, scheme.groups(k), dtype=torch.float16))
    if not scheme.sym:
        mod.register_buffer("zeros", torch.empty(n, scheme.groups(k), dtype=torch.uint8))


def _dequantize_rows(mod: nn.Module, rows, k: int, outlier_idx=None, outlier_weight=None) -> torch.Tensor:
    """Rows of `mod`'s packed weight in float32, computed exactly as `QuantizedWeight.dequantize` computes them."""
    s = mod.scheme
    scale = mod.scales[rows].float()
    zero = mod.zeros[rows].float() if not s.sym else torch.full_like(scale, float(s.sym_zero))
    q = pack.unpack_torch(mod.qweight[rows], s.bits, k).float()
    return QuantizedWeight(q, scale, zero, s, outlier_idx, outlier_weight).dequantize()


class EdgequantLinear(nn.Module):
    """A linear computed from the checkpoint's packed tensors, dequantized at every call (nothing unpacked is kept)."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, n_outliers: int, has_bias: bool,
                 dtype: torch.dtype):
        """Scales and outlier columns stay in fp16, their stored (exact) dtype, whatever the model's dtype; the
        weight is rebuilt in float32 and cast to the input's dtype, the bias is in the model's dtype."""
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        n = out_features
        _register_packed(self, n, in_features, scheme)
        if n_outliers:
            self.register_buffer("outlier_idx", torch.empty(n_outliers, dtype=torch.int32))
            self.register_buffer("outlier_weight", torch.empty(n, n_outliers, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False) if has_bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"outliers={self.outlier_idx.numel() if hasattr(self, 'outlier_idx') else 0}, "
                f"bias={self.bias is not None}")

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        return _dequantize_rows(self, slice(None), self.in_features, getattr(self, "outlier_idx", None),
                                getattr(self, "outlier_weight", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), b)


class EdgequantEmbedding(nn.Module):
    """A quantized token embedding [vocab, hidden]: looks up the packed rows of the ids, then dequantizes them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: QuantScheme, embed_scale=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.scheme = num_embeddings, embedding_dim, scheme
        _register_packed(self, num_embeddings, embedding_dim, scheme)
        self.embed_scale = embed_scale   # families that scale the looked-up rows keep doing so

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.scheme.name}"

    def dequantized_weight(self) -> torch.Tensor:
        return _dequantize_rows(self, slice(None), self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = _dequantize_rows(self, ids.reshape(-1), self.embedding_dim).reshape(*ids.shape, self.embedding_dim)
        out = out.to(torch.get_default_dtype() if self.embed_scale is None else self.embed_scale.dtype)
        return out if self.embed_scale is None else out * self.embed_scale


class EdgequantTiedHead(nn.Module):
    """The output layer of a model whose quantized embedding table is tied to it: logits = x @ table^T. The table is
    the embedding's (referenced, not registered, so it is stored and loaded once)."""

    def __init__(self, embedding: EdgequantEmbedding):
        super().__init__()
        object.__setattr__(self, "_table", embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._table.dequantized_weight().to(x.dtype))


def _checkpoint_folder(checkpoint_files) -> Path:
    if not checkpoint_files:
        raise CheckpointError("transformers gave the edgequant quantizer no weight files; load an edgequant "
                              "checkpoint folder (the output of `edgequant quantize`)")
    return Path(checkpoint_files[0]).parent


class EdgequantHfQuantizer(HfQuantizer):
    """Loads edgequant checkpoints (pre-quantized only: quantize with `edgequant quantize`)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        return

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from .artifact import expected_layout, open_checkpoint
        ck = open_checkpoint(_checkpoint_folder(checkpoint_files))
        _, quant = expected_layout(ck)
        names = [f"{n}.outlier_idx" for n in quant if f"{n}.outlier_idx" in ck.files]
        outliers = {k.rsplit(".", 1)[0]: int(v.shape[0]) for k, v in ck.read(names).items()}
        for name, (n, k, has_bias) in quant.items():
            old = model.get_submodule(name)
            if tuple(old.weight.shape) != (n, k):
                raise CheckpointError(f"{name}: the model built by transformers is {'x'.join(map(str, old.weight.shape))}"
                                      f", the checkpoint {n}x{k}; re-run `edgequant quantize`")
            with torch.device("meta"):
                if name == ck.family.embed:
                    new = EdgequantEmbedding(n, k, ck.scheme_for(name), getattr(old, "embed_scale", None))
                else:
                    new = EdgequantLinear(k, n, ck.scheme_for(name), outliers.get(name, 0), has_bias, old.weight.dtype)
            model.set_submodule(name, new)
        if ck.config.get("tie_word_embeddings") and ck.family.embed in quant:
            model.set_submodule(ck.family.head, EdgequantTiedHead(model.get_submodule(ck.family.embed)))
            # the head computes from the table itself: nothing is left for transformers to tie
            model._tied_weights_keys, model.all_tied_weights_keys = {}, {}
        return model

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: plain nn.Linear layers holding the dequantized weights."""
        for name, mod in list(model.named_modules()):
            if isinstance(mod, EdgequantLinear):
                w = mod.dequantized_weight()
                lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                device=w.device, dtype=dtype or w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if mod.bias is not None:
                        lin.bias.copy_(mod.bias)
                model.set_submodule(name, lin)
        return model

    def is_serializable(self):
        return False   # `edgequant quantize` writes the checkpoint; the loaded model is for inference

    @property
    def is_trainable(self):
        return False


def register():
    """Add the config and the quantizer to transformers' registries (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EdgequantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EdgequantHfQuantizer)
