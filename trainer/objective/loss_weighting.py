"""kohya's SDXL training loss: element-wise loss types, huber thresholds and per-timestep loss weights.

Reduction order (train_network.NetworkTrainer.process_batch), reproduced by ``compute_loss``:

1. element-wise loss ``conditional_loss(pred.float(), target.float(), loss_type, huber_c, reduction="none")``
   (huber_c is per sample, from ``huber_c_for_timesteps``);
2. times the latent-size loss mask, when the batch has one (kohya masked_loss / alpha_mask,
   trainer/objective/masked_loss.py);
3. mean over every non-batch dim (C, H, W) -> one value per sample;
4. times the per-sample ``loss_weights`` (kohya's dataset sets ``prior_loss_weight`` for reg images, 1.0 otherwise:
   ``reg_loss_weights``);
5. ``post_process_loss``: min-SNR, scale-v, v-pred-like, debiased, in that order, each only when enabled;
6. mean over the batch.

The weights are per sample, so applying them after the spatial mean equals applying them before it.

SNR conventions differ on purpose (kohya quirk K8): min-SNR uses the raw ``all_snr`` (1175.44 at t=0), while
debiased / scale-v / v-pred-like clamp it at 1000 first. Under zero-terminal SNR all of them still use the ORIGINAL
schedule's SNR (kohya quirk K7), but the huber 'snr' schedule uses the rescaled alphas_cumprod.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ddpm_schedule import DDPMSchedule
from .masked_loss import apply_masked_loss

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
_SNR_CLAMP = 1000.0  # kohya: "if timestep is 0, snr_t is inf, so limit it to 1000"


@dataclass(frozen=True)
class LossSettings:
    """The loss-related kohya arguments (same names and defaults as sd-scripts' argparse).

    0 turns a weighting off, as in kohya (min_snr_gamma, v_pred_like_loss); it is stored as None, kohya's default,
    so a widget left at 0 and an unset kohya argument are the same setting (and write the same metadata).
    """

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    v_parameterization: bool = False
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    prior_loss_weight: float = 1.0  # kohya --prior_loss_weight: the loss weight of regularization (is_reg) images

    def __post_init__(self) -> None:
        for name in ("min_snr_gamma", "v_pred_like_loss"):
            if not getattr(self, name):
                object.__setattr__(self, name, None)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise ValueError(f"huber_schedule must be one of {HUBER_SCHEDULES}, got {self.huber_schedule!r}")
        if not math.isfinite(self.prior_loss_weight) or self.prior_loss_weight < 0:
            raise ValueError(f"prior_loss_weight must be a number >= 0, got {self.prior_loss_weight!r}")

    def validate(self) -> None:
        """The combinations kohya's verify_training_args rejects. Not called by the math functions themselves,
        which (like kohya's) accept any combination; call it where user settings enter the pack."""
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise ValueError("scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization")
        if self.v_pred_like_loss and self.v_parameterization:
            raise ValueError("v_pred_like_loss cannot be enabled with v_parameterization")


# --- per-timestep weights -------------------------------------------------------------------------------------


def _clamped_snr(timesteps: torch.Tensor, schedule: DDPMSchedule) -> torch.Tensor:
    snr = schedule.snr(timesteps)
    return torch.minimum(snr, torch.ones_like(snr) * _SNR_CLAMP)


def min_snr_weight(
    timesteps: torch.Tensor, schedule: DDPMSchedule, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    """Min-SNR-gamma weight: min(snr, gamma)/snr (eps) or min(snr, gamma)/(snr+1) (v). Raw, unclamped SNR."""
    snr = schedule.snr(timesteps)
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    denominator = snr + 1 if v_prediction else snr
    return torch.div(min_snr_gamma, denominator).float()


def snr_scale(timesteps: torch.Tensor, schedule: DDPMSchedule) -> torch.Tensor:
    """snr/(snr+1) with snr clamped at 1000 (kohya get_snr_scale); equals alphas_cumprod except at clamped t."""
    snr = _clamped_snr(timesteps, schedule)
    return snr / (snr + 1)


def debiased_estimation_weight(
    timesteps: torch.Tensor, schedule: DDPMSchedule, v_prediction: bool = False
) -> torch.Tensor:
    """Debiased estimation: 1/sqrt(snr) (eps) or 1/(snr+1) (v), snr clamped at 1000."""
    snr = _clamped_snr(timesteps, schedule)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


def apply_snr_weight(
    loss: torch.Tensor, timesteps: torch.Tensor, schedule: DDPMSchedule, gamma: float, v_prediction: bool = False
) -> torch.Tensor:
    return loss * min_snr_weight(timesteps, schedule, gamma, v_prediction).to(loss.device)


def scale_v_prediction_loss_like_noise_prediction(
    loss: torch.Tensor, timesteps: torch.Tensor, schedule: DDPMSchedule
) -> torch.Tensor:
    return loss * snr_scale(timesteps, schedule).to(loss.device)


def add_v_prediction_like_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, schedule: DDPMSchedule, v_pred_like_loss: float
) -> torch.Tensor:
    """loss + loss/scale * v_pred_like_loss: adds a v-prediction-shaped term to an eps loss (same op order as kohya)."""
    scale = snr_scale(timesteps, schedule).to(loss.device)
    return loss + loss / scale * v_pred_like_loss


def apply_debiased_estimation(
    loss: torch.Tensor, timesteps: torch.Tensor, schedule: DDPMSchedule, v_prediction: bool = False
) -> torch.Tensor:
    return debiased_estimation_weight(timesteps, schedule, v_prediction).to(loss.device) * loss


def post_process_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, schedule: DDPMSchedule, settings: LossSettings
) -> torch.Tensor:
    """Per-sample loss [B] -> weighted per-sample loss [B], in NetworkTrainer.post_process_loss's order.

    A flag counts as enabled by Python truthiness, as in kohya (gamma 0 or v_pred_like_loss 0 mean off).
    """
    if settings.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, schedule, settings.min_snr_gamma, settings.v_parameterization)
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, schedule)
    if settings.v_pred_like_loss:
        loss = add_v_prediction_like_loss(loss, timesteps, schedule, settings.v_pred_like_loss)
    if settings.debiased_estimation_loss:
        loss = apply_debiased_estimation(loss, timesteps, schedule, settings.v_parameterization)
    return loss


