"""Weights for the exported model, read from disk only: a quantized checkpoint (through `edgequant.artifact`) or, for
an unquantized fp16 export, the safetensors of a Hugging Face model folder (through `edgequant.checkpoint`, no torch).

The export model fuses q/k/v and gate/up (`models.llama.FUSED_LINEARS`): packed words, scales, zero points and
biases are concatenated along the output rows, which is exact because the members share K and the scheme. Their
outlier columns are merged into one sorted union with zero weights where a member keeps that column quantized; its
quantized value there is then used as stored, so the sum is still exact.

3-bit words are repacked when the target asks for it (`packing3`: bit planes "planes3" for CPU targets, "words3x32"
for CUDA; see `edgequant.tvm_schedules.dequant`); every other scheme keeps the checkpoint's words.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.tvm_schedules.dequant import QuantSpec, repack_planes3_np, repack_w3x32_np

from .models.llama import FUSED_LINEARS, ArchConfig


@dataclass
class LinearPlan:
    """One linear of the export model and where its rows come from."""
    name: str                       # export name, e.g. model.layers.0.self_attn.qkv_proj
    sources: tuple[str, ...]        # checkpoint linears concatenated along N
    k: int
    n: int
    spec: QuantSpec | None          # None: fp16 dense
    outlier_idx: np.ndarray | None  # union of the members' outlier columns
    bias: bool

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else len(self.outlier_idx)


class WeightSource:
    """Common interface: config dict, arch, linear plans, parameter arrays by export name."""
    path: Path
    config: dict
    quantization: str

    @property
    def arch(self) -> ArchConfig:
        return ArchConfig.from_hf(self.config)

    def plans(self) -> dict[str, LinearPlan]:
        raise NotImplementedError

    def arrays(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError


def _rows(c: dict, lin: str) -> tuple[int, int]:
    """(N, K) of one checkpoint linear from the config."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    d = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads") or heads
    inter = c["intermediate_size"]
    return {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h), "self_attn.v_proj": (kv * d, h),
            "self_attn.o_proj": (h, heads * d), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}[lin]


class CheckpointSource(WeightSource):
    """A quantized edgequant checkpoint."""

    def __init__(self, path, packing3: str = "words", config: dict | None = None):
        from edgequant.artifact import open_checkpoint
        self.ckpt = open_checkpoint(path, config)
        self.packing3 = packing3
        self.path = self.ckpt.path
        self.config = self.ckpt.config
        self.quantization = self.ckpt.scheme.name
        self._plans = None

    def plans(self) -> dict[str, LinearPlan]:
        if self._plans is not None:
            return self._plans
        ck, s, c = self.ckpt, self.ckpt.scheme, self.config
        quantized = set(ck.quantized_linears())
        idx_names = [n for n in ck.files if n.endswith(".outlier_idx")]
        idx = ck.read(idx_names) if idx_names else {}
        plans = {}
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}"
            for export, members in FUSED_LINEARS.items():
                srcs = tuple(f"{pre}.{m}" for m in members)
                kinds = {src in quantized for src in srcs}
                if len(kinds) > 1:
                    raise EdgequantError(f"{', '.join(srcs)} mix quantized and fp16 weights; export fuses them, so "
                                         "quantize all of them or none")
                n = sum(_rows(c, m)[0] for m in members)
                k = _rows(c, members[0])[1]
                q = kinds.pop()
                layout = self.packing3 if s.bits == 3 else "words"
                spec = QuantSpec.from_scheme(s, n, k, layout) if q else None
                cols = [idx[f"{src}.outlier_idx"] for src in srcs if f"{src}.outlier_idx" in idx]
                union = np.unique(np.concatenate(cols)).astype(np.int32) if cols else None
                bias = any(f"{src}.bias" in ck.files for src in srcs)
                plans[f"{pre}.{export}"] = LinearPlan(f"{pre}.{export}", srcs, k, n, spec,
                                                      union if union is not None and len(union) else None, bias)
        self._plans = plans
        return plans

    def arrays(self, names):
        ck, plans = self.ckpt, self.plans()
        for name in names:
            lin, _, leaf = name.rpartition(".")
            if lin in plans:
                yield name, self._linear_param(plans[lin], leaf)
            elif name == "lm_head.weight" or name in ck.files:
                yield name, ck.read([name])[name].astype(np.float16)
            else:
                raise EdgequantError(f"the checkpoint has no tensor for export parameter '{name}'; re-run "
                                     "`edgequant quantize`")

    def _linear_param(self, plan: LinearPlan, leaf: str) -> np.ndarray:
        ck = self.ckpt
        if leaf in ("qweight", "scales", "zeros"):
            t = ck.read([f"{s}.{leaf}" for s in plan.sources])
            arr = np.concatenate([t[f"{s}.{leaf}"] for s in plan.sources], axis=0)
            if leaf == "qweight" and plan.spec.layout == "planes3":
                arr = repack_planes3_np(arr, plan.k)
            elif leaf == "qweight" and plan.spec.layout == "words3x32":
                arr = repack_w3x32_np(arr, plan.k)
            return arr
        if leaf == "weight":  # unquantized member linears
            t = ck.read([f"{s}.weight" for s in plan.sources])
            return np.concatenate([t[f"{s}.weight"].astype(np.float16) for s in plan.sources], axis=0)
        if leaf == "bias":
            out = []
            for s in plan.sources:
                n = _rows(self.config, s.split(".", 3)[-1])[0]
                out.append(ck.read([f"{s}.bias"])[f"{s}.bias"] if f"{s}.bias" in ck.files else np.zeros(n, np.float16))
            return np.concatenate(out).astype(np.float16)
        if leaf == "outlier_idx":
            return plan.outlier_idx
        if leaf == "outlier_weight":
            blocks = []
            for s in plan.sources:
                n = _rows(self.config, s.split(".", 3)[-1])[0]
                w = np.zeros((n, plan.n_outliers), np.float16)
                if f"{s}.outlier_idx" in ck.files:
                    t = ck.read([f"{s}.outlier_idx", f"{s}.outlier_weight"])
                    w[:, np.searchsorted(plan.outlier_idx, t[f"{s}.outlier_idx"])] = t[f"{s}.outlier_weight"]
                blocks.append(w)
            return np.concatenate(blocks, axis=0)
        raise EdgequantError(f"unknown parameter '{plan.name}.{leaf}'")


