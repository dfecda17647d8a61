"""kohya's DDPM noise schedule for SDXL, and its bridge to ComfyUI's sigma parameterisation.

kohya (train_network.NetworkTrainer.get_noise_scheduler) builds diffusers'
``DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)``,
then attaches ``all_snr`` (prepare_scheduler_for_custom_training) and, with ``--zero_terminal_snr``, rescales the betas
AFTERWARDS. We rebuild the same float32 tables in plain torch so diffusers is not needed.

Relation to ComfyUI
-------------------
kohya trains on ``x_t = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps`` with the integer timestep ``t`` as U-Net input.
ComfyUI's discrete (SDXL, EPS) models are driven with a sigma instead. With

    sigma_t = sqrt((1 - ac_t) / ac_t)          (``sigma_for_timesteps``)

and ``x = x0 + sigma_t * eps`` (``comfy_noisy_latents``), ``BaseModel.apply_model(x, sigma)`` feeds the U-Net

    x / sqrt(sigma_t**2 + 1) = sqrt(ac_t) * x0 + sqrt(1 - ac_t) * eps        (EPS.calculate_input)

because 1 / sqrt(sigma**2 + 1) = sqrt(ac) and sigma / sqrt(sigma**2 + 1) = sqrt(1 - ac). That is exactly kohya's
``add_noise``. The U-Net's timestep is ``model_sampling.timestep(sigma)``: the index of the nearest log-sigma in
ComfyUI's table, which maps our sigma back to the same integer t for every t in 0..999.

apply_model returns the denoised estimate ``x0_hat = x - eps_hat * sigma`` (EPS.calculate_denoised), so the model's
noise prediction is recovered as ``eps_hat = (x - x0_hat) / sigma`` (``x0_to_eps``) and the v-prediction as
``v_hat = sqrt(ac) * eps_hat - sqrt(1 - ac) * x0_hat = (eps_hat - sigma * x0_hat) / sqrt(sigma**2 + 1)``
(``eps_to_v`` / ``x0_to_v``). The x0/eps pair is consistent for any model parameterisation, so this also holds for a
V_PREDICTION model, whose calculate_denoised differs.

Numerics to keep in mind:
* Pass OUR sigma (from kohya's float32 alphas_cumprod), not ComfyUI's ``model_sampling.sigmas``: ComfyUI derives its
  table in float64 and the two differ by up to ~1.3e-5 relative (at t=0), which would change the U-Net input.
* Going through sigma costs a few float32 roundings (multiply by sqrt(sigma**2+1), divide again; subtract and divide
  by sigma to get eps back). At small sigma (t=0: sigma ~ 0.029) that amplifies to ~1e-6 relative in eps. If
  bit-exactness with kohya's U-Net input matters, feed kohya's noisy latents multiplied by sqrt(sigma**2+1)
  (``kohya_to_comfy_noisy``) and accept that residual rounding.
* ComfyUI casts the U-Net input to the model dtype inside apply_model and returns x0 in float32.
* With zero-terminal SNR, ac_999 = 0, so sigma_999 = inf: the sigma route cannot represent that timestep.
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


def _as_sigma(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample sigma [B] (or a scalar) broadcastable against ``like`` [B, ...]."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.numel() == 1:
        return sigma.reshape(())
    return _expand_to(sigma, like.ndim)


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


# --- kohya timestep <-> ComfyUI sigma -------------------------------------------------------------------------


def sigma_for_timesteps(
    schedule: DDPMSchedule, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ComfyUI-style sigma ``sqrt((1 - ac_t) / ac_t)`` for kohya timesteps, from kohya's float32 alphas_cumprod
    (evaluated in ``dtype``). Returned on the device of ``timesteps``, shape of ``timesteps``."""
    ac = schedule.alphas_cumprod[timesteps.long().cpu()].to(dtype)
    return (((1 - ac) / ac) ** 0.5).to(timesteps.device)


def timesteps_for_sigmas(schedule: DDPMSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of ``sigma_for_timesteps``: nearest entry in log-sigma, as ComfyUI's ModelSamplingDiscrete.timestep."""
    ac = schedule.alphas_cumprod
    log_table = (((1 - ac) / ac) ** 0.5).log()
    dists = sigmas.float().cpu().log().reshape(1, -1) - log_table[:, None]
    return dists.abs().argmin(dim=0).reshape(sigmas.shape).to(sigmas.device)


def comfy_noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The ``x`` ComfyUI's apply_model expects: ``latents + sigma * noise`` (EPS.noise_scaling)."""
    return latents + _as_sigma(sigma, latents) * noise


def kohya_to_comfy_noisy(noisy_kohya: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Turn kohya's ``add_noise`` output into the ``x`` whose apply_model input is that same tensor."""
    s = _as_sigma(sigma, noisy_kohya)
    return noisy_kohya * (s**2 + 1) ** 0.5


def comfy_to_kohya_noisy(x_noisy_comfy: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """What apply_model actually feeds the U-Net for ``x``: ``x / sqrt(sigma**2 + 1)`` (EPS.calculate_input)."""
    s = _as_sigma(sigma, x_noisy_comfy)
    return x_noisy_comfy / (s**2 + 1) ** 0.5


def x0_to_eps(x_noisy_comfy: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Noise prediction from apply_model's denoised output: ``(x - x0) / sigma`` (inverts EPS.calculate_denoised)."""
    return (x_noisy_comfy - x0) / _as_sigma(sigma, x_noisy_comfy)


def eps_to_v(eps: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v = sqrt(ac) * eps - sqrt(1 - ac) * x0, written with sigma: ``(eps - sigma * x0) / sqrt(sigma**2 + 1)``."""
    s = _as_sigma(sigma, eps)
    return (eps - s * x0) / (s**2 + 1) ** 0.5


def x0_to_v(x_noisy_comfy: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """v-prediction from apply_model's denoised output (``eps_to_v(x0_to_eps(x, x0, sigma), x0, sigma)``)."""
    return eps_to_v(x0_to_eps(x_noisy_comfy, x0, sigma), x0, sigma)


def eps_to_x0(x_noisy_comfy: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Denoised estimate from a noise prediction, as ComfyUI's EPS.calculate_denoised: ``x - eps * sigma``."""
    return x_noisy_comfy - eps * _as_sigma(sigma, x_noisy_comfy)
