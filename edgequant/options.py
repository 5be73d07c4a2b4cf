"""Option dataclasses: every field carries its rule and help text, so one dataclass validates the values, round-trips
them through JSON, and is the only source of the command line's options (`cli.py` generates them) and of the Python
API's defaults. A method registers its own dataclass (`methods.register_method(config=...)`); adding a method option
is one field in it. Nothing here imports torch or click.
"""
from __future__ import annotations

import dataclasses
import math
import re

from .errors import EdgequantError


# Calibration and training hold their windows (and each block's activations for them) in memory at once, and windows
# are drawn with replacement, so the text does not bound --nsamples: 2**24 tokens is 64 times the default 128 x 2048.
MAX_WINDOW_TOKENS = 1 << 24
MAX_SEED = 2 ** 63 - 1   # torch.manual_seed takes 64 bits (2**70 was a traceback)
# Training passes: papers use 1-40 (OmniQuant 20, weak-column tuning a few); 2**62 trained until killed, with no
# message. 10,000 is far past any useful run and still ends.
MAX_EPOCHS = 10_000


def check_window_tokens(nsamples: int, seqlen: int) -> None:
    """Refuse --nsamples x --seqlen past MAX_WINDOW_TOKENS before anything is allocated (2**40 windows asked torch
    for 8 TiB, a traceback after minutes)."""
    if nsamples * seqlen > MAX_WINDOW_TOKENS:
        raise EdgequantError(f"--nsamples {nsamples} x --seqlen {seqlen} is {nsamples * seqlen} tokens held in memory; "
                             f"the limit is {MAX_WINDOW_TOKENS}: use --nsamples {max(1, MAX_WINDOW_TOKENS // seqlen)} "
                             "or fewer at this --seqlen")


def training_windows(flag: str, heldout: int, windows: int, least: int = 0) -> int:
    """The calibration windows trained on when the last `heldout` of `windows` are only scored (`--heldout`,
    `--tune-heldout`, `--e2e-heldout`; `least`: the fewest held out). Refused unless one is left to train on."""
    if heldout < least:
        raise EdgequantError(f"{flag} must be at least {least}, not {heldout}")
    if heldout >= windows:
        raise EdgequantError(f"{flag} {heldout} leaves no training windows of the {windows} calibration windows; use "
                             f"a smaller {flag} or a larger --nsamples")
    return windows - heldout


def opt(default, help: str, kind: str, lo=None, hi=None, lo_open: bool = False, choices: tuple = (),
        cli: bool = True):
    """A dataclass field with its rule: `kind` is int, float, bool, str, choice, device or float|search (a number or
    the word 'search'); `lo`/`hi` bound numbers; `cli=False` keeps the field out of the command line."""
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind, "lo": lo, "hi": hi,
                                                        "lo_open": lo_open, "choices": tuple(choices), "cli": cli})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number_error(v, m) -> str | None:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    if m["kind"] == "int" and not is_int:
        return "must be an integer"
    if not (is_int or isinstance(v, float)) or not math.isfinite(v):
        return "must be a finite number"
    lo, hi = m["lo"], m["hi"]
    if (lo is not None and (v < lo or m["lo_open"] and v == lo)) or (hi is not None and v > hi):
        return "must be " + " and ".join(b for b in (lo is not None and f"{'>' if m['lo_open'] else '>='} {lo:g}",
                                                     hi is not None and f"<= {hi:g}") if b)
    return None


def check_value(name: str, v, m) -> None:
    """Raise a one-line EdgequantError naming the option when `v` breaks the field's rule."""
    kind, err = m["kind"], None
    if kind in ("int", "float"):
        err = _number_error(v, m)
    elif kind == "bool" and not isinstance(v, bool):
        err = "must be true or false"
    elif kind == "str" and not isinstance(v, str):
        err = "must be a string"
    elif kind == "choice" and v not in m["choices"]:
        err = f"must be one of {', '.join(repr(c) for c in m['choices'])}"
    elif kind == "device" and not (isinstance(v, str) and re.fullmatch(r"cpu|cuda(:\d+)?", v)):
        err = "must be cpu, cuda or cuda:N"
    elif kind == "float|search" and v != "search" and (bad := _number_error(v, {**m, "kind": "float"})):
        err = "must be a number or 'search'" if bad == "must be a finite number" else f"{bad}, or 'search'"
    if err:
        raise EdgequantError(f"{flag(name)} {err}, not {v!r}")


@dataclasses.dataclass
class Options:
    """Base of option dataclasses: checks every field with a rule, JSON round trip, the fields the CLI offers."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.metadata.get("kind") == "float|search" and isinstance(v, str) and re.fullmatch(r"[-+.\d]+(e[-+]?\d+)?", v):
                setattr(self, f.name, v := float(v))   # the command line passes text
            if "kind" in f.metadata and not (v is None and f.default is None):
                check_value(f.name, v, f.metadata)

    def changed(self, *names: str) -> list[str]:
        """Those of `names` set to something other than their default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [n for n in names if getattr(self, n) != defaults[n]]

    def refuse_unless(self, active: bool, names: tuple, needs: str) -> None:
        """Options that only act together with another (`needs`, the fix to name) are refused when set without it:
        ignored, they changed nothing without a word."""
        unused = [] if active else self.changed(*names)
        if unused:
            raise EdgequantError(f"option(s) {', '.join(flag(u) for u in unused)} only apply with {needs}")

    def held_out(self) -> dict[str, int]:
        """{flag: count} of the calibration windows these options hold out of training (`training_windows`), so
        that a count that leaves none is refused before the model loads."""
        return {}

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]

    def to_dict(self) -> dict:
        """The user-facing options (fields the CLI offers) as JSON-ready values."""
        return {f.name: getattr(self, f.name) for f in self.cli_fields()}

    @classmethod
    def from_dict(cls, d: dict, context: str = ""):
        names = {f.name for f in cls.cli_fields()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EdgequantError(f"option(s) {', '.join(flag(u) for u in unknown)} do not apply{context}")
        return cls(**d)
