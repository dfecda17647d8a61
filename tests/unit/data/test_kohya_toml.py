"""trainer/data/kohya_toml.py: kohya's general -> dataset -> subset precedence, defaults, warnings for what kohya
drops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdxl_lora_trainer.trainer.data.images import DatasetError
from sdxl_lora_trainer.trainer.data.kohya_toml import (
    BUCKET_KEYS,
    DatasetTomlConfig,
    load_dataset_toml,
    parse_dataset_config,
    scan_dataset_toml,
)
from sdxl_lora_trainer.trainer.data.sources import ScanOptions


def img(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (1, 2, 3)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


PRECEDENCE_TOML = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
enable_bucket = true
resolution = 1024
flip_aug = true

[[datasets]]
batch_size = 4
keep_tokens = 2
min_bucket_reso = 512

  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 10
  keep_tokens = 3
  caption_prefix = "pre, "

  [[datasets.subsets]]
  image_dir = "b"
  is_reg = true
  class_tokens = "dog"

[[datasets]]
resolution = [768, 512]
caption_extension = "caption"

  [[datasets.subsets]]
  image_dir = "c"
  shuffle_caption = false
"""


def test_precedence_general_dataset_subset(tmp_path):
    cfg = load_dataset_toml(write(tmp_path / "ds.toml", PRECEDENCE_TOML))
    assert cfg.warnings == []
    d0, d1 = cfg.datasets
    a, b = d0.subsets
    (c,) = d1.subsets
    # keep_tokens: subset (3) > dataset (2) > general (1)
    assert (a.params["keep_tokens"], b.params["keep_tokens"], c.params["keep_tokens"]) == (3, 2, 1)
    # shuffle_caption: general true, overridden to false only by the subset that says so
    assert (a.params["shuffle_caption"], b.params["shuffle_caption"], c.params["shuffle_caption"]) == (
        True,
        True,
        False,
    )
    # caption_extension: general ".txt", dataset 2 "caption" (kohya adds the dot)
    assert (a.caption_extension, b.caption_extension, c.caption_extension) == (".txt", ".txt", ".caption")
    assert a.num_repeats == 10 and b.num_repeats == 1 and b.is_reg and not a.is_reg
    assert b.class_tokens == "dog" and a.class_tokens is None
    assert a.params["caption_prefix"] == "pre, " and b.params["caption_prefix"] is None
    assert a.params["flip_aug"] is True and c.params["flip_aug"] is True
    # dataset-level: dataset > general > kohya default
    assert d0.bucket == {
        "resolution": (1024, 1024),
        "batch_size": 4,
        "enable_bucket": True,
        "min_bucket_reso": 512,
        "max_bucket_reso": 1024,
        "bucket_reso_steps": 64,
        "bucket_no_upscale": False,
    }
    assert (
        d1.bucket["resolution"] == (768, 512) and d1.bucket["batch_size"] == 1 and d1.bucket["min_bucket_reso"] == 256
    )
    assert set(d0.bucket) == set(BUCKET_KEYS)
    assert d0.params["network_multiplier"] == 1.0
    # relative image_dir is anchored at the TOML's folder
    assert a.resolved_image_dir == str(tmp_path / "a")


def test_kohya_defaults_when_nothing_is_set(tmp_path):
    cfg = parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "x"}]}]}, base_dir=tmp_path)
    (ds,) = cfg.datasets
    (sub,) = ds.subsets
    assert sub.caption_extension == ".caption"  # kohya's default, not ".txt"
    assert sub.num_repeats == 1 and sub.params["keep_tokens"] == 0 and sub.params["caption_separator"] == ","
    assert sub.params["caption_dropout_rate"] == 0.0 and sub.params["shuffle_caption"] is False
    assert ds.bucket["enable_bucket"] is False and ds.bucket["resolution"] is None
    assert ds.bucket["bucket_reso_steps"] == 64 and ds.bucket["max_bucket_reso"] == 1024


