"""Sample previews of the LoRA while it trains, with ComfyUI's own sampler.

Rendered from inside the training context (the LoRA hooks are attached, so the MODEL samples with
the LoRA as it is at that step), with dropout off and the global RNG restored afterwards, so taking
previews never changes what is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..comfyui import encoders as comfy_encoders
from ..comfyui import sampling as comfy_sampling
from ..comfyui import training as comfy_training


@dataclass(frozen=True)
class PreviewSettings:
    """What the Sample Previews node asks for. ``prompts``: one per line when given as the node's text (blank lines
    dropped); checked here so a bad value fails when the node runs, before training."""

    prompts: tuple[str, ...] | str
    negative: str = ""
    every_n_steps: int = 0  # 0: only at the end
    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", tuple(p.strip() for p in self.prompts.split("\n") if p.strip()))
        if not self.prompts:
            raise ValueError("Sample Previews: write at least one prompt (one per line).")
        if self.width % 8 or self.height % 8:
            raise ValueError("Sample Previews: width and height must be multiples of 8.")


@dataclass(frozen=True)
class PreviewRequest:
    """The Sample Previews node's value: what to render, and the CLIP/VAE to render it with."""

    settings: PreviewSettings
    clip: Any
    vae: Any


class PreviewRenderer:
    def __init__(self, settings: PreviewSettings, clip: Any, vae: Any) -> None:
        self.settings = settings
        self.clip = clip
        self.vae = vae
        self.negative = comfy_encoders.encode_conditioning(clip, settings.negative)
        self.positive = [comfy_encoders.encode_conditioning(clip, p) for p in settings.prompts]
        self.images: list[torch.Tensor] = []

    def due(self, step: int) -> bool:
        n = self.settings.every_n_steps
        return bool(n) and step % n == 0

    def render(self, model: Any, network: Any, training_clip: Any = None) -> list[torch.Tensor]:
        """One image per prompt, sampled with ``model`` (the MODEL the run trains through, LoRA attached).

        ``training_clip``: the CLIP whose text encoders are being trained; the prompts are then encoded again
        with it, so the previews show the text-encoder LoRA too.
        """
        s = self.settings
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                if training_clip is not None:
                    positive = [comfy_encoders.encode_conditioning(training_clip, p) for p in s.prompts]
                    negative = comfy_encoders.encode_conditioning(training_clip, s.negative)
                else:
                    positive, negative = self.positive, self.negative
                out = [
                    comfy_sampling.sample_image(
                        model,
                        self.vae,
                        pos,
                        negative,
                        width=s.width,
                        height=s.height,
                        seed=s.seed + i,
                        steps=s.steps,
                        cfg=s.cfg,
                        sampler_name=s.sampler_name,
                        scheduler=s.scheduler,
                    )
                    for i, pos in enumerate(positive)
                ]
        finally:
            network.train(was_training)
            comfy_training.load_for_training(model)  # decoding may have evicted the U-Net on a small GPU
        self.images.extend(out)
        return out
