"""What every node of the pack shares: the menu category and the IMAGE converter (sockets: nodes/sockets.py)."""

from __future__ import annotations

import numpy as np
import torch

CATEGORY = "training/sdxl_lora"


def pil_to_image(pil) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one: [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]
