"""The optimizers this pack offers, built with kohya sd-scripts' semantics.

Mirrors what ``library/train_util.get_optimizer`` and ``get_optimizer``'s callers (sd-scripts ``48d368f``) do for the
optimizers this pack offers, re-implemented here (no sd-scripts code):

* Names are case-insensitive. ``optimizer_args`` are ``key=value`` pairs whose values are Python literals
  (``ast.literal_eval``), e.g. ``weight_decay=0.01 betas=0.9,0.999``; kohya's ``betas=0.9,0.999`` is the tuple
  ``(0.9, 0.999)``. Every optimizer gets ``lr=learning_rate`` plus these kwargs, so per-group ``"lr"`` entries in
  the parameter groups (U-Net / text-encoder learning rates) override it, as in kohya.
* Adafactor: ``relative_step`` defaults to True; ``warmup_init=True`` forces ``relative_step=True``. With
  ``relative_step`` the optimizer is built with ``lr=None`` (transformers refuses a manual lr then), per-group
  learning rates are dropped, and the scheduler is always ``AdafactorSchedule(optimizer, learning_rate)`` (kohya
  rewrites ``--lr_scheduler`` to ``adafactor:<lr>``), which only reports Adafactor's internal step size.
* Schedule-free optimizers (AdamWScheduleFree, ProdigyPlusScheduleFree) are put in train mode right after
  construction. Previews and saved LoRAs use their averaged (eval-mode) weights: ``averaged_weights`` around a preview
  or an intermediate save, ``switch_to_averaged_weights`` once training is over. In train mode the parameters hold
  the interpolated "y" point; eval and train are interpolations that do not undo each other bit for bit, so the
  exact training point is kept and put back (a run with previews trains like one without; a resumable state holds
  the point training continues from). kohya gives them a dummy scheduler (the lr is never scheduled; use
  ``warmup_steps=N`` in optimizer_args for their built-in warmup), and so do we.
* CAME, ADOPT and AdEMAMix come from pytorch-optimizer, ProdigyPlusScheduleFree from prodigy-plus-schedule-free,
  DAdaptAdam from dadaptation (kohya's own DAdaptAdam). kohya has no short name for the first ones; it takes the
  class path (``KOHYA_OPTIMIZER_TYPES``), and ss_optimizer holds the class's full path, as kohya writes it.
* 8-bit optimizers (AdamW8bit, Lion8bit, PagedAdamW8bit, AdEMAMix8bit) come from bitsandbytes and need CUDA.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .optimizer_arg_types import arg_type_problems

logger = logging.getLogger(__name__)

# The optimizer names this pack offers, in kohya's spelling.
OPTIMIZER_TYPES: tuple[str, ...] = (
    "AdamW",
    "AdamW8bit",
    "PagedAdamW8bit",
    "Lion",
    "Lion8bit",
    "Prodigy",
    "Adafactor",
    "AdamWScheduleFree",
    "CAME",
    "ADOPT",
    "AdEMAMix",
    "AdEMAMix8bit",
    "ProdigyPlusScheduleFree",
    "DAdaptAdam",
)
_EIGHT_BIT = {
    "AdamW8bit": "AdamW8bit",
    "Lion8bit": "Lion8bit",
    "PagedAdamW8bit": "PagedAdamW8bit",
    "AdEMAMix8bit": "AdEMAMix8bit",
}
# kohya's bitsandbytes version notes: Lion8bit appeared in 0.38.0, the paged optimizers in 0.39.0; AdEMAMix8bit
# in 0.44.0 (bitsandbytes' changelog).
_EIGHT_BIT_MIN_VERSION = {
    "AdamW8bit": "0.35.0",
    "Lion8bit": "0.38.0",
    "PagedAdamW8bit": "0.39.0",
    "AdEMAMix8bit": "0.44.0",
}

#: the optimizers taken from one PyPI package: name -> (module, class, pip name)
_PACKAGED: dict[str, tuple[str, str, str]] = {
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", "schedulefree"),
    "CAME": ("pytorch_optimizer", "CAME", "pytorch-optimizer"),
    "ADOPT": ("pytorch_optimizer", "ADOPT", "pytorch-optimizer"),
    "AdEMAMix": ("pytorch_optimizer", "AdEMAMix", "pytorch-optimizer"),
    "ProdigyPlusScheduleFree": ("prodigyplus", "ProdigyPlusScheduleFree", "prodigy-plus-schedule-free"),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation"),
}

#: kohya's --optimizer_type for the optimizers kohya has no short name of its own for: the class path its
#: get_optimizer imports (any other optimizer's kohya name is the pack's name)
KOHYA_OPTIMIZER_TYPES: dict[str, str] = {
    "CAME": "pytorch_optimizer.CAME",
    "ADOPT": "pytorch_optimizer.ADOPT",
    "AdEMAMix": "pytorch_optimizer.AdEMAMix",
    "AdEMAMix8bit": "bitsandbytes.optim.AdEMAMix8bit",
    "ProdigyPlusScheduleFree": "prodigyplus.ProdigyPlusScheduleFree",
}

#: optimizers that estimate the step size themselves: the learning rate is a multiplier around 1.0
_LEARNING_RATE_FREE = ("Prodigy", "DAdaptAdam", "ProdigyPlusScheduleFree")

_NON_CUDA_CHOICES = "AdamW, Lion, Prodigy, Adafactor, AdamWScheduleFree, CAME, ADOPT, AdEMAMix or DAdaptAdam"


class OptimizerConfigError(ValueError):
    """The user's optimizer/scheduler settings cannot be used (bad name, bad optimizer_args, bad combination)."""


