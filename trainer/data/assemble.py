"""From a scan (folder, metadata.jsonl, graph images) or a kohya dataset TOML to a TrainingDataset.

This is the glue the dataset nodes call: kohya's registration (repeats, reg-image balancing),
bucketing per dataset, caption options per subset, and the checks that must fail early
(random crop / color augmentation cannot be combined with latent caching, as in kohya).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from .buckets import BucketSettings
from .captions import CaptionOptions
from .dataset import DatasetPart, TrainingDataset, bucket_images, training_dataset
from .kohya_toml import KOHYA_SUBSET_SCAN, DatasetTomlConfig, scan_dataset_toml
from .registration import Subset, register_dreambooth, register_finetuning
from .sources import DatasetItem, ScanResult
from .validation_split import split_dataset_items

CAPTION_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(CaptionOptions))


def check_cacheable(random_crop: bool, color_aug: bool, where: str = "") -> None:
    """kohya refuses random_crop / color_aug with latent caching; every latent here is cached."""
    bad = [name for name, on in (("random_crop", random_crop), ("color_aug", color_aug)) if on]
    if bad:
        raise ValueError(
            f"{where}{' and '.join(bad)} cannot be combined with latent caching (kohya refuses it too: "
            "the cached latent would freeze one crop/colour for the whole run). This trainer always caches "
            "latents; set " + " and ".join(f"{b} = false" for b in bad) + "."
        )


def caption_options_from_kohya(params: dict[str, Any]) -> CaptionOptions:
    """CaptionOptions from kohya subset parameter names (TOML)."""
    return CaptionOptions(**{k: params[k] for k in CAPTION_OPTION_NAMES if k in params and params[k] is not None})


def with_reg_images(train: ScanResult, reg: ScanResult) -> ScanResult:
    """Training images plus regularization images (kohya's train_data_dir + reg_data_dir) as one scan: the reg
    images are marked is_reg and get subset indices after the training subsets, so registration keeps them apart."""
    offset = max((it.subset_index for it in train.items), default=-1) + 1
    reg_items = [dataclasses.replace(it, is_reg=True, subset_index=offset + it.subset_index) for it in reg.items]
    return ScanResult(
        items=list(train.items) + reg_items,
        skipped=list(train.skipped) + list(reg.skipped),
        warnings=list(train.warnings) + [f"reg images: {w}" for w in reg.warnings],
    )


def register_items(scan: ScanResult, dreambooth: bool = True) -> ScanResult:
    """Apply kohya's registration to the scanned items of one dataset: num_repeats after
    reg-image balancing; reg images kohya would never use are reported as skipped."""
    by_subset: dict[int, list[DatasetItem]] = defaultdict(list)
    for item in scan.items:
        by_subset[item.subset_index].append(item)
    order = sorted(by_subset)
    subsets = [
        Subset(
            source=f"{i}", images=by_subset[i], num_repeats=by_subset[i][0].num_repeats, is_reg=by_subset[i][0].is_reg
        )
        for i in order
    ]
    reg = register_dreambooth(subsets) if dreambooth else register_finetuning(subsets, key=lambda it: it.key)
    used = {id(r.image) for r in reg.images}
    out = ScanResult(skipped=list(scan.skipped), warnings=list(scan.warnings))
    for r in reg.images:
        out.items.append(
            r.image if r.image.num_repeats == r.num_repeats else dataclasses.replace(r.image, num_repeats=r.num_repeats)
        )
    unused = [it for it in scan.items if id(it) not in used]
    for it in unused:
        out.skipped.append(
            (
                it.image_path or it.key,
                "regularisation image not needed: kohya registers reg images "
                "only until their repeats match the training images",
            )
        )
    return out


def dataset_from_scan(
    scan: ScanResult,
    settings: BucketSettings,
    batch_size: int,
    caption_options: CaptionOptions,
    flip_aug: bool = False,
    true_crop: bool = False,
    seed: int = 0,
    validation_split: float = 0.0,
    validation_seed: int = 0,
) -> TrainingDataset:
    """One dataset from a folder / metadata / graph-images scan, with one set of options for all images.

    ``validation_split`` holds out that share of every non-reg subset (kohya's split with ``validation_seed``)."""
    split = split_dataset_items(scan.items, validation_split, validation_seed)
    train_scan = ScanResult(items=split.train, skipped=list(scan.skipped), warnings=list(scan.warnings) + split.notes)
    registered = register_items(train_scan)
    part = bucket_images(registered, settings, batch_size, caption_options, flip_aug, true_crop, scan.items)
    if validation_split:
        part = dataclasses.replace(part, validation_split=validation_split, validation_seed=validation_seed)
    held_out = ScanResult(items=split.validation)
    validation = bucket_images(held_out, settings, batch_size, caption_options, flip_aug, true_crop)
    return training_dataset(
        [part],
        [registered, ScanResult(skipped=held_out.skipped)],
        seed,
        validation_parts=[validation],
        validation_split=validation_split,
        validation_seed=validation_seed if validation_split else None,
    )


def dataset_from_toml(
    path: str,
    input_dir: str | None = None,
    *,
    strict_captions: bool = False,
    exif_transpose: bool = True,
    true_crop: bool = False,
    seed: int = 0,
    fallbacks: dict[str, Any] | None = None,
) -> tuple[TrainingDataset, DatasetTomlConfig]:
    """A kohya dataset TOML, loaded as kohya would (precedence, defaults), bucketed per [[datasets]]."""
    options = dataclasses.replace(KOHYA_SUBSET_SCAN, strict_captions=strict_captions, exif_transpose=exif_transpose)
    config, scan = scan_dataset_toml(path, input_dir, options, fallbacks=fallbacks)
    parts: list[DatasetPart] = []
    validation_parts: list[DatasetPart] = []
    splits: list[tuple[float, int]] = []  # (validation_split, validation_seed) of each dataset that splits
    scans: list[ScanResult] = []
    for ds in config.datasets:
        items = [it for it in scan.items if it.dataset_index == ds.index]
        where = f"{config.path}: [[datasets]] #{ds.index + 1}: "
        for sub in ds.subsets:
            check_cacheable(
                bool(sub.params.get("random_crop")),
                bool(sub.params.get("color_aug")),
                where=f"{where}subset #{sub.index + 1}: ",
            )
        if not items:
            continue
        b = ds.bucket
        if b.get("resolution") is None:
            raise ValueError(
                f"{where}no resolution: set `resolution = 1024` (or [width, height]) in [general] "
                "or in the [[datasets]] entry."
            )
        settings = BucketSettings(
            resolution=tuple(b["resolution"]),
            min_bucket_reso=b["min_bucket_reso"],
            max_bucket_reso=b["max_bucket_reso"],
            bucket_reso_steps=b["bucket_reso_steps"],
            bucket_no_upscale=b["bucket_no_upscale"],
            enable_bucket=b["enable_bucket"],
        )
        options = {sub.index: caption_options_from_kohya(sub.params) for sub in ds.subsets}
        flips = {sub.index: bool(sub.params.get("flip_aug")) for sub in ds.subsets}
        split_share = float(ds.params.get("validation_split") or 0.0)
        if split_share and not ds.is_dreambooth:
            raise ValueError(
                f"{where}validation_split works on image_dir subsets only (kohya would validate a metadata_file "
                "dataset on its own training images); remove it and connect a separate validation dataset to the "
                "'Validation' node instead."
            )
        split_seed = ds.params.get("validation_seed")
        if split_share:
            if split_seed is None:
                split_seed = seed
                scan.warnings.append(
                    f"{where}validation_seed is not set: kohya would shuffle with its run's random state; the split "
                    f"uses seed {seed} here (set validation_seed to make kohya split the same way)"
                )
            splits.append((split_share, split_seed))
        split = split_dataset_items(items, split_share, split_seed or 0, where)
        scan.warnings.extend(split.notes)
        part_scan = register_items(ScanResult(items=split.train), dreambooth=ds.is_dreambooth)
        part = bucket_images(
            part_scan, settings, int(b["batch_size"]), options, flips, true_crop, items, ds.is_dreambooth
        )
        if split_share:
            part = dataclasses.replace(part, validation_split=split_share, validation_seed=split_seed)
        parts.append(part)
        scans.append(part_scan)
        held_out = ScanResult(items=split.validation)
        validation_parts.append(bucket_images(held_out, settings, int(b["batch_size"]), options, flips, true_crop))
        scans.append(ScanResult(skipped=held_out.skipped))
    scans.append(ScanResult(skipped=scan.skipped, warnings=scan.warnings))
    share, split_seed = splits[0] if len(set(splits)) == 1 else (0.0, None)
    dataset = training_dataset(
        parts,
        scans,
        seed,
        validation_parts=validation_parts,
        validation_split=share,
        validation_seed=split_seed,
    )
    return dataset, config
