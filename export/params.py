"""Weights for the exported model, read from disk only: a quantized checkpoint (through `edgequant.artifact`) or, for
an unquantized fp16 export, the safetensors of a Hugging Face model folder (through `edgequant.checkpoint`, no torch).

The export model fuses linears as the family says (`Family.export_fusions`; LLaMA: q/k/v and gate/up): packed words,
scales, zero points and biases are concatenated along the output rows, which is exact because the members share K
and the scheme. Their outlier columns are merged into one sorted union with zero weights where a member keeps that
column quantized; its quantized value there is then used as stored, so the sum is still exact.

Each linear's kernel is built from its own scheme (`Checkpoint.scheme_for`: the checkpoint's, or a per-module
override); the members of a fusion must share one. A quantized embedding (and untied output layer, `--embed-bits`)
gets a plan of its own under the module's name, read by the graph's gather and output matmul.

3-bit words are repacked when the target asks for it (`packing3`: "bytes3" for the CPU int8 decode GEMV, "dp4a3r4"
for CUDA's int8 one (4 rows interleaved; "dp4a3" where N is not a multiple of 4: `dequant.layout_for_rows`),
"words3x32" for CUDA's fp16 one; see `edgequant.tvm_schedules.dequant`); every other
scheme keeps the checkpoint's words.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgequant.checkpoint import check_weight_shape, table_names
from edgequant.errors import EdgequantError, name_list
from edgequant.models import family_for
from edgequant.tvm_schedules.dequant import QuantSpec, layout_for_rows, pack_zeros_np, repack_3bit_np

from .models import graph_for
from .models.llama import ArchConfig


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
    rows: tuple[int, ...] = ()      # N of each source

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else len(self.outlier_idx)


class WeightSource:
    """Common interface: config dict, arch, linear plans, parameter arrays by export name. Each source gives
    `plans()` -> {name: LinearPlan}: every block linear of the export model by its export name, plus the vocabulary
    tables that are quantized (embedding, untied output layer) by their module names; and `arrays(names)`, which
    yields (name, array) pairs."""
    path: Path
    config: dict
    quantization: str

    @property
    def arch(self) -> ArchConfig:
        return graph_for(self.config)[0].from_hf(self.config)

    def check_all_used(self, names) -> None:
        """Refuse weights the graph's `names` leave unread (a source that reads its tensors by name checks this)."""


def fused_linears(c: dict) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...], int, bool]]:
    """(export linear, its checkpoint linears, their N, the shared K, whether it has a bias) for every block, from
    the family's fusions; the bias from the config as transformers builds it (`Family.biased_linears`), so the
    weights are checked against it, not trusted for it."""
    family = family_for(c.get("model_type"))
    shapes = family.linear_shapes(c)
    biased = family.biased_linears(c)
    for i in range(c["num_hidden_layers"]):
        pre = family.layer_prefix(i)
        for export, members in family.export_fusions.items():
            yield (f"{pre}.{export}", tuple(f"{pre}.{m}" for m in members), tuple(shapes[m][0] for m in members),
                   shapes[members[0]][1], any(m in biased for m in members))


