"""kohya's metadata of an SDXL LoRA file.

* **kohya's metadata** (``build_metadata``): the ``ss_*`` keys of sd-scripts' ``train_network.py`` (all values
  ``str(value)``, JSON where kohya uses JSON), the ModelSpec ``modelspec.*`` keys kohya writes for an SDXL LoRA
  (``library/sai_model_spec.py``) and the two addnet hashes (``sshs_model_hash``, ``sshs_legacy_hash``) that
  A1111-style UIs use to index LoRAs. Plus ``comfyui.prompt`` / ``comfyui.workflow``: the graph that trained it.
"""

from __future__ import annotations

import datetime
import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

SDXL_BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
KOHYA_LORA_NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"  # sai_model_spec.BASE_METADATA["modelspec.sai_model_spec"]
MODELSPEC_ARCHITECTURE_SDXL_LORA = "stable-diffusion-xl-v1-base/lora"
MODELSPEC_IMPLEMENTATION_SDXL_LORA = "https://github.com/Stability-AI/generative-models"  # kohya: LoRA + SDXL
DEFAULT_IMPLEMENTATION_VERSION = "comfyui-sdxl-lora-trainer"
UNKNOWN_COMMIT = "(unknown)"  # what kohya's get_git_revision_hash writes when it cannot ask git


# ---------------------------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------------------------

_REQUIRED = object()

# Keys are kohya's ss_* names without "ss_"; defaults are kohya's argparse defaults (so a key the trainer leaves
# out records what kohya would have used). _REQUIRED: no honest default, the caller must say.
TRAINING_KEYS: dict[str, Any] = {
    "session_id": None,  # None: random.randint(0, 2**32), as kohya
    "training_started_at": None,  # None: time.time()
    "output_name": None,
    "learning_rate": _REQUIRED,
    "text_encoder_lr": None,
    "unet_lr": None,
    "num_batches_per_epoch": _REQUIRED,
    "num_epochs": _REQUIRED,
    "gradient_checkpointing": False,
    "gradient_accumulation_steps": 1,
    "max_train_steps": _REQUIRED,
    "lr_warmup_steps": 0,
    "lr_scheduler": "constant",
    "mixed_precision": "no",
    "full_fp16": False,
    "clip_skip": None,
    "max_token_length": None,
    "cache_latents": False,
    "seed": _REQUIRED,
    "lowram": False,
    "noise_offset": None,
    "multires_noise_iterations": None,
    "multires_noise_discount": 0.3,
    "adaptive_noise_scale": None,
    "zero_terminal_snr": False,
    "training_comment": None,
    "sd_scripts_commit_hash": UNKNOWN_COMMIT,
    "optimizer": _REQUIRED,  # class path, e.g. "torch.optim.adamw.AdamW"
    "optimizer_args": None,  # mapping -> "name(k=v,k=v)" as kohya, or None
    "max_grad_norm": 1.0,
    "prior_loss_weight": 1.0,
    "min_snr_gamma": None,
    "scale_weight_norms": None,
    "ip_noise_gamma": None,
    "debiased_estimation": False,
    "noise_offset_random_strength": False,
    "ip_noise_gamma_random_strength": False,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_scale": 1.0,
    "huber_c": 0.1,
    "fp8_base": False,
    "fp8_base_unet": False,
    "validation_seed": None,
    "validation_split": 0.0,
    "max_validation_steps": None,
    "validate_every_n_epochs": None,
    "validate_every_n_steps": None,
    "batch_size_per_device": 1,
    "total_batch_size": None,  # None: batch_size_per_device * gradient_accumulation_steps (one process)
    "sd_model_name": None,  # base name of the checkpoint, written only when given (as kohya)
    "sd_model_hash": None,
    "new_sd_model_hash": None,
    "vae_name": None,
    "vae_hash": None,
    "new_vae_hash": None,
    # not ss_* keys, they feed modelspec.*
    "v_parameterization": False,
    "min_timestep": None,
    "max_timestep": None,
}

