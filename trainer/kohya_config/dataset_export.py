"""A TrainingDataset as a kohya ``--dataset_config`` plus the image folders it points at.

Every subset is written as a folder of its own inside the export (images hard-linked where the file system allows,
else copied; a caption ``.txt`` beside each), so the exported dataset is self-contained: it can be copied to the
machine that trains, and kohya reads exactly the images and captions the graph trained on, in the same order.
Images kohya would read differently (EXIF-rotated photos, transparency, formats kohya does not open, images that
live only in the graph) are written as the PNG the pack trains on. Reg subsets keep the repeats the user gave them
(kohya balances them again exactly as the pack did).

Loss masks of every source (alpha channels, mask images, graph MASKs) are written as the alpha channel of an RGBA
PNG under the colour the pack trains on, in a subset with kohya's ``alpha_mask = true``: kohya then resizes and
crops each mask with its image as the pack does (kohya's own mask-image path, conditioning_data_dir, stretches a mask
to the bucket instead) and needs no --masked_loss.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.captions import CaptionOptions
from ..data.dataset import DatasetPart, TrainingDataset
from ..data.images import KOHYA_EXTENSIONS as KOHYA_IMAGE_EXTENSIONS
from ..data.images import probe_image_info
from ..data.sources import DatasetItem

#: CaptionOptions fields that are kohya subset keys of the same name and default
_CAPTION_KEYS = (
    "shuffle_caption",
    "caption_separator",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_prefix",
    "caption_suffix",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "token_warmup_min",
    "token_warmup_step",
)


@dataclass
class DatasetExport:
    """``config``: the dataset config table; ``files``: (path inside the export, how to write it)."""

    config: dict[str, Any]
    images: list[tuple[str, DatasetItem]] = field(default_factory=list)  # (relative path, the item)
    captions: list[tuple[str, str]] = field(default_factory=list)  # (relative path, text)
    notes: list[str] = field(default_factory=list)


def _subset_keys(options: CaptionOptions, flip_aug: bool) -> dict[str, Any]:
    defaults = CaptionOptions()
    keys = {name: getattr(options, name) for name in _CAPTION_KEYS if getattr(options, name) != getattr(defaults, name)}
    if flip_aug:
        keys["flip_aug"] = True
    return keys


def _image_name(index: int, item: DatasetItem) -> str:
    """``00012_photo.jpg``: the index keeps the pack's order under kohya's sorted glob; the name stays readable."""
    if item.image_path is not None:
        stem, ext = os.path.splitext(os.path.basename(item.image_path))
        if ext.lower() not in KOHYA_IMAGE_EXTENSIONS or needs_reencode(item):
            ext = ".png"
    else:
        stem, ext = (item.image_key or "image").replace("/", "_").replace("#", "_"), ".png"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80] or "image"
    return f"{index:05d}_{safe}{ext}"


def needs_reencode(item: DatasetItem) -> bool:
    """True when kohya would see other pixels in the file than the pack trains on: EXIF rotation, transparency
    (the pack puts it on white; kohya drops the alpha channel), modes other than RGB, or an extension kohya skips."""
    if item.image_path is None or item.mask is not None:
        return True
    if os.path.splitext(item.image_path)[1].lower() not in KOHYA_IMAGE_EXTENSIONS:
        return True
    probe = probe_image_info(item.image_path, exif_transpose=item.exif_transpose)
    return probe.orientation != 1 or probe.mode != "RGB" or probe.n_frames > 1


def _part_config(part: DatasetPart, index: int, out: DatasetExport) -> dict[str, Any]:
    s = part.settings
    table: dict[str, Any] = {
        "resolution": [int(s.resolution[0]), int(s.resolution[1])],
        "batch_size": int(part.batch_size),
        "enable_bucket": bool(s.enable_bucket),
    }
    if s.enable_bucket:
        table.update(
            min_bucket_reso=int(s.min_bucket_reso),
            max_bucket_reso=int(s.max_bucket_reso),
            bucket_reso_steps=int(s.bucket_reso_steps),
            bucket_no_upscale=bool(s.bucket_no_upscale),
        )
    if part.validation_split:
        # kohya redoes the split from the same seed over the same order (the file names keep the pack's order)
        table.update(validation_split=float(part.validation_split), validation_seed=int(part.validation_seed or 0))
    if part.true_crop:
        out.notes.append(
            "crop_conditioning 'true crop': kohya always trains with its own crop_top_left numbers (the exported run "
            "uses kohya's)"
        )
    items = part.scanned or tuple(img.item for img in part.images)
    by_subset: dict[int, list[DatasetItem]] = defaultdict(list)
    for item in items:
        by_subset[item.subset_index].append(item)
    subsets = []
    for subset_index in sorted(by_subset):
        members = by_subset[subset_index]
        first = members[0]
        folder = f"images/{index + 1:02d}_{subset_index + 1:02d}" + ("_reg" if first.is_reg else "")
        for i, item in enumerate(members):
            name = _image_name(i, item)
            out.images.append((f"{folder}/{name}", item))
            out.captions.append((f"{folder}/{os.path.splitext(name)[0]}.txt", item.caption))
        subset: dict[str, Any] = {"image_dir": folder, "num_repeats": int(first.num_repeats)}
        if first.is_reg:
            subset["is_reg"] = True
        if any(item.mask is not None for item in members):
            subset["alpha_mask"] = True
        subset["caption_extension"] = ".txt"
        subset.update(_subset_keys(part.subset_caption_options(subset_index), part.subset_flip_aug(subset_index)))
        subsets.append(subset)
    if not part.dreambooth:
        out.notes.append(
            f"dataset {index + 1}: a kohya fine-tuning (metadata) dataset is written as folders with caption files; "
            "kohya registers it the same way (no reg images in fine-tuning datasets)"
        )
    table["subsets"] = subsets
    return table


def dataset_export(dataset: TrainingDataset) -> DatasetExport:
    """The dataset config and the files it needs (not written yet: ``write_dataset_files`` does that)."""
    out = DatasetExport(config={})
    out.config["datasets"] = [_part_config(part, i, out) for i, part in enumerate(dataset.parts)]
    if any(item.mask is not None and item.mask.kind == "mask_image" for part in dataset.parts for item in part.scanned):
        out.notes.append(
            "mask images are written as the alpha channel of RGBA PNGs (kohya alpha_mask): kohya weighs them as "
            "alpha / 255 where the pack maps the red channel through -1..1 (equal within float rounding)"
        )
    if any(item.mask is not None for part in dataset.parts for item in part.scanned):
        out.notes.append(
            "masked images: kohya resizes an RGBA image with its alpha (Pillow premultiplies it when enlarging), "
            "so the colour of partly transparent pixels can differ slightly from the pack's"
        )
    if any(item.exif_transpose is False for part in dataset.parts for item in part.scanned):
        out.notes.append("exif_transpose off: the images are written as stored (kohya ignores EXIF orientation too)")
    return out


def place_image(item: DatasetItem, target: Path) -> int:
    """Put the image kohya should read at ``target``: a hard link or copy of the file, or the PNG the pack trains on
    when kohya would read the file differently. Returns the bytes newly written (0 for a hard link)."""
    if item.image_path is not None and not needs_reencode(item):
        try:
            os.link(item.image_path, target)
            return 0
        except OSError:
            shutil.copyfile(item.image_path, target)
            return target.stat().st_size
    image: Image.Image = item.load_rgb()
    mask = item.load_mask()
    if mask is not None:  # kohya alpha_mask: the mask is the alpha channel, the colour the one the pack trains on
        image = image.convert("RGB")
        image.putalpha(mask)
    image.save(target, format="PNG")
    return target.stat().st_size
