"""kohya sd-scripts training settings -> the pack's settings: a ``--config_file`` TOML, or a LoRA's ss_* metadata.

Every key is accounted for: either applied to a setting (``applied``) or named with the reason it is not and where
the graph sets it instead (``not_applied``). Keys that are absent take kohya's defaults, not the pack's (kohya's
learning_rate is 2e-6 and gradient checkpointing is off unless asked for), so the imported run is the kohya run.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from ..data.images import DatasetError
from ..data.text_files import read_utf8
from ..data.token_length import TokenLength
from ..network.config import KOHYA_NETWORK_ARGS, LoraPlusRatios, NetworkConfig, PartSettings
from ..objective.loss_weighting import LossSettings
from ..objective.noise import NoiseSettings
from ..run.checkpoints import CheckpointSettings
from ..run.config import TrainConfig
from ..run.optimizers import OptimizerSettings, canonical_optimizer_type
from ..run.validation import ValidationSettings
from .config_export import MIXED_PRECISIONS

#: kohya's defaults for the keys whose default differs from the pack's (train_util.add_training_arguments)
KOHYA_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "gradient_checkpointing": False,
    "mixed_precision": "no",
    "network_alpha": 1.0,
    "lr_scheduler": "constant",
}

#: keys that choose files, folders or machine resources: the graph (or ComfyUI) decides them
_WHERE_THE_GRAPH_SETS_IT: dict[str, str] = {
    "pretrained_model_name_or_path": "the MODEL/CLIP/VAE come from the graph's checkpoint loader",
    "vae": "the VAE comes from the graph",
    "v_parameterization": "the MODEL's own prediction type decides (Load Checkpoint)",
    "dataset_config": "load it with the 'Dataset from kohya TOML' node",
    "train_data_dir": "use 'Images from Folder' on that folder",
    "reg_data_dir": "set reg_folder on 'Images from Folder' (or a reg subset in a kohya TOML)",
    "masked_loss": "the dataset decides: a mask folder, alpha_mask or a MASK input on the image nodes (or "
    "conditioning_data_dir / alpha_mask in a kohya TOML); images with a mask train masked",
    "in_json": "use 'Dataset from kohya TOML' with a metadata_file subset",
    "resolution": "set it on 'Buckets & Captions' (or in the dataset TOML)",
    "output_dir": "LoRAs are saved in ComfyUI's loras folder (the Train node's output_subfolder)",
    "logging_dir": "the Train node writes its logs next to the LoRA",
    "network_weights": "choose the file in the Network node's start_from",
    "dim_from_weights": "the Network node's start_from reads dims from the file",
    "cache_latents": "the pack always caches latents ('Cache Latents')",
    "cache_latents_to_disk": "set cache_to_disk on 'Cache Latents'",
    "vae_batch_size": "set batch_size on 'Cache Latents'",
    "no_half_vae": "set float32_vae on 'Cache Latents'",
    "cache_text_encoder_outputs": "'Cache Text' caches every fixed caption",
    "cache_text_encoder_outputs_to_disk": "set cache_to_disk on 'Cache Text'",
    "sample_prompts": "write the prompts into 'Sample Previews'",
    "sample_every_n_steps": "set every_n_steps on 'Sample Previews'",
    "sample_sampler": "choose the sampler on 'Sample Previews'",
    "sample_at_first": "'Sample Previews' renders during and at the end of training",
    "sdpa": "ComfyUI chooses the attention kernel (its --use-* flags)",
    "xformers": "ComfyUI chooses the attention kernel (its --use-* flags)",
    "mem_eff_attn": "ComfyUI chooses the attention kernel (its --use-* flags)",
    "lowram": "ComfyUI manages memory (its --lowvram/--novram flags)",
    "highvram": "ComfyUI manages memory (its --highvram flag)",
    "max_data_loader_n_workers": "batches come from the in-memory caches: no data loader workers",
    "persistent_data_loader_workers": "batches come from the in-memory caches: no data loader workers",
    "metadata_title": "the LoRA's title is its output_name",
    "resume": "continue from the LoRA file (start_from) or from a state of the pack ('Save Every N & Resume')",
    "config_file": "this file",
    "output_name": "set output_name on the Train node",
    "save_precision": "set save_precision on the Train node",
    "save_model_as": "the pack saves .safetensors",
    "validation_split": "set validation_split on 'Buckets & Captions' (or in the dataset TOML): it is a dataset "
    "setting in the graph",
}

#: keys of kohya features this pack does not have
_NOT_SUPPORTED: dict[str, str] = {
    "full_fp16": "train_dtype fp16 keeps the LoRA in fp32 with a gradient scaler; full fp16 is not offered",
    "fp8_base": "ComfyUI loads the MODEL in the dtype it chooses (--fp8_e4m3fn-unet and friends)",
    "fp8_base_unet": "ComfyUI loads the MODEL in the dtype it chooses (--fp8_e4m3fn-unet and friends)",
    "clip_skip": "SDXL uses CLIP-L's penultimate layer; other clip_skip values are not offered",
    "zero_terminal_snr": "not offered",
    "weighted_captions": "not offered (captions are escaped so '(word:1.2)' is plain text)",
    "torch_compile": "not offered",
    "deepspeed": "single-process training inside ComfyUI",
    "fused_backward_pass": "not offered",
    "lr_scheduler_type": "only the built-in schedules",
    "lr_scheduler_timescale": "only the built-in schedules",
    "log_with": "the Train node writes CSV/JSONL logs",
    "base_weights": "merge base LoRAs with a LoraLoader before training",
    "base_weights_multiplier": "merge base LoRAs with a LoraLoader before training",
}

_IGNORED_WHEN_DEFAULT = {"no_metadata": False, "log_config": False}


class KohyaConfigError(ValueError):
    """A kohya setting names something the pack cannot train (the message names the key, the value and the fix)."""


@dataclass
class KohyaImport:
    """The pack's settings read from a kohya run, with an account of every key."""

    network: NetworkConfig
    train: TrainConfig
    checkpointing: CheckpointSettings
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    source: str = ""
    #: kohya's loraplus_* network_args, also in ``train``'s part settings: the Network output carries them too,
    #: so a graph that takes only the imported network trains with the same LoRA+
    loraplus: LoraPlusRatios = LoraPlusRatios()
    applied: list[str] = field(default_factory=list)
    not_applied: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"kohya settings from {self.source}: {len(self.applied)} applied"]
        lines.extend(f"  {key}" for key in self.applied)
        if self.not_applied:
            lines.append(f"{len(self.not_applied)} not applied:")
            lines.extend(f"  {key}: {why}" for key, why in self.not_applied)
        return "\n".join(lines)


