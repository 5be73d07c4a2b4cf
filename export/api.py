"""The export-side verbs as Python functions, with the same arguments as the `edgequant export|run|chat|bench`
commands. `run`, `chat`, `bench` and `evaluate` need only the TVM runtime."""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.memory import DEFAULT_CONTEXT


def export(checkpoint, target: str = "cpu", output=None, arch: str | None = None,
           system_lib_prefix: str | None = None, progress: bool = True) -> Path:
    """Compile `checkpoint` (a quantized checkpoint, or a HF model folder for fp16) for `target` into `output`."""
    from .build import export_model
    out = export_model(checkpoint, target, output, arch=arch, system_lib_prefix=system_lib_prefix,
                       progress=progress)
    warning = memory_warning(out)
    if warning:   # printed even with progress off: the library was written, but the app may be killed running it
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return out


def memory_plan(dist, context: int | None = None):
    """The memory plan (edgequant.memory) of an exported DIST at `context` tokens (default: what `run` allocates)."""
    from edgequant.memory import PREFILL_CHUNK, Shapes, memory_plan as plan
    from .graph_decode import FUNC
    from .runtime import read_export_info
    info = read_export_info(dist)
    shapes = Shapes.from_export_model(info["model"])
    # export's paged KV cache is fp16 (export/models/llama.py); the one-graph decode step keeps a second one
    return plan(shapes, int(info["weight_bytes"]), context, "float16",
                int(info.get("prefill_chunk_size") or PREFILL_CHUNK),
                kv_caches=2 if FUNC in (info.get("functions") or ()) else 1)


def memory_warning(dist, context: int | None = None) -> str | None:
    """A warning when the DIST's plan at its full context window exceeds its target's usual memory limit."""
    from edgequant.memory import over_budget
    from .runtime import read_export_info
    from .targets import PRESETS
    info = read_export_info(dist)
    preset = PRESETS.get(info.get("target"))
    if preset is None or not preset.memory_limit:
        return None
    ctx = context or int(info["model"].get("context_window") or 0) or None
    return over_budget(memory_plan(dist, ctx), preset.memory_limit, f"{preset.name} ({preset.memory_limit_note})")


def _cpu_arch(name: str) -> str:
    """A CPU architecture as LLVM triples and `platform.machine()` spell it, in one spelling."""
    name = name.lower()
    return {"arm64": "aarch64", "amd64": "x86_64", "x86-64": "x86_64"}.get(name, name)


def check_runs_here(dist) -> dict:
    """The DIST folder's export record, or a one-line error when its library is not one `run`, `chat`, `bench` and
    `eval` can load (they load cpu and cuda shared libraries; mobile and Mac libraries are linked into apps)."""
    from .runtime import read_export_info
    from .targets import PRESETS
    info = read_export_info(dist)
    target, library = info.get("target"), str(info.get("library", ""))
    preset = PRESETS.get(target)
    arch = _cpu_arch((preset.target.get("mtriple") or "").split("-")[0]) if preset is not None else ""
    if info.get("device") in ("cpu", "cuda") and library.endswith(".so"):
        host = _cpu_arch(platform.machine())
        if arch and arch != host:   # dlopen would say "cannot open shared object file" of a file that exists (U12)
            raise EdgequantError(f"{dist} was exported for {target} ({arch}), and this machine is {host}: run it on an "
                                 f"{arch} Linux machine (or apps/runtime's C runtime under qemu), or export with "
                                 "--target cpu to try the model here")
        return info
    where = preset.app if preset is not None and preset.app else "apps/README.md"
    raise EdgequantError(f"{dist} was exported for {target}: its {library} links into an app ({where} in the "
                         "edgequant repository); `edgequant run`, `chat`, `bench` and `eval` load cpu and cuda "
                         "exports: export with --target cpu to try the model here")