# --- huber threshold and element-wise losses ----------------------------------------------------------------


def huber_c_for_timesteps(
    timesteps: torch.Tensor,
    schedule: DDPMSchedule,
    huber_schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
) -> torch.Tensor:
    """Per-sample huber threshold (kohya get_huber_threshold_if_needed), float32, on the device of ``timesteps``.

    'snr': (1 - c)/(1 + sigma_t)**2 + c with sigma_t = sqrt((1-ac)/ac); ignores huber_scale (kohya quirk K9) and uses
    the (possibly zero-terminal-rescaled) alphas_cumprod. 'exponential': huber_scale * exp(ln(c) * t / 1000), which
    reaches c at t=1000, not 999. 'constant': c * huber_scale.
    """
    timesteps = timesteps.long()
    if huber_schedule == "exponential":
        alpha = -math.log(huber_c) / schedule.num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if huber_schedule == "snr":
        ac = torch.index_select(schedule.table("alphas_cumprod", timesteps.device), 0, timesteps)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if huber_schedule == "constant":
        return torch.full((timesteps.shape[0],), huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"unknown huber_schedule {huber_schedule!r}")


def huber_c_if_needed(timesteps: torch.Tensor, schedule: DDPMSchedule, settings: LossSettings) -> torch.Tensor | None:
    """The huber threshold when the loss type uses one, else None (as kohya)."""
    if settings.loss_type not in ("huber", "smooth_l1"):
        return None
    return huber_c_for_timesteps(timesteps, schedule, settings.huber_schedule, settings.huber_c, settings.huber_scale)


def conditional_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str,
    huber_c: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    """kohya's loss by type. huber = 2c(sqrt(d**2 + c**2) - c) (~ c*|d| for large d, d**2 for small);
    smooth_l1 = 2(sqrt(d**2 + c**2) - c). ``huber_c`` is per sample [B] (or one value), broadcast over the rest."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction=reduction)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction=reduction)
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type!r} needs huber_c")
        c = torch.as_tensor(huber_c, device=pred.device)
        c = c.view(-1, *([1] * (pred.ndim - 1)))
        root = torch.sqrt((pred - target) ** 2 + c**2) - c
        loss = 2 * c * root if loss_type == "huber" else 2 * root
        if reduction == "mean":
            return torch.mean(loss)
        if reduction == "sum":
            return torch.sum(loss)
        return loss
    raise ValueError(f"unsupported loss_type {loss_type!r}")


def reg_loss_weights(is_reg: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """kohya's per-sample ``loss_weights``: prior_loss_weight for reg images, 1.0 for the others (float32)."""
    return torch.tensor([prior_loss_weight if bool(r) else 1.0 for r in is_reg.tolist()], dtype=torch.float32)


def compute_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: DDPMSchedule,
    settings: LossSettings,
    loss_weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar training loss of one batch, reduced exactly as kohya's process_batch (see module docstring).

    ``loss_mask``: [B, 1, h, w] at latent size (trainer/objective/masked_loss.latent_loss_mask), or None.
    """
    huber_c = huber_c_if_needed(timesteps, schedule, settings)
    loss = conditional_loss(pred.float(), target.float(), settings.loss_type, huber_c, reduction="none")
    if loss_mask is not None:
        loss = apply_masked_loss(loss, loss_mask)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.device)
    loss = post_process_loss(loss, timesteps, schedule, settings)
    return loss.mean()
