"""DDPM schedule vs kohya golden data (schedule.json), and the sigma identity ComfyUI's U-Net input relies on.

The schedule tables are built only from IEEE-exact float32 ops (linspace, x*x, 1-x, sequential cumprod, sqrt, /),
so they are compared bit-exactly. The sigma identity is checked in float64 (algebraic identity, ~1e-12); against
ComfyUI's own model_sampling in tests/host/run/test_training_reference.py.
"""

from __future__ import annotations

import pytest
import torch

from sdxl_lora_trainer.trainer.objective.ddpm_schedule import DDPMSchedule


def f32(values, shape=None) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64).to(torch.float32)
    return t.reshape(shape) if shape is not None else t


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    actual = actual.detach().cpu().to(torch.float32)
    assert actual.shape == expected.shape
    diff = (actual.double() - expected.double()).abs().max().item()
    assert torch.equal(actual, expected), f"max abs diff {diff}"


def assert_f32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """README tolerance for float32 tensors: ~1e-6 relative to the tensor's scale."""
    actual = actual.detach().cpu().to(torch.float32)
    assert actual.shape == expected.shape
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.fixture(scope="module")
def schedule() -> DDPMSchedule:
    return DDPMSchedule()


@pytest.fixture(scope="module")
def ztsnr() -> DDPMSchedule:
    return DDPMSchedule(zero_terminal_snr=True)


# --- golden: plain schedule ---------------------------------------------------------------------------------


def test_alphas_cumprod_full_sum_checksum(golden, schedule):
    g = golden("schedule")
    assert schedule.alphas_cumprod.dtype == torch.float32
    assert schedule.alphas_cumprod.shape == (1000,)
    assert schedule.alphas_cumprod.double().sum().item() == g["alphas_cumprod_full_sum"]


@pytest.mark.parametrize("field", ["alphas_cumprod", "betas", "all_snr"])
def test_tables_at_golden_timesteps(golden, schedule, field):
    g = golden("schedule")
    t = torch.tensor(g["timesteps"])
    assert_bit_exact(getattr(schedule, field)[t], f32(g[field]))


def test_all_snr_first5_last5(golden, schedule):
    g = golden("schedule")
    t = torch.tensor([0, 1, 2, 3, 4, 995, 996, 997, 998, 999])
    assert_bit_exact(schedule.all_snr[t], f32(g["all_snr_full_first5_last5"]))


def test_snr_lookup_follows_timestep_device_and_values(golden, schedule):
    g = golden("schedule")
    t = torch.tensor(g["timesteps"])
    assert_bit_exact(schedule.snr(t), f32(g["all_snr"]))


@pytest.mark.parametrize("field", ["noisy_latents", "v_target_get_velocity"])
def test_add_noise_example(golden, schedule, field):
    a = golden("schedule")["add_noise_example"]
    shape = a["shape"]
    latents, noise = f32(a["latents"], shape), f32(a["noise"], shape)
    t = torch.tensor(a["timesteps"])
    fn = schedule.add_noise if field == "noisy_latents" else schedule.get_velocity
    assert_f32_close(fn(latents, noise, t), f32(a[field], shape))


# --- golden: zero terminal SNR (quirk 7) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,golden_key",
    [
        ("alphas_cumprod", "alphas_cumprod"),
        ("betas", "betas"),
        ("all_snr", "all_snr_as_kohya_keeps_it"),
    ],
)
def test_zero_terminal_snr_tables(golden, ztsnr, field, golden_key):
    g = golden("schedule")
    t = torch.tensor(g["timesteps"])
    assert_bit_exact(getattr(ztsnr, field)[t], f32(g["zero_terminal_snr"][golden_key]))


def test_zero_terminal_snr_keeps_original_snr_not_recomputed(golden, ztsnr):
    """kohya computes all_snr before the rescale; the recomputed SNR is a different (unused) table."""
    g = golden("schedule")
    t = torch.tensor(g["timesteps"])
    z = g["zero_terminal_snr"]
    recomputed = f32(z["all_snr_recomputed_from_new_alphas_cumprod (NOT what kohya uses)"])
    ac = ztsnr.alphas_cumprod[t]
    ours_recomputed = (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2
    assert_f32_close(ours_recomputed, recomputed)
    assert not torch.equal(ztsnr.all_snr[t], recomputed)
    assert ztsnr.alphas_cumprod[-1].item() == 0.0
    assert ztsnr.alphas_cumprod[0].item() == pytest.approx(float(z["alphas_cumprod"][0]), rel=1e-7)


def test_zero_terminal_snr_add_noise_is_pure_noise_at_last_step(ztsnr):
    g = torch.Generator().manual_seed(7)
    latents, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    out = ztsnr.add_noise(latents, noise, torch.tensor([999, 999]))
    assert torch.equal(out, noise)


# --- kohya's add_noise is the U-Net input ComfyUI forms from sigma ------------------------------------------------


def test_comfy_input_equals_kohya_add_noise_float64(schedule):
    """sqrt(ac)*x + sqrt(1-ac)*n == (x + sigma*n) / sqrt(sigma**2 + 1): the identity apply_model relies on."""
    g = torch.Generator().manual_seed(1234)
    t = torch.tensor([0, 1, 2, 10, 100, 250, 500, 750, 998, 999])
    latents = torch.randn(len(t), 4, 8, 8, generator=g).double()
    noise = torch.randn(len(t), 4, 8, 8, generator=g).double()
    ac = schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    direct = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    s = torch.sqrt((1 - ac) / ac)  # ComfyUI's sigma for timestep t
    via_sigma_formula = (latents + s * noise) / torch.sqrt(s**2 + 1)
    torch.testing.assert_close(direct, via_sigma_formula, rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.add_noise(latents, noise, t), direct, rtol=0, atol=1e-12)
