"""Bucket lists and per-image bucket selection against kohya's own numbers (golden buckets.json)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from golden_data import load_golden as _load_for_params  # noqa: E402  (collection-time parameters)
from PIL import Image

from sdxl_lora_trainer.trainer.data.buckets import (
    BucketSelection,
    BucketSelector,
    BucketSettings,
    EmptyBucketError,
    adjust_min_max_bucket_reso,
    get_crop_ltrb,
    make_bucket_resolutions,
    predefined_buckets,
    resize_and_crop,
    resize_filter,
)

_DATA = _load_for_params("buckets")
SETTING_IDS = [s["id"] for s in _DATA.get("settings", [])]
SELECTION_IDS = [(s["id"], i) for s in _DATA.get("settings", []) for i, _ in enumerate(s["selections"])]


def _setting(golden, setting_id: str) -> dict:
    (entry,) = [s for s in golden("buckets")["settings"] if s["id"] == setting_id]
    return entry


def settings_from_golden(entry: dict) -> BucketSettings:
    return BucketSettings(
        resolution=tuple(entry["resolution"]),
        min_bucket_reso=entry["min_bucket_reso"],
        max_bucket_reso=entry["max_bucket_reso"],
        bucket_reso_steps=entry["bucket_reso_steps"],
        bucket_no_upscale=entry["bucket_no_upscale"],
    )


def test_golden_file_has_entries(golden):
    data = golden("buckets")
    assert [s["id"] for s in data["settings"]] == SETTING_IDS and SETTING_IDS
    assert len(SELECTION_IDS) == sum(len(s["selections"]) for s in data["settings"])


@pytest.mark.parametrize("setting_id", SETTING_IDS)
def test_adjusted_min_max(golden, setting_id):
    entry = _setting(golden, setting_id)
    settings = settings_from_golden(entry)
    assert settings.min_bucket_reso_adjusted == entry["min_bucket_reso_adjusted"]
    assert settings.max_bucket_reso_adjusted == entry["max_bucket_reso_adjusted"]


@pytest.mark.parametrize("setting_id", SETTING_IDS)
def test_predefined_bucket_list(golden, setting_id):
    entry = _setting(golden, setting_id)
    buckets = predefined_buckets(settings_from_golden(entry))
    if entry["predefined_buckets"] is None:
        assert buckets is None
        assert "n_predefined_buckets" not in entry or entry["n_predefined_buckets"] in (None, 0)
    else:
        assert buckets == [tuple(b) for b in entry["predefined_buckets"]]
        assert len(buckets) == entry["n_predefined_buckets"]


_ERROR_TYPES = {"ZeroDivisionError": EmptyBucketError, "AssertionError": ValueError}


@pytest.mark.parametrize("setting_id,index", SELECTION_IDS, ids=[f"{s}-{i}" for s, i in SELECTION_IDS])
def test_selection(golden, setting_id, index):
    entry = _setting(golden, setting_id)
    sel = entry["selections"][index]
    selector = BucketSelector(settings_from_golden(entry))
    if "error" in sel:
        with pytest.raises(_ERROR_TYPES.get(sel["error"], Exception)):
            selector.select(tuple(sel["image_size"]))
        return
    got = selector.select(tuple(sel["image_size"]))
    assert got.original_size == tuple(sel["image_size"])
    assert got.bucket == tuple(sel["bucket"])
    assert got.resized_size == tuple(sel["resized_size"])
    assert got.ar_error == sel["ar_error"]  # same float64 arithmetic -> bit-identical


@pytest.mark.parametrize("setting_id", SETTING_IDS)
def test_manager_resos_after_sort(golden, setting_id):
    entry = _setting(golden, setting_id)
    selector = BucketSelector(settings_from_golden(entry))
    for sel in entry["selections"]:
        if "error" not in sel:
            selector.select(tuple(sel["image_size"]))
    assert selector.used_buckets() == [tuple(b) for b in entry["manager_resos_after_sort"]]


def test_predefined_list_function_matches_settings_path(golden):
    entry = _setting(golden, SETTING_IDS[0])
    direct = make_bucket_resolutions(
        tuple(entry["resolution"]),
        entry["min_bucket_reso_adjusted"],
        entry["max_bucket_reso_adjusted"],
        entry["bucket_reso_steps"],
    )
    assert direct == [tuple(b) for b in entry["predefined_buckets"]]


# --------------------------------------------------------------------------------------------------- validation


def test_reso_steps_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        BucketSettings(resolution=(1024, 1024), bucket_reso_steps=48, max_bucket_reso=2048)
    with pytest.raises(ValueError, match="multiple of 32"):
        BucketSettings(resolution=(1024, 1024), bucket_reso_steps=8, max_bucket_reso=2048)
    BucketSettings(resolution=(1024, 1024), bucket_reso_steps=32, max_bucket_reso=2048)


def test_min_max_rounding():
    assert adjust_min_max_bucket_reso((1024, 1024), 300, 1000, 64) == (256, 1024)
    assert adjust_min_max_bucket_reso((1024, 1024), 256, 2048, 64) == (256, 2048)
    s = BucketSettings(resolution=(1024, 1024), min_bucket_reso=300, max_bucket_reso=1000)
    assert (s.min_bucket_reso, s.max_bucket_reso) == (300, 1000)  # kept as given
    assert (s.min_bucket_reso_adjusted, s.max_bucket_reso_adjusted) == (256, 1024)


def test_min_larger_than_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketSettings(resolution=(1024, 512), min_bucket_reso=640, max_bucket_reso=2048)


def test_max_smaller_than_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="max_bucket_reso"):
        BucketSettings(resolution=(1024, 1024), min_bucket_reso=256, max_bucket_reso=960)


def test_min_rounding_to_zero_is_rejected():
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketSettings(resolution=(1024, 1024), min_bucket_reso=32, max_bucket_reso=2048, bucket_reso_steps=64)


def test_bad_resolution():
    with pytest.raises(ValueError):
        BucketSettings(resolution=(1024,))
    with pytest.raises(ValueError):
        BucketSettings(resolution=(0, 1024))


def test_disabled_bucketing_ignores_bucket_options():
    s = BucketSettings(resolution=(1024, 1024), bucket_reso_steps=48, min_bucket_reso=4096, enable_bucket=False)
    assert predefined_buckets(s) == [(1024, 1024)]


# ----------------------------------------------------------------------------------------------- quirks and crops


@pytest.mark.parametrize("size", [(1000, 40), (2000, 20)])
def test_no_upscale_zero_height_bucket(size):
    s = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048, bucket_no_upscale=True)
    with pytest.raises(EmptyBucketError):
        BucketSelector(s).select(size)


@pytest.mark.parametrize("size", [(40, 1000), (20, 2000)])
def test_no_upscale_zero_width_bucket(size):
    s = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048, bucket_no_upscale=True)
    with pytest.raises(EmptyBucketError):
        BucketSelector(s).select(size)


def test_no_upscale_ignores_min_max():
    # min 512 but a 300x300 image gets a 256x256 bucket (README quirk 16)
    s = BucketSettings(resolution=(1024, 1024), min_bucket_reso=512, max_bucket_reso=1024, bucket_no_upscale=True)
    sel = BucketSelector(s).select((300, 300))
    assert sel.bucket == (256, 256) and sel.resized_size == (300, 300)


def test_no_upscale_area_reduction_rounds_half_up_to_step():
    # 2047x2048 shrinks to width sqrt(1024*1024*2047/2048) = 1023.75, which kohya rounds to 1024 (not down to 960)
    s = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048, bucket_no_upscale=True)
    sel = BucketSelector(s).select((2047, 2048))
    assert sel.bucket == (1024, 1024) and sel.resized_size == (1024, 1024)


def test_disabled_bucketing_resizes_and_centre_crops_like_kohyas_cache_path():
    """enable_bucket=False: kohya's cache path (trim_and_resize_if_required) on a one-bucket list, numbers by hand.

    select_bucket: scale = res_h / h if w/h > res_w/res_h else res_w / w; resized = int(side * scale + 0.5);
    trim (resized - res) // 2; crop_ltrb = get_crop_ltrb(res, original): the original letterboxed inside res.
    """
    selector = BucketSelector(BucketSettings(resolution=(1024, 1024), enable_bucket=False))
    same = selector.select((1024, 1024))
    assert (same.bucket, same.resized_size, same.crop_offset) == ((1024, 1024), (1024, 1024), (0, 0))
    assert same.crop_ltrb == (0.0, 0.0, 1024.0, 1024.0) and same.resample is None
    small = selector.select((1000, 1000))  # scale 1024/1000: upscaled to exactly the resolution
    assert (small.bucket, small.resized_size, small.crop_offset) == ((1024, 1024), (1024, 1024), (0, 0))
    assert small.crop_ltrb == (0.0, 0.0, 1024.0, 1024.0)
    wide = selector.select((2048, 1536))  # 4:3 > 1: scale = 1024/1536, 2048*2/3 = 1365.33 -> 1365, trim 341 // 2
    assert (wide.bucket, wide.resized_size, wide.crop_offset) == ((1024, 1024), (1365, 1024), (170, 0))
    assert wide.crop_ltrb == (0.0, 128.0, 1024.0, 896.0)  # 1024 / (4/3) = 768 tall, (1024 - 768) // 2 = 128
    assert wide.ar_error == 1.0 - 2048 / 1536
    tall = BucketSelector(BucketSettings(resolution=(1024, 768), enable_bucket=False)).select((800, 1200))
    # 2/3 < 4/3: scale = 1024/800 = 1.28 -> (1024, 1536), trim (1536 - 768) // 2 = 384 from the top
    assert (tall.bucket, tall.resized_size, tall.crop_offset) == ((1024, 768), (1024, 1536), (0, 384))
    assert tall.crop_ltrb == (256.0, 0.0, 768.0, 768.0)  # 768 * 2/3 = 512 wide, (1024 - 512) // 2 = 256
    # bucket_no_upscale is ignored without buckets (kohya builds BucketManager(no_upscale=False, ...))
    no_upscale = BucketSettings(resolution=(1024, 1024), enable_bucket=False, bucket_no_upscale=True)
    assert BucketSelector(no_upscale).select((2048, 1536)).resized_size == (1365, 1024)


def test_selection_is_frozen():
    sel = BucketSelector(BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048)).select((1920, 1080))
    assert isinstance(sel, BucketSelection)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.bucket = (1, 1)  # type: ignore[misc]


@pytest.mark.parametrize(
    "size,tied,expected",
    [
        ((640, 600), [(1024, 1024), (1088, 960)], (1024, 1024)),
        ((1920, 1024), [(1344, 768), (1408, 704)], (1344, 768)),
        ((208, 1024), [(384, 2048), (448, 2048)], (384, 2048)),
    ],
)
def test_tie_goes_to_first_bucket_in_sorted_order(size, tied, expected):
    """README quirk 5: numpy argmin keeps the first of equal |ar errors| (these sizes tie exactly in float64)."""
    settings = BucketSettings(resolution=(1024, 1024), min_bucket_reso=256, max_bucket_reso=2048)
    buckets = predefined_buckets(settings)
    aspect = size[0] / size[1]
    errors = [abs(w / h - aspect) for w, h in tied]
    assert errors[0] == errors[1] == min(abs(w / h - aspect) for w, h in buckets)  # the premise: an exact tie
    assert BucketSelector(settings).select(size).bucket == expected


@pytest.mark.parametrize(
    "size,bucket,resized",
    [
        ((262, 512), (704, 1408), (721, 1408)),  # 262 * 2.75 = 720.5 -> 721 (round() would give 720)
        ((258, 512), (704, 1408), (710, 1408)),  # 709.5 -> 710
    ],
)
def test_resized_size_rounds_half_up(size, bucket, resized):
    settings = BucketSettings(resolution=(1024, 1024), min_bucket_reso=256, max_bucket_reso=2048)
    sel = BucketSelector(settings).select(size)
    assert sel.bucket == bucket and sel.resized_size == resized


# README quirk 1 examples: (settings, image) -> real centre-crop offset (left, top) of the cover-resize
@pytest.mark.parametrize(
    "no_upscale,size,bucket,offset",
    [
        (False, (1920, 1080), (1344, 768), (10, 0)),
        (True, (257, 1000), (256, 960), (0, 20)),
        (True, (800, 600), (768, 576), (16, 12)),
        (False, (1024, 1024), (1024, 1024), (0, 0)),
    ],
)
def test_true_crop_offsets(no_upscale, size, bucket, offset):
    s = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048, bucket_no_upscale=no_upscale)
    sel = BucketSelector(s).select(size)
    assert sel.bucket == bucket
    assert sel.crop_offset == offset
    # the crop window always lies inside the resized image
    assert sel.crop_offset[0] + bucket[0] <= sel.resized_size[0]
    assert sel.crop_offset[1] + bucket[1] <= sel.resized_size[1]


def test_get_crop_ltrb_letterboxes_original():
    # README quirk 1: 1920x1080 in 1344x768 -> (top, left) = (6, 0)
    left, top, right, bottom = get_crop_ltrb((1344, 768), (1920, 1080))
    assert (left, top) == (0.0, 6.0)
    assert right == 1344.0 and math.isclose(bottom, 6.0 + 1344 / (1920 / 1080))


def test_resize_filter_choice():
    assert resize_filter((1920, 1080), (1365, 768)) == Image.Resampling.BOX
    assert resize_filter((512, 512), (1024, 1024)) == Image.Resampling.LANCZOS
    assert resize_filter((1000, 1000), (1001, 999)) == Image.Resampling.LANCZOS  # not shrinking in both
    assert resize_filter((800, 600), (800, 600)) is None


def _gradient(size):
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8), "RGB")


def test_resize_and_crop_without_resize_is_a_centre_crop():
    s = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048, bucket_no_upscale=True)
    sel = BucketSelector(s).select((800, 600))
    img = _gradient((800, 600))
    out = resize_and_crop(img, sel)
    assert out.size == (768, 576)
    assert out.tobytes() == img.crop((16, 12, 784, 588)).tobytes()


@pytest.mark.parametrize(
    "size,resample", [((1920, 1080), Image.Resampling.BOX), ((257, 1000), Image.Resampling.LANCZOS)]
)
def test_resize_and_crop_with_resize(size, resample):
    s = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048)
    sel = BucketSelector(s).select(size)
    img = _gradient(size)
    out = resize_and_crop(img, sel)
    assert out.size == sel.bucket
    assert sel.resample == resample
    ref = img.resize(sel.resized_size, resample=resample)
    left, top = sel.crop_offset
    ref = ref.crop((left, top, left + sel.bucket[0], top + sel.bucket[1]))
    assert out.tobytes() == ref.tobytes()


def test_resize_and_crop_without_buckets_covers_and_centre_crops():
    """enable_bucket=False, 96x72 into 64x64: kohya scales by 64/72 to 85x64 (shrinking both ways: INTER_AREA, BOX
    here) and trims (85 - 64) // 2 = 10 px on the left."""
    sel = BucketSelector(BucketSettings(resolution=(64, 64), enable_bucket=False)).select((96, 72))
    assert sel.resized_size == (85, 64) and sel.crop_offset == (10, 0) and sel.resample == Image.Resampling.BOX
    img = _gradient((96, 72))
    out = resize_and_crop(img, sel)
    ref = img.resize((85, 64), resample=Image.Resampling.BOX).crop((10, 0, 74, 64))
    assert out.size == (64, 64) and out.tobytes() == ref.tobytes()


def test_resize_and_crop_rejects_wrong_image():
    sel = BucketSelector(BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048)).select((1920, 1080))
    with pytest.raises(ValueError):
        resize_and_crop(Image.new("RGB", (100, 100)), sel)
