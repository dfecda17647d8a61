"""A KohyaRun as the arguments of kohya sd-scripts' ``sdxl_train_network.py`` (its ``--config_file`` TOML).

kohya reads a config file by flattening its sections into one namespace and handing that to argparse WITHOUT type
conversion (library/train_util.read_config_from_file), so every value here already has the Python type kohya's
argument declares: int, float, str, bool for a store_true flag, a list of strings for network_args/optimizer_args.
A setting kohya has no argument for is listed in ``not_carried``; a setting kohya has but computes differently from
the pack is explained in ``notes``. Nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data.token_length import TokenLength
from ..network.config import NetworkConfig
from ..network.targets import SDXL_NUM_IN_OUT_BLOCKS, SDXL_NUM_MID_BLOCKS
from ..run.config import TrainConfig
from ..run.optimizers import KOHYA_OPTIMIZER_TYPES, optimizer_pip_name, parse_key_values, parse_optimizer_args
from .run import KohyaRun

#: the pack's sampler names -> kohya's --sample_sampler (kohya's k_* are the k-diffusion samplers ComfyUI uses)
SAMPLERS_FOR_KOHYA = {
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "heun": "heun",
    "dpm_2": "dpm_2",
    "dpm_2_ancestral": "dpm_2_a",
    "lms": "lms",
    "ddim": "ddim",
    "dpmpp_2m": "dpmsolver++",
}

#: the pack's save_precision -> kohya's --save_precision
SAVE_PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "fp32": "float"}

#: the pack's train_dtype -> kohya's --mixed_precision ("auto" is chosen on the target machine: bf16 is what every
#: GPU kohya's multi-GPU runs use computes natively; the note says so)
MIXED_PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "auto": "bf16"}


@dataclass
class KohyaArgs:
    """``args``: kohya argument name -> value of kohya's type. ``not_carried`` / ``notes``: what the user must know."""

    args: dict[str, Any] = field(default_factory=dict)
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _block_lr_args(weights: Sequence[float], out: KohyaArgs) -> dict[str, str]:
    """The 23 per-block lr weights as kohya's down/mid/up_lr_weight (kohya fixes the emb and out blocks at 1.0)."""
    n, n_mid = SDXL_NUM_IN_OUT_BLOCKS, SDXL_NUM_MID_BLOCKS
    if weights[0] != 1.0 or weights[-1] != 1.0:
        out.not_carried.append(
            f"block_lr_weight: the time-embedding/out block weights ({weights[0]}, {weights[-1]}) are not 1.0; kohya "
            "always trains those blocks at weight 1.0"
        )
    down, mid, up = weights[1 : 1 + n], weights[1 + n : 1 + n + n_mid], weights[1 + n + n_mid : 1 + 2 * n + n_mid]
    return {
        "down_lr_weight": ",".join(repr(float(w)) for w in down),
        "mid_lr_weight": ",".join(repr(float(w)) for w in mid),
        "up_lr_weight": ",".join(repr(float(w)) for w in up),
    }


def network_args(config: NetworkConfig, train: TrainConfig, out: KohyaArgs | None = None) -> list[str]:
    """kohya's --network_args "key=value" strings for ``config`` and the run's LoRA+ ratios."""
    return [f"{k}={v}" for k, v in network_args_dict(config, train, out).items()]


