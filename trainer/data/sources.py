"""Turn a user's dataset (folder, metadata.jsonl, in-graph images) into a list of DatasetItems.

The items are what bucketing, batching and caption augmentation consume. Scanning is where bad
input is cheapest to report, so every problem is either raised as a DatasetError (the message names
the file and the fix) or recorded in ``ScanResult.skipped`` / ``warnings`` -- never silently dropped.

Folder layout follows kohya sd-scripts' ``train_data_dir`` convention:
- If the folder has at least one direct subfolder named ``<int>_<name>`` (kohya splits the name on
  '_' and the first part must parse as an int), it is a kohya folder: each such subfolder is a
  subset with that many repeats and ``<name>`` as its class tokens (the caption of images without
  a caption file). As in kohya, images directly in the root and subfolders whose names do not
  parse are not used (we list them in ``skipped`` instead of ignoring them quietly), and subfolders
  with repeats < 1 are dropped (kohya drops them silently; we warn).
- Otherwise every image in the folder (and, with ``recursive``, its subfolders) is one subset with
  ``default_repeats``.
Deviations from kohya, all deliberate: extensions are matched case-insensitively; with
``recursive=True`` (default) images in nested folders inside a subset folder are included (kohya
reads only the subset folder itself; pass ``recursive=False`` for kohya's behaviour); a UTF-8 BOM
in caption files is stripped (kohya keeps it as part of the first token); subfolder order is sorted
by name (kohya uses the file system's listing order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from .images import (
    ACCEPTED_EXTENSIONS,
    DEFAULT_MAX_PIXELS,
    DatasetError,
    ImageProbe,
    is_image_filename,
    load_image_rgb,
    load_image_with_alpha,
    probe_image_info,
    to_rgb,
    verify_image,
)
from .masks import MaskSource, find_mask_file, load_mask_pixels, mask_pixels_from_weights
from .text_files import read_utf8

__all__ = [
    "DatasetError",
    "DatasetItem",
    "MissingMask",
    "ScanOptions",
    "ScanResult",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "attach_mask",
    "items_from_images",
    "normalize_caption_extension",
    "parse_repeats_folder_name",
    "read_caption_file",
    "resolve_dataset_path",
    "scan_folder",
    "scan_image_dir",
    "scan_metadata_jsonl",
    "skip_line",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Image-like files we do not load (GIF and APNG are trained on their first frame, see ACCEPTED_EXTENSIONS). We list
#: them in ``skipped`` so a user who dropped a TIFF or HEIC into the folder learns why it is not trained.
UNSUPPORTED_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".tif",
    ".tiff",
    ".avif",
    ".heic",
    ".heif",
    ".jxl",
    ".jfif",
    ".jpe",
    ".ico",
    ".tga",
    ".psd",
    ".dds",
    ".exr",
    ".hdr",
    ".svg",
    ".raw",
    ".cr2",
    ".nef",
    ".dng",
    ".arw",
)

#: Caption extensions we look for when the configured one is missing, to suggest the right option.
_COMMON_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags", ".cap")

_MAX_LISTED = 5  # file names listed in an aggregated warning before "... and N more"


@dataclass(frozen=True)
class ScanOptions:
    """How the scanners read image and caption files, in one bundle so every source treats a file alike."""

    caption_extension: str = ".txt"  # sidecar caption files of a folder scan (a TOML subset's own value wins)
    recursive: bool = True  # also scan nested folders; kohya reads only the folder itself (False)
    strict_captions: bool = False  # a missing, empty or unreadable caption raises instead of warning
    strict_images: bool = False  # an unusable image raises instead of being skipped with its reason
    verify: bool = True  # decode the pixels now to catch truncated files; False reads headers only
    exif_transpose: bool = True  # apply EXIF orientation, as photo viewers do; kohya does not (False)
    enable_wildcard: bool = False  # kohya's enable_wildcard for caption files (a TOML subset's own value wins)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused as possible decompression bombs
    alpha_mask: bool = False  # kohya alpha_mask: the alpha channel is the loss mask (RGB not composited on white)
    mask_dir: str | None = None  # a folder of mask images (kohya conditioning_data_dir): same stem, red channel

    def __post_init__(self) -> None:
        if self.alpha_mask and self.mask_dir:
            raise DatasetError(
                "alpha_mask and a mask folder are both set; a subset's mask comes from one of them: turn alpha_mask "
                "off to use the mask images, or clear the mask folder to use the alpha channel."
            )


@dataclass
class DatasetItem:
    """One training image (before repeats) with everything downstream needs to know about it.

    Exactly one of ``image_path`` (a file, loaded lazily) and ``image`` (an in-memory RGB image from
    the graph) is set. ``image_size`` is (width, height) as the trainer will see it, i.e. after
    EXIF orientation when ``exif_transpose`` is on; bucketing decides what is too small.
    """

    image_path: str | None
    caption: str
    image: Image.Image | None = None
    num_repeats: int = 1
    subset: str = ""  # subset name: kohya folder name ("10_sks dog"), TOML subset label, "images"
    source_dir: str | None = None  # folder the subset was scanned from (None for in-graph images)
    is_reg: bool = False
    image_size: tuple[int, int] = (0, 0)
    warnings: list[str] = field(default_factory=list)
    caption_path: str | None = None  # the caption file used, if any
    caption_source: str = "file"  # "file" | "class_tokens" | "missing" | "metadata" | "input"
    class_tokens: str | None = None  # kohya class tokens of the subset (folder name after "N_")
    dataset_index: int = 0  # which [[datasets]] entry of a TOML (buckets/batches are per dataset)
    subset_index: int = 0  # which subset inside that dataset (caption-augmentation settings)
    exif_transpose: bool = True  # how image_size was measured; load with the same setting
    image_key: str | None = None  # identifier for in-memory images; files use their path
    mask: MaskSource | None = None  # the loss mask (kohya masked_loss / alpha_mask); None: every pixel counts

    def __post_init__(self) -> None:
        if (self.image_path is None) == (self.image is None):
            raise ValueError("DatasetItem needs exactly one of image_path and image")

    @property
    def key(self) -> str:
        """Stable identifier (kohya's image_key is the image path)."""
        if self.image_key is not None:
            return self.image_key
        if self.image_path is not None:
            return self.image_path
        return f"{self.subset or 'images'}#{self.subset_index}"

    def load_rgb(self) -> Image.Image:
        """The 8-bit RGB pixels, decoded with the same orientation rule the size was measured with.

        With an alpha mask the colour is the stored one, alpha dropped (kohya), not composited on white."""
        if self.image is not None:
            return self.image
        assert self.image_path is not None
        if self.mask is not None and self.mask.kind == "alpha":
            return load_image_with_alpha(self.image_path, self.exif_transpose)[0]
        return load_image_rgb(self.image_path, self.exif_transpose)

    def load_mask(self) -> Image.Image | None:
        """The loss mask as 8-bit 'L' pixels at the image's size (checked), or None without a mask."""
        if self.mask is None:
            return None
        label = self.image_path or self.key
        return load_mask_pixels(self.mask, self.image_path, tuple(self.image_size), self.exif_transpose, label)


def skip_line(path: str, reason: str) -> str:
    """One report line for a skipped file: its path once (most reasons already start with it)."""
    return reason if path in reason else f"{path}: {reason}"


@dataclass
class ScanResult:
    """Items found, plus what was left out and why, plus things the user should know.

    Every scanner records an image file through ``probe_image_file`` then ``add_image_file``, so a
    bad, huge or animated file is skipped, raised or reported the same way whatever listed it.
    """

    items: list[DatasetItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: ScanResult) -> None:
        self.items.extend(other.items)
        self.skipped.extend(other.skipped)
        self.warnings.extend(other.warnings)

    @property
    def num_images(self) -> int:
        return len(self.items)

    @property
    def num_images_with_repeats(self) -> int:
        return sum(item.num_repeats for item in self.items)

    def report_text(self) -> str:
        """The images node's report: counts per subset, every skipped file with its reason, every warning."""
        lines = [f"{self.num_images} images ({self.num_images_with_repeats} with repeats)"]
        subsets: dict[str, list[int]] = {}
        for it in self.items:
            s = subsets.setdefault(it.subset or "(images)", [0, it.num_repeats])
            s[0] += 1
        lines += [f"  {name}: {n} images x {rep} repeats" for name, (n, rep) in subsets.items()]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {skip_line(p, r)}" for p, r in self.skipped]
        if self.warnings:
            lines.append(f"{len(self.warnings)} warnings:")
            lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)

    def probe_image_file(self, path: Path, options: ScanOptions, listed_in: str = "") -> ImageProbe | None:
        """The check every scanner runs on an image file: its size as trained, frames, too big, unreadable.

        An unusable file raises with ``strict_images``; otherwise its reason (plus ``listed_in``: where a
        metadata file names it) goes into ``skipped`` and the result is None.
        """
        check = verify_image if options.verify else probe_image_info
        try:
            return check(path, exif_transpose=options.exif_transpose, max_pixels=options.max_pixels)
        except DatasetError as e:
            if options.strict_images:
                raise
            self.skipped.append((str(path), f"{e}{listed_in}"))
            return None

    def add_image_file(
        self,
        path: Path,
        probe: ImageProbe,
        options: ScanOptions,
        *,
        notes: Sequence[str] = (),
        summarized_note: str | None = None,
        **item_fields: Any,
    ) -> None:
        """Keep a probed file as an item. Its notes (an animated file's first) also go into ``warnings``;
        ``summarized_note`` only onto the item, because the scanner reports those in one summary line."""
        reported = []
        if probe.is_animated:
            reported.append(
                f"{path}: animated image with {probe.n_frames} frames; only the first frame is used. "
                "Export the frame you want as PNG to silence this."
            )
        reported.extend(notes)
        self.items.append(
            DatasetItem(
                image_path=str(path),
                image_size=probe.size,
                exif_transpose=options.exif_transpose,
                warnings=reported + ([summarized_note] if summarized_note else []),
                **item_fields,
            )
        )
        self.warnings.extend(reported)


