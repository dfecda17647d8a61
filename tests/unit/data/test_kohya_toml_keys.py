"""No silent keys: every key kohya's dataset config reader accepts is either implemented or refused with a message
naming the key and what to do instead.

KOHYA_ACCEPTED is kohya's list, copied as data from library/config_util.py (ConfigSanitizer at sd-scripts 48d368f:
SUBSET_ASCENDABLE_SCHEMA, DO_SUBSET_ASCENDABLE_SCHEMA, DB_SUBSET_ASCENDABLE_SCHEMA, DB/FT/CN_SUBSET_DISTINCT_SCHEMA,
CN_SUBSET_ASCENDABLE_SCHEMA, DATASET_ASCENDABLE_SCHEMA), each with a value that is NOT kohya's default, so a key that
was accepted and ignored would show here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_lora_trainer.trainer.data import kohya_toml
from sdxl_lora_trainer.trainer.data.assemble import dataset_from_toml
from sdxl_lora_trainer.trainer.data.images import DatasetError

pytestmark = pytest.mark.unit

# key: (where kohya accepts it, a non-default TOML value)
KOHYA_ACCEPTED: dict[str, tuple[str, str]] = {
    # SUBSET_ASCENDABLE_SCHEMA
    "color_aug": ("subset", "true"),
    "face_crop_aug_range": ("subset", "[2.0, 4.0]"),
    "flip_aug": ("subset", "true"),
    "num_repeats": ("subset", "3"),
    "random_crop": ("subset", "true"),
    "shuffle_caption": ("subset", "true"),
    "keep_tokens": ("subset", "2"),
    "keep_tokens_separator": ("subset", '"|||"'),
    "secondary_separator": ("subset", '";;;"'),
    "caption_separator": ("subset", '";"'),
    "enable_wildcard": ("subset", "true"),
    "token_warmup_min": ("subset", "2"),
    "token_warmup_step": ("subset", "5"),
    "caption_prefix": ("subset", '"pre"'),
    "caption_suffix": ("subset", '"suf"'),
    "custom_attributes": ("subset", "{ diff_output_preservation = true }"),
    "resize_interpolation": ("subset", '"lanczos"'),
    # DO_SUBSET_ASCENDABLE_SCHEMA
    "caption_dropout_every_n_epochs": ("subset", "2"),
    "caption_dropout_rate": ("subset", "0.1"),
    "caption_tag_dropout_rate": ("subset", "0.1"),
    # DB_SUBSET_ASCENDABLE_SCHEMA (CN_SUBSET_ASCENDABLE_SCHEMA: caption_extension, cache_info)
    "caption_extension": ("subset", '".txt"'),
    "class_tokens": ("subset", '"sks dog"'),
    "cache_info": ("subset", "true"),
    # DB_SUBSET_DISTINCT_SCHEMA / FT_SUBSET_DISTINCT_SCHEMA / CN_SUBSET_DISTINCT_SCHEMA
    "image_dir": ("subset", '"imgs"'),
    "is_reg": ("subset", "true"),
    "alpha_mask": ("subset", "true"),
    "metadata_file": ("subset", '"meta.json"'),
    "conditioning_data_dir": ("subset", '"masks"'),
    # DATASET_ASCENDABLE_SCHEMA
    "batch_size": ("dataset", "2"),
    "bucket_no_upscale": ("dataset", "true"),
    "bucket_reso_steps": ("dataset", "32"),
    "enable_bucket": ("dataset", "true"),
    "max_bucket_reso": ("dataset", "512"),
    "min_bucket_reso": ("dataset", "128"),
    "validation_seed": ("dataset", "7"),
    "validation_split": ("dataset", "0.1"),
    "resolution": ("dataset", "[128, 96]"),
    "network_multiplier": ("dataset", "0.5"),
}
# ARGPARSE_SPECIFIC_SCHEMA and the argparse-only dataset options: kohya takes them from the command line only
KOHYA_COMMAND_LINE_ONLY = ["prior_loss_weight", "max_token_length", "debug_dataset", "masked_loss", "reg_data_dir"]

# refused at dataset time (pixel augmentation with cached latents, kohya refuses it too)
REFUSED_WHEN_BUILT = {"color_aug", "random_crop"}


def _png(path: Path, alpha: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(1, 256, (96, 128, 4 if alpha else 3), dtype=np.uint8)
    Image.fromarray(arr, "RGBA" if alpha else "RGB").save(path)


@pytest.fixture
def root(tmp_path) -> Path:
    for name in ("a", "b"):
        _png(tmp_path / "imgs" / f"{name}.png", alpha=True)
        (tmp_path / "imgs" / f"{name}.txt").write_text(f"{name}, tag one, tag two")
        _png(tmp_path / "masks" / f"{name}.png")
        _png(tmp_path / "reg" / f"r{name}.png")
    (tmp_path / "meta.json").write_text(json.dumps({"a.png": {"caption": "a"}, "b.png": {"caption": "b"}}))
    return tmp_path


def _toml(key: str, value: str) -> str:
    where, _ = KOHYA_ACCEPTED.get(key, ("subset", ""))
    dataset_lines = ["resolution = 128", "enable_bucket = true", "min_bucket_reso = 64", "max_bucket_reso = 256"]
    subset = ['image_dir = "imgs"']
    if key == "metadata_file":
        subset = [f"metadata_file = {value}", 'image_dir = "imgs"']
    elif where == "dataset":
        dataset_lines = [line for line in dataset_lines if not line.startswith(key + " ")] + [f"{key} = {value}"]
    elif key not in ("image_dir",):
        subset = [line for line in subset if not line.startswith(key + " ")] + [f"{key} = {value}"]
    text = "[[datasets]]\n" + "\n".join(dataset_lines) + "\n[[datasets.subsets]]\n" + "\n".join(subset) + "\n"
    if key == "is_reg":  # reg images need training images beside them
        text = text.replace('image_dir = "imgs"', 'image_dir = "reg"', 1)
        text += '[[datasets.subsets]]\nimage_dir = "imgs"\n'
    return text


def _load(root: Path, key: str, value: str):
    (root / "ds.toml").write_text(_toml(key, value))
    return dataset_from_toml(str(root / "ds.toml"))


def test_the_reader_knows_exactly_kohyas_keys():
    accepted_here = kohya_toml._SUBSET_KEYS | kohya_toml._DATASET_KEYS - {"subsets"}
    assert accepted_here == set(KOHYA_ACCEPTED)
    assert set(kohya_toml.NOT_OFFERED) | set(kohya_toml.NO_EFFECT) <= set(KOHYA_ACCEPTED)


@pytest.mark.parametrize("key", sorted(KOHYA_ACCEPTED))
def test_every_kohya_key_is_implemented_or_refused_by_name(root, key):
    value = KOHYA_ACCEPTED[key][1]
    refused = key in kohya_toml.NOT_OFFERED or key in REFUSED_WHEN_BUILT or key == "custom_attributes"
    if refused:
        with pytest.raises((DatasetError, ValueError)) as err:
            _load(root, key, value)
        message = str(err.value)
        assert key in message, message
        assert "remove" in message or "set " in message, message  # says what to do instead
        return
    ds, cfg = _load(root, key, value)
    assert not any(f"'{key}'" in w for w in cfg.warnings), cfg.warnings
    sub = cfg.datasets[0].subsets[0]
    items = [img.item for img in ds.images]
    if key in kohya_toml.NO_EFFECT:
        assert kohya_toml.NO_EFFECT[key]  # the reason it is exact to accept it
        return
    if key == "alpha_mask":
        assert all(it.mask is not None and it.mask.kind == "alpha" for it in items)
    elif key == "conditioning_data_dir":
        assert all(it.mask is not None and it.mask.path.startswith(str(root / "masks")) for it in items)
    elif key == "is_reg":
        assert {it.is_reg for it in items} == {True, False}
    elif key == "metadata_file":
        assert not cfg.datasets[0].is_dreambooth and len(items) == 2
    elif key == "image_dir":
        assert sub.resolved_image_dir == str(root / "imgs") and len(items) == 2
    elif KOHYA_ACCEPTED[key][0] == "dataset":
        ds_cfg = cfg.datasets[0]
        expected = {"resolution": (128, 96), "batch_size": 2, "bucket_reso_steps": 32, "max_bucket_reso": 512}
        got = ds_cfg.bucket.get(key, ds_cfg.params.get(key))
        assert got == expected.get(key, got) and got != kohya_toml.DATASET_DEFAULTS[key]
        part = ds.parts[0]
        if key in ("bucket_no_upscale", "bucket_reso_steps", "max_bucket_reso", "min_bucket_reso", "enable_bucket"):
            assert getattr(part.settings, key) == got
        if key == "batch_size":
            assert part.batch_size == 2
        if key == "validation_split":  # kohya's split of each subset (trainer/data/validation_split.py)
            assert part.validation_split == 0.1 and ds.validation_split == 0.1
    else:
        assert sub.params[key] != kohya_toml.SUBSET_DEFAULTS[key]
        part = ds.parts[0]
        if key == "flip_aug":
            assert all(img.flip_aug for img in ds.images)
        elif key == "num_repeats":
            assert all(it.num_repeats == 3 for it in items)
        elif key == "class_tokens":
            assert all(it.class_tokens == "sks dog" for it in items)
        elif key == "caption_extension":
            assert all(it.caption_source == "file" for it in items)
        else:  # a caption option: it reaches the images' CaptionOptions
            options = part.subset_caption_options(0)
            assert getattr(options, key) == sub.params[key], key


@pytest.mark.parametrize("key", KOHYA_COMMAND_LINE_ONLY)
def test_command_line_only_keys_name_where_to_set_them(root, key):
    text = _toml("num_repeats", "1").replace("[[datasets]]\n", f"[[datasets]]\n{key} = 1\n", 1)
    (root / "ds.toml").write_text(text)
    _, cfg = dataset_from_toml(str(root / "ds.toml"))
    warning = next(w for w in cfg.warnings if f"'{key}'" in w)
    assert "set it with" in warning, warning


def test_default_values_of_keys_not_offered_are_accepted(root):
    for key, (neutral, _) in kohya_toml.NOT_OFFERED.items():
        if neutral is None:
            continue
        ds, cfg = _load(root, key, repr(neutral))
        assert ds.images and not any(f"'{key}'" in w for w in cfg.warnings)
