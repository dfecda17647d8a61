"""Loss weights, huber thresholds, element-wise losses and the reduction order vs kohya golden data (schedule.json)."""

from __future__ import annotations

import pytest
import torch

from sdxl_lora_trainer.trainer.objective.ddpm_schedule import DDPMSchedule
from sdxl_lora_trainer.trainer.objective.loss_weighting import (
    LossSettings,
    add_v_prediction_like_loss,
    apply_debiased_estimation,
    apply_snr_weight,
    compute_loss,
    conditional_loss,
    debiased_estimation_weight,
    huber_c_for_timesteps,
    huber_c_if_needed,
    min_snr_weight,
    post_process_loss,
    scale_v_prediction_loss_like_noise_prediction,
    snr_scale,
)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


def assert_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Element-wise float32 results: exact, or within 1e-6 relative per element (README)."""
    actual = actual.detach().cpu()
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def schedule() -> DDPMSchedule:
    return DDPMSchedule()


@pytest.fixture(scope="module")
def ztsnr() -> DDPMSchedule:
    return DDPMSchedule(zero_terminal_snr=True)


@pytest.fixture()
def timesteps(golden) -> torch.Tensor:
    return torch.tensor(golden("schedule")["timesteps"])


# --- per-timestep weights (each golden entry is the function applied to loss = ones) -------------------------


@pytest.mark.parametrize(
    "key,gamma,v_pred",
    [
        ("gamma5_epsilon", 5, False),
        ("gamma5_v_pred", 5, True),
        ("gamma1_epsilon", 1, False),
        ("gamma1_v_pred", 1, True),
    ],
)
def test_min_snr_weight(golden, schedule, timesteps, key, gamma, v_pred):
    expected = f32(golden("schedule")["min_snr_weight"][key])
    ones = torch.ones(len(timesteps))
    assert_values(apply_snr_weight(ones, timesteps, schedule, gamma, v_pred), expected)
    assert_values(min_snr_weight(timesteps, schedule, gamma, v_pred), expected)


@pytest.mark.parametrize("key,v_pred", [("epsilon", False), ("v_pred", True)])
def test_debiased_estimation_weight(golden, schedule, timesteps, key, v_pred):
    expected = f32(golden("schedule")["debiased_estimation_weight"][key])
    ones = torch.ones(len(timesteps))
    assert_values(apply_debiased_estimation(ones, timesteps, schedule, v_pred), expected)
    assert_values(debiased_estimation_weight(timesteps, schedule, v_pred), expected)


def test_scale_v_prediction_loss_like_noise_prediction(golden, schedule, timesteps):
    expected = f32(golden("schedule")["scale_v_prediction_loss_like_noise_prediction_weight"])
    ones = torch.ones(len(timesteps))
    assert_values(scale_v_prediction_loss_like_noise_prediction(ones, timesteps, schedule), expected)
    assert_values(snr_scale(timesteps, schedule), expected)
    # quirk 8: clamped at snr 1000, so t=0 is 1000/1001, not alphas_cumprod[0]
    assert snr_scale(torch.tensor([0]), schedule).item() != schedule.alphas_cumprod[0].item()


def test_add_v_prediction_like_loss(golden, schedule, timesteps):
    g = golden("schedule")["add_v_prediction_like_loss"]
    loss = torch.full((len(timesteps),), g["loss_in"])
    assert_values(add_v_prediction_like_loss(loss, timesteps, schedule, g["v_pred_like_loss"]), f32(g["loss_out"]))


def test_post_process_loss_all_flags_in_kohya_order(golden, schedule, timesteps):
    g = golden("schedule")["combined_post_process_loss_all_flags_epsilon_gamma5"]
    assert g["order"] == [
        "apply_snr_weight(gamma=5, v=False)",
        "scale_v_prediction_loss_like_noise_prediction",
        "add_v_prediction_like_loss(0.1)",
        "apply_debiased_estimation(v=False)",
    ]
    settings = LossSettings(
        min_snr_gamma=5, scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.1, debiased_estimation_loss=True
    )
    loss = torch.full((len(timesteps),), g["loss_in"])
    assert_values(post_process_loss(loss, timesteps, schedule, settings), f32(g["loss_out"]))


def test_post_process_loss_without_flags_is_identity(schedule, timesteps):
    loss = torch.linspace(0.5, 2.0, len(timesteps))
    out = post_process_loss(loss, timesteps, schedule, LossSettings(min_snr_gamma=0, v_pred_like_loss=0.0))
    assert torch.equal(out, loss)


def test_post_process_loss_v_parameterization_uses_v_variants(golden, schedule, timesteps):
    g = golden("schedule")
    settings = LossSettings(v_parameterization=True, min_snr_gamma=5, debiased_estimation_loss=True)
    out = post_process_loss(torch.ones(len(timesteps)), timesteps, schedule, settings)
    expected = f32(g["min_snr_weight"]["gamma5_v_pred"]) * f32(g["debiased_estimation_weight"]["v_pred"])
    assert_values(out, expected)


# --- zero terminal SNR: weights keep the original SNR, huber 'snr' uses the new alphas_cumprod (quirk 7) -----


def test_zero_terminal_snr_min_snr_weight(golden, ztsnr, timesteps):
    expected = f32(golden("schedule")["zero_terminal_snr"]["min_snr_weight_gamma5_v_pred"])
    assert_values(apply_snr_weight(torch.ones(len(timesteps)), timesteps, ztsnr, 5, True), expected)


def test_zero_terminal_snr_huber_snr_schedule(golden, ztsnr, timesteps):
    expected = f32(golden("schedule")["zero_terminal_snr"]["huber_c_snr_schedule"])
    assert_values(huber_c_for_timesteps(timesteps, ztsnr, "snr", 0.1, 1.0), expected)


# --- huber c (quirk 9) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2], ids=lambda i: ["snr", "exponential", "constant"][i])
def test_huber_c_schedules(golden, schedule, timesteps, index):
    entry = golden("schedule")["huber_c"][index]
    assert entry["dtype"] == "torch.float32"
    out = huber_c_for_timesteps(timesteps, schedule, entry["huber_schedule"], entry["huber_c"], entry["huber_scale"])
    assert_values(out, f32(entry["values"]))


def test_huber_snr_schedule_ignores_scale_and_exponential_uses_it(schedule, timesteps):
    base = huber_c_for_timesteps(timesteps, schedule, "snr", 0.1, 1.0)
    assert torch.equal(huber_c_for_timesteps(timesteps, schedule, "snr", 0.1, 3.0), base)
    exp1 = huber_c_for_timesteps(timesteps, schedule, "exponential", 0.1, 1.0)
    exp3 = huber_c_for_timesteps(timesteps, schedule, "exponential", 0.1, 3.0)
    torch.testing.assert_close(exp3, 3 * exp1, rtol=1e-6, atol=0)
    # reaches huber_c at t=1000, so t=999 is slightly above it
    assert huber_c_for_timesteps(torch.tensor([999]), schedule, "exponential", 0.1, 1.0).item() > 0.1


def test_huber_c_only_for_huber_losses(schedule, timesteps):
    assert huber_c_if_needed(timesteps, schedule, LossSettings(loss_type="l2")) is None
    assert huber_c_if_needed(timesteps, schedule, LossSettings(loss_type="l1")) is None
    c = huber_c_if_needed(timesteps, schedule, LossSettings(loss_type="smooth_l1", huber_schedule="constant"))
    assert c is not None and c.shape == timesteps.shape


# --- element-wise losses ---------------------------------------------------------------------------------------


@pytest.fixture()
def loss_example(golden, schedule):
    c = golden("schedule")["conditional_loss_examples"]
    pred, target, t = f32(c["model_pred"]), f32(c["target"]), torch.tensor(c["timesteps"])
    return c, pred, target, t


def test_conditional_loss_example_huber_c(loss_example, schedule):
    c, _, _, t = loss_example
    assert_values(huber_c_for_timesteps(t, schedule, "snr", 0.1, 1.0), f32(c["huber_c_snr_schedule"]))


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1", "l2", "l1"])
def test_conditional_loss_elementwise(loss_example, loss_type):
    c, pred, target, _ = loss_example
    huber_c = f32(c["huber_c_snr_schedule"])
    assert_values(conditional_loss(pred, target, loss_type, huber_c, "none"), f32(c[loss_type]))


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1", "l2", "l1"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_conditional_loss_reductions(loss_example, loss_type, reduction):
    c, pred, target, _ = loss_example
    huber_c = f32(c["huber_c_snr_schedule"])
    elementwise = f32(c[loss_type])
    expected = elementwise.mean() if reduction == "mean" else elementwise.sum()
    torch.testing.assert_close(
        conditional_loss(pred, target, loss_type, huber_c, reduction), expected, rtol=1e-6, atol=0
    )


def test_huber_needs_c(loss_example):
    _, pred, target, _ = loss_example
    with pytest.raises(ValueError):
        conditional_loss(pred, target, "huber", None)
    with pytest.raises(ValueError):
        conditional_loss(pred, target, "l3")


# --- reduction order (process_batch) ---------------------------------------------------------------------------


def test_compute_loss_huber_on_golden_example(loss_example, schedule):
    """[B, ...] element-wise loss -> mean over non-batch dims -> (no weights) -> batch mean."""
    c, pred, target, t = loss_example
    out = compute_loss(pred, target, t, schedule, LossSettings(loss_type="huber", huber_schedule="snr"))
    expected = f32(c["huber"]).mean(dim=1).mean()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_compute_loss_order_spatial_mean_then_loss_weights_then_snr_weights(golden, schedule, timesteps):
    g = golden("schedule")
    gen = torch.Generator().manual_seed(11)
    b = len(timesteps)
    pred = torch.randn(b, 4, 6, 5, generator=gen)
    target = torch.randn(b, 4, 6, 5, generator=gen)
    loss_weights = torch.linspace(0.5, 2.0, b)
    snr_w = f32(g["min_snr_weight"]["gamma5_epsilon"])
    per_sample = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    expected = (per_sample * loss_weights.double() * snr_w.double()).mean()
    out = compute_loss(pred, target, timesteps, schedule, LossSettings(min_snr_gamma=5), loss_weights)
    assert out.dtype == torch.float32 and out.ndim == 0
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


def test_compute_loss_casts_half_inputs_to_float(schedule):
    gen = torch.Generator().manual_seed(5)
    pred = torch.randn(2, 4, 3, 3, generator=gen).half()
    target = torch.randn(2, 4, 3, 3, generator=gen).half()
    out = compute_loss(pred, target, torch.tensor([3, 600]), schedule, LossSettings())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ((pred.float() - target.float()) ** 2).mean(), rtol=1e-6, atol=0)


# --- settings ------------------------------------------------------------------------------------------------------


def test_settings_reject_unknown_names():
    with pytest.raises(ValueError):
        LossSettings(loss_type="huberish")
    with pytest.raises(ValueError):
        LossSettings(huber_schedule="linear")


def test_settings_validate_kohya_combinations():
    with pytest.raises(ValueError):
        LossSettings(scale_v_pred_loss_like_noise_pred=True).validate()
    with pytest.raises(ValueError):
        LossSettings(v_parameterization=True, v_pred_like_loss=0.1).validate()
    LossSettings(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True).validate()
    LossSettings(v_pred_like_loss=0.1, min_snr_gamma=5).validate()
