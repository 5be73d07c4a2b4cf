"""The data that describes one architecture family's decoder block: its linears and their shapes, its norms, the
calibration groups, the LET pairs, and the fusions export applies. Calibration, the checkpoint and export read these
facts from here, so a new family is one module in this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import EdgequantError


@dataclass(frozen=True)
class Dims:
    """The sizes a config implies; linears and norms name their dimensions by these fields."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, c) -> "Dims":
        """From a transformers config object or its `to_dict()` form (explicit `head_dim` wins, as in transformers)."""
        get = c.get if isinstance(c, dict) else (lambda k, d=None: getattr(c, k, d))
        heads = get("num_attention_heads")
        return cls(get("hidden_size"), get("intermediate_size"), heads, get("num_key_value_heads") or heads,
                   get("head_dim") or get("hidden_size") // heads)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def n_rep(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Linear:
    """A linear of the block, named relative to it. N is the sum of `out` (several parts: a linear the checkpoint
    stores fused, e.g. q, kv, kv for a qkv_proj); K is `inp`. `owq_ratio`: OWQ's weak-column share of this kind."""
    name: str
    out: tuple[str, ...]
    inp: str
    owq_ratio: float = 1.0


@dataclass(frozen=True)
class Norm:
    """A norm of the block and the dimension of its weight ("head_dim" for a per-head q/k norm)."""
    name: str
    dim: str = "hidden"


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, calibrated together (one Hessian), in the order a block computes them."""
    names: tuple[str, ...]


@dataclass(frozen=True)
class LetPair:
    """One LET scale between a producer and the linears reading its output; `kind` is one of LET_KINDS, whose algebra
    `calibrate/omniquant/let.py` holds (norm: a norm's weight; rows: a linear's rows, e.g. up -> down of a gated MLP;
    attn_v: v -> o through attention, per kv channel; rope_qk: k rows / s, q rows * s, shared by each RoPE pair)."""
    name: str
    kind: str
    producer: str
    consumers: tuple[str, ...]

    @property
    def scales_input(self) -> bool:
        """Whether the scale multiplies the consumers' input (so a shift of that input can be learned)."""
        return self.kind != "rope_qk"


LET_KINDS = ("norm", "rows", "attn_v", "rope_qk")


@dataclass(frozen=True)
class Family:
    """One architecture family; checked when defined, so a wrong description fails at import, not mid-calibration."""
    name: str
    model_types: tuple[str, ...]
    layers_path: str                      # attribute path from the CausalLM to the list of decoder blocks
    pre_block: tuple[str, ...]            # the modules computing block 0's inputs (embeddings, rotary tables)
    linears: tuple[Linear, ...]           # every quantized linear of a block, in the order the block computes them
    groups: tuple[LinearGroup, ...]       # sequential calibration order inside a block
    norms: tuple[Norm, ...]
    let_pairs: tuple[LetPair, ...] = ()   # in the order LET applies them (it matters when two touch one tensor)
    export_fusions: dict = field(default_factory=dict)   # export linear -> checkpoint linears whose rows it stacks
    norm_weight_offset: float = 0.0       # 1.0 where a norm scales by (1 + weight), as Gemma's RMSNorm does
    dims: Callable = Dims.from_config     # config -> Dims
    embed: str = "model.embed_tokens"     # the token embedding table [vocab, hidden]
    head: str = "lm_head"                 # the output layer [vocab, hidden] (tied: the embedding table serves)
    fixed_biases: dict = field(default_factory=dict)   # model type -> block linears that always have a bias
    # model type -> the config flags ("attention_bias", "mlp_bias") its transformers model honours (Phi-3, Mistral
    # and Qwen2 ignore both: a flag set there gives no bias)
    bias_flags: dict = field(default_factory=dict)
    # (gate, up, activation module) of a block's MLP act(gate(x)) * up(x), for searches scored on that product;
    # () where gate and up are not separate linears of one calibration group (Phi-3 stores them fused)
    gated_mlp: tuple[str, ...] = ()
    # config -> "sliding_attention"/"full_attention" per layer where config.json has no layer_types, as transformers'
    # config class fills them in (Gemma); None where the family's windows follow other fields (export/models/llama.py)
    default_layer_types: Callable | None = None

    def layer_types(self, config: dict) -> list[str] | None:
        """The attention kind of each layer as transformers' model computes it (None: not decided by layer kinds)."""
        if self.default_layer_types is None:
            return None
        return config.get("layer_types") or self.default_layer_types(config)

    def __post_init__(self):
        names = [lin.name for lin in self.linears]
        by_name = dict(zip(names, self.linears))
        norms = {n.name for n in self.norms}
        fused = [m for ms in self.export_fusions.values() for m in ms]
        problems = []
        if [n for g in self.groups for n in g.names] != names:
            problems.append("its groups must list every linear once, in the order of `linears`")
        if self.export_fusions and sorted(fused) != sorted(names):
            problems.append("export_fusions must use every linear exactly once")
        if self.gated_mlp and (len(self.gated_mlp) != 3
                               or not any(set(self.gated_mlp[:2]) <= set(g.names) for g in self.groups)):
            problems.append("gated_mlp must be (gate, up, activation) with gate and up in one calibration group")
        for export, members in self.export_fusions.items():
            if len({by_name[m].inp for m in members if m in by_name}) > 1:
                problems.append(f"the members of {export} must share their input dimension")
        for p in self.let_pairs:
            if p.kind not in LET_KINDS:
                problems.append(f"LET pair {p.name} has unknown kind {p.kind!r} (known: {', '.join(LET_KINDS)})")
            if p.producer not in (norms if p.kind == "norm" else by_name) or not set(p.consumers) <= set(by_name):
                problems.append(f"LET pair {p.name} names a module the family does not list")
            elif p.scales_input and LinearGroup(p.consumers) not in self.groups:
                # a scaled input must be scaled for every linear that reads it, else the block's function changes
                problems.append(f"the consumers of LET pair {p.name} must be one calibration group")
        if problems:
            raise EdgequantError(f"family {self.name}: {'; '.join(problems)}")

    def biased_linears(self, config: dict) -> set[str]:
        """The block linears transformers gives a bias for this config: the model type's fixed ones, and those of
        the attention / MLP under the `attention_bias` / `mlp_bias` flags its model honours (`bias_flags`)."""
        out = set(self.fixed_biases.get(config.get("model_type"), ()))
        honoured = self.bias_flags.get(config.get("model_type"), ())
        for flag, part in (("attention_bias", "self_attn."), ("mlp_bias", "mlp.")):
            if flag in honoured and config.get(flag) is True:
                out |= {n for n in self.linear_names if n.startswith(part)}
        return out

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)

    @property
    def linear_ratio(self) -> dict[str, float]:
        return {lin.name: lin.owq_ratio for lin in self.linears}

    @property
    def attention_logit_linears(self) -> tuple[str, ...]:
        """q and k: the linears whose outputs meet in the attention logits (the rope_qk LET pair names them)."""
        return tuple(n for p in self.let_pairs if p.kind == "rope_qk" for n in (p.producer, *p.consumers))

    @property
    def attention_value_linears(self) -> tuple[str, ...]:
        """v: the linears whose outputs the attention probabilities mix (the attn_v LET pairs' producers)."""
        return tuple(p.producer for p in self.let_pairs if p.kind == "attn_v")

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def relative_name(self, name: str) -> str | None:
        """Block-relative name of a full one (`model.layers.3.mlp.up_proj` -> `mlp.up_proj`); None outside blocks."""
        head, sep, rest = name.partition(f"{self.layers_path}.")
        i, _, rel = rest.partition(".")
        return rel if sep and not head and i.isdigit() and rel else None

    def _dims(self, config) -> Dims:
        return config if isinstance(config, Dims) else self.dims(config)

    def linear_shapes(self, config) -> dict[str, tuple[int, int]]:
        """{block-relative linear: (N, K)} for a config (object, dict or its Dims)."""
        d = self._dims(config)
        return {lin.name: (sum(getattr(d, o) for o in lin.out), getattr(d, lin.inp)) for lin in self.linears}

    def norm_shapes(self, config) -> dict[str, int]:
        d = self._dims(config)
        return {n.name: getattr(d, n.dim) for n in self.norms}

    def stats_source(self, linear: str) -> str:
        """The linear whose input statistics stand for `linear`'s (the first of its group: they read one input)."""
        return next(g.names[0] for g in self.groups if linear in g.names)
