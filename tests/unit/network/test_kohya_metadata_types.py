"""Every ss_* value a trained LoRA carries has the type kohya writes for it, and the base checkpoint is named and
hashed as kohya does.

kohya writes ``str(value)`` of its arguments and counters (train_network.py's metadata block at 48d368f, argparse
types in library/train_util.py and train_network.py), so a tool that parses ``ss_lr_warmup_steps`` with ``int()``
fails on our ``'0.0'``. The expected types are kept below as data, read off kohya's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pytest
import torch
from PIL import Image

from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.data.sources import DatasetItem, ScanResult
from sdxl_lora_trainer.trainer.network.checkpoint_hashes import checkpoint_hashes
from sdxl_lora_trainer.trainer.network.config import NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.network.metadata import build_metadata
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.lora_output import dataset_metadata, network_metadata, training_metadata
from sdxl_lora_trainer.trainer.run.optimizers import build_optimizer

INT, FLOAT, BOOL, STR, JSON, PAIR = "int", "float", "bool", "str", "json", "pair"

#: what kohya writes for each ss_* key: (type, whether kohya may write "None") -- the argparse type of the argument
#: (or of the counter) whose str() kohya stores
KOHYA_SS_TYPES: dict[str, tuple[str, bool]] = {
    "ss_session_id": (INT, False),  # random.randint
    "ss_training_started_at": (FLOAT, False),  # time.time()
    "ss_output_name": (STR, True),
    "ss_learning_rate": (FLOAT, False),  # --learning_rate type=float
    "ss_text_encoder_lr": (FLOAT, True),  # --text_encoder_lr type=float nargs=* -> its first value or None
    "ss_unet_lr": (FLOAT, True),  # --unet_lr type=float
    "ss_num_train_images": (INT, False),
    "ss_num_validation_images": (INT, False),
    "ss_num_reg_images": (INT, False),
    "ss_num_batches_per_epoch": (INT, False),  # len(train_dataloader)
    "ss_num_epochs": (INT, False),  # math.ceil
    "ss_gradient_checkpointing": (BOOL, False),  # store_true
    "ss_gradient_accumulation_steps": (INT, False),
    "ss_max_train_steps": (INT, False),
    "ss_lr_warmup_steps": (INT, False),  # int_or_float: steps are an int (a ratio < 1 would be a float)
    "ss_lr_scheduler": (STR, False),
    "ss_network_module": (STR, False),
    "ss_network_dim": (INT, True),  # --network_dim type=int
    "ss_network_alpha": (FLOAT, True),  # --network_alpha type=float
    "ss_network_dropout": (FLOAT, True),  # --network_dropout type=float
    "ss_mixed_precision": (STR, False),
    "ss_full_fp16": (BOOL, False),
    "ss_v2": (BOOL, False),
    "ss_base_model_version": (STR, False),
    "ss_clip_skip": (INT, True),
    "ss_max_token_length": (INT, True),
    "ss_cache_latents": (BOOL, False),
    "ss_seed": (INT, True),
    "ss_lowram": (BOOL, False),
    "ss_noise_offset": (FLOAT, True),
    "ss_multires_noise_iterations": (INT, True),
    "ss_multires_noise_discount": (FLOAT, False),
    "ss_adaptive_noise_scale": (FLOAT, True),
    "ss_zero_terminal_snr": (BOOL, False),
    "ss_training_comment": (STR, True),
    "ss_sd_scripts_commit_hash": (STR, False),
    "ss_optimizer": (STR, False),
    "ss_max_grad_norm": (FLOAT, False),
    "ss_caption_dropout_rate": (FLOAT, False),
    "ss_caption_dropout_every_n_epochs": (INT, False),
    "ss_caption_tag_dropout_rate": (FLOAT, False),
    "ss_face_crop_aug_range": (STR, True),
    "ss_prior_loss_weight": (FLOAT, False),
    "ss_min_snr_gamma": (FLOAT, True),
    "ss_scale_weight_norms": (FLOAT, True),
    "ss_ip_noise_gamma": (FLOAT, True),
    "ss_debiased_estimation": (BOOL, False),
    "ss_noise_offset_random_strength": (BOOL, False),
    "ss_ip_noise_gamma_random_strength": (BOOL, False),
    "ss_loss_type": (STR, False),
    "ss_huber_schedule": (STR, False),
    "ss_huber_scale": (FLOAT, False),
    "ss_huber_c": (FLOAT, False),
    "ss_fp8_base": (BOOL, False),
    "ss_fp8_base_unet": (BOOL, False),
    "ss_validation_seed": (INT, True),
    "ss_validation_split": (FLOAT, False),
    "ss_max_validation_steps": (INT, True),
    "ss_validate_every_n_epochs": (INT, True),
    "ss_validate_every_n_steps": (INT, True),
    "ss_resize_interpolation": (STR, True),
    "ss_batch_size_per_device": (INT, False),
    "ss_total_batch_size": (INT, False),
    "ss_resolution": (PAIR, False),  # a (W, H) tuple after prepare_dataset_args
    "ss_color_aug": (BOOL, False),
    "ss_flip_aug": (BOOL, False),
    "ss_random_crop": (BOOL, False),
    "ss_shuffle_caption": (BOOL, False),
    "ss_enable_bucket": (BOOL, False),
    "ss_bucket_no_upscale": (BOOL, False),
    "ss_min_bucket_reso": (INT, False),
    "ss_max_bucket_reso": (INT, False),
    "ss_keep_tokens": (INT, False),
    "ss_dataset_dirs": (JSON, False),
    "ss_reg_dataset_dirs": (JSON, False),
    "ss_tag_frequency": (JSON, False),
    "ss_bucket_info": (JSON, False),
    "ss_network_args": (JSON, False),  # json.dumps(net_kwargs), only with network_args
    "ss_sd_model_name": (STR, False),  # basename of pretrained_model_name_or_path
    "ss_sd_model_hash": (STR, False),  # train_util.model_hash: 8 hex digits
    "ss_new_sd_model_hash": (STR, False),  # train_util.calculate_sha256: 64 hex digits
    "ss_training_finished_at": (FLOAT, False),  # str(time.time())
    "ss_steps": (INT, False),
    "ss_epoch": (INT, False),
}

#: what kohya writes without a condition (the rest: network_args only with network_args, the model keys only
#: with a model path, the vae keys only with --vae)
ALWAYS = set(KOHYA_SS_TYPES) - {"ss_network_args"}


def _parses_as(kind: str, value: str) -> bool:
    if kind == INT:
        return re.fullmatch(r"-?\d+", value) is not None
    if kind == FLOAT:  # str(float) always has a '.', an exponent, 'inf' or 'nan'
        return re.fullmatch(r"-?(\d+\.\d+(e[-+]\d+)?|\d+e[-+]\d+|inf|nan)", value) is not None
    if kind == BOOL:
        return value in ("True", "False")
    if kind == PAIR:
        return re.fullmatch(r"\(\d+, \d+\)", value) is not None
    if kind == JSON:
        json.loads(value)
        return True
    return isinstance(value, str)


def _dataset():
    items = [
        DatasetItem(None, f"cat, photo {i}", image=Image.new("RGB", (128, 96)), image_key=f"k{i}", image_size=(128, 96))
        for i in range(3)
    ]
    return dataset_from_scan(ScanResult(items=items), BucketSettings((128, 128), 64, 256), 1, CaptionOptions())


def _our_metadata(config: TrainConfig, network: NetworkConfig, checkpoint: dict[str, str]) -> dict[str, str]:
    """The metadata the train node writes, from the same functions and objects (run/job.py's _save)."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config.optimizer, config.learning_rate)
    training = training_metadata(config, optimizer, 3, config.max_train_steps, time.time(), "mine") | checkpoint
    return build_metadata(training, dataset_metadata(_dataset()), network_metadata(network, config), step=12, epoch=4)


def _walk(metadata: dict[str, str]) -> list[str]:
    wrong = []
    for key, value in metadata.items():
        if not key.startswith("ss_"):
            continue
        if key not in KOHYA_SS_TYPES:
            wrong.append(f"{key}: kohya does not write this key")
            continue
        kind, may_be_none = KOHYA_SS_TYPES[key]
        if not ((may_be_none and value == "None") or _parses_as(kind, value)):
            wrong.append(f"{key}={value!r}: kohya writes a {kind}")
    return wrong


@pytest.fixture
def checkpoint_file(tmp_path):
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    path.write_bytes(bytes(range(256)) * 5000)  # 1.22 MiB: past kohya's 1 MiB offset
    return path


@pytest.mark.parametrize(
    "config,network",
    [
        (  # widget defaults: warmup 0.0 from the Float widget, alpha 0 (= rank), every option off
            TrainConfig(max_train_steps=12, lr_warmup_steps=0.0),
            NetworkConfig(network_dim=8, network_alpha=0.0),
        ),
        (  # everything set: per-part rates, warmup steps from the Float widget, noise and loss options, conv
            TrainConfig(
                max_train_steps=12,
                learning_rate=2e-4,
                unet=PartSettings(1e-4),
                clip_l=PartSettings(5e-5),
                lr_warmup_steps=5.0,
                scale_weight_norms=1.0,
                loss=LossSettings(min_snr_gamma=5.0, loss_type="huber"),
                noise=NoiseSettings(noise_offset=0.05, multires_noise_iterations=6, adaptive_noise_scale=0.01),
            ),
            NetworkConfig(network_dim=16, network_alpha=8.0, conv_dim=4, conv_alpha=1.0, dropout=0.1),
        ),
    ],
)
def test_every_ss_value_has_kohyas_type(config, network, checkpoint_file):
    metadata = _our_metadata(config, network, checkpoint_hashes(checkpoint_file).training_metadata())
    assert _walk(metadata) == []
    missing = ALWAYS - set(metadata)
    assert not missing, f"kohya always writes {sorted(missing)}"


def test_the_walk_catches_a_wrong_type():
    """The check itself can fail: '0.0' for steps, '8' for alpha, 'yes' for a flag, a key kohya never writes."""
    wrong = _walk({"ss_lr_warmup_steps": "0.0", "ss_network_alpha": "8", "ss_cache_latents": "yes", "ss_made_up": "1"})
    assert len(wrong) == 4, wrong


def test_warmup_steps_are_an_integer_string_and_a_ratio_stays_a_ratio():
    steps = _our_metadata(TrainConfig(max_train_steps=12, lr_warmup_steps=0.0), NetworkConfig(), {})
    assert steps["ss_lr_warmup_steps"] == "0"
    assert (
        _our_metadata(TrainConfig(max_train_steps=12, lr_warmup_steps=7.0), NetworkConfig(), {})["ss_lr_warmup_steps"]
        == "7"
    )
    assert (
        _our_metadata(TrainConfig(max_train_steps=12, lr_warmup_steps=0.25), NetworkConfig(), {})["ss_lr_warmup_steps"]
        == "0.25"
    )


def test_checkpoint_name_and_hashes_are_kohyas(checkpoint_file):
    """train_util.model_hash: sha256 of the 64 KiB at 1 MiB, first 8 hex digits; calculate_sha256: the whole file;
    ss_sd_model_name: the base name."""
    data = checkpoint_file.read_bytes()
    hashes = checkpoint_hashes(checkpoint_file)
    assert hashes.training_metadata() == {
        "sd_model_name": "sd_xl_base_1.0.safetensors",
        "sd_model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "new_sd_model_hash": hashlib.sha256(data).hexdigest(),
    }
    metadata = _our_metadata(TrainConfig(max_train_steps=12), NetworkConfig(), hashes.training_metadata())
    assert metadata["ss_sd_model_name"] == "sd_xl_base_1.0.safetensors"
    assert re.fullmatch(r"[0-9a-f]{8}", metadata["ss_sd_model_hash"])
    assert re.fullmatch(r"[0-9a-f]{64}", metadata["ss_new_sd_model_hash"])


def test_a_checkpoint_is_hashed_once_until_it_changes(checkpoint_file, monkeypatch):
    first = checkpoint_hashes(checkpoint_file)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert checkpoint_hashes(checkpoint_file) == first and opened == []
    checkpoint_file.write_bytes(b"x" * 10)  # replaced under the same name: another size and mtime
    os.utime(checkpoint_file, ns=(1, 1))
    changed = checkpoint_hashes(checkpoint_file)
    assert opened and changed.sha256 == hashlib.sha256(b"x" * 10).hexdigest()
    assert changed.model_hash == hashlib.sha256(b"").hexdigest()[:8]  # kohya reads nothing past the end
