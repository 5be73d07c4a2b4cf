"""Model families described as data (`family.py`): a block's linears and their shapes, norms, calibration groups,
LET pairs and export fusions. Calibration, OmniQuant, the checkpoint and export read them instead of hard-coding
names; a new family is one module defining a `Family`, registered below.
"""
from __future__ import annotations

from ..errors import UnsupportedModelError
from .family import Dims, Family, LetPair, Linear, LinearGroup, Norm
from .gemma import GEMMA2_FAMILY, GEMMA3_FAMILY
from .llama import LLAMA_FAMILY
from .phi3 import PHI3_FAMILY
from .qwen3 import QWEN3_FAMILY

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for mt in family.model_types:
        FAMILIES[mt] = family
    return family


register_family(LLAMA_FAMILY)
register_family(QWEN3_FAMILY)
register_family(PHI3_FAMILY)
register_family(GEMMA2_FAMILY)
register_family(GEMMA3_FAMILY)


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):   # TypeError: a JSON list or object where a name belongs
        raise UnsupportedModelError(
            f"architecture '{model_type}' is not supported; supported model types: {', '.join(supported_model_types())}"
        ) from None


__all__ = ["Dims", "Family", "LetPair", "Linear", "LinearGroup", "Norm", "FAMILIES", "family_for", "register_family",
           "supported_model_types"]
