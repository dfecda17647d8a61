"""How much device memory a training run needs, by what holds it, before the run allocates anything.

A run's peak is the frozen weights that stay on the device plus what the step itself needs: the adapter's
parameters and gradients, the optimizer's states, and the step's activations (forward, checkpoint recomputes,
backward). The step part is what ComfyUI is asked to keep free when it loads the MODEL (``memory_required``), so it
streams the weights that do not fit instead of running out of memory.

The step's activations are not guessed from a formula: the real step (the same U-Net call, LoRA hooks, gradient
checkpointing and attention kernel) runs once on FakeTensorMode tensors, which carry shapes and dtypes but no data,
while ``PeakTensorMemory`` counts what it would allocate. The optimizer's states are read off the optimizer itself,
built once per distinct parameter shape on tiny CPU copies. Only the CUDA context and the allocator's slack are a
stated margin.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..data.dataset import TrainingDataset
from .optimizers import OptimizerSettings, OptimizerUnavailableError, build_optimizer
from .tensor_memory import PeakTensorMemory

GIB = 2**30
#: the GPU sizes the plan's table answers for
GPU_SIZES_GIB: tuple[int, ...] = (8, 12, 16, 24)
#: the CUDA context and kernels' workspace: not tensors, but taken from the same device memory
CUDA_CONTEXT_BYTES = 768 * 2**20
#: the caching allocator's fragmentation on top of what tensors hold, as a share of the step's tensors
ALLOCATOR_SLACK = 0.10
#: optimizer state per parameter element where the optimizer cannot be built here (bitsandbytes needs CUDA): two
#: 8-bit states for the Adam kind, one for Lion; tensors under 4096 elements keep 32-bit states (bitsandbytes'
#: min_8bit_size), which the plan counts as 8 / 4 bytes
_EIGHT_BIT_STATE_BYTES = {"AdamW8bit": (2, 8), "PagedAdamW8bit": (2, 8), "Lion8bit": (1, 4)}
_MIN_8BIT_SIZE = 4096

UNetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepShape:
    """The largest batch the run will see: what its activations are sized by."""

    width: int  # pixels
    height: int
    batch_size: int
    context_tokens: int = 77
    context_dim: int = 2048
    adm_dim: int = 2816  # SDXL's y: pooled CLIP-G (1280) + six size/crop embeddings (6 x 256)

    def describe(self) -> str:
        return f"{self.width}x{self.height} batch {self.batch_size}"


@dataclass(frozen=True)
class MemoryPlan:
    """Peak device memory of a run, in bytes, by what holds it."""

    setting: str  # e.g. "1024x1024 batch 1, rank 16, bf16, gradient checkpointing"
    frozen_weights: int  # U-Net (and trained text encoders) in the dtype ComfyUI loaded them in
    adapter: int  # LoRA parameters (their gradients are made in the step: ``activations``)
    optimizer_state: int
    activations: int  # the step's peak: activations, recomputes, gradients (LoRA's included)
    margin: int  # CUDA context + allocator slack (stated, not measured)

    @property
    def besides_weights(self) -> int:
        """What the step needs next to the frozen weights: ComfyUI's ``memory_required``."""
        return self.adapter + self.optimizer_state + self.activations

    @property
    def total(self) -> int:
        return self.frozen_weights + self.besides_weights + self.margin

    def fit(self, device_bytes: int) -> str:
        """Whether the run fits a device of this size, and how."""
        if self.total <= device_bytes:
            return "fits with every weight resident"
        room = device_bytes - self.besides_weights - self.margin
        if room > 0.25 * self.frozen_weights:  # ComfyUI keeps part of the weights resident and streams the rest
            return f"fits by streaming {_gib(self.total - device_bytes)} of weights per step (slower)"
        return "does not fit"

    def lines(self) -> list[str]:
        """The plan as the report shows it."""
        out = [
            f"memory plan ({self.setting}): {_gib(self.total)} peak = frozen weights {_gib(self.frozen_weights)}"
            f" + LoRA {_gib(self.adapter)} + optimizer states {_gib(self.optimizer_state)}"
            f" + activations and gradients {_gib(self.activations)} + margin {_gib(self.margin)}"
            " (CUDA context, allocator)",
        ]
        out += [f"  {size} GB GPU: {self.fit(size * GIB)}" for size in GPU_SIZES_GIB]
        return out


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MB"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by these tensors (each storage once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers, in the dtypes they are stored in."""
    return tensor_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


