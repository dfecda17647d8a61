"""The training loop: epochs of bucket batches, gradient accumulation, clipping, optimizer/scheduler
steps, max-norm, progress, cancel and NaN checks, in kohya's order (train_network.py).

Per micro-batch: loss (trainer/objective.py) / gradient_accumulation_steps, backward. When the
accumulation group is full, or the epoch's last batch arrives (accelerate syncs at the end of the
dataloader), clip gradients to ``max_grad_norm``, step the optimizer and the scheduler once, zero
the gradients, apply max-norm regularisation (``scale_weight_norms``) and count one step.

Every random draw comes from state this module owns (a torch.Generator for noise and batch order,
a random.Random for kohya's Python-side draws, and the global torch RNG inside a ``fork_rng`` for
LoRA dropout, which torch's checkpoint recompute replays), so the same seed gives the same LoRA
bytes on CPU, ComfyUI's own reseeding of the global RNGs cannot disturb a run, and a saved
``LoopState`` resumes exactly where it stopped.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch

from .loss_weighting import LossSettings
from .noise import NoiseSettings
from .noise_schedule import DDPMSchedule
from .objective import Batch, Denoiser, batch_loss


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: training stops before the bad gradients touch the weights."""


class BatchSource(Protocol):
    """The dataset as the loop sees it: a fixed number of bucket batches per epoch."""

    def __len__(self) -> int:
        """Batches per epoch."""

    def epoch_order(self, epoch: int) -> Sequence[int]:
        """The batch indices of ``epoch`` in training order (a pure function of the seed and epoch)."""

    def get(self, index: int, epoch: int, py_random: random.Random, step: int = 0) -> Batch:
        """Batch ``index`` of ``epoch``; per-sample augmentation choices (flip, captions) use ``py_random``;
        ``step`` is the number of optimizer steps done (caption token warm-up depends on it)."""


@dataclass(frozen=True)
class LoopSettings:
    max_train_steps: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping (kohya)
    scale_weight_norms: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")


@dataclass
class StepRecord:
    step: int
    epoch: int
    loss: float
    lr: float
    timestep_mean: float
    seconds: float