def read_kohya_config_file(path: str | Path) -> dict[str, Any]:
    """A kohya ``--config_file`` as kohya reads it: every section's keys flattened into one table."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"kohya config {path} does not exist; give the path of the .toml file.")
    try:
        data = tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as e:
        raise DatasetError(f"{path}: not valid TOML ({e}); fix the syntax.") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


# --- ss_* metadata ------------------------------------------------------------------------------------------------

#: ss_* metadata keys whose kohya argument has another name
_METADATA_RENAMES = {"debiased_estimation": "debiased_estimation_loss", "optimizer": "optimizer_type"}

#: ss_* metadata that describes the run rather than setting it
_METADATA_DESCRIPTIVE = {
    "session_id", "training_started_at", "training_finished_at", "output_name", "num_train_images", "num_reg_images",
    "num_batches_per_epoch", "num_epochs", "epoch", "steps", "batch_size_per_device", "total_batch_size",
    "dataset_dirs", "reg_dataset_dirs", "tag_frequency", "bucket_info", "resolution", "enable_bucket",
    "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "keep_tokens", "shuffle_caption", "flip_aug",
    "color_aug", "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
    "face_crop_aug_range", "sd_model_name", "sd_model_hash", "new_sd_model_hash", "new_vae_hash", "vae_name",
    "vae_hash", "sd_scripts_commit_hash", "cache_latents", "training_comment", "v2", "base_model_version",
    "sd_vae_name", "sd_vae_hash", "new_sd_vae_hash", "datasets", "num_validation_images",
}  # fmt: skip


def _literal(text: str) -> Any:
    """A metadata string as the value kohya wrote with str(): "True", "None", "0.0001", "(1024, 1024)", "abc"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def args_from_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """kohya arguments from a LoRA's ss_* metadata (descriptive keys such as counts and hashes are left out)."""
    args: dict[str, Any] = {}
    for key, text in metadata.items():
        if not key.startswith("ss_"):
            continue
        name = key[3:]
        if name in _METADATA_DESCRIPTIVE:
            continue
        name = _METADATA_RENAMES.get(name, name)
        if name == "network_args":
            parsed = json.loads(text) if text not in ("", "None") else {}
            args[name] = [f"{k}={v}" for k, v in parsed.items()]
        elif name == "optimizer_type":
            cls_path, _, rest = text.partition("(")
            args[name] = cls_path.rsplit(".", 1)[-1]
            if rest:
                args["optimizer_args"] = [rest[:-1]] if rest.endswith(")") else [rest]
        else:
            value = _literal(text)
            if value is not None:
                args[name] = value
    return args


