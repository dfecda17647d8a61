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

import functools
import math
from typing import Any, Protocol

import torch

from .optimizers import OptimizerConfigError, is_schedule_free, logger, parse_key_values

# lr_scheduler names (kohya/transformers spelling); "adafactor" is only valid with a relative_step Adafactor.
SCHEDULER_TYPES: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "rex",
    "piecewise_constant",
)

#: the lr_scheduler_args each schedule takes (kohya passes them to the schedule function as keyword arguments)
SCHEDULER_ARGS: dict[str, tuple[str, ...]] = {
    "warmup_stable_decay": ("warmup_type", "decay_type"),  # transformers' get_wsd_schedule: linear, cosine, 1-sqrt
    "piecewise_constant": ("step_rules",),  # diffusers' rules, e.g. '1:100,0.5:200,0.1': factor:until step, last
}
_WSD_SHAPES = ("linear", "cosine", "1-sqrt")
#: schedules that end at lr_scheduler_min_lr_ratio * lr instead of 0
MIN_LR_SCHEDULES = ("cosine_with_min_lr", "warmup_stable_decay", "rex")


def scheduler_args(name: str, text: str | None) -> dict[str, Any]:
    """lr_scheduler_args (kohya's ``key=value`` list as one string) checked against what ``name`` takes."""
    args = parse_key_values(text, "lr_scheduler_args")
    allowed = SCHEDULER_ARGS.get(name, ())
    for key, value in args.items():
        if key not in allowed:
            takes = f"takes only {', '.join(allowed)}" if allowed else "takes none"
            raise OptimizerConfigError(f"lr_scheduler_args: {key!r} is not an argument of {name!r} ({name} {takes})")
        if key in ("warmup_type", "decay_type") and value not in _WSD_SHAPES:
            raise OptimizerConfigError(f"lr_scheduler_args: {key}={value!r}; use one of {', '.join(_WSD_SHAPES)}")
    if name == "piecewise_constant":
        if "step_rules" not in args:
            raise OptimizerConfigError(
                "lr_scheduler 'piecewise_constant' needs lr_scheduler_args step_rules, e.g. "
                "step_rules='1:100,0.5:200,0.1' (factor 1 until step 100, 0.5 until step 200, then 0.1)"
            )
        parse_step_rules(args["step_rules"])
    return args


def parse_step_rules(rules: Any) -> tuple[list[tuple[int, float]], float]:
    """diffusers' piecewise-constant rules ``"f1:s1,f2:s2,...,f_last"``: factor f1 before step s1, f2 before s2, ...,
    f_last after the last step. Returns ((step, factor) sorted by step, last factor)."""
    example = "e.g. step_rules='1:100,0.5:200,0.1'"
    if not isinstance(rules, str) or not rules.strip():
        raise OptimizerConfigError(f"lr_scheduler_args step_rules must be text, {example}; got {rules!r}")
    parts = [part.strip() for part in rules.split(",")]
    try:
        steps = []
        for part in parts[:-1]:
            factor, step = part.split(":")
            steps.append((int(step), float(factor)))
        last = float(parts[-1])
    except ValueError:
        raise OptimizerConfigError(
            f"lr_scheduler_args step_rules {rules!r}: write factor:step pairs and a last factor, {example}"
        ) from None
    return sorted(steps), last


def _piecewise_factor(step: int, *, rules: tuple[tuple[int, float], ...], last: float) -> float:
    for until, factor in rules:
        if step < until:
            return factor
    return last


