"""What every node of the pack shares: the menu category, the IMAGE converter and the queue-time refusal (sockets:
nodes/sockets.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

CATEGORY = "training/sdxl_lora"


def pil_to_image(pil) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one: [1, H, W, 3] float in 0..1."""
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


class QueueTimeError(ValueError):
    """Inputs a node refuses when the prompt is queued (its validate_inputs), before anything runs."""


def refuse_at_queue_time(problems: Sequence[str]) -> bool:
    """validate_inputs' answer: True, or every problem in one raised message.

    Raised, not returned: ComfyUI attaches a returned message to every input validate_inputs names
    (execution.validate_inputs), so a bad output_name would also be reported on output_subfolder and each learning
    rate; a raised message is reported once, on the node ("Exception when validating node: <message>").
    """
    if problems:
        raise QueueTimeError("\n".join(problems))
    return True


def range_problems(node: type, values: Mapping[str, Any]) -> list[str]:
    """ComfyUI skips its min/max check for every input validate_inputs names; the same check for those inputs
    (None: the input is linked, its value is not known yet)."""
    inputs = {i.id: i for i in node.define_schema().inputs}
    problems = []
    for name, value in values.items():
        spec = inputs[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if getattr(spec, "min", None) is not None and value < spec.min:
            problems.append(f"{name} {value} is below its minimum {spec.min}")
        elif getattr(spec, "max", None) is not None and value > spec.max:
            problems.append(f"{name} {value} is above its maximum {spec.max}")
    return problems
