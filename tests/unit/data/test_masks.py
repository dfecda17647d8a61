"""Loss-mask sources: alpha channels (kohya alpha_mask), mask folders (kohya's mask images) and graph MASKs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdxl_lora_trainer.trainer.data.images import DatasetError
from sdxl_lora_trainer.trainer.data.masks import mask_pixels_from_weights
from sdxl_lora_trainer.trainer.data.sources import ScanOptions, items_from_images, scan_folder, scan_metadata_jsonl

pytestmark = pytest.mark.unit


def _rgba(path, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    Image.fromarray(arr, "RGBA").save(path)
    return arr


def _rgb(path, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_alpha_mask_uses_the_alpha_and_keeps_the_stored_colour(tmp_path):
    arr = _rgba(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat")
    item = scan_folder(tmp_path, options=ScanOptions(alpha_mask=True)).items[0]
    assert item.mask is not None and item.mask.kind == "alpha"
    # kohya: convert("RGBA")[:, :, :3], not composited on white
    assert np.array_equal(np.asarray(item.load_rgb()), arr[:, :, :3])
    assert np.array_equal(np.asarray(item.load_mask()), arr[:, :, 3])
    # without alpha_mask the pack composites on white (a documented difference) and has no mask
    plain = scan_folder(tmp_path).items[0]
    assert plain.mask is None and plain.load_mask() is None
    assert not np.array_equal(np.asarray(plain.load_rgb()), arr[:, :, :3])


def test_alpha_mask_on_an_image_without_alpha_trains_it_whole_and_says_so(tmp_path):
    _rgb(tmp_path / "opaque.png")
    scan = scan_folder(tmp_path, options=ScanOptions(alpha_mask=True))
    assert np.asarray(scan.items[0].load_mask()).min() == 255  # kohya: a mask of ones
    assert any("no alpha channel" in w and "opaque.png" in w for w in scan.warnings)


def test_mask_folder_pairs_masks_by_stem_and_mirrors_kohya_subfolders(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "5_cat").mkdir(parents=True)
    (masks / "5_cat").mkdir(parents=True)
    _rgb(data / "5_cat" / "one.jpg")
    _rgb(data / "5_cat" / "two.png", seed=1)
    m1 = _rgb(masks / "5_cat" / "one.png", seed=2)  # a mask may have another extension than its image
    _rgb(masks / "two.webp", seed=3)  # or sit directly in the mask folder
    scan = scan_folder(data, options=ScanOptions(mask_dir=str(masks)))
    by_name = {it.image_path.rsplit("/", 1)[1]: it for it in scan.items}
    assert by_name["one.jpg"].mask.kind == "mask_image"
    assert by_name["one.jpg"].mask.path == str(masks / "5_cat" / "one.png")
    assert by_name["two.png"].mask.path == str(masks / "two.webp")
    assert np.array_equal(np.asarray(by_name["one.jpg"].load_mask()), m1[:, :, 0])  # the red channel
    assert by_name["one.jpg"].mask.weights == "red"


def test_mask_folder_relative_to_the_input_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "m").mkdir()
    _rgb(tmp_path / "data" / "x.png")
    _rgb(tmp_path / "m" / "x.png")
    scan = scan_folder("data", tmp_path, ScanOptions(mask_dir="m"))
    assert scan.items[0].mask.path == str(tmp_path / "m" / "x.png")


def test_an_image_without_its_mask_is_refused_by_name(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "masks").mkdir()
    _rgb(tmp_path / "data" / "has.png")
    _rgb(tmp_path / "data" / "lacks.png")
    _rgb(tmp_path / "masks" / "has.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no mask.*lacks\.png"):
        scan_folder(tmp_path / "data", options=ScanOptions(mask_dir=str(tmp_path / "masks")))


def test_a_mask_of_another_size_is_refused_naming_the_image(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "masks").mkdir()
    _rgb(tmp_path / "data" / "pic.png", size=(48, 32))
    _rgb(tmp_path / "masks" / "pic.png", size=(32, 48))
    with pytest.raises(DatasetError, match=r"pic\.png: its mask .* is 32x48 but the image is 48x32"):
        scan_folder(tmp_path / "data", options=ScanOptions(mask_dir=str(tmp_path / "masks")))


def test_a_missing_mask_folder_and_two_mask_sources_are_refused(tmp_path):
    _rgb(tmp_path / "pic.png")
    with pytest.raises(DatasetError, match="mask folder .* does not exist"):
        scan_folder(tmp_path, options=ScanOptions(mask_dir=str(tmp_path / "nope")))
    with pytest.raises(DatasetError, match="alpha_mask and a mask folder"):
        ScanOptions(alpha_mask=True, mask_dir=str(tmp_path))


def test_metadata_jsonl_images_get_masks_too(tmp_path):
    _rgb(tmp_path / "p.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "p.png", "text": "a p"}\n')
    (tmp_path / "masks").mkdir()
    _rgb(tmp_path / "masks" / "p.png")
    scan = scan_metadata_jsonl(tmp_path, options=ScanOptions(mask_dir=str(tmp_path / "masks")))
    assert scan.items[0].mask.kind == "mask_image"


# --- graph MASKs --------------------------------------------------------------------------------------------


def _image(h=32, w=48, seed=0):
    return np.random.default_rng(seed).random((1, h, w, 3)).astype(np.float32)


def test_load_image_masks_give_kohyas_alpha_weights_back():
    """LoadImage's MASK is 1 - alpha/255; the default meaning inverts it to alpha exactly (8 bits)."""
    alpha = np.arange(48 * 32, dtype=np.int64).reshape(32, 48) % 256
    load_image_mask = (1.0 - (alpha.astype(np.float32) / 255.0))[None]
    scan = items_from_images(_image(), "a", masks=load_image_mask)
    assert np.array_equal(np.asarray(scan.items[0].load_mask()), alpha.astype(np.uint8))
    as_is = items_from_images(_image(), "a", masks=load_image_mask, invert_masks=False)
    assert np.array_equal(np.asarray(as_is.items[0].load_mask()), 255 - alpha.astype(np.uint8))


