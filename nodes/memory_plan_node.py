"""Memory Plan: how much GPU memory a run with these settings needs, and whether it fits, before training."""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..trainer.run.config import MEMORY_MODES, TRAIN_DTYPES, TrainConfig
from ..trainer.run.memory_plan import StepShape
from ..trainer.run.optimizers import OPTIMIZER_TYPES, OptimizerSettings
from .common import CATEGORY
from .sockets import NetworkSocket, TrainSettingsSocket


class MemoryPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraMemoryPlan",
            display_name="SDXL LoRA: Memory Plan",
            category=CATEGORY,
            description="Peak GPU memory of a training run with these settings, by what holds it (frozen weights, "
            "LoRA, optimizer states, activations), and whether it fits on 8 / 12 / 16 / 24 GB GPUs. Measured by "
            "running the real training step once on shape-only tensors (nothing is allocated, nothing trains). "
            "The Train node shows the same plan in its report.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SDXL MODEL the Train node gets."),
                NetworkSocket.Input("network", tooltip="From 'Network'."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=64, tooltip="Largest bucket's width."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=64, tooltip="Largest bucket's height."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Combo.Input(
                    "train_dtype",
                    options=list(TRAIN_DTYPES),
                    default="auto",
                    tooltip="As on the Train node (ignored when train_settings is connected).",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="As on the Train node (ignored when train_settings is connected).",
                ),
                io.Combo.Input(
                    "optimizer",
                    options=list(OPTIMIZER_TYPES),
                    default="AdamW",
                    tooltip="As on the Train node (ignored when train_settings is connected).",
                ),
                io.Combo.Input(
                    "memory_mode",
                    options=list(MEMORY_MODES),
                    default="auto",
                    tooltip="As on the Train node: how ComfyUI places the U-Net while the plan is measured.",
                ),
                io.Clip.Input(
                    "clip", optional=True, tooltip="SDXL CLIP: needed when the network trains the text encoders."
                ),
                TrainSettingsSocket.Input(
                    "train_settings",
                    optional=True,
                    tooltip="From 'Train Settings': its dtype, checkpointing and optimizer are used instead of the "
                    "widgets above.",
                ),
            ],
            outputs=[io.String.Output(display_name="plan")],
        )

    @classmethod
    def execute(
        cls,
        model,
        network,
        width: int,
        height: int,
        batch_size: int,
        train_dtype: str,
        gradient_checkpointing: bool,
        optimizer: str,
        memory_mode: str,
        clip=None,
        train_settings=None,
    ) -> io.NodeOutput:
        from ..trainer.run.session import plan_without_training

        if train_settings is not None:
            config = replace(train_settings.config, memory_mode=memory_mode)
            source = f"settings from {train_settings.source}"
        else:
            config = TrainConfig(
                train_dtype=train_dtype,
                gradient_checkpointing=gradient_checkpointing,
                optimizer=OptimizerSettings(optimizer_type=optimizer),
                memory_mode=memory_mode,
            )
            source = "settings from this node's widgets"
        shape = StepShape(width, height, batch_size)
        plan = plan_without_training(model, clip, network.config, config, shape)
        text = "\n".join([*plan.lines(), f"({source})"])
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [MemoryPlan]
