"""The train node: trains the LoRA on the incoming MODEL (and CLIP), saves it, and hands it on."""

from __future__ import annotations

from dataclasses import replace

import torch
from comfy_api.latest import io

from ..trainer.network.config import PartSettings
from ..trainer.objective.batch_loss import ObjectiveSettings
from ..trainer.objective.loss_weighting import LossSettings
from ..trainer.objective.noise import NoiseSettings
from ..trainer.report_images import loss_graph_image
from ..trainer.run.config import MEMORY_MODES, TRAIN_DTYPES, TrainConfig
from ..trainer.run.job import TrainJob
from ..trainer.run.lora_output import OutputSettings, output_name_error
from ..trainer.run.optimizers import (
    OPTIMIZER_TYPES,
    OptimizerConfigError,
    OptimizerSettings,
    optimizer_settings_error,
)
from ..trainer.run.schedulers import SCHEDULER_TYPES, check_schedule
from .common import CATEGORY, pil_to_image, range_problems, refuse_at_queue_time
from .sockets import (
    CheckpointingSocket,
    DatasetSocket,
    EmaSocket,
    LatentCacheSocket,
    LoggingSocket,
    NetworkSocket,
    ObjectiveSocket,
    PreviewsSocket,
    TextCacheSocket,
    TrainSettingsSocket,
    ValidationSocket,
)

#: the Train node's widgets that make up the run's TrainConfig (the 'Train Settings' node offers the same ones)
TRAINING_WIDGETS = (
    "max_train_steps",
    "max_train_epochs",
    "learning_rate",
    "unet_lr",
    "clip_l_lr",
    "clip_g_lr",
    "optimizer",
    "optimizer_args",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "scale_weight_norms",
    "seed",
    "train_dtype",
    "full_bf16",
    "gradient_checkpointing",
    "lr_decay_steps",
    "lr_scheduler_min_lr_ratio",
    "lr_scheduler_args",
)


def train_config_from_widgets(
    *,
    max_train_steps: int,
    max_train_epochs: int,
    learning_rate: float,
    unet_lr: float,
    clip_l_lr: float,
    clip_g_lr: float,
    optimizer: str,
    optimizer_args: str,
    lr_scheduler: str,
    lr_warmup_steps: float,
    lr_scheduler_num_cycles: int,
    lr_scheduler_power: float,
    gradient_accumulation_steps: int,
    max_grad_norm: float,
    scale_weight_norms: float,
    seed: int,
    train_dtype: str,
    full_bf16: bool,
    gradient_checkpointing: bool,
    lr_decay_steps: float = 0.0,
    lr_scheduler_min_lr_ratio: float = 0.0,
    lr_scheduler_args: str = "",
) -> TrainConfig:
    """The run's settings from the training widgets (loss and noise options come from the objective input)."""
    return TrainConfig(
        max_train_steps=max_train_steps,
        max_train_epochs=max_train_epochs,
        learning_rate=learning_rate,
        unet=PartSettings.from_widgets(learning_rate=unet_lr),
        clip_l=PartSettings.from_widgets(learning_rate=clip_l_lr),
        clip_g=PartSettings.from_widgets(learning_rate=clip_g_lr),
        optimizer=OptimizerSettings(optimizer, optimizer_args),
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=int(lr_warmup_steps) if lr_warmup_steps >= 1 else lr_warmup_steps,
        lr_scheduler_num_cycles=lr_scheduler_num_cycles,
        lr_scheduler_power=lr_scheduler_power,
        lr_decay_steps=int(lr_decay_steps) if lr_decay_steps >= 1 else lr_decay_steps,
        lr_scheduler_min_lr_ratio=lr_scheduler_min_lr_ratio,
        lr_scheduler_args=lr_scheduler_args,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        scale_weight_norms=scale_weight_norms,
        seed=seed,
        train_dtype=train_dtype,
        full_bf16=full_bf16,
        gradient_checkpointing=gradient_checkpointing,
    )


#: validate_inputs' default for an optional input that is not connected (a linked one arrives as None)
NOT_CONNECTED = object()


