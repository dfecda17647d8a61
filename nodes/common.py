"""Things every node of the pack shares: the menu category, the custom socket types, small converters."""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

CATEGORY = "training/sdxl_lora"

# Custom socket types: values that only our nodes produce and consume.
Images = io.Custom("SDXL_LORA_IMAGES")  # scanned images + captions, before bucketing
Dataset = io.Custom("SDXL_LORA_DATASET")  # bucketed, kohya-ready dataset (trainer/data/dataset.py)
LatentCache = io.Custom("SDXL_LORA_LATENT_CACHE")
TextCache = io.Custom("SDXL_LORA_TEXT_CACHE")
Network = io.Custom("SDXL_LORA_NETWORK")  # LoRA network settings (trainer/network/config.py: NetworkConfig)


def pil_to_image(pil) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one: [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


Objective = io.Custom("SDXL_LORA_OBJECTIVE")  # loss/noise settings (trainer.loss_weighting / trainer.noise)
Checkpointing = io.Custom("SDXL_LORA_CHECKPOINTING")  # save-every-N / keep-last / state / resume settings
Previews = io.Custom("SDXL_LORA_PREVIEWS")  # sample prompts + sampler settings + CLIP/VAE to render with
