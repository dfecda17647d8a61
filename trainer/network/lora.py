"""kohya sd-scripts' LoRA network (networks/lora.py) for SDXL, built on the modules ComfyUI has already loaded.

Why a re-implementation instead of kohya's classes: kohya replaces ``org_module.forward`` for good and keeps the
target set in a mutable CLASS attribute. In ComfyUI the U-Net / CLIP objects are shared with the rest of the graph,
so the network here never changes them: it only keeps references and adds forward hooks inside ``attach()``.
The math, the module set, the key names, dims/alphas, the init draws, the state dict and max-norm are kohya's.

Randomness:
* init never touches torch's global RNG (ComfyUI reseeds it whenever a sampler runs): ``build(..., generator)`` takes
  a CPU ``torch.Generator``. Modules are created in kohya's order (TE1, TE2, U-Net; inside a CLIP attention k, v, q,
  out as in transformers) and each draws exactly what kohya's LoRAModule draws from the global RNG: nn.Linear/Conv2d
  default init of lora_down, then of lora_up (both discarded), then kaiming_uniform_(a=sqrt(5)) of lora_down; lora_up
  = 0. So a generator seeded S should give kohya's weights after ``torch.manual_seed(S); create_network(...)`` on CPU
  when nothing else draws in between (the per-module draw pattern is checked in tests/unit; no golden file holds
  kohya's init values). TE modules are created (and drawn) even when that TE is not trained, as kohya does, so the
  U-Net init does not depend on the train_te flags.
* dropout / rank_dropout / module_dropout draw exactly as kohya's LoRAModule does: the module-dropout decision
  ``torch.rand(1) < p`` from the CPU's global RNG (a host draw, so the step never waits for the device), the
  dropout mask (``F.dropout``) and the rank mask from the global RNG of the device the activations are on. The
  training loop (trainer/run/loop.py) owns those global RNGs while it runs: it forks them, seeds them from the run's
  seed, saves them in the resumable state and restores them after previews; gradient checkpointing replays them
  in the recompute. So a run is reproducible and resumable, and nothing is copied to the device per module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import AdapterNetwork, max_norm_ratio
from .config import NetworkConfig
from .targets import AlphaLike, TargetModule, sdxl_block_index

# ----------------------------------------------------------------------------------------------------------------
# one LoRA module


def in_activation_dtype(layer: torch.nn.Linear | torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in x's dtype, the float32 weight cast for the call (gradients reach it in float32).

    kohya's mixed precision: its LoRA runs under autocast, so in a bf16/fp16 run the branch's matmuls, dropouts and
    scaling are bf16/fp16 while the weights the optimizer steps stay float32 (LyCORIS's modules do the same with
    ``.to(x)``). Computing the branch in float32 instead costs a float32 copy of every adapted layer's input, kept
    for the backward, and float32 matmuls (about 8 % of a bf16 step on the CPU, bench/README.md)."""
    weight = layer.weight
    if weight.dtype == x.dtype:
        return layer(x)
    weight = weight.to(x.dtype)
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight)
    return layer._conv_forward(x, weight, None)