class HFSource(WeightSource):
    """An unquantized Hugging Face model folder with safetensors weights, exported with fp16 weights."""

    def __init__(self, path, config: dict):
        self.path, self.config = Path(path), config
        self.quantization = "f16"
        self._state = None

    def plans(self):
        c = self.config
        bias = bool(c.get("attention_bias", c.get("model_type") == "qwen2"))
        plans = {}
        for i in range(c["num_hidden_layers"]):
            pre = f"model.layers.{i}"
            for export, members in FUSED_LINEARS.items():
                srcs = tuple(f"{pre}.{m}" for m in members)
                n = sum(_rows(c, m)[0] for m in members)
                has_bias = bias and export == "self_attn.qkv_proj"
                plans[f"{pre}.{export}"] = LinearPlan(f"{pre}.{export}", srcs, _rows(c, members[0])[1], n, None, None,
                                                      has_bias)
        return plans

    def arrays(self, names):
        from edgequant.checkpoint import read_plain_tensors
        if self._state is None:
            self._state = read_plain_tensors(self.path)
        if "lm_head.weight" not in self._state:   # tied to the embedding (saved once)
            self._state["lm_head.weight"] = self._state["model.embed_tokens.weight"]
        plans = self.plans()
        for name in names:
            lin, _, leaf = name.rpartition(".")
            if lin in plans:
                arr = np.concatenate([self._state[f"{s}.{leaf}"] for s in plans[lin].sources], axis=0)
            else:
                arr = self._state[name]
            yield name, arr.astype(np.float16)


def open_source(path, packing3: str = "words") -> WeightSource:
    """A quantized checkpoint when the folder says so, otherwise an unquantized HF model folder. `packing3`: the
    runtime layout of 3-bit weights ("words" as stored, "planes3" or "words3x32")."""
    from edgequant.checkpoint import declares_checkpoint, read_config
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise EdgequantError(f"checkpoint not found: {p}; pass the folder written by `edgequant quantize` "
                             "(or a Hugging Face model folder for an fp16 export)")
    if p.is_file():
        raise EdgequantError(f"{p} is a file: export takes a checkpoint or model folder (a .gguf converts into one "
                             f"with `edgequant convert {p} -o FOLDER`)")
    if not (p / "config.json").is_file():
        raise EdgequantError(f"{p} has no config.json: it is neither an edgequant checkpoint nor a Hugging Face model")
    config = read_config(p)   # once per export
    return CheckpointSource(p, packing3, config) if declares_checkpoint(config) else HFSource(p, config)


def write_tensor_cache(source: WeightSource, names: list[str], dist: Path) -> int:
    """`tensor-cache.json` + `params_shard_*.bin` (MLC's format, raw encoding); returns the bytes of weights."""
    from tvm.contrib import tvmjs
    total = [0]

    def gen():
        for name, arr in source.arrays(names):
            total[0] += arr.nbytes
            yield name, np.ascontiguousarray(arr)

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per call; progress is the caller's job
        tvmjs.dump_tensor_cache(gen(), str(dist), encode_format="raw", shard_cap_mb=32, show_progress=False)
    return total[0]
