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
    """A weight wrapper for streamed layers: the cast weight as a tensor autograd may keep for backward.

    ComfyUI calls it inside ``comfy.ops.cast_bias_weight`` after it copied the weight over from the offload device.
    With async offload streams (NVIDIA) that copy is a view into a cast buffer ComfyUI reuses for the next layers,
    so autograd would read another layer's values in backward: such a view is cloned. So is a weight that still is
    an inference tensor (its layer could not be given an alias, see ``_autograd_usable``).
    """
    if weight.is_inference() or weight._base is not None or isinstance(weight, torch.nn.Parameter):
        return weight.clone()
    return weight


#: set on the aliases ``_autograd_usable`` puts in place of inference-tensor weights, to find them again on exit
_ALIAS_MARK = "_sdxl_lora_autograd_alias"


def _alias(tensor: torch.Tensor, inference: bool) -> torch.nn.Parameter:
    """A new frozen parameter over ``tensor``'s memory (no copy), an inference tensor or not."""
    with torch.inference_mode(inference):
        shared = tensor.new_empty(0).set_(tensor)
        return torch.nn.Parameter(shared, requires_grad=False)


def _autograd_usable(module: torch.nn.Module) -> None:
    """Give ``module`` weights autograd may save for backward, sharing the memory of the loaded ones.

    Loader nodes run under ``torch.inference_mode()``, so the weights are inference tensors, and autograd refuses
    to save those. Copying them on every forward (what a weight wrapper makes ComfyUI's cast do) moved the whole
    U-Net through memory once per forward and once per checkpoint recompute; an alias made once per run costs
    nothing. A weight of a tensor type that cannot be aliased stays an inference tensor (``_place_private_weight``
    then gives its layer the copying wrapper).
    """
    for name, weight in list(module._parameters.items()):
        if weight is None or not weight.is_inference():
            continue
        try:
            alias = _alias(weight, inference=False)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if alias.is_inference() or alias.shape != weight.shape:
            continue
        for key, value in weight.__dict__.items():
            alias.__dict__.setdefault(key, value)
        setattr(alias, _ALIAS_MARK, True)
        module._parameters[name] = alias


def _is_comfy_layer(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "weight_function", None), list)


def make_weights_autograd_usable(root: torch.nn.Module) -> None:
    """``_autograd_usable`` for every comfy.ops layer under ``root``: at the start of a run and after each load
    (a load may put back weights ComfyUI backed up under inference mode)."""
    for m in root.modules():
        if _is_comfy_layer(m):
            _autograd_usable(m)


def _restore_inference_weights(root: torch.nn.Module) -> None:
    """On exit: the aliases become inference tensors again over the same memory, so every other node sees the
    weights as the loader made them (wherever ComfyUI has moved them since)."""
    for m in root.modules():
        for name, weight in list(m._parameters.items()):
            if weight is not None and getattr(weight, _ALIAS_MARK, False):
                back = _alias(weight, inference=True)
                for key, value in weight.__dict__.items():
                    if key != _ALIAS_MARK:
                        back.__dict__.setdefault(key, value)
                m._parameters[name] = back


