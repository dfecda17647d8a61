"""What one kohya sd-scripts run needs from the graph, in the pack's own settings objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..network.config import NetworkConfig
from ..run.checkpoints import CheckpointSettings
from ..run.config import TrainConfig
from ..run.previews import PreviewSettings
from ..run.validation import ValidationRequest


@dataclass(frozen=True)
class CacheChoices:
    """How kohya should cache (the pack always caches latents; these say where and how)."""

    latents_to_disk: bool = False  # kohya --cache_latents_to_disk (the pack's disk cache of the latent node)
    vae_batch_size: int = 1
    float32_vae: bool = False  # kohya --no_half_vae
    text_encoder_outputs: bool = False  # kohya --cache_text_encoder_outputs (fixed captions, frozen encoders)
    text_encoder_outputs_to_disk: bool = False


@dataclass(frozen=True)
class KohyaRun:
    """Every setting of a graph's training that kohya's sdxl_train_network.py has an argument for.

    ``network_weights``: the LoRA file the Network node continues from (kohya --network_weights with
    --dim_from_weights), or None. ``checkpoint_path``: the SDXL checkpoint file ComfyUI loaded, when known.
    ``base_weights``: LoRAs a LoraLoader merged into the MODEL upstream (kohya --base_weights / _multiplier).
    """

    network: NetworkConfig
    train: TrainConfig
    output_name: str = "sdxl_lora"
    save_precision: str = "fp16"
    checkpointing: CheckpointSettings = field(default_factory=CheckpointSettings)
    previews: PreviewSettings | None = None
    caching: CacheChoices = field(default_factory=CacheChoices)
    network_weights: str | None = None
    checkpoint_path: str | None = None
    base_weights: tuple[tuple[str, float], ...] = ()  # LoRAs merged into the MODEL before training: (path, strength)
    v_parameterization: bool = False
    validation: ValidationRequest | None = None  # the 'Validation' node's settings (None: kohya's defaults)
