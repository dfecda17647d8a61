"""Batches for the loop, assembled from the bucketed dataset and the latent / text caches, on the training device.

Per epoch: kohya's bucket-batch composition for ``seed + epoch`` (trainer/data/bucket_batches.py), then the
batch order shuffled as the DataLoader does, here from a private generator seeded by (seed, epoch)
so any epoch's order can be recomputed on resume. Per sample, in kohya's __getitem__ order: the
flip decision (``random() < 0.5`` when the subset has flip_aug), then the caption's random draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Protocol

import torch

from ..data.dataset import BucketedImage, TrainingDataset, caption_for_step
from ..data.token_length import TokenLength
from ..objective.batch_loss import Batch


class LatentSource(Protocol):
    def latent(self, image: BucketedImage, flipped: bool) -> torch.Tensor:
        """Unscaled latent [4, h, w] of a bucketed image (flipped: of its mirrored pixels)."""

    def loss_mask(self, image: BucketedImage, flipped: bool) -> torch.Tensor | None:
        """Latent-size loss mask [h, w] of the image (kohya masked loss), or None when every pixel counts."""


class TextSource(Protocol):
    token_length: TokenLength  # how the captions were encoded; live captions are encoded the same way

    def encoding(self, image: BucketedImage) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [L, 2048], pooled [1280]) of the image's fixed caption."""


# literal captions -> one (context [L, 2048], pooled [1280]) each; for random captions and TE training
LiveEncoder = Callable[[list[str]], list[tuple[torch.Tensor, torch.Tensor]]]


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample contexts (77*k tokens with ComfyUI chunking); different k are repeated to a common length.

    Repeating a whole context sequence leaves cross-attention unchanged (the softmax sees each
    key/value the same number of times more), which is how ComfyUI batches conds of different length.
    """
    lengths = {c.shape[0] for c in contexts}
    if len(lengths) > 1:
        target = math.lcm(*lengths)
        contexts = [c.repeat(target // c.shape[0], 1) for c in contexts]
    return torch.stack(contexts)


class CachedBatchSource:
    """The loop's BatchSource over a TrainingDataset with cached latents and (mostly) cached text."""

    def __init__(
        self,
        dataset: TrainingDataset,
        latents: LatentSource,
        text: TextSource | None,
        live_encoder: LiveEncoder | None,
        seed: int,
        max_train_steps: int,
        train_text_encoder: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dataset = dataset
        self.device = torch.device(device)
        self.latents = latents
        self.text = text
        self.live_encoder = live_encoder
        self.seed = seed
        self.max_train_steps = max_train_steps
        self.train_text_encoder = train_text_encoder
        self._epoch_cache: tuple[int, list] | None = None
        needs_live = train_text_encoder or text is None or any(img.caption_options.is_random for img in dataset.images)
        if needs_live and live_encoder is None:
            raise ValueError(
                "Captions must be encoded while training (caption shuffle/dropout, text-encoder "
                "training, or no text cache given): connect the CLIP input of the train node."
            )

    def __len__(self) -> int:
        return self.dataset.num_batches()

    def _batches(self, epoch: int) -> list:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.dataset.epoch_batches(epoch, self.seed))
        return self._epoch_cache[1]

    def epoch_order(self, epoch: int) -> list[int]:
        n = len(self._batches(epoch))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen).tolist()

    def get(self, index: int, epoch: int, py_random: random.Random, step: int = 0) -> Batch:
        """``step``: optimizer steps done so far (kohya's current_step, for token warm-up)."""
        part_index, batch = self._batches(epoch)[index]
        part = self.dataset.parts[part_index]
        images: list[BucketedImage] = [part.images[k] for k in batch.keys]
        latents, time_ids, captions, fixed, masks = [], [], [], [], []
        for img in images:
            flipped = img.flip_aug and py_random.random() < 0.5
            latents.append(self.latents.latent(img, flipped))
            masks.append(self.latents.loss_mask(img, flipped))
            time_ids.append(img.time_ids(flipped))
            if self.train_text_encoder or self.text is None or img.caption_options.is_random:
                captions.append(caption_for_step(img, py_random, epoch, step, self.max_train_steps))
                fixed.append(None)
            else:
                captions.append(None)
                fixed.append(self.text.encoding(img))
        live_idx = [i for i, c in enumerate(captions) if c is not None]
        live = self.live_encoder([captions[i] for i in live_idx]) if live_idx else None
        contexts: list[torch.Tensor] = []
        pooled: list[torch.Tensor] = []
        for i in range(len(images)):
            # cached encodings are on the host, live ones wherever ComfyUI's CLIP put them (on the GPU with
            # --gpu-only, with gradients when the text encoders train): each goes to the training device
            ctx, pool = fixed[i] if fixed[i] is not None else live[live_idx.index(i)]
            contexts.append(ctx.reshape(-1, ctx.shape[-1]).to(self.device))
            pooled.append(pool.reshape(-1).to(self.device))
        loss_mask = None
        if any(m is not None for m in masks):
            # kohya: in a batch with masks, an image without one gets a mask of ones
            loss_mask = torch.stack(
                [m if m is not None else torch.ones(lat.shape[1:]) for m, lat in zip(masks, latents)]
            )
            loss_mask = loss_mask.unsqueeze(1).to(self.device)
        return Batch(
            latents=torch.stack([latent.float() for latent in latents]).to(self.device),
            context=stack_contexts(contexts),
            pooled=torch.stack(pooled),
            time_ids=torch.tensor(time_ids, dtype=torch.long),
            is_reg=tuple(img.item.is_reg for img in images),
            loss_mask=loss_mask,
        )
