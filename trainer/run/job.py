"""One train-node run, start to finish: train, report progress, save intermediate files and states,
render previews, save the final LoRA and its logs, and on Cancel save and stop.

The train node builds the settings from its widgets and calls ``run_job``; everything that happens
during the run lives here so the node stays a schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..comfyui import services as comfy_services
from ..data.dataset import TrainingDataset
from .checkpoints import CheckpointSettings, RunArtifacts
from .logs import write_logs, write_tensorboard
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
from .previews import PreviewRenderer
from .resume_state import load_state
from .session import TrainConfig, train

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


def run_job(
    *,
    model: Any,
    clip: Any,
    dataset: TrainingDataset,
    latents: Any,
    text: Any,
    network: dict,
    config: TrainConfig,
    out: OutputSettings,
    checkpointing: CheckpointSettings | None,
    previews: dict | None,
    node_id: str | None,
    prompt: Any = None,
    extra_pnginfo: Any = None,
) -> JobResult:
    """Train and save. ``network`` is the Network node's value; ``previews`` the Sample Previews node's.
    Raises ComfyUI's interrupt after saving when the user cancelled."""
    seed = config.seed
    output_name = out.name
    ckpt = checkpointing or CheckpointSettings()
    steps_per_epoch = dataset.steps_per_epoch(config.gradient_accumulation_steps)
    total_steps = config.total_steps(steps_per_epoch)
    progress = comfy_services.Progress(total_steps, node_id)
    started = time.time()
    tag = run_tag(seed)
    lora_tag = out.lora_tag(tag)  # empty with overwrite: the exact name is reused
    loras_root = comfy_services.loras_directory()
    net_config = network["config"]
    fingerprint = run_fingerprint(dataset, net_config, config)
    resume = load_state(ckpt.resume_from, fingerprint) if ckpt.resume_from else None
    renderer = PreviewRenderer(previews["settings"], previews["clip"], previews["vae"]) if previews else None
    train_te = net_config.train_te1 or net_config.train_te2
    live = {"result": None}

    def save(suffix: str, step: int, epoch: int):
        result = live["result"]
        return save_run_lora(
            result.network,
            loras_root,
            out,
            run_tag=lora_tag + suffix if lora_tag else suffix.lstrip("-"),
            training=training_metadata(
                replace(config, train_dtype=result.train_dtype),
                result.optimizer,
                result.steps_per_epoch,
                result.total_steps,
                started,
                output_name,
            ),
            dataset=dataset_metadata(dataset),
            network_meta=network_metadata(net_config),
            step=step,
            epoch=epoch,
            prompt=prompt,
            extra_pnginfo=extra_pnginfo,
            v_parameterization=result.prediction_type == "v_prediction",
        )

    artifacts = RunArtifacts(
        ckpt,
        lambda t, st, ep: save(f"-{t}", st, ep),
        Path(comfy_services.output_directory()) / "sdxl_lora_trainer" / "state" / f"{output_name}_{tag}",
        fingerprint,
    )

    def on_step(record: StepRecord, total: int, result) -> None:
        live["result"] = result
        elapsed = time.time() - started
        rate = record.step / elapsed if elapsed > 0 else 0.0
        eta = (total - record.step) / rate if rate > 0 else 0.0
        preview = None
        artifacts.on_step(record, result)
        if renderer is not None and renderer.due(record.step) and record.step < total:
            images = render_previews(renderer, result, train_te)
            preview = preview_frame(images)
        progress.update(
            record.step,
            total,
            text=f"step {record.step}/{total}  loss {record.loss:.4f}  "
            f"lr {record.lr:.2e}  {rate:.2f} it/s  ETA {eta:.0f}s",
            preview=preview,
        )
        progress.event(
            PROGRESS_EVENT,
            {
                "node": node_id,
                "step": record.step,
                "total": total,
                "loss": _finite(record.loss),
                "lr": _finite(record.lr),
                "it_s": _finite(rate),
                "eta_s": _finite(eta),
                "epoch": record.epoch,
            },
        )

    comfy_services.reset_interrupt_note()
    result = train(
        model,
        clip,
        dataset,
        latents,
        text,
        net_config,
        config,
        initial_weights=network.get("initial_weights"),
        resume=resume,
        should_stop=comfy_services.interrupted,
        on_step=on_step,
        on_finish=(lambda res: render_previews(renderer, res, train_te)) if renderer is not None else None,
    )
    live["result"] = result
    state = result.state
    saved = save("", state.global_step, state.epoch + (1 if state.batch_in_epoch else 0))
    write_logs(saved.path, state.history)
    write_tensorboard(saved.path.parent / f"{saved.path.stem}.tensorboard", state.history)
    if state.interrupted:
        where = f"LoRA saved as {saved.lora_name}"
        if ckpt.save_state_on_cancel:
            where += f"; resumable state in {artifacts.save_state(result)}"
        progress.update(state.global_step, result.total_steps, text=f"cancelled at step {state.global_step}; {where}")
        comfy_services.note_interrupt()
        progress.event(
            PROGRESS_EVENT, {"node": node_id, "cancelled": True, "step": state.global_step, "message": where}
        )
        comfy_services.raise_interrupt()

    history = state.history
    final = history[-1].loss if history else float("nan")
    report = (
        f"trained {state.global_step} steps ({result.steps_per_epoch} per epoch) in "
        f"{time.time() - started:.1f}s; final loss {final:.4f}\nsaved {saved.path}\n"
        f"lora_name: {saved.lora_name}"
    )
    if artifacts.intermediates:
        report += "\nintermediate: " + ", ".join(s.lora_name for s in artifacts.intermediates)
    if artifacts.states:
        report += f"\nstate: {artifacts.states[-1]}"
    report += "".join(f"\n{note}" for note in result.notes)
    images = torch.cat(renderer.images) if renderer is not None and renderer.images else None
    return JobResult(
        weights=result.network.state_dict_kohya(),
        saved=saved,
        state=state,
        steps_per_epoch=result.steps_per_epoch,
        report=report,
        previews=images,
    )


def render_previews(renderer: PreviewRenderer, result, train_te: bool) -> list[torch.Tensor]:
    """Previews inside the run, with the MODEL/CLIP it trains through; a Cancel pressed meanwhile is remembered so
    the loop stops and saves."""
    try:
        return renderer.render(
            result.models.model, result.network, training_clip=result.models.clip if train_te else None
        )
    except BaseException as e:  # noqa: BLE001 - only ComfyUI's interrupt is swallowed
        if comfy_services.is_interrupt(e):
            comfy_services.note_interrupt()
            return []
        raise


def preview_frame(images: list[torch.Tensor]):
    """The first preview as the (format, PIL image, max size) tuple ComfyUI's progress hook streams."""
    if not images:
        return None
    from PIL import Image

    arr = (images[0][0].clamp(0, 1) * 255).round().byte().cpu().numpy()
    return ("JPEG", Image.fromarray(arr), 512)


def run_fingerprint(dataset, network_config, config: TrainConfig) -> dict:
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
    }
