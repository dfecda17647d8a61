"""trainer/cache/latents.py on ComfyUI's own VAE class (tiny SDXL VAE, CPU).

Every invalidation case counts real VAE calls (ENCODER_CALLS) with batch size 1, so "re-encodes
exactly the changed items" is checked as an equality, never as "at least".
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sdxl_lora_trainer.trainer.cache import fingerprints, stores
from sdxl_lora_trainer.trainer.cache import latents as lc
from sdxl_lora_trainer.trainer.cache.latents import LatentCache, LatentCacheError, NonFiniteLatentError, check_cacheable
from sdxl_lora_trainer.trainer.cache.stores import ENCODER_CALLS, MemoryStore
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings, resize_and_crop
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.dataset import bucket_images, training_dataset
from sdxl_lora_trainer.trainer.data.sources import ScanOptions, items_from_images, scan_folder

# (file name, (W, H), seed, caption); two buckets at resolution 128 / step 64
IMAGES = [
    ("a.png", (128, 128), 1, "a red cube"),
    ("b.png", (200, 80), 2, "a wide strip"),
    ("c.png", (96, 160), 3, "a tall thing"),
    ("d.png", (130, 120), 4, "almost square"),
]


def _write_png(path, size, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _make_folder(root, images=IMAGES):
    root.mkdir(parents=True, exist_ok=True)
    for name, size, seed, caption in images:
        _write_png(root / name, size, seed)
        (root / name).with_suffix(".txt").write_text(caption)
    return root


def _dataset(root, *, flip=False, resolution=(128, 128), step=64, exif=True, batch_size=1):
    scan = scan_folder(root, options=ScanOptions(exif_transpose=exif))
    settings = BucketSettings(resolution=resolution, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=step)
    part = bucket_images(scan, settings, batch_size, CaptionOptions(), flip_aug=flip)
    return training_dataset([part], [scan])


def _direct(vae, img, flipped=False):
    """The reference: ComfyUI's VAE.encode of the bucketed pixels, converted like LoadImage does."""
    pil = resize_and_crop(img.item.load_rgb(), img.selection)
    if flipped:
        pil = ImageOps.mirror(pil)
    px = torch.from_numpy(np.array(pil).astype(np.float32) / 255.0)[None]
    with torch.inference_mode():
        return vae.encode(px)[0]


class Calls:
    """ENCODER_CALLS['vae'] delta over a block."""

    def __enter__(self):
        self.start = ENCODER_CALLS["vae"]
        return self

    def __exit__(self, *exc):
        self.n = ENCODER_CALLS["vae"] - self.start


@pytest.fixture
def vae(tiny):
    return tiny[2]


@pytest.fixture
def store():
    return MemoryStore(capacity_mb=256)


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "data")


# -- correctness ---------------------------------------------------------------------------------


