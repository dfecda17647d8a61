"""One training run on ComfyUI's loaded SDXL: network, optimizer, data, loop, in the right context.

The train node calls ``train``. Everything ComfyUI-specific goes through trainer/comfyui/;
the math lives in objective/loop/noise/loss modules. The run happens inside
``torch.inference_mode(False)`` (ComfyUI executes every node under inference mode), with the
frozen weights made trainable-through, LoRA hooks attached and gradient checkpointing on, all of
which are undone on exit, also on error or cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..cache.text import encode_caption
from ..comfyui import kernels as comfy_kernels
from ..comfyui import models as comfy_models
from ..comfyui import training as comfy_training
from ..data.dataset import TrainingDataset
from ..data.token_length import TokenLength
from ..network import build_network
from ..network.base import AdapterNetwork
from ..network.config import NetworkConfig
from ..objective.ddpm_schedule import DDPMSchedule
from ..objective.loss_weighting import LossSettings
from .batch_loader import CachedBatchSource, LatentSource, TextSource
from .config import DTYPES, TrainConfig
from .ema import AdapterEma, EmaSettings
from .events import RunEvents
from .loop import LoopSettings, LoopState, run
from .optimizers import build_optimizer, optimizer_eval_mode
from .schedulers import build_scheduler


@dataclass
class TrainResult:
    network: AdapterNetwork
    state: LoopState
    models: Any  # comfyui.training.TrainingModels: the MODEL/CLIP the run trains through (previews sample with them)
    total_steps: int
    steps_per_epoch: int
    prediction_type: str
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    group_names: list[str] = field(default_factory=list)
    ema: AdapterEma | None = None  # the averaged weights, when the run keeps an EMA
    train_dtype: str = "fp32"  # what "auto" resolved to
    token_length: TokenLength = field(default_factory=TokenLength)  # how captions were / are encoded
    notes: list[str] = field(default_factory=list)  # what the run changed or chose, for the report


class ComfyDenoiser:
    """The objective's Denoiser over a ComfyUI MODEL: raw U-Net output in the training dtype.

    Asks ComfyUI to have the MODEL loaded before every forward: a no-op while it is, a reload after a preview or a
    live caption encode made ComfyUI evict some of it on a small GPU.
    """

    def __init__(self, model: Any, dtype: torch.dtype) -> None:
        self.model = model
        self.dtype = dtype
        self.prediction_type = comfy_models.prediction_type(model)
        self.latent_scale = comfy_models.latent_scale_factor(model)
        self.device = model.load_device

    def __call__(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        comfy_training.load_for_training(self.model)
        return comfy_models.unet_forward(self.model, noisy_latents, timesteps, context, y, self.dtype)


def live_text_encoder(
    clip: Any, with_grad: bool, token_length: TokenLength | None = None
) -> Callable[[list[str]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Encode literal captions now, with the run's token layout: random captions (frozen encoders), or text-encoder
    training (``with_grad``)."""
    token_length = token_length or TokenLength()

    def encode(captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        with torch.set_grad_enabled(with_grad):
            for text in captions:
                ctx, pooled = encode_caption(clip, text, token_length)
                out.append((ctx.float(), pooled.float()))
        return out

    return encode


def _normal_tensors(obj: Any) -> Any:
    """Copies of inference tensors (made under ComfyUI's inference mode) that autograd/optimizers may update."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.is_inference() else obj
    if isinstance(obj, dict):
        return {k: _normal_tensors(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_normal_tensors(v) for v in obj]
    return obj


def _dataset_loss_notes(dataset: TrainingDataset, loss: LossSettings) -> list[str]:
    """What masks and reg images do to this run's loss, for the report (a setting without effect is said too)."""
    counts = dataset.image_counts()
    notes = []
    if counts["masked_images"]:
        notes.append(f"masked loss: {counts['masked_images']} of {len(dataset.images)} images have a loss mask")
    if counts["reg_images"]:
        notes.append(
            f"regularization images: {counts['reg_images']}, their loss weighted by prior_loss_weight "
            f"{loss.prior_loss_weight:g}"
        )
    elif loss.prior_loss_weight != 1.0:
        notes.append(
            f"prior_loss_weight {loss.prior_loss_weight:g} has no effect: the dataset has no regularization images"
        )
    return notes


def train(
    model: Any,
    clip: Any,
    dataset: TrainingDataset,
    latents: LatentSource,
    text: TextSource | None,
    network_config: NetworkConfig,
    config: TrainConfig,
    *,
    initial_weights: dict | None = None,
    resume: dict | None = None,
    events: RunEvents | None = None,
    ema: EmaSettings | None = None,
) -> TrainResult:
    """Train a LoRA on ``model`` (and ``clip``). ``resume`` = trainer/run/resume_state.load_state output.

    ``events`` hears about the run (see trainer/run/events.py): it gets the TrainResult when training starts,
    inside the training context (LoRA attached), is told after every optimizer step (the state is then complete,
    so it can save the LoRA or a resumable state) and once after the last step. ``ema``: keep an EMA of the
    weights (trainer/run/ema.py), updated after each optimizer step before ``events`` hears of it.
    """
    events = events or RunEvents()
    comfy_models.require_sdxl(model)
    train_te = network_config.train_te1 or network_config.train_te2
    loss_settings = replace(config.loss, v_parameterization=comfy_models.prediction_type(model) == "v_prediction")
    loss_settings.validate()
    schedule = DDPMSchedule(zero_terminal_snr=comfy_models.zero_terminal_snr(model))

    steps_per_epoch = dataset.steps_per_epoch(config.gradient_accumulation_steps)
    total = config.total_steps(dataset)
    if total < 1:
        raise ValueError("Set max_train_steps or max_train_epochs to at least 1.")
    if train_te and clip is None:
        raise ValueError("Training the text encoders needs the CLIP input connected.")
    if ema is not None and ema.start_step > total:
        raise ValueError(
            f"EMA start_step {ema.start_step} is after the run's last step ({total}): nothing would be averaged. "
            "Lower start_step or train longer."
        )
    token_length = config.resolve_token_length(text.token_length if text is not None else None)
    trained = (
        ("unet", network_config.train_unet),
        ("clip_l", network_config.train_te1),
        ("clip_g", network_config.train_te2),
    )
    no_learning = config.zero_learning_rate_error([part for part, on in trained if on])
    if no_learning:
        raise ValueError(no_learning)

    with torch.inference_mode(False), comfy_training.training_models(model, clip, train_te) as models:
        device = models.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the report gives this run's peak
        train_dtype = comfy_training.resolve_train_dtype(config.train_dtype, device)
        if config.full_bf16 and train_dtype != "bf16":
            raise ValueError(
                f"full_bf16 needs bf16; train_dtype auto chose {train_dtype} for {device}. Set "
                "train_dtype to bf16 explicitly, or turn full_bf16 off."
            )
        dtype = DTYPES[train_dtype]
        network = build_network(models.model, models.clip, network_config, config.seed, initial_weights)
        network.to(device, torch.bfloat16 if config.full_bf16 else torch.float32)
        network.train()
        groups, group_names = network.param_groups(**config.part_settings())
        optimizer = build_optimizer(groups, config.optimizer, config.learning_rate, max_grad_norm=config.max_grad_norm)
        scheduler = build_scheduler(
            optimizer,
            config.lr_scheduler,
            max_train_steps=total,
            warmup_steps=config.lr_warmup_steps,
            num_cycles=config.lr_scheduler_num_cycles,
            power=config.lr_scheduler_power,
            initial_lr=config.learning_rate,
        )
        scaler = torch.amp.GradScaler(device.type) if train_dtype == "fp16" else None
        averages = AdapterEma(network, ema) if ema is not None else None
        state = None
        if resume is not None:
            resume = _normal_tensors(resume)  # read inside the node, i.e. under inference mode
            network.load_kohya(resume["network"])
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None and resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler") is not None:
                scaler.load_state_dict(resume["scaler"])
            if averages is not None:
                saved_ema = resume.get("ema")
                if saved_ema is None:
                    raise ValueError("the resumed state has no EMA weights; resume it without the EMA input")
                averages.load_state(saved_ema["tensors"], saved_ema["updates"])
            state = resume["loop"]

        needs_clip = train_te or text is None or any(i.caption_options.is_random for i in dataset.images)
        encoder = None
        if clip is not None:
            encoder = live_text_encoder(models.clip, with_grad=train_te, token_length=token_length)
        source = CachedBatchSource(
            dataset, latents, text, encoder, config.seed, total, train_text_encoder=train_te, device=device
        )
        if not needs_clip:
            comfy_training.free_other_models()
        comfy_training.load_for_training(models.model)
        unet = comfy_models.diffusion_model(models.model)
        text_encoders = list(comfy_models.text_encoders(models.clip)) if train_te else []
        params = [p for g in groups for p in g["params"]]
        result = TrainResult(
            network=network,
            state=state if state is not None else LoopState(),
            models=models,
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            prediction_type=comfy_models.prediction_type(model),
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            group_names=group_names,
            train_dtype=train_dtype,
            ema=averages,
            token_length=token_length,
        )
        result.notes.extend(_dataset_loss_notes(dataset, loss_settings))
        with contextlib.ExitStack() as stack:
            stack.enter_context(comfy_training.training_flag())
            kernel = stack.enter_context(comfy_kernels.differentiable_attention())
            if stack.enter_context(comfy_training.full_precision_accumulation()):
                result.notes.append("fp16 accumulation (--fast fp16_accumulation) was switched off while training")
            if stack.enter_context(comfy_kernels.differentiable_layers(unet, *text_encoders)):
                result.notes.append("cublas_ops layers (--fast cublas_ops) trained through ComfyUI's plain path")
            if train_te:
                stack.enter_context(comfy_kernels.differentiable_text_encoders(*text_encoders))
            stack.enter_context(comfy_kernels.gradient_checkpointing(unet, config.gradient_checkpointing))
            stack.enter_context(network.attach())
            result.notes.append(f"trained on {device} in {train_dtype} with {kernel}")
            result.notes.append(f"captions: {token_length.describe()}")
            events.training_started(result)
            try:
                result.state = run(
                    ComfyDenoiser(models.model, dtype),
                    source,
                    params,
                    optimizer,
                    scheduler,
                    LoopSettings(
                        max_train_steps=total,
                        gradient_accumulation_steps=config.gradient_accumulation_steps,
                        max_grad_norm=config.max_grad_norm,
                        scale_weight_norms=config.scale_weight_norms,
                        seed=config.seed,
                    ),
                    schedule,
                    config.noise,
                    loss_settings,
                    state=result.state,
                    events=events,
                    max_norm=network.apply_max_norm,
                    scaler=scaler,
                    after_optimizer_step=averages.after_step if averages is not None else None,
                )
                if not result.state.interrupted:
                    events.training_finished()
            finally:
                optimizer_eval_mode(optimizer)
        network.eval()
        if device.type == "cuda":
            result.notes.append(
                f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved"
            )
        finite = torch.stack([p.detach().float().abs().max() for p in params]).isfinite().all()
        if not bool(finite.cpu()):
            raise RuntimeError("The LoRA weights are not finite after training; nothing was saved.")
        return result