def learning_rate_problems(node: type, **rates: float | None) -> list[str]:
    """The learning-rate widgets' problems at queue time: out of range, or all 0 (nothing would train; which parts
    train is only known at run time, where the same check runs again)."""
    problems = range_problems(node, rates)
    if problems or any(not isinstance(v, (int, float)) for v in rates.values()):
        return problems
    config = TrainConfig(
        learning_rate=rates["learning_rate"],
        unet=PartSettings.from_widgets(rates["unet_lr"]),
        clip_l=PartSettings.from_widgets(rates["clip_l_lr"]),
        clip_g=PartSettings.from_widgets(rates["clip_g_lr"]),
    )
    problem = config.zero_learning_rate_error()
    return [problem] if problem else []


def optimizer_problems(
    node: type,
    optimizer: str | None,
    optimizer_args: str | None,
    lr_scheduler: str | None,
    lr_scheduler_args: str | None,
    lr_decay_steps: float | None,
    lr_scheduler_min_lr_ratio: float | None,
) -> list[str]:
    """The optimizer and schedule widgets' problems at queue time: optimizer_args the optimizer's constructor cannot
    take, schedule settings the schedule does not use (None: linked, or absent from an older prompt; checked at run
    time). ComfyUI skips its own range check for these inputs, so it is done here."""
    problems = range_problems(
        node, {"lr_decay_steps": lr_decay_steps, "lr_scheduler_min_lr_ratio": lr_scheduler_min_lr_ratio}
    )
    if isinstance(optimizer, str) and isinstance(optimizer_args, str):
        error = optimizer_settings_error(optimizer, optimizer_args)
        problems += [error] if error else []
    if isinstance(lr_scheduler, str) and not problems:
        try:
            check_schedule(lr_scheduler, lr_scheduler_args, lr_decay_steps, lr_scheduler_min_lr_ratio)
        except OptimizerConfigError as error:
            problems.append(str(error))
    return problems


