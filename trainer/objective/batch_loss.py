"""kohya's SDXL training objective for one batch: noise, noisy latents, U-Net call, target, loss.

Order and math follow sd-scripts' ``NetworkTrainer.process_batch`` for SDXL:
latents are scaled by the VAE factor once, here; noise and timesteps are drawn in kohya's order
(trainer/noise.py); the U-Net is called once per batch with per-sample context, ``y`` = pooled
CLIP-G + six size embeddings; the target is the noise (epsilon) or the velocity (v-prediction);
the loss is reduced as trainer/loss_weighting.compute_loss documents.

The U-Net is reached through a small ``Denoiser`` protocol so this module is testable without
ComfyUI; trainer/comfyui/ provides the real one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..data.size_conditioning import size_embedding
from .ddpm_schedule import DDPMSchedule
from .loss_weighting import LossSettings, compute_loss, reg_loss_weights
from .noise import NoiseSettings, sample_noise_and_timesteps


@dataclass(frozen=True)
class ObjectiveSettings:
    """kohya's loss and noise options of a run, as one value (the Loss & Noise node's output)."""

    loss: LossSettings = field(default_factory=LossSettings)
    noise: NoiseSettings = field(default_factory=NoiseSettings)


class Denoiser(Protocol):
    """What the objective needs from a diffusion model."""

    prediction_type: str  # "epsilon" or "v_prediction"
    latent_scale: float  # SDXL: 0.13025
    device: torch.device  # where the model computes; batches are moved there

    def __call__(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Raw prediction (epsilon or v) for kohya-style noisy latents and integer timesteps."""


@dataclass
class Batch:
    """One training batch, as the caches provide it (latents unscaled, as ComfyUI LATENTs are)."""

    latents: torch.Tensor  # [B, 4, h, w]
    context: torch.Tensor  # [B, 77*k, 2048]: CLIP-L penultimate ++ CLIP-G penultimate
    pooled: torch.Tensor  # [B, 1280]: CLIP-G projected pooled output
    time_ids: torch.Tensor  # [B, 6]: original_size_hw, crop_top_left, target_size_hw (stays on the host: the size
    # embedding is computed there, as kohya's numbers are)
    loss_weights: torch.Tensor | None = None  # [B]: per-sample loss weight; None: from is_reg and prior_loss_weight
    loss_mask: torch.Tensor | None = None  # [B, 1, h, w]: kohya's masked loss at latent size (1 = pixel counts)
    is_reg: tuple[bool, ...] = ()  # per sample: a regularization image (its loss is weighted by prior_loss_weight)

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (one copy per tensor; none when it is there already)."""
        weights = self.loss_weights.to(device) if self.loss_weights is not None else None
        mask = self.loss_mask.to(device) if self.loss_mask is not None else None
        return Batch(
            self.latents.to(device),
            self.context.to(device),
            self.pooled.to(device),
            self.time_ids,
            weights,
            mask,
            self.is_reg,
        )


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, with grad, on the model's device
    timesteps: torch.Tensor  # [B] as drawn (on the host in training)


def sdxl_vector_embedding(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's ``y``: pooled CLIP-G output followed by the six 256-d size embeddings (kohya order)."""
    emb = size_embedding(time_ids, device=pooled.device).to(pooled.dtype)
    return torch.cat([pooled, emb], dim=1)


def batch_loss(
    model: Denoiser,
    batch: Batch,
    schedule: DDPMSchedule,
    noise_settings: NoiseSettings,
    loss_settings: LossSettings,
    generator: torch.Generator,
    py_random: random.Random,
) -> StepResult:
    """The loss of one batch, with kohya's random draws taken from the private generators given."""
    batch = batch.to(model.device)
    latents = batch.latents.float() * model.latent_scale
    sample = sample_noise_and_timesteps(latents, noise_settings, generator, py_random, schedule=schedule)
    y = sdxl_vector_embedding(batch.pooled.float(), batch.time_ids)
    pred = model(sample.noisy_latents, sample.timesteps, batch.context, y)
    if model.prediction_type == "v_prediction":
        target = schedule.get_velocity(latents, sample.noise, sample.timesteps)
    else:
        target = sample.noise
    weights = batch.loss_weights
    if weights is None and any(batch.is_reg):
        weights = reg_loss_weights(torch.tensor(batch.is_reg), loss_settings.prior_loss_weight).to(model.device)
    loss = compute_loss(pred, target, sample.timesteps, schedule, loss_settings, weights, batch.loss_mask)
    return StepResult(loss=loss, timesteps=sample.drawn_timesteps)