def test_fallbacks_sit_between_general_and_defaults(tmp_path):
    data = {"general": {"keep_tokens": 1}, "datasets": [{"subsets": [{"image_dir": "x"}]}]}
    cfg = parse_dataset_config(
        data,
        base_dir=tmp_path,
        fallbacks={"keep_tokens": 9, "enable_bucket": True, "resolution": "896,640", "caption_extension": "txt"},
    )
    (ds,) = cfg.datasets
    sub = ds.subsets[0]
    assert sub.params["keep_tokens"] == 1  # [general] beats the node's value, as it beats kohya's CLI
    assert ds.bucket["enable_bucket"] is True and ds.bucket["resolution"] == (896, 640)
    assert sub.caption_extension == ".txt"


def test_unknown_and_misplaced_keys_are_reported_by_section(tmp_path):
    toml = """
    verbose = true
    [general]
    flip_augg = true
    image_dir = "nope"
    [[datasets]]
    batchsize = 2
    prior_loss_weight = 0.5
      [[datasets.subsets]]
      image_dir = "a"
      batch_size = 8
      colour_aug = true
    """
    cfg = load_dataset_toml(write(tmp_path / "ds.toml", toml))
    text = "\n".join(cfg.warnings)
    assert "unknown top-level key 'verbose'" in text
    assert "[general]: unknown key 'flip_augg' is ignored (did you mean 'flip_aug'?)" in text
    assert "[general]: key 'image_dir' is ignored: it is not allowed in this section" in text
    assert "[[datasets]] #1: unknown key 'batchsize' is ignored (did you mean 'batch_size'?)" in text
    assert "[[datasets]] #1: key 'prior_loss_weight' is ignored: kohya only takes it from the command line" in text
    assert "[[datasets.subsets]] #1 of [[datasets]] #1: key 'batch_size' is ignored" in text
    assert "move it to [general] or [[datasets]]" in text
    assert "[[datasets.subsets]] #1 of [[datasets]] #1: unknown key 'colour_aug'" in text
    assert len(cfg.warnings) == 7
    # ignored keys have no effect
    assert cfg.datasets[0].bucket["batch_size"] == 1
    assert cfg.datasets[0].subsets[0].params["flip_aug"] is False


def test_wrong_types_are_errors_naming_key_and_section(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset_toml(
            write(tmp_path / "ds.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = "10"\n')
        )
    msg = str(e.value)
    assert "ds.toml" in msg and "[[datasets.subsets]] #1 of [[datasets]] #1" in msg
    assert "'num_repeats' must be a whole number" in msg and "num_repeats = 10" in msg
    with pytest.raises(DatasetError, match="'enable_bucket' must be true or false"):
        parse_dataset_config({"general": {"enable_bucket": "yes"}, "datasets": [{"subsets": [{"image_dir": "a"}]}]})
    with pytest.raises(DatasetError, match=r"'resolution' must be a number or \[width, height\]"):
        parse_dataset_config({"datasets": [{"resolution": [1, 2, 3], "subsets": [{"image_dir": "a"}]}]})


def test_structure_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"\[\[datasets\]\] \(double brackets\)"):
        parse_dataset_config({"datasets": {"subsets": []}})
    with pytest.raises(DatasetError, match="no image_dir"):
        parse_dataset_config({"datasets": [{"subsets": [{"num_repeats": 2}]}]})
    with pytest.raises(DatasetError, match="no \\[\\[datasets\\]\\] defined"):
        parse_dataset_config({"general": {}})
    with pytest.raises(DatasetError, match="mixes subsets with metadata_file"):
        parse_dataset_config({"datasets": [{"subsets": [{"image_dir": "a"}, {"metadata_file": "m.json"}]}]})
    bad = write(tmp_path / "bad.toml", "[general]\nresolution = \n")
    with pytest.raises(DatasetError) as e:
        load_dataset_toml(bad)
    assert "bad.toml" in str(e.value) and "not valid TOML" in str(e.value)


def test_missing_toml_resolved_against_input_dir(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset_toml("cfg/missing.toml", input_dir=tmp_path)
    assert str(tmp_path / "cfg" / "missing.toml") in str(e.value)
    assert "resolved against ComfyUI's input directory" in str(e.value)


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ("[general]\ncaption_extension = '.txt' # caf\u00e9\n".encode("latin-1"), ":2: is not valid UTF-8 (byte 0xe9"),
        ("[general]\n".encode("utf-16"), "is saved as UTF-16"),
    ],
)
def test_a_toml_that_is_not_utf8_names_the_file_line_and_fix(tmp_path, raw, fragment):
    path = tmp_path / "config.toml"
    path.write_bytes(raw)
    with pytest.raises(DatasetError) as e:
        load_dataset_toml(str(path))
    assert str(path) in str(e.value) and fragment in str(e.value) and "re-save it with encoding UTF-8" in str(e.value)


