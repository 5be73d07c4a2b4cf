"""edgequant: low-bit weight quantization (RTN, GPTQ, OmniQuant, OWQ) of LLaMA-family models into a plain quantized
checkpoint, evaluated in PyTorch and compiled with Apache TVM for phones, GPUs and CPUs.

The verbs of the command line are available as functions with the same arguments (imported lazily so that
`edgequant --help` stays instant): quantize, evaluate, inspect, demo, convert. Importing edgequant also lets
transformers load its checkpoints: `AutoModelForCausalLM.from_pretrained("q/")` (see `edgequant.hf_integration`).
"""
__version__ = "0.1.0"

_API = ("quantize", "evaluate", "inspect", "demo", "convert")


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(name)


__all__ = list(_API) + ["__version__"]

# `AutoModelForCausalLM.from_pretrained(checkpoint)` after `import edgequant` (registered lazily: see hf_hook)
from . import hf_hook as _hf_hook  # noqa: E402

_hf_hook.install()
