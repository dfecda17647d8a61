"""kohya's validation loss (train_network.py): the same objective on held-out images, with nothing random left.

When it runs: after an optimizer step whose number is a multiple of ``validate_every_n_steps``, and at the end of
every ``validate_every_n_epochs``-th epoch (every epoch by default, also the last, possibly partial, one) whenever
there are validation images. What it computes: for each validation batch (the first ``max_validation_steps``) and
each of four timesteps spread over the training range (``linspace(min, max, 6)[1:-1]``: 200, 400, 600, 800), the
training loss of that batch (noise options, loss type and weights included) with the noise drawn from generators
seeded with ``validation_seed`` (the training seed when unset) afresh for every validation, without gradients and
with the LoRA's dropouts off (``network.eval()``, schedule-free optimizers in eval mode). The figure is the mean of
those losses.

Training is left exactly as it was: the validation draws come from its own generators, never the training ones, and
the global RNGs are restored afterwards by the loop, so a run with validation saves the same LoRA bytes as without.

Differences from kohya, on purpose: a step that is due for both a step and an epoch validation is validated once
(kohya computes the same number twice), and the figure is the mean of that validation only (kohya's step average
also mixes in earlier validations of the first epoch, a side effect of its LossRecorder). Validation batches keep
the composition kohya makes before any epoch reshuffle (kohya with data loader workers reshuffles them per epoch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..data.bucket_batches import BucketBatcher, TrainItem
from ..data.dataset import TrainingDataset
from ..objective.batch_loss import Denoiser, batch_loss
from ..objective.ddpm_schedule import DDPMSchedule
from ..objective.loss_weighting import LossSettings
from ..objective.noise import NoiseSettings, timestep_range
from .batch_loader import CachedBatchSource, LatentSource, LiveEncoder, TextSource
from .optimizers import optimizer_eval_mode, optimizer_train_mode

#: kohya's NUM_VALIDATION_TIMESTEPS ("200, 400, 600, 800")
NUM_VALIDATION_TIMESTEPS = 4


def _off_when_zero(value: int | None, name: str) -> int | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0 (0 = off), got {value!r}")
    return value


@dataclass(frozen=True)
class ValidationSettings:
    """kohya's validation arguments. Widget meanings: 0 = kohya's None, ``validation_seed`` -1 = None."""

    validate_every_n_steps: int | None = None  # also validate after every N-th optimizer step; None: only at epochs
    validate_every_n_epochs: int | None = None  # validate at the end of every N-th epoch; None: every epoch
    max_validation_steps: int | None = None  # validate on the first N validation batches; None: all of them
    validation_seed: int | None = None  # seed of the validation noise; None: the training seed

    def __post_init__(self) -> None:
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            object.__setattr__(self, name, _off_when_zero(getattr(self, name), name))
        seed = self.validation_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < -1):
            raise ValueError(f"validation_seed must be a whole number >= 0 (-1 = the training seed), got {seed!r}")
        if seed == -1:
            object.__setattr__(self, "validation_seed", None)

    def seed_for(self, training_seed: int) -> int:
        return training_seed if self.validation_seed is None else self.validation_seed

    def due(self, global_step: int, finished_epoch: int | None) -> list[str]:
        """Which validations are due after optimizer step ``global_step`` (``finished_epoch``: the 1-based epoch
        that ended with it, or None): "step", "epoch", both or none (kohya's conditions)."""
        kinds = []
        if self.validate_every_n_steps is not None and global_step % self.validate_every_n_steps == 0:
            kinds.append("step")
        if finished_epoch is not None and (
            self.validate_every_n_epochs is None or finished_epoch % self.validate_every_n_epochs == 0
        ):
            kinds.append("epoch")
        return kinds


@dataclass(frozen=True)
class ValidationRequest:
    """What the 'Validation' node hands the Train node: the settings and, instead of the dataset's own
    validation_split, a separate validation dataset with its caches."""

    settings: ValidationSettings = ValidationSettings()
    dataset: TrainingDataset | None = None
    latents: Any = None  # LatentCache of ``dataset``
    text: Any = None  # TextCache of ``dataset``


@dataclass
class ValidationRecord:
    """One validation: after optimizer step ``step`` of (1-based) ``epoch``; ``kind`` says why ("step", "epoch",
    "step+epoch"); ``loss`` is the mean over batches x timesteps."""

    step: int
    epoch: int
    loss: float
    kind: str
    seconds: float


def validation_timesteps(noise: NoiseSettings, num_train_timesteps: int = 1000) -> list[int]:
    """kohya's fixed timesteps: ``np.linspace(min, max, 6, dtype=int)[1:-1]`` over the training range."""
    min_t, max_t = timestep_range(noise, num_train_timesteps)
    return [int(t) for t in np.linspace(min_t, max_t, NUM_VALIDATION_TIMESTEPS + 2, dtype=int)[1:-1]]


class ValidationBatchSource(CachedBatchSource):
    """The validation batches: each image once, batches composed as kohya's validation dataset makes them
    (buckets never mix, the make_buckets shuffle at seed 0), in that order (kohya's loader does not shuffle)."""

    def _batches(self, epoch: int) -> list:
        if self._epoch_cache is None:
            out = []
            for p, part in enumerate(self.dataset.parts):
                items = [TrainItem(key=i, bucket=img.selection.bucket) for i, img in enumerate(part.images)]
                out.extend((p, b) for b in BucketBatcher(items, part.batch_size, seed=0).batches())
            self._epoch_cache = (0, out)
        return self._epoch_cache[1]

    def __len__(self) -> int:
        return len(self._batches(0))


def validation_source(
    dataset: TrainingDataset,
    request: ValidationRequest | None,
    latents: LatentSource,
    text: TextSource | None,
    live_encoder: LiveEncoder | None,
    max_train_steps: int,
    train_text_encoder: bool,
    device: torch.device,
) -> ValidationBatchSource | None:
    """The run's validation batches: the separate dataset of ``request`` or the dataset's held-out images; None when
    there are none."""
    if request is not None and request.dataset is not None:
        if dataset.validation_parts:
            raise ValueError(
                "The dataset already holds out validation images (validation_split) and the 'Validation' node has a "
                "separate validation dataset: use one of the two (set validation_split to 0, or disconnect the "
                "Validation node's dataset)."
            )
        if request.latents is None:
            raise ValueError("The 'Validation' node's dataset needs its latents: connect a 'Cache Latents' of it.")
        held_out, latents, text = request.dataset, request.latents, request.text
    elif dataset.validation_parts:
        held_out = TrainingDataset(parts=dataset.validation_parts)
    else:
        return None
    return ValidationBatchSource(
        held_out, latents, text, live_encoder, 0, max_train_steps, train_text_encoder=train_text_encoder, device=device
    )


class Validator:
    """Computes the validation loss of the network as it is now (see the module docstring)."""

    def __init__(
        self,
        model: Denoiser,
        source: ValidationBatchSource,
        settings: ValidationSettings,
        training_seed: int,
        schedule: DDPMSchedule,
        noise_settings: NoiseSettings,
        loss_settings: LossSettings,
        network: torch.nn.Module,
        optimizer: Any = None,
    ) -> None:
        self.model = model
        self.source = source
        self.settings = settings
        self.seed = settings.seed_for(training_seed)
        self.schedule = schedule
        self.noise_settings = noise_settings
        self.loss_settings = loss_settings
        self.network = network
        self.optimizer = optimizer
        self.timesteps = validation_timesteps(noise_settings, schedule.num_train_timesteps)
        limit = settings.max_validation_steps
        self.num_batches = len(source) if limit is None else min(limit, len(source))

    def due(self, global_step: int, finished_epoch: int | None) -> list[str]:
        return self.settings.due(global_step, finished_epoch) if self.num_batches > 0 else []

    def losses(self, global_step: int = 0) -> list[float]:
        """Every (batch, timestep) loss, in kohya's order: batches outer, timesteps inner."""
        generator = torch.Generator().manual_seed(self.seed)
        py_random = random.Random(self.seed)
        was_training = self.network.training
        self.network.eval()
        if self.optimizer is not None:
            optimizer_eval_mode(self.optimizer)
        try:
            values: list[torch.Tensor] = []
            with torch.no_grad():
                for index in range(self.num_batches):
                    batch = self.source.get(index, 0, py_random, step=global_step)
                    for t in self.timesteps:
                        noise = replace(self.noise_settings, min_timestep=t, max_timestep=t)
                        result = batch_loss(
                            self.model, batch, self.schedule, noise, self.loss_settings, generator, py_random
                        )
                        values.append(result.loss.detach())
            return torch.stack(values).float().cpu().tolist()  # one sync for the whole validation
        finally:
            if self.optimizer is not None:
                optimizer_train_mode(self.optimizer)
            self.network.train(was_training)

    def loss(self, global_step: int = 0) -> float:
        values = self.losses(global_step)
        return sum(values) / len(values)
