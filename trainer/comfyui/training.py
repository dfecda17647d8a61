"""How a training run uses the MODEL/CLIP ComfyUI loaded, in every memory mode, and leaves them as they were."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from .models import WrongModelError

# -- the MODEL / CLIP that training runs through (every ComfyUI memory mode) ----------------------


def _private_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight wrapper: the cast weight as a tensor that autograd may keep for backward.

    ComfyUI calls it inside ``comfy.ops.cast_bias_weight`` on every forward of every layer. Having a wrapper at
    all makes the cast copy the weight; the copy is returned as it is. A copy is made here when the cast handed
    back something autograd must not keep: an inference tensor (the loaded weight itself), or a view into a cast
    buffer that ComfyUI reuses for the next layers (streamed weights; autograd would read another layer's
    values in backward).
    """
    if weight.is_inference() or weight._base is not None or isinstance(weight, torch.nn.Parameter):
        return weight.clone()
    return weight


def _register_private_weights(patcher: Any) -> int:
    """Register ``_private_weight`` on the patcher for every weight and bias of its comfy.ops layers.

    Weight wrappers registered on the patcher are ComfyUI's own mechanism: every load (full, partial, after an
    eviction, legacy or dynamic) rebuilds each layer's ``weight_function`` list from them, so they cannot be
    lost the way a function appended to the list by hand is lost on the next load.
    """
    n = 0
    for name, m in patcher.model.named_modules():
        if not isinstance(getattr(m, "weight_function", None), list):
            continue
        for param in ("weight", "bias"):
            if getattr(m, param, None) is not None:
                patcher.add_weight_wrapper(f"{name}.{param}", _private_weight)
                n += 1
    return n


def _remove_private_weights(module: torch.nn.Module) -> None:
    """Take the wrappers out of the layers' lists again (the next load of the incoming MODEL rebuilds them)."""
    for m in module.modules():
        for attr in ("weight_function", "bias_function"):
            fns = getattr(m, attr, None)
            if isinstance(fns, list) and _private_weight in fns:
                setattr(m, attr, [f for f in fns if f is not _private_weight])


def _non_dynamic(patcher: Any, what: str) -> Any:
    """The patcher itself, or under DynamicVRAM ComfyUI's non-dynamic delegate of it.

    DynamicVRAM (ComfyUI's default on NVIDIA) streams weights through buffers it reuses and ignores full-load
    requests; training needs weights that stay put through backward. ``get_non_dynamic_delegate`` is ComfyUI's
    way to get a plain patcher for the same checkpoint: it loads the checkpoint again (a second copy in system
    RAM, kept by ComfyUI for later runs); on the GPU only the delegate is loaded while training.
    """
    if not patcher.is_dynamic():
        return patcher
    try:
        return patcher.get_non_dynamic_delegate()
    except RuntimeError as e:
        raise WrongModelError(
            f"The {what} comes from a loader ComfyUI cannot reload outside DynamicVRAM ({e}). Load the SDXL "
            "checkpoint with 'Load Checkpoint', or start ComfyUI with --disable-dynamic-vram."
        ) from None


@dataclasses.dataclass
class TrainingModels:
    """What a training run uses: clones of the incoming MODEL (and CLIP when the text encoders train) that carry
    the weight wrappers, so the incoming objects stay exactly as they were for every other node."""

    model: Any  # ModelPatcher the U-Net trains through
    clip: Any  # CLIP to encode live captions with (the training clone when text encoders train)
    device: torch.device


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """No frozen weight takes part in autograd (a custom loader may hand over weights that require grad); the
    flags are given back on exit."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, flag in flags:
            if flag:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                with torch.inference_mode(p.is_inference()):  # torch allows it on inference tensors only there
                    p.requires_grad_(flag)


@contextlib.contextmanager
def training_models(model: Any, clip: Any, train_text_encoders: bool) -> Iterator[TrainingModels]:
    """Clones of MODEL/CLIP with autograd-safe, frozen weights in every memory mode; undone on exit."""
    train_model = _non_dynamic(model, "MODEL").clone()
    _register_private_weights(train_model)
    train_clip = clip
    if train_text_encoders:
        base = clip.clone(disable_dynamic=True) if clip.patcher.is_dynamic() else clip
        if clip.patcher.is_dynamic() and base.patcher.is_dynamic():
            raise WrongModelError(
                "The CLIP could not be reloaded outside DynamicVRAM for text-encoder training; "
                "start ComfyUI with --disable-dynamic-vram."
            )
        train_clip = base.clone()
        _register_private_weights(train_clip.patcher)
    frozen = [train_model.model] + ([train_clip.patcher.model] if train_text_encoders else [])
    try:
        with _frozen(*frozen):
            yield TrainingModels(model=train_model, clip=train_clip, device=train_model.load_device)
    finally:
        _remove_private_weights(train_model.model)
        if train_text_encoders:
            _remove_private_weights(train_clip.patcher.model)


@contextlib.contextmanager
def training_flag() -> Iterator[None]:
    """ComfyUI's global ``in_training`` flag (disables fused inference-only kernels)."""
    import comfy.model_management as mm

    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


