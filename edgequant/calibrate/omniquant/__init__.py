"""OmniQuant (Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language Models",
arXiv 2308.13137, ICLR 2024): learnable weight clipping (`lwc.py`) and learnable equivalent transformation (`let.py`),
trained block by block (`trainer.py`) and fused away into a parameter-free checkpoint (`fuse.py`).
"""
from __future__ import annotations

from .fuse import LiveBlock, OmniBlock, apply_fused
from .let import LET
from .lwc import LWC
from .trainer import OmniConfig, calibrate_omniquant

__all__ = ["LWC", "LET", "OmniBlock", "LiveBlock", "OmniConfig", "apply_fused", "calibrate_omniquant"]
