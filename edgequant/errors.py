"""User-facing errors: one line that names the problem and the fix; the CLI prints them without a traceback."""


class EdgequantError(Exception):
    """An error caused by the user's input or environment, with a message fit to print as is."""


class CheckpointError(EdgequantError):
    """A quantized checkpoint is missing, truncated, corrupt or inconsistent with its config."""


class UnsupportedModelError(EdgequantError):
    """The model's architecture has no family description in `edgequant.models`."""


def first_line(e: Exception, limit: int | None = None) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), or its type's name."""
    s = str(e).strip()
    line = s.splitlines()[0] if s else type(e).__name__
    return line[:limit] if limit else line


def name_list(names, shown: int = 3) -> str:
    """The first `shown` of `names` and how many more: what one error line can hold of a long list."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
