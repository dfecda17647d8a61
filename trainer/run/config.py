"""The run's settings: one frozen object the train node builds and the session reads; each setting lives here once.

The optimizer's type and arguments are in OptimizerSettings, the per-part learning rates and LoRA+ ratios in one
PartSettings per model part, the loss and noise options in LossSettings / NoiseSettings; the learning rate and the
gradient clipping are the run's own fields (the optimizer builder and the loop receive them, they keep no copy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from ..data.bucket_batches import max_train_steps_for_epochs
from ..data.dataset import TrainingDataset
from ..data.token_length import TokenLength
from ..network.config import LoraPlusRatios, PartSettings
from ..objective.loss_weighting import LossSettings
from ..objective.noise import NoiseSettings
from .optimizers import OptimizerSettings
from .schedulers import check_schedule

#: the learning-rate input of each model part (0 there = the run's learning_rate)
PART_LR_INPUTS = {"unet": "unet_lr", "clip_l": "clip_l_lr", "clip_g": "clip_g_lr"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_DTYPES = ("auto", *DTYPES)  # auto: what the training device computes well (comfyui/training.resolve_train_dtype)
MEMORY_MODES = ("auto", "full", "stream")  # comfyui/training.load_for_training


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings, with kohya's names and defaults where kohya has them.

    ``learning_rate`` / ``loraplus_lr_ratio``: the run's values, used by every model part that sets none of its own
    (``unet``, ``clip_l``, ``clip_g``: kohya's unet_lr, text_encoder_lr and loraplus_*_lr_ratio per part).
    ``max_grad_norm``: clip the global gradient norm to this before each optimizer step; 0 disables (kohya).
    ``token_length``: kohya's max_token_length when the run's settings name one (Import kohya Config does); None: the
    'Cache Text' node's choice decides (see ``resolve_token_length``).
    """

    max_train_steps: int = 1600
    max_train_epochs: int = 0  # > 0 overrides max_train_steps, as in kohya
    learning_rate: float = 1e-4
    loraplus_lr_ratio: float | None = None
    unet: PartSettings = field(default_factory=PartSettings)
    clip_l: PartSettings = field(default_factory=PartSettings)  # lora_te1
    clip_g: PartSettings = field(default_factory=PartSettings)  # lora_te2
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_decay_steps: float = 0  # warmup_stable_decay: the decay steps at the end (a count, or a ratio below 1)
    lr_scheduler_min_lr_ratio: float = 0.0  # cosine_with_min_lr, warmup_stable_decay, rex: the final lr / lr
    lr_scheduler_args: str = ""  # kohya's key=value list: step_rules (piecewise_constant), warmup/decay_type (wsd)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    scale_weight_norms: float | None = None
    seed: int = 42
    train_dtype: str = "fp32"  # or "auto"
    full_bf16: bool = False
    gradient_checkpointing: bool = True
    #: how ComfyUI places the frozen U-Net: "auto" (it streams what does not fit next to the memory plan's step),
    #: "full" (every weight on the device), "stream" (as few resident weights as ComfyUI allows: least memory)
    memory_mode: str = "auto"
    loss: LossSettings = field(default_factory=LossSettings)
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    token_length: TokenLength | None = None

    def __post_init__(self) -> None:
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        warmup = self.lr_warmup_steps
        if isinstance(warmup, float) and (warmup == 0 or warmup >= 1):  # steps, not a ratio: an int, as kohya
            object.__setattr__(self, "lr_warmup_steps", int(warmup))
        for name in ("loraplus_lr_ratio", "scale_weight_norms"):
            if getattr(self, name) == 0:  # kohya's ``or`` / the node's "0 = off": no ratio, no max-norm
                object.__setattr__(self, name, None)
        if self.train_dtype not in TRAIN_DTYPES:
            raise ValueError(f"train_dtype must be one of {list(TRAIN_DTYPES)}, got {self.train_dtype!r}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {list(MEMORY_MODES)}, got {self.memory_mode!r}")
        if self.full_bf16 and self.train_dtype not in ("bf16", "auto"):
            raise ValueError("full_bf16 needs train_dtype bf16")
        check_schedule(self.lr_scheduler, self.lr_scheduler_args, self.lr_decay_steps, self.lr_scheduler_min_lr_ratio)

    def resolve_token_length(self, cached: TokenLength | None) -> TokenLength:
        """The run's token layout: the text cache's (``cached``, from 'Cache Text'), which must agree with the one the
        run's settings name; kohya's default (75 tokens) when neither says."""
        if cached is not None and self.token_length is not None and cached != self.token_length:
            raise ValueError(
                f"The text cache was encoded with max_token_length {cached.choice}, but the run's settings (the "
                f"kohya config) use {self.token_length.choice}: set max_token_length to {self.token_length.choice} "
                "on 'Cache Text' so the captions are encoded as that run encodes them."
            )
        return cached or self.token_length or TokenLength()

    def zero_learning_rate_error(self, trained_parts: Sequence[str] = PART_LR_INPUTS) -> str | None:
        """Why nothing would learn, or None: every trained part's learning rate is 0 (its own, or learning_rate
        where it sets none). Names the inputs, so the user knows what to raise."""
        parts = self.part_settings()
        if not trained_parts or any(parts[name].learning_rate > 0 for name in trained_parts):
            return None
        own = {name: getattr(self, name).learning_rate for name in trained_parts}
        named = [f"learning_rate {self.learning_rate:g}"] if None in own.values() else []
        named += [
            f"{PART_LR_INPUTS[name]} 0 (= learning_rate)" if lr is None else f"{PART_LR_INPUTS[name]} {lr:g}"
            for name, lr in own.items()
        ]
        return (
            f"every learning rate is 0 ({', '.join(named)}), so nothing would train. Set learning_rate above 0 "
            "(e.g. 1e-4), or the learning rate of each part you train."
        )

    def part_settings(self) -> dict[str, PartSettings]:
        """Each model part's settings with the run's learning_rate / loraplus_lr_ratio where it sets none."""
        return {
            name: getattr(self, name).with_run_defaults(self.learning_rate, self.loraplus_lr_ratio)
            for name in ("unet", "clip_l", "clip_g")
        }

    def with_loraplus(self, ratios: LoraPlusRatios) -> TrainConfig:
        """These settings with the Network node's LoRA+ ratios: each ratio it sets replaces this config's (the run's
        ratio, the U-Net's, both text encoders'); one it leaves unset keeps this config's value."""
        if not ratios.any:
            return self

        def part(settings: PartSettings, ratio: float | None) -> PartSettings:
            return settings if ratio is None else replace(settings, loraplus_lr_ratio=ratio)

        te = ratios.text_encoder_lr_ratio
        return replace(
            self,
            loraplus_lr_ratio=ratios.lr_ratio if ratios.lr_ratio is not None else self.loraplus_lr_ratio,
            unet=part(self.unet, ratios.unet_lr_ratio),
            clip_l=part(self.clip_l, te),
            clip_g=part(self.clip_g, te),
        )

    def total_steps(self, dataset: TrainingDataset) -> int:
        """Optimizer steps of the run: max_train_steps, or kohya's count for max_train_epochs when it is set."""
        if self.max_train_epochs > 0:
            return max_train_steps_for_epochs(
                self.max_train_epochs, dataset.num_batches(), self.gradient_accumulation_steps
            )
        return self.max_train_steps


@dataclass(frozen=True)
class TrainSettings:
    """What the 'Train Settings' and 'Import kohya Config' nodes hand the Train and Export nodes: the run's settings
    (its loss and noise options still come from the objective input) and, for the report, where they came from."""

    config: TrainConfig
    source: str = "the 'Train Settings' node"
