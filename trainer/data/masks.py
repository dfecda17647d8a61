"""Where an image's loss mask comes from, and its 8-bit pixels at the image's size.

kohya has two mask sources, both 8-bit and both at the image's own pixel size before bucketing:
* ``alpha_mask`` (a subset option): the image's alpha channel; the RGB under it is trained as stored (kohya drops
  the alpha instead of compositing it on white), and an image without alpha gets a mask of ones;
* mask images (kohya ``masked_loss`` with ``conditioning_data_dir``): a file with the image's stem in a mask folder,
  read as RGB, its RED channel is the weight; it must have the image's size.
The graph adds a third: a ComfyUI MASK (float 0..1) given with the image, stored as 8 bits like kohya's.

The mask then follows the image through the same resize, centre crop and flip (trainer/cache/latents.py) and is
shrunk to latent size once, in the latent cache (trainer/objective/masked_loss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .images import DatasetError, load_image_rgb, load_image_with_alpha

#: alpha: the image's own alpha channel; mask_image: the red channel of a mask file; pixels: a MASK from the graph
MaskKind = Literal["alpha", "mask_image", "pixels"]


@dataclass(frozen=True)
class MaskSource:
    """One image's mask: what it is made from. ``weights`` says how its 8-bit values become loss weights
    (kohya's two conversions: alpha / 255, or the red channel's -1..1 round trip)."""

    kind: MaskKind
    path: str | None = None  # mask_image: the mask file
    pixels: Image.Image | None = None  # pixels: an 8-bit 'L' image at the image's size

    @property
    def weights(self) -> Literal["alpha", "red"]:
        return "red" if self.kind == "mask_image" else "alpha"

    def describe(self) -> str:
        if self.kind == "alpha":
            return "alpha channel"
        if self.kind == "mask_image":
            return f"mask image {self.path}"
        return "MASK input"


def load_mask_pixels(
    source: MaskSource, image_path: str | None, image_size: tuple[int, int], exif_transpose: bool, label: str
) -> Image.Image:
    """The mask as an 8-bit 'L' image at ``image_size`` (W, H), checked against the image it belongs to.

    ``label`` names the image in messages. An alpha mask of an image without alpha is all 255 (kohya: ones).
    """
    if source.kind == "pixels":
        assert source.pixels is not None
        mask = source.pixels
    elif source.kind == "alpha":
        assert image_path is not None
        _, alpha = load_image_with_alpha(image_path, exif_transpose)
        mask = alpha if alpha is not None else Image.new("L", image_size, 255)
    else:
        assert source.path is not None
        mask = load_image_rgb(source.path, exif_transpose).getchannel("R")  # kohya: load_image(...) RGB, [:, :, 0]
    if mask.size != tuple(image_size):
        raise DatasetError(
            f"{label}: its {source.describe()} is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image_size[0]}x{image_size[1]}; a mask must have exactly the image's size (save it at that size)."
        )
    return mask


def mask_pixels_from_weights(weights: np.ndarray, invert: bool) -> Image.Image:
    """A float mask in 0..1 [H, W] (ComfyUI MASK) as 8-bit pixels; ``invert``: 1 - mask (LoadImage's MASK is
    1 - alpha, so inverting gives kohya's alpha weights back exactly)."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0)
    if invert:
        w = 1.0 - w
    return Image.fromarray(np.floor(w * 255.0 + 0.5).astype(np.uint8), mode="L")


def find_mask_file(mask_dir: Path, image_path: Path, extensions: tuple[str, ...]) -> Path | None:
    """kohya's pairing: a file named like the image's stem with an image extension in the mask folder."""
    for ext in extensions:
        for candidate in (mask_dir / f"{image_path.stem}{ext}", mask_dir / f"{image_path.stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None
