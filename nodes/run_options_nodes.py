"""Optional inputs of the train node: intermediate saves / resumable state, sample previews, validation loss, EMA
of the weights, logging to Weights & Biases."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.comfyui import sampling as comfy_sampling
from ..trainer.run.checkpoints import CheckpointSettings
from ..trainer.run.ema import EMA_SAVE_AS, EmaSettings
from ..trainer.run.live_log import LogSettings, wandb_project_error
from ..trainer.run.previews import PreviewRequest, PreviewSettings
from ..trainer.run.validation import ValidationRequest, ValidationSettings
from .common import CATEGORY
from .sockets import (
    CheckpointingSocket,
    DatasetSocket,
    EmaSocket,
    LatentCacheSocket,
    LoggingSocket,
    PreviewsSocket,
    TextCacheSocket,
    ValidationSocket,
)


class CheckpointOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraCheckpointing",
            display_name="SDXL LoRA: Save Every N & Resume",
            category=CATEGORY,
            description="Intermediate LoRA files, resumable training state (LoRA, optimizer, scheduler, RNG, "
            "position in the epoch), and resuming from a saved state folder.",
            inputs=[
                io.Int.Input(
                    "save_every_n_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Save an intermediate LoRA every N steps (0 = off).",
                ),
                io.Int.Input(
                    "save_every_n_epochs",
                    default=0,
                    min=0,
                    max=100_000,
                    tooltip="Save an intermediate LoRA every N epochs (0 = off).",
                ),
                io.Int.Input(
                    "keep_last_n",
                    default=0,
                    min=0,
                    max=10_000,
                    tooltip="Keep only the newest N intermediate files of this run (0 = keep all).",
                ),
                io.Int.Input(
                    "save_state_every_n_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Save a resumable state every N steps (0 = only on cancel).",
                ),
                io.Boolean.Input(
                    "save_state_on_cancel",
                    default=True,
                    tooltip="On Cancel, save the LoRA and a resumable state before stopping.",
                ),
                io.String.Input(
                    "resume_from",
                    default="",
                    tooltip="A state folder from an earlier run "
                    "(output/sdxl_lora_trainer/state/<run>/step-N or .../latest) to continue exactly.",
                ),
            ],
            outputs=[CheckpointingSocket.Output(display_name="checkpointing", tooltip="Connect to the train node.")],
        )

    @classmethod
    def execute(
        cls,
        save_every_n_steps: int,
        save_every_n_epochs: int,
        keep_last_n: int,
        save_state_every_n_steps: int,
        save_state_on_cancel: bool,
        resume_from: str,
    ) -> io.NodeOutput:
        return io.NodeOutput(
            CheckpointSettings(
                save_every_n_steps,
                save_every_n_epochs,
                keep_last_n,
                save_state_every_n_steps,
                save_state_on_cancel,
                resume_from,
            )
        )


class PreviewOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraPreviews",
            display_name="SDXL LoRA: Sample Previews",
            category=CATEGORY,
            description="Renders the prompts with ComfyUI's sampler on the LoRA being trained, every N steps and "
            "at the end; images stream to the train node and come out as an IMAGE batch.",
            inputs=[
                io.Clip.Input("clip", tooltip="CLIP to encode the prompts (the same SDXL CLIP)."),
                io.Vae.Input("vae", tooltip="VAE to decode the previews."),
                io.String.Input("prompts", multiline=True, default="a photo", tooltip="One prompt per line."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt for every preview."),
                io.Int.Input(
                    "every_n_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Render every N steps; 0 = only at the end.",
                ),
                io.Int.Input("width", default=1024, min=64, max=4096, step=8, tooltip="Preview width."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=8, tooltip="Preview height."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=50.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input(
                    "sampler_name", options=comfy_sampling.sampler_names(), default="euler", tooltip="Sampler."
                ),
                io.Combo.Input(
                    "scheduler", options=comfy_sampling.scheduler_names(), default="normal", tooltip="Scheduler."
                ),
                # "fixed": the frontend's default for an INT named seed is "randomize", and a new seed here
                # would retrain the LoRA on every queue (this node feeds the train node)
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Seed of the first prompt (+1 per further prompt).",
                ),
            ],
            outputs=[PreviewsSocket.Output(display_name="previews", tooltip="Connect to the train node.")],
        )

    @classmethod
    def execute(
        cls,
        clip,
        vae,
        prompts: str,
        negative: str,
        every_n_steps: int,
        width: int,
        height: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        seed: int,
    ) -> io.NodeOutput:
        settings = PreviewSettings(
            prompts=prompts,
            negative=negative,
            every_n_steps=every_n_steps,
            width=width,
            height=height,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            seed=seed,
        )
        return io.NodeOutput(PreviewRequest(settings=settings, clip=clip, vae=vae))


class ValidationOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraValidation",
            display_name="SDXL LoRA: Validation",
            category=CATEGORY,
            description="kohya's validation loss: the training loss on held-out images (the dataset's "
            "validation_split, or a separate validation dataset connected here) at 4 fixed timesteps with fixed noise, "
            "without gradients or dropout. Drawn live as a second series on the Train node's chart, written to its "
            "logs and the LoRA's metadata; training itself is unchanged. Without this node a dataset with a "
            "validation_split is validated at the end of every epoch (kohya's default).",
            inputs=[
                io.Int.Input(
                    "validate_every_n_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Also validate after every N-th optimizer step (kohya validate_every_n_steps); 0 = only at "
                    "the end of epochs.",
                ),
                io.Int.Input(
                    "validate_every_n_epochs",
                    default=1,
                    min=1,
                    max=100_000,
                    tooltip="Validate at the end of every N-th epoch (kohya validate_every_n_epochs; the last epoch "
                    "counts even when it is cut short by max_train_steps).",
                ),
                io.Int.Input(
                    "max_validation_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Use only the first N validation batches (kohya max_validation_steps); 0 = all.",
                ),
                io.Int.Input(
                    "validation_seed",
                    default=-1,
                    min=-1,
                    max=2**31 - 1,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Seed of the validation noise (kohya validation_seed); -1 = the training seed. The "
                    "held-out images are chosen by the dataset node's own validation_seed.",
                ),
                DatasetSocket.Input(
                    "dataset",
                    optional=True,
                    tooltip="A separate validation dataset (each image counts once), instead of the training "
                    "dataset's validation_split. Needs its own 'Cache Latents' (and 'Cache Text').",
                ),
                LatentCacheSocket.Input("latents", optional=True, tooltip="'Cache Latents' of the validation dataset."),
                TextCacheSocket.Input("text", optional=True, tooltip="'Cache Text' of the validation dataset."),
            ],
            outputs=[ValidationSocket.Output(display_name="validation", tooltip="Connect to the train node.")],
        )

    @classmethod
    def validate_inputs(cls, validation_seed: int | None = None, **_: object) -> bool | str:
        if isinstance(validation_seed, int) and validation_seed < -1:
            return f"validation_seed must be -1 (the training seed) or a seed >= 0, got {validation_seed}"
        return True

    @classmethod
    def execute(
        cls,
        validate_every_n_steps: int,
        validate_every_n_epochs: int,
        max_validation_steps: int,
        validation_seed: int,
        dataset=None,
        latents=None,
        text=None,
    ) -> io.NodeOutput:
        if dataset is not None and latents is None:
            raise ValueError(
                "SDXL LoRA: Validation: the validation dataset needs its latents; connect 'Cache Latents' of that "
                "dataset to this node's latents input."
            )
        if latents is not None and dataset is None:
            raise ValueError(
                "SDXL LoRA: Validation: latents are connected without their dataset; connect the validation dataset "
                "too (or disconnect latents to validate on the training dataset's validation_split)."
            )
        settings = ValidationSettings(
            validate_every_n_steps=validate_every_n_steps,
            validate_every_n_epochs=validate_every_n_epochs,
            max_validation_steps=max_validation_steps,
            validation_seed=validation_seed,
        )
        return io.NodeOutput(ValidationRequest(settings=settings, dataset=dataset, latents=latents, text=text))


class EmaOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraEMA",
            display_name="SDXL LoRA: EMA",
            category=CATEGORY,
            description="Keeps an exponential moving average of the LoRA weights (fp32) while training and saves it "
            "as an extra <lora>_ema.safetensors file or as the LoRA itself; resumable states include it.",
            inputs=[
                io.Float.Input(
                    "decay",
                    default=0.999,
                    min=0.0,
                    max=0.999999,
                    step=0.0001,
                    round=False,
                    tooltip="ema = decay * ema + (1 - decay) * weights per update; 0.999 averages about the last "
                    "1000 updates.",
                ),
                io.Float.Input(
                    "warmup_power",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    round=False,
                    tooltip="0 = full decay from the first update. > 0: the decay of update t is "
                    "min(decay, 1 - (1 + t)^-power), so early updates follow the weights (2/3 long runs, 3/4 short).",
                ),
                io.Int.Input(
                    "update_every_n_steps", default=1, min=1, max=100_000, tooltip="Average every N optimizer steps."
                ),
                io.Int.Input(
                    "start_step",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="First optimizer step that is averaged (the average starts as a copy of the weights "
                    "there); 0 = from the first step.",
                ),
                io.Combo.Input(
                    "save_as",
                    options=list(EMA_SAVE_AS),
                    default="extra_file",
                    tooltip="extra_file: the LoRA as trained plus <lora>_ema.safetensors beside it (also for "
                    "intermediate saves); main_file: the LoRA file (and the train node's outputs) hold the EMA.",
                ),
                io.Boolean.Input("use_for_previews", default=True, tooltip="Sample previews render the EMA weights."),
            ],
            outputs=[EmaSocket.Output(display_name="ema", tooltip="Connect to the train node.")],
        )

    @classmethod
    def execute(
        cls,
        decay: float,
        warmup_power: float,
        update_every_n_steps: int,
        start_step: int,
        save_as: str,
        use_for_previews: bool,
    ) -> io.NodeOutput:
        return io.NodeOutput(
            EmaSettings(
                decay=decay,
                warmup_power=warmup_power,
                update_every_n_steps=update_every_n_steps,
                start_step=start_step,
                save_as=save_as,
                use_for_previews=use_for_previews,
            )
        )


class LoggingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraLogging",
            display_name="SDXL LoRA: Logging (W&B)",
            category=CATEGORY,
            description="Every run writes a live TensorBoard log "
            "(models/loras/<subfolder>/logs/<time>_<name>_s<seed>); this node also logs the run to a Weights & Biases "
            "project (needs the wandb package and `wandb login`, or WANDB_MODE=offline).",
            inputs=[
                io.String.Input(
                    "wandb_project",
                    default="",
                    tooltip="Weights & Biases project to log to; empty = TensorBoard only.",
                ),
                io.String.Input(
                    "wandb_run_name", default="", tooltip="The run's name in W&B; empty = its log folder's name."
                ),
            ],
            outputs=[LoggingSocket.Output(display_name="logging", tooltip="Connect to the train node.")],
        )

    @classmethod
    def validate_inputs(cls, wandb_project: str | None = None) -> bool | str:
        """A project without the wandb package fails when queued, not after loading the models."""
        if isinstance(wandb_project, str):
            return wandb_project_error(wandb_project) or True
        return True

    @classmethod
    def execute(cls, wandb_project: str, wandb_run_name: str) -> io.NodeOutput:
        return io.NodeOutput(LogSettings(wandb_project=wandb_project, wandb_run_name=wandb_run_name))


NODES = [CheckpointOptions, PreviewOptions, ValidationOptions, EmaOptions, LoggingOptions]
