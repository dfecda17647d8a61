"""Loss masks in the latent cache (tiny SDXL VAE, CPU): they follow the image's resize, crop and flip, are shrunk
to latent size as kohya does, live in the cache entry and its content key, and bad masks are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl_lora_trainer.trainer.cache.latents import LatentCache, LatentCacheError
from sdxl_lora_trainer.trainer.cache.stores import ENCODER_CALLS, MemoryStore
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings, resize_and_crop
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.dataset import bucket_images, training_dataset
from sdxl_lora_trainer.trainer.data.sources import ScanOptions, scan_folder

pytestmark = pytest.mark.host

# sizes that need a resize AND a crop into their buckets (resolution 128, steps 64)
SIZES = {"wide.png": (200, 80), "tall.png": (96, 160), "near.png": (130, 120)}


def _write(folder, name, size, seed, mode):
    rng = np.random.default_rng(seed)
    channels = {"RGBA": 4, "RGB": 3}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if mode == "RGBA":  # a left-right gradient alpha, so a flip and a crop are visible
        arr[:, :, 3] = np.linspace(0, 255, size[0]).astype(np.uint8)[None, :]
    Image.fromarray(arr, mode).save(folder / name)
    return arr


def _dataset(root, options, flip=True):
    scan = scan_folder(root, options=options)
    settings = BucketSettings(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
    return training_dataset([bucket_images(scan, settings, 1, CaptionOptions(), flip_aug=flip)], [scan])


def _kohya_mask(pixels_u8: Image.Image, img, flipped: bool, red: bool) -> torch.Tensor:
    """kohya's order, written out: resize + centre crop with the image, flip, weights, area shrink."""
    cropped = np.array(resize_and_crop(pixels_u8, img.selection))
    if flipped:
        cropped = cropped[:, ::-1].copy()
    t = torch.from_numpy(cropped).float()
    weights = ((t / 255.0 - 0.5) / 0.5) / 2 + 0.5 if red else t / 255.0
    w, h = img.selection.bucket
    return F.interpolate(weights[None, None], size=(h // 8, w // 8), mode="area")[0, 0]


@pytest.fixture
def vae(tiny):
    return tiny[2]


def test_alpha_masks_follow_resize_crop_and_flip(vae, tmp_path):
    arrays = {name: _write(tmp_path, name, size, i, "RGBA") for i, (name, size) in enumerate(SIZES.items())}
    ds = _dataset(tmp_path, ScanOptions(alpha_mask=True))
    assert all(img.selection.resized_size != img.selection.bucket for img in ds.images)  # every one is cropped
    cache = LatentCache.build(ds, vae, store=MemoryStore(64))
    assert cache.num_masked == 2 * len(SIZES) and "6 with a loss mask" in cache.report_text()
    for img in ds.images:
        alpha = Image.fromarray(arrays[img.key.rsplit("/", 1)[1]][:, :, 3], "L")
        for flipped in (False, True):
            mask = cache.loss_mask(img, flipped)
            assert mask.shape == cache.latent(img, flipped).shape[1:]
            assert torch.equal(mask, _kohya_mask(alpha, img, flipped, red=False)), (img.key, flipped)
        assert not torch.equal(cache.loss_mask(img, True), cache.loss_mask(img, False))


def test_mask_images_use_the_red_channel_and_are_part_of_the_key(vae, tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    for i, (name, size) in enumerate(SIZES.items()):
        _write(data, name, size, i, "RGB")
        _write(masks, name, size, 10 + i, "RGB")
    store = MemoryStore(64)
    options = ScanOptions(mask_dir=str(masks))
    ds = _dataset(data, options, flip=False)
    start = ENCODER_CALLS["vae"]
    cache = LatentCache.build(ds, vae, store=store)
    assert ENCODER_CALLS["vae"] - start == len(SIZES)
    for img in ds.images:
        red = Image.open(img.item.mask.path).convert("RGB").getchannel("R")
        assert torch.equal(cache.loss_mask(img), _kohya_mask(red, img, False, red=True))
    # the same images without masks: other keys, and no mask
    plain = LatentCache.build(_dataset(data, ScanOptions(), flip=False), vae, store=store)
    assert all(plain.loss_mask(i) is None for i in range(len(SIZES)))
    assert {plain.cache_key(i) for i in range(3)}.isdisjoint(cache.cache_key(i) for i in range(3))
    # editing one mask re-encodes exactly that image
    _write(masks, "tall.png", SIZES["tall.png"], 99, "RGB")
    start = ENCODER_CALLS["vae"]
    again = LatentCache.build(_dataset(data, options, flip=False), vae, store=store)
    assert ENCODER_CALLS["vae"] - start == 1
    tall = next(i for i, img in enumerate(again.dataset.images) if img.key.endswith("tall.png"))
    assert not torch.equal(again.loss_mask(tall), cache.loss_mask(tall))


def test_masks_survive_the_disk_cache(vae, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(data, "wide.png", SIZES["wide.png"], 0, "RGBA")
    disk = str(tmp_path / "cache")
    first = LatentCache.build(_dataset(data, ScanOptions(alpha_mask=True)), vae, store=MemoryStore(64), disk_dir=disk)
    start = ENCODER_CALLS["vae"]
    again = LatentCache.build(_dataset(data, ScanOptions(alpha_mask=True)), vae, store=MemoryStore(64), disk_dir=disk)
    assert ENCODER_CALLS["vae"] == start and again.stats.from_disk == 2
    for flipped in (False, True):
        assert torch.equal(again.loss_mask(0, flipped), first.loss_mask(0, flipped))


def test_a_mask_that_is_zero_inside_the_crop_is_refused_by_name(vae, tmp_path):
    arr = np.full((100, 150, 4), 200, dtype=np.uint8)  # resized to 192x128, 32 pixels cut off each side
    arr[:, :, 3] = 0
    arr[:, :15, 3] = 255  # only the left edge counts, and the centre crop cuts it away
    Image.fromarray(arr, "RGBA").save(tmp_path / "edge.png")
    ds = _dataset(tmp_path, ScanOptions(alpha_mask=True), flip=False)
    assert ds.images[0].selection.crop_offset[0] > 0
    with pytest.raises(LatentCacheError, match=r"edge\.png: its loss mask \(alpha channel\) is 0 everywhere"):
        LatentCache.build(ds, vae, store=MemoryStore(64))