DATASET_KEYS: dict[str, Any] = {
    "num_train_images": _REQUIRED,  # including repeats
    "num_validation_images": 0,
    "num_reg_images": 0,
    "resolution": _REQUIRED,  # int, (W, H) or "W,H"
    "enable_bucket": False,
    "bucket_no_upscale": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "color_aug": False,
    "flip_aug": False,
    "random_crop": False,
    "shuffle_caption": False,
    "keep_tokens": 0,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "face_crop_aug_range": None,
    "resize_interpolation": None,
    "dataset_dirs": _REQUIRED,  # {dir basename: {"n_repeats": r, "img_count": n}}
    "reg_dataset_dirs": None,  # same shape; None -> {}
    "tag_frequency": _REQUIRED,  # {dir basename: {tag: count}}, see tag_frequency()
    "bucket_info": None,  # see kohya_bucket_info(); None when buckets are off (kohya writes "null")
}

NETWORK_KEYS: dict[str, Any] = {
    "module": KOHYA_LORA_NETWORK_MODULE,
    "dim": _REQUIRED,
    "alpha": _REQUIRED,
    "dropout": None,
    "args": None,  # mapping of network_args; written as JSON only when non-empty (as kohya)
}

# kohya writes bool(args.x) for these store_true flags
_BOOL_KEYS = frozenset(
    {
        "gradient_checkpointing",
        "full_fp16",
        "cache_latents",
        "lowram",
        "zero_terminal_snr",
        "debiased_estimation",
        "noise_offset_random_strength",
        "ip_noise_gamma_random_strength",
        "fp8_base",
        "fp8_base_unet",
        "v_parameterization",
        "enable_bucket",
        "bucket_no_upscale",
        "color_aug",
        "flip_aug",
        "random_crop",
        "shuffle_caption",
    }
)

# the keys kohya keeps with --no_metadata (train_util.SS_METADATA_MINIMUM_KEYS)
SS_METADATA_MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)

JSON_SS_KEYS = frozenset(
    {"ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info", "ss_network_args"}
)