class CheckpointSource(WeightSource):
    """A quantized edgequant checkpoint."""

    def __init__(self, path, packing3: str = "words", config: dict | None = None, zeros_packed: bool = False):
        from edgequant.artifact import open_checkpoint
        self.ckpt = open_checkpoint(path, config)
        self.packing3, self.zeros_packed = packing3, zeros_packed
        self.path = self.ckpt.path
        self.config = self.ckpt.config
        self.quantization = self.ckpt.scheme.name
        self._plans = None

    def plans(self) -> dict[str, LinearPlan]:
        if self._plans is not None:
            return self._plans
        ck, c = self.ckpt, self.config
        quantized = set(ck.quantized_linears())
        idx_names = [n for n in ck.files if n.endswith(".outlier_idx")]
        idx = ck.read(idx_names) if idx_names else {}
        plans = {}
        for name, srcs, rows, k, bias in fused_linears(c):
            kinds = {src in quantized for src in srcs}
            if len(kinds) > 1:
                raise EdgequantError(f"{', '.join(srcs)} mix quantized and fp16 weights; export fuses them, so "
                                     "quantize all of them or none")
            n = sum(rows)
            schemes = {ck.scheme_for(src) for src in srcs}
            if len(schemes) > 1:
                raise EdgequantError(f"{', '.join(srcs)} have different schemes ({', '.join(sorted(x.name for x in schemes))}"
                                     "); export fuses them into one kernel, so give them one scheme")
            spec = self._spec(schemes.pop(), n, k) if kinds.pop() else None
            cols = [idx[f"{src}.outlier_idx"] for src in srcs if f"{src}.outlier_idx" in idx]
            union = np.unique(np.concatenate(cols)).astype(np.int32) if cols else None
            plans[name] = LinearPlan(name, srcs, k, n, spec, union if union is not None and len(union) else None,
                                     bias, rows)
        for name in table_names(ck.family, c):
            if name in quantized:
                n, k = c["vocab_size"], ck.family.dims(c).hidden
                plans[name] = LinearPlan(name, (name,), k, n, self._spec(ck.scheme_for(name), n, k), None, False, (n,))
        self._plans = plans
        return plans

    def _spec(self, scheme, n: int, k: int) -> QuantSpec:
        layout = layout_for_rows(self.packing3, n) if scheme.bits == 3 else "words"
        return QuantSpec.from_scheme(scheme, n, k, layout, self.zeros_packed)

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
            if leaf == "qweight" and plan.spec.layout != "words":
                arr = repack_3bit_np(arr, plan.k, plan.spec.layout)
            elif leaf == "zeros" and plan.spec.zeros_packed:
                arr = pack_zeros_np(arr)
            return arr
        if leaf == "weight":  # unquantized member linears
            t = ck.read([f"{s}.weight" for s in plan.sources])
            return np.concatenate([t[f"{s}.weight"].astype(np.float16) for s in plan.sources], axis=0)
        if leaf == "bias":   # zeros for the members without one
            t = ck.read([f"{s}.bias" for s in plan.sources if f"{s}.bias" in ck.files])
            return np.concatenate([t.get(f"{s}.bias", np.zeros(n, np.float16))
                                   for s, n in zip(plan.sources, plan.rows)]).astype(np.float16)
        if leaf == "outlier_idx":
            return plan.outlier_idx
        if leaf == "outlier_weight":
            blocks = []
            for s, n in zip(plan.sources, plan.rows):
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

    def _tensors(self) -> dict:
        if self._state is None:
            from edgequant.checkpoint import read_plain_tensors
            self._state = read_plain_tensors(self.path)
            if self.arch.tie_word_embeddings:   # tied: saved once, under either name (transformers loads both)
                for a, b in (("lm_head.weight", "model.embed_tokens.weight"),
                             ("model.embed_tokens.weight", "lm_head.weight")):
                    if a not in self._state and b in self._state:
                        self._state[a] = self._state[b]
        return self._state

    def plans(self):
        return {name: LinearPlan(name, srcs, k, sum(rows), None, None, bias, rows)
                for name, srcs, rows, k, bias in fused_linears(self.config)}

    def _needed(self, names, plans) -> dict:
        """{export name: the folder's tensors it is made of}."""
        out = {}
        for name in names:
            lin, _, leaf = name.rpartition(".")
            out[name] = [f"{s}.{leaf}" for s in plans[lin].sources] if lin in plans else [name]
        return out

    def check_all_used(self, names) -> None:
        """Every weight of the folder is read by the graph: one it has no place for (a bias the config does not
        declare, a layer past num_hidden_layers) was dropped without a word."""
        state = self._tensors()
        used = {t for ts in self._needed(names, self.plans()).values() for t in ts}
        unused = sorted(set(state) - used - {"lm_head.weight"})   # lm_head: present or tied, the graph may use either
        if "lm_head.weight" not in used and "lm_head.weight" in state and not np.array_equal(
                state["lm_head.weight"], state.get("model.embed_tokens.weight")):
            unused.append("lm_head.weight (config.json ties the output layer to the embedding, these differ)")
        if unused:
            raise EdgequantError(f"{self.path} holds weight(s) the model has no place for: {name_list(unused)}"
                                 f" (wrong model_type or options in config.json?); restore the model's original "
                                 "files")

    def arrays(self, names):
        self._state = self._tensors()
        plans = self.plans()
        for name, parts in self._needed(names, plans).items():
            missing = [t for t in parts if t not in self._state]
            if missing:
                raise EdgequantError(f"{self.path} has no weight '{missing[0]}' (an incomplete download or copy?); "
                                     "restore the model's original files")
            lin, _, leaf = name.rpartition(".")
            if lin in plans:   # members are stacked along N: each must have its own shape (the graph checks the sum)
                plan = plans[lin]
                for t, n in zip(parts, plan.rows):
                    check_weight_shape(self.path, t, self._state[t].shape, (n, plan.k) if leaf == "weight" else (n,))
            arr = np.concatenate([self._state[t] for t in parts], axis=0) if len(parts) > 1 else self._state[parts[0]]
            with np.errstate(over="ignore", invalid="ignore"):   # reported below in one line, not as a warning (T40)
                out = arr.astype(np.float16)
            if out.dtype.kind == "f" and not np.isfinite(out).all():   # NaN in the model, or past fp16's range
                raise EdgequantError(f"{self.path}: '{name}' holds NaN or infinite values (in fp16); the model's "
                                     "weights are damaged: restore them from a trusted copy")
            yield name, out