class OptimizerUnavailableError(RuntimeError):
    """The chosen optimizer needs a package or hardware this Python/machine does not have."""


# --- optimizer_args parsing ---------------------------------------------------------------------------------------

_KEY_AT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=(?!=)")
_BAREWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/:]*")
_SEPARATORS = " \t\r\n,;"
_OPEN, _CLOSE = "([{", ")]}"


def _nesting(text: str) -> Iterator[tuple[int, int, bool]]:
    """``(index, bracket depth, inside quotes)`` after each character; characters escaped inside quotes are skipped.

    WHY one scanner: splitting the pairs and checking a value's balance must agree on what is quoted or bracketed.
    """
    depth = 0
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        yield i, depth, quote is not None
        i += 1


def _find_pair_starts(text: str) -> list[int]:
    """Indices where a ``key=`` starts at bracket depth 0 outside quotes, right after a separator.

    WHY a scanner: commas separate pairs ("a=1,b=2") but also live inside values ("betas=0.9,0.999",
    "betas=(0.9, 0.999)"), so a comma/space only ends a value when a new ``key=`` follows it.
    """
    return [
        i
        for i, depth, quoted in _nesting(text)
        if not quoted and depth == 0 and (i == 0 or text[i - 1] in _SEPARATORS) and _KEY_AT.match(text, i)
    ]


def _unbalanced(raw: str) -> bool:
    """True when a bracket closes before it opens, or a bracket or quote is still open at the end."""
    states = list(_nesting(raw))
    _, final_depth, still_quoted = states[-1] if states else (0, 0, False)
    return final_depth != 0 or still_quoted or any(depth < 0 for _, depth, _ in states)


def _convert_value(key: str, raw: str, what: str = "optimizer_args") -> Any:
    """A Python literal as kohya reads it, plus unquoted words and lowercase true/false/none.

    WHY the extras: kohya's literal_eval rejects ``true`` or ``adam``; passing the string "false" on would be truthy,
    so lowercase booleans become real booleans and other plain words become strings.
    """
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if lowered in ("inf", "+inf", "-inf", "nan"):
        return float(lowered)
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if _BAREWORD.fullmatch(raw):
        return raw
    raise OptimizerConfigError(
        f"{what}: cannot read the value of {key!r}: {raw!r}. Use a Python literal such as 0.01, 1e-3, "
        f"(0.9, 0.999), True or 'text'."
    )


