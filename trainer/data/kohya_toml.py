"""Read a kohya sd-scripts dataset config (TOML, or JSON like kohya) with kohya's precedence.

kohya resolves every subset parameter by searching, in order, the subset table, its
``[[datasets]]`` table, ``[general]``, the command-line arguments, then the parameter class default;
the first value that is set wins. Dataset parameters (bucketing, batch size, resolution) search the
dataset table, ``[general]``, the command line, then the default. ``fallbacks`` plays the role of
the command line here (the node's own widgets).

Where kohya is silent or harsh we report instead:
- unknown keys and keys in the wrong section (kohya's schema rejects them and stops) are warnings
  naming the key and the section, and the key is ignored;
- a second subset with the same ``image_dir`` in one dataset is dropped (as kohya does) with a
  warning (kohya only logs it); so is a subset with ``num_repeats`` < 1;
- wrong value types are errors naming the key, the section and an example of the right form.

Relative ``image_dir``/``metadata_file`` paths are taken against the TOML file's own folder (kohya
uses the process's working directory, which in ComfyUI is arbitrary). Default caption extension is
kohya's ``.caption`` unless ``fallbacks`` or the TOML says otherwise.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import tomllib

from .images import ACCEPTED_EXTENSIONS, DatasetError
from .sources import (
    MissingMask,
    ScanOptions,
    ScanResult,
    attach_mask,
    normalize_caption_extension,
    resolve_dataset_path,
    scan_image_dir,
    skip_line,
)
from .text_files import read_utf8

__all__ = [
    "BUCKET_KEYS",
    "DATASET_DEFAULTS",
    "SUBSET_DEFAULTS",
    "DatasetConfig",
    "DatasetTomlConfig",
    "KOHYA_SUBSET_SCAN",
    "SubsetConfig",
    "load_dataset_toml",
    "parse_dataset_config",
    "scan_dataset_toml",
]

PathLike = Union[str, "os.PathLike[str]"]

# ---------------------------------------------------------------------------------------------
# kohya's schema (library/config_util.py, ConfigSanitizer), by where a key may appear.

# Subset parameters that may also be written in [[datasets]] or [general] ("ascendable").
_SUBSET_ASCENDABLE = {
    "color_aug",
    "face_crop_aug_range",
    "flip_aug",
    "num_repeats",
    "random_crop",
    "shuffle_caption",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "caption_separator",
    "enable_wildcard",
    "token_warmup_min",
    "token_warmup_step",
    "caption_prefix",
    "caption_suffix",
    "custom_attributes",
    "resize_interpolation",
    # dropout options (train_network supports them)
    "caption_dropout_every_n_epochs",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    # DreamBooth-style subset options
    "caption_extension",
    "class_tokens",
    "cache_info",
}
# conditioning_data_dir: kohya's ControlNet-style subset key, which with --masked_loss makes its images loss masks
_DB_SUBSET_ONLY = {"image_dir", "is_reg", "alpha_mask", "conditioning_data_dir"}
_FT_SUBSET_ONLY = {"metadata_file", "image_dir", "alpha_mask"}
_DATASET_ASCENDABLE = {
    "batch_size",
    "bucket_no_upscale",
    "bucket_reso_steps",
    "enable_bucket",
    "max_bucket_reso",
    "min_bucket_reso",
    "validation_seed",
    "validation_split",
    "resolution",
    "network_multiplier",
    "resize_interpolation",
}
_SUBSET_KEYS = _SUBSET_ASCENDABLE | _DB_SUBSET_ONLY | _FT_SUBSET_ONLY
_DATASET_KEYS = _DATASET_ASCENDABLE | _SUBSET_ASCENDABLE | {"subsets"}
_GENERAL_KEYS = _DATASET_ASCENDABLE | _SUBSET_ASCENDABLE
_ALL_KEYS = _SUBSET_KEYS | _DATASET_KEYS | {"general", "datasets"}
# Keys kohya only takes from the command line (argparse), with what sets them here instead.
_CLI_ONLY = {
    "prior_loss_weight": "the Loss & Noise node's prior_loss_weight",
    "max_token_length": "'Cache Text' max_token_length (or the kohya training config 'Import kohya Config' reads)",
    "debug_dataset": "the Buckets report and details_json",
    "train_data_dir": "image_dir in [[datasets.subsets]], or the Images from Folder node",
    "reg_data_dir": "a [[datasets.subsets]] with is_reg = true, or the reg_folder of Images from Folder",
    "in_json": "metadata_file in [[datasets.subsets]]",
    "masked_loss": "conditioning_data_dir or alpha_mask in [[datasets.subsets]] (a subset with masks trains masked)",
}
_UNSUPPORTED: dict[str, str] = {}

#: kohya keys this reader accepts but does not offer: (the value that changes nothing, why and what to do instead).
#: Any other value is refused with that message, so a config never trains differently from kohya without a word.
NOT_OFFERED: dict[str, tuple[Any, str]] = {
    "face_crop_aug_range": (
        None,
        "random face crops change every step and cannot be combined with the cached latents this trainer always "
        "uses; remove the key and crop the images beforehand",
    ),
    "resize_interpolation": (
        None,
        "images are resized with kohya's default (area when shrinking, lanczos when enlarging); remove the key, "
        "or resize the images to their bucket size beforehand",
    ),
    "network_multiplier": (
        1.0,
        "a per-dataset LoRA multiplier while training is not offered; remove the key (or train that dataset in its "
        "own run)",
    ),
}
#: kohya keys that do not change what kohya's SDXL LoRA training computes, so accepting them is exact.
NO_EFFECT: dict[str, str] = {
    "cache_info": "kohya caches image sizes with it to scan faster; this reader reads the headers itself",
    "custom_attributes": "kohya's SDXL LoRA training reads only diff_output_preservation from it, which is refused",
}

#: kohya defaults for subset parameters (DreamBoothSubsetParams, with argparse's defaults where the
#: dataclass default is a kohya typo such as ``(",",)``).
SUBSET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1,
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "secondary_separator": None,
    "enable_wildcard": False,
    "color_aug": False,
    "flip_aug": False,
    "face_crop_aug_range": None,
    "random_crop": False,
    "caption_prefix": None,
    "caption_suffix": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "custom_attributes": None,
    "validation_seed": 0,
    "validation_split": 0.0,
    "resize_interpolation": None,
    "is_reg": False,
    "class_tokens": None,
    "caption_extension": ".caption",
    "cache_info": False,
    "alpha_mask": False,
    "conditioning_data_dir": None,
}

#: kohya defaults for dataset parameters (DreamBoothDatasetParams).
DATASET_DEFAULTS: dict[str, Any] = {
    "resolution": None,
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "network_multiplier": 1.0,
    "validation_seed": None,
    "validation_split": 0.0,
    "resize_interpolation": None,
}

#: Dataset parameters that bucketing/batching consume (kohya names), collected in DatasetConfig.bucket.
BUCKET_KEYS: tuple[str, ...] = (
    "resolution",
    "batch_size",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
)

# Only subset-only keys that must not inherit from [general]/[[datasets]] (kohya's "distinct" keys).
_NOT_INHERITED = {"image_dir", "metadata_file", "is_reg", "alpha_mask", "conditioning_data_dir"}

#: How subsets are scanned by default: kohya reads only the files directly in a subset's image_dir.
#: caption_extension and enable_wildcard always come from the subset itself.
KOHYA_SUBSET_SCAN = ScanOptions(recursive=False)


# ---------------------------------------------------------------------------------------------
# value checking


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _check_resolution(v: Any) -> tuple[int, int] | None:
    if _is_int(v):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) for x in v):
        return (int(v[0]), int(v[1]))
    return None


def _check_pair_of_floats(v: Any) -> tuple[float, float] | None:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v):
        return (float(v[0]), float(v[1]))
    return None


_Checker = Callable[[Any], tuple[bool, Any]]


def _simple(pred: Callable[[Any], bool], conv: Callable[[Any], Any] = lambda v: v) -> _Checker:
    return lambda v: (True, conv(v)) if pred(v) else (False, None)


def _special(fn: Callable[[Any], Any]) -> _Checker:
    def check(v: Any) -> tuple[bool, Any]:
        out = fn(v)
        return (out is not None, out)

    return check


_BOOL = ("true or false", "true", _simple(lambda v: isinstance(v, bool)))
_INT = ("a whole number", "10", _simple(_is_int))
_FLOAT = ("a number", "0.1", _simple(_is_number, float))
_STR = ("a quoted string", '"text"', _simple(lambda v: isinstance(v, str)))
_TYPES: dict[str, tuple[str, str, _Checker]] = {
    **dict.fromkeys(
        (
            "color_aug",
            "flip_aug",
            "random_crop",
            "shuffle_caption",
            "enable_wildcard",
            "cache_info",
            "is_reg",
            "alpha_mask",
            "bucket_no_upscale",
            "enable_bucket",
        ),
        _BOOL,
    ),
    **dict.fromkeys(
        (
            "num_repeats",
            "keep_tokens",
            "token_warmup_min",
            "caption_dropout_every_n_epochs",
            "batch_size",
            "bucket_reso_steps",
            "max_bucket_reso",
            "min_bucket_reso",
            "validation_seed",
        ),
        _INT,
    ),
    **dict.fromkeys(
        (
            "token_warmup_step",
            "caption_dropout_rate",
            "caption_tag_dropout_rate",
            "validation_split",
            "network_multiplier",
        ),
        _FLOAT,
    ),
    **dict.fromkeys(
        (
            "keep_tokens_separator",
            "secondary_separator",
            "caption_separator",
            "caption_prefix",
            "caption_suffix",
            "resize_interpolation",
            "caption_extension",
            "class_tokens",
            "image_dir",
            "metadata_file",
            "conditioning_data_dir",
        ),
        _STR,
    ),
    "custom_attributes": ("a table", '{ key = "value" }', _simple(lambda v: isinstance(v, dict))),
    "face_crop_aug_range": ("two numbers", "[2.0, 4.0]", _special(_check_pair_of_floats)),
    "resolution": ("a number or [width, height]", "1024  or  [1024, 768]", _special(_check_resolution)),
}


# ---------------------------------------------------------------------------------------------
# result types


@dataclass
class SubsetConfig:
    """One ``[[datasets.subsets]]`` entry after kohya's precedence rules were applied."""

    index: int  # position inside its dataset (0-based)
    image_dir: str | None  # as written
    resolved_image_dir: str | None  # absolute path that is scanned
    metadata_file: str | None  # kohya fine-tuning metadata (JSON / JSONL), as written
    resolved_metadata_file: str | None
    num_repeats: int
    is_reg: bool
    class_tokens: str | None
    caption_extension: str
    params: dict[str, Any]  # every kohya subset parameter (kohya names), resolved
    dropped: str | None = None  # why kohya would not use this subset (no items are produced)
    resolved_mask_dir: str | None = None  # conditioning_data_dir: the subset's mask images (masked loss)

    @property
    def name(self) -> str:
        target = self.image_dir if self.image_dir is not None else self.metadata_file
        return os.path.basename(os.path.normpath(target)) if target else f"subset{self.index}"


