"""The run's training settings as a node of their own, for graphs that train and export the same run."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.run.config import TrainSettings
from .common import CATEGORY, refuse_at_queue_time
from .sockets import TrainSettingsSocket
from .train_node import (
    TRAINING_WIDGETS,
    TrainLora,
    learning_rate_problems,
    optimizer_problems,
    train_config_from_widgets,
)


def training_widget_inputs() -> list[io.Input]:
    """The Train node's own training widgets (same names, defaults and limits), so both nodes always agree."""
    return [i for i in TrainLora.define_schema().inputs if i.id in TRAINING_WIDGETS]


class TrainSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraTrainSettings",
            display_name="SDXL LoRA: Train Settings",
            category=CATEGORY,
            description="The Train node's training widgets as one value: connect it to the Train node's and the "
            "'Export kohya Run' node's train_settings input, so the graph trains and exports the same run.",
            inputs=training_widget_inputs(),
            outputs=[TrainSettingsSocket.Output(display_name="train_settings")],
        )

    @classmethod
    def validate_inputs(
        cls,
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
    ) -> bool:
        """Learning rates that would train nothing, optimizer_args the optimizer cannot take and schedule settings
        the schedule does not use are refused when the prompt is queued, as on the Train node."""
        return refuse_at_queue_time(
            learning_rate_problems(
                cls, learning_rate=learning_rate, unet_lr=unet_lr, clip_l_lr=clip_l_lr, clip_g_lr=clip_g_lr
            )
            + optimizer_problems(
                cls,
                optimizer,
                optimizer_args,
                lr_scheduler,
                lr_scheduler_args,
                lr_decay_steps,
                lr_scheduler_min_lr_ratio,
            )
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        return io.NodeOutput(TrainSettings(train_config_from_widgets(**widgets)))


NODES = [TrainSettingsNode]
