"""The engine's training step against kohya's SDXL objective written from first principles.

The models are built under ``torch.inference_mode()`` and ``train`` is called under it, as ComfyUI's
loader nodes and executor do. The reference (tests/training_fixtures.py: ref_*, RefLoRA,
reference_step) uses plain torch on an ordinary-tensor twin of the tiny U-Net: scaled latents,
diffusers' scaled_linear alphas_cumprod, sqrt(abar)*x0 + sqrt(1-abar)*noise, y = pooled ++ cos-first
size embedding, eps or v target, MSE mean over CHW, per-timestep weights, mean. Noise and timesteps
are drawn in kohya's order from a generator seeded like the engine's private one.
"""

from __future__ import annotations

import pytest
import torch
import training_fixtures as tf

from sdxl_lora_trainer.trainer.comfyui import encoders as comfy_encoders
from sdxl_lora_trainer.trainer.comfyui import kernels as comfy_kernels
from sdxl_lora_trainer.trainer.comfyui import training as comfy_training
from sdxl_lora_trainer.trainer.network import build_network
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.objective.ddpm_schedule import DDPMSchedule
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.session import ComfyDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

UNET_ONLY = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)


@pytest.fixture(scope="module")
def pair():
    """One batch of two 64x64 images (batch size 2): (dataset, latents, text)."""
    ds = tf.make_dataset(2, batch_size=2)
    return (ds, *tf.sources(tf.inference_models(), ds))


def unet_inputs(batch: int = 2):
    model, clip, _ = tf.inference_models()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([17, 803][:batch])
    with torch.inference_mode():
        ctx, pooled = comfy_encoders.encode_text(clip, "a photo of a cat")
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * batch)
    y = torch.cat([pooled.repeat(batch, 1), tf.ref_size_embedding(time_ids)], dim=1)
    return x, t, ctx.repeat(batch, 1, 1), y


# -- 1. the freshly built network is an exact no-op ----------------------------------------------


def test_initial_network_leaves_the_unet_output_bit_identical():
    model, clip, _ = tf.inference_models()
    unet = model.model.diffusion_model
    x, t, ctx, y = unet_inputs()
    config = NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=4, conv_alpha=1.0)  # linear + conv, both TEs
    net = build_network(model, clip, config, seed=3)
    assert net.unet_loras and net.te1_loras and net.te2_loras
    assert all(torch.count_nonzero(lora.lora_up.weight) == 0 for lora in net.loras)
    assert all(torch.count_nonzero(lora.lora_down.weight) > 0 for lora in net.loras)

    with torch.inference_mode():  # how every other node runs the MODEL
        plain = unet(x, t.float(), context=ctx, y=y)
        with net.attach():
            attached = unet(x, t.float(), context=ctx, y=y)
    assert torch.equal(plain, attached)

    # the same inside train()'s context: trainable weights, SDPA, checkpointing, network in train mode
    with (
        torch.inference_mode(False),
        comfy_training.training_flag(),
        comfy_kernels.differentiable_attention(),
        comfy_training.training_models(model, None, False) as models,
        comfy_kernels.gradient_checkpointing(unet, True),
    ):
        denoiser = ComfyDenoiser(models.model, torch.float32)
        net.train()
        without = denoiser(x, t, ctx, y)
        with net.attach():
            with_net = denoiser(x, t, ctx, y)
    assert torch.equal(without, with_net)
    # the training path differs from sampling only by the attention kernel (SDPA vs sub-quadratic)
    torch.testing.assert_close(without, plain, rtol=1e-5, atol=1e-5)


def test_checkpointing_recomputes_each_block_kohya_checkpoints():
    """kohya's SDXL U-Net checkpoints each ResnetBlock2D, BasicTransformerBlock, Downsample2D and Upsample2D on its
    own; checkpointing a whole SpatialTransformer instead would keep all its (up to ten) blocks' activations for
    its backward at once."""
    unet = tf.inference_models()[0].model.diffusion_model
    classes = ("ResBlock", "BasicTransformerBlock", "Downsample", "Upsample")
    expected = [m for m in unet.modules() if type(m).__name__ in classes]
    assert {type(m).__name__ for m in expected} == set(classes)
    with comfy_kernels.gradient_checkpointing(unet, True) as count:
        overridden = [m for m in unet.modules() if "forward" in m.__dict__]
        assert count == len(expected) and overridden == expected
    assert not any("forward" in m.__dict__ for m in unet.modules())


# -- 2. loss and LoRA gradients of one batch = the first-principles reference ---------------------

