"""ComfyUI's sampler and LoRA loader, for previews and for the train node's MODEL/CLIP outputs."""

from __future__ import annotations

from typing import Any

import torch


def apply_lora(
    model: Any, clip: Any, weights: dict[str, torch.Tensor], strength_model: float = 1.0, strength_clip: float = 1.0
) -> tuple[Any, Any]:
    """MODEL/CLIP clones with the LoRA patched in exactly as LoraLoader does (the inputs stay untouched)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, weights, strength_model, strength_clip)


def sample_image(
    model: Any,
    vae: Any,
    positive: Any,
    negative: Any,
    *,
    width: int,
    height: int,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
) -> torch.Tensor:
    """One image [1,H,W,3] with ComfyUI's own KSampler path; the noise comes from a private generator
    (comfy.sample.prepare_noise would reseed the global RNG) and the global RNG state is restored."""
    import comfy.sample

    rng_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        latent = torch.zeros([1, 4, height // 8, width // 8])
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        samples = comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent,
            denoise=1.0,
            disable_pbar=True,
            seed=seed,
        )
        return vae.decode(samples)
    finally:
        torch.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