# --- the mapping --------------------------------------------------------------------------------------------------


class _Keys:
    """The kohya arguments being read; records which were used."""

    def __init__(self, args: Mapping[str, Any]) -> None:
        self.args = dict(args)
        self.used: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.args:
            if key not in self.used:
                self.used.append(key)
            value = self.args[key]
            return default if value is None else value
        return KOHYA_DEFAULTS.get(key, default)

    def has(self, key: str) -> bool:
        return self.args.get(key) is not None


def _as_float_or_none(v: Any) -> float | None:
    return None if v in (None, "", "None") else float(v)


def _true(value: Any) -> bool:
    """A LyCORIS boolean network_arg as LyCORIS's str_bool reads it: anything but "false" (any case) is true."""
    return str(value).strip().lower() != "false"


def _network(keys: _Keys, not_applied: list[tuple[str, str]]) -> tuple[NetworkConfig, dict[str, float]]:
    module = keys.get("network_module", "networks.lora")
    raw_args = keys.get("network_args", []) or []
    if isinstance(raw_args, str):
        raw_args = [raw_args]
    network_args: dict[str, str] = {}
    for token in raw_args:
        k, sep, v = str(token).partition("=")
        if not sep:
            raise KohyaConfigError(f"network_args: {token!r} is not key=value")
        network_args[k.strip()] = v.strip()
    loraplus = {k: float(network_args.pop(k)) for k in list(network_args) if k.startswith("loraplus_")}
    # kohya's train_network copies --network_dropout into network_args as "dropout" (for LyCORIS, which reads its
    # dropout there), so ss_network_args holds it; it is the network dropout, not an argument of its own
    args_dropout = _as_float_or_none(network_args.pop("dropout", None))
    if module == "networks.lora":
        algo = "lora"
    elif module == "lycoris.kohya":
        algo = network_args.pop("algo", "lora")
        dora = _true(network_args.pop("dora_wd", "False"))
        on_output = _true(network_args.pop("wd_on_output", "True"))
        if algo in ("lora", "locon") and dora:
            if on_output:
                raise KohyaConfigError(
                    "network_args dora_wd=True with wd_on_output=True (LyCORIS's default): ComfyUI's LoraLoader "
                    "normalises an output-axis DoRA by the norm of the base weight alone, so such a file does not "
                    "load as it was trained; the pack trains DoRA with wd_on_output=False. Set wd_on_output=False."
                )
            algo = "dora"
        elif dora:
            raise KohyaConfigError(f"network_args dora_wd=True with algo={algo!r}: the pack's DoRA is algo=locon")
        if algo not in ("loha", "lokr", "dora"):
            raise KohyaConfigError(
                f"network_args algo={algo!r} (lycoris.kohya): the pack trains LyCORIS loha, lokr and locon with "
                "dora_wd=True (DoRA); use one of them, or network_module networks.lora"
            )
    else:
        raise KohyaConfigError(
            f"network_module {module!r}: the pack trains networks.lora (kohya LoRA) and lycoris.kohya (loha, lokr)"
        )
    factor = int(network_args.pop("factor", -1))
    for k in list(network_args):
        if k not in KOHYA_NETWORK_ARGS:
            not_applied.append((f"network_args {k}", f"not an argument of the pack's {algo} network"))
            del network_args[k]
    config = NetworkConfig.from_kohya_kwargs(
        keys.get("network_dim", 4),
        keys.get("network_alpha"),
        _as_float_or_none(keys.get("network_dropout")) if keys.has("network_dropout") else args_dropout,
        train_unet=not keys.get("network_train_text_encoder_only", False),
        train_te1=not keys.get("network_train_unet_only", False),
        train_te2=not keys.get("network_train_unet_only", False),
        **network_args,
    )
    if algo != "lora":
        config = replace(config, algo=algo, factor=factor)
    return config, loraplus