def optimizer_state_bytes(params: Sequence[torch.Tensor], settings: OptimizerSettings, learning_rate: float) -> int:
    """Bytes of the optimizer's states for these parameters, read off the real optimizer after one step.

    Built once per distinct (shape, dtype) on zero-filled CPU copies, so any optimizer (factored, schedule-free,
    Prodigy's extra copies) is counted as it really allocates. bitsandbytes' 8-bit optimizers need CUDA: where they
    cannot be built, their documented state sizes are used.
    """
    counts = Counter((tuple(p.shape), p.dtype) for p in params)
    quiet = logging.getLogger(build_optimizer.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the proxy build must not repeat the run's optimizer warnings
    try:
        total = 0
        for (shape, dtype), n in counts.items():
            proxy = torch.zeros(shape, dtype=dtype, requires_grad=True)
            try:
                optimizer = build_optimizer([proxy], settings, learning_rate or 1e-4)
            except OptimizerUnavailableError:
                per_element = _EIGHT_BIT_STATE_BYTES.get(settings.canonical_type)
                if per_element is None:
                    raise
                total += n * proxy.numel() * per_element[proxy.numel() < _MIN_8BIT_SIZE]
                continue
            proxy.grad = torch.full_like(proxy, 1e-3)
            optimizer.step()
            states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            total += n * tensor_bytes(s for s in states if s.numel() > 1)
        return total
    finally:
        quiet.setLevel(level)


def activation_bytes(
    unet_call: UNetCall, params: Sequence[torch.Tensor], shape: StepShape, dtype: torch.dtype, device: torch.device
) -> int:
    """Peak bytes a training step's forward + backward allocates, from one pass on FakeTensorMode tensors.

    ``unet_call(x, timesteps, context, y)`` is the step's U-Net call with everything the run has in place (LoRA
    hooks, checkpointing, attention kernel). The gradients are taken with ``torch.autograd.grad`` so nothing is
    written into the real parameters, and no random number generator advances (the run's streams stay as they
    were). Latents are [batch, 4, H/8, W/8]; the loss is the mean squared error in fp32 as the loop computes it.
    """
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    b = shape.batch_size
    with fake:
        x = torch.empty((b, 4, shape.height // 8, shape.width // 8), device=device, dtype=dtype)
        timesteps = torch.empty((b,), device=device, dtype=torch.float32)
        context = torch.empty((b, shape.context_tokens, shape.context_dim), device=device, dtype=dtype)
        y = torch.empty((b, shape.adm_dim), device=device, dtype=dtype)
        target = torch.empty((b, 4, shape.height // 8, shape.width // 8), device=device, dtype=torch.float32)
    trainable = [p for p in params if p.requires_grad]
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), fake, PeakTensorMemory(fake=True) as counted:
        loss = (unet_call(x, timesteps, context, y).float() - target).square().mean()
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        del loss, grads
    if counted.peak == 0:  # e.g. a device whose tensors bypass FakeTensorMode: no plan rather than a wrong one
        raise RuntimeError(f"the shape-only pass of the step saw no tensors on {device}")
    return counted.peak


def plan(
    *,
    setting: str,
    frozen: Iterable[torch.nn.Module],
    params: Sequence[torch.Tensor],
    optimizer: OptimizerSettings,
    learning_rate: float,
    activations: int,
    cuda: bool = True,
) -> MemoryPlan:
    """Put the parts together. ``activations`` comes from ``activation_bytes``; ``cuda`` adds the CUDA context
    to the margin (a CPU run has none)."""
    adapter = tensor_bytes(params)
    states = optimizer_state_bytes(params, optimizer, learning_rate)
    margin = int(ALLOCATOR_SLACK * (adapter + states + activations)) + (CUDA_CONTEXT_BYTES if cuda else 0)
    return MemoryPlan(
        setting=setting,
        frozen_weights=module_bytes(frozen),
        adapter=adapter,
        optimizer_state=states,
        activations=activations,
        margin=margin,
    )


def largest_step_shape(dataset: TrainingDataset) -> StepShape:
    """The batch with the most pixels the run will see: per part and bucket, the bucket's area times the batch a
    bucket of that many images (repeats included) can fill."""
    best: tuple[int, StepShape] | None = None
    for part in dataset.parts:
        counts = Counter(tuple(img.selection.bucket) for img in part.images for _ in range(img.item.num_repeats))
        for (width, height), n in counts.items():
            batch = min(part.batch_size, n)
            if best is None or width * height * batch > best[0]:
                best = (width * height * batch, StepShape(width, height, batch))
    if best is None:
        raise ValueError("the dataset has no images")
    return best[1]
