"""Turning a finished (or cancelled) run into a kohya LoRA file in ComfyUI's loras folder.

Builds kohya's ss_* / modelspec metadata from the run's settings, picks a name that is unique per
run (LoraLoader caches by path, so a rewritten path would serve stale weights) and writes atomically.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.bucket_batches import num_train_epochs_for_steps
from ..data.dataset import TrainingDataset
from ..network.base import AdapterNetwork
from ..network.config import NetworkConfig
from ..network.file_names import safe_relative_name, unique_lora_path
from ..network.metadata import ModelCard, build_metadata, kohya_bucket_info, tag_frequency
from ..network.safetensors_file import prepare_tensors, save_lora
from .config import TrainConfig
from .optimizers import optimizer_metadata_name
from .validation import ValidationRequest, ValidationSettings

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class OutputSettings:
    """Where the LoRA goes. Checked when built, so a bad name fails before training, not after it."""

    name: str = "sdxl_lora"
    subfolder: str = "sdxl_lora_trainer"
    save_precision: str = "fp16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        safe_relative_name(self.subfolder, self.name)
        if self.save_precision not in SAVE_DTYPES:
            raise ValueError(f"save_precision {self.save_precision!r} is not one of {sorted(SAVE_DTYPES)}")

    def lora_tag(self, run_tag: str) -> str:
        """The tag in the file name: the run's tag, or none with ``overwrite`` (the exact name is reused)."""
        return "" if self.overwrite else run_tag


def output_name_error(subfolder: str, name: str) -> str | None:
    """Why a subfolder/name pair cannot be used (for the node's validation at queue time), or None."""
    try:
        safe_relative_name(subfolder, name)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


@dataclass
class SavedLora:
    path: Path
    lora_name: str  # what LoraLoader's lora_name expects (relative to the loras folder)
    companions: list[SavedLora] = field(default_factory=list)  # files of the same save (the EMA file)


def validation_metadata(ds: TrainingDataset, request: ValidationRequest | None) -> dict[str, Any]:
    """kohya's ss_validation_* keys: the validation arguments (kohya's None where unset) and the dataset's split."""
    settings = request.settings if request is not None else ValidationSettings()
    return {
        "validation_seed": settings.validation_seed,
        "validation_split": ds.validation_split,
        "max_validation_steps": settings.max_validation_steps,
        "validate_every_n_epochs": settings.validate_every_n_epochs,
        "validate_every_n_steps": settings.validate_every_n_steps,
    }


def num_validation_images(ds: TrainingDataset, request: ValidationRequest | None) -> int:
    """kohya's ss_num_validation_images: the held-out images (each counted once), or the separate dataset's."""
    if request is not None and request.dataset is not None:
        return len(request.dataset.images)
    return len(ds.validation_images)


def dataset_metadata(ds: TrainingDataset, validation: ValidationRequest | None = None) -> dict[str, Any]:
    images = ds.images
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}  # kohya: reg subsets go to ss_reg_dataset_dirs
    captions: dict[str, list[str]] = {}
    for img in images:
        name = os.path.basename(img.item.source_dir or "") or img.item.subset or "images"
        table = reg_dirs if img.item.is_reg else dirs
        d = table.setdefault(name, {"n_repeats": img.item.num_repeats, "img_count": 0})
        d["img_count"] += 1
        captions.setdefault(name, []).append(img.item.caption)
    part = ds.parts[0]
    image_counts = ds.image_counts()
    opts = images[0].caption_options
    counts: dict[tuple[int, int], int] = {}
    for bucket, _, with_repeats in ds.bucket_histogram():
        counts[bucket] = with_repeats
    ar_error = sum(abs(img.selection.ar_error) for img in images) / max(1, len(images))
    return {
        # kohya's counters: num_reg_images counts the reg images given (x repeats), before its balancing
        "num_train_images": image_counts["num_train_images"],
        "num_reg_images": image_counts["num_reg_images"],
        "num_validation_images": num_validation_images(ds, validation),
        "resolution": tuple(part.settings.resolution),
        "enable_bucket": part.settings.enable_bucket,
        "bucket_no_upscale": part.settings.bucket_no_upscale,
        "min_bucket_reso": part.settings.min_bucket_reso,
        "max_bucket_reso": part.settings.max_bucket_reso,
        "flip_aug": any(i.flip_aug for i in images),
        "shuffle_caption": opts.shuffle_caption,
        "keep_tokens": opts.keep_tokens,
        "caption_dropout_rate": opts.caption_dropout_rate,
        "caption_dropout_every_n_epochs": opts.caption_dropout_every_n_epochs,
        "caption_tag_dropout_rate": opts.caption_tag_dropout_rate,
        "dataset_dirs": dirs,
        "reg_dataset_dirs": reg_dirs or None,
        "tag_frequency": tag_frequency(captions),
        "bucket_info": kohya_bucket_info(counts, ar_error) if part.settings.enable_bucket else None,
    }