def parse_optimizer_args(text: str | None) -> dict[str, Any]:
    """Parse ``"k=v k2=v2"`` or ``"k=v,k2=v2"`` (kohya's ``--optimizer_args``) into optimizer kwargs.

    Values go through ``ast.literal_eval``; ``betas=0.9,0.999`` is a tuple, as in kohya. Raises OptimizerConfigError
    naming the offending token.
    """
    return parse_key_values(text, "optimizer_args")


def parse_key_values(text: str | None, what: str) -> dict[str, Any]:
    """kohya's ``key=value`` arguments (optimizer_args, lr_scheduler_args) as one string -> keyword arguments."""
    if text is None:
        return {}
    if not isinstance(text, str):
        raise OptimizerConfigError(f"{what} must be a string like 'weight_decay=0.01 betas=0.9,0.999', got {text!r}")
    stripped = text.strip(_SEPARATORS)
    if not stripped:
        return {}

    starts = _find_pair_starts(stripped)
    if not starts or starts[0] != 0:
        end = starts[0] if starts else len(stripped)
        bad = stripped[:end].strip(_SEPARATORS).split()[0] if stripped[:end].strip(_SEPARATORS) else stripped[:end]
        raise OptimizerConfigError(
            f"{what}: expected key=value, got {bad!r} (example: 'weight_decay=0.01 betas=0.9,0.999')"
        )

    result: dict[str, Any] = {}
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else len(stripped)
        token = stripped[start:end].strip(_SEPARATORS)
        match = _KEY_AT.match(token)
        assert match is not None  # guaranteed by _find_pair_starts
        key = match.group(1)
        raw = token[match.end() :].strip(_SEPARATORS)
        if not raw:
            raise OptimizerConfigError(f"{what}: {token!r} has no value after '='")
        if _unbalanced(raw):
            raise OptimizerConfigError(f"{what}: unbalanced brackets or quotes in {token!r}")
        if key in result:
            raise OptimizerConfigError(f"{what}: {key!r} is given twice")
        if what == "optimizer_args" and key in ("lr", "params"):
            raise OptimizerConfigError(
                f"optimizer_args: {key!r} cannot be set here; the learning rate comes from learning_rate "
                f"(and the per-network learning rates)"
            )
        result[key] = _convert_value(key, raw, what)
    return result


# --- settings -----------------------------------------------------------------------------------------------------


def canonical_optimizer_type(name: str) -> str:
    """kohya's spelling of an optimizer name given in any case; unknown names raise with the list of choices."""
    if not isinstance(name, str) or not name.strip():
        raise OptimizerConfigError(f"optimizer_type must be one of: {', '.join(OPTIMIZER_TYPES)}")
    lowered = name.strip().lower()
    for known in OPTIMIZER_TYPES:
        if known.lower() == lowered:
            return known
    if "." in lowered:  # kohya's class path ("pytorch_optimizer.CAME") or ss_optimizer's full one (…came.CAME)
        package, class_name = lowered.split(".")[0], lowered.rsplit(".", 1)[-1]
        for known in OPTIMIZER_TYPES:
            if known.lower() == class_name and package == _package_of(known):
                return known
    raise OptimizerConfigError(f"unknown optimizer_type {name!r}; choose one of: {', '.join(OPTIMIZER_TYPES)}")