def _resolve(given: Mapping[str, Any], table: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Fill kohya's defaults; unknown keys (typos) and missing required keys are errors, not silent gaps."""
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise ValueError(f"unknown {what} metadata keys {unknown}; known: {sorted(table)}")
    out = {}
    missing = []
    for key, default in table.items():
        if key in given:
            out[key] = given[key]
        elif default is _REQUIRED:
            missing.append(key)
        else:
            out[key] = default
    if missing:
        raise ValueError(f"{what} metadata needs {missing}")
    for key in _BOOL_KEYS:
        if key in out:
            out[key] = bool(out[key])
    return out


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays and tuples reach us from dataset code; json needs plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _to_json(value: Any) -> str:
    if isinstance(value, str):
        json.loads(value)  # already JSON: must at least parse
        return value
    return json.dumps(value, default=_json_default)


def _resolution(value: Any) -> tuple[int, int]:
    """kohya's prepare_dataset_args: "W,H" / "S" / S -> (W, H) tuple; stored as str(tuple)."""
    if isinstance(value, str):
        value = tuple(int(r) for r in value.split(","))
    elif isinstance(value, (int, float)):
        value = (int(value),)
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        value = (value[0], value[0])
    if len(value) != 2:
        raise ValueError(f"resolution must be S, (W, H) or 'W,H', got {value}")
    return value  # type: ignore[return-value]


def _optimizer_string(name: str, args: Mapping[str, Any] | None) -> str:
    """kohya: optimizer_name + "(k=v,k=v)" when there are optimizer kwargs."""
    if not args:
        return str(name)
    return f"{name}(" + ",".join(f"{k}={v}" for k, v in args.items()) + ")"


def tag_frequency(captions_by_dir: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``set_tag_frequency``: per image-folder basename, count of each lower-cased ','-separated tag.

    kohya always splits on ',' (not the caption separator), strips each tag and skips empty ones; pass the
    captions as read from the caption files (one per image, without repeats).
    """
    out: dict[str, dict[str, int]] = {}
    for dir_name, captions in captions_by_dir.items():
        freq = out.setdefault(dir_name, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip()
                if tag:
                    tag = tag.lower()
                    freq[tag] = freq.get(tag, 0) + 1
    return out


def kohya_bucket_info(bucket_counts: Mapping[Sequence[int], int], mean_img_ar_error: float) -> dict[str, Any]:
    """kohya's ``bucket_info``: ``{"buckets": {i: {"resolution": (W, H), "count": n}}, "mean_img_ar_error": e}``.

    ``bucket_counts``: images per used bucket, repeats included; ``i`` is the index in the sorted list of used
    buckets (kohya's BucketManager only holds buckets that received an image, then sorts them).
    ``mean_img_ar_error``: mean |bucket aspect - image aspect| over images without repeats (0 when none).
    """
    used = sorted(tuple(int(x) for x in reso) for reso, count in bucket_counts.items() if count > 0)
    counts = {tuple(int(x) for x in reso): int(c) for reso, c in bucket_counts.items()}
    return {
        "buckets": {i: {"resolution": reso, "count": counts[reso]} for i, reso in enumerate(used)},
        "mean_img_ar_error": float(mean_img_ar_error),
    }


def build_metadata(
    training: Mapping[str, Any],
    dataset: Mapping[str, Any],
    network: Mapping[str, Any],
    *,
    step: int,
    epoch: int,
    prompt: Mapping[str, Any] | None = None,
    extra_pnginfo: Mapping[str, Any] | None = None,
    card: ModelCard | None = None,
    finished_at: float | None = None,
    minimal: bool = False,
) -> dict[str, str]:
    """The metadata kohya's ``sdxl_train_network.py`` writes into a LoRA, all values strings.

    ``training`` / ``dataset`` / ``network``: kohya's names without "ss_" (see TRAINING_KEYS, DATASET_KEYS,
    NETWORK_KEYS for the accepted keys, kohya's defaults and the required ones). Values are written as kohya does,
    ``str(value)`` ("True", "None", "(1024, 1024)", "0.0001"), and JSON for ss_dataset_dirs, ss_reg_dataset_dirs,
    ss_tag_frequency, ss_bucket_info and ss_network_args. ``step``/``epoch``: ss_steps / ss_epoch of this save;
    ``finished_at`` (default now) is ss_training_finished_at and the modelspec date.
    ``card``: the modelspec.* text (title defaults to the output_name).
    ``prompt`` / ``extra_pnginfo``: ComfyUI's hidden PROMPT and EXTRA_PNGINFO inputs, stored as JSON in
    ``comfyui.prompt`` and ``comfyui.workflow`` (extra_pnginfo["workflow"]) when present.
    ``minimal``: like kohya's --no_metadata, keep only SS_METADATA_MINIMUM_KEYS and modelspec.* (no dataset
    folder names, captions' tags or workflow, which may be private).
    The sshs_* hashes are added by ``save_lora``, since they depend on the saved tensors.
    """
    tr = _resolve(training, TRAINING_KEYS, "training")
    ds = _resolve(dataset, DATASET_KEYS, "dataset")
    nw = _resolve(network, NETWORK_KEYS, "network")
    resolution = _resolution(ds["resolution"])
    now = time.time() if finished_at is None else float(finished_at)
    started = time.time() if tr["training_started_at"] is None else tr["training_started_at"]
    session_id = random.randint(0, 2**32) if tr["session_id"] is None else tr["session_id"]
    total_batch_size = tr["total_batch_size"]
    if total_batch_size is None:
        total_batch_size = tr["batch_size_per_device"] * tr["gradient_accumulation_steps"]

    ss: dict[str, Any] = {
        "session_id": session_id,
        "training_started_at": started,
        "output_name": tr["output_name"],
        "learning_rate": tr["learning_rate"],
        "text_encoder_lr": tr["text_encoder_lr"],
        "unet_lr": tr["unet_lr"],
        "num_train_images": ds["num_train_images"],
        "num_validation_images": ds["num_validation_images"],
        "num_reg_images": ds["num_reg_images"],
        "num_batches_per_epoch": tr["num_batches_per_epoch"],
        "num_epochs": tr["num_epochs"],
        "gradient_checkpointing": tr["gradient_checkpointing"],
        "gradient_accumulation_steps": tr["gradient_accumulation_steps"],
        "max_train_steps": tr["max_train_steps"],
        "lr_warmup_steps": tr["lr_warmup_steps"],
        "lr_scheduler": tr["lr_scheduler"],
        "network_module": nw["module"],
        "network_dim": nw["dim"],
        "network_alpha": nw["alpha"],
        "network_dropout": nw["dropout"],
        "mixed_precision": tr["mixed_precision"],
        "full_fp16": tr["full_fp16"],
        "v2": False,
        "base_model_version": SDXL_BASE_MODEL_VERSION,
        "clip_skip": tr["clip_skip"],
        "max_token_length": tr["max_token_length"],
        "cache_latents": tr["cache_latents"],
        "seed": tr["seed"],
        "lowram": tr["lowram"],
        "noise_offset": tr["noise_offset"],
        "multires_noise_iterations": tr["multires_noise_iterations"],
        "multires_noise_discount": tr["multires_noise_discount"],
        "adaptive_noise_scale": tr["adaptive_noise_scale"],
        "zero_terminal_snr": tr["zero_terminal_snr"],
        "training_comment": tr["training_comment"],
        "sd_scripts_commit_hash": tr["sd_scripts_commit_hash"],
        "optimizer": _optimizer_string(tr["optimizer"], tr["optimizer_args"]),
        "max_grad_norm": tr["max_grad_norm"],
        "caption_dropout_rate": ds["caption_dropout_rate"],
        "caption_dropout_every_n_epochs": ds["caption_dropout_every_n_epochs"],
        "caption_tag_dropout_rate": ds["caption_tag_dropout_rate"],
        "face_crop_aug_range": ds["face_crop_aug_range"],
        "prior_loss_weight": tr["prior_loss_weight"],
        "min_snr_gamma": tr["min_snr_gamma"],
        "scale_weight_norms": tr["scale_weight_norms"],
        "ip_noise_gamma": tr["ip_noise_gamma"],
        "debiased_estimation": tr["debiased_estimation"],
        "noise_offset_random_strength": tr["noise_offset_random_strength"],
        "ip_noise_gamma_random_strength": tr["ip_noise_gamma_random_strength"],
        "loss_type": tr["loss_type"],
        "huber_schedule": tr["huber_schedule"],
        "huber_scale": tr["huber_scale"],
        "huber_c": tr["huber_c"],
        "fp8_base": tr["fp8_base"],
        "fp8_base_unet": tr["fp8_base_unet"],
        "validation_seed": tr["validation_seed"],
        "validation_split": tr["validation_split"],
        "max_validation_steps": tr["max_validation_steps"],
        "validate_every_n_epochs": tr["validate_every_n_epochs"],
        "validate_every_n_steps": tr["validate_every_n_steps"],
        "resize_interpolation": ds["resize_interpolation"],
        # single-dataset layout (kohya without --dataset_config)
        "batch_size_per_device": tr["batch_size_per_device"],
        "total_batch_size": total_batch_size,
        "resolution": resolution,
        "color_aug": ds["color_aug"],
        "flip_aug": ds["flip_aug"],
        "random_crop": ds["random_crop"],
        "shuffle_caption": ds["shuffle_caption"],
        "enable_bucket": ds["enable_bucket"],
        "bucket_no_upscale": ds["bucket_no_upscale"],
        "min_bucket_reso": ds["min_bucket_reso"],
        "max_bucket_reso": ds["max_bucket_reso"],
        "keep_tokens": ds["keep_tokens"],
        "dataset_dirs": _to_json(ds["dataset_dirs"]),
        "reg_dataset_dirs": _to_json(ds["reg_dataset_dirs"] if ds["reg_dataset_dirs"] is not None else {}),
        "tag_frequency": _to_json(ds["tag_frequency"]),
        "bucket_info": _to_json(ds["bucket_info"]),
    }
    if nw["args"]:
        ss["network_args"] = _to_json(nw["args"])
    if tr["sd_model_name"] is not None:
        ss["sd_model_name"] = tr["sd_model_name"]
        for key in ("sd_model_hash", "new_sd_model_hash"):
            if tr[key] is not None:
                ss[key] = tr[key]
    if tr["vae_name"] is not None:
        ss["vae_name"] = tr["vae_name"]
        for key in ("vae_hash", "new_vae_hash"):
            if tr[key] is not None:
                ss[key] = tr[key]
    ss["training_finished_at"] = now
    ss["steps"] = int(step)
    ss["epoch"] = int(epoch)

    metadata = {f"ss_{k}": str(v) for k, v in ss.items()}
    if minimal:
        metadata = {k: metadata[k] for k in SS_METADATA_MINIMUM_KEYS if k in metadata}
    else:
        if prompt is not None:
            metadata["comfyui.prompt"] = json.dumps(prompt, default=_json_default)
        if extra_pnginfo is not None and extra_pnginfo.get("workflow") is not None:
            metadata["comfyui.workflow"] = json.dumps(extra_pnginfo["workflow"], default=_json_default)

    metadata.update(
        modelspec_metadata(
            with_title(card, tr["output_name"]),
            timestamp=now,
            resolution=resolution,
            v_parameterization=tr["v_parameterization"],
            min_timestep=tr["min_timestep"],
            max_timestep=tr["max_timestep"],
            clip_skip=tr["clip_skip"],
        )
    )
    return metadata


@dataclass(frozen=True)
class ModelCard:
    """The human-readable modelspec.* fields of a LoRA (kohya's --metadata_title, --metadata_author, ...); None
    leaves a field out, as kohya does."""

    title: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    trigger_phrase: str | None = None
    usage_hint: str | None = None
    implementation_version: str = DEFAULT_IMPLEMENTATION_VERSION


def with_title(card: ModelCard | None, default_title: str) -> ModelCard:
    """``card`` (empty when None) with ``default_title`` where it has no title."""
    card = card or ModelCard()
    return card if card.title is not None else replace(card, title=default_title)


def modelspec_metadata(
    card: ModelCard,
    *,
    timestamp: float,
    resolution: tuple[int, int],
    v_parameterization: bool = False,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    clip_skip: int | None = None,
) -> dict[str, str]:
    """The modelspec.* keys kohya's sai_model_spec.build_metadata writes for an SDXL LoRA (ModelSpec 1.0.1).

    date: ISO-8601 local time of ``timestamp`` without microseconds; title defaults to "LoRA@<timestamp>";
    timestep_range only when a min or max timestep was set (missing end: 0 / 1000); encoder_layer = clip_skip.
    """
    title = card.title if card.title is not None else f"LoRA@{timestamp}"
    spec: dict[str, str | None] = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE_SDXL_LORA,
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION_SDXL_LORA,
        "modelspec.title": str(title),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.description": card.description,
        "modelspec.author": card.author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.license": card.license,
        "modelspec.tags": card.tags,
        "modelspec.trigger_phrase": card.trigger_phrase,
        "modelspec.usage_hint": card.usage_hint,
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.implementation_version": card.implementation_version,
    }
    if min_timestep is not None or max_timestep is not None:
        lo = 0 if min_timestep is None else min_timestep
        hi = 1000 if max_timestep is None else max_timestep
        spec["modelspec.timestep_range"] = f"{lo},{hi}"
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return {k: v for k, v in spec.items() if v is not None}
