"""TVMScript text parsed into a TIR function, once per text.

The kernels here are generated as TVMScript source per shape and parsed by TVM's Python parser, which took 12.6 s of
a 33 s tiny-model cpu export (27 parses). Exports in one process (`package`, the tests, a notebook) ask for the same
shapes again; TIR functions are immutable, so the parsed function is shared.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1024)
def parse_tir(source: str):
    """The `tirx` prim func defined by `source` (text that refers to the TIR builder as `T`)."""
    import tvm
    from tvm.script import tirx as T
    return tvm.script.from_source(source, extra_vars={"T": T})