@dataclass
class DatasetConfig:
    """One ``[[datasets]]`` entry: its bucketing/batching settings and its subsets."""

    index: int
    bucket: dict[str, Any]  # BUCKET_KEYS -> value (kohya names; resolution is (w, h) or None)
    params: dict[str, Any]  # other dataset parameters (network_multiplier, validation_*, ...)
    subsets: list[SubsetConfig]
    is_dreambooth: bool  # False for kohya fine-tuning datasets (subsets with metadata_file)


@dataclass
class DatasetTomlConfig:
    """A whole dataset config file."""

    path: str
    datasets: list[DatasetConfig]
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# parsing


def _section_name(dataset: int | None = None, subset: int | None = None) -> str:
    if dataset is None:
        return "[general]"
    if subset is None:
        return f"[[datasets]] #{dataset + 1}"
    return f"[[datasets.subsets]] #{subset + 1} of [[datasets]] #{dataset + 1}"


def _suggest(key: str, allowed: set[str]) -> str:
    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _validate_table(
    table: dict[str, Any], allowed: set[str], section: str, source: str, warnings: list[str]
) -> dict[str, Any]:
    """Keep the keys kohya accepts in this section, type-checked; warn about the others."""
    clean: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            if key in _UNSUPPORTED:
                warnings.append(f"{source}: {section}: key '{key}' is ignored: {_UNSUPPORTED[key]}.")
            elif key in _CLI_ONLY:
                warnings.append(
                    f"{source}: {section}: key '{key}' is ignored: kohya only takes it from the command line "
                    f"(kohya rejects it here); set it with {_CLI_ONLY[key]}."
                )
            elif key in _ALL_KEYS:
                if key in (_DB_SUBSET_ONLY | _FT_SUBSET_ONLY):
                    where = "[[datasets.subsets]]"
                elif key == "subsets":
                    where = "[[datasets]] (as [[datasets.subsets]])"
                elif key in ("general", "datasets"):
                    where = "the top level of the file"
                else:
                    where = "[general] or [[datasets]]"
                warnings.append(
                    f"{source}: {section}: key '{key}' is ignored: it is not allowed in this section "
                    f"(kohya rejects the file); move it to {where}."
                )
            else:
                warnings.append(f"{source}: {section}: unknown key '{key}' is ignored{_suggest(key, allowed)}.")
            continue
        if key == "subsets":
            continue
        typename, example, check = _TYPES[key]
        ok, converted = check(value)
        if not ok:
            raise DatasetError(
                f"{source}: {section}: '{key}' must be {typename}, got {value!r}; write it like {key} = {example}."
            )
        _refuse_if_not_offered(key, converted, section, source)
        clean[key] = converted
    return clean


