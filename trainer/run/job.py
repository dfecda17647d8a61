"""One train-node run, start to finish: train, report progress, save intermediate files and states,
render previews, save the final LoRA and its logs, and on Cancel save and stop.

Failed saves never throw the training away: a failed intermediate LoRA, state or log is a warning in the report;
a failed final save still returns the trained LoRA (MODEL/CLIP with it applied, LORA_MODEL) with the error in the
report, so it can be saved elsewhere.

The train node builds the settings from its widgets and runs a ``TrainJob``; everything that happens
during the run lives here so the node stays a schema.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..comfyui import graph as comfy_graph
from ..comfyui import sampling as comfy_sampling
from ..comfyui import services as comfy_services
from ..data.dataset import TrainingDataset
from ..network.checkpoint_hashes import checkpoint_hashes
from ..network.config import NetworkSetup
from ..network.file_names import safe_relative_name
from .checkpoints import CheckpointSettings, RunArtifacts, process_start_time, sweep_run_leftovers
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
    shipped_weights,
    training_metadata,
    validation_metadata,
)
from .optimizers import averaged_weights
from .previews import PreviewRenderer, PreviewRequest
from .resume_state import StateError, load_state
from .session import TrainResult, train
from .validation import ValidationRecord, ValidationRequest

PROGRESS_EVENT = "sdxl_lora_trainer.progress"
STATES_FOLDER = ("sdxl_lora_trainer", "state")  # under ComfyUI's output folder: state/<run>/step-N

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    weights: dict[str, torch.Tensor]  # the trained LoRA as the file holds it, kohya keys (LORA_MODEL)
    model: Any  # the incoming MODEL with ``weights`` applied (a clone)
    clip: Any  # the incoming CLIP with ``weights`` applied, or None without a CLIP
    saved: SavedLora | None  # None when the final save failed (``save_error`` says why)
    save_error: str | None
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
        log_settings: LogSettings | None = None,
        prompt: Any = None,
        extra_pnginfo: Any = None,
        validation: ValidationRequest | None = None,
    ) -> None:
        self.dataset = dataset
        self.validation = validation
        self.network = network
        self.config = config
        self.out = out
        self.checkpointing = checkpointing or CheckpointSettings()
        self.ema = ema
        self.log_settings = log_settings
        self.node_id = node_id
        self.prompt = prompt
        self.extra_pnginfo = extra_pnginfo
        self.total_steps = config.total_steps(dataset)
        self.progress = comfy_services.Progress(self.total_steps, node_id)
        self.started = time.time()
        tag = run_tag(config.seed)
        self.lora_tag = out.lora_tag(tag)  # empty with overwrite: the exact name is reused
        self.loras_root = comfy_services.loras_directory()
        self.states_root = Path(comfy_services.output_directory()).joinpath(*STATES_FOLDER)
        self.fingerprint = run_fingerprint(dataset, network.config, config, ema)
        self.renderer = PreviewRenderer(previews.settings, previews.clip, previews.vae) if previews else None
        self.train_te = network.config.train_te1 or network.config.train_te2
        self.artifacts = RunArtifacts(
            self.checkpointing,
            lambda suffix, step, epoch: self._save(f"-{suffix}", step, epoch),
            self.states_root / f"{out.name}_{tag}",
            self.fingerprint,
        )
        self.run: TrainResult | None = None  # set when training starts
        self.checkpoint: dict[str, str] = {}  # ss_sd_model_name and hashes, set when the job starts
        self.live_log: LiveLog | None = None  # set when execute starts
        self.observers: RunEvents = self

    def execute(self, model: Any, clip: Any, latents: Any, text: Any) -> JobResult:
        """Train and save. Raises ComfyUI's interrupt after saving when the user cancelled."""
        ckpt = self.checkpointing
        resume = load_state(ckpt.resume_from, self.fingerprint) if ckpt.resume_from else None
        if resume is not None:
            self._require_steps_left(ckpt.resume_from, resume["loop"].global_step)
        self.checkpoint = base_checkpoint_metadata(self.prompt, self.node_id)
        self._sweep_leftovers()
        comfy_services.reset_interrupt_note()
        self.live_log = LiveLog(self._log_folder(), self.log_settings, self._logged_config())
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
            validation=self.validation,
            ema=self.ema,
        )
        self.run = result
        state = result.state
        weights = self._main_weights()
        saved, save_error, log_base = None, None, None
        try:
            saved = self._save("", state.global_step, state.epoch + (1 if state.batch_in_epoch else 0), weights)
            log_base = saved.path
        except OSError as e:
            save_error = f"the LoRA was NOT saved: {e}"
            log_base = getattr(e, "path", None)
            log.error("SDXL LoRA trainer: %s", save_error)
        if log_base is not None:
            self._write_logs(Path(log_base), state)
        if state.interrupted:
            self._stop_cancelled(saved, save_error)
        model_out, clip_out = comfy_sampling.apply_lora(model, clip, weights)
        return JobResult(
            weights=weights,
            model=model_out,
            clip=clip_out if clip is not None else None,
            saved=saved,
            save_error=save_error,
            state=state,
            steps_per_epoch=result.steps_per_epoch,
            report=self._report(saved, save_error),
            previews=torch.cat(self.renderer.images) if self.renderer is not None and self.renderer.images else None,
        )

    def _sweep_leftovers(self) -> None:
        """Temp files and staging folders of saves killed in earlier runs (never those of a live writer)."""
        lora_folder = Path(self.loras_root).joinpath(*[p for p in self.out.subfolder.strip().split("/") if p])
        removed = sweep_run_leftovers(lora_folder, self.states_root, process_start_time())
        if removed:
            log.info("SDXL LoRA trainer: removed %d leftovers of interrupted saves: %s", len(removed), removed)

    def _write_logs(self, lora_path: Path, state: LoopState) -> None:
        """The CSV/JSONL logs (the TensorBoard log is live); a failure is a warning in the report, never a failed
        run."""
        try:
            write_logs(lora_path, state.history, state.validation_history)
        except OSError as e:
            self.artifacts.warn(f"the step log was not written: {e}")

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

    def validation_finished(self, record: ValidationRecord) -> None:
        """The validation loss as a second series of the node's live chart."""
        self.progress.event(
            PROGRESS_EVENT,
            {
                "node": self.node_id,
                "validation": True,
                "step": record.step,
                "epoch": record.epoch,
                "val_loss": _finite(record.loss),
                "kind": record.kind,
            },
        )

    def training_finished(self) -> None:
        if self.renderer is not None:
            self._render_previews(self.run.state.global_step)

    # -- saving and reporting ----------------------------------------------------------------------------------
    def _main_weights(self) -> dict[str, torch.Tensor]:
        """What the LoRA file and the node's outputs hold: the trained weights, or their EMA with save_as main_file."""
        run = self.run
        if run.ema is not None and self.ema.save_as == "main_file":
            return self._ema_weights()
        with averaged_weights(run.optimizer):  # a schedule-free optimizer saves its averaged weights
            return shipped_weights(run.network, self.out)

    def _ema_weights(self) -> dict[str, torch.Tensor]:
        """The EMA of the weights as a LoRA file holds them."""
        return shipped_weights(self.run.network, self.out, state=self.run.ema.state_dict_kohya())

    def _save(self, suffix: str, step: int, epoch: int, weights: dict[str, torch.Tensor] | None = None) -> SavedLora:
        """The LoRA of this step (``weights``, default ``_main_weights``); with an EMA saved as an extra file, also
        ``<lora>_ema.safetensors`` (a failure there is a warning: the LoRA itself was saved)."""
        run = self.run

        def save(tensors: dict[str, torch.Tensor], **kwargs: Any) -> SavedLora:
            return save_run_lora(
                tensors,
                self.loras_root,
                self.out,
                run_tag=self.lora_tag + suffix if self.lora_tag else suffix.lstrip("-"),
                training=training_metadata(
                    replace(self.config, train_dtype=run.train_dtype, token_length=run.token_length),
                    run.optimizer,
                    run.steps_per_epoch,
                    run.total_steps,
                    self.started,
                    self.out.name,
                    validation=validation_metadata(self.dataset, self.validation),
                )
                | self.checkpoint,
                dataset=dataset_metadata(self.dataset, self.validation),
                network_meta=network_metadata(self.network.config, self.config),
                step=step,
                epoch=epoch,
                prompt=self.prompt,
                extra_pnginfo=self.extra_pnginfo,
                v_parameterization=run.prediction_type == "v_prediction",
                **kwargs,
            )

        main = weights if weights is not None else self._main_weights()
        if run.ema is None:
            return save(main)
        averaged_meta = ema_metadata(self.ema, run.ema.updates)
        if self.ema.save_as == "main_file":
            return save(main, extra_metadata=averaged_meta)
        saved = save(main)
        try:
            saved.companions.append(save(self._ema_weights(), extra_metadata=averaged_meta, companion_of=saved))
        except OSError as e:
            self.artifacts.warn(f"the EMA file of {saved.lora_name} was not saved: {e}")
        return saved

    def _render_previews(self, step: int) -> list[torch.Tensor]:
        """Previews inside the run, with the MODEL/CLIP it trains through (and the EMA weights when asked), told to
        the run's observers (the live log); a Cancel pressed meanwhile is remembered so the loop stops and saves."""
        run = self.run
        averaged = run.ema is not None and self.ema.use_for_previews
        try:
            # previews show a schedule-free optimizer's averaged weights, or the EMA when asked
            with averaged_weights(run.optimizer), run.ema.swapped_in() if averaged else contextlib.nullcontext():
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

    def _stop_cancelled(self, saved: SavedLora | None, save_error: str | None) -> None:
        """Cancel: the LoRA is saved, the resumable state too (when asked); then ComfyUI's interrupt is raised."""
        state = self.run.state
        where = f"LoRA saved as {saved.lora_name}" if saved is not None else save_error
        if self.checkpointing.save_state_on_cancel:
            try:
                where += f"; resumable state in {self.artifacts.save_state(self.run)}"
            except OSError as e:
                where += f"; the resumable state was NOT saved: {e}"
        self.progress.update(
            state.global_step, self.run.total_steps, text=f"cancelled at step {state.global_step}; {where}"
        )
        comfy_services.note_interrupt()
        self.progress.event(
            PROGRESS_EVENT, {"node": self.node_id, "cancelled": True, "step": state.global_step, "message": where}
        )
        comfy_services.raise_interrupt()

    def _report(self, saved: SavedLora | None, save_error: str | None) -> str:
        run, state = self.run, self.run.state
        final = state.history[-1].loss if state.history else float("nan")
        report = (
            f"trained {state.global_step} steps ({run.steps_per_epoch} per epoch) in "
            f"{time.time() - self.started:.1f}s; final loss {final:.4f}\n"
        )
        if saved is not None:
            report += f"saved {saved.path}\nlora_name: {saved.lora_name}"
        else:
            report += (
                f"ERROR: {save_error}\nThe trained LoRA is still on this node's model, clip and lora outputs: "
                "connect 'lora' to ComfyUI's 'Save LoRA Weights' node to save it elsewhere (lora_name is empty)."
            )
        if state.validation_history:
            last = state.validation_history[-1]
            best = min(state.validation_history, key=lambda r: r.loss)
            report += (
                f"\nvalidation loss {last.loss:.4f} at step {last.step} ({len(state.validation_history)} validations; "
                f"lowest {best.loss:.4f} at step {best.step})"
            )
        if self.artifacts.intermediates:
            report += "\nintermediate: " + ", ".join(s.lora_name for s in self.artifacts.intermediates)
        if self.artifacts.states:
            report += f"\nstate: {self.artifacts.states[-1]}"
        if run.ema is not None and saved is not None and (self.ema.save_as == "main_file" or saved.companions):
            where = "in this file" if self.ema.save_as == "main_file" else f"in {saved.companions[0].lora_name}"
            report += f"\nEMA of the weights ({run.ema.updates} updates, decay {self.ema.decay}) {where}"
        report += f"\nTensorBoard log: {self.live_log.folder} (tensorboard --logdir {self.loras_root})"
        report += "".join(f"\nWARNING: {w}" for w in self.artifacts.warnings)
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


def _schedule_shape(config: TrainConfig) -> dict:
    """The newer schedule settings, only when set: states saved before they existed stay resumable."""
    shape = {
        "lr_decay_steps": config.lr_decay_steps,
        "lr_scheduler_min_lr_ratio": config.lr_scheduler_min_lr_ratio,
        "lr_scheduler_args": config.lr_scheduler_args,
    }
    return {key: value for key, value in shape.items() if value}


def ema_metadata(settings: EmaSettings, updates: int) -> dict[str, str]:
    """What a file holding averaged weights says about them (not a kohya key: kohya's LoRA training has no EMA)."""
    return {"sdxl_lora_trainer.ema": json.dumps({**settings.averaging(), "updates": updates})}


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
        **_schedule_shape(config),
        "train_dtype": config.train_dtype,
        "loss": repr(config.loss),
        "noise": repr(config.noise),
        # only with an EMA, so states saved without one (and before EMA existed) keep their fingerprint
        **({"ema": list(ema.averaging().values())} if ema else {}),
    }
