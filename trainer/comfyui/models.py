"""ComfyUI's MODEL/CLIP objects as the engine needs them: what kind of SDXL it is, its parts, the U-Net call."""

from __future__ import annotations

from typing import Any

import torch


class WrongModelError(ValueError):
    """The MODEL/CLIP/VAE given is not something this SDXL trainer can train."""


# -- model identity -----------------------------------------------------------------------------


def require_sdxl(model: Any) -> None:
    """Fail early, with the fix, when the MODEL is not an SDXL (base architecture) model."""
    import comfy.model_base

    inner = getattr(model, "model", None)
    if inner is None:
        raise WrongModelError(f"Expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}.")
    if not isinstance(inner, comfy.model_base.SDXL) or isinstance(inner, comfy.model_base.SDXLRefiner):
        raise WrongModelError(
            f"The MODEL input is a {type(inner).__name__} model; this trainer trains SDXL base-architecture "
            "models (SDXL 1.0, Pony, Illustrious, NoobAI, ...). Load an SDXL checkpoint with "
            "'Load Checkpoint' and connect its MODEL output."
        )


def prediction_type(model: Any) -> str:
    """'epsilon' or 'v_prediction', read from the MODEL (ComfyUI detects it from the checkpoint)."""
    import comfy.model_base

    mtype = model.model.model_type
    if mtype == comfy.model_base.ModelType.EPS:
        return "epsilon"
    if mtype == comfy.model_base.ModelType.V_PREDICTION:
        return "v_prediction"
    raise WrongModelError(
        f"The MODEL uses the {mtype.name} objective; only epsilon and v-prediction SDXL models can be trained "
        "with kohya's DDPM objective."
    )


def zero_terminal_snr(model: Any) -> bool:
    """True when ComfyUI samples this model with zero-terminal-SNR sigmas (ztsnr checkpoints)."""
    return bool(getattr(model.model.model_sampling, "zsnr", False))


def latent_scale_factor(model: Any) -> float:
    """SDXL's VAE latent scale (0.13025): ComfyUI LATENTs are unscaled, the U-Net sees scaled ones."""
    return float(model.model.latent_format.scale_factor)


def diffusion_model(model: Any) -> torch.nn.Module:
    return model.model.diffusion_model


def unet_config(model: Any) -> dict[str, Any]:
    """The U-Net's architecture as ComfyUI detected it (widths, context and ``y`` sizes)."""
    return dict(model.model.model_config.unet_config)


def text_encoders(clip: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(CLIP-L, CLIP-G) transformers of an SDXL CLIP: kohya's te1 and te2."""
    inner = getattr(clip, "cond_stage_model", None)
    if inner is None or not hasattr(inner, "clip_l") or not hasattr(inner, "clip_g"):
        raise WrongModelError(
            "The CLIP input is not SDXL's dual text encoder (CLIP-L + CLIP-G); "
            "connect the CLIP output of the SDXL checkpoint loader."
        )
    return inner.clip_l.transformer, inner.clip_g.transformer


# -- the raw U-Net call ------------------------------------------------------------------------


def unet_forward(
    model: Any,
    model_input: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The raw U-Net output (epsilon or v) for a batch, as kohya's SDXL U-Net call returns it.

    Calls ``diffusion_model`` directly rather than ``apply_model`` (which returns x0): the loss is
    on the raw prediction and converting back from x0 would divide by sigma. The MODEL's
    transformer_options (attention patches of other nodes) are passed along as apply_model does, except an
    ``optimized_attention_override``: another node's attention kernel need not have a backward
    (``differentiable_attention`` picks the kernel while training).
    """
    options = dict(model.model_options.get("transformer_options", {}))
    options.pop("optimized_attention_override", None)
    device = model.load_device
    return diffusion_model(model)(
        model_input.to(device, dtype),
        timesteps.to(device).float(),
        context=context.to(device, dtype),
        y=y.to(device, dtype),
        transformer_options=options,
    ).float()


def layer_weight(module: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """The weight ``module`` computes with, as float32 on ``device``, exactly as its own forward gets it.

    A ComfyUI layer (comfy.ops) gets its weight from ``comfy.ops.cast_bias_weight``: fp8/fp16 storage cast up, a
    quantized weight dequantized, and the patches ComfyUI applies at forward time (a LoRA merged upstream in a
    low-VRAM load, weight wrappers) applied; a LoRA merged at a full load is already in the weight. A plain torch
    layer: its weight. Never a tensor autograd tracks (the model is frozen).
    """
    if isinstance(getattr(module, "weight_function", None), list):
        import comfy.ops

        weight, _ = comfy.ops.cast_bias_weight(module, device=device, dtype=torch.float32)
    else:
        weight = module.weight.to(device=device, dtype=torch.float32)
    return weight.detach()
