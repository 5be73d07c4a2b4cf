"""A DIST's chat template rendered within bounds of time, memory and length.

The template is code from the model's folder (`tokenizer_config.json`), run by transformers in jinja2's sandbox. The
sandbox stops unsafe calls, not work: `{{ "x" * 10**10 }}`, `"x".ljust(10**10)` or two nested loops of 10^5 steps each
ran for minutes and took gigabytes before the rendered text could be checked (seventeenth and eighteenth re-runs, U5
and U6). So the rendering runs under an alarm and an address-space allowance above what the process already holds,
and its text is refused when it is longer than the context could hold (no token spells more characters than the
vocabulary's longest entry) before it is tokenized.
"""
from __future__ import annotations

import contextlib
import resource
import signal
import threading
import weakref

from edgequant.errors import EdgequantError, first_line

RENDER_SECONDS = 10.0
RENDER_MEMORY = 1 << 30   # bytes of address space the rendering may add; a real template needs kilobytes


class _Timeout(Exception):
    """Raised by the alarm inside the template's rendering."""


def _address_space() -> int | None:
    """Bytes of address space this process maps now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def _memory_allowance(extra: int):
    """Allocations past the current address space + `extra` fail (MemoryError) inside the block."""
    now, (soft, hard) = _address_space(), resource.getrlimit(resource.RLIMIT_AS)
    cap = None if now is None else now + extra
    if cap is None or (soft != resource.RLIM_INFINITY and soft <= cap) or (hard != resource.RLIM_INFINITY and hard < cap):
        yield
        return
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ValueError, OSError):   # a platform that does not enforce it (macOS): the alarm and length still bound
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def _alarm(seconds: float):
    """`_Timeout` inside the block after `seconds` (only the main thread receives signals: elsewhere, no alarm)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def ring(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_LONGEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # tokenizer -> its longest vocabulary entry


def max_chars(tok, tokens: int) -> int:
    """The most characters `tokens` tokens can spell: a longer text cannot fit (with room for normalizers that drop
    characters). The vocabulary is scanned once per tokenizer, not once per chat message."""
    longest = _LONGEST.get(tok)
    if longest is None:
        longest = _LONGEST[tok] = max(1, max((len(t) for t in tok.get_vocab()), default=1))
    return 2 * tokens * longest


def render(tok, turns: list[dict], where, limit: int) -> str:
    """The chat template's text for `turns` with the generation prompt, or a one-line error naming `where` (the
    tokenizer_config.json). Whatever the template raises is its own fault, not a crash (sixteenth re-run, T32)."""
    fix = "replace it with the model's original template"
    try:
        with _alarm(RENDER_SECONDS), _memory_allowance(RENDER_MEMORY):
            text = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except (KeyboardInterrupt, EdgequantError):
        raise
    except _Timeout:
        raise EdgequantError(f"the chat_template in {where} did not finish rendering this conversation within "
                             f"{RENDER_SECONDS:g} s; {fix}") from None
    except MemoryError:
        raise EdgequantError(f"the chat_template in {where} needed more than {RENDER_MEMORY >> 30} GiB to render "
                             f"this conversation; {fix}") from None
    except Exception as e:   # noqa: BLE001 (see the docstring)
        raise EdgequantError(f"the chat_template in {where} was refused ({type(e).__name__}: {first_line(e, 120)}); "
                             f"{fix}") from None
    if len(text) > limit:
        raise EdgequantError(f"the chat_template in {where} renders this conversation to {len(text)} characters, more "
                             f"than the context holds; {fix}")
    return text