class LoRAModule(torch.nn.Module):
    """kohya's LoRAModule: out = org(x) + up(down(x)) * multiplier * alpha/rank, with kohya's three dropouts.

    The original module is only referenced (never registered as a submodule, never patched), so this module's
    state_dict is exactly kohya's: ``alpha``, ``lora_down.weight``, ``lora_up.weight``. Weights are created on CPU in
    float32; move the network with ``.to()``.

    The ``alpha`` buffer is float32, except when alpha is 0/None: then alpha = rank and the buffer is int64 as in
    kohya (kohya quirk K12); it is saved with that dtype unless a save dtype is given. ComfyUI's loader reads it
    with ``.item()``, so both load the same.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        lora_dim: int,
        alpha: AlphaLike,
        *,
        generator: torch.Generator,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        dim_source: str = "network_dim",
    ) -> None:
        super().__init__()
        if generator is None or generator.device.type != "cpu":
            raise ValueError("LoRAModule needs a private CPU torch.Generator for its init")
        if lora_dim < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {lora_dim}")
        self.lora_name = lora_name
        object.__setattr__(self, "_org_module", org_module)  # a reference, not a submodule
        self.lora_dim = int(lora_dim)
        self.block_index = sdxl_block_index(lora_name)
        self.dim_source = dim_source

        if isinstance(org_module, torch.nn.Conv2d):
            self.in_dim, self.out_dim = org_module.in_channels, org_module.out_channels
            self.kernel_size = tuple(org_module.kernel_size)
            self.stride = tuple(org_module.stride)
            self.padding = tuple(org_module.padding)
            self.kind = "conv{}x{}".format(*self.kernel_size)
            mk = {"device": "cpu", "dtype": torch.float32, "bias": False}
            self.lora_down = torch.nn.utils.skip_init(
                torch.nn.Conv2d, self.in_dim, self.lora_dim, self.kernel_size, self.stride, self.padding, **mk
            )
            self.lora_up = torch.nn.utils.skip_init(torch.nn.Conv2d, self.lora_dim, self.out_dim, (1, 1), (1, 1), **mk)
        elif isinstance(org_module, torch.nn.Linear):
            self.in_dim, self.out_dim = org_module.in_features, org_module.out_features
            self.kernel_size = self.stride = self.padding = None
            self.kind = "linear"
            mk = {"device": "cpu", "dtype": torch.float32, "bias": False}
            self.lora_down = torch.nn.utils.skip_init(torch.nn.Linear, self.in_dim, self.lora_dim, **mk)
            self.lora_up = torch.nn.utils.skip_init(torch.nn.Linear, self.lora_dim, self.out_dim, **mk)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a torch.nn.Linear or Conv2d, got {type(org_module).__name__}")

        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach().float().item()
        if alpha is None or alpha == 0:
            alpha_buf = torch.tensor(self.lora_dim, dtype=torch.int64)  # kohya: alpha = rank, stored as int64
            alpha_val: float = float(self.lora_dim)
        else:
            alpha_val = float(alpha)
            alpha_buf = torch.tensor(alpha_val, dtype=torch.float32)
        self.register_buffer("alpha", alpha_buf)
        self.scale = alpha_val / self.lora_dim

        # The draws kohya's constructor makes from the global RNG, here from the private generator: default init of
        # lora_down and lora_up (nn.Linear/Conv2d reset_parameters, discarded by kohya), then lora_down's init.
        with torch.no_grad():
            for w in (self.lora_down.weight, self.lora_up.weight, self.lora_down.weight):
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
            torch.nn.init.zeros_(self.lora_up.weight)

        self.multiplier = float(multiplier)
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None

    @property
    def org_module(self) -> torch.nn.Module:
        """The module this LoRA adds to (ComfyUI's own Linear/Conv2d)."""
        return self._org_module

    @property
    def alpha_value(self) -> float:
        return float(self.alpha.item())

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """kohya's LoRA branch on the module input: up(down(x)) * multiplier * scale, or None when module dropout
        skips this module. In training mode the dropouts draw from the global RNGs (see the module docstring)."""
        train = self.training
        if train and self.module_dropout is not None and torch.rand(1) < self.module_dropout:
            return None  # kohya: a host draw; the module is skipped for this forward

        lx = in_activation_dtype(self.lora_down, x)

        if train and self.dropout is not None:
            lx = torch.nn.functional.dropout(lx, p=self.dropout)

        scale = self.scale
        if train and self.rank_dropout is not None:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # [B, tokens, rank]
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # [B, rank, H, W]
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))  # kohya: as if the rank had shrunk

        lx = in_activation_dtype(self.lora_up, lx)
        return lx * self.multiplier * scale

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """org output + delta, in the org output's dtype (what kohya's patched forward returns)."""
        d = self.delta(x)
        return out if d is None else out + d.to(out.dtype)

    def _product(self) -> torch.Tensor:
        up = self.lora_up.weight.to(torch.float)
        down = self.lora_down.weight.to(torch.float)
        if self.kind == "linear":
            return up @ down
        if self.kernel_size == (1, 1):
            return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        # the two convs composed: delta[o, i, kh, kw] = sum_r up[o, r] * down[r, i, kh, kw]
        return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """float32 weight delta = multiplier * (up . down) * scale (kohya's LoRAInfModule.get_weight)."""
        m = self.multiplier if multiplier is None else multiplier
        return m * self._product() * self.scale

    def merged_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """float32 W + delta, as kohya's merge_to computes it (the org module is not changed)."""
        w = self.org_module.weight.detach().to(torch.float)
        return w + self.delta_weight(multiplier).to(w.device)

    def extra_repr(self) -> str:
        shape = f"{self.kind} {self.in_dim}->{self.out_dim}"
        return f"{self.lora_name}: {shape}, rank {self.lora_dim}, alpha {self.alpha_value}"


class LoRANetwork(AdapterNetwork[LoRAModule]):
    """kohya's LoRA modules (TE modules of an untrained TE are made and dropped, for kohya's init stream).

    ``build`` always returns the module set for THIS config: kohya's create_network appends the conv containers to a
    class attribute, so a later default network in the same process also wraps ResBlock Linear/1x1 convs (kohya
    quirk K11); that process-global mutation is deliberately not reproduced.
    """

    algo = "lora"
    builds_untrained = True

    @classmethod
    def from_modules(cls, loras: Sequence[LoRAModule]) -> LoRANetwork:
        """A network over hand-made modules (tests, tools)."""
        return cls(loras, None)

    @classmethod
    def build_module(cls, target: TargetModule, config: NetworkConfig, generator: torch.Generator) -> LoRAModule:
        return LoRAModule(
            target.name,
            target.module,
            target.dim,
            target.alpha,
            generator=generator,
            multiplier=config.multiplier,
            dropout=config.dropout,
            rank_dropout=config.rank_dropout,
            module_dropout=config.module_dropout,
            dim_source=target.dim_source,
        )

    def original_module(self, module: LoRAModule) -> torch.nn.Module:
        return module.org_module

    def adapted_output(self, module: LoRAModule, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return module.apply(x, output)

    def scaled_by_loraplus(self, param_name: str) -> bool:
        """kohya's LoRA+: every lora_up."""
        return "lora_up" in param_name

    def excused_missing(self, key: str) -> bool:
        """A missing ``.alpha`` when the module's alpha equals its rank (kohya's files without alpha)."""
        return key.endswith(".alpha") and self.get_submodule(key[: -len(".alpha")]).scale == 1.0

    def scale_to_max_norm(self, module: LoRAModule, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """kohya's apply_max_norm_regularization for one module: delta = (up . down) * alpha/rank (no multiplier);
        up and down are multiplied by sqrt(ratio) (kohya only when ratio != 1; times exactly 1.0 changes nothing,
        and not asking saves a device sync per module)."""
        down, up = module.lora_down.weight, module.lora_up.weight
        scale = module.alpha / down.shape[0]
        if module.kind == "linear":
            updown = up @ down
        elif tuple(up.shape[2:]) == (1, 1) and tuple(down.shape[2:]) == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        norm = (updown * scale).norm()
        ratio = max_norm_ratio(norm, max_norm)
        sqrt_ratio = ratio**0.5
        up.mul_(sqrt_ratio)
        down.mul_(sqrt_ratio)
        return norm * ratio, ratio
