"""Masked loss and prior_loss_weight vs kohya's own apply_masked_loss and process_batch chain (masked_loss.json)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_lora_trainer.trainer.objective.ddpm_schedule import DDPMSchedule
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings, compute_loss, reg_loss_weights
from sdxl_lora_trainer.trainer.objective.masked_loss import (
    alpha_mask_weights,
    apply_masked_loss,
    conditioning_image_weights,
    latent_loss_mask,
    red_channel_weights,
)

pytestmark = pytest.mark.unit


def tensor(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.float32).reshape(shape)


def assert_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 results: exact, or within 1e-6 relative per element (golden README)."""
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)


def _masked(loss: torch.Tensor, pixel_weights: torch.Tensor) -> torch.Tensor:
    return apply_masked_loss(loss, latent_loss_mask(pixel_weights, tuple(loss.shape[2:])))


@pytest.mark.parametrize("case", [0, 1])
def test_alpha_masks_match_kohya(golden, case):
    c = golden("masked_loss")["alpha_mask_cases"][case]
    loss = tensor(c["loss"], c["loss_shape"])
    masks = tensor(c["alpha_masks"], c["alpha_masks_shape"])
    expected = tensor(c["output"], c["loss_shape"])
    assert_values(_masked(loss, masks), expected)
    assert not torch.equal(expected, loss)  # the case masks something


@pytest.mark.parametrize("case", [0, 1])
def test_mask_images_use_the_red_channel_like_kohya(golden, case):
    c = golden("masked_loss")["conditioning_image_cases"][case]
    loss = tensor(c["loss"], c["loss_shape"])
    images = tensor(c["conditioning_images"], c["conditioning_images_shape"])
    expected = tensor(c["output"], c["loss_shape"])
    assert_values(_masked(loss, conditioning_image_weights(images[:, 0])), expected)
    # green / blue do not count: a different red channel gives a different result
    assert not torch.equal(_masked(loss, conditioning_image_weights(images[:, 1])), expected)


def test_8bit_masks_equal_kohyas_float_path():
    """What the cache computes from 8-bit pixels is what kohya computes from its tensors."""
    values = torch.arange(256, dtype=torch.uint8)
    kohya_alpha = torch.from_numpy(values.numpy().astype(np.float32) / 255.0)  # numpy, as kohya caches it
    assert torch.equal(alpha_mask_weights(values), kohya_alpha)
    # kohya: ToTensor (x/255), Normalize(0.5, 0.5), then apply_masked_loss's /2 + 0.5
    normalised = (values.to(torch.float32) / 255.0 - 0.5) / 0.5
    assert torch.equal(red_channel_weights(values), normalised / 2 + 0.5)


def test_mask_must_match_the_loss_size():
    with pytest.raises(ValueError, match="loss mask"):
        apply_masked_loss(torch.ones(1, 4, 8, 8), torch.ones(1, 1, 4, 4))


@pytest.mark.parametrize("case", [0, 1])
def test_whole_chain_with_prior_loss_weight_and_min_snr(golden, case):
    c = golden("masked_loss")["pipeline_cases"][case]
    assert (c["loss_type"], c["min_snr_gamma"], c["v_parameterization"]) == ("l2", 5.0, False)
    pred = tensor(c["model_pred"], c["shape"])
    target = tensor(c["target"], c["shape"])
    masks = tensor(c["alpha_masks"], c["alpha_masks_shape"])
    timesteps = torch.tensor(c["timesteps"])
    settings = LossSettings(min_snr_gamma=c["min_snr_gamma"], prior_loss_weight=c["prior_loss_weight"])
    schedule = DDPMSchedule()
    weights = reg_loss_weights(torch.tensor(c["is_reg"]), settings.prior_loss_weight)
    mask = latent_loss_mask(masks, tuple(c["shape"][2:]))
    loss = compute_loss(pred, target, timesteps, schedule, settings, weights, mask)
    expected = torch.tensor(c["final_loss_mean"], dtype=torch.float32)
    assert_values(loss.reshape(()), expected)
    # the per-sample values: the same chain without the final mean, sample by sample
    per_sample = [
        compute_loss(pred[i : i + 1], target[i : i + 1], timesteps[i : i + 1], schedule, settings, w, m)
        for i, (w, m) in enumerate(zip(weights.split(1), mask.split(1)))
    ]
    assert_values(torch.stack(per_sample), tensor(c["per_sample_loss"], [len(per_sample)]))


def test_prior_loss_weight_weights_only_reg_samples(golden):
    c = golden("masked_loss")["pipeline_cases"][0]
    assert c["is_reg"] == [False, True]
    weights = reg_loss_weights(torch.tensor(c["is_reg"]), 0.5)
    assert weights.tolist() == [1.0, 0.5]
    pred = tensor(c["model_pred"], c["shape"])
    target = tensor(c["target"], c["shape"])
    timesteps = torch.tensor(c["timesteps"])
    schedule = DDPMSchedule()
    settings = LossSettings(min_snr_gamma=5.0, prior_loss_weight=0.5)
    without = compute_loss(pred, target, timesteps, schedule, settings)
    weighted = compute_loss(pred, target, timesteps, schedule, settings, weights)
    assert weighted < without


def test_prior_loss_weight_is_checked():
    with pytest.raises(ValueError, match="prior_loss_weight"):
        LossSettings(prior_loss_weight=-1.0)
