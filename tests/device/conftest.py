"""Device tier: the training engine with ComfyUI's MODEL/CLIP/VAE on a stand-in accelerator (see device_helpers)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from device_helpers import ComfyGpu, math_attention
from standin_device import StandInDevice


@pytest.fixture
def standin() -> Iterator[StandInDevice]:
    """The stand-in device, active for the test.

    Attention runs PyTorch's math SDPA kernel on both devices: torch picks its fused kernel by device type before
    any dispatch, and for the stand-in (a ``meta`` tensor) that is always the math kernel, while the CPU would use
    its flash kernel; with the same kernel a CPU run and a stand-in run can be compared byte for byte.
    """
    with StandInDevice(seed=1234) as device, math_attention():
        yield device


@pytest.fixture
def comfy_gpu(monkeypatch: pytest.MonkeyPatch, standin: StandInDevice):
    """Install a ComfyGpu for the test: ``comfy_gpu(memory=..., vram_state=..., streams=..., gpu_only=...)``."""
    stack = contextlib.ExitStack()

    def install(**kwargs: Any) -> ComfyGpu:
        return stack.enter_context(ComfyGpu(**kwargs).installed(monkeypatch))

    with stack:
        yield install
