"""Aspect-ratio buckets exactly as kohya sd-scripts makes and selects them.

kohya (library/train_util.BucketManager, library/model_util.make_bucket_resolutions) decides, per image, the bucket
(the final training size, [W, H]) and the intermediate ``resized_size`` the image is scaled to before a centre crop
down to the bucket. Everything downstream (latent shapes, SDXL time_ids, batch composition) depends on these two
numbers, so they are reproduced bit for bit, including kohya's odd corners:

* The predefined list (``make_bucket_resolutions``): the square bucket ``floor(sqrt(W*H)/step)*step`` plus, for
  ``w = min, min+step, ... <= max``: ``h = min(max, floor(floor(W*H / w) / step) * step)``, kept if ``h >= min``,
  added as (w, h) and (h, w); sorted by (W, H). min/max are first rounded DOWN/UP to a multiple of the step.
* Selection: an image whose exact size is a predefined bucket keeps it; otherwise the bucket with the smallest
  |bucket_ar - image_ar| wins, the FIRST one in sorted order on a tie (numpy argmin). The image is scaled to COVER
  the bucket (fit the height if it is wider than the bucket, else the width), rounded half up, so for extreme
  aspect ratios the resized image can be far larger than the bucket (4096x1024 in 1536x640 -> 2560x640).
* ``bucket_no_upscale`` ignores min/max entirely: an image larger than resolution's area is shrunk to that area
  (one side rounded to the step, the other following the aspect ratio), then each side is rounded DOWN to the step.
  Buckets can thus be smaller than min or longer than max, and a side shorter than the step becomes 0.
* ``crop_ltrb`` (``get_crop_ltrb``) is NOT the crop applied to the pixels: it letterboxes the ORIGINAL size INSIDE
  the bucket. It is what kohya feeds SDXL as crop_top_left (see size_conditioning.py). The real centre-crop
  offsets are returned separately as ``crop_offset``.
* ``enable_bucket=False``: one fixed bucket = resolution. kohya's cached-latent path (``cache_batch_latents`` ->
  ``trim_and_resize_if_required``; this pack always caches latents) selects it from a one-bucket list like any other:
  an image of another size is scaled to COVER the resolution and centre-cropped, and crop_ltrb is
  ``get_crop_ltrb(resolution, original size)``. (kohya's uncached image path instead refuses such images and uses
  crop_ltrb = (0, 0, 0, 0); that path never runs here.)

Resizing uses Pillow. kohya's default (library/utils.resize_image) is cv2 INTER_AREA when the image shrinks in both
directions (``w >= new_w and h >= new_h``) and PIL LANCZOS otherwise. We use ``Image.Resampling.BOX`` for the area
case (PIL's box filter is the same pixel-area average as INTER_AREA; the two can differ by a rounding step per pixel)
and ``Image.Resampling.LANCZOS`` for the other case, which is exactly kohya's call. No resize when sizes match.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from PIL import Image

Size = tuple[int, int]  # (W, H)

SDXL_BUCKET_STEP_MULTIPLE = 32  # sdxl_train_network: train_dataset_group.verify_bucket_reso_steps(32)


@dataclass(frozen=True)
class BucketSettings:
    """User-facing bucket options, validated the way kohya asserts them (as ValueErrors).

    Defaults are kohya's command-line defaults. ``min_bucket_reso``/``max_bucket_reso`` are kept as given; the values
    kohya really uses are ``min_bucket_reso_adjusted`` (rounded down to the step) and ``max_bucket_reso_adjusted``
    (rounded up). With ``enable_bucket=False`` min/max/step/no_upscale are ignored, as in kohya.
    """

    resolution: Size
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    enable_bucket: bool = True

    def __post_init__(self) -> None:
        try:
            res = tuple(operator.index(v) for v in self.resolution)
        except TypeError:
            res = ()
        if len(res) != 2 or any(isinstance(v, bool) for v in self.resolution):
            raise ValueError(f"resolution must be two integers (W, H), got {self.resolution!r}")
        if res[0] <= 0 or res[1] <= 0:
            raise ValueError(f"resolution must be positive, got {res}")
        object.__setattr__(self, "resolution", (res[0], res[1]))
        if not self.enable_bucket:
            return
        step = self.bucket_reso_steps
        if not isinstance(step, int) or step <= 0:
            raise ValueError(f"bucket_reso_steps must be a positive integer, got {step!r}")
        if step % SDXL_BUCKET_STEP_MULTIPLE != 0:
            raise ValueError(
                f"bucket_reso_steps is {step}; for SDXL it must be a multiple of {SDXL_BUCKET_STEP_MULTIPLE} "
                f"(kohya's sdxl_train_network asserts this), e.g. 32 or 64"
            )
        adjust_min_max_bucket_reso(self.resolution, self.min_bucket_reso, self.max_bucket_reso, step)

    @property
    def min_bucket_reso_adjusted(self) -> int:
        return adjust_min_max_bucket_reso(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        )[0]

    @property
    def max_bucket_reso_adjusted(self) -> int:
        return adjust_min_max_bucket_reso(
            self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps
        )[1]


def adjust_min_max_bucket_reso(
    resolution: Size, min_bucket_reso: int, max_bucket_reso: int, step: int
) -> tuple[int, int]:
    """min rounded DOWN and max rounded UP to a multiple of ``step``, then checked against ``resolution``.

    Mirrors BaseDataset.adjust_min_max_bucket_reso_by_steps plus BucketManager's asserts; kohya's asserts become
    ValueErrors that say what to change. A min that rounds down to 0 would make kohya divide by zero while building
    the bucket list, so it is rejected here too.
    """
    if min_bucket_reso % step != 0:
        min_bucket_reso -= min_bucket_reso % step
    if max_bucket_reso % step != 0:
        max_bucket_reso += step - max_bucket_reso % step
    if min_bucket_reso <= 0:
        raise ValueError(
            f"min_bucket_reso rounds down to {min_bucket_reso} with bucket_reso_steps={step}; "
            f"it must be at least {step}"
        )
    if min(resolution) < min_bucket_reso:
        raise ValueError(
            f"min_bucket_reso ({min_bucket_reso} after rounding down to a multiple of {step}) must be <= the smaller "
            f"side of resolution {tuple(resolution)}: lower min_bucket_reso or raise the resolution"
        )
    if max(resolution) > max_bucket_reso:
        raise ValueError(
            f"max_bucket_reso ({max_bucket_reso} after rounding up to a multiple of {step}) must be >= the larger "
            f"side of resolution {tuple(resolution)}: raise max_bucket_reso or lower the resolution"
        )
    return min_bucket_reso, max_bucket_reso


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """The predefined bucket list for ``resolution``'s area (model_util.make_bucket_resolutions), sorted by (W, H)."""
    max_area = resolution[0] * resolution[1]
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def predefined_buckets(settings: BucketSettings) -> list[Size] | None:
    """The bucket list images are matched against; None with ``bucket_no_upscale`` (buckets come from the images).

    With ``enable_bucket=False`` the list is the single bucket ``resolution``.
    """
    if not settings.enable_bucket:
        return [settings.resolution]
    if settings.bucket_no_upscale:
        return None
    return make_bucket_resolutions(
        settings.resolution,
        settings.min_bucket_reso_adjusted,
        settings.max_bucket_reso_adjusted,
        settings.bucket_reso_steps,
    )


