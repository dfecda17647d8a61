"""One training run on ComfyUI's loaded SDXL: network, optimizer, data, loop, in the right context.

The train node calls ``train``. Everything ComfyUI-specific goes through trainer/comfy_adapter.py;
the math lives in objective/loop/noise/loss modules. The run happens inside
``torch.inference_mode(False)`` (ComfyUI executes every node under inference mode), with the
frozen weights made trainable-through, LoRA hooks attached and gradient checkpointing on, all of
which are undone on exit, also on error or cancel.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from . import comfy_adapter as host
from .batch_source import CachedBatchSource, LatentSource, TextSource
from .lora_network import LoRANetwork, NetworkConfig
from .loop import LoopHooks, LoopSettings, LoopState, StepRecord, run
from .loss_weighting import LossSettings
from .noise import NoiseSettings
from .noise_schedule import DDPMSchedule
from .optim import OptimizerSettings, build_optimizer, build_scheduler, optimizer_eval_mode
from .training_dataset import TrainingDataset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings, with kohya's names and defaults where kohya has them."""

    max_train_steps: int = 1600
    max_train_epochs: int = 0  # > 0 overrides max_train_steps, as in kohya
    learning_rate: float = 1e-4
    unet_lr: Optional[float] = None
    text_encoder_lr1: Optional[float] = None  # CLIP-L (lora_te1)
    text_encoder_lr2: Optional[float] = None  # CLIP-G (lora_te2)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    scale_weight_norms: Optional[float] = None
    seed: int = 42
    train_dtype: str = "fp32"
    full_bf16: bool = False
    gradient_checkpointing: bool = True
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None
    loss: LossSettings = field(default_factory=LossSettings)
    noise: NoiseSettings = field(default_factory=NoiseSettings)

    def __post_init__(self) -> None:
        if self.train_dtype not in DTYPES:
            raise ValueError(f"train_dtype must be one of {list(DTYPES)}, got {self.train_dtype!r}")
        if self.full_bf16 and self.train_dtype != "bf16":
            raise ValueError("full_bf16 needs train_dtype bf16")

    def total_steps(self, steps_per_epoch: int) -> int:
        """kohya: max_train_epochs, when given, sets max_train_steps = epochs * ceil(batches / ga)."""
        if self.max_train_epochs > 0:
            return self.max_train_epochs * steps_per_epoch
        return self.max_train_steps


@dataclass
class TrainResult:
    network: Any  # LoRANetwork, or LycorisNetwork for algo loha/lokr (same interface)
    state: LoopState
    total_steps: int
    steps_per_epoch: int
    prediction_type: str
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    group_names: list[str] = field(default_factory=list)


