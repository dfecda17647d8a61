"""kohya's validation split (train_util.split_train_val per DreamBooth subset) and where the pack applies it: the
Buckets node's scan, a dataset TOML's validation_split / validation_seed, and the kohya export, which makes kohya hold
out the same images."""

from __future__ import annotations

import math
import random

import pytest
from dataset_factory import draw_image

from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan, dataset_from_toml
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.sources import items_from_images
from sdxl_lora_trainer.trainer.data.validation_split import split_dataset_items, split_train_val
from sdxl_lora_trainer.trainer.kohya_config.export_folder import export_kohya_run
from sdxl_lora_trainer.trainer.kohya_config.run import KohyaRun
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig

SETTINGS = BucketSettings((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


def test_split_is_kohyas_seeded_shuffle_then_ceil_and_round():
    items = list(range(10))
    train, val = split_train_val(items, 0.2, seed=3)
    shuffled = list(items)
    random.Random(3).shuffle(shuffled)  # kohya: random.seed(validation_seed); random.shuffle(dataset)
    assert (train, val) == (shuffled[:8], shuffled[8:])
    assert split_train_val(items, 0.2, seed=3) == (train, val)  # deterministic
    assert split_train_val(items, 0.2, seed=4) != (train, val)


@pytest.mark.parametrize(("n", "split"), [(3, 0.5), (5, 0.5), (7, 0.3), (10, 0.25), (1, 0.5), (4, 1.0)])
def test_the_counts_are_kohyas_even_where_they_overlap(n, split):
    train, val = split_train_val(list(range(n)), split, seed=0)
    assert len(train) == math.ceil(n * (1 - split))
    assert len(val) == round(n * split)  # Python's round: 2.5 -> 2
    assert sorted(set(train) | set(val)) == list(range(n))


def _scan(n: int, reg: int = 0):
    from PIL import Image

    images = [Image.new("RGB", (64, 64), (i * 40 % 256, 10, 10)) for i in range(n)]
    scan = items_from_images(images, [f"photo {i}" for i in range(n)], name="train", num_repeats=3)
    if reg:
        reg_scan = items_from_images(
            [Image.new("RGB", (64, 64), (0, i * 30, 0)) for i in range(reg)], "a person", name="reg", is_reg=True
        )
        for item in reg_scan.items:
            scan.items.append(type(item)(**{**vars(item), "subset_index": 1}))
    return scan


def test_reg_images_are_never_held_out_and_held_out_images_count_once():
    scan = _scan(6, reg=4)
    split = split_dataset_items(scan.items, 0.5, seed=1)
    assert sum(i.is_reg for i in split.train) == 4 and not any(i.is_reg for i in split.validation)
    assert len(split.validation) == 3 and all(i.num_repeats == 1 for i in split.validation)
    assert not split.notes
    overlap = split_dataset_items(_scan(3).items, 0.5, seed=1)
    assert overlap.notes and "both trained on and validated" in overlap.notes[0]


def test_the_dataset_holds_out_images_from_training_and_reports_them():
    ds = dataset_from_scan(_scan(8), SETTINGS, 1, CaptionOptions(), validation_split=0.25, validation_seed=5)
    held_out = {img.item.caption for img in ds.validation_images}
    assert len(held_out) == 2 and not held_out & {img.item.caption for img in ds.images}
    assert len(ds.images) == 6 and ds.num_batches() == 6 * 3  # repeats stay on the training images
    assert ds.cached_images == ds.images + ds.validation_images
    assert "2 validation images held out (validation_split 0.25, validation_seed 5)" in ds.report_text()
    assert ds.report_json()["num_validation_images"] == 2
    with pytest.raises(ValueError, match="validation_split must be a number from 0"):
        dataset_from_scan(_scan(2), SETTINGS, 1, CaptionOptions(), validation_split=1.5)


def _toml(root, split_lines: str):
    for i in range(6):
        draw_image(root / "train" / f"img{i}.png", (64, 64), seed=i)
        (root / "train" / f"img{i}.txt").write_text(f"photo {i}")
    (root / "cfg.toml").write_text(
        f'[general]\nresolution = 64\ncaption_extension = ".txt"\n{split_lines}'
        '[[datasets]]\nbatch_size = 1\n  [[datasets.subsets]]\n  image_dir = "train"\n  num_repeats = 2\n'
    )
    return root / "cfg.toml"


def test_a_dataset_toml_split_is_honoured_and_kohya_reproduces_it_from_the_export(tmp_path):
    path = _toml(tmp_path / "data", "validation_split = 0.34\nvalidation_seed = 12\n")
    ds, _ = dataset_from_toml(str(path))
    # kohya: shuffle the path-sorted images with seed 12; 4 train (ceil(6 * 0.66)), 2 validation (round(2.04))
    order = [f"photo {i}" for i in range(6)]
    random.Random(12).shuffle(order)
    assert [img.item.caption for img in ds.images] == order[:4]
    assert [img.item.caption for img in ds.validation_images] == order[4:]
    assert (ds.validation_split, ds.validation_seed) == (0.34, 12)
    run = KohyaRun(NetworkConfig(), TrainConfig(max_train_steps=4))
    export = export_kohya_run(run, ds, tmp_path / "out", "run")
    text = (export.folder / "dataset.toml").read_text()
    assert "validation_split = 0.34" in text and "validation_seed = 12" in text
    back, _ = dataset_from_toml(str(export.folder / "dataset.toml"))
    assert [img.item.caption for img in back.images] == order[:4]
    assert [img.item.caption for img in back.validation_images] == order[4:]


def test_a_toml_split_without_a_seed_uses_the_dataset_seed_and_says_so(tmp_path):
    ds, _ = dataset_from_toml(str(_toml(tmp_path, "validation_split = 0.5\n")))
    assert len(ds.validation_images) == 3
    assert any("validation_seed is not set" in w for w in ds.warnings)
