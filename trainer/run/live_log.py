"""The live log of a run: TensorBoard event files, and Weights & Biases when asked, written while it trains.

Why live: a long run can be watched (and compared with earlier ones) in TensorBoard as it goes, not only after it
ended. Each run gets its own folder ``<loras>/<subfolder>/logs/<YYYYmmdd-HHMMSS>_<name>_s<seed>`` next to its
CSV/JSONL log, so folders sort by start time and ``tensorboard --logdir <loras folder>`` shows every run.

The log is a ``RunEvents`` observer: it hears each finished step (loss, kohya's loss/average, lr per parameter
group, gradient norm), the sample previews and, when a validation loss is computed, that too. Scalar names follow
kohya's TensorBoard logs (``loss/current``, ``loss/average``, ``lr/<group>``, ``lr/d*lr/<group>``), so runs of both
tools read alike. A log that cannot be written (disk full, permissions) stops with a note in the train node's
report; it never fails the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..report_images import smoothed
from .events import RunEvents
from .loop import StepRecord
from .validation import ValidationRecord


@dataclass(frozen=True)
class LogSettings:
    """The Logging node's value. ``wandb_project``: also log to this Weights & Biases project ("" = TensorBoard
    only); needs the ``wandb`` package. ``wandb_run_name``: the run's name there ("" = its log folder's name)."""

    wandb_project: str = ""
    wandb_run_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "wandb_project", self.wandb_project.strip())
        object.__setattr__(self, "wandb_run_name", self.wandb_run_name.strip())
        error = wandb_project_error(self.wandb_project)
        if error:
            raise ValueError(error)


def wandb_project_error(project: str) -> str | None:
    """Why ``project`` cannot be logged to here (for the node's validation at queue time), or None."""
    if project.strip() and importlib.util.find_spec("wandb") is None:
        return (
            f"wandb_project is {project.strip()!r} but the wandb package is not installed in ComfyUI's Python: "
            "pip install wandb (then `wandb login`), or leave wandb_project empty for TensorBoard only."
        )
    return None


def new_log_dir(root: Path, name: str, seed: int, started: float) -> Path:
    """Create this run's folder under ``root`` (``<start time>_<name>_s<seed>``, ``_2``... if taken)."""
    base = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}_{name}_s{seed}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = root / (base if n == 1 else f"{base}_{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free log folder for {base!r} in {root}")


class LiveLog(RunEvents):
    """TensorBoard (and W&B) logging of one run; ``close()`` when the run ends, also on cancel or error."""

    def __init__(self, folder: Path, settings: LogSettings | None = None, config: dict | None = None) -> None:
        self.folder = folder
        self.notes: list[str] = []
        try:
            self.tensorboard = _summary_writer(folder)
        except OSError as e:
            self.tensorboard = None
            self.notes.append(f"WARNING: no TensorBoard log: {folder} cannot be written ({e})")
        if self.tensorboard is None and not self.notes:
            self.notes.append(
                "no TensorBoard log: the tensorboard package is missing (pip install -r requirements.txt)"
            )
        elif self.tensorboard is not None and config:
            with self._guard(None):
                self.tensorboard.add_text("config", f"```\n{json.dumps(config, indent=1, default=str)}\n```", 0)
        self.wandb = None
        settings = settings or LogSettings()
        if settings.wandb_project:
            self.wandb = _start_wandb(settings, folder, config or {})
        self.group_names: list[str] = []
        self.optimizer: Any = None
        self.window = 1
        self.losses: list[float] = []

    # -- what the run tells us
    def training_started(self, run: Any) -> None:
        self.group_names = list(run.group_names)
        self.optimizer = run.optimizer
        self.window = max(1, run.steps_per_epoch)
        self.losses = [r.loss for r in run.state.history]  # a resumed run continues kohya's average

    def step_finished(self, record: StepRecord) -> None:
        self._scalars(self.step_scalars(record), record.step)

    def previews_rendered(self, step: int, images: list[torch.Tensor]) -> None:
        pictures = [(image[0].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu() for image in images]
        if self.tensorboard is not None:
            with self._guard(step):
                for i, pixels in enumerate(pictures):
                    self.tensorboard.add_image(f"preview/{i}", pixels.numpy(), step, dataformats="HWC")
                self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"preview/{i}": wandb.Image(p.numpy()) for i, p in enumerate(pictures)}, step=step)

    def validation_finished(self, record: ValidationRecord) -> None:
        self._scalars({"loss/validation": record.loss}, record.step)

    def close(self) -> None:
        if self.tensorboard is not None:
            with self._guard(None):
                self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    # -- what is written
    def step_scalars(self, record: StepRecord) -> dict[str, float]:
        """kohya's step logs: loss/current, loss/average (mean over the last epoch's steps), lr per group (and
        d*lr for the D-adapting optimizers), plus the gradient norm and the step time."""
        self.losses.append(record.loss)
        scalars = {
            "loss/current": record.loss,
            "loss/average": smoothed(self.losses[-self.window :], self.window)[-1],
            "timestep/mean": record.timestep_mean,
            "time/seconds_per_step": record.seconds,
            "epoch": float(record.epoch),
        }
        if record.grad_norm is not None:
            scalars["grad/norm"] = record.grad_norm
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        for i, group in enumerate(groups):
            name = self.group_names[i] if i < len(self.group_names) else f"group{i}"
            scalars[f"lr/{name}"] = float(group["lr"])
            if "d" in group:
                scalars[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
        return scalars

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            with self._guard(step):
                for tag, value in scalars.items():
                    self.tensorboard.add_scalar(tag, value, step)
                self.tensorboard.flush()  # a few hundred bytes: TensorBoard shows the step now
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    @contextlib.contextmanager
    def _guard(self, step: int | None) -> Iterator[None]:
        """A failed write stops the TensorBoard log with a note (the report's), never the run."""
        try:
            yield
        except OSError as e:
            where = f" at step {step}" if step is not None else ""
            self.notes.append(f"WARNING: the TensorBoard log in {self.folder} stopped{where}: {e}")
            writer, self.tensorboard = self.tensorboard, None
            with contextlib.suppress(Exception):
                writer.close()


def _summary_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def _start_wandb(settings: LogSettings, folder: Path, config: dict) -> Any:
    """A W&B run whose files live in the run's log folder; a clear error before training when it cannot start."""
    import wandb

    try:
        return wandb.init(
            project=settings.wandb_project,
            name=settings.wandb_run_name or folder.name,
            dir=str(folder),
            config=json.loads(json.dumps(config, default=str)),
            settings=wandb.Settings(console="off"),  # ComfyUI's own console stays as it is
        )
    except Exception as e:  # noqa: BLE001 - any failure to start is reported the same way
        raise RuntimeError(
            f"Weights & Biases could not start a run in project {settings.wandb_project!r} ({e}). Log in with "
            "`wandb login` or set WANDB_API_KEY (WANDB_MODE=offline logs without an account), or leave "
            "wandb_project empty."
        ) from e
