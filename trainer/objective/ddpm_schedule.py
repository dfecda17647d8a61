"""kohya's DDPM noise schedule for SDXL, and why it is the U-Net input ComfyUI's sigma route would give.

kohya (train_network.NetworkTrainer.get_noise_scheduler) builds diffusers'
``DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)``,
then attaches ``all_snr`` (prepare_scheduler_for_custom_training) and, with ``--zero_terminal_snr``, rescales the betas
AFTERWARDS. We rebuild the same float32 tables in plain torch so diffusers is not needed.

Relation to ComfyUI
-------------------
The engine feeds the U-Net kohya's ``x_t = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps`` (``add_noise``) and the integer
timestep ``t`` directly (trainer/comfyui/models.unet_forward). ComfyUI's discrete (SDXL, EPS) models are driven with a
sigma instead: with ``sigma_t = sqrt((1 - ac_t) / ac_t)`` and ``x = x0 + sigma_t * eps`` (EPS.noise_scaling),
``BaseModel.apply_model(x, sigma)`` feeds the U-Net

    x / sqrt(sigma_t**2 + 1) = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps        (EPS.calculate_input)

because 1 / sqrt(sigma**2 + 1) = sqrt(ac) and sigma / sqrt(sigma**2 + 1) = sqrt(1 - ac): exactly kohya's ``add_noise``.
The U-Net's timestep is ``model_sampling.timestep(sigma)``, the nearest log-sigma in ComfyUI's table, which is ``t``
again for every t in 0..999. tests/host/run/test_training_reference.py checks both against ComfyUI's model_sampling.

WHY not through sigma: ComfyUI derives its table in float64 and it differs from kohya's float32 one by up to ~1.3e-5
relative (at t=0); the detour costs float32 roundings; and with zero-terminal SNR ac_999 = 0, so sigma_999 = inf.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


def _expand_to(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Shape a per-sample vector [B] as [B, 1, ..., 1] so it broadcasts over a [B, ...] tensor (as diffusers does)."""
    values = values.flatten()
    while values.ndim < ndim:
        values = values.unsqueeze(-1)
    return values


def _enforce_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv 2305.08891) beta rescale, in the float32 op order kohya uses.

    Shift sqrt(alpha_bar) so the last step is 0, scale so the first keeps its value, then convert back to betas.
    """
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


class DDPMSchedule:
    """The scaled-linear DDPM tables kohya trains SDXL with (float32, CPU).

    ``all_snr`` is computed from the ORIGINAL alphas_cumprod, before the optional zero-terminal-SNR rescale,
    because kohya attaches it first and never recomputes it (kohya quirk K7). So min-SNR / debiased / scale-v
    weights use the original SNR while ``add_noise``, ``get_velocity`` and the huber 'snr' schedule use the
    rescaled ``alphas_cumprod``.
    """

    def __init__(
        self,
        zero_terminal_snr: bool = False,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
    ) -> None:
        self.num_train_timesteps = int(num_train_timesteps)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        # diffusers 'scaled_linear': linspace of sqrt(beta) in float32, squared.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, self.num_train_timesteps, dtype=torch.float32) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # kohya: prepare_scheduler_for_custom_training -> (sqrt(ac) / sqrt(1 - ac))**2, not ac / (1 - ac):
        # the two differ in the last float32 bit.
        self.all_snr: torch.Tensor = (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2
        if self.zero_terminal_snr:
            betas = _enforce_zero_terminal_snr(betas)
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.betas: torch.Tensor = betas
        self.alphas: torch.Tensor = 1.0 - betas
        self.alphas_cumprod: torch.Tensor = alphas_cumprod
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """``all_snr`` / ``alphas_cumprod`` on ``device``, copied there once: looking values up where the timesteps
        are costs no host<->device copy or sync per batch (the values are the same float32 numbers)."""
        key = (name, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """kohya's per-sample SNR (``all_snr[t]``), on the device of ``timesteps``."""
        return self.table("all_snr", timesteps.device)[timesteps.long()]

    def _sqrt_terms(self, like: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Same steps as diffusers: table cast to the sample's dtype/device, then **0.5 there.
        ac = self.table("alphas_cumprod", like.device).to(like.dtype)[timesteps.long().to(like.device)]
        sqrt_ac = _expand_to(ac**0.5, like.ndim)
        sqrt_one_minus_ac = _expand_to((1 - ac) ** 0.5, like.ndim)
        return sqrt_ac, sqrt_one_minus_ac

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion ``sqrt(ac_t) * latents + sqrt(1 - ac_t) * noise`` (DDPMScheduler.add_noise)."""
        sqrt_ac, sqrt_one_minus_ac = self._sqrt_terms(latents, timesteps)
        return sqrt_ac * latents + sqrt_one_minus_ac * noise

    def get_velocity(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(ac_t) * noise - sqrt(1 - ac_t) * latents`` (DDPMScheduler.get_velocity)."""
        sqrt_ac, sqrt_one_minus_ac = self._sqrt_terms(latents, timesteps)
        return sqrt_ac * noise - sqrt_one_minus_ac * latents
