"""The batch loader hands each sample's loss mask (flipped with its latent) and reg flag to the loss, as kohya's
dataset does: in a batch with masks, an image without one gets a mask of ones."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.sources import ScanResult, items_from_images
from sdxl_lora_trainer.trainer.run.batch_loader import CachedBatchSource

pytestmark = pytest.mark.unit


class Latents:
    def __init__(self, masks):
        self.masks = masks

    def latent(self, image, flipped):
        w, h = image.selection.bucket
        return torch.full((4, h // 8, w // 8), 1.0 if flipped else 0.0)

    def loss_mask(self, image, flipped):
        mask = self.masks.get(image.key)
        return None if mask is None else (torch.flip(mask, dims=[1]) if flipped else mask)


class Text:
    def encoding(self, image):
        return torch.zeros(77, 8), torch.zeros(4)


def _dataset(flip_aug=False):
    images = [np.random.default_rng(i).random((1, 64, 64, 3)).astype(np.float32) for i in range(2)]
    scan = items_from_images(images, "a photo", name="train")
    reg = items_from_images(images[:1], "a photo", name="reg", is_reg=True)
    for item in reg.items:
        item.subset_index = 1
    scan = ScanResult(items=scan.items + reg.items)
    settings = BucketSettings(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    return dataset_from_scan(scan, settings, 3, CaptionOptions(), flip_aug=flip_aug)


def test_masks_and_reg_flags_reach_the_batch():
    ds = _dataset(flip_aug=True)
    keys = [img.key for img in ds.images]
    mask = torch.arange(64, dtype=torch.float32).reshape(8, 8) / 64
    source = CachedBatchSource(ds, Latents({keys[0]: mask}), Text(), None, seed=1, max_train_steps=10)
    rng = random.Random(0)
    batch = source.get(0, 1, rng)
    assert batch.loss_mask is not None and batch.loss_mask.shape == (3, 1, 8, 8)
    # which sample is which: by the batch's composition
    part_index, composition = ds.epoch_batches(1, 1)[0]
    images = [ds.parts[part_index].images[k] for k in composition.keys]
    assert batch.is_reg == tuple(img.item.is_reg for img in images) and sum(batch.is_reg) == 1
    for row, img in enumerate(images):
        flipped = bool(batch.latents[row].max() == 1.0)
        if img.key == keys[0]:
            expected = torch.flip(mask, dims=[1]) if flipped else mask
            assert torch.equal(batch.loss_mask[row, 0], expected)
        else:
            assert torch.equal(batch.loss_mask[row, 0], torch.ones(8, 8))


def test_no_masks_means_no_mask_tensor():
    ds = _dataset()
    batch = CachedBatchSource(ds, Latents({}), Text(), None, seed=1, max_train_steps=10).get(0, 1, random.Random(0))
    assert batch.loss_mask is None


def test_lora_metadata_counts_reg_images_apart_as_kohya():
    from sdxl_lora_trainer.trainer.run.lora_output import dataset_metadata

    meta = dataset_metadata(_dataset())
    # 2 train images x 1 repeat; kohya counts the 1 reg image as given, then registers it twice to match them
    assert (meta["num_train_images"], meta["num_reg_images"]) == (2, 1)
    assert meta["dataset_dirs"] == {"train": {"n_repeats": 1, "img_count": 2}}
    assert meta["reg_dataset_dirs"] == {"reg": {"n_repeats": 2, "img_count": 1}}
