"""Training with ComfyUI's models on the stand-in accelerator gives exactly the CPU run's LoRA.

Each test trains the tiny SDXL twice with the same seed: on the CPU, and with MODEL/CLIP/VAE loading to the
stand-in device (caches, generators and the dataset stay on the host, as in ComfyUI). Any tensor the pack leaves
on the wrong device raises there as it would on CUDA; equal LoRA bytes show that nothing else changed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import training_fixtures as tf
from device_helpers import CPU, assert_same_lora, data, lora_bytes, models_on
from standin_device import DEVICE

from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)
CONFIG = TrainConfig(max_train_steps=2, learning_rate=1e-2, seed=5)


def train(models, ds, lat, txt, net=NET, config=CONFIG, **kwargs):
    model, clip, _ = models
    with torch.inference_mode():  # how ComfyUI runs every node
        return tf.train(model, clip, ds, lat, txt, net, config, **kwargs)


def assert_matches_cpu(ds, lat, txt, net=NET, config=CONFIG, v_prediction=False, **device_kwargs):
    want = train(models_on(CPU, v_prediction=v_prediction), ds, lat, txt, net, config)
    got = train(models_on(DEVICE, v_prediction=v_prediction, **device_kwargs), ds, lat, txt, net, config)
    assert_same_lora(lora_bytes(got), lora_bytes(want))
    assert [r.loss for r in got.state.history] == [r.loss for r in want.state.history]
    return got


# -- the objective: every loss and noise option ----------------------------------------------------

OPTIONS = {
    "l1": {"loss": LossSettings(loss_type="l1")},
    "huber_snr": {"loss": LossSettings(loss_type="huber", huber_schedule="snr")},
    "huber_exponential": {"loss": LossSettings(loss_type="huber", huber_schedule="exponential")},
    "smooth_l1_constant": {"loss": LossSettings(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.2)},
    "min_snr_debiased_vlike": {
        "loss": LossSettings(min_snr_gamma=5.0, debiased_estimation_loss=True, v_pred_like_loss=0.1)
    },
    "noise_offset_adaptive": {
        "noise": NoiseSettings(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01)
    },
    "multires": {"noise": NoiseSettings(multires_noise_iterations=3, multires_noise_discount=0.3)},
    "ip_noise_timestep_range": {
        "noise": NoiseSettings(
            ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=700
        )
    },
    "accumulation_clipping_max_norm_cosine": {
        "gradient_accumulation_steps": 2,
        "max_grad_norm": 0.5,
        "scale_weight_norms": 0.01,
        "lr_scheduler": "cosine",
    },
    "bf16": {"train_dtype": "bf16"},
    "full_bf16": {"train_dtype": "bf16", "full_bf16": True},
    "fp16_grad_scaler": {"train_dtype": "fp16"},
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_loss_and_noise_options_match_the_cpu(comfy_gpu, case):
    comfy_gpu()
    assert_matches_cpu(*data(), config=replace(CONFIG, **OPTIONS[case]))


def test_v_prediction_with_its_loss_options_matches_the_cpu(comfy_gpu):
    comfy_gpu()
    loss = LossSettings(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, debiased_estimation_loss=True)
    assert_matches_cpu(*data(), config=replace(CONFIG, loss=loss), v_prediction=True)


def test_text_encoder_training_with_live_captions_matches_the_cpu(comfy_gpu):
    """CLIP-L/CLIP-G LoRA trained through ComfyUI's CLIP on the device, captions shuffled and encoded live."""
    comfy_gpu()
    net = replace(NET, train_te1=True, train_te2=True, conv_dim=2, conv_alpha=1.0)
    got = assert_matches_cpu(*data(shuffle=True), net=net)
    assert got.network.te1_loras and got.network.te2_loras


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_lycoris_networks_match_the_cpu(comfy_gpu, algo):
    comfy_gpu()
    net = replace(NET, algo=algo, conv_dim=2, conv_alpha=1.0)
    assert_matches_cpu(*data(), net=net, config=replace(CONFIG, scale_weight_norms=0.01))


def test_gpu_only_batches_mix_cached_and_live_encodings(comfy_gpu):
    """--gpu-only: ComfyUI returns CLIP encodings on the GPU while the text cache holds them on the host; one batch
    holds both (one image's caption is shuffled, the other's is cached)."""
    ds = tf.make_dataset(2, batch_size=2, captions=["red, cube, shiny", "blue, ball, matte"])
    part = ds.parts[0]
    shuffled = replace(part.images[0], caption_options=CaptionOptions(shuffle_caption=True))
    ds = replace(ds, parts=(replace(part, images=(shuffled, *part.images[1:])),))
    lat, txt = tf.sources(tf.inference_models(), ds)  # the caches hold host tensors
    assert all(t.device == CPU for pair in txt.table.values() for t in pair)
    comfy_gpu(gpu_only=True, vram_state="HIGH_VRAM")
    assert_matches_cpu(ds, lat, txt, gpu_only=True)


def test_kohya_long_caption_layout_on_the_device_matches_the_cpu(comfy_gpu):
    """max_token_length 225 under --gpu-only: live captions are encoded row by row by ComfyUI's CLIP on the device
    and stitched there (227 positions), cached ones come from the host; one batch holds both."""
    from sdxl_lora_trainer.trainer.cache.stores import MemoryStore
    from sdxl_lora_trainer.trainer.cache.text import TextCache
    from sdxl_lora_trainer.trainer.data.token_length import TokenLength

    long = ", ".join(f"tag{i} word{i}" for i in range(30))
    ds = tf.make_dataset(2, batch_size=2, captions=[long, long + ", blue"])
    part = ds.parts[0]
    shuffled = replace(part.images[0], caption_options=CaptionOptions(shuffle_caption=True))
    ds = replace(ds, parts=(replace(part, images=(shuffled, *part.images[1:])),))
    lat, _ = tf.sources(tf.inference_models(), ds)
    with torch.inference_mode():
        text = TextCache.build(ds, tf.inference_models()[1], store=MemoryStore(64), token_length=TokenLength(225))
    assert text.live_indices == [0] and text.encoding(ds.images[1])[0].shape[0] == 227
    comfy_gpu(gpu_only=True, vram_state="HIGH_VRAM")
    assert_matches_cpu(ds, lat, text, config=replace(CONFIG, max_train_steps=1), gpu_only=True)


def test_masked_loss_and_reg_images_match_the_cpu(comfy_gpu):
    """Loss masks (host tensors in the latent cache) and a reg sample with prior_loss_weight reach the device's loss."""
    ds, lat, txt = data()
    part = ds.parts[0]
    reg = replace(part.images[1], item=replace(part.images[1].item, is_reg=True))
    ds = replace(ds, parts=(replace(part, images=(part.images[0], reg)),))
    masks = {}
    for key, latent in lat.table.items():
        mask = torch.zeros(latent.shape[1:])
        mask[:, : latent.shape[2] // 2] = 1.0
        masks[key] = mask  # on the host, as the latent cache keeps it
    masked = tf.DictLatents(table=lat.table, masks=masks)
    comfy_gpu()
    config = replace(CONFIG, loss=LossSettings(prior_loss_weight=0.5, min_snr_gamma=5.0))
    got = assert_matches_cpu(ds, masked, txt, config=config)
    plain = train(models_on(CPU), ds, lat, txt, config=config)
    assert [r.loss for r in got.state.history] != [r.loss for r in plain.state.history]