def open_source(path, packing3: str = "words", zeros_packed: bool = False) -> WeightSource:
    """A quantized checkpoint when the folder says so, otherwise an unquantized HF model folder. `packing3`: the
    runtime layout of 3-bit weights ("words" as stored, or one of `dequant.LAYOUTS`); `zeros_packed`: zero points
    four per uint32 word."""
    from edgequant.checkpoint import check_blocks_fit_config, declares_checkpoint, read_config
    p = Path(str(path)).expanduser()
    if not p.exists():
        from edgequant.atomic import check_not_stranded
        check_not_stranded(p)
        raise EdgequantError(f"checkpoint not found: {p}; pass the folder written by `edgequant quantize` "
                             "(or a Hugging Face model folder for an fp16 export)")
    if p.is_file():
        raise EdgequantError(f"{p} is a file: export takes a checkpoint or model folder (a .gguf converts into one "
                             f"with `edgequant convert {p} -o FOLDER`)")
    if not (p / "config.json").is_file():
        raise EdgequantError(f"{p} has no config.json: it is neither an edgequant checkpoint nor a Hugging Face model")
    config = read_config(p)   # once per export
    if declares_checkpoint(config):
        return CheckpointSource(p, packing3, config, zeros_packed)
    check_blocks_fit_config(p, config)   # a checkpoint's config is checked when it opens
    return HFSource(p, config)


def write_tensor_cache(source: WeightSource, names: list[str], dist: Path, shapes: dict | None = None) -> int:
    """`tensor-cache.json` + `params_shard_*.bin` (MLC's format, raw encoding); returns the bytes of weights. With
    `shapes` ({name: the graph's shape}), a weight of another shape is refused here, not by the runners later."""
    from tvm.contrib import tvmjs
    total = [0]

    def gen():
        source.check_all_used(names)
        for name, arr in source.arrays(names):
            if shapes is not None:
                check_weight_shape(source.path, name, arr.shape, shapes[name])
            total[0] += arr.nbytes
            yield name, np.ascontiguousarray(arr)

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per call; progress is the caller's job
        tvmjs.dump_tensor_cache(gen(), str(dist), encode_format="raw", shard_cap_mb=32, show_progress=False)
    return total[0]
