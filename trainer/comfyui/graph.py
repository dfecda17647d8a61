"""What the queued prompt says about where a node's MODEL came from: the checkpoint file and the LoRAs merged on the
way (kohya needs the file itself, and --base_weights for LoRAs a LoraLoader applied before training)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: loader nodes whose ``ckpt_name`` is a full SDXL checkpoint (MODEL + CLIP + VAE)
CHECKPOINT_LOADERS = {"CheckpointLoaderSimple", "CheckpointLoader", "ImageOnlyCheckpointLoader"}
#: nodes that pass a MODEL through with a LoRA merged: (lora input, model strength input)
LORA_LOADERS = {"LoraLoader": ("lora_name", "strength_model"), "LoraLoaderModelOnly": ("lora_name", "strength_model")}


@dataclass
class ModelSource:
    """``checkpoint``: the checkpoint file name (relative to ComfyUI's checkpoints folder) and ``checkpoint_path`` its
    absolute path; ``loras``: (lora name, absolute path, model strength) merged on the way, in order."""

    checkpoint: str | None = None
    checkpoint_path: str | None = None
    loras: list[tuple[str, str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _link(value: Any) -> str | None:
    """The source node id of an input that is a link (``[node_id, slot]`` in ComfyUI's API prompt)."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
        return str(value[0])
    return None


def model_source(prompt: Mapping[str, Any] | None, node_id: str | None, input_name: str = "model") -> ModelSource:
    """Follow ``input_name`` of node ``node_id`` upstream through MODEL pass-through nodes to its loader."""
    source = ModelSource()
    if not prompt or node_id is None or str(node_id) not in prompt:
        source.notes.append("the prompt does not say where the MODEL came from")
        return source
    import folder_paths

    current = _link(prompt[str(node_id)].get("inputs", {}).get(input_name))
    seen: set[str] = set()
    while current is not None and current not in seen and current in prompt:
        seen.add(current)
        node = prompt[current]
        kind, inputs = node.get("class_type"), node.get("inputs", {})
        if kind in CHECKPOINT_LOADERS and isinstance(inputs.get("ckpt_name"), str):
            source.checkpoint = inputs["ckpt_name"]
            source.checkpoint_path = folder_paths.get_full_path("checkpoints", source.checkpoint)
            break
        if kind in LORA_LOADERS:
            name_key, strength_key = LORA_LOADERS[kind]
            name, strength = inputs.get(name_key), inputs.get(strength_key, 1.0)
            if isinstance(name, str) and isinstance(strength, (int, float)):
                source.loras.insert(0, (name, folder_paths.get_full_path("loras", name) or name, float(strength)))
            else:
                source.notes.append(f"node {current} ({kind}): its LoRA or strength comes from a link")
        elif "model" not in inputs:
            source.notes.append(f"the MODEL comes from node {current} ({kind}), not from a checkpoint file")
            break
        else:
            source.notes.append(f"the MODEL passes through node {current} ({kind}); kohya trains without its change")
        current = _link(inputs.get("model"))
    return source
