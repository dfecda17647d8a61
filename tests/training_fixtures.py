"""Small in-memory training datasets for the host-tier training tests.

A dataset is a few Pillow-drawn images bucketed with the pack's own dataset code
(``items_from_images`` + ``dataset_from_scan``), plus dict-backed latent / text sources that
follow trainer/run/batch_loader.py's LatentSource / TextSource protocols. The latents and encodings
are precomputed with the tiny VAE / CLIP under ``torch.inference_mode()``, the way ComfyUI's
nodes produce them (so the engine sees inference tensors, as it will in ComfyUI).

The dict sources are stand-ins for trainer/cache/latents.py / text.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sdxl_lora_trainer.trainer.comfyui import encoders as comfy_encoders
from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings, resize_and_crop
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions, escape_for_comfy_tokenizer
from sdxl_lora_trainer.trainer.data.dataset import TrainingDataset
from sdxl_lora_trainer.trainer.data.sources import items_from_images
from sdxl_lora_trainer.trainer.data.token_length import TokenLength
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.events import RunEvents
from sdxl_lora_trainer.trainer.run.session import train

DEFAULT_CAPTIONS = ("a red cube", "a blue ball", "a green tree", "a yellow house")


def draw(size: tuple[int, int], seed: int) -> Image.Image:
    """A deterministic RGB picture (random blocks, so the VAE sees structure)."""
    w, h = size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.NEAREST)


def make_dataset(
    n: int = 2,
    size: tuple[int, int] = (64, 64),
    captions: Sequence[str] | None = None,
    batch_size: int = 1,
    num_repeats: int = 1,
    flip_aug: bool = False,
    caption_options: CaptionOptions | None = None,
    resolution: int = 64,
    image_seed: int = 0,
    validation_split: float = 0.0,
    validation_seed: int = 0,
) -> TrainingDataset:
    images = [draw(size, image_seed + i) for i in range(n)]
    caps = list(captions) if captions is not None else [DEFAULT_CAPTIONS[i % len(DEFAULT_CAPTIONS)] for i in range(n)]
    scan = items_from_images(images, caps, num_repeats=num_repeats)
    settings = BucketSettings(
        resolution=(resolution, resolution), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32
    )
    return dataset_from_scan(
        scan,
        settings,
        batch_size,
        caption_options or CaptionOptions(),
        flip_aug=flip_aug,
        validation_split=validation_split,
        validation_seed=validation_seed,
    )


def _key(image) -> str:
    """The protocols pass a BucketedImage (earlier: its key)."""
    return image if isinstance(image, str) else image.key


@dataclass
class DictLatents:
    """LatentSource: unscaled latents per (key, flipped)."""

    table: dict[tuple[str, bool], torch.Tensor] = field(default_factory=dict)
    calls: int = 0
    masks: dict[tuple[str, bool], torch.Tensor] = field(default_factory=dict)  # latent-size loss masks [h, w]

    def latent(self, image, flipped: bool) -> torch.Tensor:
        self.calls += 1
        return self.table[(_key(image), flipped)]

    def loss_mask(self, image, flipped: bool) -> torch.Tensor | None:
        return self.masks.get((_key(image), flipped))


@dataclass
class DictText:
    """TextSource: (context [L, 2048-like], pooled) per image key, encoded as CLIPTextEncode encodes (encode_text)."""

    table: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    token_length: TokenLength = field(default_factory=lambda: TokenLength(comfyui_chunking=True))

    def encoding(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table[_key(image)]


def encode_latents(vae, dataset: TrainingDataset) -> DictLatents:
    """Every image (and its mirror) through ComfyUI's VAE.encode, as IMAGE pixels [1,H,W,3] in 0..1."""
    out = DictLatents()
    with torch.inference_mode():
        for img in dataset.cached_images:
            pil = resize_and_crop(img.item.load_rgb(), img.selection)
            for flipped in (False, True):
                p = ImageOps.mirror(pil) if flipped else pil
                px = torch.from_numpy(np.array(p).astype(np.float32) / 255.0)[None]
                out.table[(img.key, flipped)] = comfy_encoders.encode_pixels(vae, px)[0]
    return out


def encode_text(clip, dataset: TrainingDataset) -> DictText:
    """Each image's fixed caption through CLIPTextEncode's path (escaped as the engine escapes it)."""
    out = DictText()
    with torch.inference_mode():
        for img in dataset.cached_images:
            ctx, pooled = comfy_encoders.encode_text(clip, escape_for_comfy_tokenizer(img.item.caption))
            out.table[img.key] = (ctx[0].float(), pooled[0].float())
    return out