def _refuse_if_not_offered(key: str, value: Any, section: str, source: str) -> None:
    """A kohya key whose value would make training differ from kohya, and which the pack does not offer: stop."""
    if key in NOT_OFFERED:
        neutral, why = NOT_OFFERED[key]
        if value != neutral and not (key == "network_multiplier" and value == 1):
            raise DatasetError(f"{source}: {section}: '{key} = {value!r}' is not supported: {why}.")
    if key == "custom_attributes" and value.get("diff_output_preservation"):
        raise DatasetError(
            f"{source}: {section}: custom_attributes.diff_output_preservation (kohya's differential output "
            "preservation) is not supported: remove it from custom_attributes."
        )


def _first_set(key: str, layers: list[dict[str, Any]], default: Any) -> Any:
    """kohya's search_value: the first layer where the key is present and not None wins."""
    for layer in layers:
        value = layer.get(key)
        if value is not None:
            return value
    return default


def _normalize_fallbacks(fallbacks: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(fallbacks or {})
    res = out.get("resolution")
    if isinstance(res, str):  # kohya's command-line form "1024" or "1024,768"
        parts = [int(p) for p in res.split(",") if p.strip()]
        out["resolution"] = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts)
    elif _is_int(res):
        out["resolution"] = (res, res)
    elif isinstance(res, (list, tuple)):
        out["resolution"] = tuple(int(x) for x in res)
    if isinstance(out.get("caption_extension"), str):
        out["caption_extension"] = normalize_caption_extension(out["caption_extension"])
    return out


