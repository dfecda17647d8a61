"""Noise pipeline vs kohya golden data (noise.json): values AND the order/number of RNG draws.

noise.json was made after ``torch.manual_seed(S)`` / ``random.seed(R)``; on CPU a private
``torch.Generator().manual_seed(S)`` / ``random.Random(R)`` give the same streams, so the same seeds reproduce it.
The draw order is checked by replaying the golden ``random_calls_in_order`` on fresh RNGs and comparing the final
RNG states with the ones our code leaves behind.
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from sdxl_lora_trainer.trainer.objective.ddpm_schedule import DDPMSchedule
from sdxl_lora_trainer.trainer.objective.noise import (
    NoiseSettings,
    apply_noise_offset,
    pyramid_noise_like,
    sample_noise_and_timesteps,
    sample_timesteps,
    timestep_range,
)


def f32(values, shape=None) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64).to(torch.float32)
    return t.reshape(shape) if shape is not None else t


def assert_f32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """README tolerance for float32 tensors: exact, or ~1e-6 relative to the tensor's scale."""
    actual = actual.detach().cpu()
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    if not torch.equal(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.fixture()
def inputs(golden):
    n = golden("noise")
    shape = tuple(n["shape"])
    return shape, f32(n["latents"], shape), f32(n["noise_in"], shape)


@pytest.fixture(scope="module")
def schedule() -> DDPMSchedule:
    return DDPMSchedule()


_INTS = re.compile(r"-?\d+")


def replay(calls: list[str], shape: tuple[int, ...], torch_seed: int, py_seed: int | None):
    """Re-issue the recorded kohya calls on fresh private RNGs; check recorded values; return the RNGs."""
    gen = torch.Generator().manual_seed(torch_seed)
    rng = random.Random(py_seed) if py_seed is not None else random.Random()
    for call in calls:
        head, _, value = call.partition(" -> ")
        if head == "torch.randn_like(latents)":
            torch.randn(shape, generator=gen)
        elif head.startswith("torch.randn("):
            head = head.replace("B", str(shape[0])).replace("C", str(shape[1]))  # 'torch.randn((B, C, 1, 1))'
            torch.randn(tuple(int(v) for v in _INTS.findall(head)), generator=gen)
        elif head.startswith("torch.rand("):
            drawn = torch.rand(1, generator=gen)
            assert drawn.item() == float(value), call
        elif head.startswith("torch.randint("):
            low, high, *size = (int(v) for v in _INTS.findall(head))
            torch.randint(low, high, tuple(size), generator=gen)
        elif head == "random.random()":
            assert rng.random() == float(value), call
        else:
            raise AssertionError(f"unknown recorded call {call!r}")
    return gen, rng


# --- apply_noise_offset -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["apply_noise_offset", "apply_noise_offset_adaptive"])
def test_apply_noise_offset(golden, inputs, key):
    d = golden("noise")[key]
    shape, latents, noise_in = inputs
    gen = torch.Generator().manual_seed(d["torch_manual_seed"])
    noise = noise_in.clone()
    out = apply_noise_offset(latents, noise, d["noise_offset"], d["adaptive_noise_scale"], gen)
    assert_f32_close(out, f32(d["output"], shape))
    assert torch.equal(noise, noise_in), "apply_noise_offset must not modify its input"
    ref_gen, _ = replay(d["random_calls_in_order"], shape, d["torch_manual_seed"], None)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_apply_noise_offset_draws_golden_randn(golden, inputs):
    d = golden("noise")["apply_noise_offset"]
    shape, latents, noise_in = inputs
    drawn = f32(d["offset_randn_drawn"], (shape[0], shape[1], 1, 1))
    zero_noise = torch.zeros_like(noise_in)
    gen = torch.Generator().manual_seed(d["torch_manual_seed"])
    out = apply_noise_offset(latents, zero_noise, 1.0, None, gen)
    assert torch.equal(out, drawn.expand(shape))


def test_adaptive_offset_per_channel(golden, inputs):
    d = golden("noise")["apply_noise_offset_adaptive"]
    shape, latents, noise_in = inputs
    key = next(k for k in d if k.startswith("effective_offset_per_BC"))
    effective = f32(d[key], (shape[0], shape[1], 1, 1))
    drawn = f32(golden("noise")["apply_noise_offset"]["offset_randn_drawn"], (shape[0], shape[1], 1, 1))
    expected = noise_in + effective * drawn
    gen = torch.Generator().manual_seed(d["torch_manual_seed"])
    out = apply_noise_offset(latents, noise_in.clone(), d["noise_offset"], d["adaptive_noise_scale"], gen)
    assert_f32_close(out, expected)


def test_adaptive_offset_is_clamped_at_zero(inputs):
    shape, latents, _ = inputs
    gen = torch.Generator().manual_seed(0)
    out = apply_noise_offset(latents, torch.zeros(shape), 0.0, -1000.0, gen)
    assert torch.equal(out, torch.zeros(shape))


def test_noise_offset_none_is_a_no_op(inputs):
    _, latents, noise_in = inputs
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert apply_noise_offset(latents, noise_in, None, None, gen) is noise_in
    assert torch.equal(gen.get_state(), state)


# --- pyramid noise (quirk 17) -------------------------------------------------------------------------------------


def test_pyramid_noise_like(golden, inputs):
    d = golden("noise")["pyramid_noise_like"]
    shape, _, noise_in = inputs
    gen = torch.Generator().manual_seed(d["torch_manual_seed"])
    rng = random.Random(d["python_random_seed"])
    noise = noise_in.clone()
    out = pyramid_noise_like(noise, gen, rng, d["iterations"], d["discount"])
    assert_f32_close(out, f32(d["output"], shape))
    ref_gen, ref_rng = replay(d["random_calls_in_order"], shape, d["torch_manual_seed"], d["python_random_seed"])
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    assert rng.getstate() == ref_rng.getstate()


def test_pyramid_noise_modifies_input_in_place(golden, inputs):
    d = golden("noise")["pyramid_noise_like"]
    assert d["input_noise_is_modified_in_place"] is True
    _, _, noise_in = inputs
    noise = noise_in.clone()
    out = pyramid_noise_like(
        noise,
        torch.Generator().manual_seed(d["torch_manual_seed"]),
        random.Random(d["python_random_seed"]),
        d["iterations"],
        d["discount"],
    )
    assert not torch.equal(noise, noise_in)
    # the in-place sum, divided by its own unbiased std over the WHOLE tensor, is the output
    torch.testing.assert_close(out, noise / noise.std(unbiased=True), rtol=0, atol=0)


def test_pyramid_uses_python_rng_for_level_factor(golden, inputs):
    d = golden("noise")["pyramid_noise_like"]
    _, _, noise_in = inputs
    outs = []
    for py_seed in (d["python_random_seed"], d["python_random_seed"] + 1):
        gen = torch.Generator().manual_seed(d["torch_manual_seed"])
        outs.append(pyramid_noise_like(noise_in.clone(), gen, random.Random(py_seed), d["iterations"], d["discount"]))
    assert not torch.equal(outs[0], outs[1])


# --- full pipeline (get_noise_noisy_latents_and_timesteps) --------------------------------------------------------


def _pipeline_ids():
    from golden_data import load_golden  # the tests folder is on sys.path (conftest)

    entries = load_golden("noise")["get_noise_noisy_latents_and_timesteps"]
    names = []
    for i, e in enumerate(entries):
        on = [k for k, v in e["args"].items() if v not in (None, False) and k != "multires_noise_discount"]
        names.append(f"{i}:" + ("+".join(on) if on else "defaults"))
    return names


PIPELINE_IDS = _pipeline_ids()


@pytest.mark.parametrize("index", range(len(PIPELINE_IDS)), ids=PIPELINE_IDS)
@pytest.mark.parametrize("field", ["timesteps", "noise", "noisy_latents", "rng_order"])
def test_get_noise_noisy_latents_and_timesteps(golden, inputs, schedule, index, field):
    entries = golden("noise")["get_noise_noisy_latents_and_timesteps"]
    assert len(entries) == len(PIPELINE_IDS)
    d = entries[index]
    shape, latents, _ = inputs
    settings = NoiseSettings(**d["args"])
    gen = torch.Generator().manual_seed(d["torch_manual_seed"])
    rng = random.Random(d["python_random_seed"])
    latents_before = latents.clone()
    result = sample_noise_and_timesteps(latents, settings, gen, rng, schedule=schedule)
    assert torch.equal(latents, latents_before)
    if field == "timesteps":
        assert result.timesteps.dtype == torch.int64
        assert result.timesteps.tolist() == d["timesteps"]
    elif field == "rng_order":
        ref_gen, ref_rng = replay(d["random_calls_in_order"], shape, d["torch_manual_seed"], d["python_random_seed"])
        assert torch.equal(gen.get_state(), ref_gen.get_state())
        assert rng.getstate() == ref_rng.getstate()
    else:
        assert_f32_close(getattr(result, field), f32(d[field], shape))


def test_pipeline_leaves_global_rngs_alone(golden, inputs, schedule):
    d = golden("noise")["get_noise_noisy_latents_and_timesteps"][2]
    _, latents, _ = inputs
    torch.manual_seed(123)
    random.seed(456)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    sample_noise_and_timesteps(
        latents, NoiseSettings(**d["args"]), torch.Generator().manual_seed(1), random.Random(2), schedule=schedule
    )
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state


def test_pipeline_ip_noise_not_in_target(inputs, schedule):
    """The returned target excludes the ip-noise part, but the noisy latents include it."""
    _, latents, _ = inputs
    base = NoiseSettings()
    with_ip = NoiseSettings(ip_noise_gamma=0.1)
    a = sample_noise_and_timesteps(latents, base, torch.Generator().manual_seed(9), random.Random(0), schedule=schedule)
    b = sample_noise_and_timesteps(
        latents, with_ip, torch.Generator().manual_seed(9), random.Random(0), schedule=schedule
    )
    assert torch.equal(a.noise, b.noise)
    assert torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.noisy_latents, b.noisy_latents)
    assert torch.equal(a.noisy_latents, schedule.add_noise(latents, a.noise, a.timesteps))


