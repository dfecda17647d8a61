"""The training loop: epochs of bucket batches, gradient accumulation, clipping, optimizer/scheduler
steps, max-norm, progress, cancel and NaN checks, in kohya's order (train_network.py).

Per micro-batch: loss (trainer/objective/batch_loss.py) / gradient_accumulation_steps, backward. When the
accumulation group is full, or the epoch's last batch arrives (accelerate syncs at the end of the
dataloader), clip gradients to ``max_grad_norm`` (their norm goes to the step's record), step the
optimizer and the scheduler once, zero the gradients, apply max-norm regularisation
(``scale_weight_norms``) and count one step.

Every random draw comes from state this module owns: a torch.Generator (on the host) for noise,
timesteps and batch order, a random.Random for kohya's Python-side draws, and, inside a ``fork_rng``,
the global RNGs of the host and of the training device for LoRA dropout (kohya draws module dropout
on the host and the masks on the device; torch's checkpoint recompute replays both). All of them are
in the resumable ``LoopState``, so the same seed gives the same LoRA bytes, ComfyUI's own reseeding of
the global RNGs (previews) cannot disturb a run, and a saved state resumes exactly where it stopped.

The step never waits for the device per layer or per micro-batch: losses stay on the device and are
read back once per optimizer step (one sync, for the log, the progress bar and the NaN check).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..objective.batch_loss import Batch, Denoiser, batch_loss
from ..objective.ddpm_schedule import DDPMSchedule
from ..objective.loss_weighting import LossSettings
from ..objective.noise import NoiseSettings
from .events import RunEvents
from .validation import ValidationRecord, Validator


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
    """What the loop needs of the run's TrainConfig, resolved for this run (max_train_steps counts the epochs)."""

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
    grad_norm: float | None = None  # of all trained weights, before clipping (None in states saved before it)


