"""What a run leaves behind while it trains: intermediate LoRAs (every N steps/epochs, keep last N),
resumable state folders.

Intermediate files are full kohya LoRAs with their step/epoch in name and metadata. Only files this
run wrote are ever deleted by keep-last-N. A save that fails here (disk full, permissions) is a warning: training
goes on and the report lists what was not saved, because losing the whole run to a missed intermediate file is
worse than missing the file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic_files import sweep_stale_temp_files
from .loop import LoopState, StepRecord
from .lora_output import SavedLora
from .optimizers import training_point
from .resume_state import save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointSettings:
    """The 'Save Every N & Resume' node's value; every 0 means off."""

    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    keep_last_n: int = 0  # 0 keeps every intermediate file
    save_state_every_n_steps: int = 0
    save_state_on_cancel: bool = True
    resume_from: str = ""  # a state folder written by an earlier run; "" = start fresh

    def __post_init__(self) -> None:
        object.__setattr__(self, "resume_from", self.resume_from.strip())  # a pasted path often ends in a newline
        for name in ("save_every_n_steps", "save_every_n_epochs", "keep_last_n", "save_state_every_n_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")


@dataclass
class RunArtifacts:
    """Called from the train node's per-step hook and at the end of a run."""

    settings: CheckpointSettings
    save_lora: Callable[[str, int, int], SavedLora]  # (tag suffix, step, epoch) -> file
    state_root: Path
    fingerprint: dict
    intermediates: list[SavedLora] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # saves that failed; the run went on
    _last_epoch_saved: int = 0

    def on_step(self, record: StepRecord, result: Any) -> None:
        s = self.settings
        state: LoopState = result.state
        epoch_done = state.batch_in_epoch == 0 and state.epoch > self._last_epoch_saved
        if (s.save_every_n_steps and record.step % s.save_every_n_steps == 0) or (
            s.save_every_n_epochs
            and epoch_done
            and state.epoch % s.save_every_n_epochs == 0
            and record.step < result.total_steps
        ):
            if epoch_done:
                self._last_epoch_saved = state.epoch
            try:
                saved = self.save_lora(f"step{record.step:06d}", record.step, state.epoch)
            except OSError as e:
                self.warn(f"step {record.step}: the intermediate LoRA was not saved, training continues: {e}")
            else:
                self.intermediates.append(saved)
                self._prune()
        if s.save_state_every_n_steps and record.step % s.save_state_every_n_steps == 0:
            try:
                self.save_state(result)
            except OSError as e:
                self.warn(f"step {record.step}: the resumable state was not saved, training continues: {e}")

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("SDXL LoRA trainer: %s", message)

    def _prune(self) -> None:
        keep = self.settings.keep_last_n
        while keep and len(self.intermediates) > keep:
            old = self.intermediates.pop(0)
            for path in (old.path, *(c.path for c in old.companions)):
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    def save_state(self, result: Any) -> Path:
        state: LoopState = result.state
        folder = self.state_root / f"step-{state.global_step:06d}"
        # after training a schedule-free optimizer holds its averaged weights; the state holds the training point
        with training_point(result.optimizer, result.training_point):
            save_state(
                folder,
                network=result.network.state_dict_kohya(),
                optimizer=result.optimizer.state_dict(),
                scheduler=result.scheduler.state_dict() if result.scheduler is not None else None,
                scaler=result.scaler.state_dict() if result.scaler is not None else None,
                loop=state,
                fingerprint=self.fingerprint,
                ema=result.ema.state_tensors() if result.ema is not None else None,
                ema_updates=result.ema.updates if result.ema is not None else 0,
            )
        self._point_latest_at(folder)
        self.states.append(folder)
        return folder

    def _point_latest_at(self, folder: Path) -> None:
        latest = self.state_root / "latest"
        tmp = self.state_root / ".latest.tmp"
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(folder.name)
        os.replace(tmp, latest)


# mkstemp names of state files written by earlier versions (no pid in the name): ``.state.json.k2j3h4g5.tmp``
_OLD_STATE_TEMP = re.compile(r"^\.state\.(safetensors|json)\.[A-Za-z0-9_]{8}\.tmp$")


def sweep_run_leftovers(lora_folder: Path, states_root: Path, process_started: float) -> list[Path]:
    """Remove what killed saves left behind: stale temp files next to the LoRAs, stale staging folders and temp files
    in the state folders, and step folders emptied by that. Called when a run starts; returns what was removed.

    Only this pack's hidden temp names are touched, and only when their writer is gone (atomic_files.is_stale_temp);
    temps of earlier versions, which carry no pid, only when they are older than this process.
    """
    removed = sweep_stale_temp_files(lora_folder)
    removed += sweep_stale_temp_files(states_root, depth=2)  # state/<run>/step-N/<file>
    try:
        runs = [p for p in states_root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        runs = []
    for run_folder in runs:
        for step in run_folder.glob("step-*"):
            if step.is_symlink() or not step.is_dir():
                continue
            for leftover in step.iterdir():
                try:
                    if _OLD_STATE_TEMP.match(leftover.name) and leftover.stat().st_mtime < process_started:
                        leftover.unlink()
                        removed.append(leftover)
                except OSError:
                    pass
            try:
                step.rmdir()  # only succeeds when nothing is left in it
                removed.append(step)
            except OSError:
                pass
    return removed


def process_start_time() -> float:
    """When this process started (epoch seconds): temps without a pid older than this belong to a dead process."""
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - psutil missing or refusing: nothing without a pid is swept
        return 0.0
