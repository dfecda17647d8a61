"""The exported kohya run folder: self-contained, read back by the dataset TOML reader as the same dataset, never
replacing a folder, and nothing half-written left after a failure."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from dataset_factory import draw_image
from PIL import Image

import sdxl_lora_trainer.trainer.kohya_config.export_folder as export_folder
from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan, dataset_from_toml
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.sources import items_from_images
from sdxl_lora_trainer.trainer.kohya_config.export_folder import ExportError, export_kohya_run, launch_script
from sdxl_lora_trainer.trainer.kohya_config.run import KohyaRun
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig

RUN = KohyaRun(NetworkConfig(network_dim=8, network_alpha=4.0), TrainConfig(max_train_steps=40), output_name="mine")


def _toml_dataset(root):
    for name, n in (("train", 3), ("reg", 5)):
        for i in range(n):
            draw_image(root / name / f"img{i}.png", (96, 64), seed=i + (10 if name == "reg" else 0))
            (root / name / f"img{i}.txt").write_text(f"{name} photo {i}, red")
    (root / "cfg.toml").write_text(
        "[general]\nresolution = 64\nenable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n"
        'bucket_reso_steps = 32\ncaption_extension = ".txt"\n'
        "[[datasets]]\nbatch_size = 2\n"
        '  [[datasets.subsets]]\n  image_dir = "train"\n  num_repeats = 2\n'
        "  shuffle_caption = true\n  keep_tokens = 1\n"
        '  [[datasets.subsets]]\n  image_dir = "reg"\n  is_reg = true\n'
    )
    dataset, _ = dataset_from_toml(str(root / "cfg.toml"))
    return dataset


def _registered(dataset):
    """What the trainer registers: per image (caption, repeats, reg, bucket, caption options, flip), in order."""
    return [
        (
            img.item.caption,
            img.item.num_repeats,
            img.item.is_reg,
            img.selection.bucket,
            img.caption_options,
            img.flip_aug,
        )
        for img in dataset.images
    ]


def test_the_exported_dataset_is_the_same_dataset(tmp_path):
    dataset = _toml_dataset(tmp_path / "data")
    export = export_kohya_run(RUN, dataset, tmp_path / "out", "run", num_processes=2)
    back, _ = dataset_from_toml(str(export.folder / "dataset.toml"))
    assert not back.warnings and not back.skipped
    assert _registered(back) == _registered(dataset)
    assert [img.item.image_size for img in back.images] == [img.item.image_size for img in dataset.images]
    # reg balancing is redone from the repeats the user gave: 6 train samples, 5 reg images -> the first reg twice
    assert [img.item.num_repeats for img in back.images if img.item.is_reg] == [2, 1, 1, 1, 1]
    files = sorted(p.relative_to(export.folder).as_posix() for p in export.folder.rglob("*") if p.is_file())
    assert {"config.toml", "dataset.toml", "launch.sh", "README.txt"} <= set(files)
    assert os.access(export.folder / "launch.sh", os.X_OK)
    assert (
        os.stat(export.folder / "images/01_01/00000_img0.png").st_ino
        == os.stat(tmp_path / "data/train/img0.png").st_ino
    )


def test_graph_images_are_written_out_as_pngs_with_captions(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([pixels, np.full((64, 64), 128, np.uint8)]), "RGBA")
    scan = items_from_images([Image.fromarray(pixels), rgba], ["a red cube", "a (blue:1.2) ball"])
    settings = BucketSettings((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    dataset = dataset_from_scan(scan, settings, 1, CaptionOptions(caption_prefix="sks, "), flip_aug=True)
    export = export_kohya_run(RUN, dataset, tmp_path, "graph")
    back, _ = dataset_from_toml(str(export.folder / "dataset.toml"))
    assert _registered(back) == _registered(dataset)
    for original, copy in zip(dataset.images, back.images, strict=True):
        assert np.array_equal(np.asarray(original.item.load_rgb()), np.asarray(copy.item.load_rgb()))


def test_exif_rotated_photos_are_written_as_the_pack_sees_them(tmp_path):
    photo = tmp_path / "data" / "1_cat" / "photo.jpg"
    photo.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(photo, exif=exif)
    photo.with_suffix(".txt").write_text("a cat")
    from sdxl_lora_trainer.trainer.data.sources import scan_folder

    scan = scan_folder(tmp_path / "data")
    settings = BucketSettings((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    dataset = dataset_from_scan(scan, settings, 1, CaptionOptions())
    export = export_kohya_run(RUN, dataset, tmp_path / "out", "exif")
    written = export.folder / "images/01_01/00000_photo.png"
    assert Image.open(written).size == (64, 96) == dataset.images[0].item.image_size


def test_an_animated_gif_is_exported_as_the_first_frame_kohya_can_read(tmp_path):
    """kohya does not read .gif: the export writes the first frame the pack trained on as a PNG."""
    from sdxl_lora_trainer.trainer.data.sources import scan_folder

    frames = [Image.fromarray(np.full((64, 96, 3), c, np.uint8)) for c in ((240, 10, 10), (10, 240, 10))]
    gif = tmp_path / "data" / "1_cat" / "anim.gif"
    gif.parent.mkdir(parents=True)
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    gif.with_suffix(".txt").write_text("a cat")
    settings = BucketSettings((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    dataset = dataset_from_scan(scan_folder(tmp_path / "data"), settings, 1, CaptionOptions())
    export = export_kohya_run(RUN, dataset, tmp_path / "out", "gif")
    written = export.folder / "images/01_01/00000_anim.png"
    assert np.array_equal(np.asarray(Image.open(written).convert("RGB")), np.asarray(dataset.images[0].item.load_rgb()))
    back, _ = dataset_from_toml(str(export.folder / "dataset.toml"))
    assert _registered(back) == _registered(dataset) and not back.warnings


def test_an_existing_folder_is_never_replaced(tmp_path):
    dataset = _toml_dataset(tmp_path / "data")
    first = export_kohya_run(RUN, dataset, tmp_path / "out", "run")
    (first.folder / "mine.txt").write_text("keep me")
    second = export_kohya_run(RUN, dataset, tmp_path / "out", "run")
    assert second.folder.name == "run_2" and (first.folder / "mine.txt").read_text() == "keep me"


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    dataset = _toml_dataset(tmp_path / "data")

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_folder, "_write_text", full_disk)
    with pytest.raises(ExportError, match="could not write the kohya run folder .*run.*No space left on device"):
        export_kohya_run(RUN, dataset, tmp_path / "out", "run")
    assert list((tmp_path / "out" / "kohya_runs").iterdir()) == []


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b"])
def test_names_never_escape_the_output_folder(tmp_path, name):
    with pytest.raises(ValueError):
        export_kohya_run(RUN, _toml_dataset(tmp_path / "data"), tmp_path / "out", name)


def test_launch_script_uses_multi_gpu_only_for_several_processes():
    assert "--num_processes 1 " in launch_script(1) and "--multi_gpu" not in launch_script(1)
    assert "--num_processes 8 --multi_gpu" in launch_script(8)


def test_report_states_the_multi_gpu_schedule(tmp_path):
    dataset = _toml_dataset(tmp_path / "data")  # 6 train + 6 reg samples, batch 2 -> 6 batches
    export = export_kohya_run(RUN, dataset, tmp_path / "out", "run", num_processes=4)
    report = export.report()
    assert "= 8 images" in report and "ceil(6 batches / 4 / 1) = 2" in report
    readme = (export.folder / "README.txt").read_text()
    assert "accelerate launch --num_processes N" in readme and "max_train_steps 40 is kept" in readme


def test_masks_are_exported_as_kohya_alpha_masks_and_read_back_the_same(tmp_path):
    """Graph MASKs and mask-folder masks become RGBA PNGs in an alpha_mask subset; the TOML reader (kohya's
    alpha_mask) gets the same colour and the same 8-bit mask back."""
    from sdxl_lora_trainer.trainer.data.assemble import with_reg_images
    from sdxl_lora_trainer.trainer.data.sources import ScanOptions, scan_folder

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    mask = np.zeros((1, 64, 96), np.float32)
    mask[0, :, :40] = 1.0  # LoadImage convention: 1 = transparent, so the right part trains
    graph = items_from_images([Image.fromarray(pixels)], ["a cat"], masks=mask)
    (tmp_path / "reg" / "1_cat").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    draw_image(tmp_path / "reg" / "1_cat" / "r.png", (96, 64), seed=5)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "masks" / "r.png")
    reg = scan_folder(tmp_path / "reg", options=ScanOptions(mask_dir=str(tmp_path / "masks")))
    settings = BucketSettings((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    dataset = dataset_from_scan(with_reg_images(graph, reg), settings, 1, CaptionOptions())
    export = export_kohya_run(RUN, dataset, tmp_path / "out", "masked")
    text = (export.folder / "dataset.toml").read_text()
    assert text.count("alpha_mask = true") == 2 and "conditioning_data_dir" not in text
    assert "masked_loss" not in (export.folder / "config.toml").read_text()  # alpha masks need no --masked_loss
    back, _ = dataset_from_toml(str(export.folder / "dataset.toml"))
    assert _registered(back) == _registered(dataset)
    for original, copy in zip(dataset.images, back.images, strict=True):
        assert copy.item.mask is not None and copy.item.mask.kind == "alpha"
        assert np.array_equal(np.asarray(original.item.load_rgb()), np.asarray(copy.item.load_rgb()))
        assert np.array_equal(np.asarray(original.item.load_mask()), np.asarray(copy.item.load_mask()))
    assert any("alpha channel of RGBA PNGs" in line for line in export.lines)
