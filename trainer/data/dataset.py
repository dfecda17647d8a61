"""A bucketed training dataset: scanned images + kohya bucket selection + size conditioning + batching.

This is what flows from the bucket node to the cache and train nodes. It holds no pixels and no
latents, only decisions (bucket, resize, crop, time_ids, captions, repeats), so it is cheap to pass
around, and its report says exactly what kohya would train on.

A kohya TOML can hold several ``[[datasets]]`` with their own bucket settings and batch size; each
becomes one ``DatasetPart``. Batches never mix parts or buckets (kohya's DatasetGroup).

Images held out by a ``validation_split`` form ``validation_parts`` (kohya's validation DatasetGroup: same bucket
settings and batch size, each image once). They are cached with the training images and never trained on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .bucket_batches import Batch, BucketBatcher, TrainItem, batches_per_epoch
from .buckets import BucketSelection, BucketSelector, BucketSettings, EmptyBucketError
from .captions import CaptionOptions
from .size_conditioning import SizeConditioning, size_conditioning
from .sources import DatasetItem, ScanResult, skip_line

#: a kohya subset option: one value for the whole dataset, or one per DatasetItem.subset_index (a TOML's subsets)
OptionsBySubset = CaptionOptions | Mapping[int, CaptionOptions]
FlipBySubset = bool | Mapping[int, bool]


@dataclass(frozen=True)
class BucketedImage:
    item: DatasetItem
    selection: BucketSelection
    conditioning: SizeConditioning
    conditioning_flipped: SizeConditioning
    caption_options: CaptionOptions
    flip_aug: bool = False  # kohya: a subset option; flipped samples use conditioning_flipped

    @property
    def key(self) -> str:
        return self.item.key

    def time_ids(self, flipped: bool) -> tuple[int, ...]:
        return (self.conditioning_flipped if flipped else self.conditioning).time_ids


@dataclass(frozen=True)
class DatasetPart:
    """One kohya dataset: its bucket settings, batch size and images.

    ``scanned``: the items as the user gave them, before kohya's registration balanced the reg images' repeats
    (and left out reg images it did not need), with the subset options they were given (``caption_options``,
    ``flip_aug``, ``dreambooth``): what a kohya dataset config must hold to make kohya register the same images.
    """

    settings: BucketSettings
    batch_size: int
    true_crop: bool
    images: tuple[BucketedImage, ...]
    used_buckets: tuple[tuple[int, int], ...]
    scanned: tuple[DatasetItem, ...] = ()
    caption_options: OptionsBySubset = CaptionOptions()
    flip_aug: FlipBySubset = False
    dreambooth: bool = True
    validation_split: float = 0.0  # kohya's dataset parameter: the share of ``scanned`` held out for validation
    validation_seed: int | None = None

    def subset_caption_options(self, subset_index: int) -> CaptionOptions:
        opts = self.caption_options
        return opts if isinstance(opts, CaptionOptions) else opts[subset_index]

    def subset_flip_aug(self, subset_index: int) -> bool:
        return self.flip_aug if isinstance(self.flip_aug, bool) else bool(self.flip_aug[subset_index])

    def train_items(self) -> list[TrainItem]:
        return [
            TrainItem(key=i, bucket=img.selection.bucket, num_repeats=img.item.num_repeats)
            for i, img in enumerate(self.images)
        ]

    def num_batches(self) -> int:
        return batches_per_epoch(self.train_items(), self.batch_size)


@dataclass(frozen=True)
class TrainingDataset:
    """The dataset nodes' value, frozen: ComfyUI keeps a node's output cached and hands the same object to every
    node downstream, so no consumer may change it."""

    parts: tuple[DatasetPart, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    seed: int = 0
    validation_parts: tuple[DatasetPart, ...] = ()  # the images a validation_split held out, per part
    validation_split: float = 0.0  # as set for the dataset (kohya's dataset parameter), for metadata and export
    validation_seed: int | None = None

    # -- counts ------------------------------------------------------------------------------
    @property
    def images(self) -> list[BucketedImage]:
        """The training images."""
        return [img for part in self.parts for img in part.images]

    @property
    def validation_images(self) -> list[BucketedImage]:
        return [img for part in self.validation_parts for img in part.images]

    @property
    def cached_images(self) -> list[BucketedImage]:
        """Every image the caches encode: the training images, then the validation images."""
        return self.images + self.validation_images

    def num_batches(self) -> int:
        """Batches per epoch = kohya's len(train_dataloader)."""
        return sum(part.num_batches() for part in self.parts)

    def steps_per_epoch(self, gradient_accumulation_steps: int = 1) -> int:
        n = self.num_batches()
        return -(-n // gradient_accumulation_steps)

    def image_counts(self) -> dict[str, int]:
        """Train and reg image counts as kohya reports them (``num_train_images`` / ``num_reg_images`` include
        repeats; kohya's num_reg_images counts every reg image given, also those its balancing did not register)."""
        train = [img.item for img in self.images if not img.item.is_reg]
        reg = [img.item for img in self.images if img.item.is_reg]
        return {
            "train_images": len(train),
            "num_train_images": sum(it.num_repeats for it in train),
            "reg_images": len(reg),
            "reg_images_with_repeats": sum(it.num_repeats for it in reg),
            "num_reg_images": sum(it.num_repeats for p in self.parts for it in p.scanned if it.is_reg),
            "masked_images": sum(1 for img in self.images if img.item.mask is not None),
        }

    def bucket_histogram(self) -> list[tuple[tuple[int, int], int, int]]:
        """(bucket, images, images with repeats) for every used bucket, sorted like kohya's bucket list."""
        counts: dict[tuple[int, int], list[int]] = {}
        for img in self.images:
            c = counts.setdefault(tuple(img.selection.bucket), [0, 0])
            c[0] += 1
            c[1] += img.item.num_repeats
        return [(b, c[0], c[1]) for b, c in sorted(counts.items())]

    # -- batches -----------------------------------------------------------------------------
    def batchers(self, seed: int) -> list[BucketBatcher]:
        return [BucketBatcher(part.train_items(), part.batch_size, seed=seed) for part in self.parts]

    def epoch_batches(self, epoch: int, seed: int) -> list[tuple[int, Batch]]:
        """All (part index, batch) of an epoch, in kohya's per-epoch composition (seed + epoch).

        kohya reshuffles each epoch from the previous epoch's order, so epochs are replayed from 0;
        that costs a few list shuffles and makes any epoch computable on resume.
        """
        out: list[tuple[int, Batch]] = []
        for p, batcher in enumerate(self.batchers(seed)):
            for e in range(1, epoch + 1):
                batcher.set_current_epoch(e)
            out.extend((p, b) for b in batcher.batches())
        return out

    # -- report ------------------------------------------------------------------------------
    def report_json(self) -> dict[str, Any]:
        return {
            "num_images": len(self.images),
            "num_images_with_repeats": sum(img.item.num_repeats for img in self.images),
            **self.image_counts(),
            "batches_per_epoch": self.num_batches(),
            "num_validation_images": len(self.validation_images),
            "validation_images": [img.item.image_path or img.key for img in self.validation_images],
            "parts": [
                {
                    "resolution": list(p.settings.resolution),
                    "enable_bucket": p.settings.enable_bucket,
                    "min_bucket_reso": p.settings.min_bucket_reso,
                    "max_bucket_reso": p.settings.max_bucket_reso,
                    "bucket_reso_steps": p.settings.bucket_reso_steps,
                    "bucket_no_upscale": p.settings.bucket_no_upscale,
                    "batch_size": p.batch_size,
                    "true_crop": p.true_crop,
                    "batches_per_epoch": p.num_batches(),
                }
                for p in self.parts
            ],
            "buckets": [
                {"bucket": list(b), "images": n, "images_with_repeats": r} for b, n, r in self.bucket_histogram()
            ],
            "images": [
                {
                    "key": img.key,
                    "image": img.item.image_path or img.item.image_key,
                    "caption": img.item.caption,
                    "num_repeats": img.item.num_repeats,
                    "is_reg": img.item.is_reg,
                    "mask": img.item.mask.describe() if img.item.mask is not None else None,
                    "flip_aug": img.flip_aug,
                    "original_size": list(img.selection.original_size),
                    "bucket": list(img.selection.bucket),
                    "resized_size": list(img.selection.resized_size),
                    "crop_offset": list(img.selection.crop_offset),
                    "time_ids": list(img.conditioning.time_ids),
                    "time_ids_flipped": list(img.conditioning_flipped.time_ids),
                }
                for img in self.images
            ],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "warnings": list(self.warnings),
        }

    def report_text(self, gradient_accumulation_steps: int = 1) -> str:
        lines = [
            f"{len(self.images)} images ({sum(i.item.num_repeats for i in self.images)} with repeats), "
            f"{self.num_batches()} batches per epoch, "
            f"{self.steps_per_epoch(gradient_accumulation_steps)} steps per epoch"
            + (f" at gradient accumulation {gradient_accumulation_steps}" if gradient_accumulation_steps > 1 else ""),
        ]
        counts = self.image_counts()
        if counts["reg_images"] or counts["num_reg_images"]:
            lines.append(
                f"  train images: {counts['train_images']} ({counts['num_train_images']} with repeats); reg images: "
                f"{counts['reg_images']} used ({counts['reg_images_with_repeats']} with repeats after kohya's "
                f"balancing; kohya's num_reg_images: {counts['num_reg_images']}), loss weighted by prior_loss_weight"
            )
        if counts["masked_images"]:
            lines.append(f"  masked loss: {counts['masked_images']} of {len(self.images)} images have a loss mask")
        subsets: dict[str, list[int]] = {}
        for img in self.images:
            name = (img.item.subset or "(images)") + (" (reg)" if img.item.is_reg else "")
            s = subsets.setdefault(name, [0, img.item.num_repeats])
            s[0] += 1
        for name, (n, rep) in subsets.items():
            lines.append(f"  subset {name}: {n} images x {rep} repeats")
        if self.validation_parts:
            lines.append(
                f"{len(self.validation_images)} validation images held out (validation_split {self.validation_split}, "
                f"validation_seed {self.validation_seed}), "
                f"{sum(p.num_batches() for p in self.validation_parts)} validation batches"
            )
        lines.append("buckets (W x H: images / with repeats):")
        for (w, h), n, r in self.bucket_histogram():
            lines.append(f"  {w} x {h}: {n} / {r}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} files:")
            lines.extend(f"  {skip_line(p, r)}" for p, r in self.skipped)
        if self.warnings:
            lines.append(f"{len(self.warnings)} warnings:")
            lines.extend(f"  {w}" for w in self.warnings)
        return "\n".join(lines)


def bucket_images(
    scan: ScanResult,
    settings: BucketSettings,
    batch_size: int,
    caption_options: OptionsBySubset,
    flip_aug: FlipBySubset = False,
    true_crop: bool = False,
    scanned: Sequence[DatasetItem] = (),
    dreambooth: bool = True,
) -> DatasetPart:
    """kohya's make_buckets for one dataset: select a bucket for every image and its size conditioning.

    ``caption_options`` and ``flip_aug`` are kohya subset options: one value for all images, or a
    mapping from ``DatasetItem.subset_index`` (a TOML's subsets). ``scanned`` / ``dreambooth``: the items before
    registration and how they were registered (kept on the part for exporting it as a kohya dataset config).

    Images that cannot be bucketed (a side rounds to 0 with bucket_no_upscale) are moved to
    ``scan.skipped`` with the reason, instead of failing the whole run later in the VAE.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    selector = BucketSelector(settings)
    images: list[BucketedImage] = []
    for item in scan.items:
        try:
            sel = selector.select(tuple(item.image_size))
        except (EmptyBucketError, ValueError) as e:
            scan.skipped.append((item.image_path or item.key, f"{e}"))
            continue
        images.append(
            BucketedImage(
                item=item,
                selection=sel,
                conditioning=size_conditioning(sel, False, true_crop=true_crop),
                conditioning_flipped=size_conditioning(sel, True, true_crop=true_crop),
                caption_options=caption_options
                if isinstance(caption_options, CaptionOptions)
                else caption_options[item.subset_index],
                flip_aug=flip_aug if isinstance(flip_aug, bool) else bool(flip_aug[item.subset_index]),
            )
        )
    return DatasetPart(
        settings=settings,
        batch_size=batch_size,
        true_crop=true_crop,
        images=tuple(images),
        used_buckets=tuple(selector.used_buckets()),
        scanned=tuple(scanned),
        caption_options=caption_options,
        flip_aug=flip_aug,
        dreambooth=dreambooth,
    )


def training_dataset(
    parts: Sequence[DatasetPart],
    scans: Sequence[ScanResult],
    seed: int = 0,
    *,
    validation_parts: Sequence[DatasetPart] = (),
    validation_split: float = 0.0,
    validation_seed: int | None = None,
) -> TrainingDataset:
    """Combine parts; fails with a clear message when nothing is left to train on."""
    skipped = [s for scan in scans for s in scan.skipped]
    warnings = [w for scan in scans for w in scan.warnings]  # items' own notes are in there already
    ds = TrainingDataset(
        parts=tuple(p for p in parts if p.images),
        skipped=tuple(skipped),
        warnings=tuple(warnings),
        seed=seed,
        validation_parts=tuple(p for p in validation_parts if p.images),
        validation_split=validation_split,
        validation_seed=validation_seed,
    )
    if not ds.parts:
        reasons = "; ".join(skip_line(p, r) for p, r in skipped[:5])
        raise ValueError(
            "No image is left to train on after bucketing"
            + (f" (skipped: {reasons})" if reasons else "")
            + ". Check the folder and the bucket settings."
        )
    return ds


def caption_for_step(img: BucketedImage, rng: random.Random, epoch: int, step: int, max_train_steps: int) -> str:
    """The caption a sample trains with at this step (kohya's shuffle/dropout, if enabled)."""
    from .captions import process_caption

    return process_caption(
        img.item.caption, img.caption_options, rng, epoch=epoch, step=step, max_train_steps=max_train_steps
    )
