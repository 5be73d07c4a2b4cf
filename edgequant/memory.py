"""Memory plan: what a device needs to hold to run a quantized model at a given context length.

One function (`memory_plan`) serves `edgequant inspect` (a checkpoint), `edgequant bench` (an exported DIST) and the
check `edgequant export` runs against a target's usual memory limit. The parts:

- weights: the bytes of every stored tensor (packed integers, scales, zero points, fp16 columns, embeddings, norms);
  for a DIST, the tensor-cache bytes export wrote.
- KV cache: 2 (K and V) x layers x KV heads x head_dim x tokens x the cache dtype's size; TVM's paged cache holds
  exactly that for `tokens` = the length the app allocates (`max_total_seq_len`), in pages of 16 tokens. A CUDA
  library with the one-graph decode step holds a second cache of the same size (`kv_caches=2`, export/graph_decode.py).
- temporary buffers (an estimate, the one part not counted exactly): the live activations of one prefill chunk of C
  tokens inside a block (hidden state, residual, normed input, q/k/v, attention output, gate and up of the MLP) in
  fp16, plus one row of fp32 logits. TVM's memory planner reuses these buffers across blocks, so one block's worth is
  what stays live; runtimes, library code and the app itself come on top and are not counted.

Pure Python (no torch, no tvm): it reads a config dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import EdgequantError
from .models.family import Dims

DEFAULT_CONTEXT = 4096      # the KV-cache length `edgequant run/bench` allocate unless told (capped by the model's)
PREFILL_CHUNK = 256         # tokens per prefill call in exported libraries (export/build.py records it per DIST)
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class Shapes:
    """The architecture numbers the plan needs (both HF config.json and export's ArchConfig provide them)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_window: int

    @classmethod
    def from_hf_config(cls, c: dict) -> "Shapes":
        d = Dims.from_config(c)   # the family module owns how a config implies kv heads and head_dim
        return cls(int(c["num_hidden_layers"]), d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim,
                   int(c["vocab_size"]), int(c.get("max_position_embeddings") or DEFAULT_CONTEXT))

    @classmethod
    def from_export_model(cls, m: dict) -> "Shapes":
        """From `edgequant-export.json`'s "model" block (export's ArchConfig)."""
        return cls(int(m["num_layers"]), int(m["hidden_size"]), int(m["intermediate_size"]), int(m["num_heads"]),
                   int(m["num_kv_heads"]), int(m["head_dim"]), int(m["vocab_size"]),
                   int(m.get("context_window") or DEFAULT_CONTEXT))


@dataclass(frozen=True)
class MemoryPlan:
    context: int                    # tokens the KV cache is sized for
    kv_dtype: str
    weights_bytes: int
    kv_bytes_per_1k_tokens: int
    kv_bytes: int                   # every cache the runner holds (kv_caches of them)
    temp_bytes: int                 # estimate (see the module docstring)
    total_bytes: int
    prefill_chunk: int
    kv_caches: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """Human-readable lines for the CLI (`inspect`, `bench`): a heading and the parts."""
        mib = lambda b: f"{b / 2**20:,.1f} MiB"
        return ["memory plan (what a device needs to run it):",
                f"  weights         {mib(self.weights_bytes)}",
                f"  KV cache        {mib(self.kv_bytes_per_1k_tokens)} per 1K tokens ({self.kv_dtype}); "
                f"{mib(self.kv_bytes)} at {self.context} tokens"
                + (f" ({self.kv_caches} caches: the one-graph decode step keeps its own)" if self.kv_caches > 1 else ""),
                f"  temporaries     {mib(self.temp_bytes)} (estimate: one {self.prefill_chunk}-token prefill chunk's "
                "activations + logits)",
                f"  total           {mib(self.total_bytes)} at {self.context} tokens of context (runtime and app "
                "code not included)"]


def kv_bytes(shapes: Shapes, tokens: int, kv_dtype: str = "float16") -> int:
    return 2 * shapes.num_layers * shapes.num_kv_heads * shapes.head_dim * tokens * DTYPE_BYTES[kv_dtype]


def temp_bytes(shapes: Shapes, chunk: int = PREFILL_CHUNK, act_dtype: str = "float16") -> int:
    s = shapes
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    per_token = 3 * s.hidden_size + q + 2 * kv + q + 2 * s.intermediate_size
    return chunk * per_token * DTYPE_BYTES[act_dtype] + s.vocab_size * 4


def memory_plan(shapes: Shapes, weights_bytes: int, context: int | None = None, kv_dtype: str = "float16",
                prefill_chunk: int = PREFILL_CHUNK, kv_caches: int = 1) -> MemoryPlan:
    """The plan at `context` tokens (default: the model's context window, at most DEFAULT_CONTEXT). A context past
    the model's window is refused: no runtime allocates it, and 2**62 tokens printed a plan of millions of TiB."""
    ctx = int(context) if context else min(shapes.context_window, DEFAULT_CONTEXT)
    if ctx < 1:
        raise EdgequantError(f"--context must be a positive number of tokens, not {context!r}")
    if ctx > shapes.context_window:
        raise EdgequantError(f"--context {ctx} is past this model's context window of {shapes.context_window} tokens "
                             f"(the most a runtime gives its KV cache); use --context {shapes.context_window} or less")
    chunk = min(prefill_chunk, ctx)
    kv, tmp = kv_caches * kv_bytes(shapes, ctx, kv_dtype), temp_bytes(shapes, chunk)
    return MemoryPlan(ctx, kv_dtype, int(weights_bytes), kv_caches * kv_bytes(shapes, 1024, kv_dtype), kv, tmp,
                      int(weights_bytes) + kv + tmp, chunk, kv_caches)


def over_budget(plan: MemoryPlan, limit_bytes: int | None, what: str) -> str | None:
    """A one-line warning when the plan exceeds `limit_bytes` (None: the target has no usual limit)."""
    if not limit_bytes or plan.total_bytes <= limit_bytes:
        return None
    return (f"{what}: the model needs about {plan.total_bytes / 2**20:,.0f} MiB at {plan.context} tokens of context "
            f"(weights {plan.weights_bytes / 2**20:,.0f} MiB, KV cache {plan.kv_bytes / 2**20:,.0f} MiB, temporaries "
            f"{plan.temp_bytes / 2**20:,.0f} MiB), over the usual limit of {limit_bytes / 2**20:,.0f} MiB; use fewer "
            "bits, a smaller model or a shorter context (max_total_seq_len when the app creates the KV cache)")
