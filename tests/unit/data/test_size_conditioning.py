"""SDXL time_ids and size embedding against kohya's dataset path (golden time_ids.json)."""

from __future__ import annotations

import pytest
import torch
from golden_data import load_golden as _load_for_params  # noqa: E402  (collection-time parameters)

from sdxl_lora_trainer.trainer.data.buckets import BucketSelector, BucketSettings
from sdxl_lora_trainer.trainer.data.size_conditioning import (
    SizeConditioning,
    size_conditioning,
    size_embedding,
)

_DATA = _load_for_params("time_ids")
CASE_IDS = [
    f"{i}-{c['setting'].split('_')[0]}-{c['image_size'][0]}x{c['image_size'][1]}-{'flip' if c['flipped'] else 'noflip'}"
    for i, c in enumerate(_DATA.get("cases", []))
]
NON_BUCKET_IDS = [
    f"{i}-{'flip' if c['flipped'] else 'noflip'}" for i, c in enumerate(_DATA.get("non_bucket_cases", []))
]


def _settings(golden, setting_id: str) -> BucketSettings:
    (entry,) = [s for s in golden("buckets")["settings"] if s["id"] == setting_id]
    return BucketSettings(
        resolution=tuple(entry["resolution"]),
        min_bucket_reso=entry["min_bucket_reso"],
        max_bucket_reso=entry["max_bucket_reso"],
        bucket_reso_steps=entry["bucket_reso_steps"],
        bucket_no_upscale=entry["bucket_no_upscale"],
    )


def test_golden_file_has_entries(golden):
    data = golden("time_ids")
    assert len(data["cases"]) == len(CASE_IDS) > 0
    assert len(data["non_bucket_cases"]) == len(NON_BUCKET_IDS) > 0


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_bucket_case(golden, index):
    case = golden("time_ids")["cases"][index]
    sel = BucketSelector(_settings(golden, case["setting"])).select(tuple(case["image_size"]))
    assert sel.bucket == tuple(case["bucket"])
    assert sel.resized_size == tuple(case["resized_size"])
    assert sel.crop_ltrb == tuple(case["get_crop_ltrb_float"])  # exact floats
    cond = size_conditioning(sel, flipped=case["flipped"])
    assert cond.original_size_hw == tuple(case["original_size_hw"])
    assert cond.crop_top_left == tuple(case["crop_top_left"])
    assert cond.target_size_hw == tuple(case["target_size_hw"])
    assert cond.time_ids == tuple(case["time_ids"])
    assert (3, *cond.target_size_hw) == tuple(case["image_tensor_shape_chw"])


@pytest.mark.parametrize("index", range(len(NON_BUCKET_IDS)), ids=NON_BUCKET_IDS)
def test_non_bucket_case(golden, index):
    """The golden non-bucket cases come from kohya's UNCACHED image path, where crop_ltrb is (0, 0, 0, 0). The pack
    always caches latents, and kohya's cache path (trim_and_resize_if_required) takes crop_ltrb from get_crop_ltrb:
    the same numbers unflipped, while a flipped image's left crop is target_w - crop_right = 1024 - 1024.0 = 0 there
    instead of the uncached path's 1024."""
    case = golden("time_ids")["non_bucket_cases"][index]
    assert case["enable_bucket"] is False
    settings = BucketSettings(resolution=tuple(case["resolution"]), enable_bucket=False)
    sel = BucketSelector(settings).select(tuple(case["image_size"]))
    cond = size_conditioning(sel, flipped=case["flipped"])
    assert cond.original_size_hw == tuple(case["original_size_hw"])
    assert cond.target_size_hw == tuple(case["target_size_hw"])
    if not case["flipped"]:
        assert cond.crop_top_left == tuple(case["crop_top_left"])
        assert cond.time_ids == tuple(case["time_ids"])
    else:
        top, uncached_left = case["crop_top_left"]
        assert uncached_left == case["target_size_hw"][1]  # the uncached path's quirk, recorded by kohya's code
        assert sel.crop_ltrb[2] == case["target_size_hw"][1]  # the cache path's crop_right: the full width
        assert cond.crop_top_left == (top, 0)


def test_non_bucket_cache_path_time_ids_by_hand():
    """enable_bucket=False with an image of another size: kohya's cached-latent time_ids, computed from its formulas.

    original = the file's (H, W); crop_ltrb = get_crop_ltrb(resolution, original); flipped left = target_w -
    crop_right; target = the resolution.
    """
    sel = BucketSelector(BucketSettings(resolution=(1024, 1024), enable_bucket=False)).select((2048, 1536))
    # 1024x1024 vs 4:3: fitted 1024 x 768, top (1024 - 768) // 2 = 128, left 0, right 1024
    assert size_conditioning(sel).time_ids == (1536, 2048, 128, 0, 1024, 1024)
    assert size_conditioning(sel, flipped=True).time_ids == (1536, 2048, 128, 0, 1024, 1024)
    sel = BucketSelector(BucketSettings(resolution=(1024, 768), enable_bucket=False)).select((800, 1200))
    # 1024x768 vs 2:3: fitted 512 x 768, left (1024 - 512) // 2 = 256, right 768; flipped left 1024 - 768 = 256
    assert size_conditioning(sel).time_ids == (1200, 800, 0, 256, 768, 1024)
    assert size_conditioning(sel, flipped=True).time_ids == (1200, 800, 0, 256, 768, 1024)
    sel = BucketSelector(BucketSettings(resolution=(1024, 768), enable_bucket=False)).select((900, 600))
    # 3:2 > 4:3: fitted 1024 x 682.67, top (768 - 682.67) // 2 = 42; pixels: scale 768/600 -> 1152x768, trim 64 left
    assert sel.resized_size == (1152, 768) and sel.crop_offset == (64, 0)
    assert size_conditioning(sel).time_ids == (600, 900, 42, 0, 768, 1024)
    assert size_conditioning(sel, true_crop=True).time_ids == (600, 900, 0, 64, 768, 1024)


