"""DoRA (weight-decomposed LoRA): LyCORIS's LoConModule with ``weight_decompose`` (LyCORIS's kohya network_args
``algo=locon dora_wd=True wd_on_output=False``) on kohya's SDXL module set (shared LyCORIS glue: lycoris.py).

The adapted weight is W' = (W + dW) * m / ||W + dW||, the norm taken per INPUT column (``wd_on_out=False``): that is
the axis on which ComfyUI 0.30's LoraLoader (comfy/weight_adapter/base.py weight_decompose) normalises the adapted
weight; on the output axis it divides by the norm of W alone, which is not DoRA and would not be what was trained.
Saved keys are LyCORIS's: ``lora_down.weight``, ``lora_up.weight``, ``alpha`` and ``dora_scale`` (m, shape
[1, in] or [1, in, 1, 1]), which ComfyUI's LoraLoader maps.

W is the weight the layer computes with as ComfyUI loaded it (comfyui/models.layer_weight: fp8/fp16 storage cast
to float32, a LoRA merged by an upstream LoraLoader included), read in the forward hook; the magnitude m starts as
that weight's column norm, taken at the module's first forward (when ComfyUI has loaded the model: before that
the layer may not hold its patches yet), unless m came from a file. The hook adds
``layer(x, multiplier * (W' - W))`` to the layer's output, which is ComfyUI's patched layer at that strength.
LyCORIS's weight math runs on its eager ("torch") backend on every device.

LyCORIS ignores the neuron dropout with DoRA, so NetworkConfig refuses ``dropout`` for algo dora (rank_dropout too,
as for every LyCORIS algo); module_dropout works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lycoris.functional.general import weight_decompose
from lycoris.functional.locon import diff_weight
from lycoris.modules.locon import LoConModule

from ..comfyui.models import layer_weight
from .base import max_norm_ratio
from .config import NetworkConfig
from .lycoris import LycorisNetwork

#: LyCORIS's eager backend: no torch.compile warm-up or fused kernel choice inside a ComfyUI graph
BACKEND = "torch"


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of ``weight`` ([out, in(, kh, kw)]), shaped [1, in(, 1, 1)] like dora_scale."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norm.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


class DoraNetwork(LycorisNetwork[LoConModule]):
    algo = "dora"
    module_class = LoConModule

    @classmethod
    def module_options(cls, config: NetworkConfig) -> dict[str, Any]:
        return {"weight_decompose": True, "wd_on_out": False}

    @classmethod
    def build_module(cls, target, config: NetworkConfig, generator: torch.Generator) -> LoConModule:
        module = super().build_module(target, config, generator)
        module.magnitude_ready = False  # m is taken from the loaded layer at the first forward
        return module

    def scaled_by_loraplus(self, param_name: str) -> bool:
        """kohya's LoRA+ on LyCORIS's LoCon: every lora_up (not the magnitude)."""
        return "lora_up" in param_name

    def weight_change(self, module: LoConModule, base: torch.Tensor) -> torch.Tensor:
        """multiplier * (W' - W) for the layer weight ``base`` (float32): ComfyUI's DoRA patch at that strength."""
        down, up = module.lora_down.weight, module.lora_up.weight
        dw = diff_weight(down, up, None, gamma=module.scale, backend=BACKEND).view(module.shape) * module.scalar
        adapted = weight_decompose(base + dw.to(base.dtype), module.dora_scale, 1, False, backend=BACKEND)
        return (adapted - base) * module.multiplier

    def adapted_output(self, module: LoConModule, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if module.training and module.module_dropout and torch.rand(1) < module.module_dropout:
            return output
        base = layer_weight(self.original_module(module), x.device)
        if not module.magnitude_ready:
            with torch.no_grad():
                module.dora_scale.copy_(input_axis_norm(base))
            module.magnitude_ready = True
        change = self.weight_change(module, base)
        # the weight math in float32, the layer call in x's dtype (kohya's autocast; lora.in_activation_dtype)
        return output + module.op(x, change.to(x.dtype), None, **module.kw_dict).to(output.dtype)

    def copy_loaded(self, sd: Mapping[str, torch.Tensor]) -> None:
        """The file's magnitude is the module's (not re-taken from the layer at the first forward)."""
        super().copy_loaded(sd)
        for m in self.loras:
            m.magnitude_ready = True

    def scale_to_max_norm(self, module: LoConModule, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LyCORIS's LoConModule.apply_max_norm: the norm of dW (up.down * scale * scalar); ``scalar`` is scaled."""
        down, up = module.lora_down.weight, module.lora_up.weight
        norm = (diff_weight(down, up, None, gamma=1.0, backend=BACKEND) * module.scalar).norm() * module.scale
        ratio = max_norm_ratio(norm, max_norm)
        module.scalar *= ratio
        return norm * ratio, ratio