def network_args_dict(config: NetworkConfig, train: TrainConfig, out: KohyaArgs | None = None) -> dict[str, str]:
    """kohya's network_args as the key -> value strings kohya splits them into (``net_kwargs``, also what kohya
    writes as ss_network_args). ``out`` collects what kohya cannot carry (None: not asked)."""
    out = out if out is not None else KohyaArgs()
    args: dict[str, str] = {}
    if config.algo == "dora":  # LyCORIS's LoCon with weight decomposition, magnitude per input channel
        args.update(algo="locon", dora_wd="True", wd_on_output="False")
    elif config.algo != "lora":
        args["algo"] = config.algo
        if config.algo == "lokr":
            args["factor"] = str(config.factor)
    if config.conv_dim:
        args["conv_dim"] = str(config.conv_dim)
        args["conv_alpha"] = repr(float(1.0 if config.conv_alpha is None else config.conv_alpha))
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(config, name)
        if values is not None:
            args[name] = ",".join(str(v) if isinstance(v, int) else repr(float(v)) for v in values)
    if config.block_lr_weight is not None and config.module_dims is None:
        args.update(_block_lr_args(config.block_lr_weight, out))
    for name in ("rank_dropout", "module_dropout"):
        if getattr(config, name):
            args[name] = repr(float(getattr(config, name)))
    parts = train.part_settings()
    if train.loraplus_lr_ratio:
        args["loraplus_lr_ratio"] = repr(float(train.loraplus_lr_ratio))
    if parts["unet"].loraplus_lr_ratio != train.loraplus_lr_ratio and parts["unet"].loraplus_lr_ratio:
        args["loraplus_unet_lr_ratio"] = repr(float(parts["unet"].loraplus_lr_ratio))
    te_ratios = {parts["clip_l"].loraplus_lr_ratio, parts["clip_g"].loraplus_lr_ratio}
    if len(te_ratios) > 1:
        out.not_carried.append(
            "LoRA+ ratio per text encoder: CLIP-L and CLIP-G have different ratios; kohya has one "
            "loraplus_text_encoder_lr_ratio (the CLIP-L one is exported)"
        )
    te_ratio = parts["clip_l"].loraplus_lr_ratio
    if te_ratio and te_ratio != train.loraplus_lr_ratio:
        args["loraplus_text_encoder_lr_ratio"] = repr(float(te_ratio))
    return args


def _optimizer_args(text: str) -> list[str]:
    """The pack's optimizer_args string as kohya's list of "key=value" tokens (values kohya's literal_eval reads)."""
    return [f"{k}={v!r}" for k, v in parse_optimizer_args(text).items()]


def _network(run: KohyaRun, out: KohyaArgs) -> None:
    config, a = run.network, out.args
    a["network_module"] = "networks.lora" if config.algo == "lora" else "lycoris.kohya"
    a["network_dim"] = int(config.network_dim)
    a["network_alpha"] = float(config.network_alpha)
    if config.dropout:
        a["network_dropout"] = float(config.dropout)
    a["network_args"] = network_args(config, run.train, out)
    if not a["network_args"]:
        del a["network_args"]
    trained = (config.trains("unet"), config.trains("te1"), config.trains("te2"))
    if config.frozen_parts:
        labels = {"unet": "U-Net", "te1": "CLIP-L", "te2": "CLIP-G"}
        out.not_carried.append(
            f"{' + '.join(labels[p] for p in config.frozen_parts)} modules of the start_from file applied frozen: "
            "kohya drops the modules of a part it does not train (not applied while training, not saved)"
        )
    if trained == (True, False, False):
        a["network_train_unet_only"] = True
    elif trained == (False, True, True):
        a["network_train_text_encoder_only"] = True
    elif trained != (True, True, True):
        names = [n for n, on in zip(("U-Net", "CLIP-L", "CLIP-G"), trained, strict=True) if on]
        out.not_carried.append(
            f"train only {' + '.join(names)}: kohya trains the U-Net, both text encoders, the U-Net only or the text "
            "encoders only; the exported run trains "
            + ("the U-Net and both text encoders" if trained[0] else "both text encoders")
        )
        if not trained[0]:
            a["network_train_text_encoder_only"] = True
    if config.multiplier != 1.0:
        out.not_carried.append(f"network multiplier {config.multiplier}: kohya trains at multiplier 1.0")
    if run.network_weights:
        a["network_weights"] = run.network_weights
        a["dim_from_weights"] = True
    if config.algo != "lora":
        out.notes.append(
            f"algo {config.algo}: kohya runs it through LyCORIS's kohya wrapper (pip install lycoris-lora), which "
            "picks its own module set (its default preset); the pack trains kohya's LoRA module set"
        )