def with_objective(config: TrainConfig, objective: ObjectiveSettings | None) -> TrainConfig:
    """``config`` with the loss and noise options of the objective input (kohya's defaults when unconnected)."""
    if objective is None:
        return replace(config, loss=LossSettings(), noise=NoiseSettings())
    return replace(config, loss=objective.loss, noise=objective.noise)


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
                DatasetSocket.Input("dataset", tooltip="From 'Buckets & Captions' or 'Dataset from kohya TOML'."),
                LatentCacheSocket.Input("latents", tooltip="From 'Cache Latents'."),
                NetworkSocket.Input("network", tooltip="From 'Network'."),
                io.Int.Input(
                    "max_train_steps",
                    default=400,
                    min=1,
                    max=1_000_000,
                    tooltip="Optimizer steps to train (kohya max_train_steps).",
                ),
                io.Int.Input(
                    "max_train_epochs",
                    default=0,
                    min=0,
                    max=100_000,
                    tooltip="If > 0, train this many epochs instead of max_train_steps (kohya).",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=0.0,
                    max=10.0,
                    step=1e-6,
                    round=False,
                    tooltip="Learning rate (kohya learning_rate).",
                ),
                io.Float.Input(
                    "unet_lr",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=1e-6,
                    round=False,
                    tooltip="U-Net learning rate; 0 = learning_rate.",
                ),
                io.Float.Input(
                    "clip_l_lr",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=1e-6,
                    round=False,
                    tooltip="CLIP-L (text encoder 1) learning rate; 0 = learning_rate.",
                ),
                io.Float.Input(
                    "clip_g_lr",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=1e-6,
                    round=False,
                    tooltip="CLIP-G (text encoder 2) learning rate; 0 = learning_rate.",
                ),
                io.Combo.Input(
                    "optimizer",
                    options=list(OPTIMIZER_TYPES),
                    default="AdamW",
                    tooltip="Optimizer (8-bit ones need bitsandbytes and CUDA). Prodigy, DAdaptAdam and "
                    "ProdigyPlusScheduleFree set their own step size: use learning_rate 1.0. Schedule-free ones "
                    "ignore lr_scheduler (optimizer_args warmup_steps=N for their warmup).",
                ),
                io.String.Input(
                    "optimizer_args",
                    default="",
                    tooltip="key=value pairs, e.g. weight_decay=0.01 betas=0.9,0.99 (kohya optimizer_args); "
                    "checked against the optimizer's own arguments when the prompt is queued.",
                ),
                io.Combo.Input(
                    "lr_scheduler", options=list(SCHEDULER_TYPES), default="constant", tooltip="Learning-rate schedule."
                ),
                io.Float.Input(
                    "lr_warmup_steps",
                    default=0.0,
                    min=0.0,
                    max=1_000_000,
                    step=1.0,
                    tooltip="Warmup steps; a value below 1 is a fraction of the total steps.",
                ),
                io.Int.Input(
                    "lr_scheduler_num_cycles",
                    default=1,
                    min=1,
                    max=1000,
                    tooltip="Restarts for cosine_with_restarts; for cosine_with_min_lr and "
                    "warmup_stable_decay the number of half cosines (kohya passes num_cycles / 2).",
                ),
                io.Float.Input(
                    "lr_scheduler_power",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Power of the polynomial schedule.",
                ),
                io.Int.Input(
                    "gradient_accumulation_steps", default=1, min=1, max=1024, tooltip="Batches per optimizer step."
                ),
                io.Float.Input(
                    "max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, tooltip="Gradient clipping; 0 = off."
                ),
                io.Float.Input(
                    "scale_weight_norms",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Max-norm regularisation of the LoRA weights; 0 = off.",
                ),
                # control_after_generate "fixed": the frontend gives every INT named "seed" a control widget that
                # defaults to "randomize", which would retrain a new LoRA on every queue
                io.Int.Input(
                    "seed",
                    default=42,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=io.ControlAfterGenerate.fixed,
                    tooltip="Seed of every random draw (LoRA init, noise, timesteps, order, dropout). "
                    "Same seed = same LoRA on CPU.",
                ),
                io.Combo.Input(
                    "train_dtype",
                    options=list(TRAIN_DTYPES),
                    default="auto",
                    tooltip="Compute "
                    "dtype of the forward/backward pass; LoRA weights and optimizer stay fp32 unless "
                    "full_bf16. auto: bf16 where the GPU computes it natively (ComfyUI's check), fp16 "
                    "on older GPUs, fp32 on the CPU. fp16 uses a gradient scaler.",
                ),
                io.Boolean.Input(
                    "full_bf16",
                    default=False,
                    tooltip="Keep the LoRA weights in bf16 too (less memory; needs train_dtype bf16).",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute each ResBlock and transformer block in backward (as kohya): much less memory, "
                    "~30% slower.",
                ),
                io.String.Input("output_name", default="my_sdxl_lora", tooltip="File name stem of the saved LoRA."),
                io.String.Input(
                    "output_subfolder", default="sdxl_lora_trainer", tooltip="Subfolder of models/loras to save into."
                ),
                io.Combo.Input(
                    "save_precision",
                    options=["fp16", "bf16", "fp32"],
                    default="fp16",
                    tooltip="dtype of the saved file.",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Save as exactly <output_name>.safetensors, "
                    "replacing an earlier file (off: every run gets a new, unique name and no file is "
                    "ever replaced). Note: a LoraLoader that already loaded that name keeps serving "
                    "the old weights until it loads another file.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="SDXL CLIP: needed to train the text encoders or to "
                    "encode randomised captions (shuffle/dropout) during training.",
                ),
                TextCacheSocket.Input("text", optional=True, tooltip="From 'Cache Text' (fixed captions)."),
                ObjectiveSocket.Input(
                    "objective",
                    optional=True,
                    tooltip="From 'Loss & Noise (advanced)'; kohya defaults when not connected.",
                ),
                CheckpointingSocket.Input("checkpointing", optional=True, tooltip="From 'Save Every N & Resume'."),
                PreviewsSocket.Input("previews", optional=True, tooltip="From 'Sample Previews'."),
                TrainSettingsSocket.Input(
                    "train_settings",
                    optional=True,
                    tooltip="From 'Train Settings' or 'Import kohya Config': when connected, these are the run's "
                    "training settings and this node's training widgets (max_train_steps ... gradient_checkpointing) "
                    "are not used; the report says so.",
                ),
                # appended after every older input: saved workflows keep their widget positions
                io.Float.Input(
                    "lr_decay_steps",
                    default=0.0,
                    min=0.0,
                    max=1_000_000,
                    step=1.0,
                    optional=True,
                    tooltip="warmup_stable_decay: the steps at the end in which the lr decays; a value below 1 is a "
                    "fraction of the total steps (kohya lr_decay_steps).",
                ),
                io.Float.Input(
                    "lr_scheduler_min_lr_ratio",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    optional=True,
                    tooltip="cosine_with_min_lr, warmup_stable_decay, rex: the lr they end at, as a fraction of the "
                    "learning rate (kohya lr_scheduler_min_lr_ratio).",
                ),
                io.String.Input(
                    "lr_scheduler_args",
                    default="",
                    optional=True,
                    tooltip="kohya lr_scheduler_args: piecewise_constant needs step_rules='1:100,0.5:200,0.1' "
                    "(factor 1 until step 100, 0.5 until 200, then 0.1); warmup_stable_decay takes "
                    "warmup_type/decay_type (linear, cosine, 1-sqrt).",
                ),
                io.Combo.Input(
                    "memory_mode",
                    options=list(MEMORY_MODES),
                    default="auto",
                    optional=True,
                    tooltip="How ComfyUI places the frozen U-Net on the GPU. auto: it keeps free what the memory plan "
                    "says a step needs and streams the weights that do not fit (slower, no out-of-memory). full: every "
                    "weight on the GPU (fastest; needs the room). stream: as few weights resident as ComfyUI allows "
                    "(least memory, slowest). No effect on the CPU.",
                ),
                ValidationSocket.Input(
                    "validation",
                    optional=True,
                    tooltip="From 'Validation': how often the validation loss is computed, or a separate validation "
                    "dataset. Without it, a dataset with a validation_split is validated every epoch.",
                ),
                EmaSocket.Input("ema", optional=True, tooltip="From 'EMA': keep and save an EMA of the weights."),
                LoggingSocket.Input(
                    "logging", optional=True, tooltip="From 'Logging (W&B)'; the TensorBoard log is always written."
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="model",
                    tooltip="The MODEL with the trained LoRA applied exactly as the file holds it (save_precision).",
                ),
                io.Clip.Output(
                    display_name="clip",
                    tooltip="The CLIP with the trained LoRA applied (unchanged when only the U-Net was trained).",
                ),
                io.LoraModel.Output(
                    display_name="lora",
                    tooltip="The LoRA weights as saved, for 'Load LoRA Model' or 'Save LoRA Weights' (also when the "
                    "save into models/loras failed).",
                ),
                io.AnyType.Output(
                    display_name="lora_name",
                    tooltip="The saved file's name: connect to LoraLoader's lora_name (empty when the save failed; "
                    "the report says why).",
                ),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step (for 'Plot Loss Graph')."),
                io.Image.Output(display_name="loss_graph", tooltip="Loss, moving average and lr as an image."),
                io.String.Output(display_name="report", tooltip="What was trained and where it was saved."),
                io.Image.Output(
                    display_name="previews",
                    tooltip="All sample previews of the run (empty 64x64 black image without the previews input).",
                ),
                io.LossMap.Output(
                    display_name="validation_loss",
                    tooltip="Validation loss per validation, in order (for 'Plot Loss Graph'); empty without "
                    "validation images. The steps are in the report and the logs.",
                ),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def validate_inputs(
        cls,
        output_name: str | None = None,
        output_subfolder: str | None = None,
        learning_rate: float | None = None,
        unet_lr: float | None = None,
        clip_l_lr: float | None = None,
        clip_g_lr: float | None = None,
        optimizer: str | None = None,
        optimizer_args: str | None = None,
        lr_scheduler: str | None = None,
        lr_scheduler_args: str | None = None,
        lr_decay_steps: float | None = None,
        lr_scheduler_min_lr_ratio: float | None = None,
        train_settings: object = NOT_CONNECTED,
    ) -> bool:
        """Refuse, when the prompt is queued and not after a long run, unsafe names, learning rates that train
        nothing, optimizer_args the optimizer cannot take and schedule settings the schedule does not use (None: the
        input is linked; execute checks it then, still before training). The training widgets are not used when
        train_settings is connected (the Train Settings node checks its own)."""
        problems = []
        if isinstance(output_name, str) and isinstance(output_subfolder, str):
            name_problem = output_name_error(output_subfolder, output_name)
            problems += [name_problem] if name_problem else []
        if train_settings is NOT_CONNECTED:
            problems += learning_rate_problems(
                cls, learning_rate=learning_rate, unet_lr=unet_lr, clip_l_lr=clip_l_lr, clip_g_lr=clip_g_lr
            )
            problems += optimizer_problems(
                cls,
                optimizer,
                optimizer_args,
                lr_scheduler,
                lr_scheduler_args,
                lr_decay_steps,
                lr_scheduler_min_lr_ratio,
            )
        return refuse_at_queue_time(problems)

    @classmethod
    def execute(
        cls,
        model,
        dataset,
        latents,
        network,
        max_train_steps: int,
        max_train_epochs: int,
        learning_rate: float,
        unet_lr: float,
        clip_l_lr: float,
        clip_g_lr: float,
        optimizer: str,
        optimizer_args: str,
        lr_scheduler: str,
        lr_warmup_steps: float,
        lr_scheduler_num_cycles: int,
        lr_scheduler_power: float,
        gradient_accumulation_steps: int,
        max_grad_norm: float,
        scale_weight_norms: float,
        seed: int,
        train_dtype: str,
        full_bf16: bool,
        gradient_checkpointing: bool,
        output_name: str,
        output_subfolder: str,
        save_precision: str,
        overwrite: bool,
        clip=None,
        text=None,
        objective=None,
        checkpointing=None,
        previews=None,
        train_settings=None,
        lr_decay_steps: float = 0.0,
        lr_scheduler_min_lr_ratio: float = 0.0,
        lr_scheduler_args: str = "",
        memory_mode: str = "auto",
        validation=None,
        ema=None,
        logging=None,
    ) -> io.NodeOutput:
        if train_settings is not None:
            config = train_settings.config
        else:
            config = train_config_from_widgets(
                max_train_steps=max_train_steps,
                max_train_epochs=max_train_epochs,
                learning_rate=learning_rate,
                unet_lr=unet_lr,
                clip_l_lr=clip_l_lr,
                clip_g_lr=clip_g_lr,
                optimizer=optimizer,
                optimizer_args=optimizer_args,
                lr_scheduler=lr_scheduler,
                lr_warmup_steps=lr_warmup_steps,
                lr_scheduler_num_cycles=lr_scheduler_num_cycles,
                lr_scheduler_power=lr_scheduler_power,
                gradient_accumulation_steps=gradient_accumulation_steps,
                max_grad_norm=max_grad_norm,
                scale_weight_norms=scale_weight_norms,
                seed=seed,
                train_dtype=train_dtype,
                full_bf16=full_bf16,
                gradient_checkpointing=gradient_checkpointing,
                lr_decay_steps=lr_decay_steps,
                lr_scheduler_min_lr_ratio=lr_scheduler_min_lr_ratio,
                lr_scheduler_args=lr_scheduler_args,
            )
        config = replace(with_objective(config, objective).with_loraplus(network.loraplus), memory_mode=memory_mode)
        out = OutputSettings(
            name=output_name, subfolder=output_subfolder, save_precision=save_precision, overwrite=overwrite
        )
        job = TrainJob(
            dataset=dataset,
            network=network,
            config=config,
            out=out,
            checkpointing=checkpointing,
            previews=previews,
            ema=ema,
            log_settings=logging,
            node_id=cls.hidden.unique_id,
            prompt=cls.hidden.prompt,
            extra_pnginfo=cls.hidden.extra_pnginfo,
            validation=validation,
        )
        result = job.execute(model, clip, latents, text)
        history = result.state.history
        graph = pil_to_image(
            loss_graph_image([r.step for r in history], [r.loss for r in history], [r.lr for r in history])
        )
        images = result.previews if result.previews is not None else torch.zeros(1, 64, 64, 3)
        report = result.report
        if train_settings is not None:
            report += f"\ntraining settings from {train_settings.source} (this node's training widgets were not used)"
        return io.NodeOutput(
            result.model,
            result.clip,
            result.weights,
            result.saved.lora_name if result.saved is not None else "",
            {"loss": [r.loss for r in history]},
            graph,
            report,
            images,
            {"loss": [r.loss for r in result.state.validation_history]},
            ui={"text": [report]},
        )


NODES = [TrainLora]