def test_no_randint_when_min_equals_max(inputs, schedule):
    """Quirk 18: min == max means t = max for all samples and no torch.randint draw."""
    shape, latents, _ = inputs
    gen = torch.Generator().manual_seed(4004)
    result = sample_noise_and_timesteps(
        latents, NoiseSettings(min_timestep=500, max_timestep=500), gen, random.Random(0), schedule=schedule
    )
    assert result.timesteps.tolist() == [500] * shape[0]
    ref_gen, _ = replay(["torch.randn_like(latents)"], shape, 4004, None)
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    assert torch.equal(result.noise, torch.randn(shape, generator=torch.Generator().manual_seed(4004)))


def test_zero_values_mean_off_like_kohya(inputs, schedule):
    shape, latents, _ = inputs
    gen = torch.Generator().manual_seed(77)
    settings = NoiseSettings(noise_offset=0.0, multires_noise_iterations=0, ip_noise_gamma=0.0)
    sample_noise_and_timesteps(latents, settings, gen, random.Random(0), schedule=schedule)
    ref_gen, _ = replay(["torch.randn_like(latents)", "torch.randint(0, 1000, (2,))"], shape, 77, None)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_timestep_range_defaults_and_bounds():
    assert timestep_range(NoiseSettings(), 1000) == (0, 1000)
    assert timestep_range(NoiseSettings(min_timestep=100, max_timestep=900), 1000) == (100, 900)
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(4096, 100, 102, gen)
    assert set(t.tolist()) == {100, 101}
    # min > max: kohya uses max for every sample, without a draw
    assert sample_timesteps(3, 700, 300, gen).tolist() == [300, 300, 300]
    with pytest.raises(ValueError):
        sample_timesteps(2, 0, 1001, gen)
    with pytest.raises(ValueError):
        sample_timesteps(2, 1000, 1000, gen)


def test_settings_validation():
    with pytest.raises(ValueError):
        NoiseSettings(adaptive_noise_scale=0.01)
    with pytest.raises(ValueError):
        NoiseSettings(min_timestep=-1)
    NoiseSettings(noise_offset=0.05, adaptive_noise_scale=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_stream_for_cuda_latents(golden, inputs, schedule):
    d = golden("noise")["get_noise_noisy_latents_and_timesteps"][2]
    shape, latents, _ = inputs
    settings = NoiseSettings(**d["args"])
    gen = torch.Generator().manual_seed(d["torch_manual_seed"])
    rng = random.Random(d["python_random_seed"])
    result = sample_noise_and_timesteps(latents.cuda(), settings, gen, rng, schedule=schedule)
    assert result.noise.device.type == "cuda"
    assert result.timesteps.tolist() == d["timesteps"]
    torch.testing.assert_close(result.noise.cpu(), f32(d["noise"], shape), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.noisy_latents.cpu(), f32(d["noisy_latents"], shape), rtol=1e-5, atol=1e-5)