@contextlib.contextmanager
def full_precision_accumulation() -> Iterator[bool]:
    """Switch off fp16 accumulation in matmuls (ComfyUI's ``--fast fp16_accumulation``) while training.

    Accumulating in fp16 is a sampling speed-up that makes training unstable (ComfyUI's own trainer warns about
    it); this block restores the setting on exit. Yields whether it was on.
    """
    matmul = torch.backends.cuda.matmul
    was_on = bool(getattr(matmul, "allow_fp16_accumulation", False))
    if was_on:
        matmul.allow_fp16_accumulation = False
    try:
        yield was_on
    finally:
        if was_on:
            matmul.allow_fp16_accumulation = True


def resolve_train_dtype(train_dtype: str, device: torch.device) -> str:
    """ "auto" -> what the device computes well: bf16 where ComfyUI's own check says so (NVIDIA Ampere and newer,
    ...), fp16 with a gradient scaler on other GPUs, fp32 on the CPU."""
    if train_dtype != "auto":
        return train_dtype
    import comfy.model_management as mm

    if device.type == "cpu":
        return "fp32"
    if mm.should_use_bf16(device):
        return "bf16"
    if mm.should_use_fp16(device):
        return "fp16"
    return "fp32"


def load_for_training(model: Any, memory_required: int = 0, mode: str = "auto", weights: int = 0) -> torch.device:
    """Have ComfyUI load the MODEL on its device as it loads for sampling, and return the device.

    ComfyUI decides what fits: everything on a large GPU (and with --highvram / --gpu-only), and on a small one
    (or with --lowvram / --novram) the rest stays on the offload device and is streamed per layer, which the
    weight wrappers of ``training_models`` make safe for backward. ``memory_required``: what the step needs
    besides the weights (the memory plan), which ComfyUI keeps free. ``mode`` "full" loads every weight whatever
    the plan says; "stream" also asks for room for the ``weights`` themselves, so ComfyUI keeps as few resident as
    it allows. On a CPU device ComfyUI always loads fully. Called before every U-Net forward: a no-op while the
    model is loaded, a reload after a preview or a live caption encode made ComfyUI evict part of it.
    """
    import comfy.model_management as mm

    if mode == "full":
        mm.load_models_gpu([model], memory_required=memory_required, force_full_load=True)
    else:
        extra = weights if mode == "stream" else 0
        mm.load_models_gpu([model], memory_required=memory_required + extra)
    return model.load_device


#: ComfyUI's module-level caches that a forward can fill: the reusable cast buffers of weights streamed through
#: offload streams, and the largest weight cast so far (which sizes them)
_CAST_BUFFER_CACHES = ("STREAM_CAST_BUFFERS", "STREAM_AIMDO_CAST_BUFFERS")
_CAST_SIZE_RECORDS = ("LARGEST_CASTED_WEIGHT", "LARGEST_AIMDO_CASTED_WEIGHT")


@contextlib.contextmanager
def shape_only_pass() -> Iterator[None]:
    """Around a forward on FakeTensorMode tensors (the memory plan's pass): ComfyUI keeps the cast buffers of streamed
    weights in module globals and reuses them in the next forward, so a buffer made during the pass would be a fake
    tensor inside the real steps. Puts ComfyUI's caches back exactly as they were."""
    import comfy.model_management as mm

    caches = {name: dict(getattr(mm, name)) for name in _CAST_BUFFER_CACHES if hasattr(mm, name)}
    records = {name: getattr(mm, name) for name in _CAST_SIZE_RECORDS if hasattr(mm, name)}
    try:
        yield
    finally:
        for name, saved in caches.items():
            cache = getattr(mm, name)
            cache.clear()
            cache.update(saved)
        for name, saved in records.items():
            setattr(mm, name, saved)


def leave_room(model: Any, memory_required: int) -> None:
    """Have ComfyUI offload as much of the loaded MODEL as it takes to leave ``memory_required`` free on its device;
    the offloaded layers are then streamed per layer. ComfyUI's own ``free_memory``, with the free space
    ``load_models_gpu`` would have asked for had it known the plan at the first load (the plan needs the loaded
    model). Not on the CPU, and not under --highvram / --gpu-only, where ComfyUI keeps every weight on the GPU.
    """
    import comfy.model_management as mm

    device = model.load_device
    if device.type == "cpu" or mm.vram_state == mm.VRAMState.HIGH_VRAM:
        return
    mm.free_memory(max(mm.minimum_inference_memory(), memory_required + mm.extra_reserved_memory()), device)


def free_other_models() -> None:
    """Offload everything ComfyUI holds (VAE, text encoders) so training memory is U-Net + LoRA + optimizer."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