def _place_private_weight(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of every comfy.ops layer while training: the weight wrapper only where it is needed.

    Any weight wrapper makes ComfyUI's cast copy the weight, so a resident weight (on the compute device, usable by
    autograd) gets none and is used as it is. A streamed weight (on the offload device: ComfyUI copies it over in
    the cast anyway) gets ``_private_weight``. Decided at each forward, since ComfyUI may move layers between steps
    (partial loads, evictions for previews or caption encodes, reloads), and its loads rebuild the lists.
    """
    x = args[0] if args else None
    params = [p for p in (module._parameters.get("weight"), module._parameters.get("bias")) if p is not None]
    needs_copy = (
        not isinstance(x, torch.Tensor)
        or any(p.device != x.device for p in params)
        or any(p.is_inference() for p in params)
    )
    if not needs_copy:
        _drop_private_weight(module)
        return
    for attr in ("weight_function", "bias_function"):
        fns = getattr(module, attr)
        if module._parameters.get(attr.split("_")[0]) is not None and _private_weight not in fns:
            setattr(module, attr, [*fns, _private_weight])


def _drop_private_weight(module: torch.nn.Module) -> None:
    """Take ``_private_weight`` out of the layer's weight and bias function lists (ComfyUI's own entries stay)."""
    for attr in ("weight_function", "bias_function"):
        fns = getattr(module, attr, None)
        if isinstance(fns, list) and _private_weight in fns:
            setattr(module, attr, [f for f in fns if f is not _private_weight])


def _cast_path(patcher: Any) -> None:
    """Every comfy.ops layer of the training clone takes ComfyUI's cast path (``cast_bias_weight``), which casts a
    weight stored in another dtype than the step computes in (fp16 weights, bf16 training) and applies the patches
    ComfyUI keeps for forward time. ComfyUI's own switch, read by each load of this patcher and undone by the next
    load of another (``force_cast_weights``, as ``set_model_compute_dtype`` sets it). A weight already in the compute
    dtype on the compute device comes back from the cast as it is: no copy."""
    patcher.force_cast_weights = True


@contextlib.contextmanager
def _weights_for_autograd(root: torch.nn.Module) -> Iterator[None]:
    """The frozen weights under ``root`` usable by autograd for the run, without a per-forward copy; undone on exit."""
    layers = [m for m in root.modules() if _is_comfy_layer(m)]
    handles = [m.register_forward_pre_hook(_place_private_weight) for m in layers]
    make_weights_autograd_usable(root)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for m in layers:
            _drop_private_weight(m)
        _restore_inference_weights(root)


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
    """What a training run uses: clones of the incoming MODEL (and CLIP when the text encoders train), so ComfyUI
    loads them as objects of their own and the incoming ones stay exactly as they were for every other node."""

    model: Any  # ModelPatcher the U-Net trains through
    clip: Any  # CLIP to encode live captions with (the training clone when text encoders train)
    device: torch.device


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """No frozen weight takes part in autograd (a custom loader may hand over weights that require grad); the
    flags are given back on exit, by module and name (the run may swap the parameter objects, see
    ``_autograd_usable``)."""
    flags = [
        (m, name, p.requires_grad)
        for root in modules
        for m in root.modules()
        for name, p in m._parameters.items()
        if p is not None
    ]
    try:
        for m, name, flag in flags:
            if flag:
                m._parameters[name].requires_grad_(False)
        yield
    finally:
        for m, name, flag in flags:
            p = m._parameters.get(name)
            if p is not None and p.requires_grad != flag:
                with torch.inference_mode(p.is_inference()):  # torch allows it on inference tensors only there
                    p.requires_grad_(flag)


@contextlib.contextmanager
def training_models(model: Any, clip: Any, train_text_encoders: bool) -> Iterator[TrainingModels]:
    """Clones of MODEL/CLIP with frozen weights autograd may save, in every memory mode; undone on exit."""
    train_model = _non_dynamic(model, "MODEL").clone()
    _cast_path(train_model)
    train_clip = clip
    if train_text_encoders:
        base = clip.clone(disable_dynamic=True) if clip.patcher.is_dynamic() else clip
        if clip.patcher.is_dynamic() and base.patcher.is_dynamic():
            raise WrongModelError(
                "The CLIP could not be reloaded outside DynamicVRAM for text-encoder training; "
                "start ComfyUI with --disable-dynamic-vram."
            )
        train_clip = base.clone()
        _cast_path(train_clip.patcher)
    frozen = [train_model.model] + ([train_clip.patcher.model] if train_text_encoders else [])
    with contextlib.ExitStack() as stack:
        stack.enter_context(_frozen(*frozen))
        for root in frozen:
            stack.enter_context(_weights_for_autograd(root))
        yield TrainingModels(model=train_model, clip=train_clip, device=train_model.load_device)


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
    weight wrappers of ``training_models`` make safe for backward; weights ComfyUI (re)loaded are made usable by
    autograd (``make_weights_autograd_usable``). ``memory_required``: what the step needs
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
    make_weights_autograd_usable(model.model)
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
