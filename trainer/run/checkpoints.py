"""What a run leaves behind while it trains: intermediate LoRAs (every N steps/epochs, keep last N),
resumable state folders.

Intermediate files are full kohya LoRAs with their step/epoch in name and metadata. Only files this
run wrote are ever deleted by keep-last-N.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loop import LoopState, StepRecord
from .lora_output import SavedLora
from .resume_state import save_state


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
            saved = self.save_lora(f"step{record.step:06d}", record.step, state.epoch)
            self.intermediates.append(saved)
            self._prune()
        if s.save_state_every_n_steps and record.step % s.save_state_every_n_steps == 0:
            self.save_state(result)

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
        latest = self.state_root / "latest"
        tmp = self.state_root / ".latest.tmp"
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(folder.name)
        os.replace(tmp, latest)
        self.states.append(folder)
        return folder