def _resolve_path(value: str | None, base_dir: Path) -> str | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else base_dir / p)


def parse_dataset_config(
    data: dict[str, Any],
    source: str = "<dataset config>",
    base_dir: PathLike | None = None,
    fallbacks: dict[str, Any] | None = None,
) -> DatasetTomlConfig:
    """Apply kohya's schema and precedence to an already-parsed config table.

    ``base_dir`` anchors relative ``image_dir``/``metadata_file`` (default: the working directory);
    ``fallbacks`` are command-line-level values (kohya names), consulted after ``[general]``.
    """
    warnings: list[str] = []
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cli = _normalize_fallbacks(fallbacks)

    for key in data:
        if key not in ("general", "datasets"):
            warnings.append(
                f"{source}: unknown top-level key '{key}' is ignored{_suggest(key, {'general', 'datasets'})}; "
                "a kohya dataset config has only [general] and [[datasets]]."
            )
    general_raw = data.get("general", {})
    if not isinstance(general_raw, dict):
        raise DatasetError(f"{source}: 'general' must be a table; write it as a [general] section.")
    general = _validate_table(general_raw, _GENERAL_KEYS, _section_name(), source, warnings)

    datasets_raw = data.get("datasets", [])
    if isinstance(datasets_raw, dict):
        raise DatasetError(
            f"{source}: 'datasets' is a single table; write each dataset as [[datasets]] (double brackets)."
        )
    if not isinstance(datasets_raw, list):
        raise DatasetError(f"{source}: 'datasets' must be a list of tables; write each one as [[datasets]].")
    if not datasets_raw:
        raise DatasetError(
            f"{source}: no [[datasets]] defined; add one with at least one [[datasets.subsets]] that has an image_dir."
        )

    datasets: list[DatasetConfig] = []
    for di, ds_raw in enumerate(datasets_raw):
        ds_section = _section_name(di)
        if not isinstance(ds_raw, dict):
            raise DatasetError(f"{source}: {ds_section} must be a table.")
        ds = _validate_table(ds_raw, _DATASET_KEYS, ds_section, source, warnings)
        subsets_raw = ds_raw.get("subsets", [])
        if isinstance(subsets_raw, dict):
            raise DatasetError(
                f"{source}: {ds_section}: 'subsets' is a single table; write each one as [[datasets.subsets]]."
            )
        if not isinstance(subsets_raw, list):
            raise DatasetError(
                f"{source}: {ds_section}: 'subsets' must be a list; write each one as [[datasets.subsets]]."
            )
        if not subsets_raw:
            warnings.append(f"{source}: {ds_section} has no [[datasets.subsets]], so it contributes no images.")

        has_meta = [isinstance(s, dict) and "metadata_file" in s for s in subsets_raw]
        if any(has_meta) and not all(has_meta):
            raise DatasetError(
                f"{source}: {ds_section} mixes subsets with metadata_file (fine-tuning) and without (image_dir + "
                "caption files); kohya does not allow that. Put them in separate [[datasets]]."
            )
        is_dreambooth = not any(has_meta)

        subsets: list[SubsetConfig] = []
        for si, ss_raw in enumerate(subsets_raw):
            ss_section = _section_name(di, si)
            if not isinstance(ss_raw, dict):
                raise DatasetError(f"{source}: {ss_section} must be a table.")
            allowed = (
                (_SUBSET_ASCENDABLE | _DB_SUBSET_ONLY) if is_dreambooth else (_SUBSET_ASCENDABLE | _FT_SUBSET_ONLY)
            )
            ss = _validate_table(ss_raw, allowed, ss_section, source, warnings)
            if is_dreambooth and "image_dir" not in ss:
                raise DatasetError(
                    f'{source}: {ss_section} has no image_dir; add image_dir = "path/to/images" '
                    "(or metadata_file for a fine-tuning subset)."
                )
            layers = [ss, ds, general, cli]
            params: dict[str, Any] = {}
            for key, default in SUBSET_DEFAULTS.items():
                if key in _NOT_INHERITED:
                    value = ss.get(key)
                    params[key] = default if value is None else value
                else:
                    params[key] = _first_set(key, layers, default)
            params["image_dir"] = ss.get("image_dir")
            if not is_dreambooth:
                params["metadata_file"] = ss.get("metadata_file")
                params["is_reg"] = False
            params["caption_extension"] = normalize_caption_extension(params["caption_extension"])
            subsets.append(
                SubsetConfig(
                    index=si,
                    image_dir=params["image_dir"],
                    resolved_image_dir=_resolve_path(params["image_dir"], base),
                    metadata_file=params.get("metadata_file"),
                    resolved_metadata_file=_resolve_path(params.get("metadata_file"), base),
                    num_repeats=params["num_repeats"],
                    is_reg=params["is_reg"],
                    class_tokens=params["class_tokens"],
                    caption_extension=params["caption_extension"],
                    params=params,
                    resolved_mask_dir=_resolve_path(params["conditioning_data_dir"], base),
                )
            )

        ds_layers = [ds, general, cli]
        all_params = {key: _first_set(key, ds_layers, default) for key, default in DATASET_DEFAULTS.items()}
        bucket = {key: all_params[key] for key in BUCKET_KEYS}
        rest = {key: value for key, value in all_params.items() if key not in BUCKET_KEYS}
        datasets.append(DatasetConfig(di, bucket, rest, subsets, is_dreambooth))
        _mark_dropped(datasets[-1], source, warnings)

    return DatasetTomlConfig(path=source, datasets=datasets, warnings=warnings)


