"""The networks a run trains: one class per ``NetworkConfig.algo`` over base.py's AdapterNetwork, and
``build_network``, which builds the configured one on ComfyUI's MODEL/CLIP.

Nothing of this package is imported here at module level (config.py reads ``NETWORK_CLASSES``), and an algorithm's
file is imported only when it is built: algo "lora" never imports LyCORIS (lycoris-lora is needed for loha/lokr).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

from ..comfyui import models as comfy_models

if TYPE_CHECKING:
    from .base import AdapterNetwork
    from .config import NetworkConfig

#: algo -> (file of this package, network class), in the order the Network node lists them
NETWORK_CLASSES: dict[str, tuple[str, str]] = {
    "lora": ("lora", "LoRANetwork"),
    "loha": ("loha", "LohaNetwork"),
    "lokr": ("lokr", "LokrNetwork"),
    "dora": ("dora", "DoraNetwork"),
}


def network_class(algo: str) -> type[AdapterNetwork]:
    """The network class of ``algo``, its file imported now."""
    file, name = NETWORK_CLASSES[algo]
    return getattr(importlib.import_module(f".{file}", __name__), name)


def build_network(
    model: Any, clip: Any, config: NetworkConfig, seed: int, initial_weights: dict[str, torch.Tensor] | None = None
) -> AdapterNetwork:
    """The ``config.algo`` network on the MODEL's U-Net and the CLIP's CLIP-L/CLIP-G (the parts the config trains),
    its init drawn from a generator seeded ``seed``; ``initial_weights`` (a saved state dict) are loaded strictly."""
    unet = comfy_models.diffusion_model(model)
    te1 = te2 = None
    if config.train_te1 or config.train_te2:
        if clip is None:
            raise ValueError(
                "The network has text-encoder modules (train_clip_l / train_clip_g, or a start_from file with "
                "lora_te1_ / lora_te2_ keys): connect the CLIP input of the train node."
            )
        clip_l, clip_g = comfy_models.text_encoders(clip)
        te1 = clip_l if config.train_te1 else None
        te2 = clip_g if config.train_te2 else None
    network = network_class(config.algo).build(
        unet if config.train_unet else None, te1, te2, config, generator=torch.Generator().manual_seed(seed)
    )
    if initial_weights is not None:
        network.load_kohya(initial_weights)
    return network