def _key_value_list(raw: Any) -> str:
    """kohya's nargs="*" key=value arguments (a list, or one string in a TOML) as the pack's one string."""
    return " ".join(raw) if isinstance(raw, list) else str(raw or "")


def _optimizer(keys: _Keys) -> OptimizerSettings:
    name = keys.get("optimizer_type", "") or ""
    adam8, lion = keys.get("use_8bit_adam", False), keys.get("use_lion_optimizer", False)
    if not name:  # kohya's older flags choose the optimizer when optimizer_type is empty
        name = "AdamW8bit" if adam8 else "Lion" if lion else "AdamW"
    try:
        canonical = canonical_optimizer_type(name)
    except ValueError as e:
        raise KohyaConfigError(f"optimizer_type {name!r}: {e}") from None
    return OptimizerSettings(canonical, _key_value_list(keys.get("optimizer_args", [])))


def _train(keys: _Keys, loraplus: dict[str, float]) -> TrainConfig:
    te_lr = keys.get("text_encoder_lr")
    if isinstance(te_lr, list):
        te_lr = te_lr[0] if te_lr else None
    te_ratio = loraplus.get("loraplus_text_encoder_lr_ratio")
    mixed = keys.get("mixed_precision", "no")
    train_dtype = {v: k for k, v in MIXED_PRECISIONS.items() if k != "auto"}.get(mixed)
    if train_dtype is None:
        raise KohyaConfigError(f"mixed_precision {mixed!r}: one of no, fp16, bf16")
    warmup = keys.get("lr_warmup_steps", 0)
    return TrainConfig(
        max_train_steps=int(keys.get("max_train_steps", 1600)),
        max_train_epochs=int(keys.get("max_train_epochs", 0) or 0),
        learning_rate=float(keys.get("learning_rate")),
        loraplus_lr_ratio=loraplus.get("loraplus_lr_ratio"),
        unet=PartSettings(_as_float_or_none(keys.get("unet_lr")), loraplus.get("loraplus_unet_lr_ratio")),
        clip_l=PartSettings(_as_float_or_none(te_lr), te_ratio),
        clip_g=PartSettings(_as_float_or_none(te_lr), te_ratio),
        optimizer=_optimizer(keys),
        lr_scheduler=str(keys.get("lr_scheduler", "constant")),
        lr_warmup_steps=warmup,
        lr_scheduler_num_cycles=int(keys.get("lr_scheduler_num_cycles", 1)),
        lr_scheduler_power=float(keys.get("lr_scheduler_power", 1.0)),
        lr_decay_steps=keys.get("lr_decay_steps", 0),
        lr_scheduler_min_lr_ratio=float(keys.get("lr_scheduler_min_lr_ratio", 0.0)),
        lr_scheduler_args=_key_value_list(keys.get("lr_scheduler_args", [])),
        gradient_accumulation_steps=int(keys.get("gradient_accumulation_steps", 1)),
        max_grad_norm=float(keys.get("max_grad_norm", 1.0)),
        scale_weight_norms=_as_float_or_none(keys.get("scale_weight_norms")),
        seed=int(keys.get("seed", 42)),
        train_dtype=train_dtype,
        full_bf16=bool(keys.get("full_bf16", False)),
        gradient_checkpointing=bool(keys.get("gradient_checkpointing")),
        token_length=_token_length(keys),
        loss=LossSettings(
            loss_type=keys.get("loss_type", "l2"),
            huber_schedule=keys.get("huber_schedule", "snr"),
            huber_c=float(keys.get("huber_c", 0.1)),
            huber_scale=float(keys.get("huber_scale", 1.0)),
            min_snr_gamma=_as_float_or_none(keys.get("min_snr_gamma")),
            scale_v_pred_loss_like_noise_pred=bool(keys.get("scale_v_pred_loss_like_noise_pred", False)),
            v_pred_like_loss=_as_float_or_none(keys.get("v_pred_like_loss")),
            debiased_estimation_loss=bool(keys.get("debiased_estimation_loss", False)),
            prior_loss_weight=float(keys.get("prior_loss_weight", 1.0)),
        ),
        noise=NoiseSettings(
            noise_offset=_as_float_or_none(keys.get("noise_offset")),
            noise_offset_random_strength=bool(keys.get("noise_offset_random_strength", False)),
            adaptive_noise_scale=_as_float_or_none(keys.get("adaptive_noise_scale")),
            multires_noise_iterations=keys.get("multires_noise_iterations"),
            multires_noise_discount=float(keys.get("multires_noise_discount", 0.3)),
            min_timestep=keys.get("min_timestep"),
            max_timestep=keys.get("max_timestep"),
            ip_noise_gamma=_as_float_or_none(keys.get("ip_noise_gamma")),
            ip_noise_gamma_random_strength=bool(keys.get("ip_noise_gamma_random_strength", False)),
        ),
    )