# --------------------------------------------------------------------------------------------
# paths


def resolve_dataset_path(path: PathLike, input_dir: PathLike | None = None) -> tuple[Path, str]:
    """Resolve a user-typed path; returns (path, phrase describing how it was resolved).

    Relative paths are taken against ComfyUI's input directory (the node passes
    ``folder_paths.get_input_directory()``) so workflows stay portable; absolute paths are used as
    is. Surrounding quotes are removed because Windows' "Copy as path" adds them.
    """
    text = str(path).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        raise DatasetError(
            "no dataset path given; type a folder path (absolute, or relative to ComfyUI's input directory)."
        )
    p = Path(os.path.expanduser(text))
    if p.is_absolute():
        return p, f"{p}"
    if input_dir is not None:
        base = Path(input_dir)
        return base / p, f"'{text}' resolved against ComfyUI's input directory {base}"
    base = Path.cwd()
    return base / p, f"'{text}' resolved against the current working directory {base}"


def _require_dir(p: Path, how: str | None, what: str = "dataset folder") -> None:
    where = f" ({how})" if how and how != str(p) else ""
    if not p.exists():
        raise DatasetError(f"{what} {p} does not exist{where}; check the spelling, or give an absolute path.")
    if not p.is_dir():
        raise DatasetError(f"{what} {p} is a file, not a folder{where}; give the folder that contains the images.")