@dataclass
class LoopState:
    """Everything needed to continue a run exactly: counters, RNG states, the loss history."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # position in epoch_order(epoch) of the next micro-batch
    noise_rng: torch.Tensor | None = None
    dropout_rng: torch.Tensor | None = None  # the host's global RNG (module dropout; every draw on a CPU run)
    device_rng: torch.Tensor | None = None  # the training device's global RNG (dropout masks on a GPU)
    py_random: Any = None
    history: list[StepRecord] = field(default_factory=list)
    validation_history: list[ValidationRecord] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "py_random": _py_state_to_json(self.py_random),
            "interrupted": self.interrupted,
            "history": [vars(r) for r in self.history],
            "validation_history": [vars(r) for r in self.validation_history],
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"noise_rng": self.noise_rng, "dropout_rng": self.dropout_rng}
        if self.device_rng is not None:
            out["device_rng"] = self.device_rng
        return out

    @classmethod
    def from_saved(cls, data: dict, tensors: dict[str, torch.Tensor]) -> LoopState:
        return cls(
            global_step=data["global_step"],
            epoch=data["epoch"],
            batch_in_epoch=data["batch_in_epoch"],
            noise_rng=tensors.get("noise_rng"),
            dropout_rng=tensors.get("dropout_rng"),
            device_rng=tensors.get("device_rng"),
            py_random=_py_state_from_json(data["py_random"]),
            history=[StepRecord(**r) for r in data["history"]],
            validation_history=[ValidationRecord(**r) for r in data.get("validation_history", [])],
            interrupted=False,
        )


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


class GlobalRngs:
    """The global RNGs of the host and of the training device, which the loop owns while it runs.

    On a CPU run there is one (the host's). On a GPU, ``torch.manual_seed`` would also seed the GPU, but ComfyUI
    and other nodes reseed both between steps (a preview's sampler does), so both are forked, seeded, snapshot
    and restored explicitly, through the device's own module (``torch.cuda`` for CUDA).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.module = None if self.device.type == "cpu" else torch.get_device_module(self.device)
        self.index = self.device.index if self.device.index is not None else 0

    @contextlib.contextmanager
    def forked(self):
        devices = [] if self.module is None else [self.index]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            yield

    def start(self, state: LoopState, seed: int) -> None:
        """Continue the saved streams, or seed them from the run's seed."""
        if state.dropout_rng is not None:
            torch.set_rng_state(state.dropout_rng)
        else:
            torch.manual_seed(seed + 1)
        if self.module is not None:
            if state.device_rng is not None:
                self.module.set_rng_state(state.device_rng, self.index)
            else:
                with self.module.device(self.index):
                    self.module.manual_seed(seed + 2)

    def snapshot(self, state: LoopState) -> None:
        state.dropout_rng = torch.get_rng_state()
        state.device_rng = self.module.get_rng_state(self.index) if self.module is not None else None

    def restore(self, state: LoopState) -> None:
        torch.set_rng_state(state.dropout_rng)
        if self.module is not None and state.device_rng is not None:
            self.module.set_rng_state(state.device_rng, self.index)


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    group = optimizer.param_groups[0]
    lr = group.get("lr")
    if lr is None or (isinstance(lr, float) and lr == 0.0 and "d" in group):
        lr = group.get("d", 0.0) * group.get("lr", 0.0)  # Prodigy reports d*lr as the effective rate
    return float(lr)


def _grad_norm(params: Sequence[torch.nn.Parameter], max_grad_norm: float) -> torch.Tensor:
    """The gradients' total norm (a device tensor: read with the losses), clipped to ``max_grad_norm`` when set."""
    if max_grad_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def run(
    model: Denoiser,
    data: BatchSource,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    settings: LoopSettings,
    schedule: DDPMSchedule,
    noise_settings: NoiseSettings,
    loss_settings: LossSettings,
    state: LoopState | None = None,
    events: RunEvents | None = None,
    max_norm: Callable[[float], Any] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    validator: Validator | None = None,
    after_optimizer_step: Callable[[int], Any] | None = None,
) -> LoopState:
    """Train until ``settings.max_train_steps`` optimizer steps, a cancel, or divergence.

    ``validator`` computes the validation loss after the steps and epochs its settings name (trainer/run/validation.py);
    each result goes to ``state.validation_history`` and ``events.validation_finished``.

    ``params`` are the trainable tensors (for clipping); ``max_norm(value)`` applies kohya's
    max-norm regularisation when ``scale_weight_norms`` is set. With an fp16 ``scaler`` the loss is
    scaled for backward, gradients are unscaled before clipping, and the scheduler only steps when
    the optimizer really stepped (what accelerate does). ``after_optimizer_step(step)`` runs after each
    optimizer step and max-norm, before the step is reported (the EMA update).
    """
    events = events or RunEvents()
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

    rngs = GlobalRngs(getattr(model, "device", torch.device("cpu")))
    with rngs.forked():
        rngs.start(state, settings.seed)

        def snapshot() -> None:
            # the state is complete at every step boundary, so it can be saved for resuming
            state.noise_rng = generator.get_state()
            state.py_random = py_random.getstate()
            rngs.snapshot(state)

        snapshot()
        micro_in_group = 0
        group_losses: list[torch.Tensor] = []  # on the device until the group's one readout
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
                        if events.cancel_requested():
                            state.interrupted = True
                            break
                    index = order[state.batch_in_epoch]
                    batch = data.get(index, state.epoch, py_random, step=state.global_step)
                    result = batch_loss(model, batch, schedule, noise_settings, loss_settings, generator, py_random)
                    scaled = result.loss / ga
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    group_losses.append(result.loss.detach())
                    group_timesteps.append(float(result.timesteps.float().mean()))
                    micro_in_group += 1
                    state.batch_in_epoch += 1
                    last_of_epoch = state.batch_in_epoch == num_batches
                    if micro_in_group == ga or last_of_epoch:
                        if scaler is not None:
                            scaler.unscale_(optimizer)
                        grad_norm = _grad_norm(params, settings.max_grad_norm)
                        stacked = torch.stack(group_losses).float()
                        readout = torch.cat([stacked, grad_norm.float().reshape(1).to(stacked.device)])
                        *losses, norm = readout.cpu().tolist()  # the step's one sync
                        bad = next((v for v in losses if not math.isfinite(v)), None)
                        if bad is not None:
                            optimizer.zero_grad(set_to_none=True)
                            raise TrainingDiverged(
                                f"The loss became {bad} at step {state.global_step + 1} (epoch {state.epoch + 1}). "
                                "The weights were not updated with it. Try a lower learning rate, train_dtype fp32 "
                                "or bf16 instead of fp16, or the VAE in float32 (no_half_vae) if the cached latents "
                                "look wrong."
                            )
                        stepped = True
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
                        if after_optimizer_step is not None:
                            after_optimizer_step(state.global_step)
                        now = time.perf_counter()
                        record = StepRecord(
                            step=state.global_step,
                            epoch=state.epoch + 1,
                            loss=sum(losses) / len(losses),
                            lr=_current_lr(optimizer),
                            timestep_mean=sum(group_timesteps) / len(group_timesteps),
                            seconds=now - started,
                            grad_norm=norm,
                        )
                        started = now
                        state.history.append(record)
                        micro_in_group = 0
                        group_losses, group_timesteps = [], []
                        finished_epoch = None
                        if state.batch_in_epoch >= num_batches:
                            state.epoch += 1
                            state.batch_in_epoch = 0
                            finished_epoch = state.epoch
                        elif state.global_step >= settings.max_train_steps:
                            finished_epoch = state.epoch + 1  # kohya validates the last, partial epoch too
                        group_start = (state.epoch, state.batch_in_epoch)  # a cancel from here keeps this step
                        snapshot()
                        # the host may sample previews here, which reseeds the global RNG that the
                        # dropout masks are drawn from: the stream continues as if it had not run
                        events.step_finished(record)
                        if validator is not None:
                            kinds = validator.due(state.global_step, finished_epoch)
                            if kinds:
                                began = time.perf_counter()
                                checked = ValidationRecord(
                                    step=state.global_step,
                                    epoch=record.epoch,
                                    loss=validator.loss(state.global_step),
                                    kind="+".join(kinds),
                                    seconds=time.perf_counter() - began,
                                )
                                state.validation_history.append(checked)
                                events.validation_finished(checked)
                                started += checked.seconds  # the next step's time is its own
                        rngs.restore(state)
                if state.interrupted:
                    break
        except BaseException as exc:
            if not events.is_cancel(exc):
                raise
            # cancelled inside a forward/backward: forget the unfinished group, keep the last step's state
            optimizer.zero_grad(set_to_none=True)
            state.epoch, state.batch_in_epoch = group_start
            state.interrupted = True
    return state
