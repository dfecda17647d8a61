"""LoHa (Hadamard product): LyCORIS's LohaModule on kohya's SDXL module set (shared LyCORIS glue: lycoris.py)."""

from __future__ import annotations

import torch
from lycoris.modules.loha import LohaModule

from .base import max_norm_ratio
from .lycoris import LycorisNetwork


class LohaNetwork(LycorisNetwork[LohaModule]):
    algo = "loha"
    module_class = LohaModule

    def scale_to_max_norm(self, module: LohaModule, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LyCORIS's LohaModule.apply_max_norm: the norm of dW * scalar; the ``scalar`` is multiplied by the ratio."""
        norm = (module.get_weight(module.shape) * module.scalar).norm()
        ratio = max_norm_ratio(norm, max_norm)
        module.scalar *= ratio
        return norm * ratio, ratio
