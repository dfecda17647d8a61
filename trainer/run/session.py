"""One training run on ComfyUI's loaded SDXL: network, optimizer, data, loop, in the right context.

The train node calls ``train``. Everything ComfyUI-specific goes through trainer/comfyui/;
the math lives in objective/loop/noise/loss modules. The run happens inside
``torch.inference_mode(False)`` (ComfyUI executes every node under inference mode), with the
frozen weights made trainable-through, LoRA hooks attached and gradient checkpointing on, all of
which are undone on exit, also on error or cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
from .host_memory import release_freed_memory
from .loop import LoopSettings, LoopState, run
from .memory_plan import MemoryPlan, StepShape, activation_bytes, largest_step_shape
from .memory_plan import plan as memory_plan_of
from .optimizers import build_optimizer, switch_to_averaged_weights
from .schedulers import build_scheduler
from .validation import ValidationRequest, ValidationSettings, Validator, validation_source


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
    # a schedule-free optimizer's exact training point once the run switched it to its averaged weights (what a
    # resumable state saved after training must hold; optimizers.training_point)
    training_point: list[torch.Tensor] | None = None
    memory_plan: MemoryPlan | None = None


class ComfyDenoiser:
    """The objective's Denoiser over a ComfyUI MODEL: raw U-Net output in the training dtype.

    Asks ComfyUI to have the MODEL loaded before every forward: a no-op while it is, a reload after a preview or a
    live caption encode made ComfyUI evict some of it on a small GPU.
    """

    def __init__(self, model: Any, dtype: torch.dtype, placement: Placement | None = None) -> None:
        self.model = model
        self.dtype = dtype
        self.placement = placement or Placement()
        self.prediction_type = comfy_models.prediction_type(model)
        self.latent_scale = comfy_models.latent_scale_factor(model)
        self.device = model.load_device

    def __call__(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        self.placement.load(self.model)
        return comfy_models.unet_forward(self.model, noisy_latents, timesteps, context, y, self.dtype)


@dataclass(frozen=True)
class Placement:
    """What ComfyUI is told when it loads the U-Net for training: the memory plan's step (kept free) and the
    run's memory_mode."""

    memory_required: int = 0
    mode: str = "auto"
    weights: int = 0  # the frozen weights' bytes ("stream" asks for room for them too)

    def load(self, model: Any) -> torch.device:
        return comfy_training.load_for_training(model, self.memory_required, self.mode, self.weights)

    def leave_room(self, model: Any) -> None:
        """Once the plan is known (after the first load): offload what the plan's step needs room for."""
        if self.mode != "full":
            comfy_training.leave_room(model, self.memory_required + (self.weights if self.mode == "stream" else 0))