def _token_length(keys: _Keys) -> TokenLength:
    """kohya's max_token_length (absent: kohya's 75 tokens); 'Cache Text' must encode with the same one."""
    value = keys.get("max_token_length")
    try:
        return TokenLength(None if value is None else int(value))
    except (TypeError, ValueError):
        raise KohyaConfigError(f"max_token_length {value!r}: kohya takes 150 or 225 (or none: 75 tokens)") from None


def _checkpointing(keys: _Keys) -> CheckpointSettings:
    every_steps = int(keys.get("save_every_n_steps", 0) or 0)
    every_epochs = int(keys.get("save_every_n_epochs", 0) or 0)
    keep = 0
    if every_steps and keys.has("save_last_n_steps"):
        keep = max(1, int(keys.get("save_last_n_steps")) // every_steps)
    elif every_epochs and keys.has("save_last_n_epochs"):
        keep = int(keys.get("save_last_n_epochs"))
    save_state = bool(keys.get("save_state", False))
    return CheckpointSettings(
        save_every_n_steps=every_steps,
        save_every_n_epochs=every_epochs,
        keep_last_n=keep,
        save_state_every_n_steps=every_steps if save_state else 0,
        save_state_on_cancel=bool(keys.get("save_state_on_train_end", False)),
    )


def _validation(keys: _Keys) -> ValidationSettings:
    """kohya's validation arguments (validation_split is the dataset's, see _WHERE_THE_GRAPH_SETS_IT)."""

    def count(key: str) -> int | None:
        value = keys.get(key)
        return None if value is None else int(value)

    if not keys.args.get("validation_split"):
        keys.get("validation_split")  # 0 or unset: no validation images, nothing the graph must do

    return ValidationSettings(
        validate_every_n_steps=count("validate_every_n_steps"),
        validate_every_n_epochs=count("validate_every_n_epochs"),
        max_validation_steps=count("max_validation_steps"),
        validation_seed=count("validation_seed"),
    )


def from_kohya_args(args: Mapping[str, Any], source: str = "kohya settings") -> KohyaImport:
    """The pack's settings for kohya arguments ``args`` (absent keys: kohya's defaults)."""
    keys = _Keys(args)
    not_applied: list[tuple[str, str]] = []
    network, loraplus = _network(keys, not_applied)
    train = _train(keys, loraplus)
    checkpointing = _checkpointing(keys)
    validation = _validation(keys)
    for key in keys.args:
        if key in keys.used:
            continue
        value = keys.args[key]
        if key in _WHERE_THE_GRAPH_SETS_IT:
            not_applied.append((key, f"{_WHERE_THE_GRAPH_SETS_IT[key]} (kohya's value: {value!r})"))
        elif key in _NOT_SUPPORTED:
            not_applied.append((key, f"{_NOT_SUPPORTED[key]} (kohya's value: {value!r})"))
        elif key in _IGNORED_WHEN_DEFAULT and keys.args[key] == _IGNORED_WHEN_DEFAULT[key]:
            keys.used.append(key)
        elif keys.args[key] in (None, False, "", []):
            keys.used.append(key)  # an unset option: nothing to apply
        else:
            not_applied.append((key, f"not an argument this pack knows (kohya's value: {value!r})"))
    return KohyaImport(
        loraplus=LoraPlusRatios(
            loraplus.get("loraplus_lr_ratio"),
            loraplus.get("loraplus_unet_lr_ratio"),
            loraplus.get("loraplus_text_encoder_lr_ratio"),
        ),
        network=network,
        train=train,
        checkpointing=checkpointing,
        validation=validation,
        source=source,
        applied=list(keys.used),
        not_applied=not_applied,
    )