def _mark_dropped(dataset: DatasetConfig, source: str, warnings: list[str]) -> None:
    """kohya's config-time drops: num_repeats < 1. Duplicate image_dirs are checked at scan time,
    because kohya only counts a subset as taken once it produced images."""
    for sub in dataset.subsets:
        if sub.num_repeats < 1:
            sub.dropped = (
                f"num_repeats = {sub.num_repeats} is less than 1 (kohya drops such subsets); set it to 1 or more"
            )
            warnings.append(
                f"{source}: {_section_name(dataset.index, sub.index)} ({sub.image_dir or sub.metadata_file}) is not "
                f"used: num_repeats = {sub.num_repeats} is less than 1 (kohya drops such subsets); set it to 1 or more."
            )


def load_dataset_toml(
    path: PathLike,
    input_dir: PathLike | None = None,
    fallbacks: dict[str, Any] | None = None,
) -> DatasetTomlConfig:
    """Load and resolve a kohya dataset config (``.toml``; ``.json`` is accepted like kohya does).

    A relative ``path`` is resolved against ComfyUI's input directory (``input_dir``); relative
    paths inside the file are resolved against the file's folder.
    """
    p, how = resolve_dataset_path(path, input_dir)
    if not p.exists():
        raise DatasetError(f"dataset config {p} does not exist ({how}); check the spelling, or give an absolute path.")
    if not p.is_file():
        raise DatasetError(f"dataset config {p} is a folder ({how}); give the .toml file itself.")
    text = read_utf8(p)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p}: not valid JSON (line {e.lineno}: {e.msg}); fix the syntax.") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{p}: the JSON must be an object with 'general' and 'datasets'.")
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise DatasetError(
                f"{p}: not valid TOML ({e}); fix the syntax (strings need quotes, Windows paths need single quotes "
                "or doubled backslashes)."
            ) from None
    return parse_dataset_config(data, source=str(p), base_dir=p.parent, fallbacks=fallbacks)