def sources(tiny, dataset: TrainingDataset) -> tuple[DictLatents, DictText]:
    _, clip, vae = tiny
    return encode_latents(vae, dataset), encode_text(clip, dataset)


# -- the models, built as ComfyUI's loader nodes build them (under inference mode) ---------------


@functools.cache
def inference_models(v_prediction: bool = False):
    """(MODEL, CLIP, VAE) of the tiny SDXL built inside ``torch.inference_mode()`` (weights are inference tensors)."""
    import tiny_sdxl

    with torch.inference_mode():
        return tiny_sdxl.make_model(0, v_prediction), tiny_sdxl.make_clip(1), tiny_sdxl.make_vae(2)


@functools.cache
def reference_unet() -> torch.nn.Module:
    """A twin of the tiny U-Net built OUTSIDE inference mode (ordinary tensors, so plain autograd works)."""
    import tiny_sdxl

    unet = tiny_sdxl.make_model(0).model.diffusion_model
    unet.requires_grad_(False)
    return unet


@functools.cache
def default_data(n: int = 2):
    """(dataset, latents, text) of ``n`` 64x64 images (one bucket), batch size 1."""
    ds = make_dataset(n)
    return (ds, *sources(inference_models(), ds))


def run_train(
    dataset,
    latents,
    text,
    network: NetworkConfig = None,
    config: TrainConfig = None,
    *,
    model=None,
    clip=None,
    **kwargs,
):
    """``train`` as the node calls it: inside inference mode, on the inference-built tiny MODEL/CLIP."""
    m, c, _ = inference_models()
    network = network or NetworkConfig(network_dim=4, network_alpha=1.0, train_te1=False, train_te2=False)
    config = config or TrainConfig(max_train_steps=1)
    with torch.inference_mode():
        return train(
            model if model is not None else m,
            clip if clip is not None else c,
            dataset,
            latents,
            text,
            network,
            config,
            **kwargs,
        )


# -- capturing what the engine does inside train() ------------------------------------------------


class StepWatcher(RunEvents):
    """A RunEvents for tests: ``on_step(record, run)`` after every step, ``stop_when()`` asked before each."""

    def __init__(self, on_step=None, stop_when=None) -> None:
        self.on_step = on_step or (lambda record, run: None)
        self.stop_when = stop_when or (lambda: False)
        self.run = None

    def training_started(self, run) -> None:
        self.run = run

    def cancel_requested(self) -> bool:
        return self.stop_when()

    def step_finished(self, record) -> None:
        self.on_step(record, self.run)


class Capture:
    """Wraps build_network / build_optimizer as run/session calls them and loop.batch_loss (via monkeypatch) to record:

    ``network`` and ``initial`` (its kohya state dict right after construction), ``step_grads`` (every
    parameter's .grad right before each optimizer.step, i.e. after clipping), ``batches`` / ``results``
    (each micro-batch and its StepResult), ``optimizer``.
    """

    def __init__(self, monkeypatch) -> None:
        from sdxl_lora_trainer.trainer.run import loop as loop_mod
        from sdxl_lora_trainer.trainer.run import session as ts

        self.network = None
        self.initial: dict[str, torch.Tensor] = {}
        self.step_grads: list[dict[str, torch.Tensor]] = []
        self.batches: list = []
        self.results: list = []
        self.optimizer = None
        build_network, build_optimizer, batch_loss = ts.build_network, ts.build_optimizer, loop_mod.batch_loss

        def wrapped_network(*args, **kwargs):
            self.network = build_network(*args, **kwargs)
            self.initial = self.network.state_dict_kohya()
            return self.network

        def wrapped_optimizer(*args, **kwargs):
            opt = build_optimizer(*args, **kwargs)
            names = {id(p): n for n, p in self.network.named_parameters()}

            def pre(optimizer, args, kwargs):
                self.step_grads.append(
                    {
                        names[id(p)]: p.grad.detach().clone()
                        for g in optimizer.param_groups
                        for p in g["params"]
                        if p.grad is not None
                    }
                )

            opt.register_step_pre_hook(pre)
            self.optimizer = opt
            return opt

        def wrapped_loss(model, batch, *args, **kwargs):
            result = batch_loss(model, batch, *args, **kwargs)
            self.batches.append(batch)
            self.results.append(result)
            return result

        monkeypatch.setattr(ts, "build_network", wrapped_network)
        monkeypatch.setattr(ts, "build_optimizer", wrapped_optimizer)
        monkeypatch.setattr(loop_mod, "batch_loss", wrapped_loss)