def run(dist, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
        chat_template: bool = False, on_text=None) -> dict:
    """Generate a continuation of `prompt`; `on_text(piece)` receives text as it is produced."""
    from .runtime import Runner
    check_runs_here(dist)
    r = Runner(dist)
    tok = r.tokenizer
    prompt = user_text(prompt)
    if chat_template and not getattr(tok, "chat_template", None):   # ran the raw prompt without a word (U11)
        raise EdgequantError(f"--chat-template: {r.dist} has no usable chat template (none in tokenizer_config.json, no "
                             "readable chat_template.jinja); run without --chat-template or add the model's template")
    ids = (_encode(tok, [{"role": "user", "content": prompt}], r.dist, r.max_len) if chat_template
           else tok(prompt)["input_ids"])
    _check_fits(len(ids), f"the prompt's {len(ids)} tokens", max_new_tokens, "--max-new-tokens", r.max_len)
    stream = _Detokenizer(tok, on_text)
    st = r.generate(list(ids), max_new_tokens, temperature, top_p, seed, r.stop_ids(), stream.push)
    return {"prompt_tokens": st.prompt_tokens, "tokens": st.tokens, "text": tok.decode(st.tokens, skip_special_tokens=True),
            "prefill_tokens_per_s": st.prefill_tps, "decode_tokens_per_s": st.decode_tps,
            "device": r.info["device"], "target": r.info["target"]}


def user_text(s: str) -> str:
    """Typed text as the tokenizer can take it: bytes that are not UTF-8 (which Python hands over as lone surrogates,
    from argv or a surrogate-escaping stdin) become U+FFFD, as a terminal shows them (they were a tokenizer
    TypeError: sixteenth re-run, T35)."""
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:   # surrogates no decoder escaped
        return s.encode("utf-8", "replace").decode("utf-8")


def _apply_template(tok, turns, dist, tokens: int):
    """Token ids of the tokenizer's chat template on `turns`, rendered within bounds (`chat_template.render`): a
    text longer than `tokens` tokens can spell is refused before it is tokenized."""
    from .chat_template import max_chars, render
    # transformers reads chat_template.jinja over the tokenizer_config.json entry
    where = Path(dist) / ("chat_template.jinja" if (Path(dist) / "chat_template.jinja").is_file()
                          else "tokenizer_config.json")
    text = render(tok, turns, where, max_chars(tok, tokens))
    ids = tok(text, add_special_tokens=False)["input_ids"]   # what apply_chat_template(tokenize=True) does
    if not ids:   # nothing to prefill: the runner failed on it (seventeenth re-run, T37)
        raise EdgequantError(f"the chat_template in {where} renders this conversation to no tokens; replace it with "
                             "the model's original template")
    return ids


def chat(dist, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95, seed: int = 0,
         read=input, write=print, note=None):
    """Chat loop with the tokenizer's chat template. An empty line, end of input or Ctrl-C at the prompt ends it;
    Ctrl-C during a reply stops that reply. `read(prompt)` gives a line, `write(text, end=, flush=)` prints the
    reply, `note(text)` the speed line after it (default: `write`)."""
    from .runtime import Runner
    check_runs_here(dist)
    r = Runner(dist)
    _check_fits(1, "a one-token message", max_new_tokens, "--max-new-tokens", r.max_len)
    tok = r.tokenizer
    note = note or write
    history = []
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": user_text(line)})
        ids = _encode(tok, history, r.dist, r.max_len)
        if len(ids) + max_new_tokens > r.max_len:  # forget the oldest turns when the cache would overflow
            history = history[-1:]
            ids = _encode(tok, history, r.dist, r.max_len)
        stream = _Detokenizer(tok, lambda s: write(s, end="", flush=True))
        try:
            st = r.generate(list(ids), max_new_tokens, temperature, top_p, seed, r.stop_ids(), stream.push)
        except KeyboardInterrupt:
            write("")
            note("[reply stopped]")
            history.pop()
            continue
        write("")
        note(f"[{st.decode_tps:.1f} tok/s]")
        history.append({"role": "assistant", "content": tok.decode(st.tokens, skip_special_tokens=True)})