def test_graph_masks_are_batch_aligned_and_checked():
    images = [_image(seed=0), _image(seed=1)]
    masks = np.zeros((2, 32, 48), dtype=np.float32)
    masks[1, :, :10] = 1.0
    scan = items_from_images(images, "a", masks=[masks])
    assert [it.mask.kind for it in scan.items] == ["pixels", "pixels"]
    assert np.asarray(scan.items[0].load_mask()).min() == 255
    assert np.asarray(scan.items[1].load_mask())[:, :10].max() == 0
    with pytest.raises(DatasetError, match=r"2 image\(s\) but 1 mask"):
        items_from_images(images, "a", masks=masks[:1])
    with pytest.raises(DatasetError, match=r"image 1: its mask is 64x64 but the image is 48x32"):
        items_from_images(images, "a", masks=[masks[:1], np.zeros((1, 64, 64), np.float32)])
    with pytest.raises(DatasetError, match=r"image 0: its mask gives every pixel weight 0"):
        items_from_images(images[:1], "a", masks=np.ones((1, 32, 48), np.float32))


def test_mask_pixels_round_half_up():
    px = mask_pixels_from_weights(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]]), invert=False)
    assert np.asarray(px).tolist() == [[0, 128, 255, 255, 0]]


def test_a_transparent_colour_counts_as_alpha(tmp_path):
    """An RGB PNG with a tRNS colour has transparency: kohya's convert('RGBA') makes that colour's alpha 0."""
    arr = np.zeros((32, 48, 3), dtype=np.uint8)
    arr[:, 24:] = 255
    Image.fromarray(arr).save(tmp_path / "trns.png", transparency=(0, 0, 0))
    scan = scan_folder(tmp_path, options=ScanOptions(alpha_mask=True))
    assert not any("no alpha channel" in w for w in scan.warnings)
    alpha = np.asarray(scan.items[0].load_mask())
    assert alpha[:, :24].max() == 0 and alpha[:, 24:].min() == 255