@dataclass
class LoopState:
    """Everything needed to continue a run exactly: counters, RNG states, the loss history."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # position in epoch_order(epoch) of the next micro-batch
    noise_rng: torch.Tensor | None = None
    dropout_rng: torch.Tensor | None = None
    py_random: Any = None
    history: list[StepRecord] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict:
        return {
            "global_step": self.global_step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "py_random": _py_state_to_json(self.py_random), "interrupted": self.interrupted,
            "history": [vars(r) for r in self.history],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"noise_rng": self.noise_rng, "dropout_rng": self.dropout_rng}

    @classmethod
    def from_saved(cls, data: dict, tensors: dict[str, torch.Tensor]) -> "LoopState":
        return cls(global_step=data["global_step"], epoch=data["epoch"], batch_in_epoch=data["batch_in_epoch"],
                   noise_rng=tensors["noise_rng"], dropout_rng=tensors["dropout_rng"],
                   py_random=_py_state_from_json(data["py_random"]),
                   history=[StepRecord(**r) for r in data["history"]], interrupted=False)


def _py_state_to_json(state: Any) -> Any:
    if state is None:
        return None
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(data: Any) -> Any:
    if data is None:
        return None
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


@dataclass
class LoopHooks:
    """What the host provides: cancel checks and per-step reporting (all optional)."""

    should_stop: Callable[[], bool] = lambda: False
    # True for the host's cancel exception raised from inside a forward/backward (ComfyUI checks its
    # interrupt flag in every op): the partial group is dropped and the run ends at the last step
    is_cancel: Callable[[BaseException], bool] = lambda exc: False
    # after each optimizer step, with the (then complete, resumable) loop state
    on_step: Callable[[StepRecord, int, "LoopState"], None] = lambda record, total, state: None


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    lr = group.get("lr")
    if lr is None or (isinstance(lr, float) and lr == 0.0 and "d" in group):
        lr = group.get("d", 0.0) * group.get("lr", 0.0)  # Prodigy reports d*lr as the effective rate
    return float(lr)


def run(model: Denoiser, data: BatchSource, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
        scheduler: Any, settings: LoopSettings, schedule: DDPMSchedule, noise_settings: NoiseSettings,
        loss_settings: LossSettings, state: LoopState | None = None, hooks: LoopHooks | None = None,
        max_norm: Callable[[float], tuple[int, float, float]] | None = None,
        scaler: "torch.amp.GradScaler | None" = None) -> LoopState:
    """Train until ``settings.max_train_steps`` optimizer steps, a cancel, or divergence.

    ``params`` are the trainable tensors (for clipping); ``max_norm(value)`` applies kohya's
    max-norm regularisation when ``scale_weight_norms`` is set. With an fp16 ``scaler`` the loss is
    scaled for backward, gradients are unscaled before clipping, and the scheduler only steps when
    the optimizer really stepped (what accelerate does).
    """
    hooks = hooks or LoopHooks()
    state = state or LoopState()
    state.interrupted = False  # a state saved by a cancelled run resumes as a running one
    num_batches = len(data)
    if num_batches == 0:
        raise ValueError("The dataset has no batches: nothing to train on.")
    ga = settings.gradient_accumulation_steps

    generator = torch.Generator().manual_seed(settings.seed)
    py_random = random.Random(settings.seed)
    if state.noise_rng is not None:
        generator.set_state(state.noise_rng)
    if state.py_random is not None:
        py_random.setstate(state.py_random)

    with torch.random.fork_rng(devices=[]):
        if state.dropout_rng is not None:
            torch.set_rng_state(state.dropout_rng)
        else:
            torch.manual_seed(settings.seed + 1)

        def snapshot() -> None:
            # the state is complete at every step boundary, so it can be saved for resuming
            state.noise_rng = generator.get_state()
            state.py_random = py_random.getstate()
            state.dropout_rng = torch.get_rng_state()

        snapshot()
        micro_in_group = 0
        group_losses: list[float] = []
        group_timesteps: list[float] = []
        group_start = (state.epoch, state.batch_in_epoch)
        started = time.perf_counter()
        try:
            while state.global_step < settings.max_train_steps:
                epoch = state.epoch
                order = list(data.epoch_order(epoch))
                while state.epoch == epoch and state.global_step < settings.max_train_steps:
                    if micro_in_group == 0:
                        group_start = (state.epoch, state.batch_in_epoch)
                        if hooks.should_stop():
                            state.interrupted = True
                            break
                    index = order[state.batch_in_epoch]
                    batch = data.get(index, state.epoch, py_random, step=state.global_step)
                    result = batch_loss(model, batch, schedule, noise_settings, loss_settings, generator, py_random)
                    loss_value = float(result.loss.detach())
                    if not math.isfinite(loss_value):
                        raise TrainingDiverged(
                            f"The loss became {loss_value} at step {state.global_step + 1} (epoch {state.epoch + 1}). "
                            "Nothing was saved from this step. Try a lower learning rate, train_dtype fp32 or bf16 "
                            "instead of fp16, or the VAE in float32 (no_half_vae) if the cached latents look wrong.")
                    scaled = result.loss / ga
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    group_losses.append(loss_value)
                    group_timesteps.append(float(result.timesteps.float().mean()))
                    micro_in_group += 1
                    state.batch_in_epoch += 1
                    last_of_epoch = state.batch_in_epoch == num_batches
                    if micro_in_group == ga or last_of_epoch:
                        stepped = True
                        if scaler is not None:
                            scaler.unscale_(optimizer)
                        if settings.max_grad_norm:
                            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                        if scaler is not None:
                            before = scaler.get_scale()
                            scaler.step(optimizer)
                            scaler.update()
                            stepped = scaler.get_scale() >= before  # a lowered scale means inf/NaN grads: skipped
                        else:
                            optimizer.step()
                        if scheduler is not None and stepped:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        if settings.scale_weight_norms and max_norm is not None:
                            max_norm(settings.scale_weight_norms)
                        state.global_step += 1
                        now = time.perf_counter()
                        record = StepRecord(step=state.global_step, epoch=state.epoch + 1,
                                            loss=sum(group_losses) / len(group_losses), lr=_current_lr(optimizer),
                                            timestep_mean=sum(group_timesteps) / len(group_timesteps),
                                            seconds=now - started)
                        started = now
                        state.history.append(record)
                        micro_in_group = 0
                        group_losses, group_timesteps = [], []
                        if state.batch_in_epoch >= num_batches:
                            state.epoch += 1
                            state.batch_in_epoch = 0
                        snapshot()
                        # the host may sample previews here, which reseeds the global RNG that the
                        # dropout masks are drawn from: the stream continues as if it had not run
                        hooks.on_step(record, settings.max_train_steps, state)
                        torch.set_rng_state(state.dropout_rng)
                if state.interrupted:
                    break
        except BaseException as exc:
            if not hooks.is_cancel(exc):
                raise
            # cancelled inside a forward/backward: forget the unfinished group, keep the last step's state
            optimizer.zero_grad(set_to_none=True)
            state.epoch, state.batch_in_epoch = group_start
            state.interrupted = True
    return state
