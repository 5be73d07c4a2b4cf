"""Weight quantization schemes: one registry of named schemes, each a validated dataclass that round-trips to JSON.

A scheme says how the integers of a linear are laid out: `bits` per weight, `group_size` consecutive inputs along K
sharing one scale (-1: one group per output row), and `sym` (symmetric: no stored zero point, z = 2^(b-1)).
"""
from __future__ import annotations

import dataclasses
import math
import re

from .errors import EdgequantError

SUPPORTED_BITS = (2, 3, 4)   # linears (`--bits`)
TABLE_BITS = (4, 8)          # the embedding / output table (`--embed-bits`): 8 keeps it near-lossless
SCHEME_BITS = SUPPORTED_BITS + (8,)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    group_size: int = 128
    sym: bool = False

    def __post_init__(self):
        for name, typ in (("bits", int), ("group_size", int), ("sym", bool)):
            v = getattr(self, name)
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise EdgequantError(f"{name}={v!r} must be {'an integer' if typ is int else 'true or false'}")
        if self.bits not in SCHEME_BITS:
            raise EdgequantError(f"bits={self.bits} is not supported: use one of {', '.join(map(str, SCHEME_BITS))}")
        if self.group_size != -1 and (self.group_size < 8 or self.group_size % 8 != 0):
            raise EdgequantError(f"group_size={self.group_size} is not supported: use -1 (per channel) or a multiple of 8 "
                                 "such as 32, 64 or 128")

    # ---- layout facts shared by pack, artifact and export
    @property
    def values_per_word(self) -> int:
        return 32 // self.bits

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        return 1 << (self.bits - 1)

    def groups(self, k: int) -> int:
        """Number of groups along an input width k (the last one may be ragged)."""
        return 1 if self.group_size == -1 else math.ceil(k / self.group_size)

    def group_len(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size

    def packed_words(self, k: int) -> int:
        return math.ceil(k / self.values_per_word)

    @property
    def name(self) -> str:
        g = "" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{g}{'-sym' if self.sym else ''}"

    # ---- JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantScheme":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_dict_strict(cls, d) -> "QuantScheme":
        """A scheme from a dict holding exactly its fields (`sym` may be left out): per-module overrides."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not {"bits", "group_size"} <= set(d) or set(d) - known:
            raise EdgequantError(f"{d!r} is not a scheme: write an object with bits, group_size and optionally sym")
        return cls(**d)


SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(name: str, scheme: QuantScheme) -> QuantScheme:
    SCHEMES[name] = scheme
    return scheme


for _b in SUPPORTED_BITS:
    register_scheme(f"w{_b}", QuantScheme(_b, -1))
    for _g in (32, 64, 128):
        register_scheme(f"w{_b}g{_g}", QuantScheme(_b, _g))
        register_scheme(f"w{_b}g{_g}-sym", QuantScheme(_b, _g, sym=True))
    register_scheme(f"w{_b}-sym", QuantScheme(_b, -1, sym=True))


def get_scheme(name: str) -> QuantScheme:
    """A registered scheme by name, or one parsed from the `w<bits>[g<group>][-sym]` pattern."""
    if name in SCHEMES:
        return SCHEMES[name]
    m = re.fullmatch(r"w([0-9]+)(?:g([0-9]+))?(-sym)?", name)
    if not m:
        raise EdgequantError(f"unknown scheme '{name}': use a name like w4g128, w3g128, w2g64, w4 (per channel) "
                             f"or w4g128-sym; registered: {', '.join(sorted(SCHEMES))}")
    return QuantScheme(int(m.group(1)), int(m.group(2)) if m.group(2) else -1, bool(m.group(3)))
