"""click parameter types that refuse, as one-line usage errors, values the API cannot use (0 windows, NaN rates,
unknown devices), so nothing reaches torch or a kernel to fail there with a traceback."""
from __future__ import annotations

import math
import re

import click

POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
EVAL_WINDOW = click.IntRange(min=2)   # tokens per evaluation window (data.check_eval_seqlen says why)
MAX_REPEATS = 1000   # `bench` keeps the fastest of N runs; 2**62 of them ran until killed


class Finite(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets NaN through every bound)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


POSITIVE_FLOAT = Finite(min=0, min_open=True)
NON_NEGATIVE_FLOAT = Finite(min=0)
PROBABILITY = Finite(min=0, max=1, min_open=True)


class Device(click.ParamType):
    """`cpu`, `cuda` or `cuda:N` (availability is checked by the API, which knows whether torch sees a GPU)."""
    name = "device"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d+)?", value):
            return value
        self.fail(f"{value!r} is not a device: use cpu, cuda or cuda:N.", param, ctx)


DEVICE = Device()


class PositiveIntList(click.ParamType):
    """A comma-separated list of positive integers, e.g. 32,128,512."""
    name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            items = [int(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            items = []
        if not items or min(items) < 1:
            self.fail(f"{value!r} is not a comma-separated list of positive integers (e.g. 32,128,512).", param, ctx)
        return items


POSITIVE_INT_LIST = PositiveIntList()


def non_empty(ctx, param, value):
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty.", ctx, param)
    return value