def test_cached_latents_equal_direct_vae_encode(vae, store, folder):
    ds = _dataset(folder, flip=True)
    with Calls() as calls:
        cache = LatentCache.build(ds, vae, batch_size=1, store=store)
    n = len(ds.images)
    assert calls.n == 2 * n and cache.stats.encoded == 2 * n and cache.stats.encoder_calls == 2 * n
    assert len({tuple(img.selection.bucket) for img in ds.images}) >= 2
    for i, img in enumerate(ds.images):
        w, h = img.selection.bucket
        lat = cache.latent(i)
        assert lat.shape == (4, h // 8, w // 8) and lat.dtype == torch.float32 and lat.device.type == "cpu"
        assert torch.equal(lat, _direct(vae, img)), img.key  # bit-exact and unscaled
        flipped = cache.latent(i, flipped=True)
        assert torch.equal(flipped, _direct(vae, img, flipped=True)), img.key
        # a real encode of the mirrored pixels, not a mirrored latent
        assert not torch.equal(flipped, torch.flip(lat, dims=[2]))


def test_batched_encode_matches_direct_batch_encode(vae, store, tmp_path):
    same_bucket = [(f"{i}.png", (128, 128), 10 + i, f"img {i}") for i in range(3)]
    ds = _dataset(_make_folder(tmp_path / "d", same_bucket))
    with Calls() as calls:
        cache = LatentCache.build(ds, vae, batch_size=3, store=store)
    assert calls.n == 1 and cache.stats.encoded == 3
    px = torch.stack(
        [
            torch.from_numpy(np.array(resize_and_crop(img.item.load_rgb(), img.selection)).astype(np.float32) / 255.0)
            for img in ds.images
        ]
    )
    with torch.inference_mode():
        ref = vae.encode(px)
    for i in range(3):
        assert torch.equal(cache.latent(i), ref[i])


def test_batches_never_mix_buckets_and_respect_batch_size(vae, store, folder, monkeypatch):
    ds = _dataset(folder, flip=True)
    buckets: dict = {}
    for img in ds.images:
        buckets[tuple(img.selection.bucket)] = buckets.get(tuple(img.selection.bucket), 0) + 2
    seen = []
    real = lc.comfy_encoders.encode_pixels

    def spy(v, pixels):
        seen.append(tuple(pixels.shape))
        return real(v, pixels)

    monkeypatch.setattr(lc.comfy_encoders, "encode_pixels", spy)
    LatentCache.build(ds, vae, batch_size=3, store=store)
    expected = sorted(
        (b[1], b[0], k) for (b, n) in buckets.items() for k in [3] * (n // 3) + ([n % 3] if n % 3 else [])
    )
    assert sorted((s[1], s[2], s[0]) for s in seen) == expected


def test_in_graph_images_are_keyed_by_pixels(vae, store):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)

    def ds_of(a):
        scan = items_from_images([Image.fromarray(a)], "cap")
        part = bucket_images(
            scan, BucketSettings(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256), 1, CaptionOptions()
        )
        return training_dataset([part], [scan])

    first = LatentCache.build(ds_of(arr), vae, store=store)
    assert first.stats.encoded == 1
    with Calls() as calls:
        LatentCache.build(ds_of(arr.copy()), vae, store=store)  # a new PIL object with the same pixels
    assert calls.n == 0
    arr2 = arr.copy()
    arr2[5, 5, 0] ^= 1
    with Calls() as calls:
        LatentCache.build(ds_of(arr2), vae, store=store)
    assert calls.n == 1


# -- re-use and invalidation ---------------------------------------------------------------------


def test_second_build_does_no_vae_work(vae, store, folder):
    ds = _dataset(folder, flip=True)
    first = LatentCache.build(ds, vae, store=store)
    with Calls() as calls:
        again = LatentCache.build(_dataset(folder, flip=True), vae, store=store)
    assert calls.n == 0
    assert again.stats.encoded == 0 and again.stats.from_memory == 2 * len(ds.images)
    for i in range(len(ds.images)):
        assert torch.equal(again.latent(i), first.latent(i))
        assert torch.equal(again.latent(i, True), first.latent(i, True))


def test_edited_image_bytes_reencode_exactly_that_image(vae, store, folder):
    LatentCache.build(_dataset(folder, flip=True), vae, store=store)
    _write_png(folder / "b.png", (200, 80), seed=99)  # same size, other pixels
    ds = _dataset(folder, flip=True)
    with Calls() as calls:
        cache = LatentCache.build(ds, vae, store=store)
    assert calls.n == 2 and cache.stats.encoded == 2  # the image and its flip
    b = next(i for i, img in enumerate(ds.images) if img.key.endswith("b.png"))
    assert torch.equal(cache.latent(b), _direct(vae, ds.images[b]))


def test_edited_caption_or_touched_file_does_not_reencode_latents(vae, store, folder):
    import os
    import time

    LatentCache.build(_dataset(folder), vae, store=store)
    (folder / "a.txt").write_text("a completely different caption")
    t = time.time() + 50
    os.utime(folder / "c.png", (t, t))
    with Calls() as calls:
        LatentCache.build(_dataset(folder), vae, store=store)
    assert calls.n == 0


def test_moved_dataset_folder_is_still_a_hit(vae, store, folder, tmp_path):
    LatentCache.build(_dataset(folder), vae, store=store)
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(folder, moved)
    with Calls() as calls:
        LatentCache.build(_dataset(moved), vae, store=store)
    assert calls.n == 0


def test_identical_images_are_encoded_once(vae, store, tmp_path):
    root = _make_folder(tmp_path / "d", [("x.png", (128, 128), 5, "x")])
    shutil.copy(root / "x.png", root / "y.png")
    ds = _dataset(root)
    with Calls() as calls:
        cache = LatentCache.build(ds, vae, store=store)
    assert len(ds.images) == 2 and calls.n == 1
    assert cache.stats.items == 1 and cache.cache_key(0) == cache.cache_key(1)


def test_changed_bucket_settings_reencode_exactly_the_changed_images(vae, store, folder):
    before = _dataset(folder, step=64)
    LatentCache.build(before, vae, store=store)
    after = _dataset(folder, step=32)
    changed = [
        a.key
        for a, b in zip(before.images, after.images)
        if (a.selection.bucket, a.selection.resized_size, a.selection.crop_offset)
        != (b.selection.bucket, b.selection.resized_size, b.selection.crop_offset)
    ]
    assert 0 < len(changed) < len(before.images)  # a partial change, so the count below means something
    with Calls() as calls:
        cache = LatentCache.build(after, vae, store=store)
    assert calls.n == len(changed) and cache.stats.from_memory == len(before.images) - len(changed)


def test_turning_flip_on_encodes_only_the_flipped_latents(vae, store, folder):
    LatentCache.build(_dataset(folder), vae, store=store)
    with Calls() as calls:
        cache = LatentCache.build(_dataset(folder, flip=True), vae, store=store)
    assert calls.n == len(IMAGES) and cache.stats.from_memory == len(IMAGES)


def test_exif_transpose_flag_is_part_of_the_key(vae, store, folder):
    LatentCache.build(_dataset(folder, exif=True), vae, store=store)
    with Calls() as calls:
        LatentCache.build(_dataset(folder, exif=False), vae, store=store)
    assert calls.n == len(IMAGES)


def test_other_vae_weights_reencode_everything(vae, store, folder):
    import tiny_sdxl

    LatentCache.build(_dataset(folder), vae, store=store)
    other = tiny_sdxl.make_vae(seed=7)
    ds = _dataset(folder)
    with Calls() as calls:
        cache = LatentCache.build(ds, other, store=store)
    assert calls.n == len(IMAGES)
    assert torch.equal(cache.latent(0), _direct(other, ds.images[0]))
    with Calls() as calls:
        LatentCache.build(_dataset(folder), vae, store=store)  # the first VAE's latents are still cached
    assert calls.n == 0


def test_vae_fingerprint_is_memoised_per_model_object(vae):
    import tiny_sdxl

    fp = lc.vae_fingerprint(vae)
    n = fingerprints.FINGERPRINT_COMPUTATIONS["modules"]
    assert lc.vae_fingerprint(vae) == fp
    assert fingerprints.FINGERPRINT_COMPUTATIONS["modules"] == n
    same_weights = tiny_sdxl.make_vae(seed=2)  # the fixture's VAE seed: equal weights, another object
    assert lc.vae_fingerprint(same_weights) == fp
    assert fingerprints.FINGERPRINT_COMPUTATIONS["modules"] == n + 1


# -- disk ----------------------------------------------------------------------------------------


def test_disk_cache_survives_a_restart(vae, folder, tmp_path):
    disk = tmp_path / "latent_cache"
    ds = _dataset(folder, flip=True)
    first = LatentCache.build(ds, vae, disk_dir=str(disk), store=MemoryStore(256))
    files = sorted(disk.glob("*.safetensors"))
    assert len(files) == 2 * len(IMAGES)
    assert first.disk_size_mb() > 0
    with Calls() as calls:  # a fresh process: empty memory store, same folder
        again = LatentCache.build(_dataset(folder, flip=True), vae, disk_dir=str(disk), store=MemoryStore(256))
    assert calls.n == 0 and again.stats.from_disk == 2 * len(IMAGES) and again.warnings == []
    for i in range(len(IMAGES)):
        assert torch.equal(again.latent(i), first.latent(i)) and torch.equal(
            again.latent(i, True), first.latent(i, True)
        )


def test_turning_disk_caching_on_writes_memory_hits_through_to_disk(vae, store, folder, tmp_path, monkeypatch):
    disk = tmp_path / "latent_cache"
    first = LatentCache.build(_dataset(folder, flip=True), vae, store=store)  # memory only
    with Calls() as calls:  # the same process, now with the disk cache on
        on = LatentCache.build(_dataset(folder, flip=True), vae, disk_dir=str(disk), store=store)
    assert calls.n == 0 and on.stats.from_memory == 2 * len(IMAGES) and on.warnings == []
    assert len(list(disk.glob("*.safetensors"))) == 2 * len(IMAGES)
    with Calls() as calls:  # a restart: empty memory store, same folder
        again = LatentCache.build(_dataset(folder, flip=True), vae, disk_dir=str(disk), store=MemoryStore(256))
    assert calls.n == 0 and again.stats.from_disk == 2 * len(IMAGES) and again.warnings == []
    for i in range(len(IMAGES)):
        assert torch.equal(again.latent(i), first.latent(i)) and torch.equal(
            again.latent(i, True), first.latent(i, True)
        )
    writes = []
    monkeypatch.setattr(stores.DiskStore, "write", lambda self, key, *a, **k: writes.append(key))
    LatentCache.build(_dataset(folder, flip=True), vae, disk_dir=str(disk), store=store)
    assert writes == []  # a memory hit the disk already holds is not written again


def test_corrupted_and_truncated_disk_files_are_rebuilt_with_a_warning(vae, folder, tmp_path):
    disk = tmp_path / "latent_cache"
    ds = _dataset(folder)
    first = LatentCache.build(ds, vae, disk_dir=str(disk), store=MemoryStore(256))
    corrupt_path = disk / f"{first.cache_key(0)}.safetensors"
    truncated_path = disk / f"{first.cache_key(2)}.safetensors"
    data = bytearray(corrupt_path.read_bytes())
    data[-3] ^= 0x55
    corrupt_path.write_bytes(bytes(data))
    truncated_path.write_bytes(truncated_path.read_bytes()[:-50])
    with Calls() as calls:
        cache = LatentCache.build(_dataset(folder), vae, disk_dir=str(disk), store=MemoryStore(256))
    assert calls.n == 2
    assert cache.stats.rebuilt == 2 and cache.stats.from_disk == len(IMAGES) - 2
    assert len(cache.warnings) == 2
    assert any(str(corrupt_path) in w and "checksum" in w for w in cache.warnings)
    assert any(str(truncated_path) in w for w in cache.warnings)
    assert "rebuilt 2" in cache.report_text()
    for i in range(len(IMAGES)):
        assert torch.equal(cache.latent(i), first.latent(i))
    with Calls() as calls:  # the rebuilt files are valid
        LatentCache.build(_dataset(folder), vae, disk_dir=str(disk), store=MemoryStore(256))
    assert calls.n == 0


def test_unwritable_disk_folder_falls_back_to_memory(vae, store, folder, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stores.DiskStore, "write", full)
    cache = LatentCache.build(_dataset(folder), vae, disk_dir=str(tmp_path / "c"), store=store)
    assert cache.stats.encoded == len(IMAGES)
    assert len(cache.warnings) == 1 and "No space left" in cache.warnings[0]


# -- precision and refusals ----------------------------------------------------------------------


def _bf16_vae():
    import comfy.sd
    import tiny_sdxl

    ref = tiny_sdxl.make_vae(seed=2)
    return comfy.sd.VAE(
        sd=ref.first_stage_model.state_dict(),
        config=tiny_sdxl.VAE_CONFIG,
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
    )


def test_nan_latent_names_the_image_and_suggests_float32(store, folder, monkeypatch):
    vae = _bf16_vae()
    real = vae.encode

    def nan_for_wide(pixels):
        out = real(pixels)
        if pixels.shape[2] > pixels.shape[1]:  # only the wide image's bucket
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(vae, "encode", nan_for_wide)
    with pytest.raises(NonFiniteLatentError) as err:
        LatentCache.build(_dataset(folder), vae, store=store)
    msg = str(err.value)
    assert "b.png" in msg and "a.png" not in msg
    assert "float32" in msg and "bfloat16" in msg and "no_half_vae" in msg
    stored = [store.get(k)["latent"] for k in list(store._items)]
    assert len(stored) == 3 and all(torch.isfinite(t).all() for t in stored)  # the other buckets' images only


def test_inf_latent_is_refused_too(store, folder, monkeypatch, tiny):
    import tiny_sdxl

    vae = tiny_sdxl.make_vae(seed=2)
    monkeypatch.setattr(
        vae, "encode", lambda px: torch.full((px.shape[0], 4, px.shape[1] // 8, px.shape[2] // 8), float("inf"))
    )
    with pytest.raises(NonFiniteLatentError, match="already ran in float32"):
        LatentCache.build(_dataset(folder), vae, store=store)


def test_float32_vae_option(store, folder):
    import comfy.sd

    vae = _bf16_vae()
    ds = _dataset(folder)
    params = {n: (p.dtype, p.data_ptr()) for n, p in vae.first_stage_model.named_parameters()}
    seen_dtypes = set()
    spy = vae.first_stage_model.encoder.conv_in.register_forward_pre_hook(
        lambda m, args: seen_dtypes.add((m.weight.dtype, args[0].dtype))
    )
    try:
        cache = LatentCache.build(ds, vae, float32_vae=True, store=store)
    finally:
        spy.remove()
    # ComfyUI's VAE is never changed, not even while it encodes: its weights stay bf16 tensors (a float32
    # pass casts them per layer); the float32 arithmetic shows in the input dtype
    assert seen_dtypes == {(torch.bfloat16, torch.float32)}
    assert {n: (p.dtype, p.data_ptr()) for n, p in vae.first_stage_model.named_parameters()} == params
    assert vae.vae_dtype == torch.bfloat16
    assert cache.encode_dtype == torch.float32 and "no_half_vae" in cache.report_text()
    # = a float32 VAE holding the same (bf16-rounded) weights
    import tiny_sdxl

    rounded = {k: v.float() for k, v in vae.first_stage_model.state_dict().items()}
    fp32 = comfy.sd.VAE(sd=rounded, config=tiny_sdxl.VAE_CONFIG, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(cache.latent(0), _direct(fp32, ds.images[0]).float())
    with Calls() as calls:  # bf16 latents are other inputs
        half = LatentCache.build(_dataset(folder), vae, float32_vae=False, store=store)
    assert calls.n == len(IMAGES) and half.encode_dtype == torch.bfloat16
    assert torch.equal(half.latent(0), _direct(vae, ds.images[0]).float())
    assert not torch.equal(half.latent(0), cache.latent(0))


@pytest.mark.parametrize("random_crop,color_aug", [(True, False), (False, True), (True, True)])
def test_random_crop_and_color_aug_are_refused(vae, store, folder, random_crop, color_aug):
    with pytest.raises(LatentCacheError, match="cannot be used with cached latents"):
        check_cacheable(random_crop, color_aug)
    with Calls() as calls, pytest.raises(LatentCacheError):
        LatentCache.build(_dataset(folder), vae, store=store, random_crop=random_crop, color_aug=color_aug)
    assert calls.n == 0
    check_cacheable(False, False)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_batch_size(vae, store, folder, bad):
    with pytest.raises(LatentCacheError):
        LatentCache.build(_dataset(folder), vae, store=store, batch_size=bad)


# -- access and report ---------------------------------------------------------------------------


def test_latent_lookup_by_index_key_and_image(vae, store, folder):
    ds = _dataset(folder)
    cache = LatentCache.build(ds, vae, store=store)
    img = ds.images[1]
    assert cache.latent(1) is cache.latent(img.key) is cache.latent(img)
    assert cache.has_flipped(1) is False
    with pytest.raises(KeyError, match="flip_aug is off"):
        cache.latent(1, flipped=True)
    with pytest.raises(IndexError):
        cache.latent(len(ds.images))
    with pytest.raises(KeyError):
        cache.latent("nope.png")


def test_report_and_sizes(vae, store, folder):
    ds = _dataset(folder, flip=True)
    cache = LatentCache.build(ds, vae, store=store, batch_size=2)
    expected = sum(4 * (img.selection.bucket[0] // 8) * (img.selection.bucket[1] // 8) * 4 * 2 for img in ds.images)
    assert cache.size_bytes == expected
    text = cache.report_text()
    assert f"latents: {2 * len(IMAGES)} for {len(IMAGES)} images ({len(IMAGES)} flipped)" in text
    assert f"encoded {2 * len(IMAGES)}" in text and "MB" in text and "float32" in text
    js = cache.report_json()
    assert js["encoded"] == 2 * len(IMAGES) and js["size_mb"] == pytest.approx(expected / 2**20, abs=1e-3)


def test_progress_and_interrupt_callbacks(vae, store, folder):
    seen = []
    LatentCache.build(_dataset(folder), vae, store=store, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (len(IMAGES), len(IMAGES)) and len(seen) == len(IMAGES)

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled()

    with pytest.raises(Cancelled), Calls() as calls:
        LatentCache.build(_dataset(folder, flip=True), vae, store=MemoryStore(64), check_interrupt=cancel)
    assert calls.n == 0


def test_image_deleted_after_scanning_is_a_clear_error(vae, store, folder):
    ds = _dataset(folder)
    (folder / "c.png").unlink()
    with pytest.raises(LatentCacheError, match="c.png cannot be read"):
        LatentCache.build(ds, vae, store=store)