def _rex_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """REX (Chen et al., "REX: Revisiting Budgeted Training with an Improved Schedule"): (1 - p) / (1 - p/2) of the
    way from the lr down to min_ratio, p the fraction of the steps after warmup; linear warmup before."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) / (1.0 - progress / 2.0)


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


def check_schedule(name: Any, args: str | None, decay_steps: Any, min_lr_ratio: Any) -> None:
    """A schedule's own settings, checked when the settings are made or the prompt is queued (before any model is
    loaded): lr_scheduler_args the schedule takes, the min-lr ratio, and no shape setting that the chosen schedule
    would silently ignore. None: not known yet (a link feeds it at queue time), not checked."""
    if not isinstance(name, str) or name.strip().lower() not in SCHEDULER_TYPES:
        raise OptimizerConfigError(f"unknown lr_scheduler {name!r}; choose one of: {', '.join(SCHEDULER_TYPES)}")
    name = name.strip().lower()
    if args is not None:
        scheduler_args(name, args)
    if min_lr_ratio is not None:
        check_min_lr_ratio(min_lr_ratio)
    if min_lr_ratio and name not in MIN_LR_SCHEDULES:
        raise OptimizerConfigError(
            f"lr_scheduler_min_lr_ratio {min_lr_ratio} is only used by {', '.join(MIN_LR_SCHEDULES)}; set it to 0 "
            f"or choose one of those schedules (lr_scheduler is {name!r})"
        )
    if decay_steps and name != "warmup_stable_decay":
        raise OptimizerConfigError(
            f"lr_decay_steps {decay_steps} is only used by warmup_stable_decay; set it to 0 or choose that schedule "
            f"(lr_scheduler is {name!r})"
        )


def check_min_lr_ratio(ratio: Any) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise OptimizerConfigError(f"lr_scheduler_min_lr_ratio must be a number from 0 to 1, got {ratio!r}")


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
    decay_steps: int | float | str = 0,
    min_lr_ratio: float = 0.0,
    args: str = "",
) -> LRSchedulerLike:
    """The lr scheduler kohya's get_scheduler_fix builds; step it once per optimizer step.

    ``warmup_steps``: an int, or a ratio ``0 < w < 1`` of ``max_train_steps``. ``num_cycles`` is used by
    cosine_with_restarts, ``power`` by polynomial (which decays to transformers' lr_end=1e-7, as in kohya).
    ``initial_lr``: what AdafactorSchedule reports before the first step (kohya passes the learning_rate).
    A relative-step Adafactor always gets AdafactorSchedule and a schedule-free optimizer a constant dummy,
    whatever ``name`` says, as in kohya. ``decay_steps`` (warmup_stable_decay; a step count or a ratio like warmup),
    ``min_lr_ratio`` (cosine_with_min_lr, warmup_stable_decay, rex: where the lr ends, as a fraction of it) and
    ``args`` (lr_scheduler_args: step_rules of piecewise_constant, warmup_type/decay_type of warmup_stable_decay)
    are kohya's lr_decay_steps, lr_scheduler_min_lr_ratio and lr_scheduler_args; kohya passes num_cycles / 2 to
    cosine_with_min_lr and warmup_stable_decay (1 = a half cosine down), and so do we.
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

    from transformers.optimization import AdafactorSchedule, get_scheduler, get_wsd_schedule

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

    extra = scheduler_args(name, args)
    if name == "constant":
        if num_warmup != 0:
            raise OptimizerConfigError("lr_scheduler 'constant' takes no warmup; use 'constant_with_warmup'")
        return get_scheduler(name, optimizer)
    if name == "piecewise_constant":
        if num_warmup != 0:
            raise OptimizerConfigError("lr_scheduler 'piecewise_constant' takes no warmup; put it in its step_rules")
        rules, last = parse_step_rules(extra["step_rules"])
        factor = functools.partial(_piecewise_factor, rules=tuple(rules), last=last)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if num_warmup > max_train_steps:
        logger.warning("warmup (%d steps) is longer than training (%d steps)", num_warmup, max_train_steps)

    if isinstance(num_cycles, bool) or not isinstance(num_cycles, int) or num_cycles < 1:
        raise OptimizerConfigError(f"num_cycles must be an int >= 1, got {num_cycles!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        raise OptimizerConfigError(f"power must be a finite number, got {power!r}")

    check_min_lr_ratio(min_lr_ratio)
    if name == "rex":
        factor = functools.partial(_rex_factor, warmup=num_warmup, total=max_train_steps, min_ratio=float(min_lr_ratio))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    specific: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        specific["num_cycles"] = num_cycles
    elif name == "polynomial":
        specific["power"] = float(power)
    elif name == "cosine_with_min_lr":
        specific.update(num_cycles=num_cycles / 2, min_lr_rate=float(min_lr_ratio))
    elif name == "warmup_stable_decay":
        num_decay = resolve_warmup_steps(decay_steps, max_train_steps)
        if num_decay < 1:
            raise OptimizerConfigError(
                "lr_scheduler 'warmup_stable_decay' needs lr_decay_steps > 0 (a step count, or a ratio below 1 of "
                "the training steps): the steps at the end in which the lr decays"
            )
        if num_warmup + num_decay > max_train_steps:
            raise OptimizerConfigError(
                f"warmup_stable_decay: warmup ({num_warmup}) + decay ({num_decay}) steps exceed the "
                f"{max_train_steps} training steps"
            )
        specific.update(
            num_stable_steps=max_train_steps - num_warmup - num_decay,
            num_decay_steps=num_decay,
            num_cycles=num_cycles / 2,
            min_lr_ratio=float(min_lr_ratio),
            **extra,
        )
    try:
        if name == "warmup_stable_decay":  # kohya calls it directly: its stable steps are the run's count
            return get_wsd_schedule(optimizer, num_warmup_steps=num_warmup, **specific)
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=num_warmup,
            num_training_steps=max_train_steps,
            scheduler_specific_kwargs=specific,
        )
    except ValueError as exc:  # e.g. polynomial: learning rate not above lr_end
        raise OptimizerConfigError(f"lr_scheduler {name!r}: {exc}") from exc