def plan_memory(
    models: Any,
    params: list[torch.Tensor],
    frozen: list[torch.nn.Module],
    shape: StepShape,
    network_config: NetworkConfig,
    config: TrainConfig,
    train_dtype: str,
) -> MemoryPlan:
    """The run's memory plan, from one shape-only pass of its real step (inside the training context: LoRA
    attached, checkpointing and attention kernel in place)."""
    dtype = DTYPES[train_dtype]

    def unet_call(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return comfy_models.unet_forward(models.model, x, t, context, y, dtype)

    shape = replace(shape, context_dim=_context_dim(models.model), adm_dim=_adm_dim(models.model))
    with comfy_training.shape_only_pass():
        activations = activation_bytes(unet_call, params, shape, dtype, models.device)
    checkpointing = "gradient checkpointing" if config.gradient_checkpointing else "no gradient checkpointing"
    return memory_plan_of(
        setting=f"{shape.describe()}, rank {network_config.network_dim}, {train_dtype}, {checkpointing}, "
        f"{config.optimizer.canonical_type}",
        frozen=frozen,
        params=params,
        optimizer=config.optimizer,
        learning_rate=config.learning_rate,
        activations=activations,
        cuda=models.device.type == "cuda",
    )


def _context_dim(model: Any) -> int:
    return int(comfy_models.unet_config(model).get("context_dim") or 2048)


def _adm_dim(model: Any) -> int:
    return int(comfy_models.unet_config(model).get("adm_in_channels") or 2816)


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


@contextlib.contextmanager
def training_block(
    network: AdapterNetwork, unet: torch.nn.Module, text_encoders: list[torch.nn.Module], checkpointing: bool
) -> Iterator[tuple[str, list[str]]]:
    """The context a training step runs in (and the memory plan's pass with it): ComfyUI's training flag, kernels
    that have a backward, gradient checkpointing, the LoRA hooks. Yields the attention kernel and what was changed
    for the report; undone on exit."""
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(comfy_training.training_flag())
        kernel = stack.enter_context(comfy_kernels.differentiable_attention())
        if stack.enter_context(comfy_training.full_precision_accumulation()):
            notes.append("fp16 accumulation (--fast fp16_accumulation) was switched off while training")
        if stack.enter_context(comfy_kernels.differentiable_layers(unet, *text_encoders)):
            notes.append("cublas_ops layers (--fast cublas_ops) trained through ComfyUI's plain path")
        if text_encoders:
            stack.enter_context(comfy_kernels.differentiable_text_encoders(*text_encoders))
        stack.enter_context(comfy_kernels.gradient_checkpointing(unet, checkpointing))
        stack.enter_context(network.attach())
        yield kernel, notes


def plan_without_training(
    model: Any, clip: Any, network_config: NetworkConfig, config: TrainConfig, shape: StepShape
) -> MemoryPlan:
    """The memory plan of a run with these settings at this batch shape, without training: the run's own set-up
    (training clones, ComfyUI's load, the LoRA on the device, the training context) and the plan's shape-only pass."""
    comfy_models.require_sdxl(model)
    train_te = network_config.train_te1 or network_config.train_te2
    if train_te and clip is None:
        raise ValueError("Training the text encoders needs the CLIP input connected.")
    with torch.inference_mode(False), comfy_training.training_models(model, clip, train_te) as models:
        train_dtype = comfy_training.resolve_train_dtype(config.train_dtype, models.device)
        network = build_network(models.model, models.clip, network_config, config.seed)
        network.to(models.device, torch.bfloat16 if config.full_bf16 else torch.float32)
        Placement(mode=config.memory_mode).load(models.model)
        unet = comfy_models.diffusion_model(models.model)
        text_encoders = list(comfy_models.text_encoders(models.clip)) if train_te else []
        params = [p for p in network.parameters() if p.requires_grad]
        with training_block(network, unet, text_encoders, config.gradient_checkpointing):
            return plan_memory(models, params, [unet, *text_encoders], shape, network_config, config, train_dtype)


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


def after_optimizer_step(averages: AdapterEma | None, device: torch.device) -> Callable[[int], Any] | None:
    """What runs after each optimizer step: the EMA update, and on a CPU run the host heap handed back (the step's
    activations live there; trainer/run/host_memory.py)."""
    if device.type != "cpu":
        return averages.after_step if averages is not None else None

    def after(step: int) -> None:
        if averages is not None:
            averages.after_step(step)
        release_freed_memory()

    return after


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
    validation: ValidationRequest | None = None,
    ema: EmaSettings | None = None,
) -> TrainResult:
    """Train a LoRA on ``model`` (and ``clip``). ``resume`` = trainer/run/resume_state.load_state output.

    ``validation``: how often and on what the validation loss is computed (trainer/run/validation.py); without it a
    dataset with held-out images (validation_split) is validated at the end of every epoch, as kohya does.

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
        raise ValueError(
            "The network has text-encoder modules (train_clip_l / train_clip_g, or a start_from file with "
            "lora_te1_ / lora_te2_ keys): connect the CLIP input of the train node."
        )
    if ema is not None and ema.start_step > total:
        raise ValueError(
            f"EMA start_step {ema.start_step} is after the run's last step ({total}): nothing would be averaged. "
            "Lower start_step or train longer."
        )
    token_length = config.resolve_token_length(text.token_length if text is not None else None)
    trained = (
        ("unet", network_config.trains("unet")),
        ("clip_l", network_config.trains("te1")),
        ("clip_g", network_config.trains("te2")),
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
        initial_lrs = [g["lr"] for g in groups]  # before a schedule's warmup changes them
        optimizer = build_optimizer(groups, config.optimizer, config.learning_rate, max_grad_norm=config.max_grad_norm)
        scheduler = build_scheduler(
            optimizer,
            config.lr_scheduler,
            max_train_steps=total,
            warmup_steps=config.lr_warmup_steps,
            num_cycles=config.lr_scheduler_num_cycles,
            power=config.lr_scheduler_power,
            initial_lr=config.learning_rate,
            decay_steps=config.lr_decay_steps,
            min_lr_ratio=config.lr_scheduler_min_lr_ratio,
            args=config.lr_scheduler_args,
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
        # text-encoder modules that are applied frozen (a continued file's) need live encoding, but no gradient
        encoder = None
        if clip is not None:
            encoder = live_text_encoder(
                models.clip, with_grad=network_config.trains_text_encoders, token_length=token_length
            )
        source = CachedBatchSource(
            dataset, latents, text, encoder, config.seed, total, train_text_encoder=train_te, device=device
        )
        held_out = validation_source(
            dataset,
            validation,
            latents,
            text,
            live_text_encoder(models.clip, with_grad=False, token_length=token_length) if clip is not None else None,
            total,
            train_te,
            device,
        )
        if held_out is not None and (train_te or any(i.caption_options.is_random for i in held_out.dataset.images)):
            needs_clip = True
        if not needs_clip:
            comfy_training.free_other_models()
        placement = Placement(mode=config.memory_mode)
        placement.load(models.model)
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
        with training_block(network, unet, text_encoders, config.gradient_checkpointing) as (kernel, notes):
            result.notes.extend(notes)
            result.notes.append(f"trained on {device} in {train_dtype} with {kernel}")
            result.notes.append(
                "parameter groups (kohya's names): "
                + ", ".join(f"{name} lr {group_lr:g}" for name, group_lr in zip(group_names, initial_lrs))
            )
            result.notes.append(f"captions: {token_length.describe()}")
            try:
                result.memory_plan = plan_memory(
                    models,
                    params,
                    [unet, *text_encoders],
                    largest_step_shape(dataset),
                    network_config,
                    config,
                    train_dtype,
                )
            except Exception as e:  # the plan only informs ComfyUI's placement; a failure must not stop the run
                result.notes.append(f"memory plan: not available ({type(e).__name__}: {e}); ComfyUI placed the U-Net")
            else:
                result.notes.extend(result.memory_plan.lines())
                placement = replace(
                    placement,
                    memory_required=result.memory_plan.besides_weights,
                    weights=result.memory_plan.frozen_weights,
                )
                placement.leave_room(models.model)
            denoiser = ComfyDenoiser(models.model, dtype, placement)
            validator = None
            if held_out is not None:
                validator = Validator(
                    denoiser,
                    held_out,
                    validation.settings if validation is not None else ValidationSettings(),
                    config.seed,
                    schedule,
                    config.noise,
                    loss_settings,
                    network,
                    optimizer,
                )
                result.notes.append(
                    f"validation: {len(held_out.dataset.images)} images in {validator.num_batches} batches x "
                    f"timesteps {validator.timesteps}, noise seed {validator.seed}"
                )
            events.training_started(result)
            try:
                result.state = run(
                    denoiser,
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
                    validator=validator,
                    after_optimizer_step=after_optimizer_step(averages, device),
                )
                if not result.state.interrupted:
                    events.training_finished()
            finally:
                result.training_point = switch_to_averaged_weights(optimizer)
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