# ---------------------------------------------------------------------------------------------
# scanning


def _load_kohya_metadata(meta: Path) -> dict[str, dict[str, Any]]:
    """kohya fine-tuning metadata: JSON ``{image_key: {caption, tags, image_size}}`` or JSONL rows
    ``{"image_path", "caption", "tags", "image_size"}``."""
    text = read_utf8(meta)
    if meta.name.endswith(".jsonl"):
        out: dict[str, dict[str, Any]] = {}
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{meta}:{n}: not valid JSON ({e.msg}); fix that line.") from None
            if not isinstance(row, dict) or not isinstance(row.get("image_path"), str):
                raise DatasetError(f'{meta}:{n}: each line needs "image_path" (and usually "caption").')
            entry = {"caption": row.get("caption", "")}
            for k in ("image_size", "tags"):
                if k in row:
                    entry[k] = row[k]
            out[row["image_path"]] = entry
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{meta}: not valid JSON (line {e.lineno}: {e.msg}); fix the syntax.") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DatasetError(f'{meta}: expected an object mapping image names to {{"caption": ...}}.')
    return data


def _scan_metadata_subset(dataset: DatasetConfig, sub: SubsetConfig, options: ScanOptions) -> ScanResult:
    result = ScanResult()
    assert sub.resolved_metadata_file is not None
    meta = Path(sub.resolved_metadata_file)
    if not meta.is_file():
        raise DatasetError(
            f"metadata_file {meta} of {_section_name(dataset.index, sub.index)} does not exist; check the path "
            "(relative paths are resolved against the dataset config's folder)."
        )
    metadata = _load_kohya_metadata(meta)
    separator = sub.params.get("caption_separator") or ","
    # kohya registers the keys longest first (it matches cache files by prefix); keep its order.
    for key in sorted(metadata.keys(), key=len, reverse=True):
        entry = metadata[key]
        if os.path.isabs(key):
            path = Path(key)
        elif sub.resolved_image_dir is not None:
            path = Path(sub.resolved_image_dir) / key
        else:
            raise DatasetError(
                f"{meta}: image '{key}' is a relative path but {_section_name(dataset.index, sub.index)} has no "
                "image_dir; add image_dir (kohya requires it for relative keys)."
            )
        if not path.exists() and path.suffix.lower() not in ACCEPTED_EXTENSIONS:
            # kohya's metadata tools write keys without extension; find the image next to it.
            for ext in ACCEPTED_EXTENSIONS:
                cand = path.with_name(path.name + ext)
                if cand.is_file():
                    path = cand
                    break
        info = result.probe_image_file(path, options, listed_in=f" (listed in {meta.name} as '{key}')")
        if info is None:
            continue
        try:
            mask = attach_mask(path, info, options, Path(sub.resolved_image_dir or meta.parent))
        except MissingMask:
            raise DatasetError(
                f"{path} (listed in {meta.name} as '{key}') has no mask in {options.mask_dir}; add a mask with the "
                "image's name, or remove conditioning_data_dir."
            ) from None
        caption = entry.get("caption") or ""
        tags = entry.get("tags")
        if not isinstance(caption, str) or (tags is not None and not isinstance(tags, str)):
            raise DatasetError(f"{meta}: caption/tags of '{key}' must be strings.")
        if sub.params.get("enable_wildcard"):
            if tags:
                tags = tags.replace("\n", separator)
                caption = "\n".join(f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip())
        elif tags:
            caption = caption + separator + tags if caption else tags
        result.add_image_file(
            path,
            info,
            options,
            caption=caption,
            num_repeats=sub.num_repeats,
            subset=sub.name,
            source_dir=str(meta.parent),
            is_reg=False,
            caption_path=str(meta),
            caption_source="metadata",
            image_key=key,  # kohya's image_key for fine-tuning data is the metadata key as written
            dataset_index=dataset.index,
            subset_index=sub.index,
            mask=mask,
        )
    return result


