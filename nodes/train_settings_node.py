"""The run's training settings as a node of their own, for graphs that train and export the same run."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.run.config import TrainSettings
from .common import CATEGORY
from .sockets import TrainSettingsSocket
from .train_node import TRAINING_WIDGETS, TrainLora, optimizer_widgets_error, train_config_from_widgets


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
        optimizer: str | None = None,
        optimizer_args: str | None = None,
        lr_scheduler: str | None = None,
        lr_scheduler_args: str | None = None,
        lr_decay_steps: float | None = None,
        lr_scheduler_min_lr_ratio: float | None = None,
    ) -> bool | str:
        """optimizer_args the optimizer cannot take and unused schedule settings are refused when the prompt is
        queued."""
        error = optimizer_widgets_error(
            optimizer, optimizer_args, lr_scheduler, lr_scheduler_args, lr_decay_steps, lr_scheduler_min_lr_ratio
        )
        return error or True

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        return io.NodeOutput(TrainSettings(train_config_from_widgets(**widgets)))


NODES = [TrainSettingsNode]