def _learning_rates(train: TrainConfig, out: KohyaArgs) -> None:
    a = out.args
    a["learning_rate"] = float(train.learning_rate)
    parts = train.part_settings()
    if train.unet.learning_rate is not None:
        a["unet_lr"] = float(parts["unet"].learning_rate)
    if train.clip_l.learning_rate is not None or train.clip_g.learning_rate is not None:
        a["text_encoder_lr"] = [float(parts["clip_l"].learning_rate)]  # kohya: nargs="*", the first is used
    if parts["clip_l"].learning_rate != parts["clip_g"].learning_rate:
        out.not_carried.append(
            f"separate CLIP-G learning rate {parts['clip_g'].learning_rate}: kohya's SDXL LoRA has one "
            f"text_encoder_lr (CLIP-L's {parts['clip_l'].learning_rate} is exported)"
        )


def _steps_or_ratio(value: float) -> int | float:
    """kohya's int_or_float arguments: a whole number of steps as int, a ratio below 1 as float."""
    return int(value) if float(value).is_integer() else float(value)


def _schedule(train: TrainConfig, out: KohyaArgs) -> None:
    a = out.args
    name = train.lr_scheduler
    if name == "rex":
        # kohya has no REX; its lr_scheduler_type imports any scheduler class: pytorch-optimizer's REXScheduler
        a["lr_scheduler"] = "constant"
        a["lr_scheduler_type"] = "pytorch_optimizer.lr_scheduler.rex.REXScheduler"
        lr = float(train.learning_rate)
        a["lr_scheduler_args"] = [
            f"total_steps={int(train.max_train_steps)}",
            f"max_lr={lr!r}",
            f"min_lr={lr * float(train.lr_scheduler_min_lr_ratio)!r}",
        ]
        out.not_carried.append(
            "lr_scheduler rex: kohya has no REX schedule; exported as pytorch-optimizer's REXScheduler "
            "(lr_scheduler_type), which gives every parameter group the same lr, runs its first step at min_lr and "
            "has no warmup"
            + (f" (lr_warmup_steps {train.lr_warmup_steps} is not carried)" if train.lr_warmup_steps else "")
        )
        return
    a["lr_scheduler"] = name
    if train.lr_warmup_steps:
        a["lr_warmup_steps"] = _steps_or_ratio(train.lr_warmup_steps)
    if train.lr_decay_steps:
        a["lr_decay_steps"] = _steps_or_ratio(train.lr_decay_steps)
    if train.lr_scheduler_min_lr_ratio:
        a["lr_scheduler_min_lr_ratio"] = float(train.lr_scheduler_min_lr_ratio)
    scheduler_args = [f"{k}={v!r}" for k, v in parse_key_values(train.lr_scheduler_args, "lr_scheduler_args").items()]
    if scheduler_args:
        a["lr_scheduler_args"] = scheduler_args


def _training(run: KohyaRun, out: KohyaArgs) -> None:
    train, a = run.train, out.args
    a["max_train_steps"] = int(train.max_train_steps)
    if train.max_train_epochs > 0:
        a["max_train_epochs"] = int(train.max_train_epochs)
    _learning_rates(train, out)
    optimizer = train.optimizer.canonical_type
    # kohya has short names for its own optimizers and imports any other from a class path
    a["optimizer_type"] = KOHYA_OPTIMIZER_TYPES.get(optimizer, optimizer)
    if optimizer in KOHYA_OPTIMIZER_TYPES or optimizer == "DAdaptAdam":
        package = optimizer_pip_name(optimizer)
        out.notes.append(
            f"optimizer {optimizer}: kohya imports it from the {package} package; install it into kohya's Python "
            f"(pip install {package})"
        )
    optimizer_args = _optimizer_args(train.optimizer.optimizer_args)
    if optimizer_args:
        a["optimizer_args"] = optimizer_args
    _schedule(train, out)
    if train.lr_scheduler_num_cycles != 1:
        a["lr_scheduler_num_cycles"] = int(train.lr_scheduler_num_cycles)
    if train.lr_scheduler_power != 1.0:
        a["lr_scheduler_power"] = float(train.lr_scheduler_power)
    a["gradient_accumulation_steps"] = int(train.gradient_accumulation_steps)
    a["max_grad_norm"] = float(train.max_grad_norm)
    if train.scale_weight_norms:
        a["scale_weight_norms"] = float(train.scale_weight_norms)
    a["seed"] = int(train.seed)
    a["mixed_precision"] = MIXED_PRECISIONS[train.train_dtype]
    if train.train_dtype == "auto":
        out.notes.append("train_dtype auto: exported as mixed_precision bf16 (change it for GPUs without bf16)")
    if train.full_bf16:
        a["full_bf16"] = True
    if train.gradient_checkpointing:
        a["gradient_checkpointing"] = True
    if train.memory_mode != "auto":
        out.not_carried.append(
            f"memory_mode {train.memory_mode}: kohya's SDXL LoRA training keeps the whole U-Net on each GPU "
            "(no weight streaming); give each process a GPU that holds it"
        )
    _token_length(train.token_length or TokenLength(), out)


