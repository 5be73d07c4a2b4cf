"""The data that describes one architecture family's decoder block."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, calibrated together (one Hessian), in the order a block computes them.

    `producer` names the module whose output feeds these linears (a norm, or v_proj for o_proj), which is where an
    equivalent transformation can be folded.
    """
    names: tuple[str, ...]
    producer: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str                      # attribute path from the CausalLM to the list of decoder blocks
    groups: tuple[LinearGroup, ...]       # sequential calibration order inside a block
    linear_ratio: dict = field(default_factory=dict)  # OWQ: weak-column share per linear kind

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.groups for n in g.names)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}"