def batch_keys(batch, latents: DictLatents) -> list[tuple[str, bool]]:
    """Which (image key, flipped) each row of a captured batch is, found by exact latent equality."""
    out = []
    for row in batch.latents:
        hits = [k for k, v in latents.table.items() if torch.equal(v.float(), row)]
        assert len(hits) == 1, f"a batch row matches {len(hits)} cached latents"
        out.append(hits[0])
    return out


# -- kohya's SDXL objective from first principles (reference; no trainer/objective, loss_weighting, noise) --

VAE_SCALE = 0.13025


def ref_alphas_cumprod() -> torch.Tensor:
    """diffusers DDPMScheduler scaled_linear(0.00085, 0.012, 1000) alphas_cumprod, float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ref_size_embedding(time_ids: torch.Tensor) -> torch.Tensor:
    """[B, 6] -> [B, 1536]: per number 128 cos then 128 sin of v * exp(-ln(10000) * i / 128)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    parts = []
    for j in range(time_ids.shape[1]):
        args = time_ids[:, j : j + 1].float() * freqs[None]
        parts += [torch.cos(args), torch.sin(args)]
    return torch.cat(parts, dim=1)


def ref_draws(x0: torch.Tensor, noise_settings, gen: torch.Generator, py: random.Random):
    """(noise target, noise put into the latents, timesteps) in kohya's draw order
    (get_noise_noisy_latents_and_timesteps)."""
    ns = noise_settings
    b, c, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=gen)
    if ns.noise_offset:
        offset = ns.noise_offset
        if ns.noise_offset_random_strength:
            offset = torch.rand(1, generator=gen) * ns.noise_offset
        if ns.adaptive_noise_scale is not None:
            offset = torch.clamp(offset + ns.adaptive_noise_scale * x0.mean(dim=(2, 3), keepdim=True).abs(), min=0.0)
        noise = noise + offset * torch.randn((b, c, 1, 1), generator=gen)
    if ns.multires_noise_iterations:
        for i in range(ns.multires_noise_iterations):
            r = py.random() * 2 + 2
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            level = torch.randn((b, c, hn, wn), generator=gen)
            noise = noise + F.interpolate(level, size=(h, w), mode="bilinear") * ns.multires_noise_discount**i
            if hn == 1 or wn == 1:
                break
        noise = noise / noise.std()
    lo = ns.min_timestep if ns.min_timestep is not None else 0
    hi = ns.max_timestep if ns.max_timestep is not None else 1000
    t = torch.randint(lo, hi, (b,), generator=gen) if lo < hi else torch.full((b,), hi, dtype=torch.long)
    put = noise
    if ns.ip_noise_gamma:
        gamma = ns.ip_noise_gamma
        if ns.ip_noise_gamma_random_strength:
            gamma = torch.rand(1, generator=gen) * ns.ip_noise_gamma
        put = noise + gamma * torch.randn(x0.shape, generator=gen)
    return noise, put, t


def ref_loss(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, loss_settings, v_pred: bool
) -> torch.Tensor:
    """kohya's process_batch loss: target, element-wise loss, mean over CHW, post_process_loss weights, mean."""
    ls = loss_settings
    ac = ref_alphas_cumprod()[t].view(-1, 1, 1, 1)
    target = ac.sqrt() * noise - (1 - ac).sqrt() * x0 if v_pred else noise
    d = pred.float() - target
    acv = ref_alphas_cumprod()[t]
    if ls.loss_type == "l2":
        el = d**2
    elif ls.loss_type == "l1":
        el = d.abs()
    else:
        if ls.huber_schedule == "snr":
            sigma = ((1 - acv) / acv).sqrt()
            c = (1 - ls.huber_c) / (1 + sigma) ** 2 + ls.huber_c
        elif ls.huber_schedule == "exponential":
            c = torch.exp(math.log(ls.huber_c) * t.float() / 1000) * ls.huber_scale
        else:
            c = torch.full((t.shape[0],), ls.huber_c * ls.huber_scale)
        c = c.view(-1, 1, 1, 1)
        root = torch.sqrt(d**2 + c**2) - c
        el = 2 * c * root if ls.loss_type == "huber" else 2 * root
    loss = el.mean(dim=(1, 2, 3))
    snr = (acv.sqrt() / (1 - acv).sqrt()) ** 2  # kohya's all_snr (prepare_scheduler_for_custom_training)
    snr_c = torch.clamp(snr, max=1000.0)
    if ls.min_snr_gamma:
        loss = loss * torch.clamp(snr, max=ls.min_snr_gamma) / (snr + 1 if v_pred else snr)
    if ls.scale_v_pred_loss_like_noise_pred:
        loss = loss * snr_c / (snr_c + 1)
    if ls.v_pred_like_loss:
        loss = loss + loss / (snr_c / (snr_c + 1)) * ls.v_pred_like_loss
    if ls.debiased_estimation_loss:
        loss = loss * (1 / (snr_c + 1) if v_pred else 1 / snr_c.sqrt())
    return loss.mean()