def network_metadata(config: NetworkConfig, train: TrainConfig | None = None) -> dict[str, Any]:
    """kohya's ss_network_* values. ``args`` is what kohya writes as ss_network_args: the network_args strings
    (config_export's ``network_args_dict``, the one place that formats them, LoRA+ ratios of ``train`` included)
    plus, as kohya's train_network adds for LyCORIS whenever network_args are given and the dims do not come
    from a file, ``"dropout"``: the network_dropout value itself (None or a number, not a string)."""
    from ..kohya_config.config_export import network_args_dict

    args: dict[str, Any] = dict(network_args_dict(config, train if train is not None else TrainConfig()))
    if args and config.module_dims is None:
        args["dropout"] = config.dropout
    meta = {"dim": config.network_dim, "alpha": config.network_alpha, "dropout": config.dropout}
    if config.algo != "lora":
        meta["module"] = "lycoris.kohya"  # what LyCORIS's kohya wrapper records (network_args carry algo, factor)
    meta["args"] = args or None
    return meta


def training_metadata(
    run: Any,
    optimizer: Any,
    steps_per_epoch: int,
    total_steps: int,
    started_at: float,
    output_name: str,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``run`` is the TrainConfig; ``validation`` the ss_validation_* values (``validation_metadata``)."""
    return {
        **(validation or {}),
        "training_started_at": started_at,
        "output_name": output_name,
        "learning_rate": run.learning_rate,
        "unet_lr": run.unet.learning_rate,
        "text_encoder_lr": run.clip_l.learning_rate,
        "num_batches_per_epoch": steps_per_epoch * run.gradient_accumulation_steps,
        "num_epochs": max(1, num_train_epochs_for_steps(total_steps, max(1, steps_per_epoch))),
        "gradient_checkpointing": run.gradient_checkpointing,
        "gradient_accumulation_steps": run.gradient_accumulation_steps,
        "max_train_steps": total_steps,
        "lr_warmup_steps": run.lr_warmup_steps,
        "lr_scheduler": run.lr_scheduler,
        "mixed_precision": {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[run.train_dtype],
        "cache_latents": True,
        "max_token_length": run.token_length.max_token_length if run.token_length else None,
        "seed": run.seed,
        "noise_offset": run.noise.noise_offset,
        "multires_noise_iterations": run.noise.multires_noise_iterations,
        "multires_noise_discount": run.noise.multires_noise_discount,
        "adaptive_noise_scale": run.noise.adaptive_noise_scale,
        "noise_offset_random_strength": run.noise.noise_offset_random_strength,
        "ip_noise_gamma": run.noise.ip_noise_gamma,
        "ip_noise_gamma_random_strength": run.noise.ip_noise_gamma_random_strength,
        "optimizer": optimizer_metadata_name(optimizer, run.optimizer),
        "max_grad_norm": run.max_grad_norm,
        "min_snr_gamma": run.loss.min_snr_gamma,
        "prior_loss_weight": run.loss.prior_loss_weight,
        "scale_weight_norms": run.scale_weight_norms,
        "debiased_estimation": run.loss.debiased_estimation_loss,
        "loss_type": run.loss.loss_type,
        "huber_schedule": run.loss.huber_schedule,
        "huber_scale": run.loss.huber_scale,
        "huber_c": run.loss.huber_c,
    }


def shipped_weights(
    network: AdapterNetwork, out: OutputSettings, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The LoRA exactly as the file holds it (cast to ``save_precision``, CPU copies); ``state``: the network's dict
    with other weights (its EMA, ``AdapterEma.state_dict_kohya``) to ship instead of its own.

    The train node applies these to its MODEL/CLIP outputs and hands them on as LORA_MODEL, so what a KSampler after
    the train node shows is what a LoraLoader loading the file shows (what you test is what you ship).
    """
    return prepare_tensors(state if state is not None else network.state_dict_kohya(), SAVE_DTYPES[out.save_precision])


def save_run_lora(
    weights: dict[str, torch.Tensor],
    loras_root: str,
    out: OutputSettings,
    *,
    run_tag: str,
    training: dict,
    dataset: dict,
    network_meta: dict,
    step: int,
    epoch: int,
    prompt: dict | None = None,
    extra_pnginfo: dict | None = None,
    v_parameterization: bool = False,
    extra_metadata: dict[str, str] | None = None,
    companion_of: SavedLora | None = None,
) -> SavedLora:
    """Write ``weights`` (``shipped_weights``) under a new name in the loras folder, or, with ``companion_of``, beside
    that file as ``<its stem>_ema.safetensors`` (the EMA of the same save); raises OSError when it cannot
    (``atomic_files.WriteFailed`` names the file, the space needed and free)."""
    if companion_of is not None:
        path = companion_of.path.with_name(f"{companion_of.path.stem}_ema{companion_of.path.suffix}")
        stem, ext = os.path.splitext(companion_of.lora_name)
        rel = f"{stem}_ema{ext}"
    else:
        path, rel = unique_lora_path(loras_root, out.subfolder, out.name, run_tag, overwrite=out.overwrite)
    meta = build_metadata(
        training,
        dataset,
        network_meta,
        step=step,
        epoch=epoch,
        prompt=prompt,
        extra_pnginfo=extra_pnginfo,
        card=ModelCard(title=out.name),
    )
    if v_parameterization:
        meta["ss_v_parameterization"] = "True"
    meta.update(extra_metadata or {})
    save_lora(weights, path, meta, SAVE_DTYPES[out.save_precision], overwrite=out.overwrite)
    return SavedLora(path=Path(path), lora_name=rel)


def run_tag(seed: int) -> str:
    """A tag that differs between runs: the start time to the second and the seed (unique_lora_path
    adds _2, _3 ... if two runs start in the same second)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}_s{seed}"
