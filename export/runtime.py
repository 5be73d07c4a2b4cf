"""Load an exported DIST folder with the TVM *runtime* only and run it: chunked prefill, decode, sampling, streaming,
and perplexity through the compiled library.

Nothing here imports tvm.relax (it is absent where only the runtime is installed): the library is loaded with
`tvm.runtime.load_module`, run by `tvm.runtime.vm.VirtualMachine`, and its weights come from the tensor cache through
the VM's own builtins. The KV cache holds one sequence at a time; each call to `generate`/`score` starts a new one.
Where the library has `decode_graph` (CUDA: export/graph_decode.py), decode steps replay it on a second cache of the
runner's own (filled from the paged one after a prefill), and the paged cache is fed the tokens decoded that way
before it runs again.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgequant.api import load_tokenizer as _tokenizer
from edgequant.errors import EdgequantError, first_line

from .dist import (EXPORT_JSON, check_elf, check_tensor_cache, kv_cache_bytes, kv_cache_len,  # noqa: F401
                   library_path, read_export_info)  # EXPORT_JSON, check_tensor_cache: re-exported


def _device(kind: str):
    import tvm
    if kind == "cuda":
        if tvm.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
            # runtime-only installs do not load the CUDA backend by themselves
            import ctypes
            import os
            lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
            if not os.path.exists(lib):
                raise EdgequantError("this TVM install has no CUDA runtime (lib/libtvm_runtime_cuda.so)")
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise EdgequantError(f"this DIST was exported for CUDA and needs an NVIDIA GPU with its driver "
                                     f"(libcuda.so.1), which this machine lacks ({first_line(e, 120)}); run it on a "
                                     "machine with a CUDA GPU, or export for --target cpu") from None
        dev = tvm.cuda(0)
    elif kind == "cpu":
        dev = tvm.cpu(0)
    else:
        raise EdgequantError(f"a '{kind}' library cannot run on this machine; use the apps/ recipes on the device")
    if not dev.exist:
        raise EdgequantError(f"no {kind} device is available here")
    return dev


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    tokens: list = field(default_factory=list)

    @property
    def prefill_tps(self):
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self):
        # the first new token comes from the prefill logits: decode steps = new_tokens - 1
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0


class Runner:
    """An exported model loaded on a device."""

    def __init__(self, dist, max_total_seq_len: int | None = None, load_tokenizer: bool = True):
        import tvm
        import tvm_ffi
        from tvm.runtime.vm import VirtualMachine
        self.dist = Path(str(dist)).expanduser()
        self.info = read_export_info(self.dist)
        self.dev = _device(self.info["device"])
        if self.info["device"] == "cpu":
            from .threads import configure
            self.threads = configure()
        lib = library_path(self.dist, self.info)
        if not lib.exists():
            raise EdgequantError(f"{self.dist} has no {lib.name}, the library its {EXPORT_JSON} names: the folder is "
                                 "incomplete; copy the whole folder again or export the model again")
        if not lib.is_file():
            raise EdgequantError(f"{lib} is not a regular file (a folder, FIFO or device), so it is not the compiled "
                                 "library; export the model again with `edgequant export`")
        if lib.suffix != ".so":
            raise EdgequantError(f"{lib.name} is a {self.info['target']} library for static linking; it runs through "
                                 "the apps/ recipes, not `edgequant run`")
        if self.info["device"] == "cuda":
            from .cuda import install_loader
            install_loader(self.dist, self.info.get("cuda"))
        check_tensor_cache(self.dist, self.info)   # before TVM opens any path or offset it names
        check_elf(lib)                              # a truncated library faults inside dlopen
        want, have = self.info["tvm_version"].split(".")[:2], tvm.__version__.split(".")[:2]
        if want != have:
            raise EdgequantError(f"{self.dist} was exported with TVM {self.info['tvm_version']}, this runtime is TVM "
                                 f"{tvm.__version__}; export the model again with this install")
        try:
            self.vm = VirtualMachine(tvm.runtime.load_module(str(lib)), self.dev)
            meta = json.loads(self.vm["_metadata"]())
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types for a library it cannot load
            raise EdgequantError(f"cannot load {lib} ({first_line(e, 200)}); the library is damaged or was built for "
                                 "another machine: export the model again") from None
        self._check_metadata(meta, lib)
        tvm.get_global_func("vm.builtin.tensor_cache.load")(str(self.dist), self.dev.dlpack_device_type(), self.dev.index)
        names = [p["name"] for p in self.info["params"]]
        self.params = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")(names)
        tvm.get_global_func("vm.builtin.tensor_cache.clear")()  # the param array keeps its tensors alive
        m = self.info["model"]
        self.hidden, self.vocab = m["hidden_size"], m["vocab_size"]
        self.context = m["context_window"]
        self.chunk = int(self.info["prefill_chunk_size"])
        # longrope: past this length every key and query takes the long factors (export/models/llama.py)
        self.long_after = int(m["rope_original_context"]) if m.get("rope_long_factors") else None
        self.history: list[int] = []   # the sequence's tokens, kept for that one re-encoding
        self.max_len = kv_cache_len(self.info, max_total_seq_len)
        S = tvm_ffi.Shape
        self._S = S
        self.kv = self.vm["create_paged_kv_cache"](S([1]), S([self.max_len]), S([self.chunk]), S([16]), S([0]))
        self._add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._remove = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._tvm = tvm
        self._active = False
        # greedy sampling on the GPU where the library has it (one int32 copied per step, not the logits; on a CPU
        # np.argmax is faster than the kernel's serial twin, which tests switch on to run this path), and one reused
        # device buffer for a single token id (a new tensor per step cost a cudaMalloc and a cudaFree)
        self._argmax = self.vm["argmax"] if self.info["device"] != "cpu" and self._has("argmax") else None
        self._one_id = tvm.runtime.empty((1,), "int32", self.dev)
        self._init_graph()
        self.tokenizer = _tokenizer(self.dist, "export the model again from a folder that has its tokenizer") \
            if load_tokenizer else None

    def _init_graph(self):
        """The one-graph decode step's own tensors (export/graph_decode.py), where the library has it: the same
        tensors on every call, as the captured graph holds their addresses."""
        import os

        from .graph_decode import FILL, FUNC
        self._graph = None
        self._pending: list[int] = []   # tokens decoded through the graph that the paged cache has not seen
        self._g_len = 0                 # positions of the sequence in the graph's cache
        if os.environ.get("EDGEQUANT_DECODE_GRAPH", "1") == "0" or not self._has(FUNC):
            return
        tvm, m = self._tvm, self.info["model"]
        self._g_shape = (int(m["num_layers"]), int(m["num_kv_heads"]), int(m["head_dim"]))
        self._g_cache = None   # allocated by the first graph step: a runner that only scores never holds it
        self._g_tok = tvm.runtime.empty((1,), "int32", self.dev)
        self._g_pos = tvm.runtime.empty((1,), "int32", self.dev)
        self._g_logits = tvm.runtime.empty((1, 1, self.vocab), "float32", self.dev)
        self._g_fill = self.vm[FILL]
        self._debug_get_kv = tvm.get_global_func("vm.builtin.attention_kv_cache_debug_get_kv")
        self._graph = self.vm[FUNC]

    def _check_metadata(self, meta, lib: Path):
        """edgequant-export.json must describe the library it names: its parameters, context and chunk sizes (the
        model sizes were checked against these parameters by read_export_info)."""
        info, f = self.info, self.dist / EXPORT_JSON
        meta = meta if isinstance(meta, dict) else {}   # a library's JSON that is not an object matches nothing
        params = [{k: p[k] for k in ("name", "shape", "dtype", "bits") if k in p} for p in info["params"]]
        for what, mine, theirs in (("params", params, meta.get("params")),
                                   ("context_window", info["model"]["context_window"], meta.get("context_window_size")),
                                   ("prefill_chunk_size", info["prefill_chunk_size"], meta.get("prefill_chunk_size"))):
            if mine != theirs:
                raise EdgequantError(f"{f} is damaged ('{what}' differs from the library {lib.name}'s: the library "
                                     "and the weights come from different exports); export the model again with "
                                     "`edgequant export`")
        missing = [n for n in info["functions"] if n != "_metadata" and not self._has(n)]
        if missing:
            raise EdgequantError(f"{lib.name} has no function {missing[0]} that {f.name} lists; export the model "
                                 "again with `edgequant export`")

    def _has(self, name: str) -> bool:
        try:
            self.vm[name]
            return True
        except Exception:  # noqa: BLE001 - TVM's error for a missing function
            return False

    # ----------------------------------------------------------------------------------------- low level
    def _embed(self, ids):
        tvm = self._tvm
        ids = self._check_ids(ids)
        if ids.size == 1:
            self._one_id.copyfrom(ids.astype("int32"))
            dev_ids = self._one_id
        else:
            dev_ids = tvm.runtime.tensor(ids.astype("int32"), self.dev)
        e = self.vm["embed"](dev_ids, self.params)
        return e._create_view((1, len(ids), self.hidden))

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):   # the embedding kernel does not bound-check
            bad = int(ids[(ids < 0) | (ids >= self.vocab)][0])
            raise EdgequantError(f"token id {bad} is outside the vocabulary (0..{self.vocab - 1}) of this model")
        return ids

    def new_sequence(self):
        if self._active:
            self._remove(self.kv, 0)
        self._add(self.kv, 0)
        self._active = True
        self.length = 0
        self.history = []
        self._pending, self._g_len = [], 0

    def _forward(self, fn: str, ids) -> "object":
        self._check_room(len(ids))   # before the ids' own checks, as the error a user most likely needs
        logits = self._step(fn, self._embed(ids), len(ids))
        if self.long_after is not None:
            self.history += [int(t) for t in ids]
        return logits

    def _check_room(self, n: int):
        if self.length + n > self.max_len:
            raise EdgequantError(f"sequence of {self.length + n} tokens exceeds the KV cache "
                                 f"({self.max_len}); use a shorter prompt or --max-new-tokens")

    def _step(self, fn: str, embed, n: int):
        self._check_room(n)
        self._begin(self.kv, self._S([0]), self._S([n]))
        logits, self.kv = self.vm[fn](embed, self.kv, self.params)
        self._end(self.kv)
        self.length += n
        return logits

    def _prefill(self, ids):
        self._catch_up()
        fn = "prefill"
        if self._switches_to_long(len(ids)):
            # transformers' Phi-3 generate: the whole sequence again, with the long factors everywhere
            ids = self.history + list(ids)
            self.new_sequence()
        if self.long_after is not None and self.length + len(ids) > self.long_after:
            fn = "prefill_long"
        logits = None
        for i in range(0, len(ids), self.chunk):
            logits = self._forward(fn, ids[i:i + self.chunk])
        return logits

    def _switches_to_long(self, n: int) -> bool:
        """Whether appending n tokens takes a longrope sequence past original_max_position_embeddings."""
        return self.long_after is not None and self.length <= self.long_after < self.length + n

    def prefill(self, ids) -> np.ndarray:
        """Feed `ids` (in chunks) to the current sequence; logits [vocab] of the last one."""
        return self._prefill(ids).numpy().reshape(-1)

    def _decode(self, token: int):
        if self._graph is not None:
            return self._graph_decode(token)
        if self._switches_to_long(1):
            return self._prefill([token])
        self._catch_up()
        return self._forward("decode", [token])

    # ----------------------------------------------------------------------------------------- one-graph decode
    def _catch_up(self):
        """Feed the paged cache the tokens decoded through the graph, before it runs again."""
        if self._pending:
            ids, self._pending = self._pending, []
            self.length -= len(ids)
            for i in range(0, len(ids), self.chunk):
                self._forward("prefill", ids[i:i + self.chunk])

    def _graph_sync(self):
        """Copy the positions the paged cache holds and the graph's cache lacks (a prefill's) into the latter."""
        L, kv, d = self._g_shape
        tvm = self._tvm
        if self._g_cache is None:
            # as large as the paged cache; no need to clear it: the attention kernel reads keys 0..pos only and
            # never lets a value row past pos into the result
            self._g_cache = tvm.runtime.empty((L, 2, kv, self.max_len, d), "float16", self.dev)
        start, end = self._g_len, self.length - len(self._pending)
        if start < end:
            k = tvm.runtime.empty((L, end - start, kv, d), "float16", self.dev)
            v = tvm.runtime.empty((L, end - start, kv, d), "float16", self.dev)
            self._debug_get_kv(self.kv, 0, start, end, k, v)
            self._g_pos.copyfrom(np.array([start], "int32"))
            self._g_fill(k, v, self._g_cache, self._g_pos)
            self._g_len = end

    def _graph_step(self, token: int | None):
        """One replay: `token` at the next position (None: the token the last step wrote on the device)."""
        self._check_room(1)
        self._graph_sync()
        if token is not None:
            self._g_tok.copyfrom(np.array([token], "int32"))
            self._g_pos.copyfrom(np.array([self.length], "int32"))
        self._graph(self._g_tok, self._g_pos, self._g_cache, self._g_logits, self.params)
        self.length += 1
        self._g_len += 1

    def _graph_decode(self, token: int):
        self._check_room(1)   # before the id's check, as _forward does
        self._check_ids([token])
        self._graph_step(int(token))
        self._pending.append(int(token))
        return self._g_logits

    def decode(self, token: int) -> np.ndarray:
        return self._decode(token).numpy().reshape(-1)

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] of every position (a new sequence)."""
        self.new_sequence()
        fn = "prefill_logits_long" if self.long_after is not None and len(ids) > self.long_after else "prefill_logits"
        out = [self._forward(fn, ids[i:i + self.chunk]).numpy().reshape(-1, self.vocab)
               for i in range(0, len(ids), self.chunk)]
        return np.concatenate(out)

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, prompt_ids, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=0, stop_ids=(),
                 on_token=None) -> GenerationStats:
        if not len(prompt_ids):   # nothing to prefill: no logits to sample from (every caller: run, chat, API)
            raise EdgequantError("the prompt encodes to no tokens; give some text to continue")
        rng = np.random.default_rng(seed)
        st = GenerationStats(prompt_tokens=len(prompt_ids))
        self.new_sequence()
        t = time.perf_counter()
        logits = self._prefill(list(prompt_ids))
        self.dev.sync()
        st.prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        # (a longrope sequence may need re-encoding from its token ids: the host loop below handles that)
        if temperature <= 0 and self._argmax is not None and max_new_tokens > 0 and self.long_after is None:
            self._generate_greedy(logits, st, max_new_tokens, set(stop_ids), on_token)
            st.decode_s = time.perf_counter() - t
            return st
        for step in range(max_new_tokens):
            tok = sample(logits.numpy().reshape(-1), temperature, top_p, rng)
            st.tokens.append(tok)
            st.new_tokens += 1
            if on_token is not None:
                on_token(tok)
            if tok in stop_ids or step == max_new_tokens - 1:
                break
            logits = self._decode(tok)
        st.decode_s = time.perf_counter() - t
        return st

    def _generate_greedy(self, logits, st: GenerationStats, max_new_tokens: int, stop_ids: set, on_token):
        """Greedy decoding through the library's `argmax`: each step's token id stays on the device as the next
        step's `embed` input, and the host reads 4 bytes instead of the logits (CUDA decode of small models is
        bound by the host: apps/cuda/README.md). The host still waits for every step: queuing 8 steps ahead
        changed the 8th token on the H200, most likely because TVM's paged KV cache then copies the next step's
        page tables over those a queued step still reads (its copy stream does not wait for the compute stream)."""
        tok = self._argmax(logits)
        first = True
        while True:
            v = int(tok.numpy()[0])
            st.tokens.append(v)
            st.new_tokens += 1
            if on_token is not None:
                on_token(v)
            if v in stop_ids or st.new_tokens == max_new_tokens:
                return
            if self._graph is not None:
                # the graph writes its argmax into its token input and advances its position: after the first
                # step the host only reads the token
                self._graph_step(v if first else None)
                self._pending.append(v)
                first, tok = False, self._g_tok
                continue
            e = self.vm["embed"](tok, self.params)._create_view((1, 1, self.hidden))
            tok = self._argmax(self._step("decode", e, 1))

    def stop_ids(self):
        tok = self.tokenizer
        ids = {tok.eos_token_id} if tok is not None and tok.eos_token_id is not None else set()
        gen = self.dist / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids |= set(e if isinstance(e, list) else [e] if e is not None else [])
        return ids

    def weight_bytes(self) -> int:
        return int(self.info["weight_bytes"])

    def kv_cache_bytes(self, tokens: int | None = None) -> int:
        """The KV cache this runner holds for `tokens` (default: its capacity): the paged cache's, plus the one-graph
        decode's own cache where the library has one (always of full capacity, allocated by the first decode step)."""
        own = kv_cache_bytes(self.info, self.max_len) if self._graph is not None else 0
        return kv_cache_bytes(self.info, self.max_len if tokens is None else tokens) + own


def sample(logits: np.ndarray, temperature: float = 0.0, top_p: float = 1.0, rng=None) -> int:
    """Greedy for temperature 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def perplexity(runner: Runner, windows, progress: bool = True) -> dict:
    """Perplexity over token windows [n, seqlen] (the protocol of edgequant.evaluate: mean NLL of next tokens)."""
    from tqdm.auto import tqdm
    nll, count = 0.0, 0
    windows = np.asarray(windows)
    for w in tqdm(windows, desc="eval (tvm)", disable=not progress, unit="window"):
        logits = runner.logits(w.tolist())[:-1].astype(np.float64)
        target = w[1:]
        m = logits.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
        nll += float((lse - logits[np.arange(len(target)), target]).sum())
        count += len(target)
    return {"perplexity": float(np.exp(nll / count)), "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]), "tokens": count}