# --------------------------------------------------------------------------------------------
# kohya folder names and captions


def parse_repeats_folder_name(name: str) -> tuple[int, str] | None:
    """kohya's ``N_name`` rule: split on '_', the first part must be an int (Python ``int()``).

    Returns (repeats, class_tokens) where class_tokens is the rest re-joined with '_' (possibly
    ""), or None when the first part is not an int (kohya ignores such folders). Repeats < 1 are
    returned as-is; the caller reports them.
    """
    tokens = name.split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return None
    return repeats, "_".join(tokens[1:])


def normalize_caption_extension(ext: str) -> str:
    if not isinstance(ext, str) or not ext.strip():
        raise DatasetError(
            f"caption_extension {ext!r} is empty; use the extension of your caption files, e.g. '.txt' or '.caption'."
        )
    ext = ext.strip()
    return ext if ext.startswith(".") else "." + ext  # kohya prepends the dot too


def _caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """``<stem><ext>``, then kohya's face-crop fallback for names like ``img_x_y_w_h``.

    kohya's tools write face crops as ``<name>_<4 numbers>``; their caption is ``<name><ext>``.
    kohya splits the whole path on '_' (so a '_' in a folder name can send it outside the folder);
    we apply the rule to the file name only.
    """
    stem = image_path.stem
    candidates = [image_path.with_name(stem + caption_extension)]
    tokens = stem.split("_")
    if len(tokens) >= 5:
        base = "_".join(tokens[:-4])
        if base:
            candidates.append(image_path.with_name(base + caption_extension))
    return candidates


def read_caption_file(caption_path: PathLike, enable_wildcard: bool = False) -> tuple[str, list[str]]:
    """Read a caption the way kohya does: the first line, stripped (all non-empty lines joined with
    newlines when ``enable_wildcard``). Returns (caption, warnings).

    Decoded as UTF-8; a BOM is stripped (kohya keeps it, which glues an invisible character to the
    first tag). Anything that is not UTF-8 raises DatasetError naming the file.
    """
    p = Path(caption_path)
    notes: list[str] = []
    text = read_utf8(p, "caption ")
    # Python's text mode (kohya's readlines) treats \r\n and \r as line ends too.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if enable_wildcard:
        caption = "\n".join(line.strip() for line in lines if line.strip())
    else:
        caption = lines[0].strip()
        extra = [line for line in lines[1:] if line.strip()]
        if extra:
            notes.append(
                f"{p}: only the first line of the caption is used ({len(extra)} more non-empty line(s) ignored, as "
                "kohya does); put the caption on one line, or enable wildcards to use one line per variant."
            )
    if not caption:
        notes.append(f"{p}: caption file is empty; the image trains with an empty caption.")
    return caption, notes


# --------------------------------------------------------------------------------------------
# scanning one subset folder


def _list_files(directory: Path, recursive: bool) -> tuple[list[Path], list[Path]]:
    """(files, hidden files) under ``directory``; hidden folders are not entered.

    kohya's glob('*.png') never matches names starting with '.', which also keeps macOS '._a.png'
    resource forks (not images despite the name) out; we mirror that but report hidden images.
    """
    files: list[Path] = []
    hidden: list[Path] = []
    seen_dirs: set[str] = set()
    stack = [directory]
    while stack:
        d = stack.pop()
        real = os.path.realpath(d)
        if real in seen_dirs:  # symlink loop
            continue
        seen_dirs.add(real)
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            raise DatasetError(f"cannot list folder {d} ({e}); check its permissions.") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                if recursive and not entry.name.startswith("."):
                    stack.append(path)
                continue
            if entry.name.startswith("."):
                hidden.append(path)
            else:
                files.append(path)
    return files, hidden


def _dedupe(messages: list[str]) -> list[str]:
    """Drop repeated messages (e.g. one caption file shared by two images), keeping order."""
    return list(dict.fromkeys(messages))


def _contains_images(directory: Path) -> bool:
    try:
        files, _ = _list_files(directory, recursive=True)
    except DatasetError:
        return False
    return any(is_image_filename(f.name) for f in files)


