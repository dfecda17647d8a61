"""kohya's training-noise pipeline (train_util.get_noise_noisy_latents_and_timesteps) on private RNGs.

Every random draw goes through a ``torch.Generator`` and a ``random.Random`` owned by the trainer, never the global
RNGs: ComfyUI reseeds those whenever a sampler runs, which would silently change the training stream. The ORDER
and SHAPES of the draws are kohya's, so a CPU generator seeded with S (and a ``random.Random(R)``) yields exactly
what kohya yields after ``torch.manual_seed(S)`` / ``random.seed(R)`` on CPU:

1. ``randn_like(latents)``                                   the base noise
2. ``rand(1)``           if noise_offset and noise_offset_random_strength
3. ``randn(B, C, 1, 1)`` if noise_offset
4. pyramid draws         if multires_noise_iterations (per level: Python ``random()``, then a torch ``randn``)
5. ``randint(min, max, (B,))`` unless min >= max (then t = max everywhere and NOTHING is drawn, kohya quirk K18)
6. ``rand(1)``           if ip_noise_gamma and ip_noise_gamma_random_strength
7. ``randn_like(latents)`` if ip_noise_gamma

All torch draws happen on the generator's device and are then moved to the latents' device, so a CPU generator
gives the same stream whether training runs on CPU or GPU (kohya itself draws 1-3 and 6-7 on the training device
and 4-5 on CPU, i.e. from two different streams on a GPU).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .ddpm_schedule import DDPMSchedule

Strength = float | torch.Tensor


@dataclass(frozen=True)
class NoiseSettings:
    """kohya's noise arguments (same names and defaults as sd-scripts' argparse).

    A feature is on when its value is truthy, as in kohya: noise_offset=0.0, multires_noise_iterations=0 or
    ip_noise_gamma=0.0 all mean off, and are stored as None (kohya's default), so a widget left at 0 and an unset
    kohya argument are the same setting. Timesteps are drawn from [min_timestep, max_timestep) (defaults 0 and 1000).
    """

    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    min_timestep: int | None = None
    max_timestep: int | None = None
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False

    def __post_init__(self) -> None:
        for name in ("noise_offset", "adaptive_noise_scale", "multires_noise_iterations", "ip_noise_gamma"):
            if not getattr(self, name):
                object.__setattr__(self, name, None)
        # kohya's verify_training_args rejects this combination.
        if self.adaptive_noise_scale is not None and self.noise_offset is None:
            raise ValueError("adaptive_noise_scale requires noise_offset")
        if self.min_timestep is not None and self.min_timestep < 0:
            raise ValueError(f"min_timestep must be >= 0, got {self.min_timestep}")


class NoiseSample(NamedTuple):
    noise: torch.Tensor  # the epsilon target: base noise + offset + pyramid, WITHOUT the ip-noise part
    noisy_latents: torch.Tensor  # add_noise(latents, noise (+ ip noise), timesteps)
    timesteps: torch.Tensor  # int64 [B], on the latents' device
    drawn_timesteps: torch.Tensor  # the same, where they were drawn (the generator's device; the CPU in training,
    # so logging them never waits for the GPU)


def _randn(
    shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _rand1(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(1, generator=generator, device=generator.device).to(device)


def apply_noise_offset(
    latents: torch.Tensor,
    noise: torch.Tensor,
    noise_offset: Strength | None,
    adaptive_noise_scale: float | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Offset noise (crosslabs): add one random constant per (sample, channel) so the model can learn to shift
    overall brightness. Adaptive: the offset grows with |mean over H,W| of the latents, clamped at >= 0.
    Exactly one draw: randn(B, C, 1, 1) (float32). Returns a new tensor."""
    if noise_offset is None:
        return noise
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
        noise_offset = torch.clamp(noise_offset + adaptive_noise_scale * latent_mean, 0.0, None)
    offset_noise = _randn((latents.shape[0], latents.shape[1], 1, 1), generator, torch.float32, latents.device)
    return noise + noise_offset * offset_noise


def pyramid_noise_like(
    noise: torch.Tensor,
    generator: torch.Generator,
    py_random: random.Random,
    iterations: int = 6,
    discount: float = 0.4,
) -> torch.Tensor:
    """Multires (pyramid) noise: add bilinearly upsampled coarser noise levels, then renormalise.

    As kohya does (kohya quirk K17): the per-level shrink factor r in [2, 4) comes from Python's RNG, level 0
    (r**0 = 1) adds a full-resolution randn, the loop stops after a level with a side of 1, ``noise`` is modified IN
    PLACE, and the result is divided by the unbiased std of the whole batch tensor.
    """
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = py_random.random() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        level = _randn((b, c, hn, wn), generator, torch.float32, noise.device)
        noise += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def timestep_range(settings: NoiseSettings, num_train_timesteps: int) -> tuple[int, int]:
    """[min, max) as kohya resolves it: None means 0 and num_train_timesteps."""
    min_t = 0 if settings.min_timestep is None else int(settings.min_timestep)
    max_t = num_train_timesteps if settings.max_timestep is None else int(settings.max_timestep)
    return min_t, max_t


def sample_timesteps(
    batch_size: int,
    min_timestep: int,
    max_timestep: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Uniform integer timesteps in [min, max). If min >= max there is no draw: every t is max (kohya get_timesteps)."""
    if min_timestep < max_timestep:
        if min_timestep < 0 or max_timestep > num_train_timesteps:
            raise ValueError(f"timestep range [{min_timestep}, {max_timestep}) is outside [0, {num_train_timesteps})")
        timesteps = torch.randint(
            min_timestep, max_timestep, (batch_size,), generator=generator, device=generator.device
        )
    else:
        if not 0 <= max_timestep < num_train_timesteps:
            raise ValueError(f"fixed timestep {max_timestep} (min >= max) is outside [0, {num_train_timesteps})")
        timesteps = torch.full((batch_size,), max_timestep, device=generator.device)
    return timesteps.long().to(device)


def sample_noise_and_timesteps(
    latents: torch.Tensor,
    settings: NoiseSettings,
    torch_generator: torch.Generator,
    py_random: random.Random,
    *,
    schedule: DDPMSchedule,
) -> NoiseSample:
    """One training step's noise, timesteps and noisy latents, drawn in kohya's order (see module docstring)."""
    noise = _randn(tuple(latents.shape), torch_generator, latents.dtype, latents.device)
    if settings.noise_offset:
        offset: Strength = settings.noise_offset
        if settings.noise_offset_random_strength:
            offset = _rand1(torch_generator, latents.device) * settings.noise_offset
        noise = apply_noise_offset(latents, noise, offset, settings.adaptive_noise_scale, torch_generator)
    if settings.multires_noise_iterations:
        noise = pyramid_noise_like(
            noise, torch_generator, py_random, settings.multires_noise_iterations, settings.multires_noise_discount
        )

    min_t, max_t = timestep_range(settings, schedule.num_train_timesteps)
    drawn = sample_timesteps(
        latents.shape[0], min_t, max_t, torch_generator, torch_generator.device, schedule.num_train_timesteps
    )
    timesteps = drawn.to(latents.device)

    if settings.ip_noise_gamma:
        strength: Strength = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            strength = _rand1(torch_generator, latents.device) * settings.ip_noise_gamma
        ip_noise = _randn(tuple(latents.shape), torch_generator, latents.dtype, latents.device)
        noisy_latents = schedule.add_noise(latents, noise + strength * ip_noise, timesteps)
    else:
        noisy_latents = schedule.add_noise(latents, noise, timesteps)
    return NoiseSample(noise, noisy_latents, timesteps, drawn)