# --------------------------------------------------------------------------------------------- scanning


def test_scan_items_carry_config(tmp_path):
    img(tmp_path / "a" / "1.png", (32, 16))
    write(tmp_path / "a" / "1.txt", "a one")
    img(tmp_path / "b" / "2.png")
    img(tmp_path / "c" / "3.png")
    write(tmp_path / "c" / "3.caption", "c three")
    write(
        tmp_path / "input" / "ds.toml",
        PRECEDENCE_TOML.replace('"a"', '"../a"').replace('"b"', '"../b"').replace('"c"', '"../c"'),
    )
    cfg, r = scan_dataset_toml("ds.toml", input_dir=tmp_path / "input")
    assert isinstance(cfg, DatasetTomlConfig)
    assert [Path(i.image_path).name for i in r.items] == ["1.png", "2.png", "3.png"]
    one, two, three = r.items
    assert (one.caption, one.num_repeats, one.is_reg, one.dataset_index, one.subset_index) == ("a one", 10, False, 0, 0)
    assert (two.caption, two.caption_source, two.is_reg, two.dataset_index, two.subset_index) == (
        "dog",
        "class_tokens",
        True,
        0,
        1,
    )
    assert (three.caption, three.dataset_index, three.subset_index) == ("c three", 1, 0)
    assert one.image_size == (32, 16)


def test_duplicate_image_dir_is_dropped_with_warning(tmp_path):
    img(tmp_path / "imgs" / "x.png")
    toml = """
    [[datasets]]
      [[datasets.subsets]]
      image_dir = "imgs"
      num_repeats = 3
      [[datasets.subsets]]
      image_dir = "imgs"
      num_repeats = 7
      is_reg = true
    """
    cfg, r = scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert len(r.items) == 1 and r.items[0].num_repeats == 3 and not r.items[0].is_reg
    warn = [w for w in r.warnings if "same image_dir" in w]
    assert len(warn) == 1
    assert "[[datasets.subsets]] #2 of [[datasets]] #1" in warn[0] and "'imgs'" in warn[0] and "silently" in warn[0]
    assert cfg.datasets[0].subsets[1].dropped is not None and cfg.datasets[0].subsets[0].dropped is None


def test_same_image_dir_in_different_datasets_is_kept(tmp_path):
    img(tmp_path / "imgs" / "x.png")
    toml = (
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n'
    )
    _, r = scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert [i.dataset_index for i in r.items] == [0, 1]
    assert not any("same image_dir" in w for w in r.warnings)


def test_same_folder_written_differently_is_kept_but_reported(tmp_path):
    img(tmp_path / "imgs" / "x.png")
    toml = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n[[datasets.subsets]]\nimage_dir = "./imgs"\n'
    _, r = scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert len(r.items) == 2
    assert any("same folder" in w and "trained in both" in w for w in r.warnings)


def test_num_repeats_below_one_is_dropped_with_warning(tmp_path):
    img(tmp_path / "a" / "x.png")
    img(tmp_path / "b" / "y.png")
    toml = (
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 0\n[[datasets.subsets]]\nimage_dir = "b"\n'
    )
    cfg, r = scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert [Path(i.image_path).name for i in r.items] == ["y.png"]
    assert any("num_repeats = 0 is less than 1" in w and "#1" in w for w in r.warnings)
    assert cfg.datasets[0].subsets[0].dropped