def _token_length(token_length: TokenLength, out: KohyaArgs) -> None:
    if token_length.comfyui_chunking:
        out.not_carried.append(
            "max_token_length 'ComfyUI chunking': kohya has no such encoding; the exported run uses kohya's default "
            "(captions truncated to 75 tokens; max_token_length = 225 keeps up to 225)"
        )
    elif token_length.max_token_length is not None:
        out.args["max_token_length"] = int(token_length.max_token_length)


def _objective(run: KohyaRun, out: KohyaArgs) -> None:
    loss, noise, a = run.train.loss, run.train.noise, out.args
    a["loss_type"] = loss.loss_type
    if loss.loss_type in ("huber", "smooth_l1"):
        a["huber_schedule"] = loss.huber_schedule
        a["huber_c"] = float(loss.huber_c)
        a["huber_scale"] = float(loss.huber_scale)
    for name in ("min_snr_gamma", "v_pred_like_loss"):
        if getattr(loss, name) is not None:
            a[name] = float(getattr(loss, name))
    for name in ("scale_v_pred_loss_like_noise_pred", "debiased_estimation_loss"):
        if getattr(loss, name):
            a[name] = True
    if loss.prior_loss_weight != 1.0:
        a["prior_loss_weight"] = float(loss.prior_loss_weight)
    if run.v_parameterization:
        a["v_parameterization"] = True
    for name in ("noise_offset", "adaptive_noise_scale", "ip_noise_gamma"):
        if getattr(noise, name) is not None:
            a[name] = float(getattr(noise, name))
    for name in ("noise_offset_random_strength", "ip_noise_gamma_random_strength"):
        if getattr(noise, name):
            a[name] = True
    if noise.multires_noise_iterations is not None:
        a["multires_noise_iterations"] = int(noise.multires_noise_iterations)
        a["multires_noise_discount"] = float(noise.multires_noise_discount)
    for name in ("min_timestep", "max_timestep"):
        if getattr(noise, name) is not None:
            a[name] = int(getattr(noise, name))


def _caching(run: KohyaRun, out: KohyaArgs) -> None:
    caching, a = run.caching, out.args
    a["cache_latents"] = True
    if caching.latents_to_disk:
        a["cache_latents_to_disk"] = True
    if caching.vae_batch_size != 1:
        a["vae_batch_size"] = int(caching.vae_batch_size)
    if caching.float32_vae:
        a["no_half_vae"] = True
    if caching.text_encoder_outputs:
        a["cache_text_encoder_outputs"] = True
        if caching.text_encoder_outputs_to_disk:
            a["cache_text_encoder_outputs_to_disk"] = True


