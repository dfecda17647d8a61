"""A tiny SDXL-architecture MODEL / CLIP / VAE built through ComfyUI's own classes.

Why: the engine must be tested on the exact objects ComfyUI hands to nodes (ModelPatcher over
model_base.SDXL, comfy.sd.CLIP with both CLIP-L and CLIP-G, comfy.sd.VAE) without any download.
The U-Net keeps SDXL's block layout (3 levels, 2 res blocks each, attention at levels 2 and 3,
9 output blocks), so module paths and kohya LoRA key names are a structural subset of real SDXL's
(one transformer block per SpatialTransformer instead of 2/10). Only widths shrink.

comfy.ops leaves weights uninitialised (``torch.empty``); ``init_weights`` fills every parameter
from a private seeded generator: Linear/Conv like torch's default (kaiming-uniform a=sqrt(5)),
norms to 1/0, everything else N(0, 0.02).

Sizes (see tests/host/test_tiny_sdxl.py for the measured parameter counts and forward time):
U-Net model_channels 32, channel_mult [1,2,4], head dim 16, context 64 (= CLIP-L 32 + CLIP-G 32),
adm 32+1536; CLIP-L and CLIP-G: 3 layers, width 32, ComfyUI's real SDXL tokenizers (offline);
VAE: ch 32, ch_mult [1,1,1,1] (8x downscale), 1 res block, 4 latent channels.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from comfy_host import import_comfy

import_comfy()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402

CLIP_WIDTH = 32
CONTEXT_DIM = 2 * CLIP_WIDTH
POOLED_DIM = CLIP_WIDTH

UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": POOLED_DIM + 1536,
    "in_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 1, 1],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": True,
    "context_dim": CONTEXT_DIM,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0, 0],  # deepest level first, like SDXL's [10]*3+[2]*3+[0]*3
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": CLIP_WIDTH,
    "intermediate_size": 2 * CLIP_WIDTH,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": CLIP_WIDTH,
}

VAE_CONFIG: dict[str, Any] = {
    "params": {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    }
}


class TinySDXLConfig(comfy.supported_models.SDXL):
    """SDXL's model config with tiny widths; everything else (latent format, sampling) is SDXL's."""

    unet_config = {
        k: UNET_CONFIG[k]
        for k in (
            "model_channels",
            "use_linear_in_transformer",
            "transformer_depth",
            "context_dim",
            "adm_in_channels",
            "use_temporal_attention",
        )
    }
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


def init_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter deterministically (comfy.ops creates them with torch.empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), ..)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 2 * bound - bound)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 2 * bound - bound)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.fill_(0.0)
    return module


def make_unet_model(
    seed: int = 0, v_prediction: bool = False, weight_dtype: torch.dtype = torch.float32
) -> comfy.model_base.SDXL:
    """The model_base.SDXL a MODEL wraps (weights seeded), without its patcher."""
    cfg = TinySDXLConfig(dict(UNET_CONFIG))
    cfg.set_inference_dtype(weight_dtype, None if weight_dtype == torch.float32 else torch.float32)
    state = {"v_pred": torch.tensor([])} if v_prediction else {}
    model = cfg.get_model(state, "", device=torch.device("cpu"))
    init_weights(model.diffusion_model, seed)
    return model.eval()


def make_model(
    seed: int = 0,
    v_prediction: bool = False,
    weight_dtype: torch.dtype = torch.float32,
    load_device: torch.device | None = None,
    offload_device: torch.device | None = None,
    patcher_class: Any = None,
) -> comfy.model_patcher.ModelPatcher:
    """MODEL: a ModelPatcher over model_base.SDXL, as CheckpointLoaderSimple returns it.

    ``weight_dtype`` other than float32 stores the U-Net weights in that dtype (e.g. fp8, as ComfyUI's
    fp8 loading does) with float32 compute through comfy.ops' manual casting. The devices default to what
    ComfyUI picks (the CPU in tests); tests/device puts the model on the stand-in accelerator.
    ``cached_patcher_init`` is set as CheckpointLoaderSimple sets it, so ComfyUI can build the model again
    (its non-dynamic delegate under DynamicVRAM).
    """
    load = load_device if load_device is not None else comfy.model_management.get_torch_device()
    offload = offload_device if offload_device is not None else comfy.model_management.unet_offload_device()
    cls = patcher_class or comfy.model_patcher.ModelPatcher
    patcher = cls(make_unet_model(seed, v_prediction, weight_dtype), load_device=load, offload_device=offload)
    patcher.cached_patcher_init = (_reload_model, (seed, v_prediction, weight_dtype, load, offload))
    return patcher


def _reload_model(seed, v_prediction, weight_dtype, load, offload, disable_dynamic=False):
    """What ComfyUI calls to rebuild a MODEL (``cached_patcher_init``); always a plain ModelPatcher here."""
    with torch.inference_mode():
        return make_model(seed, v_prediction, weight_dtype, load, offload)


def make_clip(
    seed: int = 1, load_device: torch.device | None = None, offload_device: torch.device | None = None
) -> comfy.sd.CLIP:
    """CLIP: comfy.sd.CLIP with SDXL's tokenizer and both encoders (CLIP-L = te1, CLIP-G = te2)."""
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    options = {
        "clip_l_model_config": dict(CLIP_CONFIG),
        "clip_g_model_config": dict(CLIP_CONFIG),
        "dtype": torch.float32,
        "load_device": load_device if load_device is not None else torch.device("cpu"),
        "offload_device": offload_device if offload_device is not None else torch.device("cpu"),
        "initial_device": torch.device("cpu"),
    }
    clip = comfy.sd.CLIP(target, model_options=options)
    init_weights(clip.cond_stage_model, seed)
    return clip


def make_vae(seed: int = 2, load_device: torch.device | None = None) -> comfy.sd.VAE:
    """VAE: comfy.sd.VAE from a config (8x downscale, 4 latent channels, like SDXL's)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    weights = init_weights(AutoencoderKL(**VAE_CONFIG["params"]), seed).state_dict()
    return comfy.sd.VAE(
        sd=weights,
        config=VAE_CONFIG,
        dtype=torch.float32,
        device=load_device if load_device is not None else torch.device("cpu"),
    )


def make_all(seed: int = 0, v_prediction: bool = False):
    """(MODEL, CLIP, VAE) with distinct seeds derived from ``seed``."""
    return make_model(seed, v_prediction), make_clip(seed + 1), make_vae(seed + 2)
