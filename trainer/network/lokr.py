"""LoKr (Kronecker product): LyCORIS's LokrModule on kohya's SDXL module set (shared LyCORIS glue: lycoris.py)."""

from __future__ import annotations

from typing import Any

import torch
from lycoris.modules.lokr import LokrModule

from .base import max_norm_ratio
from .config import NetworkConfig
from .lycoris import LycorisNetwork


class LokrNetwork(LycorisNetwork[LokrModule]):
    algo = "lokr"
    module_class = LokrModule

    @classmethod
    def module_options(cls, config: NetworkConfig) -> dict[str, Any]:
        return {"factor": config.factor}

    def scale_to_max_norm(self, module: LokrModule, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LyCORIS's LokrModule.apply_max_norm: the norm of dW; each factor is multiplied by ratio**(1/factors)."""
        norm = module.get_weight(module.shape).norm()
        ratio = max_norm_ratio(norm, max_norm)
        factors = _scaled_factors(module)
        for factor in factors:
            factor *= ratio ** (1 / len(factors))
        return norm * ratio, ratio


def _scaled_factors(m: LokrModule) -> list[torch.Tensor]:
    """The tensors LyCORIS's LokrModule.apply_max_norm scales (``4 - use_w1 - use_w2 + (not use_w2 and tucker)``)."""
    out = [m.lokr_w1] if m.use_w1 else [m.lokr_w1_a, m.lokr_w1_b]
    if m.use_w2:
        out.append(m.lokr_w2)
    else:
        out += ([m.lokr_t2] if m.tucker else []) + [m.lokr_w2_a, m.lokr_w2_b]
    return out
