"""Forward overrides for the training block: gradient checkpointing, and kernels that have a backward."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

#: ComfyUI's classes for the modules kohya's SDXL U-Net checkpoints one by one (library/sdxl_original_unet.py:
#: ResnetBlock2D, BasicTransformerBlock, Downsample2D, Upsample2D)
CHECKPOINTED_CLASSES = ("ResBlock", "BasicTransformerBlock", "Downsample", "Upsample")


def checkpoint_targets(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules recomputed in backward, at kohya's granularity: each transformer block on its own, not a whole
    SpatialTransformer (at 1024² one of SDXL's 10-block transformers would keep all ten blocks' activations for
    its backward at once)."""
    return [m for m in unet.modules() if type(m).__name__ in CHECKPOINTED_CLASSES]


@contextlib.contextmanager
def _attributes_overridden(modules: list[torch.nn.Module], name: str, make: Any) -> Iterator[int]:
    """Give each shared module an instance attribute ``name`` (a method override) for this block; removed on exit."""
    patched: list[torch.nn.Module] = []
    try:
        for m in modules:
            setattr(m, name, make(m))
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            if name in m.__dict__:
                delattr(m, name)


def _checkpointed_forward(module: torch.nn.Module) -> Any:
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)

    return forward


def gradient_checkpointing(unet: torch.nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[int]:
    """Recompute each ResBlock / transformer block / down- and upsampler in backward instead of keeping its
    activations.

    The override is an instance attribute on the shared module, removed on exit. The global RNG
    state is preserved across the recompute, so dropout inside a block sees the same masks twice.
    """
    return _attributes_overridden(checkpoint_targets(unet) if enabled else [], "forward", _checkpointed_forward)


@contextlib.contextmanager
def differentiable_attention() -> Iterator[str]:
    """Train with an attention kernel that has a backward; restore ComfyUI's choice on exit.

    ComfyUI picks its kernel once at start (a module global read at call time): sub-quadratic or split attention
    modify tensors in place, ``--use-flash-attention`` is a custom op without a backward, and sage attention's
    quantized kernels do not give q/k/v a correct gradient. Anything but PyTorch SDPA and xformers is swapped for
    SDPA for this block; sampling nodes outside it keep their kernel. (Overrides another node puts into
    ``transformer_options`` are dropped by ``unet_forward``.)
    """
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm

    allowed = {attention.attention_pytorch}
    if mm.xformers_enabled() and hasattr(attention, "attention_xformers"):
        allowed.add(attention.attention_xformers)
    before = (attention.optimized_attention, attention.optimized_attention_masked)
    if before[0] not in allowed:
        attention.optimized_attention = attention.attention_pytorch
    if before[1] not in allowed:
        attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield attention.optimized_attention.__name__
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = before


def _differentiable_linear_forward(module: torch.nn.Module) -> Any:
    import comfy.ops

    return functools.partial(comfy.ops.disable_weight_init.Linear.forward_comfy_cast_weights, module)


def _has_kernel_without_backward(module: torch.nn.Module) -> bool:
    """comfy.ops' cublas Linear (``--fast cublas_ops``) multiplies with a kernel that has no backward."""
    return any(c.__name__ == "CublasLinear" for c in type(module).__mro__)


@contextlib.contextmanager
def differentiable_layers(*roots: torch.nn.Module) -> Iterator[int]:
    """Route layers whose ComfyUI kernel has no backward through ComfyUI's plain cast-and-multiply path."""
    layers = [m for root in roots for m in root.modules() if _has_kernel_without_backward(m)]
    with _attributes_overridden(layers, "forward_comfy_cast_weights", _differentiable_linear_forward) as n:
        yield n


def _clip_layer_forward(layer: torch.nn.Module):
    """ComfyUI's CLIPLayer.forward with out-of-place residual adds (``x += f(x)`` breaks autograd)."""

    def forward(x: torch.Tensor, mask: Any = None, optimized_attention: Any = None) -> torch.Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


def differentiable_text_encoders(*encoders: torch.nn.Module) -> contextlib.AbstractContextManager[int]:
    """Make ComfyUI's CLIP layers back-propagatable for text-encoder training; undone on exit."""
    layers = [m for enc in encoders for m in enc.modules() if type(m).__name__ == "CLIPLayer"]
    return _attributes_overridden(layers, "forward", _clip_layer_forward)
