"""The pack's own socket types, each declaring the Python type it carries between nodes (ComfyUI V3 comfytype).

What flows through them is a settings object or a built result (frozen dataclasses for settings), never a dict read
by key: the node that consumes a socket reads typed fields, and a saved workflow's links keep their io_type names.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..trainer.cache.latents import LatentCache
from ..trainer.cache.text import TextCache
from ..trainer.data.dataset import TrainingDataset
from ..trainer.data.sources import ScanResult
from ..trainer.network.config import NetworkSetup
from ..trainer.objective.batch_loss import ObjectiveSettings
from ..trainer.run.checkpoints import CheckpointSettings
from ..trainer.run.config import TrainSettings
from ..trainer.run.ema import EmaSettings
from ..trainer.run.live_log import LogSettings
from ..trainer.run.previews import PreviewRequest
from ..trainer.run.validation import ValidationRequest


@io.comfytype(io_type="SDXL_LORA_IMAGES")
class ImagesSocket(io.ComfyTypeIO):
    """Scanned images and captions, before bucketing (with what was skipped and why)."""

    Type = ScanResult


@io.comfytype(io_type="SDXL_LORA_DATASET")
class DatasetSocket(io.ComfyTypeIO):
    """The bucketed, kohya-ready dataset."""

    Type = TrainingDataset


@io.comfytype(io_type="SDXL_LORA_LATENT_CACHE")
class LatentCacheSocket(io.ComfyTypeIO):
    """Cached VAE latents of every image of a dataset."""

    Type = LatentCache


@io.comfytype(io_type="SDXL_LORA_TEXT_CACHE")
class TextCacheSocket(io.ComfyTypeIO):
    """Cached text-encoder outputs of every fixed caption of a dataset."""

    Type = TextCache


@io.comfytype(io_type="SDXL_LORA_NETWORK")
class NetworkSocket(io.ComfyTypeIO):
    """The network to train (kohya's network settings) and the LoRA file it continues from, if any."""

    Type = NetworkSetup


@io.comfytype(io_type="SDXL_LORA_OBJECTIVE")
class ObjectiveSocket(io.ComfyTypeIO):
    """kohya's loss and noise options."""

    Type = ObjectiveSettings


@io.comfytype(io_type="SDXL_LORA_CHECKPOINTING")
class CheckpointingSocket(io.ComfyTypeIO):
    """Intermediate saves, resumable states and the state to resume from."""

    Type = CheckpointSettings


@io.comfytype(io_type="SDXL_LORA_PREVIEWS")
class PreviewsSocket(io.ComfyTypeIO):
    """Sample preview prompts and sampler settings, with the CLIP and VAE to render them."""

    Type = PreviewRequest


@io.comfytype(io_type="SDXL_LORA_TRAIN_SETTINGS")
class TrainSettingsSocket(io.ComfyTypeIO):
    """The run's training settings (steps, learning rates, optimizer, schedule, precision, seed)."""

    Type = TrainSettings


@io.comfytype(io_type="SDXL_LORA_VALIDATION")
class ValidationSocket(io.ComfyTypeIO):
    """When the validation loss is computed, its noise seed, and optionally a separate validation dataset."""

    Type = ValidationRequest


@io.comfytype(io_type="SDXL_LORA_EMA")
class EmaSocket(io.ComfyTypeIO):
    """EMA of the trained weights: decay, warm-up, update interval, start step, how it is saved."""

    Type = EmaSettings


@io.comfytype(io_type="SDXL_LORA_LOGGING")
class LoggingSocket(io.ComfyTypeIO):
    """Where the run logs besides its TensorBoard folder (a Weights & Biases project)."""

    Type = LogSettings
