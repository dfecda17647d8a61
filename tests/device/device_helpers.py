"""Helpers of the device tier: ComfyUI's model management on the stand-in, the tiny SDXL on it, LoRA comparison.

The training engine runs with ComfyUI's MODEL/CLIP/VAE on a stand-in accelerator.

Users train on CUDA; CI has no GPU. Here the tiny SDXL's load device is the stand-in of devkit/standin_device.py
(real values, CUDA's device rules, counted host<->device copies and syncs), and ComfyUI's model management treats
it as its GPU: ``ComfyGpu`` gives it a memory size, a VRAM mode (the command-line flags' states), async offload
streams, --gpu-only, so ComfyUI's own loading, partial loading, eviction and weight streaming code runs on it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from comfy_host import import_comfy

import_comfy()

import comfy.cli_args  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import tiny_sdxl  # noqa: E402
import training_fixtures as tf  # noqa: E402
from standin_device import DEVICE  # noqa: E402

CPU = torch.device("cpu")


class FakeStream:
    """What ComfyUI's async weight offload asks of a CUDA stream (the stand-in runs everything in order)."""

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    @staticmethod
    def as_context(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


@dataclass
class ComfyGpu:
    """ComfyUI's view of the stand-in: ``memory`` bytes, a VRAM state, ``streams`` offload streams, --gpu-only."""

    memory: int = 8 << 30
    vram_state: str = "NORMAL_VRAM"
    streams: int = 0
    gpu_only: bool = False

    def free_memory(self) -> int:
        used = sum(
            lm.model_loaded_memory() for lm in mm.current_loaded_models if lm.device == DEVICE and lm.model is not None
        )
        return max(0, self.memory - used)

    @contextlib.contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[ComfyGpu]:
        real_free = mm.get_free_memory

        def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
            if dev is not None and torch.device(dev).type == DEVICE.type:
                free = self.free_memory()
                return (free, 0) if torch_free_too else free
            return real_free(dev, torch_free_too)

        monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
        monkeypatch.setattr(mm, "vram_state", mm.VRAMState[self.vram_state])
        monkeypatch.setattr(mm, "NUM_STREAMS", self.streams)
        monkeypatch.setitem(mm.STREAMS, DEVICE, [FakeStream() for _ in range(self.streams)])
        monkeypatch.setattr(comfy.cli_args.args, "gpu_only", self.gpu_only)
        if self.gpu_only:  # --gpu-only: outputs of the encoders stay on the GPU (ComfyUI's torch device)
            monkeypatch.setattr(mm, "intermediate_device", lambda: DEVICE)
        try:
            yield self
        finally:
            mm.free_memory(1e30, DEVICE)
            mm.current_loaded_models[:] = [lm for lm in mm.current_loaded_models if lm.device != DEVICE]
            for stream in list(mm.STREAM_CAST_BUFFERS):
                if isinstance(stream, FakeStream):
                    del mm.STREAM_CAST_BUFFERS[stream]
            mm.stream_counters.pop(DEVICE, None)


def models_on(
    device: torch.device, gpu_only: bool = False, patcher_class: Any = None, v_prediction: bool = False
) -> tuple[Any, Any, Any]:
    """The tiny SDXL built as ComfyUI's loaders build it (under inference mode), loading to ``device``.

    Weights live on the host between loads (offload device), or on the device itself with --gpu-only.
    """
    offload = device if gpu_only else CPU
    with torch.inference_mode():
        model = tiny_sdxl.make_model(
            0, v_prediction, load_device=device, offload_device=offload, patcher_class=patcher_class
        )
        clip = tiny_sdxl.make_clip(1, load_device=device, offload_device=offload)
        vae = tiny_sdxl.make_vae(2, load_device=device)
    return model, clip, vae


@functools.cache
def data(n: int = 2, shuffle: bool = False):
    """(dataset, latents, text) from the host tier's fixtures (encoded on the CPU, as the caches hold them)."""
    from sdxl_lora_trainer.trainer.data.captions import CaptionOptions

    options = CaptionOptions(shuffle_caption=True) if shuffle else CaptionOptions()
    ds = tf.make_dataset(
        n, caption_options=options, captions=["red, cube, shiny", "blue, ball, matte"][:n] if shuffle else None
    )
    return (ds, *tf.sources(tf.inference_models(), ds))


def lora_bytes(result: Any) -> dict[str, torch.Tensor]:
    """The trained LoRA as saved (kohya keys, CPU copies)."""
    return result.network.state_dict_kohya()


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def cpu_models(v_prediction: bool = False) -> tuple[Any, Any, Any]:
    """The same tiny SDXL on the CPU (the reference run)."""
    return models_on(CPU, v_prediction=v_prediction)


def loaded_on_device(model: Any) -> bool | None:
    """True when every weight of the U-Net sits on the stand-in now."""
    return all(p.device == DEVICE for p in model.model.diffusion_model.parameters())


def math_attention() -> contextlib.AbstractContextManager:
    """PyTorch's math SDPA kernel on every device (see ``standin``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)
