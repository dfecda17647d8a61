"""Learning-rate schedules built as kohya's ``get_scheduler_fix`` builds them (sd-scripts ``48d368f``).

Scheduler step convention
-------------------------
kohya builds every scheduler with ``num_training_steps = max_train_steps * num_processes`` where
``max_train_steps`` counts OPTIMIZER steps (``max_train_epochs * ceil(batches / num_processes / grad_accum)``), and
calls ``lr_scheduler.step()`` after every micro-batch inside ``accelerator.accumulate``. Accelerate's
``AcceleratedScheduler`` turns that into: no step while gradients are being accumulated, no step when the optimizer
step was skipped (fp16 GradScaler overflow), and ``num_processes`` steps per real optimizer step. We train in one
process, so the equivalent is: step the scheduler exactly once per optimizer step that actually happened, with
``max_train_steps`` optimizer steps in total. A fractional warmup (``0 < w < 1``) is ``int(w * max_train_steps)``
(truncated, as kohya does: 0.29 of 100 gives 28).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from .optimizers import OptimizerConfigError, is_schedule_free, logger

# lr_scheduler names (kohya/transformers spelling); "adafactor" is only valid with a relative_step Adafactor.
SCHEDULER_TYPES: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
)


# --- schedulers ---------------------------------------------------------------------------------------------------


class LRSchedulerLike(Protocol):
    def step(self) -> None: ...

    def get_last_lr(self) -> list[float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ScheduleFreeDummyScheduler:
    """kohya's dummy scheduler for schedule-free optimizers: never changes the lr, reports it for logging."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def resolve_warmup_steps(warmup: int | float | str, max_train_steps: int) -> int:
    """Warmup as a step count. ``0 < w < 1`` (or "10%") is a ratio of max_train_steps, truncated like kohya."""
    if isinstance(warmup, str):
        text = warmup.strip()
        try:
            warmup = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            raise OptimizerConfigError(f"warmup steps must be a number or a percentage, got {text!r}") from None
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 0:
        raise OptimizerConfigError(f"warmup steps must be a number >= 0, got {warmup!r}")
    if isinstance(warmup, float):
        if warmup < 1.0:
            return int(warmup * max_train_steps)
        if not warmup.is_integer():
            raise OptimizerConfigError(
                f"warmup {warmup} is neither a whole number of steps nor a ratio below 1 of the training steps"
            )
    return int(warmup)


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    if type(optimizer).__name__ != "Adafactor" or not type(optimizer).__module__.startswith("transformers"):
        return False
    return any(group.get("relative_step", False) for group in optimizer.param_groups)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "constant",
    max_train_steps: int = 1,
    warmup_steps: int | float | str = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    *,
    initial_lr: float = 0.0,
) -> LRSchedulerLike:
    """The lr scheduler kohya's get_scheduler_fix builds; step it once per optimizer step.

    ``warmup_steps``: an int, or a ratio ``0 < w < 1`` of ``max_train_steps``. ``num_cycles`` is used by
    cosine_with_restarts, ``power`` by polynomial (which decays to transformers' lr_end=1e-7, as in kohya).
    ``initial_lr``: what AdafactorSchedule reports before the first step (kohya passes the learning_rate).
    A relative-step Adafactor always gets AdafactorSchedule and a schedule-free optimizer a constant dummy,
    whatever ``name`` says, as in kohya.
    """
    if not isinstance(name, str) or name.strip().lower() not in SCHEDULER_TYPES:
        raise OptimizerConfigError(f"unknown lr_scheduler {name!r}; choose one of: {', '.join(SCHEDULER_TYPES)}")
    name = name.strip().lower()
    if isinstance(max_train_steps, bool) or not isinstance(max_train_steps, int) or max_train_steps < 1:
        raise OptimizerConfigError(f"max_train_steps must be an int >= 1, got {max_train_steps!r}")
    num_warmup = resolve_warmup_steps(warmup_steps, max_train_steps)

    if is_schedule_free(optimizer):
        if name != "constant" or num_warmup != 0:
            logger.warning(
                "schedule-free optimizer: lr_scheduler %r and warmup are ignored; use optimizer_args warmup_steps=N",
                name,
            )
        return ScheduleFreeDummyScheduler(optimizer)

    from transformers.optimization import AdafactorSchedule, get_scheduler

    if _is_relative_step_adafactor(optimizer) or name == "adafactor":
        if not _is_relative_step_adafactor(optimizer):
            raise OptimizerConfigError("lr_scheduler 'adafactor' needs the Adafactor optimizer with relative_step=True")
        if name != "adafactor":
            logger.info("Adafactor relative_step: using AdafactorSchedule instead of %r", name)
        if num_warmup != 0:
            raise OptimizerConfigError(
                "Adafactor with relative_step=True schedules its own step size; set warmup steps to 0 "
                "(or use optimizer_args relative_step=False scale_parameter=False with a normal scheduler)"
            )
        return AdafactorSchedule(optimizer, initial_lr)

    if name == "constant":
        if num_warmup != 0:
            raise OptimizerConfigError("lr_scheduler 'constant' takes no warmup; use 'constant_with_warmup'")
        return get_scheduler(name, optimizer)
    if num_warmup > max_train_steps:
        logger.warning("warmup (%d steps) is longer than training (%d steps)", num_warmup, max_train_steps)

    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise OptimizerConfigError(f"num_cycles must be an int >= 1, got {num_cycles!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        raise OptimizerConfigError(f"power must be a finite number, got {power!r}")

    specific: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        specific["num_cycles"] = num_cycles
    elif name == "polynomial":
        specific["power"] = float(power)
    try:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=num_warmup,
            num_training_steps=max_train_steps,
            scheduler_specific_kwargs=specific,
        )
    except ValueError as exc:  # e.g. polynomial: learning rate not above lr_end
        raise OptimizerConfigError(f"lr_scheduler {name!r}: {exc}") from exc
