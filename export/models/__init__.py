"""relax.frontend.nn models, one module per architecture family; `graph_for` picks a config's."""
from __future__ import annotations


def graph_for(config: dict):
    """(ArchConfig class, CausalLM class) of the graph that exports `config`'s family."""
    from edgequant.models import family_for
    family = family_for(config.get("model_type") if isinstance(config, dict) else config)
    if family.name in ("gemma2", "gemma3"):
        from .gemma import GemmaArchConfig, GemmaForCausalLM
        return GemmaArchConfig, GemmaForCausalLM
    from .llama import ArchConfig, LlamaForCausalLM
    return ArchConfig, LlamaForCausalLM