class ComfyDenoiser:
    """The objective's Denoiser over a ComfyUI MODEL: raw U-Net output in the training dtype."""

    def __init__(self, model: Any, dtype: torch.dtype) -> None:
        self.model = model
        self.dtype = dtype
        self.prediction_type = host.prediction_type(model)
        self.latent_scale = host.latent_scale_factor(model)

    def __call__(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
        return host.unet_forward(self.model, noisy_latents, timesteps, context, y, self.dtype)


def live_text_encoder(clip: Any) -> Callable[[list[str]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Encode captions now (random captions, or text-encoder training: with gradients)."""

    def encode(captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for text in captions:
            ctx, pooled = host.encode_text(clip, text)
            out.append((ctx[0].float(), pooled[0].float()))
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


def build_network(model: Any, clip: Any, config: NetworkConfig, seed: int,
                  initial_weights: Optional[dict[str, torch.Tensor]] = None) -> Any:
    """kohya's LoRANetwork for algo "lora", LyCORIS's LoHa/LoKr (trainer/lycoris_network.py) otherwise; both have
    the same interface (attach, param_groups, state_dict_kohya, load_kohya, apply_max_norm)."""
    unet = host.diffusion_model(model)
    te1 = te2 = None
    if config.train_te1 or config.train_te2:
        if clip is None:
            raise ValueError("Training the text encoders needs the CLIP input connected.")
        l, g = host.text_encoders(clip)
        te1 = l if config.train_te1 else None
        te2 = g if config.train_te2 else None
    if config.algo == "lora":
        network_cls = LoRANetwork
    else:
        from .lycoris_network import LycorisNetwork  # imports lycoris-lora only when LoHa/LoKr is asked for

        network_cls = LycorisNetwork
    network = network_cls.build(unet if config.train_unet else None, te1, te2, config,
                                generator=torch.Generator().manual_seed(seed))
    if initial_weights is not None:
        network.load_kohya(initial_weights)
    return network


def train(model: Any, clip: Any, dataset: TrainingDataset, latents: LatentSource, text: Optional[TextSource],
          network_config: NetworkConfig, config: TrainConfig, *, initial_weights: Optional[dict] = None,
          resume: Optional[dict] = None, should_stop: Callable[[], bool] = lambda: False,
          on_step: Callable[[StepRecord, int, "TrainResult"], None] = lambda r, t, res: None,
          on_finish: Optional[Callable[["TrainResult"], Any]] = None) -> TrainResult:
    """Train a LoRA on ``model`` (and ``clip``). ``resume`` = trainer/train_state.load_state output.

    ``on_step(record, total, result)`` runs after every optimizer step inside the training context
    (LoRA attached): ``result.state`` is then complete, so it can save the LoRA or a resumable state.
    ``on_finish(result)`` runs once after the last step, still inside the context (final previews).
    """
    host.require_sdxl(model)
    train_te = network_config.train_te1 or network_config.train_te2
    dtype = DTYPES[config.train_dtype]
    loss_settings = replace(config.loss, v_parameterization=host.prediction_type(model) == "v_prediction")
    loss_settings.validate()
    schedule = DDPMSchedule(zero_terminal_snr=host.zero_terminal_snr(model))

    steps_per_epoch = dataset.steps_per_epoch(config.gradient_accumulation_steps)
    total = config.total_steps(steps_per_epoch)
    if total < 1:
        raise ValueError("Set max_train_steps or max_train_epochs to at least 1.")

    with torch.inference_mode(False):
        network = build_network(model, clip, network_config, config.seed, initial_weights)
        device = host.load_device(model)
        network.to(device, torch.bfloat16 if config.full_bf16 else torch.float32)
        network.train()
        network.set_dropout_generator(torch.default_generator)  # global RNG, forked + replayed by checkpointing
        lr = config.learning_rate
        groups, group_names = network.param_groups(
            unet_lr=config.unet_lr if config.unet_lr is not None else lr,
            te1_lr=config.text_encoder_lr1 if config.text_encoder_lr1 is not None else lr,
            te2_lr=config.text_encoder_lr2 if config.text_encoder_lr2 is not None else lr,
            loraplus_lr_ratio=config.loraplus_lr_ratio, loraplus_unet_lr_ratio=config.loraplus_unet_lr_ratio,
            loraplus_text_encoder_lr_ratio=config.loraplus_text_encoder_lr_ratio)
        optimizer = build_optimizer(groups, replace(config.optimizer, learning_rate=lr))
        scheduler = build_scheduler(optimizer, config.lr_scheduler, max_train_steps=total,
                                    warmup_steps=config.lr_warmup_steps, num_cycles=config.lr_scheduler_num_cycles,
                                    power=config.lr_scheduler_power, initial_lr=lr)
        scaler = torch.amp.GradScaler(device.type) if config.train_dtype == "fp16" else None
        state = None
        if resume is not None:
            resume = _normal_tensors(resume)  # read inside the node, i.e. under inference mode
            network.load_kohya(resume["network"])
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None and resume.get("scheduler") is not None:
                scheduler.load_state_dict(resume["scheduler"])
            if scaler is not None and resume.get("scaler") is not None:
                scaler.load_state_dict(resume["scaler"])
            state = resume["loop"]

        source = CachedBatchSource(dataset, latents, text, live_text_encoder(clip) if clip is not None else None,
                                   config.seed, total, train_text_encoder=train_te)
        needs_clip = train_te or text is None or any(i.caption_options.is_random for i in dataset.images)
        if not needs_clip:
            host.free_other_models()
        host.load_for_training(model)
        unet = host.diffusion_model(model)
        frozen = [unet] + ([m for m in host.text_encoders(clip)] if train_te else [])
        params = [p for g in groups for p in g["params"]]
        result = TrainResult(network=network, state=state if state is not None else LoopState(), total_steps=total,
                             steps_per_epoch=steps_per_epoch, prediction_type=host.prediction_type(model),
                             optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                             group_names=group_names)
        with contextlib.ExitStack() as stack:
            stack.enter_context(host.training_flag())
            stack.enter_context(host.differentiable_attention())
            if train_te:
                stack.enter_context(host.differentiable_text_encoders(*host.text_encoders(clip)))
            stack.enter_context(host.trainable_weights(*frozen))
            stack.enter_context(host.gradient_checkpointing(unet, config.gradient_checkpointing))
            stack.enter_context(network.attach())
            try:
                result.state = run(
                    ComfyDenoiser(model, dtype), source, params, optimizer, scheduler,
                    LoopSettings(max_train_steps=total, gradient_accumulation_steps=config.gradient_accumulation_steps,
                                 max_grad_norm=config.max_grad_norm, scale_weight_norms=config.scale_weight_norms,
                                 seed=config.seed),
                    schedule, config.noise, loss_settings, state=result.state,
                    hooks=LoopHooks(should_stop=should_stop, on_step=lambda rec, tot, st: on_step(rec, tot, result),
                                    is_cancel=host.is_interrupt),
                    max_norm=network.apply_max_norm, scaler=scaler)
                if on_finish is not None and not result.state.interrupted:
                    on_finish(result)
            finally:
                optimizer_eval_mode(optimizer)
        network.eval()
        if not all(math.isfinite(float(p.detach().float().abs().max())) for p in params):
            raise RuntimeError("The LoRA weights are not finite after training; nothing was saved.")
        return result