def _mask_options(options: ScanOptions, sub: SubsetConfig, section: str, source: str) -> ScanOptions:
    """The scan options with the subset's loss mask: alpha_mask, or conditioning_data_dir (kohya masked_loss)."""
    alpha = bool(sub.params.get("alpha_mask"))
    mask_dir = sub.resolved_mask_dir
    if alpha and mask_dir:
        raise DatasetError(
            f"{source}: {section} sets both alpha_mask and conditioning_data_dir; a subset's mask comes from one "
            "of them: remove one."
        )
    if mask_dir and not Path(mask_dir).is_dir():
        raise DatasetError(
            f"conditioning_data_dir {mask_dir} of {section} in {source} does not exist or is not a folder "
            f"('{sub.params['conditioning_data_dir']}' resolved against the dataset config's folder); fix it."
        )
    return replace(options, alpha_mask=alpha, mask_dir=mask_dir)


_MAX_LISTED_SKIPS = 5  # skipped files named in the "no usable images" error (all of them are in the report)


def _nothing_to_train_error(cfg: DatasetTomlConfig, result: ScanResult) -> DatasetError:
    """Why no subset gave an image: each subset's reason (repeats, duplicate, no usable images) and the files
    skipped, so one message says everything to fix."""
    reasons = [
        f"{_section_name(dataset.index, sub.index)} ({sub.image_dir or sub.metadata_file}): {sub.dropped}"
        for dataset in cfg.datasets
        for sub in dataset.subsets
        if sub.dropped is not None
    ]
    if not reasons:
        reasons = ["the config has no [[datasets.subsets]]"]
    message = f"{cfg.path}: no usable images in any subset:\n  " + "\n  ".join(reasons)
    if result.skipped:
        message += f"\n{len(result.skipped)} file(s) skipped:\n  " + "\n  ".join(
            skip_line(p, r) for p, r in result.skipped[:_MAX_LISTED_SKIPS]
        )
        if len(result.skipped) > _MAX_LISTED_SKIPS:
            message += f"\n  ... and {len(result.skipped) - _MAX_LISTED_SKIPS} more"
    if any(sub.dropped == "no usable images" for dataset in cfg.datasets for sub in dataset.subsets):
        message += (
            f"\nCheck each image_dir and that it contains {', '.join(ACCEPTED_EXTENSIONS)} files (any letter case)."
        )
    return DatasetError(message)