def get_crop_ltrb(bucket: Size, image_size: Size) -> tuple[float, float, float, float]:
    """kohya's BucketManager.get_crop_ltrb: the ORIGINAL image letterboxed INSIDE the bucket (floats).

    left/top = floor((bucket - fitted) / 2), right/bottom = left/top + fitted. This is not where the pixels were
    cropped (they are scaled to cover the bucket); it is only the convention kohya feeds SDXL.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        fitted_w, fitted_h = bucket[1] * image_ar, bucket[1]
    else:
        fitted_w, fitted_h = bucket[0], bucket[0] / image_ar
    left = (bucket[0] - fitted_w) // 2
    top = (bucket[1] - fitted_h) // 2
    return float(left), float(top), float(left + fitted_w), float(top + fitted_h)


def resize_filter(original_size: Size, resized_size: Size) -> Image.Resampling | None:
    """Pillow filter kohya's default choice maps to, or None when no resize happens.

    kohya: INTER_AREA if the image shrinks (or keeps) in BOTH directions, else LANCZOS (through PIL).
    """
    if tuple(original_size) == tuple(resized_size):
        return None
    if original_size[0] >= resized_size[0] and original_size[1] >= resized_size[1]:
        return Image.Resampling.BOX
    return Image.Resampling.LANCZOS


class EmptyBucketError(ValueError):
    """A bucket side rounded to 0 (bucket_no_upscale with a side shorter than bucket_reso_steps).

    kohya raises ZeroDivisionError for a 0 height and silently makes 0-width tensors (failing later in the VAE)
    for a 0 width; we refuse both up front.
    """


@dataclass(frozen=True)
class BucketSelection:
    """Where one image goes. Sizes are (W, H).

    ``crop_ltrb``: kohya's get_crop_ltrb (floats, letterbox convention, what kohya's time_ids use).
    ``crop_offset``: the real (left, top) of the centre crop in the resized image, in pixels.
    """

    original_size: Size
    bucket: Size
    resized_size: Size
    ar_error: float
    crop_ltrb: tuple[float, float, float, float]
    crop_offset: tuple[int, int]

    @property
    def resample(self) -> Image.Resampling | None:
        return resize_filter(self.original_size, self.resized_size)


def _centre_crop_offset(resized_size: Size, bucket: Size) -> tuple[int, int]:
    """kohya trims ``(resized - bucket) // 2`` from the left and the top (no random_crop)."""
    return max(0, (resized_size[0] - bucket[0]) // 2), max(0, (resized_size[1] - bucket[1]) // 2)


class BucketSelector:
    """Assigns buckets for one dataset, like a kohya BucketManager after make_buckets().

    ``used_buckets()`` is kohya's ``BucketManager.resos`` after ``sort()``: only the buckets some image selected.
    """

    def __init__(self, settings: BucketSettings) -> None:
        self.settings = settings
        self.predefined: list[Size] | None = predefined_buckets(settings)
        self._predefined_set = set(self.predefined) if self.predefined is not None else set()
        self._predefined_ars = [w / h for w, h in self.predefined] if self.predefined is not None else []
        self._max_area = settings.resolution[0] * settings.resolution[1]
        self._used: set[Size] = set()

    def used_buckets(self) -> list[Size]:
        return sorted(self._used)

    def select(self, image_size: Size) -> BucketSelection:
        """Bucket, resized size, signed ar_error and crops for an image of ``image_size`` (W, H)."""
        width, height = int(image_size[0]), int(image_size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {(width, height)}")
        if self.settings.bucket_no_upscale and self.settings.enable_bucket:
            bucket, resized = self._select_no_upscale(width, height)
        else:
            bucket, resized = self._select_predefined(width, height)
        if bucket[0] == 0 or bucket[1] == 0:
            raise EmptyBucketError(
                f"image {width}x{height} gets bucket {bucket[0]}x{bucket[1]} with bucket_no_upscale: a side shorter "
                f"than bucket_reso_steps={self.settings.bucket_reso_steps} rounds down to 0; "
                f"drop or upscale this image, or turn off bucket_no_upscale"
            )
        self._used.add(bucket)
        ar_error = bucket[0] / bucket[1] - width / height
        return BucketSelection(
            original_size=(width, height),
            bucket=bucket,
            resized_size=resized,
            ar_error=ar_error,
            crop_ltrb=get_crop_ltrb(bucket, (width, height)),
            crop_offset=_centre_crop_offset(resized, bucket),
        )

    def _select_predefined(self, width: int, height: int) -> tuple[Size, Size]:
        aspect = width / height
        bucket: Size = (width, height)
        if bucket not in self._predefined_set:
            # first index of the smallest |error| (numpy argmin semantics)
            errors = [abs(ar - aspect) for ar in self._predefined_ars]
            bucket = self.predefined[errors.index(min(errors))]
        if aspect > bucket[0] / bucket[1]:
            scale = bucket[1] / height  # wider than the bucket: fit the height
        else:
            scale = bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        return bucket, resized

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.settings.bucket_reso_steps

    def _select_no_upscale(self, width: int, height: int) -> tuple[Size, Size]:
        aspect = width / height
        step = self.settings.bucket_reso_steps
        if width * height > self._max_area:
            # shrink to the resolution's area; round one side to the step, pick the one with less ar error
            resized_w = math.sqrt(self._max_area * aspect)
            resized_h = self._max_area / resized_w
            w_rounded = self._round_to_steps(resized_w)
            h_in_w = self._round_to_steps(w_rounded / aspect)
            h_rounded = self._round_to_steps(resized_h)
            w_in_h = self._round_to_steps(h_rounded * aspect)
            # kohya divides here; a 0 denominator means a degenerate image -> report it clearly
            if h_in_w == 0 or h_rounded == 0:
                raise EmptyBucketError(
                    f"image {width}x{height} is too elongated for bucket_no_upscale at resolution "
                    f"{self.settings.resolution} with bucket_reso_steps={step}: a side rounds down to 0"
                )
            ar_w_rounded = w_rounded / h_in_w
            ar_h_rounded = w_in_h / h_rounded
            if abs(ar_w_rounded - aspect) < abs(ar_h_rounded - aspect):
                resized = (w_rounded, int(w_rounded / aspect + 0.5))
            else:
                resized = (int(h_rounded * aspect + 0.5), h_rounded)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        return bucket, resized


def resize_and_crop(image: Image.Image, selection: BucketSelection) -> Image.Image:
    """Resize ``image`` to ``selection.resized_size`` (kohya's filter choice) and centre-crop it to the bucket."""
    if image.size != tuple(selection.original_size):
        raise ValueError(f"image is {image.size}, the selection was made for {selection.original_size}")
    resample = selection.resample
    if resample is not None:
        image = image.resize(selection.resized_size, resample=resample)
    left, top = selection.crop_offset
    bw, bh = selection.bucket
    if image.size != (bw, bh):
        image = image.crop((left, top, left + bw, top + bh))
    return image