class RefLoRA:
    """kohya's LoRA forward (org(x) + up(down(x)) * alpha/rank) as plain forward hooks on the reference U-Net,
    with parameters from a kohya state dict (the keys are kohya's: lora_unet_ + module path with '_')."""

    def __init__(self, unet: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.handles = []
        for path, module in unet.named_modules():
            name = "lora_unet_" + path.replace(".", "_")
            if name + ".lora_down.weight" not in sd:
                continue
            down = sd[name + ".lora_down.weight"].clone().float().requires_grad_(True)
            up = sd[name + ".lora_up.weight"].clone().float().requires_grad_(True)
            scale = float(sd[name + ".alpha"]) / down.shape[0]
            self.params[name + ".lora_down.weight"] = down
            self.params[name + ".lora_up.weight"] = up

            def hook(mod, args, out, down=down, up=up, scale=scale):
                return out + F.linear(F.linear(args[0], down), up) * scale

            self.handles.append(module.register_forward_hook(hook))
        n_modules = len({k.rsplit(".", 2)[0] for k in sd})
        assert len(self.handles) == n_modules, f"{n_modules} LoRA modules in the state dict, {len(self.handles)} found"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def sdpa_attention():
    """ComfyUI's CPU default (sub-quadratic attention) modifies tensors in place; the reference uses SDPA."""
    import comfy.ldm.modules.attention as attention

    before = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = before


def reference_step(
    items: list[tuple[str, bool]],
    dataset,
    latents: DictLatents,
    text: DictText,
    lora_sd: dict,
    seed: int,
    noise_settings=None,
    loss_settings=None,
    v_pred: bool = False,
    gen: torch.Generator | None = None,
    py: random.Random | None = None,
    grads: bool = True,
):
    """kohya's loss (and LoRA gradients) of one batch of ``items`` with the noise of a generator seeded ``seed``.

    Returns (loss, {param name: grad}); ``gen``/``py`` may be passed to continue a stream (micro-batch 2, ...).
    """
    from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
    from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings

    noise_settings = noise_settings or NoiseSettings()
    loss_settings = loss_settings or LossSettings()
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    py = py if py is not None else random.Random(seed)
    by_key = {img.key: img for img in dataset.images}
    x0 = torch.stack([latents.table[k].clone().float() for k in items]) * VAE_SCALE
    context = torch.stack([text.table[k][0].clone() for k, _ in items])
    pooled = torch.stack([text.table[k][1].clone() for k, _ in items])
    time_ids = torch.tensor([by_key[k].time_ids(f) for k, f in items], dtype=torch.long)
    y = torch.cat([pooled, ref_size_embedding(time_ids)], dim=1)
    noise, put, t = ref_draws(x0, noise_settings, gen, py)
    ac = ref_alphas_cumprod()[t].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * put
    unet = reference_unet()
    lora = RefLoRA(unet, lora_sd)
    try:
        with sdpa_attention(), torch.enable_grad():
            pred = unet(noisy, t.float(), context=context, y=y)
            loss = ref_loss(pred, x0, noise, t, loss_settings, v_pred)
            g = {}
            if grads:
                names = list(lora.params)
                values = torch.autograd.grad(loss, [lora.params[n] for n in names], allow_unused=True)
                g = {n: (v if v is not None else torch.zeros_like(lora.params[n])) for n, v in zip(names, values)}
    finally:
        lora.remove()
    return loss.detach(), g, t


@pytest.fixture(autouse=False)
def one_thread():
    """The tiny U-Net is all per-op overhead: one intra-op thread is several times faster than two on a
    loaded 2-core machine (OpenMP threads spin against each other). Restored after the test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def random_lora_weights(network_config: NetworkConfig, seed: int, up_std: float = 0.05) -> dict[str, torch.Tensor]:
    """A kohya state dict for ``network_config`` on the tiny U-Net with NON-zero lora_up (so the LoRA takes part
    in the forward and lora_down gets gradients), for ``train(..., initial_weights=...)``."""
    from sdxl_lora_trainer.trainer.network import build_network

    model, clip, _ = inference_models()
    sd = build_network(model, clip, network_config, seed).state_dict_kohya()
    g = torch.Generator().manual_seed(seed + 100)
    return {
        k: (torch.randn(v.shape, generator=g) * up_std if k.endswith("lora_up.weight") else v) for k, v in sd.items()
    }