def scan_dataset_toml(
    config: DatasetTomlConfig | PathLike,
    input_dir: PathLike | None = None,
    options: ScanOptions = KOHYA_SUBSET_SCAN,
    *,
    fallbacks: dict[str, Any] | None = None,
) -> tuple[DatasetTomlConfig, ScanResult]:
    """Load (if given a path) and scan every subset; returns (config, items of all datasets).

    Items carry ``dataset_index``/``subset_index`` so later stages can look up the dataset's bucket
    settings and the subset's caption settings in the config. Each subset is scanned with
    ``options`` (non-recursive by default, as kohya) and its own caption_extension and enable_wildcard.
    """
    cfg = config if isinstance(config, DatasetTomlConfig) else load_dataset_toml(config, input_dir, fallbacks)
    result = ScanResult(warnings=list(cfg.warnings))
    for dataset in cfg.datasets:
        taken: dict[str, SubsetConfig] = {}  # kohya compares image_dir strings as written
        taken_real: dict[str, SubsetConfig] = {}
        for sub in dataset.subsets:
            section = _section_name(dataset.index, sub.index)
            if sub.dropped is not None:
                continue
            ident = sub.image_dir if dataset.is_dreambooth else sub.metadata_file
            assert ident is not None
            if ident in taken:
                first = taken[ident]
                where = "image_dir" if dataset.is_dreambooth else "metadata_file"
                sub.dropped = f"duplicate of subset #{first.index + 1} (same {where})"
                result.warnings.append(
                    f"{cfg.path}: {section} is not used: it has the same "
                    f"{'image_dir' if dataset.is_dreambooth else 'metadata_file'} '{ident}' as subset "
                    f"#{first.index + 1}, and kohya silently keeps only the first one. Merge their settings "
                    "into one subset, or put the second in its own [[datasets]]."
                )
                continue
            if dataset.is_dreambooth:
                assert sub.resolved_image_dir is not None
                d = Path(sub.resolved_image_dir)
                if not d.is_dir():
                    raise DatasetError(
                        f"image_dir {d} of {section} in {cfg.path} "
                        f"{'does not exist' if not d.exists() else 'is not a folder'} "
                        f"('{sub.image_dir}' resolved against the dataset config's folder); fix image_dir."
                    )
                subset_options = replace(
                    _mask_options(options, sub, section, cfg.path),
                    caption_extension=sub.caption_extension,
                    enable_wildcard=bool(sub.params.get("enable_wildcard")),
                )
                sub_result = scan_image_dir(
                    d,
                    subset_options,
                    num_repeats=sub.num_repeats,
                    class_tokens=sub.class_tokens,
                    is_reg=sub.is_reg,
                    subset=sub.name,
                    dataset_index=dataset.index,
                    subset_index=sub.index,
                )
            else:
                sub_result = _scan_metadata_subset(dataset, sub, _mask_options(options, sub, section, cfg.path))
            result.extend(sub_result)
            if not sub_result.items:
                sub.dropped = "no usable images"
                result.warnings.append(
                    f"{cfg.path}: {section} ('{ident}') has no usable images; it is ignored (as kohya does)."
                )
                continue
            real = os.path.realpath(sub.resolved_image_dir or sub.resolved_metadata_file or "")
            if real in taken_real:
                result.warnings.append(
                    f"{cfg.path}: {section} ('{ident}') is the same folder as subset #{taken_real[real].index + 1} "
                    "written differently; kohya keeps both, so these images are trained in both subsets."
                )
            taken[ident] = sub
            taken_real.setdefault(real, sub)
    if not result.items:
        raise _nothing_to_train_error(cfg, result)
    return cfg, result
