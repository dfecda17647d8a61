"""kohya's masked loss: a per-pixel weight that says which pixels of an image count.

kohya (``library/custom_train_functions.apply_masked_loss``) takes the mask at the image's pixel size, in 0..1:
either an alpha mask (``alpha / 255``, after the image's own resize, crop and flip) or the RED channel of a
conditioning ("mask") image, which kohya has already normalised to -1..1 and maps back with ``x / 2 + 0.5``. It
gives the mask a channel axis, shrinks it to the loss's latent size with ``interpolate(mode="area")`` and multiplies
the element-wise loss with it, before the mean over C, H, W (trainer/objective/loss_weighting.compute_loss; kohya
quirk K22: the mean still counts the masked pixels).

The shrink depends only on the mask, so the latent cache does it once per image and flip
(``latent_loss_mask``); training multiplies (``apply_masked_loss``). Both run kohya's exact float32 operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def alpha_mask_weights(alpha: torch.Tensor) -> torch.Tensor:
    """8-bit alpha [..., H, W] -> float32 weights in 0..1, as kohya caches them (``alpha.astype(float32) / 255``)."""
    return alpha.to(torch.float32) / 255.0


def red_channel_weights(red: torch.Tensor) -> torch.Tensor:
    """8-bit red channel of a mask image [..., H, W] -> float32 weights, through kohya's exact round trip.

    kohya's IMAGE_TRANSFORMS (ToTensor, Normalize(0.5, 0.5)) make it -1..1; apply_masked_loss maps it back with
    ``/ 2 + 0.5``. The round trip is kept so the weights equal kohya's to the last bit.
    """
    normalised = (red.to(torch.float32) / 255.0 - 0.5) / 0.5
    return conditioning_image_weights(normalised)


def conditioning_image_weights(red_normalised: torch.Tensor) -> torch.Tensor:
    """kohya's mask from a conditioning image's red channel in -1..1: ``x / 2 + 0.5``."""
    return red_normalised.to(torch.float32) / 2 + 0.5


def latent_loss_mask(pixel_weights: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel weights [B, H, W] (or [H, W]) -> the loss mask [B, 1, h, w] at latent size (kohya: area interpolation)."""
    weights = pixel_weights.to(torch.float32)
    if weights.ndim == 2:
        weights = weights.unsqueeze(0)
    return F.interpolate(weights.unsqueeze(1), size=tuple(latent_size), mode="area")


def apply_masked_loss(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise loss [B, C, h, w] times the latent-size mask [B, 1, h, w] (kohya apply_masked_loss)."""
    if tuple(mask.shape[-2:]) != tuple(loss.shape[-2:]):
        raise ValueError(f"loss mask is {tuple(mask.shape[-2:])}, the loss {tuple(loss.shape[-2:])} (h, w)")
    return loss * mask.to(device=loss.device, dtype=loss.dtype)