def test_flip_can_shift_crop_left_by_one(golden):
    """README quirk 2 is present in the golden data and reproduced (not just averaged away)."""
    cases = golden("time_ids")["cases"]
    pairs = {}
    for case in cases:
        pairs.setdefault((case["setting"], tuple(case["image_size"])), {})[case["flipped"]] = case
    shifted = [k for k, v in pairs.items() if v[True]["crop_top_left"][1] != v[False]["crop_top_left"][1]]
    assert shifted, "expected at least one golden case where flipping changes crop_left"
    for setting, size in shifted:
        sel = BucketSelector(_settings(golden, setting)).select(size)
        assert size_conditioning(sel, True).crop_top_left != size_conditioning(sel, False).crop_top_left


# ---------------------------------------------------------------------------------------------------- true crop


def test_true_crop_option():
    settings = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048)
    sel = BucketSelector(settings).select((1920, 1080))  # bucket 1344x768, resized 1365x768, 21 px trimmed
    assert size_conditioning(sel).crop_top_left == (6, 0)  # kohya's letterbox value
    assert size_conditioning(sel, true_crop=True).crop_top_left == (0, 10)
    # flipped: the kept columns 10..1353 of the resized image are columns 11..1354 of the mirrored one
    assert size_conditioning(sel, flipped=True, true_crop=True).crop_top_left == (0, 11)
    assert size_conditioning(sel, true_crop=True).original_size_hw == (1080, 1920)
    assert size_conditioning(sel, true_crop=True).target_size_hw == (768, 1344)


def test_true_crop_no_upscale_top():
    settings = BucketSettings(resolution=(1024, 1024), max_bucket_reso=2048, bucket_no_upscale=True)
    sel = BucketSelector(settings).select((257, 1000))
    assert size_conditioning(sel).crop_top_left == (0, 4)
    assert size_conditioning(sel, true_crop=True).crop_top_left == (20, 0)
    assert size_conditioning(sel, flipped=True, true_crop=True).crop_top_left == (20, 1)


def test_non_bucket_flip_of_an_image_of_the_resolution():
    sel = BucketSelector(BucketSettings(resolution=(1024, 1024), enable_bucket=False)).select((1024, 1024))
    assert size_conditioning(sel, flipped=True).crop_top_left == (0, 0)  # kohya's cache path: 1024 - 1024.0
    assert size_conditioning(sel, flipped=True, true_crop=True).crop_top_left == (0, 0)


# ---------------------------------------------------------------------------------------------------- embedding


def test_size_embedding_matches_kohya(golden):
    ref = golden("time_ids")["size_embedding"]
    emb = size_embedding(torch.tensor([ref["time_ids"]], dtype=torch.long))
    assert list(emb.shape) == ref["shape"]
    assert str(emb.dtype) == ref["dtype"]
    expected = torch.tensor(ref["values"], dtype=torch.float64).reshape(ref["shape"])
    torch.testing.assert_close(emb.double(), expected, rtol=1e-6, atol=1e-6)


def test_size_embedding_from_conditioning_and_batch(golden):
    ref = golden("time_ids")["size_embedding"]
    cond = SizeConditioning(
        original_size_hw=tuple(ref["time_ids"][0:2]),
        crop_top_left=tuple(ref["time_ids"][2:4]),
        target_size_hw=tuple(ref["time_ids"][4:6]),
    )
    other = SizeConditioning((1024, 1024), (0, 0), (1024, 1024))
    ids = torch.tensor([cond.time_ids, other.time_ids], dtype=torch.long)  # as the batch loader builds it
    batch = size_embedding(ids)
    assert batch.shape == (2, 1536)
    torch.testing.assert_close(batch[0], size_embedding(list(cond.time_ids))[0], rtol=0, atol=0)
    torch.testing.assert_close(batch[1], size_embedding(ids[1])[0], rtol=0, atol=0)
    expected = torch.tensor(ref["values"], dtype=torch.float32)
    torch.testing.assert_close(batch[0], expected, rtol=1e-6, atol=1e-6)


def test_size_embedding_layout_cos_first():
    emb = size_embedding([0, 0, 0, 0, 0, 0])[0]
    for k in range(6):
        block = emb[k * 256 : (k + 1) * 256]
        assert torch.equal(block[:128], torch.ones(128))  # cos(0)
        assert torch.equal(block[128:], torch.zeros(128))  # sin(0)
    emb = size_embedding([1, 0, 0, 0, 0, 0])[0]
    # first frequency is exactly 1 (no shift): slot 0 = cos(1), slot 128 = sin(1)
    assert emb[0].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item(), abs=1e-7)
    assert emb[128].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item(), abs=1e-7)


def test_size_embedding_rejects_bad_shape():
    with pytest.raises(ValueError):
        size_embedding([1, 2, 3])