CASES = {
    "eps": {},
    "eps_zero_init": {"zero_init": True},
    "eps_min_snr5": {"loss": LossSettings(min_snr_gamma=5)},
    "v": {"v": True},
    "v_min_snr5": {"v": True, "loss": LossSettings(min_snr_gamma=5)},
    "eps_noise_offset": {"noise": NoiseSettings(noise_offset=0.05)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_the_reference(case, pair, monkeypatch):
    ds, lat, txt = pair
    spec = CASES[case]
    loss_settings = spec.get("loss", LossSettings())
    noise_settings = spec.get("noise", NoiseSettings())
    initial = None if spec.get("zero_init") else tf.random_lora_weights(UNET_ONLY, seed=11)
    model = tf.inference_models(v_prediction=spec.get("v", False))[0]
    cap = tf.Capture(monkeypatch)
    result = tf.run_train(
        ds,
        lat,
        txt,
        UNET_ONLY,
        TrainConfig(max_train_steps=1, seed=7, max_grad_norm=0.0, loss=loss_settings, noise=noise_settings),
        model=model,
        initial_weights=initial,
    )
    assert result.prediction_type == ("v_prediction" if spec.get("v") else "epsilon")
    if initial is not None:
        assert all(torch.equal(cap.initial[k], v) for k, v in initial.items())
    items = tf.batch_keys(cap.batches[0], lat)
    assert sorted(k for k, _ in items) == sorted(img.key for img in ds.images)
    # 64x64 images in the 64x64 bucket: original size, no crop, target size (what the reference embeds)
    assert all(img.time_ids(False) == (64, 64, 0, 0, 64, 64) for img in ds.images)

    ref_loss, ref_grads, ref_t = tf.reference_step(
        items,
        ds,
        lat,
        txt,
        cap.initial,
        seed=7,
        noise_settings=noise_settings,
        loss_settings=loss_settings,
        v_pred=spec.get("v", False),
    )
    assert torch.equal(cap.results[0].timesteps.cpu(), ref_t)
    assert result.state.history[0].loss == pytest.approx(ref_loss.item(), rel=1e-5)

    engine = cap.step_grads[0]
    assert set(engine) == set(ref_grads)
    checked = 0
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        if name.endswith("lora_down.weight") and initial is None:
            assert scale == 0.0 and torch.count_nonzero(engine[name]) == 0  # lora_up = 0: no gradient reaches down
            continue
        assert scale > 0, name
        err = (engine[name] - ref).norm() / ref.norm()
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
        checked += 1
    assert checked >= len(ref_grads) // 2


# -- 3. the noisy latents: ComfyUI's model_sampling route and DDPMSchedule vs kohya's golden -------


def test_model_input_and_add_noise_match_kohyas_golden(golden):
    g = golden("schedule")
    ex = g["add_noise_example"]
    shape = ex["shape"]

    def tensor(key):
        return torch.tensor(ex[key], dtype=torch.float32).reshape(shape)

    latents, noise, want = tensor("latents"), tensor("noise"), tensor("noisy_latents")
    timesteps = torch.tensor(ex["timesteps"])
    schedule = DDPMSchedule()
    assert torch.equal(schedule.add_noise(latents, noise, timesteps), want)
    assert torch.equal(schedule.get_velocity(latents, noise, timesteps), tensor("v_target_get_velocity"))

    # The engine feeds add_noise's output and the integer t straight to the U-Net. ComfyUI's sampler forms
    # x = x0 + sigma*noise, which apply_model scales into the U-Net input, and maps sigma back to a timestep.
    # ComfyUI derives its sigmas in float64 from the same betas; kohya's table is float32, so the two routes
    # agree to float32 rounding of the schedule (~1e-5 relative at t=0), not bit for bit.
    sampling = tf.inference_models()[0].model.model_sampling
    sigma = sampling.sigma(timesteps)
    comfy_input = sampling.calculate_input(sigma, sampling.noise_scaling(sigma, noise, latents))
    torch.testing.assert_close(comfy_input, schedule.add_noise(latents, noise, timesteps), rtol=2e-5, atol=2e-6)
    every_t = torch.arange(schedule.num_train_timesteps)
    assert torch.equal(sampling.timestep(sampling.sigma(every_t)), every_t)

    # the reference's own tables are kohya's (so the reference above is trustworthy)
    ac = tf.ref_alphas_cumprod()
    assert torch.equal(ac[torch.tensor(g["timesteps"])], torch.tensor(g["alphas_cumprod"], dtype=torch.float32))
    emb = golden("time_ids")["size_embedding"]
    ref = tf.ref_size_embedding(torch.tensor([emb["time_ids"]]))
    torch.testing.assert_close(
        ref, torch.tensor(emb["values"], dtype=torch.float32).reshape(emb["shape"]), rtol=1e-5, atol=2e-6
    )
