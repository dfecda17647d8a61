"""What LoHa and LoKr share: LyCORIS's modules (pip ``lycoris-lora``) on kohya's SDXL module set, attached with hooks.

loha.py and lokr.py each add their module class and max-norm; everything else is here.

Why LyCORIS's own classes: the math (Hadamard / Kronecker products, init, alpha/scale, max-norm, state-dict layout)
is LyCORIS's ``LohaModule`` / ``LokrModule``; nothing here re-derives it, so files are exactly what LyCORIS saves
(``<lora_name>.hada_w1_a`` ... / ``<lora_name>.lokr_w1`` ... plus ``.alpha``) and ComfyUI's LoraLoader
(comfy/weight_adapter/loha.py, lokr.py) maps every key.

What differs from ``lycoris.kohya.LycorisNetwork`` and why:
* Targets and names come from trainer/network/targets.py (kohya's discovery on ComfyUI's modules, ``lora_unet_`` /
  ``lora_te1_`` / ``lora_te2_`` names, network_dim/alpha for Linear and 1x1 convs, conv_dim/alpha for the others,
  block dims), so one NetworkConfig means the same module set for every algo.
* ComfyUI's modules are shared with the rest of the graph, so LyCORIS's ``apply_to`` (which replaces ``forward``)
  is never called. ``attach()`` registers forward hooks that add ``module.bypass_forward_diff(x, scale=multiplier)``
  (LyCORIS's bypass path: W x + dW x) to the original output; on exit the hooks are removed.
* Init: LyCORIS draws from torch's GLOBAL RNG in its constructors. ``build`` therefore runs them inside
  ``torch.random.fork_rng(devices=[])`` after ``torch.manual_seed(generator.initial_seed())``: the init is a pure
  function of the generator's seed, and the caller's global RNG state is restored afterwards.
* Dropouts: LyCORIS's ``dropout`` (nn.Dropout on dW x) draws from the global RNG of the activations' device;
  module dropout is done in the hook as LyCORIS's ``forward`` does it (``torch.rand(1) < p``, the CPU's global
  RNG, a host draw). The training loop owns, seeds, saves and restores both (trainer/run/loop.py), as for LoRA.
  ``rank_dropout`` is refused (by NetworkConfig): LyCORIS 4.1.3 draws its mask on the CPU per module and LoKr then
  multiplies it with the weight on the device (a device mismatch on a GPU); LoHa copies it over (a sync per module).
* Max-norm: LyCORIS's per-module ``apply_max_norm`` formula (loha.py, lokr.py), evaluated on the device without the
  ``.cpu()`` and ``if scaled`` it does per module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from .base import AdapterNetwork, MaxNormStats, ModuleT, NetworkT
from .config import NetworkConfig, PartSettings, loraplus_refusal
from .targets import TargetModule


def is_lycoris_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True when the dict holds LoHa/LoKr tensors (``hada_*`` / ``lokr_*``), i.e. it is not a kohya LoRA."""
    return any(k.rsplit(".", 1)[-1].startswith(("hada_", "lokr_")) for k in sd)


class LycorisMaxNormStats(MaxNormStats):
    """LyCORIS's network-level summary: (0, 0.0, 0.0) when no module was scaled."""

    def read(self) -> tuple[int, float, float]:
        keys, mean, biggest = super().read()
        return (keys, mean, biggest) if keys else (0, 0.0, 0.0)


class LycorisNetwork(AdapterNetwork[ModuleT]):
    """LyCORIS modules of one algo (``module_class``) registered under their kohya names."""

    #: LyCORIS's module class for this algo
    module_class: ClassVar[type[torch.nn.Module]]
    max_norm_stats = LycorisMaxNormStats

    @classmethod
    def module_options(cls, config: NetworkConfig) -> dict[str, Any]:
        """The algo's own LyCORIS constructor arguments."""
        return {}

    @classmethod
    def build(
        cls: type[NetworkT],
        unet: torch.nn.Module | None,
        te1: torch.nn.Module | None,
        te2: torch.nn.Module | None,
        config: NetworkConfig,
        generator: torch.Generator,
    ) -> NetworkT:
        """AdapterNetwork.build with the init seeded by ``generator.initial_seed()``: LyCORIS draws from the global
        RNG, which is forked so the caller's state is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator.initial_seed())
            return super().build(unet, te1, te2, config, generator)

    @classmethod
    def build_module(cls, target: TargetModule, config: NetworkConfig, generator: torch.Generator) -> ModuleT:
        """LyCORIS's module in bypass mode (its init draws from the global RNG that ``build`` seeded)."""
        alpha = float(target.alpha.item()) if isinstance(target.alpha, torch.Tensor) else target.alpha
        module = cls.module_class(
            target.name,
            target.module,
            multiplier=config.multiplier,
            lora_dim=target.dim,
            alpha=alpha,
            dropout=config.dropout or 0.0,
            rank_dropout=config.rank_dropout or 0.0,
            module_dropout=config.module_dropout or 0.0,
            bypass_mode=True,
            **cls.module_options(config),
        )
        module.block_index = target.block_index
        module.dim_source = target.dim_source
        return module

    def original_module(self, module: ModuleT) -> torch.nn.Module:
        return module.org_module[0]

    def adapted_output(self, module: ModuleT, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """LyCORIS's bypass diff (dW x) added to the original output."""
        # LyCORIS's forward: module dropout skips the whole module (global RNG)
        if module.training and module.module_dropout and torch.rand(1) < module.module_dropout:
            return output
        return output + module.bypass_forward_diff(x, scale=module.multiplier).to(output.dtype)

    def copy_loaded(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Resets LyCORIS's max-norm ``scalar`` to 1 first, as LyCORIS's load hook does (the file has it folded into
        hada_w1_a / lokr_w1)."""
        for m in self.loras:
            m.scalar.fill_(1.0)
        super().copy_loaded(sd)

    def param_groups(
        self,
        unet: PartSettings,
        clip_l: PartSettings,
        clip_g: PartSettings,
        block_lr_weight: Sequence[float] | None = None,
    ) -> tuple[list[dict], list[str]]:
        """AdapterNetwork.param_groups without LoRA+, which raises: it scales lora_up, which LoHa/LoKr do not have
        (LyCORIS's kohya wrapper would silently apply no ratio)."""
        refusal = loraplus_refusal(self.algo, any(part.loraplus_lr_ratio for part in (unet, clip_l, clip_g)))
        if refusal:
            raise ValueError(refusal)
        return super().param_groups(unet, clip_l, clip_g, block_lr_weight=block_lr_weight)
