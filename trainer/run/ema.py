"""EMA (exponential moving average) of the adapter's trainable weights, kept in fp32 beside the trained ones.

Why: the averaged weights of the last few hundred steps are usually a smoother LoRA than the last step's (what
OneTrainer and SimpleTuner offer as "EMA"). The update is torch's own ``get_ema_multi_avg_fn`` (one fused
``_foreach_lerp_`` over all tensors, on the training device, never a host sync); the decay of each update is
computed here, so it can warm up. The first update copies the weights (as torch's ``AveragedModel`` does).
The averages and the update count are part of the resumable state, so a resumed run averages exactly as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..network.base import AdapterNetwork

#: where the averaged weights go: an extra ``<lora>_ema.safetensors`` beside the trained LoRA, or the LoRA file itself
EMA_SAVE_AS = ("extra_file", "main_file")


@dataclass(frozen=True)
class EmaSettings:
    """The EMA node's value.

    ``decay``: weight of the old average per update (ema = decay * ema + (1 - decay) * weights); 0.999 averages
    over roughly the last 1000 updates. ``warmup_power``: 0 = the full decay from the first update; > 0 = the
    decay of update ``t`` (t = updates already averaged) is ``min(decay, 1 - (1 + t) ** -warmup_power)``, so
    early updates follow the weights closely (diffusers' EMAModel warm-up with inv_gamma 1; 2/3 for long runs,
    3/4 for short ones). ``update_every_n_steps``: average every N optimizer steps. ``start_step``: the first
    optimizer step that is averaged (the average starts as a copy of the weights then; 0 and 1 both mean the
    first step). ``save_as``: one of EMA_SAVE_AS. ``use_for_previews``: sample previews render the averaged
    weights.
    """

    decay: float = 0.999
    warmup_power: float = 0.0
    update_every_n_steps: int = 1
    start_step: int = 0
    save_as: str = "extra_file"
    use_for_previews: bool = True

    def __post_init__(self) -> None:
        if not (0.0 <= self.decay < 1.0) or not math.isfinite(self.decay):
            raise ValueError(f"EMA decay must be >= 0 and < 1, got {self.decay!r}")
        if not (self.warmup_power >= 0.0) or not math.isfinite(self.warmup_power):
            raise ValueError(f"EMA warmup_power must be >= 0 (0 = no warm-up), got {self.warmup_power!r}")
        if self.update_every_n_steps < 1:
            raise ValueError(f"EMA update_every_n_steps must be >= 1, got {self.update_every_n_steps}")
        if self.start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {self.start_step}")
        if self.save_as not in EMA_SAVE_AS:
            raise ValueError(f"EMA save_as must be one of {list(EMA_SAVE_AS)}, got {self.save_as!r}")

    def averaging(self) -> dict[str, float | int]:
        """The settings that decide the averaged weights (not where they are saved or shown), in field order: what a
        file of averaged weights records and what a resumed state must agree on."""
        return {
            "decay": self.decay,
            "warmup_power": self.warmup_power,
            "update_every_n_steps": self.update_every_n_steps,
            "start_step": self.start_step,
        }

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, counted over the whole run) is averaged."""
        first = max(1, self.start_step)
        return step >= first and (step - first) % self.update_every_n_steps == 0

    def decay_at(self, updates_done: int) -> float:
        """The decay of the update that follows ``updates_done`` earlier ones (the first one is a copy: 0)."""
        if updates_done == 0:
            return 0.0
        if self.warmup_power > 0:
            return min(self.decay, 1.0 - (1.0 + updates_done) ** -self.warmup_power)
        return self.decay


class AdapterEma:
    """The fp32 averages of a network's parameters (by state-dict name), updated after optimizer steps."""

    def __init__(self, network: AdapterNetwork, settings: EmaSettings) -> None:
        self.settings = settings
        self.network = network
        self.named = [(name, p) for name, p in network.named_parameters()]
        self.averages = {name: p.detach().to(torch.float32, copy=True) for name, p in self.named}
        self.updates = 0

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Average the weights of optimizer step ``step`` when it is due."""
        if not self.settings.due(step):
            return
        averages = [self.averages[name] for name, _ in self.named]
        current = [p.detach().to(torch.float32) for _, p in self.named]
        get_ema_multi_avg_fn(self.settings.decay_at(self.updates))(averages, current, None)
        self.updates += 1

    def state_dict_kohya(self) -> dict[str, torch.Tensor]:
        """The network's saved dict with the averaged weights in place of the trained ones (fp32, on the CPU)."""
        out = self.network.state_dict_kohya()
        for name, average in self.averages.items():
            out[name] = average.detach().to("cpu", copy=True).contiguous()
        return out

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The network computes with the averaged weights inside (previews); the trained ones, bit for bit, after."""
        with torch.no_grad():
            kept = [p.detach().clone() for _, p in self.named]
            for name, p in self.named:
                p.copy_(self.averages[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), original in zip(self.named, kept, strict=True):
                    p.copy_(original)

    # -- the resumable state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in self.averages.items()}

    def load_state(self, tensors: Mapping[str, torch.Tensor], updates: int) -> None:
        """Continue from a saved state; its names and shapes must be this network's."""
        if set(tensors) != set(self.averages):
            raise ValueError("the saved EMA weights do not match this network (different modules)")
        with torch.no_grad():
            for name, average in self.averages.items():
                average.copy_(tensors[name])
        self.updates = int(updates)