def bench(dist, prompt_lengths=(32, 128, 512), decode_tokens: int = 64, repeats: int = 1,
          context: int | None = None) -> dict:
    """Prefill and decode tokens/s for a few prompt lengths (random tokens, greedy), plus the memory plan at
    `context` tokens (default: the KV cache length the runner allocated)."""
    import numpy as np
    from .dist import kv_cache_len
    from .runtime import Runner
    info = check_runs_here(dist)
    plan = memory_plan(dist, context) if context else None   # a --context past the model fails before any work
    _check_fits(max(prompt_lengths), f"--prompt-lengths {max(prompt_lengths)}", decode_tokens, "--decode-tokens",
                kv_cache_len(info))
    r = Runner(dist, load_tokenizer=False)
    rng = np.random.default_rng(0)
    rows = []
    r.generate([1, 2, 3, 4], 4)  # warm-up: first calls allocate workspaces
    for n in prompt_lengths:
        best = None
        for _ in range(repeats):
            ids = rng.integers(0, r.vocab, n).tolist()
            st = r.generate(ids, decode_tokens, stop_ids=())
            if best is None or st.decode_tps > best.decode_tps:
                best = st
        rows.append({"prompt_tokens": n, "prefill_tokens_per_s": round(best.prefill_tps, 2),
                     "decode_tokens": best.new_tokens, "decode_tokens_per_s": round(best.decode_tps, 2)})
    return {"target": r.info["target"], "device": r.info["device"], "quantization": r.info["quantization"],
            "weight_bytes": r.weight_bytes(), "kv_cache_bytes": r.kv_cache_bytes(),
            "threads": getattr(r, "threads", None),
            "kv_cache_tokens": r.max_len, "memory": (plan or memory_plan(dist, r.max_len)).to_dict(), "rows": rows}


def _check_fits(prompt: int, prompt_is: str, new: int, new_what: str, cache: int) -> None:
    """`prompt` tokens (described by `prompt_is`) plus `new` generated ones must fit the KV cache (the last token is
    not fed back), checked before anything runs: past it, generation stopped midway after printing half a reply."""
    cap = f"the KV cache's {cache} tokens (this model's context window, at most {DEFAULT_CONTEXT})"
    if new >= cache:
        raise EdgequantError(f"{new_what} {new} does not fit {cap}; use {new_what} {cache - 1} or fewer")
    if prompt + new - 1 > cache:
        fix = f"use {new_what} {cache - prompt + 1} or fewer, or" if prompt <= cache else "use"
        raise EdgequantError(f"{prompt_is} and {new_what} {new} need {prompt + new - 1} tokens, more than {cap}: "
                             f"{fix} a shorter prompt")


def evaluate(dist, data, seqlen: int = 2048, max_windows: int | None = None, progress: bool = True,
             on_start=None) -> dict:
    """Perplexity through the compiled library, on the same windows as `edgequant.evaluate`; `on_start()` is called
    once the DIST is loaded and the windows are read."""
    from edgequant.data import eval_windows
    from .runtime import Runner, perplexity
    check_runs_here(dist)
    r = Runner(dist, max_total_seq_len=seqlen)
    if seqlen > r.max_len:
        raise EdgequantError(f"--seqlen {seqlen} exceeds the model's context window {r.max_len}")
    windows = eval_windows(r.tokenizer, data, seqlen, max_windows).numpy()
    if on_start is not None:
        on_start()
    t0 = time.time()
    res = perplexity(r, windows, progress)
    res["time_s"] = round(time.time() - t0, 2)
    res["runtime"] = f"tvm ({r.info['target']})"
    return res


def _encode(tok, turns, dist, tokens: int) -> list[int]:
    """Token ids of chat turns (at most `tokens` are wanted): the tokenizer's chat template, else the messages one per
    line."""
    if getattr(tok, "chat_template", None):
        return _apply_template(tok, turns, dist, tokens)
    from .chat_template import max_chars
    text = "\n".join(m["content"] for m in turns)
    if len(text) > max_chars(tok, tokens):   # a one-word line of megabytes tokenized for minutes
        raise EdgequantError(f"the conversation is {len(text)} characters, more than the model's context of {tokens} "
                             "tokens holds; send shorter messages")
    return tok(text)["input_ids"]


class _Detokenizer:
    """Streams text for a growing token list (decoding the whole tail keeps multi-byte characters whole)."""

    def __init__(self, tok, sink):
        self.tok, self.sink, self.ids, self.sent = tok, sink, [], ""

    def push(self, token: int):
        if self.sink is None:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > len(self.sent):
            self.sink(text[len(self.sent):])
        self.sent = text