def test_no_usable_subset_error_gives_each_subsets_reason(tmp_path):
    """The only subset has num_repeats 0: the error says so (and how to fix it), not just 'no usable images'."""
    img(tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "zero.png").write_bytes(b"")
    toml = (
        '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 0\n[[datasets.subsets]]\nimage_dir = "b"\n'
    )
    with pytest.raises(DatasetError) as e:
        scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    message = str(e.value)
    assert "no usable images in any subset" in message
    assert "[[datasets.subsets]] #1 of [[datasets]] #1 (a): num_repeats = 0 is less than 1" in message
    assert "set it to 1 or more" in message
    assert "(b): no usable images" in message and message.count(str(tmp_path / "b" / "zero.png")) == 1
    only_repeats = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nnum_repeats = 0\n'
    with pytest.raises(DatasetError) as e:
        scan_dataset_toml(write(tmp_path / "ds.toml", only_repeats))
    assert "num_repeats = 0 is less than 1" in str(e.value) and "Check each image_dir" not in str(e.value)


def test_missing_image_dir_folder_is_an_error(tmp_path):
    toml = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "nowhere"\n'
    with pytest.raises(DatasetError) as e:
        scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert str(tmp_path / "nowhere") in str(e.value) and "does not exist" in str(e.value)


def test_subset_dirs_are_not_recursive_by_default(tmp_path):
    img(tmp_path / "a" / "x.png")
    img(tmp_path / "a" / "nested" / "y.png")
    path = write(tmp_path / "ds.toml", '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n')
    assert len(scan_dataset_toml(path)[1].items) == 1
    assert len(scan_dataset_toml(path, options=ScanOptions(recursive=True))[1].items) == 2


def test_fine_tuning_metadata_subset(tmp_path):
    img(tmp_path / "imgs" / "long_name.png")
    img(tmp_path / "imgs" / "s.jpg")
    meta = {
        "s": {"caption": "short", "tags": "tag1, tag2"},  # key without extension, as kohya's tools write
        "long_name.png": {"caption": "long"},
    }
    write(tmp_path / "meta.json", json.dumps(meta))
    toml = '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "meta.json"\nimage_dir = "imgs"\nnum_repeats = 2\n'
    cfg, r = scan_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert cfg.datasets[0].is_dreambooth is False
    assert [i.key for i in r.items] == ["long_name.png", "s"]  # kohya: longest key first
    assert [i.caption for i in r.items] == ["long", "short,tag1, tag2"]
    assert r.items[1].image_path == str(tmp_path / "imgs" / "s.jpg")
    assert all(i.num_repeats == 2 and i.caption_source == "metadata" for i in r.items)


def test_fine_tuning_subset_skips_a_bad_image_or_raises_with_strict_images(tmp_path):
    img(tmp_path / "imgs" / "good.png")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    write(tmp_path / "meta.json", json.dumps({"good.png": {"caption": "x"}, "empty.png": {"caption": "y"}}))
    path = write(
        tmp_path / "ds.toml", '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "meta.json"\nimage_dir = "imgs"\n'
    )
    _, r = scan_dataset_toml(path)
    assert [i.key for i in r.items] == ["good.png"]
    ((skipped_path, reason),) = r.skipped
    assert skipped_path == str(tmp_path / "imgs" / "empty.png")
    assert "0 bytes" in reason and reason.endswith("(listed in meta.json as 'empty.png')")
    with pytest.raises(DatasetError, match="0 bytes"):
        scan_dataset_toml(path, options=ScanOptions(strict_images=True))


def test_max_token_length_in_a_dataset_toml_points_to_cache_text(tmp_path):
    """kohya's dataset config rejects max_token_length (a training argument); the warning says where it goes."""
    toml = '[general]\nmax_token_length = 225\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "a"\n'
    cfg = load_dataset_toml(write(tmp_path / "ds.toml", toml))
    assert any("'max_token_length' is ignored" in w and "'Cache Text'" in w for w in cfg.warnings), cfg.warnings
