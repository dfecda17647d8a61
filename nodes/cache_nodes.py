"""Cache nodes: VAE latents and text-encoder outputs, computed once with ComfyUI's loaded VAE/CLIP."""

from __future__ import annotations

import os

from comfy_api.latest import io

from ..trainer.cache.latents import LatentCache
from ..trainer.cache.text import TextCache
from ..trainer.comfyui import services as comfy_services
from ..trainer.data.token_length import CHOICES as TOKEN_LENGTH_CHOICES
from ..trainer.data.token_length import TokenLength
from .common import CATEGORY
from .sockets import DatasetSocket, LatentCacheSocket, TextCacheSocket

CACHE_SUBDIR = os.path.join("sdxl_lora_trainer", "cache")


def cache_folder(enabled: bool, folder: str, kind: str) -> str | None:
    """The disk cache folder: the user's, or output/sdxl_lora_trainer/cache/<kind> (temp/ is wiped at start)."""
    if not enabled:
        return None
    if folder.strip():
        path = folder.strip()
        return path if os.path.isabs(path) else os.path.join(comfy_services.output_directory(), path)
    return os.path.join(comfy_services.output_directory(), CACHE_SUBDIR, kind)


def _progress(node_id: str):
    bar = comfy_services.Progress(1, node_id)
    return lambda done, total: bar.update(done, total)


def _check_interrupt() -> None:
    if comfy_services.interrupted():
        comfy_services.raise_interrupt()


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraCacheLatents",
            display_name="SDXL LoRA: Cache Latents",
            category=f"{CATEGORY}/cache",
            description="Encodes every image (and its flip, with flip_aug) at its bucket size with the VAE once. "
            "Cached by content hash: unchanged images are never encoded again, also after a restart "
            "with the disk cache.",
            inputs=[
                DatasetSocket.Input("dataset", tooltip="The bucketed dataset."),
                io.Vae.Input("vae", tooltip="The SDXL VAE (from Load Checkpoint)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per VAE call (same bucket)."),
                io.Boolean.Input(
                    "float32_vae",
                    default=False,
                    tooltip="Run the VAE in float32 (kohya no_half_vae): "
                    "use it if latents come out NaN with an fp16 VAE.",
                ),
                io.Boolean.Input(
                    "cache_to_disk",
                    default=False,
                    tooltip="Also keep the latents on disk so a restarted ComfyUI does no VAE work.",
                ),
                io.String.Input(
                    "disk_folder",
                    default="",
                    tooltip="Disk cache folder; empty = "
                    "output/sdxl_lora_trainer/cache/latents. Relative paths are under the output "
                    "directory.",
                ),
            ],
            outputs=[
                LatentCacheSocket.Output(display_name="latents", tooltip="Latents for the train node."),
                io.String.Output(display_name="report", tooltip="Encoded / reused counts and cache size."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, dataset, vae, batch_size: int, float32_vae: bool, cache_to_disk: bool, disk_folder: str
    ) -> io.NodeOutput:
        cache = LatentCache.build(
            dataset,
            vae,
            batch_size=batch_size,
            float32_vae=float32_vae,
            disk_dir=cache_folder(cache_to_disk, disk_folder, "latents"),
            progress=_progress(cls.hidden.unique_id),
            check_interrupt=_check_interrupt,
        )
        report = cache.report_text()
        return io.NodeOutput(cache, report, ui={"text": [report]})


class CacheText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SDXLLoraCacheText",
            display_name="SDXL LoRA: Cache Text",
            category=f"{CATEGORY}/cache",
            description="Encodes each caption once with both SDXL text encoders (context 2048 + pooled 1280), "
            "as literal text, with kohya's max_token_length (by default 75 tokens: longer captions are truncated and "
            "listed in the report). Captions with shuffle/dropout are marked live and encoded during training "
            "instead; an edited caption re-encodes only itself.",
            inputs=[
                DatasetSocket.Input("dataset", tooltip="The bucketed dataset."),
                io.Clip.Input("clip", tooltip="The SDXL CLIP (from Load Checkpoint)."),
                io.Boolean.Input("cache_to_disk", default=False, tooltip="Also keep the encodings on disk."),
                io.String.Input(
                    "disk_folder", default="", tooltip="Disk cache folder; empty = output/sdxl_lora_trainer/cache/text."
                ),
                io.Combo.Input(
                    "max_token_length",
                    options=list(TOKEN_LENGTH_CHOICES),
                    default=TOKEN_LENGTH_CHOICES[0],
                    optional=True,
                    tooltip="kohya's max_token_length. 75 (kohya's default): longer captions are truncated (the "
                    "report lists them). 150 / 225: encoded in rows of 75 tokens, context 152 / 227 long, as kohya "
                    "does. ComfyUI chunking: any length, in 77-token chunks, as CLIPTextEncode encodes prompts "
                    "(kohya has no such mode).",
                ),
            ],
            outputs=[
                TextCacheSocket.Output(display_name="text", tooltip="Text encodings for the train node."),
                io.String.Output(display_name="report", tooltip="Encoded / reused / live counts."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls, dataset, clip, cache_to_disk: bool, disk_folder: str, max_token_length: str = TOKEN_LENGTH_CHOICES[0]
    ) -> io.NodeOutput:
        cache = TextCache.build(
            dataset,
            clip,
            disk_dir=cache_folder(cache_to_disk, disk_folder, "text"),
            progress=_progress(cls.hidden.unique_id),
            check_interrupt=_check_interrupt,
            token_length=TokenLength.from_choice(max_token_length),
        )
        report = cache.report_text()
        return io.NodeOutput(cache, report, ui={"text": [report]})


NODES = [CacheLatents, CacheText]