def _saving(run: KohyaRun, out: KohyaArgs) -> None:
    cp, a = run.checkpointing, out.args
    a["output_dir"] = "output"
    a["output_name"] = run.output_name
    a["save_model_as"] = "safetensors"
    a["save_precision"] = SAVE_PRECISIONS[run.save_precision]
    a["metadata_title"] = run.output_name
    if cp.save_every_n_steps:
        a["save_every_n_steps"] = int(cp.save_every_n_steps)
        if cp.keep_last_n:
            a["save_last_n_steps"] = int(cp.keep_last_n * cp.save_every_n_steps)
    if cp.save_every_n_epochs:
        a["save_every_n_epochs"] = int(cp.save_every_n_epochs)
        if cp.keep_last_n:
            a["save_last_n_epochs"] = int(cp.keep_last_n)
    if cp.save_state_every_n_steps:
        if cp.save_state_every_n_steps == cp.save_every_n_steps:
            a["save_state"] = True
        else:
            out.not_carried.append(
                f"save_state_every_n_steps {cp.save_state_every_n_steps}: kohya saves a state with every saved "
                "LoRA (--save_state), so states follow save_every_n_steps/epochs"
            )
    if cp.save_state_on_cancel:
        a["save_state_on_train_end"] = True
        out.notes.append(
            "save_state_on_cancel: kohya has no cancel; the exported run saves its state at the end of training "
            "(--save_state_on_train_end) so it can be continued with --resume"
        )
    if cp.resume_from:
        out.not_carried.append(
            f"resume_from {cp.resume_from}: the pack's resumable states are not accelerate states; kohya cannot "
            "resume from them (continue from the LoRA with the Network node's start_from instead)"
        )


def _previews(run: KohyaRun, out: KohyaArgs) -> None:
    previews, a = run.previews, out.args
    if previews is None:
        return
    a["sample_prompts"] = "sample_prompts.txt"
    if previews.every_n_steps:
        a["sample_every_n_steps"] = int(previews.every_n_steps)
    else:
        out.notes.append("previews only at the end: kohya samples at the end of training when sample_prompts is set")
    sampler = SAMPLERS_FOR_KOHYA.get(previews.sampler_name)
    if sampler is None:
        out.not_carried.append(
            f"preview sampler {previews.sampler_name!r}: kohya's samplers are diffusers schedulers; the exported "
            "run samples with euler_a"
        )
        sampler = "euler_a"
    a["sample_sampler"] = sampler
    if previews.scheduler != "normal":
        out.not_carried.append(
            f"preview scheduler {previews.scheduler!r}: kohya's samplers use their own sigma schedule"
        )


def sample_prompts_text(run: KohyaRun) -> str:
    """kohya's sample prompt file: one prompt per line with --n negative, --w/--h size, --s steps, --l cfg, --d seed."""
    p = run.previews
    if p is None:
        return ""
    lines = []
    for i, prompt in enumerate(p.prompts):
        negative = f" --n {p.negative}" if p.negative else ""
        lines.append(f"{prompt}{negative} --w {p.width} --h {p.height} --s {p.steps} --l {p.cfg} --d {p.seed + i}")
    return "\n".join(lines) + "\n"


def _validation(run: KohyaRun, out: KohyaArgs) -> None:
    """kohya's validation arguments; the split itself is in dataset.toml (validation_split per dataset)."""
    request, a = run.validation, out.args
    if request is None:
        return
    settings = request.settings
    for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "validation_seed"):
        value = getattr(settings, name)
        if value is not None:
            a[name] = int(value)
    if settings.validation_seed is not None:
        out.notes.append(
            "validation_seed: kohya also splits datasets that set no validation_seed of their own with it (the "
            "exported dataset.toml always sets one)"
        )
    if request.dataset is not None:
        out.not_carried.append(
            "the separate validation dataset of the 'Validation' node: kohya validates only on a validation_split "
            "of the training datasets"
        )


def to_kohya_args(run: KohyaRun) -> KohyaArgs:
    """Every setting of ``run`` as kohya arguments, plus what kohya cannot take and what it computes differently."""
    out = KohyaArgs()
    if run.checkpoint_path:
        out.args["pretrained_model_name_or_path"] = run.checkpoint_path
    if run.base_weights:
        out.args["base_weights"] = [path for path, _ in run.base_weights]
        out.args["base_weights_multiplier"] = [float(strength) for _, strength in run.base_weights]
    _network(run, out)
    _training(run, out)
    _objective(run, out)
    _caching(run, out)
    _saving(run, out)
    _previews(run, out)
    _validation(run, out)
    out.args["dataset_config"] = "dataset.toml"
    out.args["sdpa"] = True
    out.args["logging_dir"] = "logs"
    return out
