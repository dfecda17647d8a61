"""One train-node run, start to finish: train, report progress, save intermediate files and states,
render previews, save the final LoRA and its logs, and on Cancel save and stop.

The train node builds the settings from its widgets and runs a ``TrainJob``; everything that happens
during the run lives here so the node stays a schema.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..comfyui import graph as comfy_graph
from ..comfyui import services as comfy_services
from ..data.dataset import TrainingDataset
from ..network.checkpoint_hashes import checkpoint_hashes
from ..network.config import NetworkSetup
from ..network.file_names import safe_relative_name
from .checkpoints import CheckpointSettings, RunArtifacts
from .config import TrainConfig
from .ema import EmaSettings
from .events import RunEvents, RunObservers
from .live_log import LiveLog, LogSettings, new_log_dir
from .logs import write_logs
from .loop import LoopState, StepRecord
from .lora_output import (
    OutputSettings,
    SavedLora,
    dataset_metadata,
    network_metadata,
    run_tag,
    save_run_lora,
    training_metadata,
)
from .previews import PreviewRenderer, PreviewRequest
from .resume_state import StateError, load_state
from .session import TrainResult, train

PROGRESS_EVENT = "sdxl_lora_trainer.progress"


@dataclass
class JobResult:
    weights: dict[str, torch.Tensor]  # the trained LoRA, kohya keys (LORA_MODEL)
    saved: SavedLora
    state: LoopState
    steps_per_epoch: int
    report: str
    previews: torch.Tensor | None  # all preview images [N,H,W,3], or None


def _finite(v: float) -> float | None:
    """JSON for the browser: aiohttp writes NaN/inf as bare tokens that JSON.parse rejects."""
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


class TrainJob(RunEvents):
    """One train-node run: trains, and while it does, observes the run (it is the run's RunEvents): progress bar and
    websocket events, intermediate LoRAs and states, previews, cancel. Then the final save, logs and the report."""

    def __init__(
        self,
        *,
        dataset: TrainingDataset,
        network: NetworkSetup,
        config: TrainConfig,
        out: OutputSettings,
        checkpointing: CheckpointSettings | None,
        previews: PreviewRequest | None,
        node_id: str | None,
        ema: EmaSettings | None = None,
        logging: LogSettings | None = None,
        prompt: Any = None,
        extra_pnginfo: Any = None,
    ) -> None:
        self.dataset = dataset
        self.network = network
        self.config = config
        self.out = out
        self.checkpointing = checkpointing or CheckpointSettings()
        self.ema = ema
        self.logging = logging
        self.node_id = node_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        self.total_steps = config.total_steps(dataset)
        self.progress = comfy_services.Progress(self.total_steps, node_id)
        self.started = time.time()
        tag = run_tag(config.seed)
        self.lora_tag = out.lora_tag(tag)  # empty with overwrite: the exact name is reused
        self.loras_root = comfy_services.loras_directory()
        self.fingerprint = run_fingerprint(dataset, network.config, config, ema)
        self.renderer = PreviewRenderer(previews.settings, previews.clip, previews.vae) if previews else None
        self.train_te = network.config.train_te1 or network.config.train_te2
        self.artifacts = RunArtifacts(
            self.checkpointing,
            lambda suffix, step, epoch: self._save(f"-{suffix}", step, epoch),
            Path(comfy_services.output_directory()) / "sdxl_lora_trainer" / "state" / f"{out.name}_{tag}",
            self.fingerprint,
        )
        self.run: TrainResult | None = None  # set when training starts
        self.live_log: LiveLog | None = None  # set when execute starts
        self.observers: RunEvents = self
        self.checkpoint: dict[str, str] = {}  # ss_sd_model_name and hashes, set when the job starts

    def execute(self, model: Any, clip: Any, latents: Any, text: Any) -> JobResult:
        """Train and save. Raises ComfyUI's interrupt after saving when the user cancelled."""
        ckpt = self.checkpointing
        resume = load_state(ckpt.resume_from, self.fingerprint) if ckpt.resume_from else None
        if resume is not None:
            self._require_steps_left(ckpt.resume_from, resume["loop"].global_step)
        self.checkpoint = base_checkpoint_metadata(self.prompt, self.node_id)
        comfy_services.reset_interrupt_note()
        self.live_log = LiveLog(self._log_folder(), self.logging, self._logged_config())
        self.observers = RunObservers(self, self.live_log)
        try:
            return self._train_and_save(model, clip, latents, text, resume)
        finally:
            self.live_log.close()

    def _train_and_save(self, model: Any, clip: Any, latents: Any, text: Any, resume: dict | None) -> JobResult:
        result = train(
            model,
            clip,
            self.dataset,
            latents,
            text,
            self.network.config,
            self.config,
            initial_weights=self.network.initial_weights,
            resume=resume,
            events=self.observers,
            ema=self.ema,
        )
        self.run = result
        state = result.state
        saved = self._save("", state.global_step, state.epoch + (1 if state.batch_in_epoch else 0))
        write_logs(saved.path, state.history)
        if state.interrupted:
            self._stop_cancelled(saved)
        ema_is_main = result.ema is not None and self.ema.save_as == "main_file"
        return JobResult(
            weights=result.ema.state_dict_kohya() if ema_is_main else result.network.state_dict_kohya(),
            saved=saved,
            state=state,
            steps_per_epoch=result.steps_per_epoch,
            report=self._report(saved),
            previews=torch.cat(self.renderer.images) if self.renderer is not None and self.renderer.images else None,
        )

    def _require_steps_left(self, state_folder: str, done: int) -> None:
        """A state at or past this run's last step has nothing left to train: say so before anything is saved (a
        new file would only repeat the state's weights under a new name)."""
        if done < self.total_steps:
            return
        target = (
            f"max_train_epochs {self.config.max_train_epochs} = {self.total_steps} steps"
            if self.config.max_train_epochs > 0
            else f"max_train_steps is {self.total_steps}"
        )
        raise StateError(
            f"the resumable state {state_folder} is already at step {done} and {target}: nothing is left to "
            f"train and nothing was saved. To train on from it, raise max_train_steps (or max_train_epochs) above "
            f"{done}; to use the weights of step {done}, load the LoRA that run saved."
        )

    # -- what the run tells us (RunEvents) ------------------------------------------------------------------
    def training_started(self, run: TrainResult) -> None:
        self.run = run

    def cancel_requested(self) -> bool:
        return comfy_services.interrupted()

    def is_cancel(self, error: BaseException) -> bool:
        return comfy_services.is_interrupt(error)

    def step_finished(self, record: StepRecord) -> None:
        total = self.total_steps
        elapsed = time.time() - self.started
        rate = record.step / elapsed if elapsed > 0 else 0.0
        eta = (total - record.step) / rate if rate > 0 else 0.0
        self.artifacts.on_step(record, self.run)
        preview = None
        if self.renderer is not None and self.renderer.due(record.step) and record.step < total:
            preview = preview_frame(self._render_previews(record.step))
        self.progress.update(
            record.step,
            total,
            text=f"step {record.step}/{total}  loss {record.loss:.4f}  "
            f"lr {record.lr:.2e}  {rate:.2f} it/s  ETA {eta:.0f}s",
            preview=preview,
        )
        self.progress.event(
            PROGRESS_EVENT,
            {
                "node": self.node_id,
                "step": record.step,
                "total": total,
                "loss": _finite(record.loss),
                "lr": _finite(record.lr),
                "it_s": _finite(rate),
                "eta_s": _finite(eta),
                "epoch": record.epoch,
            },
        )

    def training_finished(self) -> None:
        if self.renderer is not None:
            self._render_previews(self.run.state.global_step)

    # -- saving and reporting ----------------------------------------------------------------------------------
    def _save(self, suffix: str, step: int, epoch: int) -> SavedLora:
        """The LoRA of this step; with an EMA also its averaged weights, as the file itself or an ``_ema`` file."""
        run = self.run

        def save(**kwargs: Any) -> SavedLora:
            return save_run_lora(
                run.network,
                self.loras_root,
                self.out,
                run_tag=self.lora_tag + suffix if self.lora_tag else suffix.lstrip("-"),
                training=training_metadata(
                    replace(self.config, train_dtype=run.train_dtype),
                    run.optimizer,
                    run.steps_per_epoch,
                    run.total_steps,
                    self.started,
                    self.out.name,
                )
                | self.checkpoint,
                dataset=dataset_metadata(self.dataset),
                network_meta=network_metadata(self.network.config),
                step=step,
                epoch=epoch,
                prompt=self.prompt,
                extra_pnginfo=self.extra_pnginfo,
                v_parameterization=run.prediction_type == "v_prediction",
                **kwargs,
            )

        if run.ema is None:
            return save()
        averaged = {"weights": run.ema.state_dict_kohya(), "extra_metadata": ema_metadata(self.ema, run.ema.updates)}
        if self.ema.save_as == "main_file":
            return save(**averaged)
        saved = save()
        saved.companions.append(save(companion_of=saved, **averaged))
        return saved

    def _render_previews(self, step: int) -> list[torch.Tensor]:
        """Previews inside the run, with the MODEL/CLIP it trains through (and the EMA weights when asked), told to
        the run's observers (the live log); a Cancel pressed meanwhile is remembered so the loop stops and saves."""
        run = self.run
        averaged = run.ema is not None and self.ema.use_for_previews
        try:
            with run.ema.swapped_in() if averaged else contextlib.nullcontext():
                images = self.renderer.render(
                    run.models.model, run.network, training_clip=run.models.clip if self.train_te else None
                )
            self.observers.previews_rendered(step, images)
            return images
        except BaseException as e:  # noqa: BLE001 - only ComfyUI's interrupt is swallowed
            if comfy_services.is_interrupt(e):
                comfy_services.note_interrupt()
                return []
            raise

    def _stop_cancelled(self, saved: SavedLora) -> None:
        """Cancel: the LoRA is saved, the resumable state too (when asked); then ComfyUI's interrupt is raised."""
        state = self.run.state
        where = f"LoRA saved as {saved.lora_name}"
        if self.checkpointing.save_state_on_cancel:
            where += f"; resumable state in {self.artifacts.save_state(self.run)}"
        self.progress.update(
            state.global_step, self.run.total_steps, text=f"cancelled at step {state.global_step}; {where}"
        )
        comfy_services.note_interrupt()
        self.progress.event(
            PROGRESS_EVENT, {"node": self.node_id, "cancelled": True, "step": state.global_step, "message": where}
        )
        comfy_services.raise_interrupt()

    def _report(self, saved: SavedLora) -> str:
        run, state = self.run, self.run.state
        final = state.history[-1].loss if state.history else float("nan")
        report = (
            f"trained {state.global_step} steps ({run.steps_per_epoch} per epoch) in "
            f"{time.time() - self.started:.1f}s; final loss {final:.4f}\nsaved {saved.path}\n"
            f"lora_name: {saved.lora_name}"
        )
        if run.ema is not None:
            where = "in this file" if self.ema.save_as == "main_file" else f"in {saved.companions[0].lora_name}"
            report += f"\nEMA of the weights ({run.ema.updates} updates, decay {self.ema.decay}) {where}"
        if self.artifacts.intermediates:
            report += "\nintermediate: " + ", ".join(s.lora_name for s in self.artifacts.intermediates)
        if self.artifacts.states:
            report += f"\nstate: {self.artifacts.states[-1]}"
        report += f"\nTensorBoard log: {self.live_log.folder} (tensorboard --logdir {self.loras_root})"
        return report + "".join(f"\n{note}" for note in [*run.notes, *self.live_log.notes])

    def _log_folder(self) -> Path:
        """``logs/<start time>_<name>_s<seed>`` in the LoRA's folder, beside its CSV/JSONL log."""
        subfolders = safe_relative_name(self.out.subfolder, self.out.name).split("/")[:-1]
        root = Path(self.loras_root, *subfolders, "logs")
        return new_log_dir(root, self.out.name, self.config.seed, self.started)

    def _logged_config(self) -> dict:
        """The run's settings as the logs' config (TensorBoard text, W&B config)."""
        config = {"train": asdict(self.config), "network": asdict(self.network.config)}
        if self.ema is not None:
            config["ema"] = asdict(self.ema)
        return config


def base_checkpoint_metadata(prompt: Any, node_id: str | None) -> dict[str, str]:
    """kohya's ss_sd_model_name / ss_sd_model_hash / ss_new_sd_model_hash of the checkpoint file the node's MODEL was
    loaded from (found in the queued prompt); none when the MODEL did not come from a checkpoint file."""
    path = comfy_graph.model_source(prompt, node_id).checkpoint_path
    if not path or not os.path.isfile(path):
        return {}
    return checkpoint_hashes(path).training_metadata()


def preview_frame(images: list[torch.Tensor]):
    """The first preview as the (format, PIL image, max size) tuple ComfyUI's progress hook streams."""
    if not images:
        return None
    from PIL import Image

    arr = (images[0][0].clamp(0, 1) * 255).round().byte().cpu().numpy()
    return ("JPEG", Image.fromarray(arr), 512)


def ema_metadata(settings: EmaSettings, updates: int) -> dict[str, str]:
    """What a file holding averaged weights says about them (not a kohya key: kohya's LoRA training has no EMA)."""
    return {
        "sdxl_lora_trainer.ema": json.dumps(
            {
                "decay": settings.decay,
                "warmup_power": settings.warmup_power,
                "update_every_n_steps": settings.update_every_n_steps,
                "start_step": settings.start_step,
                "updates": updates,
            }
        )
    }


def run_fingerprint(dataset, network_config, config: TrainConfig, ema: EmaSettings | None = None) -> dict:
    """What must be equal for a saved state to be resumed (max steps may change)."""
    data = json.dumps([[i.key, list(i.selection.bucket), i.item.caption, i.item.num_repeats] for i in dataset.images])
    return {
        "dataset": hashlib.sha256(data.encode()).hexdigest()[:16],
        "network": repr(network_config),
        "seed": config.seed,
        "optimizer": repr(config.optimizer),
        "learning_rate": config.learning_rate,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "lr_scheduler": config.lr_scheduler,
        "train_dtype": config.train_dtype,
        "loss": repr(config.loss),
        "noise": repr(config.noise),
        # only with an EMA, so states saved without one (and before EMA existed) keep their fingerprint
        **({"ema": [ema.decay, ema.warmup_power, ema.update_every_n_steps, ema.start_step]} if ema else {}),
    }