@dataclass(frozen=True)
class OptimizerSettings:
    """Which optimizer, with which arguments (kohya's optimizer_type / optimizer_args). Validated on construction so a
    bad node input fails before training. The learning rate and gradient clipping are the run's (TrainConfig)."""

    optimizer_type: str = "AdamW"
    optimizer_args: str = ""

    def __post_init__(self) -> None:
        check_optimizer_args(canonical_optimizer_type(self.optimizer_type), parse_optimizer_args(self.optimizer_args))

    @property
    def canonical_type(self) -> str:
        return canonical_optimizer_type(self.optimizer_type)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The parsed optimizer_args (before kohya's Adafactor adjustments; see resolve_optimizer_kwargs)."""
        return parse_optimizer_args(self.optimizer_args)


def check_optimizer_args(optimizer_type: str, kwargs: dict[str, Any]) -> None:
    """Refuse optimizer_args the optimizer's constructor cannot take (unknown names, wrong value types), all of them
    in one message. Skipped when the optimizer's package is missing here: building it says what to install."""
    if not kwargs:
        return
    try:
        cls = optimizer_class(optimizer_type)
    except OptimizerUnavailableError:
        return
    problems = arg_type_problems(cls, optimizer_type, kwargs)
    if problems:
        raise OptimizerConfigError("optimizer_args: " + "; ".join(problems))


def optimizer_settings_error(optimizer_type: Any, optimizer_args: Any) -> str | None:
    """The message for a node's optimizer/optimizer_args widgets, or None when they can be used (queue-time check)."""
    try:
        OptimizerSettings(optimizer_type, optimizer_args)
    except OptimizerConfigError as error:
        return str(error)
    return None


def resolve_optimizer_kwargs(settings: OptimizerSettings) -> dict[str, Any]:
    """optimizer_args after kohya's per-optimizer adjustments (also what kohya writes into ss_optimizer)."""
    kwargs = settings.kwargs
    if settings.canonical_type == "Adafactor":
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            logger.info("Adafactor: warmup_init=True needs relative_step, setting relative_step=True")
            kwargs["relative_step"] = True
    return kwargs


# --- optimizer construction ---------------------------------------------------------------------------------------


def _import_optional(module: str, pip_name: str, optimizer_type: str) -> Any:
    """Import an optional optimizer package, or say exactly what to install and where."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptimizerUnavailableError(
            f"{optimizer_type} needs the '{pip_name}' package, which is not installed in this Python "
            f"({sys.executable}). pip install {pip_name} into ComfyUI's Python: "
            f'"{sys.executable}" -m pip install {pip_name}'
        ) from exc


def _bitsandbytes_class(optimizer_type: str) -> type:
    """The bitsandbytes class for an 8-bit optimizer; clear errors without CUDA or without the package."""
    if not torch.cuda.is_available():
        raise OptimizerUnavailableError(
            f"{optimizer_type} is a bitsandbytes 8-bit optimizer and needs an NVIDIA GPU with CUDA, but "
            f"torch.cuda.is_available() is False here. Choose {_NON_CUDA_CHOICES} instead."
        )
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as exc:  # bitsandbytes can also fail with RuntimeError while loading its CUDA library
        raise OptimizerUnavailableError(
            f"{optimizer_type} needs the 'bitsandbytes' package, which could not be imported in this Python "
            f"({sys.executable}): {exc}. pip install bitsandbytes into ComfyUI's Python: "
            f'"{sys.executable}" -m pip install bitsandbytes (or choose {_NON_CUDA_CHOICES}).'
        ) from exc
    cls = getattr(getattr(bnb, "optim", None), _EIGHT_BIT[optimizer_type], None)
    if cls is None:
        raise OptimizerUnavailableError(
            f"the installed bitsandbytes ({getattr(bnb, '__version__', '?')}) has no {optimizer_type}; "
            f"install bitsandbytes>={_EIGHT_BIT_MIN_VERSION[optimizer_type]}"
        )
    return cls


def _package_of(optimizer_type: str) -> str:
    """The top-level package an optimizer's class comes from (what a kohya class path starts with)."""
    if optimizer_type in _EIGHT_BIT:
        return "bitsandbytes"
    if optimizer_type in _PACKAGED:
        return _PACKAGED[optimizer_type][0].split(".")[0]
    return "torch"


def optimizer_pip_name(optimizer_type: str) -> str | None:
    """The PyPI package an optimizer comes from (None for torch's own)."""
    if optimizer_type in _EIGHT_BIT:
        return "bitsandbytes"
    return _PACKAGED[optimizer_type][2] if optimizer_type in _PACKAGED else None


def optimizer_class(optimizer_type: str) -> type:
    """The class ``optimizer_type`` (kohya's spelling) is built from; raises OptimizerUnavailableError naming what
    to install when its package (or CUDA, for the 8-bit ones) is missing."""
    if optimizer_type == "AdamW":
        return torch.optim.AdamW
    if optimizer_type in _EIGHT_BIT:
        return _bitsandbytes_class(optimizer_type)
    if optimizer_type in _PACKAGED:
        module, class_name, pip_name = _PACKAGED[optimizer_type]
        return getattr(_import_optional(module, pip_name, optimizer_type), class_name)
    raise OptimizerConfigError(
        f"unknown optimizer_type {optimizer_type!r}; choose one of: {', '.join(OPTIMIZER_TYPES)}"
    )


def _materialize_params(param_groups: Iterable[Any]) -> list[Any]:
    """A fresh list (dicts copied) so kohya's per-optimizer edits never touch the caller's groups."""
    items = [dict(item) if isinstance(item, dict) else item for item in param_groups]
    if not items:
        raise OptimizerConfigError("no trainable parameters were given to the optimizer")
    return items


def _first_group_lr(params: list[Any], default: float) -> float:
    """kohya's "actual_lr": the first group's lr when groups are given, else the run's."""
    first = params[0]
    return first.get("lr", default) if isinstance(first, dict) else default


def _group_lrs(params: list[Any], default: float) -> set[float]:
    return {item.get("lr", default) for item in params if isinstance(item, dict)} or {default}


def build_optimizer(
    param_groups: Iterable[Any], settings: OptimizerSettings, learning_rate: float, *, max_grad_norm: float = 0.0
) -> torch.optim.Optimizer:
    """Build the optimizer kohya's get_optimizer would build for ``settings`` and the run's ``learning_rate``.

    ``param_groups``: tensors, or dicts ``{"params": [...], "lr": ...}`` as kohya's network.prepare_optimizer_params
    returns them (a group "lr" overrides learning_rate, except for relative-step Adafactor). ``max_grad_norm``: the
    run's gradient clipping, only for kohya's Adafactor advice (the loop clips).
    """
    optimizer_type = settings.canonical_type
    kwargs = resolve_optimizer_kwargs(settings)
    params = _materialize_params(param_groups)
    lr: float | None = learning_rate
    cls = optimizer_class(optimizer_type)

    if optimizer_type in _LEARNING_RATE_FREE:
        # WHY: these estimate the step size themselves; lr is a multiplier around 1.0 (kohya warns the same way).
        first_lr = _first_group_lr(params, lr)
        if first_lr <= 0.1:
            logger.warning(
                "%s: learning_rate %s is very low; it expects a learning rate around 1.0", optimizer_type, first_lr
            )
        if optimizer_type != "ProdigyPlusScheduleFree" and len(_group_lrs(params, lr)) > 1:
            # ProdigyPlusScheduleFree keeps one step-size estimate per group (split_groups); the others share one
            logger.warning("%s: several learning rates were given; only the first group's takes effect", optimizer_type)
    elif optimizer_type == "Adafactor":
        if kwargs["relative_step"]:
            if lr != 0.0:
                logger.warning("Adafactor relative_step: learning_rate %s is only used as initial_lr for logging", lr)
            dropped = False
            for item in params:
                if isinstance(item, dict) and item.pop("lr", None) is not None:
                    dropped = True
            if dropped:
                logger.warning("Adafactor relative_step: per-network learning rates are ignored")
            lr = None  # transformers refuses a manual lr together with relative_step=True
        else:
            if max_grad_norm != 0.0:
                logger.warning("Adafactor: max_grad_norm is set so gradients are clipped; consider max_grad_norm=0")
            if kwargs.get("clip_threshold", 1.0) != 1.0:
                logger.warning("Adafactor: clip_threshold=1.0 is recommended")

    try:
        optimizer = cls(params, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise OptimizerConfigError(
            f"{optimizer_type} ({cls.__module__}.{cls.__name__}) rejected lr={lr} with optimizer_args {kwargs}: {exc}"
        ) from exc

    logger.info("optimizer %s | %s", optimizer_type, kwargs)
    if is_schedule_free(optimizer):
        optimizer_train_mode(optimizer)  # kohya: train mode before training; step() refuses otherwise
    return optimizer


def optimizer_metadata_name(optimizer: torch.optim.Optimizer, settings: OptimizerSettings) -> str:
    """kohya's ``ss_optimizer`` metadata value: ``module.Class(k=v,...)`` with the adjusted kwargs."""
    cls = type(optimizer)
    kwargs = resolve_optimizer_kwargs(settings)
    name = f"{cls.__module__}.{cls.__name__}"
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}({args})" if args else name


def is_schedule_free(optimizer: Any) -> bool:
    """True for schedule-free optimizers (they keep two weight sets and need train/eval switching). kohya's test:
    the optimizer's name ends with "ScheduleFree" (schedulefree's, ProdigyPlusScheduleFree, pytorch-optimizer's)."""
    return type(optimizer).__name__.lower().endswith("schedulefree") and callable(getattr(optimizer, "eval", None))


def _in_train_mode(optimizer: Any) -> bool:
    return any(group.get("train_mode", False) for group in optimizer.param_groups)


def _params(optimizer: Any) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_train_mode(optimizer: Any) -> None:
    """Switch a schedule-free optimizer to train mode (before optimizer steps); no-op for other optimizers."""
    if is_schedule_free(optimizer):
        optimizer.train()


def optimizer_eval_mode(optimizer: Any) -> None:
    """Switch a schedule-free optimizer to eval mode (before sampling/validation/saving); no-op otherwise."""
    if is_schedule_free(optimizer):
        optimizer.eval()


@torch.no_grad()
def switch_to_averaged_weights(optimizer: Any) -> list[torch.Tensor] | None:
    """Put a schedule-free optimizer in eval mode for good (training is over) and return the exact training point
    (the parameters before the switch) for ``training_point``; None for other optimizers or when already in eval.

    WHY keep the point: eval and train mode are interpolations that do not undo each other bit for bit, and a
    resumable state must hold the very parameters training continues from."""
    if not is_schedule_free(optimizer) or not _in_train_mode(optimizer):
        return None
    point = [p.detach().clone() for p in _params(optimizer)]
    optimizer.eval()
    return point


@contextlib.contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """Inside: a schedule-free optimizer's parameters are its averaged (eval-mode) weights, the ones to preview and
    save. After: train mode with exactly the parameters from before, so a run with intermediate saves or previews
    trains bit for bit like one without. A no-op for other optimizers and in eval mode."""
    point = switch_to_averaged_weights(optimizer)
    try:
        yield
    finally:
        if point is not None:
            _restore_training_point(optimizer, point)


@torch.no_grad()
def _restore_training_point(optimizer: Any, point: list[torch.Tensor]) -> None:
    optimizer.train()
    for param, value in zip(_params(optimizer), point, strict=True):
        param.copy_(value)


@contextlib.contextmanager
def training_point(optimizer: Any, point: list[torch.Tensor] | None) -> Iterator[None]:
    """Inside: the optimizer in train mode at the exact ``point`` ``switch_to_averaged_weights`` returned (what a
    resumable state saves); after: eval mode again, with the same averaged weights (eval from the same point is the
    same computation). A no-op when ``point`` is None."""
    if point is None:
        yield
        return
    _restore_training_point(optimizer, point)
    try:
        yield
    finally:
        optimizer.eval()
