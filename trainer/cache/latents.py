"""VAE latents of a TrainingDataset, encoded once with the VAE ComfyUI already loaded (kohya's cache_latents).

Why cache: the VAE encode is the same every epoch for a fixed image, bucket and flip, so it is done
once up front; the VAE can then be offloaded (trainer/comfyui/training.free_other_models) before training.

What is encoded, per image and (with flip_aug) per flip:
* the pixels exactly as training would see them: decoded with the item's EXIF rule, resized and
  centre-cropped to its bucket (buckets.resize_and_crop), as a ComfyUI IMAGE [B,H,W,C] in 0..1;
  flipped images are flipped in pixel space and encoded for real, as kohya does (a latent is not
  mirror-symmetric under the VAE);
* in batches of ``batch_size`` images of one bucket (batching changes float summation order, so a
  latent encoded in a batch may differ from a single-image encode in the last bits);
* by ``VAE.encode``, which returns the posterior MEAN. kohya uses ``latent_dist.sample()``; the
  mean is deterministic, which is what makes a content-addressed cache valid at all.

Latents are stored UNSCALED (ComfyUI's LATENT convention; SDXL's 0.13025 is applied at train time)
as float32 CPU tensors [4, H/8, W/8] (the VAE's output upcast losslessly, whatever its dtype).

Precision: the VAE runs in its own dtype; ``float32_vae`` runs it in float32 for the caching pass
(kohya's ``--no_half_vae``). Every latent is checked for NaN/inf, and the error names the image.

Keys: a hash of the image BYTES (file content, not path or mtime; decoded pixels for in-graph
images), the EXIF flag, the bucket/resize/crop/flip decision, the VAE weight fingerprint (+ any
patches on its ModelPatcher), the encode dtype and Pillow's version (it decodes and resizes).
Anything else is not an input, so it does not invalidate: moving the dataset folder keeps the cache.

Loss masks (kohya masked_loss / alpha_mask) are part of the entry: the mask's 8-bit pixels follow the image through
the same resize, centre crop and flip, are turned into weights as kohya does and shrunk to latent size with area
interpolation (trainer/objective/masked_loss.py), stored as ``mask`` [h, w] float32 beside the latent. The key then
also holds the mask's content (its file's bytes, or its pixels) and kind; keys of unmasked images are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from ..comfyui import encoders as comfy_encoders
from ..data.buckets import resize_and_crop
from ..data.dataset import BucketedImage, TrainingDataset
from ..data.images import DatasetError
from ..objective.masked_loss import alpha_mask_weights, latent_loss_mask, red_channel_weights
from .dataset_cache import DatasetCache
from .fingerprints import content_key, hash_file, hash_pil_image, module_fingerprint, structure_hash, token_fingerprint
from .lookup import CachedItems, CacheStats
from .stores import (
    ENCODER_CALLS,
    DiskStore,
    ImageRef,
    MemoryStore,
    Tensors,
    memory_store,
)

__all__ = [
    "ENCODER_CALLS",
    "CacheStats",
    "LatentCache",
    "LatentCacheError",
    "NonFiniteLatentError",
    "check_cacheable",
    "image_pixels",
    "vae_fingerprint",
]

#: Bump when anything that turns an image into pixels or pixels into a latent changes meaning.
LATENT_FORMAT = "latent/1"
#: Bump when the way a mask becomes its latent-size weights changes.
MASK_FORMAT = "mask/1"


class LatentCacheError(ValueError):
    """A latent-caching setting or input the user has to change; the message says what to do."""


class NonFiniteLatentError(LatentCacheError):
    """The VAE produced NaN/inf for an image (usually float16 overflow in SDXL's original VAE)."""


def check_cacheable(random_crop: bool, color_aug: bool) -> None:
    """Refuse per-step pixel augmentation with cached latents, as kohya does.

    A cached latent is encoded once, so an augmentation that changes the pixels every step cannot
    be applied to it; silently training on un-augmented latents would ignore the user's setting.
    """
    used = [name for name, on in (("random crop", random_crop), ("color augmentation", color_aug)) if on]
    if used:
        raise LatentCacheError(
            f"{' and '.join(used)} cannot be used with cached latents: a latent is encoded once, so pixel "
            "augmentation that changes every step cannot be applied to it (kohya refuses this too: 'when caching "
            "latents, either color_aug or random_crop cannot be used'). Turn off "
            f"{' and '.join(used)}, or turn off latent caching."
        )


def vae_fingerprint(vae: Any) -> str:
    """Hash of the VAE's weights (memoised per model object) and of any patches on its ModelPatcher."""
    weights = module_fingerprint(comfy_encoders.vae_module(vae), lambda: comfy_encoders.vae_weights(vae))
    token, patches = comfy_encoders.patcher_patches(vae)
    patches_fp = token_fingerprint(("vae", token), lambda: structure_hash(patches))
    return structure_hash({"weights": weights, "patches": patches_fp})


def image_pixels(image: Image.Image) -> torch.Tensor:
    """A bucketed PIL image as ComfyUI IMAGE pixels [H,W,3] float32 in 0..1 (LoadImage's conversion)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).astype(np.float32) / 255.0)


def _image_source_hash(img: BucketedImage, memo: dict[Any, str]) -> str:
    item = img.item
    if item.image is not None:
        token: Any = ("pil", id(item.image))
        if token not in memo:
            memo[token] = "pixels:" + hash_pil_image(item.image)
    else:
        token = ("file", item.image_path)
        if token not in memo:
            try:
                memo[token] = "file:" + hash_file(item.image_path)
            except OSError as e:
                raise LatentCacheError(
                    f"image {item.image_path} cannot be read ({e}); it changed since the dataset "
                    "was scanned: run the dataset node again"
                ) from None
    return memo[token]


def _mask_source_hash(img: BucketedImage, memo: dict[Any, str]) -> str | None:
    """What the mask's pixels are made of (None without a mask): its kind and content."""
    mask = img.item.mask
    if mask is None:
        return None
    if mask.kind == "alpha":
        return "alpha"  # the image's own bytes are in the key already
    if mask.kind == "pixels":
        token: Any = ("mask-pixels", id(mask.pixels))
        if token not in memo:
            memo[token] = "pixels:" + hash_pil_image(mask.pixels)
        return memo[token]
    token = ("mask-file", mask.path)
    if token not in memo:
        try:
            memo[token] = "red:" + hash_file(mask.path)
        except OSError as e:
            raise LatentCacheError(
                f"mask {mask.path} of {img.item.image_path or img.key} cannot be read ({e}); it changed since the "
                "dataset was scanned: run the dataset node again"
            ) from None
    return memo[token]


def _latent_key(
    img: BucketedImage,
    flipped: bool,
    image_hash: str,
    vae_fp: str,
    encode_dtype: torch.dtype,
    mask_hash: str | None = None,
) -> tuple[str, dict]:
    sel = img.selection
    fields = {
        "format": LATENT_FORMAT,
        "image": image_hash,
        "exif_transpose": bool(img.item.exif_transpose) if img.item.image is None else None,
        "original_size": list(sel.original_size),
        "bucket": list(sel.bucket),
        "resized_size": list(sel.resized_size),
        "crop_offset": list(sel.crop_offset),
        "flipped": bool(flipped),
        "vae": vae_fp,
        "vae_dtype": str(encode_dtype),
        "pillow": PIL.__version__,
    }
    if mask_hash is not None:
        fields["mask"] = mask_hash
        fields["mask_format"] = MASK_FORMAT
    return content_key("lat", fields), fields


@dataclass
class _Unit:
    """A latent to encode: one image of the dataset, flipped or not."""

    image: BucketedImage
    index: int
    flipped: bool


def _label(img: BucketedImage, flipped: bool) -> str:
    name = img.item.image_path or img.key
    return f"{name} (bucket {img.selection.bucket[0]}x{img.selection.bucket[1]}{', flipped' if flipped else ''})"


def _validate_latent(tensors: dict[str, torch.Tensor]) -> str | None:
    lat = tensors.get("latent")
    if lat is None or lat.ndim != 3 or lat.dtype != torch.float32:
        return "does not hold a float32 [C,H,W] latent"
    if not torch.isfinite(lat).all():
        return "holds NaN/inf values"
    mask = tensors.get("mask")
    if mask is not None and (mask.dtype != torch.float32 or tuple(mask.shape) != tuple(lat.shape[1:])):
        return "holds a loss mask that does not match its latent"
    return None


def loss_mask_for(unit_image: BucketedImage, flipped: bool) -> torch.Tensor | None:
    """The latent-size loss mask [h, w] of an image (flipped or not), or None when it has no mask.

    kohya's order: 8-bit mask at the image's size -> the image's resize and centre crop -> flip -> weights (alpha/255,
    or the red channel's round trip) -> area interpolation to latent size.
    """
    item = unit_image.item
    if item.mask is None:
        return None
    label = item.image_path or unit_image.key
    try:
        pixels = item.load_mask()
    except DatasetError as e:
        raise LatentCacheError(str(e)) from None
    assert pixels is not None
    cropped = resize_and_crop(pixels, unit_image.selection)
    values = torch.from_numpy(np.array(cropped, dtype=np.uint8))
    if not values.any():
        raise LatentCacheError(
            f"{label}: its loss mask ({item.mask.describe()}) is 0 everywhere inside the bucket's crop "
            f"{unit_image.selection.bucket[0]}x{unit_image.selection.bucket[1]}, so the image would train nothing; "
            "fix the mask, or remove the image from the dataset."
        )
    if flipped:
        values = torch.flip(values, dims=[1])
    weights = red_channel_weights(values) if item.mask.weights == "red" else alpha_mask_weights(values)
    bucket_w, bucket_h = unit_image.selection.bucket
    return latent_loss_mask(weights, (bucket_h // 8, bucket_w // 8))[0, 0].contiguous()


class LatentCache(DatasetCache):
    """Latents for every image (and flip) of a TrainingDataset; see the module docstring."""

    def __init__(
        self,
        dataset: TrainingDataset,
        unit_keys: dict[tuple[int, bool], str],
        latents: dict[str, torch.Tensor],
        stats: CacheStats,
        warnings: list[str],
        encode_dtype: torch.dtype,
        float32_vae: bool,
        disk_dir: str | None,
        batch_size: int,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__(dataset, latents, stats, warnings, disk_dir)
        self._unit_keys = unit_keys
        self._latents = latents
        self.encode_dtype = encode_dtype
        self.float32_vae = float32_vae
        self.batch_size = batch_size
        self._masks = dict(masks or {})  # latent-size loss masks [h, w], by the same keys as the latents

    # -- build -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        dataset: TrainingDataset,
        vae: Any,
        *,
        batch_size: int = 1,
        float32_vae: bool = False,
        disk_dir: str | None = None,
        random_crop: bool = False,
        color_aug: bool = False,
        store: MemoryStore | None = None,
        progress: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> LatentCache:
        """Look every latent up (memory, then disk) and encode only the missing ones.

        ``store`` defaults to the process-level memory store; ``disk_dir`` adds the disk cache.
        ``progress(done, total)`` is called after each encoded batch and ``check_interrupt()`` before
        each (it should raise to cancel; items already encoded stay cached).
        """
        check_cacheable(random_crop, color_aug)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LatentCacheError(f"VAE batch size must be a whole number >= 1, got {batch_size!r}")
        store = memory_store() if store is None else store
        disk = DiskStore(disk_dir) if disk_dir else None
        encode_dtype = torch.float32 if float32_vae else comfy_encoders.vae_dtype(vae)
        vae_fp = vae_fingerprint(vae)

        items: CachedItems[_Unit] = CachedItems(store, disk, _validate_latent, "latent")
        unit_keys: dict[tuple[int, bool], str] = {}
        hash_memo: dict[Any, str] = {}
        for index, img in enumerate(dataset.cached_images):
            image_hash = _image_source_hash(img, hash_memo)
            mask_hash = _mask_source_hash(img, hash_memo)
            for flipped in (False, True) if img.flip_aug else (False,):
                key, fields = _latent_key(img, flipped, image_hash, vae_fp, encode_dtype, mask_hash)
                unit_keys[(index, flipped)] = key
                items.lookup(key, fields, _Unit(img, index, flipped))

        if items.pending:
            with comfy_encoders.vae_in_float32(vae, float32_vae) as encoder:

                def encode_batch(batch: list[_Unit]) -> list[Tensors]:
                    ENCODER_CALLS["vae"] += 1
                    out = comfy_encoders.encode_pixels(encoder, _batch_pixels(batch)).to("cpu", torch.float32)
                    bad = [u for j, u in enumerate(batch) if not torch.isfinite(out[j]).all()]
                    if bad:
                        raise NonFiniteLatentError(_non_finite_message(bad, encode_dtype, float32_vae))
                    entries: list[Tensors] = []
                    for j, unit in enumerate(batch):
                        entry = {"latent": out[j].clone()}
                        mask = loss_mask_for(unit.image, unit.flipped)
                        if mask is not None:
                            if tuple(mask.shape) != tuple(out[j].shape[1:]):
                                raise LatentCacheError(
                                    f"{_label(unit.image, unit.flipped)}: the VAE's latent is "
                                    f"{tuple(out[j].shape[1:])} but the loss mask {tuple(mask.shape)}; the VAE "
                                    "does not downscale by 8 as SDXL's does."
                                )
                            entry["mask"] = mask
                        entries.append(entry)
                    return entries

                items.encode(_bucket_batches(items.pending, batch_size), encode_batch, progress, check_interrupt)
        latents = {key: tensors["latent"] for key, tensors in items.tensors.items()}
        masks = {key: tensors["mask"] for key, tensors in items.tensors.items() if "mask" in tensors}
        return cls(
            dataset,
            unit_keys,
            latents,
            items.stats,
            items.warnings,
            encode_dtype,
            float32_vae,
            disk_dir,
            batch_size,
            masks,
        )

    # -- access ------------------------------------------------------------------------------
    def latent(self, image: ImageRef, flipped: bool = False) -> torch.Tensor:
        """The cached UNSCALED latent [C, H/8, W/8] (float32, CPU) of an image, flipped or not.

        ``image`` is an index into ``dataset.images``, an image key, or the BucketedImage. The tensor
        is shared with the cache (possibly an inference tensor): clone before modifying or training.
        """
        i = self._index.index(image)
        key = self._unit_keys.get((i, bool(flipped)))
        if key is None:
            raise KeyError(f"no flipped latent for {self._index.images[i].key!r}: flip_aug is off for its subset")
        return self._latents[key]

    def loss_mask(self, image: ImageRef, flipped: bool = False) -> torch.Tensor | None:
        """The latent-size loss mask [h, w] (float32, CPU) stored with the image's latent, or None without a mask."""
        i = self._index.index(image)
        key = self._unit_keys.get((i, bool(flipped)))
        return None if key is None else self._masks.get(key)

    @property
    def num_masked(self) -> int:
        """Latents (image x flip) that carry a loss mask."""
        return sum(1 for key in self._unit_keys.values() if key in self._masks)

    def has_flipped(self, image: ImageRef) -> bool:
        return (self._index.index(image), True) in self._unit_keys

    def cache_key(self, image: ImageRef, flipped: bool = False) -> str:
        return self._unit_keys[(self._index.index(image), bool(flipped))]

    def __len__(self) -> int:
        return len(self._unit_keys)

    # -- report ------------------------------------------------------------------------------
    def report_json(self) -> dict[str, Any]:
        return {
            "latents": len(self._unit_keys),
            **self.stats.as_dict(),
            "size_mb": round(self.size_mb, 3),
            "disk_dir": self.disk_dir,
            "disk_size_mb": round(self.disk_size_mb(), 3),
            "vae_dtype": str(self.encode_dtype).replace("torch.", ""),
            "float32_vae": self.float32_vae,
            "batch_size": self.batch_size,
            "masked": self.num_masked,
            "warnings": list(self.warnings),
        }

    def report_text(self) -> str:
        s = self.stats
        n_img = len(self._index.images)
        n_flip = sum(1 for (_, f) in self._unit_keys if f)
        lines = [
            f"latents: {len(self._unit_keys)} for {n_img} images"
            + (f" ({n_flip} flipped)" if n_flip else "")
            + (f", {s.items} unique" if s.items != len(self._unit_keys) else ""),
            f"  encoded {s.encoded} in {s.encoder_calls} VAE calls (batch size {self.batch_size}), "
            f"from memory {s.from_memory}, from disk {s.from_disk}"
            + (f", rebuilt {s.rebuilt} corrupted disk files" if s.rebuilt else ""),
            self.size_line("float32, unscaled"),
            *([f"  {self.num_masked} with a loss mask (masked loss)"] if self.num_masked else []),
            f"  VAE ran in {str(self.encode_dtype).replace('torch.', '')}"
            + (" (float32 VAE option, kohya's no_half_vae)" if self.float32_vae else ""),
            *self.warning_lines(),
        ]
        return "\n".join(lines)


def _bucket_batches(pending: Mapping[str, _Unit], batch_size: int) -> list[list[str]]:
    """Keys in batches of at most ``batch_size`` latents of one bucket (a VAE call takes one image size)."""
    by_bucket: dict[tuple[int, int], list[str]] = {}
    for key, unit in pending.items():
        by_bucket.setdefault(tuple(unit.image.selection.bucket), []).append(key)
    return [keys[i : i + batch_size] for _, keys in sorted(by_bucket.items()) for i in range(0, len(keys), batch_size)]


def _batch_pixels(batch: list[_Unit]) -> torch.Tensor:
    """IMAGE pixels [B,H,W,3] for a batch of one bucket; an image needed twice (flips) is decoded once."""
    decoded: dict[int, torch.Tensor] = {}
    rows = []
    for unit in batch:
        if unit.index not in decoded:
            pil = resize_and_crop(unit.image.item.load_rgb(), unit.image.selection)
            decoded[unit.index] = image_pixels(pil)
        px = decoded[unit.index]
        rows.append(torch.flip(px, dims=[1]) if unit.flipped else px)
    return torch.stack(rows)


def _non_finite_message(bad: list[_Unit], dtype: torch.dtype, float32_vae: bool) -> str:
    names = "; ".join(_label(u.image, u.flipped) for u in bad[:5]) + (
        f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    )
    if float32_vae or dtype == torch.float32:
        fix = (
            "The VAE already ran in float32, so check the image and the VAE "
            "(a broken VAE file or an image of extreme values)."
        )
    else:
        fix = (
            f"The VAE ran in {str(dtype).replace('torch.', '')}, where SDXL's original VAE overflows: turn on the "
            "'float32 VAE' option (kohya's --no_half_vae), or load an fp16-fixed SDXL VAE "
            "(madebyollin/sdxl-vae-fp16-fix)."
        )
    return f"The VAE produced NaN/inf latents for {names}. {fix}"
