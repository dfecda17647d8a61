"""Open training images robustly and turn them into plain 8-bit RGB.

kohya sd-scripts loads every image with ``Image.open(p).convert("RGB")``. That is fine for clean
datasets but silently does the wrong thing on real-world folders: transparent pixels keep whatever
(usually black) colour sits under the alpha, 16-bit PNGs are clipped to white, phone photos are
trained sideways because EXIF orientation is ignored, and a half-downloaded file either crashes the
run hours in or (when some other code turned on ``LOAD_TRUNCATED_IMAGES``) trains on grey padding.
This module does the conversions deliberately and turns every failure into a ``DatasetError``
whose message names the file and says how to fix it.

Deliberate differences from kohya (documented in the README):
- EXIF orientation is applied by default (``exif_transpose=True``); pass False for kohya's behaviour.
- Transparency is composited on white (kohya drops alpha, exposing the hidden RGB values).
- 16-bit / 32-bit integer greyscale is scaled to 8 bits (kohya/Pillow clip it).
- Animated files (GIF, APNG, animated WebP) use their first frame and report a warning.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

PathLike = Union[str, "os.PathLike[str]"]

#: Extensions kohya's ``glob_images`` accepts (it lists lower- and upper-case spellings; we compare
#: case-insensitively so ``.Png`` is accepted too).
KOHYA_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Animation formats Pillow reads that kohya skips: trained on their first frame, with a warning (the kohya export
#: writes that frame as a PNG).
FIRST_FRAME_EXTENSIONS: tuple[str, ...] = (".gif", ".apng")
#: Every extension a dataset scan trains on.
ACCEPTED_EXTENSIONS: tuple[str, ...] = KOHYA_EXTENSIONS + FIRST_FRAME_EXTENSIONS

#: Guard against decompression bombs, checked from the header before any pixel is decoded.
#: 128 megapixels (e.g. 11585x11585) is ~100x an SDXL training image yet below Pillow's own hard
#: limit (2 * Image.MAX_IMAGE_PIXELS = 179 MP), so our clearer message fires first. There is
#: deliberately no per-side limit: long strips such as 12000x300 (3.6 MP) are fine.
DEFAULT_MAX_PIXELS: int = 128 * 1024 * 1024

WHITE = (255, 255, 255)

# EXIF orientation tag value -> transpose that undoes it (the table of ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

_TRUNCATION_LOCK = threading.Lock()


class DatasetError(ValueError):
    """A dataset input the user has to fix; the message names the file and the fix."""


@dataclass(frozen=True)
class ImageProbe:
    """What a header read tells us about an image (size already accounts for EXIF orientation)."""

    width: int
    height: int
    mode: str
    format: str | None
    n_frames: int
    orientation: int  # EXIF orientation 1..8 (1 when absent or when orientation is not applied)
    transparency: bool = False  # a transparent colour (PNG tRNS) in a mode without alpha channel

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def is_animated(self) -> bool:
        return self.n_frames > 1


def is_image_filename(name: str) -> bool:
    """True when ``name`` ends in one of ACCEPTED_EXTENSIONS (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in ACCEPTED_EXTENSIONS


@contextlib.contextmanager
def _truncated_images_are_errors() -> Iterator[None]:
    """Force Pillow to raise on truncated files while we decode.

    ComfyUI (node_helpers.pillow) and other packs flip the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` on; with it on a cut-off file decodes "successfully" with
    grey padding, which we must never train on.
    """
    with _TRUNCATION_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _describe_non_image(path: Path) -> str:
    """Guess what a file that Pillow cannot identify really is, to make the fix obvious."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return ""
    stripped = head.lstrip()
    if stripped[:1] == b"<":
        return " (it looks like HTML/XML text, e.g. a saved web page instead of the picture)"
    if stripped[:1] in (b"{", b"["):
        return " (it looks like JSON text)"
    if head.startswith(b"PK\x03\x04"):
        return " (it looks like a ZIP archive)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif", b"ftypmsf1"):
        return " (it looks like a HEIC/AVIF file, which this loader does not read)"
    try:
        head.decode("utf-8")
        if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            return " (it looks like a plain text file)"
    except UnicodeDecodeError:
        pass
    return ""


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: file does not exist; check the path or re-scan the dataset.")
    if not path.is_file():
        raise DatasetError(f"{path}: is not a regular file (a folder or device?); remove it from the dataset.")
    if path.stat().st_size == 0:
        raise DatasetError(
            f"{path}: file is empty (0 bytes), probably from an interrupted copy or download; "
            "re-copy or re-export the image, or delete it."
        )


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and turn every failure into a DatasetError."""
    _check_file(path)
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's bomb warning with a clearer message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise DatasetError(
            f"{path}: not an image that can be read although it is named "
            f"'{path.suffix}'{_describe_non_image(path)}; replace it with the real image, "
            "re-save it as PNG/JPEG, or move it out of the dataset folder."
        ) from None
    except Image.DecompressionBombError as e:
        raise DatasetError(
            f"{path}: refused as a possible decompression bomb ({e}); downscale the image "
            "(SDXL trains at about 1 megapixel) and try again."
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(
            f"{path}: the image header is damaged ({e}); re-export the image from its source or delete it."
        ) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise DatasetError(f"{path}: image has no pixels ({w}x{h}); re-export it or delete it.")
    if w * h > max_pixels:
        im.close()
        raise DatasetError(
            f"{path}: image is {w}x{h} ({w * h / 1e6:.1f} megapixels), above the limit of "
            f"{max_pixels / 1e6:.1f} megapixels that guards against decompression bombs; downscale it "
            "(SDXL trains at about 1 megapixel, so nothing is lost) or raise max_pixels."
        )
    return im


def _decode_error(path: Path, err: BaseException) -> DatasetError:
    text = str(err)
    if "truncated" in text.lower():
        return DatasetError(
            f"{path}: image data is truncated ({text}); the file was cut short by an interrupted download "
            "or copy. Re-download or re-export it, or delete it."
        )
    return DatasetError(
        f"{path}: image data is corrupt and cannot be decoded ({type(err).__name__}: {text}); "
        "re-export it from the original or delete it."
    )


def _orientation(im: Image.Image, loaded: bool) -> int:
    """EXIF orientation (1..8) without forcing a full decode when we only probe.

    Pillow's PNG ``getexif()`` decodes the whole image when the eXIf chunk was not seen in the
    header; during a probe we only trust an eXIf chunk that precedes the pixel data (where writers
    put it), and the full load in load_image_rgb/verify re-reads it after decoding.
    """
    try:
        if not loaded and im.format == "PNG" and "exif" not in im.info:
            return 1
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        value = int(value)
    except Exception:  # malformed EXIF must never make an otherwise good image unusable
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    w, h = size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def probe_image_info(path: PathLike, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageProbe:
    """Read only the header: size after orientation, mode, format, frame count.

    Does not detect truncated pixel data (use verify_image for that); it does catch empty files,
    non-images and oversized images.
    """
    p = Path(path)
    im = _open(p, max_pixels)
    try:
        orientation = _orientation(im, loaded=False) if exif_transpose else 1
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        w, h = _oriented_size(im.size, orientation)
        return ImageProbe(w, h, im.mode, im.format, n_frames, orientation, "transparency" in im.info)
    finally:
        im.close()


def verify_image(path: PathLike, exif_transpose: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageProbe:
    """Decode the (first frame's) pixel data to catch truncated/corrupt files at scan time.

    Pillow opens lazily, so a file cut in half opens fine and only fails when pixels are read;
    kohya would fail hours later while caching latents. JPEGs are decoded at 1/8 scale (``draft``),
    which still reads every byte of entropy-coded data but costs a fraction of a full decode.
    """
    p = Path(path)
    with _truncated_images_are_errors():
        im = _open(p, max_pixels)
        try:
            full_size = im.size
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            mode = im.mode
            if im.format == "JPEG":
                im.draft("RGB", (max(1, full_size[0] // 8), max(1, full_size[1] // 8)))
            try:
                im.load()
            except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError/EOFError/zlib.error
                raise _decode_error(p, e) from None
            orientation = _orientation(im, loaded=True) if exif_transpose else 1
            w, h = _oriented_size(full_size, orientation)
            return ImageProbe(w, h, mode, im.format, n_frames, orientation, "transparency" in im.info)
        finally:
            im.close()


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    """Map 0..full_scale linearly onto 0..255 with round-half-up (instead of clipping at 255)."""
    a = np.clip(arr.astype(np.float64), 0.0, full_scale)
    return np.floor(a * (255.0 / full_scale) + 0.5).astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image, path: PathLike = "<image>") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency goes on white, high bit depth is scaled."""
    mode = im.mode
    has_transparency = "transparency" in im.info
    if mode == "RGB" and not has_transparency:
        return im
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (has_transparency and mode in ("P", "L", "RGB")):
        return _composite_on_white(im.convert("RGBA"))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        gray = _scale_to_uint8(np.asarray(im), 65535.0)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "I":
        # 32-bit integer images come from 16-bit PNG/TIFF decoders; treat them as 16-bit data.
        gray = _scale_to_uint8(np.asarray(im), 65535.0)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        # Float images are either 0..1 (scientific/HDR exports) or 0..255; pick by range.
        full_scale = 1.0 if finite.size and float(finite.max()) <= 1.0 else 255.0
        gray = _scale_to_uint8(np.nan_to_num(arr, nan=0.0), full_scale)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "1":
        return im.convert("L").convert("RGB")
    try:
        # L, P, CMYK, YCbCr, RGBX, LAB, HSV ... Pillow's own conversions are correct for these.
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise DatasetError(
            f"{path}: colour mode {mode!r} cannot be converted to RGB ({e}); re-save the image as an "
            "8-bit RGB PNG or JPEG."
        ) from None


def _load_oriented(path: Path, exif_transpose: bool, max_pixels: int, warnings_out: list[str] | None) -> Image.Image:
    """The first frame, fully decoded in its own mode and EXIF-oriented (when asked); detached from the file."""
    with _truncated_images_are_errors():
        im = _open(path, max_pixels)
        try:
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            if n_frames > 1:
                im.seek(0)
                if warnings_out is not None:
                    warnings_out.append(
                        f"{path}: animated image with {n_frames} frames; only the first frame is used. "
                        "Export the frame you want as PNG to silence this."
                    )
            try:
                im.load()
            except Exception as e:
                raise _decode_error(path, e) from None
            orientation = _orientation(im, loaded=True) if exif_transpose else 1
            out = im.transpose(_ORIENTATION_TRANSPOSE[orientation]) if orientation != 1 else im.copy()
            out.info = {k: v for k, v in im.info.items() if k != "exif"}
            return out
        finally:
            im.close()


def load_image_rgb(
    path: PathLike,
    exif_transpose: bool = True,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    warnings_out: list[str] | None = None,
) -> Image.Image:
    """Load ``path`` fully decoded as an 8-bit RGB image, ready for resizing/cropping.

    ``exif_transpose`` (default True) rotates/flips by the EXIF orientation tag as photo viewers
    do; kohya does not (pass False to reproduce kohya bit for bit on such photos). Non-fatal notes
    (animated file -> first frame) are appended to ``warnings_out`` when a list is given.
    Raises DatasetError for anything unusable.
    """
    p = Path(path)
    return to_rgb(_load_oriented(p, exif_transpose, max_pixels, warnings_out), p)


def has_alpha(im: Image.Image) -> bool:
    """True for modes with an alpha channel and for images with a transparent colour."""
    return im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info


def load_image_with_alpha(
    path: PathLike, exif_transpose: bool = True, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, Image.Image | None]:
    """(RGB, alpha 'L' or None) for kohya's alpha_mask: the RGB is the stored colour with the alpha dropped, NOT
    composited on white (kohya: ``convert("RGBA")`` and ``[:, :, :3]``); None when the image has no alpha."""
    p = Path(path)
    im = _load_oriented(p, exif_transpose, max_pixels, None)
    if not has_alpha(im):
        return to_rgb(im, p), None
    rgba = im.convert("RGBA")
    return rgba.convert("RGB"), rgba.getchannel("A")
