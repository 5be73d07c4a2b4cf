"""User-facing errors: one line that names the problem and the fix; the CLI prints them without a traceback."""


class EdgequantError(Exception):
    """An error caused by the user's input or environment, with a message fit to print as is."""


class CheckpointError(EdgequantError):
    """A quantized checkpoint is missing, truncated, corrupt or inconsistent with its config."""


class UnsupportedModelError(EdgequantError):
    """The model's architecture has no family description in `edgequant.models`."""