def _summarize(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    if len(paths) > _MAX_LISTED:
        shown += f" ... and {len(paths) - _MAX_LISTED} more"
    return shown


class MissingMask(Exception):
    """An image of a masked subset has no mask file (collected, then reported together)."""


def _missing_masks_error(images: Sequence[str], options: ScanOptions) -> DatasetError:
    return DatasetError(
        f"{len(images)} image(s) have no mask in the mask folder {options.mask_dir} (a mask is a file with the "
        f"image's name and an image extension; kohya refuses such a dataset too): {_summarize(images)}. Add their "
        "masks, or move these images out of the masked dataset."
    )


_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")


def attach_mask(image: Path, probe: ImageProbe, options: ScanOptions, dataset_root: Path) -> MaskSource | None:
    """The mask of one scanned image, checked as far as headers allow (the pixels are checked when cached).

    ``alpha_mask``: the image's alpha (an image without alpha trains unmasked, as in kohya: a mask of ones; the
    scanner says so). ``mask_dir``: ``<mask_dir>/<image's folder relative to dataset_root>/<stem>.<ext>``, else
    ``<mask_dir>/<stem>.<ext>``; it must have the image's size. Raises MissingMask when there is none.
    """
    if options.alpha_mask:
        return MaskSource("alpha")
    if not options.mask_dir:
        return None
    mask_dir = Path(options.mask_dir)
    folders = [mask_dir]
    try:
        relative = image.parent.relative_to(dataset_root)
        if str(relative) not in ("", "."):
            folders.insert(0, mask_dir / relative)
    except ValueError:
        pass
    found = next((m for m in (find_mask_file(f, image, ACCEPTED_EXTENSIONS) for f in folders) if m), None)
    if found is None:
        raise MissingMask()
    mask_probe = probe_image_info(found, exif_transpose=options.exif_transpose, max_pixels=options.max_pixels)
    if mask_probe.size != probe.size:
        raise DatasetError(
            f"{image}: its mask {found} is {mask_probe.width}x{mask_probe.height} but the image is "
            f"{probe.width}x{probe.height}; a mask must have exactly the image's size (save it at that size)."
        )
    return MaskSource("mask_image", path=str(found))


def scan_image_dir(
    directory: PathLike,
    options: ScanOptions,
    *,
    num_repeats: int = 1,
    class_tokens: str | None = None,
    is_reg: bool = False,
    subset: str | None = None,
    dataset_index: int = 0,
    subset_index: int = 0,
    dataset_root: PathLike | None = None,
) -> ScanResult:
    """Scan one kohya subset folder (no ``N_name`` interpretation): images + sidecar captions.

    Masks (``options.alpha_mask`` / ``options.mask_dir``): see attach_mask; ``dataset_root`` is the folder whose
    layout the mask folder mirrors (default: this folder).

    Order is kohya's: full path strings sorted. Caption of an image without a caption file is
    ``class_tokens`` when given (kohya), else "". ``options.strict_captions`` turns a missing, empty
    or undecodable caption file into a DatasetError; otherwise the image is kept with a warning
    (undecodable: skipped, because its caption is unknown). Bad images are skipped (or raised with
    ``options.strict_images``), see ScanResult.probe_image_file.
    """
    d = Path(directory)
    _require_dir(d, None, "image folder")
    caption_extension = normalize_caption_extension(options.caption_extension)
    subset_name = subset if subset is not None else d.name
    result = ScanResult()

    files, hidden = _list_files(d, options.recursive)
    images: list[Path] = []
    for f in files:
        ext = f.suffix.lower()
        if ext in ACCEPTED_EXTENSIONS:
            images.append(f)
        elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            result.skipped.append(
                (
                    str(f),
                    f"{f}: extension '{f.suffix}' is not a training image format (the trainer reads "
                    f"{', '.join(ACCEPTED_EXTENSIONS)}); convert it to PNG to use it.",
                )
            )
    for f in sorted(hidden, key=str):
        if is_image_filename(f.name):
            result.skipped.append(
                (
                    str(f),
                    f"{f}: hidden file (name starts with '.', e.g. a macOS '._' resource fork) is ignored, as kohya's "
                    "glob does; rename it if it is a real image.",
                )
            )
    images.sort(key=str)  # kohya: img_paths.sort() on path strings

    # Files sharing one caption file: kohya trains both with the same caption; so do we, but say so.
    by_stem: dict[tuple[str, str], list[Path]] = {}
    for img in images:
        by_stem.setdefault((str(img.parent), img.stem), []).append(img)
    for (parent, stem), group in by_stem.items():
        if len(group) > 1:
            names = ", ".join(g.name for g in group)
            result.warnings.append(
                f"{parent}: {names} have the same name and share the caption file {stem}{caption_extension}; "
                "both are trained (as kohya does). Rename or delete one if that is a duplicate."
            )

    dir_listing_cache: dict[str, dict[str, str]] = {}

    def lower_listing(parent: Path) -> dict[str, str]:
        key = str(parent)
        if key not in dir_listing_cache:
            try:
                dir_listing_cache[key] = {name.lower(): name for name in os.listdir(parent)}
            except OSError:
                dir_listing_cache[key] = {}
        return dir_listing_cache[key]

    missing: list[str] = []
    missing_hints: set[str] = set()
    missing_masks: list[str] = []
    no_alpha: list[str] = []
    mask_root = Path(dataset_root) if dataset_root is not None else d
    for img in images:
        info = result.probe_image_file(img, options)
        if info is None:
            continue
        try:
            mask = attach_mask(img, info, options, mask_root)
        except MissingMask:
            missing_masks.append(str(img))
            continue
        if options.alpha_mask and info.mode not in _ALPHA_MODES and not info.transparency:
            no_alpha.append(str(img))
        notes: list[str] = []
        missing_note: str | None = None  # per-item only; result.warnings gets one summary

        caption: str | None = None
        caption_path: Path | None = None
        for cand in _caption_candidates(img, caption_extension):
            if cand.is_file():
                caption_path = cand
                break
        if caption_path is not None:
            try:
                caption, notes = read_caption_file(caption_path, options.enable_wildcard)
            except DatasetError as e:
                if options.strict_captions:
                    raise
                result.skipped.append((str(img), f"{img}: skipped because its caption cannot be read: {e}"))
                continue
            if caption_path.stem != img.stem:
                notes.append(
                    f"{img}: no {img.stem}{caption_extension}; using {caption_path.name} (kohya's rule for "
                    "face-crop names 'name_x_y_w_h')."
                )
            if not caption and options.strict_captions:
                raise DatasetError(
                    f"{caption_path}: caption file for {img.name} is empty; write the caption into it, or turn "
                    "strict captions off to train this image with an empty caption."
                )
            source = "file"
        else:
            expected = img.with_name(img.stem + caption_extension)
            hint = ""
            listing = lower_listing(img.parent)
            if expected.name.lower() in listing:
                hint = (
                    f" (found '{listing[expected.name.lower()]}': caption_extension is case-sensitive, "
                    f"rename it to '{expected.name}')"
                )
            else:
                for ext in _COMMON_CAPTION_EXTENSIONS:
                    if ext != caption_extension and (img.stem + ext).lower() in listing:
                        hint = f" (found '{img.stem}{ext}': set caption_extension to '{ext}')"
                        missing_hints.add(ext)
                        break
            if options.strict_captions:
                raise DatasetError(
                    f"{img}: no caption file {expected.name}{hint}; create it with the caption text, or turn "
                    "strict captions off to train without one."
                )
            missing.append(str(img))
            if class_tokens is not None:
                caption = class_tokens
                source = "class_tokens"
                missing_note = (
                    f"{img}: no caption file {expected.name}{hint}; using the class tokens {class_tokens!r} "
                    "from the folder name as caption (kohya's rule)."
                )
            else:
                caption = ""
                source = "missing"
                missing_note = f"{img}: no caption file {expected.name}{hint}; training with an empty caption."

        result.add_image_file(
            img,
            info,
            options,
            notes=notes,
            summarized_note=missing_note,
            caption=caption or "",
            num_repeats=num_repeats,
            subset=subset_name,
            source_dir=str(d),
            is_reg=is_reg,
            caption_path=str(caption_path) if caption_path is not None else None,
            caption_source=source,
            class_tokens=class_tokens,
            dataset_index=dataset_index,
            subset_index=subset_index,
            mask=mask,
        )

    if missing_masks:
        raise _missing_masks_error(missing_masks, options)
    if no_alpha:
        result.warnings.append(
            f"{len(no_alpha)} image(s) in {d} have no alpha channel, so with alpha_mask every pixel of them counts "
            f"(kohya: a mask of ones): {_summarize(no_alpha)}. Save them as PNG with transparency to mask them."
        )
    if missing:
        fallback = (
            f"the class tokens {class_tokens!r} are used as their caption"
            if class_tokens is not None
            else "they train with an empty caption"
        )
        hint = ""
        if missing_hints:
            hint = f" Files with {', '.join(sorted(missing_hints))} exist: is caption_extension set right?"
        result.warnings.append(
            f"{len(missing)} image(s) in {d} have no caption file ({caption_extension}); {fallback}: "
            f"{_summarize(missing)}.{hint}"
        )
    result.warnings = _dedupe(result.warnings)
    return result


# --------------------------------------------------------------------------------------------
# folder (kohya train_data_dir or plain)


def _no_images_error(root: Path, how: str, result: ScanResult, extra: str = "") -> DatasetError:
    accepted = ", ".join(ACCEPTED_EXTENSIONS)
    if result.skipped:
        reasons = "; ".join(reason for _, reason in result.skipped[:_MAX_LISTED])
        more = f" (and {len(result.skipped) - _MAX_LISTED} more)" if len(result.skipped) > _MAX_LISTED else ""
        return DatasetError(
            f"no usable images in {root} ({how}): {len(result.skipped)} file(s) were skipped{more}: {reasons}"
        )
    return DatasetError(
        f"no images found in {root} ({how}); accepted extensions are {accepted} (any letter case). "
        f"Put the images in that folder or in kohya-style '<repeats>_<name>' subfolders such as '10_mychar'.{extra}"
    )


def _mask_folder(options: ScanOptions, input_dir: PathLike | None) -> str | None:
    """The mask folder resolved like the dataset folder, checked to exist; None without one."""
    if not options.mask_dir or not str(options.mask_dir).strip():
        return None
    folder, how = resolve_dataset_path(options.mask_dir, input_dir)
    _require_dir(folder, how, "mask folder")
    return str(folder)


def scan_folder(
    path: PathLike,
    input_dir: PathLike | None = None,
    options: ScanOptions = ScanOptions(),
    *,
    default_repeats: int = 1,
    is_reg: bool = False,
) -> ScanResult:
    """Scan a dataset folder laid out like kohya's ``train_data_dir`` (or a plain image folder).

    See the module docstring for the layout rules; ``options`` says how every file is read. Raises
    DatasetError when the folder does not exist or yields no usable image; everything else is
    reported in the result.
    """
    if not isinstance(default_repeats, int) or isinstance(default_repeats, bool) or default_repeats < 1:
        raise DatasetError(f"default_repeats must be a whole number >= 1, got {default_repeats!r}.")
    root, how = resolve_dataset_path(path, input_dir)
    if root.is_file() and root.suffix.lower() in (".toml", ".json", ".jsonl"):
        kind = "a metadata.jsonl" if root.suffix.lower() == ".jsonl" else "a dataset config"
        raise DatasetError(
            f"{root} is {kind} file, not a folder ({how}); choose the folder of images here, or use the "
            f"{'metadata.jsonl' if kind.startswith('a metadata') else 'dataset TOML'} source for this file."
        )
    _require_dir(root, how)
    caption_extension = normalize_caption_extension(options.caption_extension)
    options = replace(options, caption_extension=caption_extension, mask_dir=_mask_folder(options, input_dir))
    result = ScanResult()

    try:
        subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as e:
        raise DatasetError(f"cannot list folder {root} ({how}): {e}; check its permissions.") from None
    parsed = {d: parse_repeats_folder_name(d.name) for d in subdirs}
    kohya_layout = any(v is not None for v in parsed.values())

    if (root / "metadata.jsonl").is_file():
        result.warnings.append(
            f"{root} contains metadata.jsonl, but a folder scan uses sidecar caption files ({caption_extension}); "
            "use the metadata.jsonl source to use its captions."
        )

    if kohya_layout:
        root_files, _ = _list_files(root, recursive=False)
        root_images = sorted((f for f in root_files if is_image_filename(f.name)), key=str)
        for f in root_images:
            result.skipped.append(
                (
                    str(f),
                    f"{f}: image directly in a kohya dataset folder (one with '<repeats>_<name>' subfolders) is not "
                    "used, as in kohya; move it into a '<repeats>_<name>' subfolder.",
                )
            )
        if root_images:
            result.warnings.append(
                f"{len(root_images)} image(s) directly in {root} are not used because the folder has "
                f"'<repeats>_<name>' subfolders (kohya layout): {_summarize([f.name for f in root_images])}."
            )
        subset_index = 0
        for d in subdirs:
            rule = parsed[d]
            if rule is None:
                if not _contains_images(d):
                    continue  # e.g. a 'logs' folder: nothing a user would expect to be trained
                result.skipped.append(
                    (
                        str(d),
                        f"{d}: folder name does not start with '<repeats>_' (kohya ignores it); rename it like "
                        f"'1_{d.name}' to train its images.",
                    )
                )
                result.warnings.append(
                    f"subfolder '{d.name}' of {root} is ignored: its name does not start with a number of repeats "
                    f"(kohya layout needs '<repeats>_<name>', e.g. '1_{d.name}')."
                )
                continue
            repeats, class_tokens = rule
            if repeats < 1:
                result.skipped.append(
                    (
                        str(d),
                        f"{d}: repeats {repeats} < 1, so kohya drops this folder; rename it with a repeat count >= 1.",
                    )
                )
                result.warnings.append(
                    f"subfolder '{d.name}' of {root} is ignored: repeats {repeats} is less than 1 "
                    "(kohya drops such folders silently)."
                )
                continue
            sub = scan_image_dir(
                d,
                options,
                num_repeats=repeats,
                class_tokens=class_tokens,
                is_reg=is_reg,
                subset=d.name,
                subset_index=subset_index,
                dataset_root=root,
            )
            if not sub.items:
                result.warnings.append(f"subfolder '{d.name}' of {root} contains no usable images; it is ignored.")
            else:
                subset_index += 1
            result.extend(sub)
    else:
        rule = parse_repeats_folder_name(root.name)
        if rule is not None and rule[0] >= 1 and rule[0] != default_repeats:
            result.warnings.append(
                f"{root.name!r} looks like a kohya '<repeats>_<name>' folder, but repeats come from the names of "
                f"subfolders of the folder you choose; using {default_repeats} repeat(s). Choose its parent folder "
                f"to train it with {rule[0]} repeats."
            )
        result.extend(scan_image_dir(root, options, num_repeats=default_repeats, is_reg=is_reg, subset=root.name))

    result.warnings = _dedupe(result.warnings)
    if not result.items:
        extra = ""
        if not options.recursive and not kohya_layout and subdirs:
            extra = " Images in subfolders are only found with recursive scanning on."
        raise _no_images_error(root, how, result, extra)
    return result


# --------------------------------------------------------------------------------------------
# metadata.jsonl (diffusers / Hugging Face imagefolder)


def scan_metadata_jsonl(
    folder: PathLike,
    input_dir: PathLike | None = None,
    options: ScanOptions = ScanOptions(),
    *,
    caption_column: str = "text",
    default_repeats: int = 1,
    is_reg: bool = False,
) -> ScanResult:
    """Read the Hugging Face imagefolder convention: ``metadata.jsonl`` with one JSON object per
    line, ``{"file_name": "a.png", "text": "caption"}``, file names relative to the metadata file.

    ``folder`` may be the folder or the .jsonl file itself. Rows keep file order; a file listed
    twice is used once (the first row), images in the folder that no row lists are reported.
    Captions come from the rows, so ``options.caption_extension``, ``recursive`` and
    ``enable_wildcard`` do not apply.
    """
    target, how = resolve_dataset_path(folder, input_dir)
    if target.is_file():
        meta = target
    else:
        _require_dir(target, how)
        meta = target / "metadata.jsonl"
        if not meta.is_file():
            raise DatasetError(
                f"{meta} does not exist ({how}); a metadata dataset needs a metadata.jsonl with lines like "
                '{"file_name": "a.png", "text": "a caption"} next to the images.'
            )
    base = meta.parent
    result = ScanResult()
    text = read_utf8(meta)
    options = replace(options, mask_dir=_mask_folder(options, input_dir))
    missing_masks: list[str] = []

    seen: dict[str, int] = {}
    missing_caption: list[str] = []
    bad_lines: list[str] = []  # every line that stops the scan, reported together
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad_lines.append(f"{where}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            bad_lines.append(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        name = row.get("file_name")
        caption = row.get(caption_column)
        problems = []
        if not isinstance(name, str) or not name.strip():
            problems.append(f'missing "file_name" (the image\'s file name relative to {base})')
        if caption is not None and not isinstance(caption, str):
            problems.append(f'"{caption_column}" must be a string, got {type(caption).__name__}')
        elif options.strict_captions and (caption is None or not caption.strip()):
            problems.append(
                f'no "{caption_column}" caption for {name}; add it, or turn strict captions off to train with an '
                "empty caption"
            )
        if problems:
            bad_lines.append(f"{where}: " + "; ".join(problems))
            continue
        img = Path(name) if os.path.isabs(name) else base / name
        key = os.path.normpath(str(img))
        if key in seen:
            result.skipped.append(
                (
                    str(img),
                    f"{where}: {img} is listed again (first on line {seen[key]}); only the first row is used. "
                    "Delete the duplicate row.",
                )
            )
            continue
        seen[key] = line_no
        info = result.probe_image_file(img, options, listed_in=f" (listed in {meta.name} line {line_no})")
        if info is None:
            continue
        try:
            mask = attach_mask(img, info, options, base)
        except MissingMask:
            missing_masks.append(str(img))
            continue
        missing_note: str | None = None
        if caption is None or not caption.strip():
            missing_caption.append(name)
            missing_note = (
                f'{img}: no "{caption_column}" in {meta.name} line {line_no}; training with an empty caption.'
            )
        result.add_image_file(
            img,
            info,
            options,
            summarized_note=missing_note,
            caption=(caption or "").strip(),
            num_repeats=default_repeats,
            subset=base.name,
            source_dir=str(base),
            is_reg=is_reg,
            caption_path=str(meta),
            caption_source="metadata" if caption and caption.strip() else "missing",
            mask=mask,
        )
    if missing_masks:
        raise _missing_masks_error(missing_masks, options)

    if bad_lines:
        message = (
            f"{meta}: {len(bad_lines)} line(s) cannot be used; fix them all, then queue again:\n  "
            + "\n  ".join(bad_lines)
            + '\nEach line must be one JSON object like {"file_name": "a.png", "text": "a caption"}.'
        )
        if result.skipped:
            message += "\nThese rows would be skipped too:\n  " + "\n  ".join(
                skip_line(path, reason) for path, reason in result.skipped
            )
        raise DatasetError(message)
    if missing_caption:
        result.warnings.append(
            f'{len(missing_caption)} row(s) of {meta} have no "{caption_column}"; they train with an empty caption: '
            f"{_summarize(missing_caption)}."
        )
    unlisted = sorted(
        str(p)
        for p in base.iterdir()
        if p.is_file() and is_image_filename(p.name) and os.path.normpath(str(p)) not in seen
    )
    if unlisted:
        result.warnings.append(
            f"{len(unlisted)} image(s) in {base} are not listed in {meta.name} and are not used: "
            f"{_summarize([Path(u).name for u in unlisted])}."
        )
    if not result.items:
        raise _no_images_error(base, f"from {meta}", result)
    return result


# --------------------------------------------------------------------------------------------
# images coming from the graph


def _as_numpy(obj: Any) -> np.ndarray:
    """torch tensors (ComfyUI IMAGE) without importing torch; anything else via np.asarray."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):
        obj = obj.detach().cpu()
        if hasattr(obj, "float"):
            obj = obj.float()  # bf16/fp16 -> float32 so numpy can hold it
        obj = obj.numpy()
    return np.asarray(obj)


def _flatten_images(images: Any) -> list[Any]:
    if isinstance(images, Image.Image):
        return [images]
    if not isinstance(images, (list, tuple)):
        arr = _as_numpy(images)
        return list(arr) if arr.ndim == 4 else [arr]
    out: list[Any] = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im)
            continue
        arr = _as_numpy(im)
        if arr.ndim == 4:  # a ComfyUI IMAGE batch [B,H,W,C] inside a list
            out.extend(list(arr))
        else:
            out.append(arr)
    return out


def _array_to_rgb(arr: np.ndarray, index: int, notes: list[str]) -> Image.Image:
    where = f"image {index}"
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DatasetError(
            f"{where}: expected an array shaped [height, width, channels] with 1, 3 or 4 channels, got shape "
            f"{tuple(arr.shape)}; pass a ComfyUI IMAGE or a list of PIL images."
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DatasetError(f"{where}: image has no pixels (shape {tuple(arr.shape)}).")
    if arr.dtype == np.uint8:
        u8 = arr
    else:
        a = arr.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise DatasetError(f"{where}: contains NaN or infinite values; fix the node that produced it.")
        lo, hi = float(a.min()), float(a.max())
        if hi > 1.5:
            raise DatasetError(
                f"{where}: values go up to {hi:g}, but images must be floats in 0..1 (ComfyUI IMAGE); divide by 255."
            )
        if lo < -0.01 or hi > 1.01:
            notes.append(f"{where}: values outside 0..1 (min {lo:g}, max {hi:g}) were clipped.")
        u8 = np.floor(np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    channels = u8.shape[2]
    if channels == 1:
        return Image.fromarray(u8[:, :, 0], mode="L").convert("RGB")
    if channels == 4:
        return to_rgb(Image.fromarray(u8, mode="RGBA"), where)
    return Image.fromarray(np.ascontiguousarray(u8), mode="RGB")


def _flatten_masks(masks: Any) -> list[np.ndarray]:
    """ComfyUI MASKs ([B,H,W] or [H,W], or a list of them) as a list of [H,W] float arrays."""
    out: list[np.ndarray] = []
    for m in masks if isinstance(masks, (list, tuple)) else [masks]:
        arr = _as_numpy(m)
        if arr.ndim == 3:
            out.extend(list(arr))
        elif arr.ndim == 2:
            out.append(arr)
        else:
            raise DatasetError(f"a MASK must be shaped [batch, height, width], got shape {tuple(arr.shape)}.")
    return out


def _graph_mask(mask: np.ndarray, image_size: tuple[int, int], index: int, invert: bool) -> MaskSource:
    """One MASK as the 8-bit loss mask of image ``index``, checked: its size and that some pixel counts."""
    height, width = mask.shape
    if (width, height) != tuple(image_size):
        raise DatasetError(
            f"image {index}: its mask is {width}x{height} but the image is {image_size[0]}x{image_size[1]}; give "
            "each image its own mask at its size (Load Image outputs a 64x64 empty mask for an image without alpha)."
        )
    if not np.all(np.isfinite(mask)):
        raise DatasetError(f"image {index}: its mask contains NaN or infinite values; fix the node that made it.")
    pixels = mask_pixels_from_weights(mask, invert)
    if not np.asarray(pixels).any():
        meaning = "1 - mask" if invert else "the mask"
        raise DatasetError(
            f"image {index}: its mask gives every pixel weight 0 ({meaning}), so the image would train nothing; "
            "fix the mask, or switch the mask meaning if it is inverted."
        )
    return MaskSource("pixels", pixels=pixels)


def items_from_images(
    images: Any,
    captions: str | Sequence[str],
    *,
    name: str = "images",
    num_repeats: int = 1,
    is_reg: bool = False,
    masks: Any = None,
    invert_masks: bool = True,
) -> ScanResult:
    """Items from images already in the graph: PIL images or float arrays [H,W,C] in 0..1
    (a ComfyUI IMAGE batch [B,H,W,C] is split). ``captions`` is one string for all images, or one
    per image (a single-element list also applies to all). Alpha is composited on white.

    ``masks``: ComfyUI MASKs (float 0..1, [B,H,W] batches or a list), one per image in the same order, each of its
    image's size; they become the loss masks. ``invert_masks``: the weight is 1 - mask (LoadImage's MASK is
    1 - alpha, so opaque pixels train, as kohya's alpha_mask); off: the weight is the mask itself.
    """
    flat = _flatten_images(images)
    if not flat:
        raise DatasetError("no images given; connect at least one image.")
    mask_list = _flatten_masks(masks) if masks is not None else None
    if mask_list is not None and len(mask_list) != len(flat):
        raise DatasetError(
            f"got {len(flat)} image(s) but {len(mask_list)} mask(s); give one mask per image, in the same order "
            "(e.g. the MASK output of the same Load Image node as each image)."
        )
    if isinstance(captions, str):
        caption_list = [captions] * len(flat)
    else:
        caption_list = list(captions)
        if len(caption_list) == 1:
            caption_list = caption_list * len(flat)
        if len(caption_list) != len(flat):
            raise DatasetError(
                f"got {len(flat)} image(s) but {len(caption_list)} caption(s); give exactly one caption per image, "
                "or a single caption for all of them."
            )
    if not isinstance(num_repeats, int) or isinstance(num_repeats, bool) or num_repeats < 1:
        raise DatasetError(f"num_repeats must be a whole number >= 1, got {num_repeats!r}.")
    result = ScanResult()
    for i, (im, cap) in enumerate(zip(flat, caption_list)):
        if not isinstance(cap, str):
            raise DatasetError(f"caption {i} is {type(cap).__name__}, not text; pass strings.")
        notes: list[str] = []
        if isinstance(im, Image.Image):
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"image {i}: animated image; only the current frame is used.")
            rgb = to_rgb(im, f"image {i}")
            if rgb is im:
                rgb = im.copy()
        else:
            rgb = _array_to_rgb(im, i, notes)
        caption = cap.lstrip("\ufeff").strip()
        if not caption:
            notes.append(f"image {i}: empty caption.")
        mask = _graph_mask(mask_list[i], rgb.size, i, invert_masks) if mask_list is not None else None
        result.items.append(
            DatasetItem(
                image_path=None,
                image=rgb,
                caption=caption,
                num_repeats=num_repeats,
                subset=name,
                is_reg=is_reg,
                image_size=rgb.size,
                warnings=notes,
                caption_source="input",
                image_key=f"{name}/{i:05d}",
                mask=mask,
            )
        )
        result.warnings.extend(notes)
    return result


def folder_fingerprint(path: PathLike, input_dir: PathLike | None = None) -> str:
    """A cheap signature of a dataset folder (names, sizes, mtimes of every file below it).

    ComfyUI re-runs a node only when its inputs change; a folder path does not change when a caption
    or an image in it is edited. The dataset nodes return this from ``fingerprint_inputs`` so such
    edits re-run the scan (the caches then re-encode only what really changed).
    """
    import hashlib

    h = hashlib.sha256()
    try:
        root, _ = resolve_dataset_path(path, input_dir)
    except DatasetError:
        return "unresolvable"
    if root.is_file():
        st = root.stat()
        h.update(f"{root}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            h.update(f"{full}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
