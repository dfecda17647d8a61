"""The train node: trains the LoRA on the incoming MODEL (and CLIP), saves it, and hands it on."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from comfy_api.latest import io

from ..trainer import comfy_adapter
from ..trainer.loop import StepRecord
from ..trainer.previews import PreviewRenderer
from ..trainer.run_artifacts import CheckpointSettings, RunArtifacts, write_logs, write_tensorboard
from ..trainer.train_state import load_state
from ..trainer.optim import OPTIMIZER_TYPES, SCHEDULER_TYPES, OptimizerSettings
from ..trainer.report_images import loss_graph_image
from ..trainer.run_output import (OutputSettings, dataset_metadata, network_metadata, output_name_error, run_tag,
                                  save_run_lora, training_metadata)
from ..trainer.train_session import TrainConfig, train
from .common import (CATEGORY, Checkpointing, Dataset, LatentCache, Network, Objective, Previews, TextCache,
                     pil_to_image)

PROGRESS_EVENT = "sdxl_lora_trainer.progress"


def _finite(v: float) -> float | None:
    """JSON for the browser: aiohttp writes NaN/inf as bare tokens that JSON.parse rejects."""
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _lr_or_none(v: float) -> float | None:
    return v if v > 0 else None


class TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraTrain",
            display_name="SDXL LoRA: Train",
            category=CATEGORY,
            description="Trains a kohya-compatible LoRA on the MODEL ComfyUI loaded (no second copy; the incoming "
                        "MODEL is left unchanged), saves it into models/loras and outputs the MODEL/CLIP with the "
                        "LoRA applied plus the file name for LoraLoader. Cancel stops within a step and saves.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SDXL MODEL to train on (from Load Checkpoint)."),
                Dataset.Input("dataset", tooltip="From 'Buckets & Captions' or 'Dataset from kohya TOML'."),
                LatentCache.Input("latents", tooltip="From 'Cache Latents'."),
                Network.Input("network", tooltip="From 'Network'."),
                io.Int.Input("max_train_steps", default=400, min=1, max=1_000_000, tooltip="Optimizer steps to "
                             "train (kohya max_train_steps)."),
                io.Int.Input("max_train_epochs", default=0, min=0, max=100_000, tooltip="If > 0, train this many "
                             "epochs instead of max_train_steps (kohya)."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=10.0, step=1e-6, round=False,
                               tooltip="Learning rate (kohya learning_rate)."),
                io.Float.Input("unet_lr", default=0.0, min=0.0, max=10.0, step=1e-6, round=False,
                               tooltip="U-Net learning rate; 0 = learning_rate."),
                io.Float.Input("clip_l_lr", default=0.0, min=0.0, max=10.0, step=1e-6, round=False,
                               tooltip="CLIP-L (text encoder 1) learning rate; 0 = learning_rate."),
                io.Float.Input("clip_g_lr", default=0.0, min=0.0, max=10.0, step=1e-6, round=False,
                               tooltip="CLIP-G (text encoder 2) learning rate; 0 = learning_rate."),
                io.Combo.Input("optimizer", options=list(OPTIMIZER_TYPES), default="AdamW", tooltip="Optimizer "
                               "(8-bit ones need bitsandbytes and CUDA)."),
                io.String.Input("optimizer_args", default="", tooltip="key=value pairs, e.g. weight_decay=0.01 "
                                "betas=0.9,0.99 (kohya optimizer_args)."),
                io.Combo.Input("lr_scheduler", options=list(SCHEDULER_TYPES), default="constant",
                               tooltip="Learning-rate schedule."),
                io.Float.Input("lr_warmup_steps", default=0.0, min=0.0, max=1_000_000, step=1.0, tooltip="Warmup "
                               "steps; a value below 1 is a fraction of the total steps."),
                io.Int.Input("lr_scheduler_num_cycles", default=1, min=1, max=1000, tooltip="Restarts for "
                             "cosine_with_restarts."),
                io.Float.Input("lr_scheduler_power", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="Power "
                               "of the polynomial schedule."),
                io.Int.Input("gradient_accumulation_steps", default=1, min=1, max=1024, tooltip="Batches per "
                             "optimizer step."),
                io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, tooltip="Gradient "
                               "clipping; 0 = off."),
                io.Float.Input("scale_weight_norms", default=0.0, min=0.0, max=100.0, step=0.1, tooltip="Max-norm "
                               "regularisation of the LoRA weights; 0 = off."),
                # control_after_generate "fixed": the frontend gives every INT named "seed" a control widget that
                # defaults to "randomize", which would retrain a new LoRA on every queue
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1,
                             control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of every random draw (LoRA init, noise, timesteps, order, dropout). "
                                     "Same seed = same LoRA on CPU."),
                io.Combo.Input("train_dtype", options=["fp32", "bf16", "fp16"], default="bf16", tooltip="Compute "
                               "dtype of the forward/backward pass; LoRA weights and optimizer stay fp32 unless "
                               "full_bf16. fp16 uses a gradient scaler."),
                io.Boolean.Input("full_bf16", default=False, tooltip="Keep the LoRA weights in bf16 too (less "
                                 "memory; needs train_dtype bf16)."),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip="Recompute each ResBlock/"
                                 "Transformer in backward: much less memory, ~30% slower."),
                io.String.Input("output_name", default="my_sdxl_lora", tooltip="File name stem of the saved LoRA."),
                io.String.Input("output_subfolder", default="sdxl_lora_trainer", tooltip="Subfolder of "
                                "models/loras to save into."),
                io.Combo.Input("save_precision", options=["fp16", "bf16", "fp32"], default="fp16",
                               tooltip="dtype of the saved file."),
                io.Boolean.Input("overwrite", default=False, tooltip="Save as exactly <output_name>.safetensors, "
                                 "replacing an earlier file (off: every run gets a new, unique name and no file is "
                                 "ever replaced). Note: a LoraLoader that already loaded that name keeps serving "
                                 "the old weights until it loads another file."),
                io.Clip.Input("clip", optional=True, tooltip="SDXL CLIP: needed to train the text encoders or to "
                              "encode randomised captions (shuffle/dropout) during training."),
                TextCache.Input("text", optional=True, tooltip="From 'Cache Text' (fixed captions)."),
                Objective.Input("objective", optional=True, tooltip="From 'Loss & Noise (advanced)'; kohya "
                                "defaults when not connected."),
                Checkpointing.Input("checkpointing", optional=True, tooltip="From 'Save Every N & Resume'."),
                Previews.Input("previews", optional=True, tooltip="From 'Sample Previews'."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The MODEL with the trained LoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained LoRA applied (unchanged "
                               "when only the U-Net was trained)."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA weights, for the built-in 'Load LoRA "
                                    "Model' node."),
                io.AnyType.Output(display_name="lora_name", tooltip="The saved file's name: connect to "
                                  "LoraLoader's lora_name."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step (for 'Plot Loss Graph')."),
                io.Image.Output(display_name="loss_graph", tooltip="Loss, moving average and lr as an image."),
                io.String.Output(display_name="report", tooltip="What was trained and where it was saved."),
                io.Image.Output(display_name="previews", tooltip="All sample previews of the run (empty 64x64 "
                                "black image without the previews input)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def validate_inputs(cls, output_name: str | None = None, output_subfolder: str | None = None) -> bool | str:
        """Reject unsafe names when the prompt is queued, not after a long run (None: fed by a link; execute
        checks it then, still before training)."""
        if isinstance(output_name, str) and isinstance(output_subfolder, str):
            return output_name_error(output_subfolder, output_name) or True
        return True

    @classmethod
    def execute(cls, model, dataset, latents, network, max_train_steps: int, max_train_epochs: int,
                learning_rate: float, unet_lr: float, clip_l_lr: float, clip_g_lr: float, optimizer: str,
                optimizer_args: str, lr_scheduler: str, lr_warmup_steps: float, lr_scheduler_num_cycles: int,
                lr_scheduler_power: float, gradient_accumulation_steps: int, max_grad_norm: float,
                scale_weight_norms: float, seed: int, train_dtype: str, full_bf16: bool,
                gradient_checkpointing: bool, output_name: str, output_subfolder: str, save_precision: str,
                overwrite: bool, clip=None, text=None, objective=None, checkpointing=None,
                previews=None) -> io.NodeOutput:
        extra = {}
        if objective is not None:
            extra = {"loss": objective["loss"], "noise": objective["noise"]}
        config = TrainConfig(
            max_train_steps=max_train_steps, max_train_epochs=max_train_epochs, learning_rate=learning_rate,
            unet_lr=_lr_or_none(unet_lr), text_encoder_lr1=_lr_or_none(clip_l_lr),
            text_encoder_lr2=_lr_or_none(clip_g_lr),
            optimizer=OptimizerSettings(optimizer, learning_rate, optimizer_args, max_grad_norm),
            lr_scheduler=lr_scheduler, lr_warmup_steps=int(lr_warmup_steps) if lr_warmup_steps >= 1 else lr_warmup_steps,
            lr_scheduler_num_cycles=lr_scheduler_num_cycles, lr_scheduler_power=lr_scheduler_power,
            gradient_accumulation_steps=gradient_accumulation_steps, max_grad_norm=max_grad_norm,
            scale_weight_norms=scale_weight_norms or None, seed=seed, train_dtype=train_dtype, full_bf16=full_bf16,
            gradient_checkpointing=gradient_checkpointing, **extra)
        out = OutputSettings(name=output_name, subfolder=output_subfolder, save_precision=save_precision,
                             overwrite=overwrite)
        node_id = cls.hidden.unique_id
        ckpt = checkpointing or CheckpointSettings()
        steps_per_epoch = dataset.steps_per_epoch(gradient_accumulation_steps)
        total_steps = config.total_steps(steps_per_epoch)
        progress = comfy_adapter.Progress(total_steps, node_id)
        started = time.time()
        tag = run_tag(seed)
        lora_tag = out.lora_tag(tag)  # empty with overwrite: the exact name is reused
        loras_root = comfy_adapter.loras_directory()
        net_config = network["config"]
        fingerprint = run_fingerprint(dataset, net_config, config)
        resume = load_state(ckpt.resume_from, fingerprint) if ckpt.resume_from else None
        renderer = PreviewRenderer(previews["settings"], previews["clip"], previews["vae"]) if previews else None
        train_te = net_config.train_te1 or net_config.train_te2
        live = {"result": None}

        def save(suffix: str, step: int, epoch: int):
            result = live["result"]
            return save_run_lora(
                result.network, loras_root, out, run_tag=lora_tag + suffix if lora_tag else suffix.lstrip("-"),
                training=training_metadata(config, result.optimizer, result.steps_per_epoch, result.total_steps,
                                           started, output_name),
                dataset=dataset_metadata(dataset), network_meta=network_metadata(net_config), step=step,
                epoch=epoch, prompt=cls.hidden.prompt, extra_pnginfo=cls.hidden.extra_pnginfo,
                v_parameterization=result.prediction_type == "v_prediction")

        artifacts = RunArtifacts(ckpt, lambda t, st, ep: save(f"-{t}", st, ep),
                                 Path(comfy_adapter.output_directory()) / "sdxl_lora_trainer" / "state" /
                                 f"{output_name}_{tag}", fingerprint)

        def on_step(record: StepRecord, total: int, result) -> None:
            live["result"] = result
            elapsed = time.time() - started
            rate = record.step / elapsed if elapsed > 0 else 0.0
            eta = (total - record.step) / rate if rate > 0 else 0.0
            preview = None
            artifacts.on_step(record, result)
            if renderer is not None and renderer.due(record.step) and record.step < total:
                images = render_previews(renderer, model, result.network, train_te)
                preview = preview_frame(images)
            progress.update(record.step, total, text=f"step {record.step}/{total}  loss {record.loss:.4f}  "
                            f"lr {record.lr:.2e}  {rate:.2f} it/s  ETA {eta:.0f}s", preview=preview)
            progress.event(PROGRESS_EVENT, {"node": node_id, "step": record.step, "total": total,
                                            "loss": _finite(record.loss), "lr": _finite(record.lr),
                                            "it_s": _finite(rate), "eta_s": _finite(eta), "epoch": record.epoch})

        comfy_adapter.reset_interrupt_note()
        result = train(model, clip, dataset, latents, text, net_config, config,
                       initial_weights=network.get("initial_weights"), resume=resume,
                       should_stop=comfy_adapter.interrupted, on_step=on_step,
                       on_finish=(lambda res: render_previews(renderer, model, res.network, train_te))
                       if renderer is not None else None)
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
            comfy_adapter.note_interrupt()
            progress.event(PROGRESS_EVENT, {"node": node_id, "cancelled": True, "step": state.global_step,
                                            "message": where})
            comfy_adapter.raise_interrupt()

        weights = result.network.state_dict_kohya()
        model_out, clip_out = comfy_adapter.apply_lora(model, clip, weights)
        history = state.history
        graph = pil_to_image(loss_graph_image([r.step for r in history], [r.loss for r in history],
                                              [r.lr for r in history]))
        final = history[-1].loss if history else float("nan")
        report = (f"trained {state.global_step} steps ({result.steps_per_epoch} per epoch) in "
                  f"{time.time() - started:.1f}s; final loss {final:.4f}\nsaved {saved.path}\n"
                  f"lora_name: {saved.lora_name}")
        if artifacts.intermediates:
            report += "\nintermediate: " + ", ".join(s.lora_name for s in artifacts.intermediates)
        if artifacts.states:
            report += f"\nstate: {artifacts.states[-1]}"
        images = torch.cat(renderer.images) if renderer is not None and renderer.images else torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(model_out, clip_out if clip is not None else None, weights, saved.lora_name,
                             {"loss": [r.loss for r in history]}, graph, report, images, ui={"text": [report]})


def render_previews(renderer: PreviewRenderer, model, network, train_te: bool) -> list[torch.Tensor]:
    """Previews inside the run; a Cancel pressed meanwhile is remembered so the loop stops and saves."""
    try:
        return renderer.render(model, network, reencode=train_te)
    except BaseException as e:  # noqa: BLE001 - only ComfyUI's interrupt is swallowed
        if comfy_adapter.is_interrupt(e):
            comfy_adapter.note_interrupt()
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
    return {"dataset": hashlib.sha256(data.encode()).hexdigest()[:16], "network": repr(network_config),
            "seed": config.seed, "optimizer": repr(config.optimizer), "learning_rate": config.learning_rate,
            "gradient_accumulation_steps": config.gradient_accumulation_steps, "lr_scheduler": config.lr_scheduler,
            "train_dtype": config.train_dtype, "loss": repr(config.loss), "noise": repr(config.noise)}


NODES = [TrainLora]
