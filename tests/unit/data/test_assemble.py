"""Building a dataset from a scan leaves the scan as it was: ComfyUI hands the Images node's cached output to every
re-run of 'Buckets & Captions', so bucketing must never write into it."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.sources import DatasetItem, ScanResult


def _item(name: str, size: tuple[int, int]) -> DatasetItem:
    return DatasetItem(None, f"a {name}", image=Image.new("RGB", size), image_key=name, image_size=size)


def test_bucketing_does_not_change_the_scan_it_is_given():
    # with bucket_no_upscale, an image far below the bucket step cannot be bucketed: the dataset skips it
    scan = ScanResult(items=[_item("big", (128, 128)), _item("tiny", (8, 8))], warnings=["from the scan"])
    before = (list(scan.items), list(scan.skipped), list(scan.warnings))
    settings = BucketSettings((128, 128), min_bucket_reso=64, max_bucket_reso=128, bucket_no_upscale=True)
    ds = dataset_from_scan(scan, settings, 1, CaptionOptions())
    assert [img.key for img in ds.images] == ["big"]
    assert [path for path, _ in ds.skipped] == ["tiny"]
    assert (scan.items, scan.skipped, scan.warnings) == before
    again = dataset_from_scan(scan, settings, 1, CaptionOptions())
    assert again.skipped == ds.skipped  # a re-run reports the skip once, not once per run


def test_the_dataset_is_frozen():
    scan = ScanResult(items=[_item("big", (128, 128))])
    ds = dataset_from_scan(scan, BucketSettings((128, 128), 64, 128), 1, CaptionOptions())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.seed = 1
    assert isinstance(ds.parts, tuple) and isinstance(ds.parts[0].images, tuple) and isinstance(ds.skipped, tuple)


def test_buckets_report_gives_each_warning_once(tmp_path):
    """An image without a caption file (and an animated one) is one warning in the Buckets report, not two."""
    from sdxl_lora_trainer.trainer.data.sources import scan_folder

    Image.new("RGB", (128, 128), (9, 9, 9)).save(tmp_path / "nocap.png")
    frames = [Image.new("RGB", (128, 128), c) for c in ((250, 0, 0), (0, 250, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "anim.txt").write_text("a cat")
    ds = dataset_from_scan(scan_folder(tmp_path), BucketSettings((128, 128), 64, 128), 1, CaptionOptions())
    report = ds.report_text()
    assert sum("nocap.png" in line and "caption" in line for line in report.splitlines()) == 1, report
    assert sum("anim.gif" in line and "first frame" in line for line in report.splitlines()) == 1, report
    assert len(ds.warnings) == len(set(ds.warnings)) == 2, ds.warnings
