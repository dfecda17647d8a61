"""SDXL size conditioning ("time_ids"): the six numbers per sample and their 1536-wide sinusoidal embedding.

SDXL conditions the U-Net on (original_h, original_w, crop_top, crop_left, target_h, target_w). kohya computes them
in BaseDataset.__getitem__ from the bucket selection, and by default we reproduce its values exactly, quirks included:

1. crop_top_left is NOT the real crop. kohya takes it from ``get_crop_ltrb(bucket, ORIGINAL size)``, which letterboxes
   the original image INSIDE the bucket, while the pixels are scaled to COVER the bucket and centre-cropped. So a
   1920x1080 image in bucket 1344x768 gets (top, left) = (6, 0) though the real crop is 10 px on the left, and an image
   whose aspect ratio matches the bucket gets (0, 0) even when pixels were cut away.
2. Flip: crop_left becomes ``int(bucket_w - crop_right)`` with the float crop_right = crop_left + fitted_w; this can
   differ by 1 from the unflipped left (e.g. 4 vs 5). crop_top never changes.
3. enable_bucket=False: kohya's cached-latent path (this pack always caches) takes crop_ltrb from get_crop_ltrb too
   (the resolution is the one bucket), so a flipped image of exactly the resolution keeps crop_left 0. (kohya's
   uncached image path uses (0, 0, 0, 0) there, which gives a flipped sample crop_left = target width.)
4. original size is the file's size before any resize; target is the bucket. All values go through int(), never
   round().

``true_crop=True`` gives the real centre-crop offsets instead (in pixels of the resized image, SDXL's definition),
mirrored for flipped samples (the crop's left edge measured in the flipped image). That is not what kohya trains
with, so LoRAs trained that way see different conditioning than kohya's; it is an opt-in.

The embedding (library/sdxl_train_util.get_size_embeddings): for each of the six numbers, 256 values = 128 cos then
128 sin of ``value * exp(-ln(10000) * i / 128)``, i = 0..127, in float32. Cos comes FIRST and there is no frequency
shift (SDXL's flip_sin_to_cos=True, freq_shift=0): a generic "sin first" embedding would not match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .buckets import BucketSelection

EMBED_DIM_PER_VALUE = 256
MAX_PERIOD = 10000


@dataclass(frozen=True)
class SizeConditioning:
    """The three pairs SDXL is conditioned on, in the (H, W) / (top, left) order the U-Net expects."""

    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size_hw: tuple[int, int]

    @property
    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """The six numbers in embedding order: original_size_hw + crop_top_left + target_size_hw."""
        return (*self.original_size_hw, *self.crop_top_left, *self.target_size_hw)  # type: ignore[return-value]


def size_conditioning(
    selection: BucketSelection, flipped: bool = False, *, true_crop: bool = False
) -> SizeConditioning:
    """time_ids for one sample from its bucket selection; ``flipped`` = horizontally flipped by flip_aug."""
    orig_w, orig_h = selection.original_size
    target_w, target_h = selection.bucket
    if true_crop:
        left, top = selection.crop_offset
        if flipped:
            # the same pixels, measured from the left edge of the mirrored resized image
            left = selection.resized_size[0] - target_w - left
    else:
        crop_left, top, crop_right, _ = selection.crop_ltrb
        left = target_w - crop_right if flipped else crop_left
    return SizeConditioning(
        original_size_hw=(int(orig_h), int(orig_w)),
        crop_top_left=(int(top), int(left)),
        target_size_hw=(int(target_h), int(target_w)),
    )


TimeIds = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def size_embedding(time_ids: TimeIds, device: torch.device | str | None = None) -> torch.Tensor:
    """[B, 1536] float32 SDXL size embedding of [B, 6] (or a single [6]) time_ids, as kohya computes it.

    The float32 operation order follows kohya's ``timestep_embedding`` so the result matches bit for bit on the same
    torch build: freqs = exp(-ln(10000) * arange(128, float32) / 128); args = value.float() * freqs; [cos, sin].
    """
    ids = torch.as_tensor(time_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[1] != 6:
        raise ValueError(f"time_ids must have shape [B, 6] (or [6]), got {tuple(ids.shape)}")
    ids = ids.to("cpu")
    batch = ids.shape[0]
    half = EMBED_DIM_PER_VALUE // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = ids.flatten()[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = emb.reshape(batch, 6 * EMBED_DIM_PER_VALUE)
    return emb if device is None else emb.to(device)
