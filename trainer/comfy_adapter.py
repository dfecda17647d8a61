"""The one module of the engine that talks to ComfyUI's objects (MODEL, CLIP, VAE, progress, paths).

Everything else in ``trainer/`` is plain Python/torch and is tested without ComfyUI. ComfyUI is
imported lazily inside the functions, so importing this module never requires ComfyUI either.

How training runs on the MODEL that ComfyUI already loaded, without a second copy of the U-Net:

* Loader nodes run under ``torch.inference_mode()``, so the frozen weights are inference tensors,
  which autograd may not save for backward, and ComfyUI may stream weights that do not fit on the GPU
  through cast buffers it reuses layer after layer. ``training_models`` clones the MODEL (and the CLIP
  when the text encoders train) and registers a weight wrapper for every comfy.ops layer on the clone's
  patcher; ComfyUI re-applies those on every load, full or partial, and its ``cast_bias_weight`` then
  hands each layer a weight copy in the compute dtype that autograd may keep (one layer at a time, freed
  with gradient checkpointing). The frozen U-Net stays in the dtype ComfyUI loaded it in. Under
  DynamicVRAM the clone is made from ComfyUI's non-dynamic delegate (see ``_non_dynamic``).
* ComfyUI decides what is loaded where (``load_for_training``), in every memory mode.
* LoRA branches are forward hooks on the shared modules (trainer/lora_network.py), registered only
  inside the training context; attention kernels and layers without a backward are swapped for the
  block (``differentiable_attention``, ``differentiable_layers``). On exit every hook, weight wrapper,
  forward override and ``requires_grad`` flag is restored, so every other node sees the MODEL exactly
  as it came in.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from typing import Any, Iterator

import torch


class WrongModelError(ValueError):
    """The MODEL/CLIP/VAE given is not something this SDXL trainer can train."""


# -- model identity -----------------------------------------------------------------------------

def require_sdxl(model: Any) -> None:
    """Fail early, with the fix, when the MODEL is not an SDXL (base architecture) model."""
    import comfy.model_base

    inner = getattr(model, "model", None)
    if inner is None:
        raise WrongModelError(f"Expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}.")
    if not isinstance(inner, comfy.model_base.SDXL) or isinstance(inner, comfy.model_base.SDXLRefiner):
        raise WrongModelError(
            f"The MODEL input is a {type(inner).__name__} model; this trainer trains SDXL base-architecture "
            "models (SDXL 1.0, Pony, Illustrious, NoobAI, ...). Load an SDXL checkpoint with "
            "'Load Checkpoint' and connect its MODEL output.")


def prediction_type(model: Any) -> str:
    """'epsilon' or 'v_prediction', read from the MODEL (ComfyUI detects it from the checkpoint)."""
    import comfy.model_base

    mtype = model.model.model_type
    if mtype == comfy.model_base.ModelType.EPS:
        return "epsilon"
    if mtype == comfy.model_base.ModelType.V_PREDICTION:
        return "v_prediction"
    raise WrongModelError(
        f"The MODEL uses the {mtype.name} objective; only epsilon and v-prediction SDXL models can be trained "
        "with kohya's DDPM objective.")


def zero_terminal_snr(model: Any) -> bool:
    """True when ComfyUI samples this model with zero-terminal-SNR sigmas (ztsnr checkpoints)."""
    return bool(getattr(model.model.model_sampling, "zsnr", False))


def latent_scale_factor(model: Any) -> float:
    """SDXL's VAE latent scale (0.13025): ComfyUI LATENTs are unscaled, the U-Net sees scaled ones."""
    return float(model.model.latent_format.scale_factor)


def diffusion_model(model: Any) -> torch.nn.Module:
    return model.model.diffusion_model


def text_encoders(clip: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(CLIP-L, CLIP-G) transformers of an SDXL CLIP: kohya's te1 and te2."""
    inner = getattr(clip, "cond_stage_model", None)
    if inner is None or not hasattr(inner, "clip_l") or not hasattr(inner, "clip_g"):
        raise WrongModelError("The CLIP input is not SDXL's dual text encoder (CLIP-L + CLIP-G); "
                              "connect the CLIP output of the SDXL checkpoint loader.")
    return inner.clip_l.transformer, inner.clip_g.transformer


# -- the diffusion objective through ComfyUI's own model_sampling ------------------------------

def model_input_for_timesteps(model: Any, latents: torch.Tensor, noise: torch.Tensor,
                              timesteps: torch.Tensor) -> torch.Tensor:
    """The U-Net input for integer DDPM timesteps, built with the MODEL's own ``model_sampling``.

    ComfyUI's sampler forms ``x = x0 + sigma*noise`` and feeds ``x / sqrt(sigma^2 + 1)``, which is
    ``sqrt(abar)*x0 + sqrt(1-abar)*noise``: kohya's ``DDPMScheduler.add_noise``. Using the MODEL's
    sigmas means a model ComfyUI samples with zero-terminal-SNR is also trained with it.
    """
    ms = model.model.model_sampling
    sigma = ms.sigma(timesteps.to(ms.sigmas.device).float()).to(latents.device, torch.float32)
    sigma = sigma.view(-1, *([1] * (latents.ndim - 1)))
    x = latents.float() + sigma * noise.float()
    return x / (sigma * sigma + 1.0).sqrt()


def unet_forward(model: Any, model_input: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The raw U-Net output (epsilon or v) for a batch, as kohya's SDXL U-Net call returns it.

    Calls ``diffusion_model`` directly rather than ``apply_model`` (which returns x0): the loss is
    on the raw prediction and converting back from x0 would divide by sigma. The MODEL's
    transformer_options (attention patches of other nodes) are passed along as apply_model does, except an
    ``optimized_attention_override``: another node's attention kernel need not have a backward
    (``differentiable_attention`` picks the kernel while training).
    """
    options = dict(model.model_options.get("transformer_options", {}))
    options.pop("optimized_attention_override", None)
    device = model.load_device
    return diffusion_model(model)(
        model_input.to(device, dtype), timesteps.to(device).float(), context=context.to(device, dtype),
        y=y.to(device, dtype), transformer_options=options).float()


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
            "checkpoint with 'Load Checkpoint', or start ComfyUI with --disable-dynamic-vram.") from None


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
            raise WrongModelError("The CLIP could not be reloaded outside DynamicVRAM for text-encoder training; "
                                  "start ComfyUI with --disable-dynamic-vram.")
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


def checkpoint_targets(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ResBlock and SpatialTransformer modules: kohya checkpoints at this level, not the whole U-Net."""
    return [m for m in unet.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]


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
    """Recompute each ResBlock / SpatialTransformer in backward instead of keeping its activations.

    The override is an instance attribute on the shared module, removed on exit. The global RNG
    state is preserved across the recompute, so dropout inside a block sees the same masks twice.
    """
    return _attributes_overridden(checkpoint_targets(unet) if enabled else [], "forward", _checkpointed_forward)


#: attention kernels of comfy.ldm.modules.attention that have a backward: kept while training
TRAINABLE_ATTENTION = ("attention_pytorch", "attention_xformers")


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
    """"auto" -> what the device computes well: bf16 where ComfyUI's own check says so (NVIDIA Ampere and newer,
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


def load_for_training(model: Any, memory_required: int = 0) -> torch.device:
    """Have ComfyUI load the MODEL on its device as it loads for sampling, and return the device.

    ComfyUI decides what fits: everything on a large GPU (and with --highvram / --gpu-only), and on a small one
    (or with --lowvram / --novram) the rest stays on the offload device and is streamed per layer, which the
    weight wrappers of ``training_models`` make safe for backward. ``memory_required``: what the step needs
    besides the weights. Called before every U-Net forward: a no-op while the model is loaded, a reload after a
    preview or a live caption encode made ComfyUI evict part of it.
    """
    import comfy.model_management as mm

    mm.load_models_gpu([model], memory_required=memory_required)
    return model.load_device


def free_other_models() -> None:
    """Offload everything ComfyUI holds (VAE, text encoders) so training memory is U-Net + LoRA + optimizer."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


# -- encoders -----------------------------------------------------------------------------------

def encode_pixels(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of IMAGE-layout pixels [B,H,W,C] in 0..1 (ComfyUI's LATENT convention)."""
    return vae.encode(pixels)


def vae_dtype(vae: Any) -> torch.dtype:
    return vae.vae_dtype


@contextlib.contextmanager
def vae_in_float32(vae: Any, enabled: bool) -> Iterator[Any]:
    """kohya's ``no_half_vae``: yields a VAE that encodes in float32 (or ``vae`` itself).

    The VAE ComfyUI manages is not touched: a twin shares its weights through a cloned patcher that casts every
    layer's weight to float32 as it runs (ComfyUI's ``force_cast_weights``, what ``set_model_compute_dtype``
    uses). The weights are the ones ComfyUI loaded: when it loaded the VAE in bf16/fp16 they were rounded then,
    so this is float32 arithmetic on those weights; for kohya's exact numbers start ComfyUI with ``--fp32-vae``.
    """
    if not enabled or vae.vae_dtype == torch.float32:
        yield vae
        return
    twin = copy.copy(vae)
    twin.patcher = vae.patcher.clone()
    twin.patcher.force_cast_weights = True
    twin.vae_dtype = torch.float32
    yield twin


def encode_text(clip: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*chunks, 2048], pooled CLIP-G [1, 1280]) exactly as CLIPTextEncode computes them."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


# -- what the latent / text-encoder caches fingerprint (trainer/cache_store.py hashes it) -------

def vae_module(vae: Any) -> torch.nn.Module:
    """The VAE's nn.Module: the identity its weight fingerprint is memoised on."""
    return vae.first_stage_model


def clip_module(clip: Any) -> torch.nn.Module:
    """The CLIP's nn.Module (shared by all clones of that CLIP): the identity its fingerprint is memoised on."""
    return clip.cond_stage_model


def _base_weights(patcher: Any) -> list[tuple[str, torch.Tensor]]:
    """Every weight of a ModelPatcher's model as loaded, BEFORE any patch (LoRA, merge) is applied.

    ComfyUI patches weights in place while a patched clone is loaded and keeps the originals in
    ``patcher.backup`` (shared by all clones); ``get_key_patches`` returns those originals, so the
    result does not depend on which clone happens to be loaded right now.
    """
    return [(k, v[0][0]) for k, v in sorted(patcher.get_key_patches().items())]


def vae_weights(vae: Any) -> list[tuple[str, torch.Tensor]]:
    return _base_weights(vae.patcher)


def clip_weights(clip: Any) -> list[tuple[str, torch.Tensor]]:
    return _base_weights(clip.patcher)


def patcher_patches(obj: Any) -> tuple[Any, dict[str, Any]]:
    """(token, patches) of a VAE's or CLIP's ModelPatcher.

    ``token`` (ComfyUI's ``patches_uuid``) changes whenever patches are added, so a content hash of
    the patches can be memoised on it. The patches are returned as plain data: weight patches
    (LoRA adapters, diffs, merges with their strengths), and the names of weight wrappers and
    object patches, which cannot be hashed by content.
    """
    p = obj.patcher
    wrappers = {k: [getattr(f, "__qualname__", type(f).__qualname__) for f in fns]
                for k, fns in p.weight_wrapper_patches.items()}
    objects = {k: type(v).__qualname__ for k, v in p.object_patches.items()}
    return p.patches_uuid, {"patches": p.patches, "weight_wrappers": wrappers, "object_patches": objects}


def clip_settings(clip: Any) -> dict[str, Any]:
    """CLIP settings outside its weights that change the encoding (CLIPSetLastLayer, tokenizer options).

    Hooks (CLIP hook nodes) cannot be fingerprinted by content; ``hooks`` is then True and the caller
    must not reuse an encoding.
    """
    hooks = getattr(clip.patcher, "forced_hooks", None) is not None or getattr(clip, "apply_hooks_to_conds", None) is not None
    return {"layer_idx": clip.layer_idx, "tokenizer_options": dict(clip.tokenizer_options), "hooks": bool(hooks)}


# -- host services: progress, cancel, events, folders -------------------------------------------

_cancel_seen = False


def interrupted() -> bool:
    """True once the user pressed Cancel (POST /interrupt) during this run.

    ComfyUI clears its flag when one of its own progress hooks raises; ``note_interrupt`` keeps the
    request visible so the loop can still stop at the step boundary and save.
    """
    import comfy.model_management as mm

    return _cancel_seen or bool(mm.processing_interrupted())


def note_interrupt() -> None:
    global _cancel_seen
    _cancel_seen = True


def reset_interrupt_note() -> None:
    global _cancel_seen
    _cancel_seen = False


def is_interrupt(exc: BaseException) -> bool:
    import comfy.model_management as mm

    return isinstance(exc, mm.InterruptProcessingException)


def raise_interrupt() -> None:
    import comfy.model_management as mm

    reset_interrupt_note()
    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


class Progress:
    """ComfyUI's progress bar for one node, plus text under the node and custom websocket events."""

    def __init__(self, total: int, node_id: str | None) -> None:
        import comfy.utils

        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def update(self, step: int, total: int, text: str | None = None, preview: Any = None) -> None:
        if interrupted():
            return  # ComfyUI's hook would raise here; the loop stops at the step boundary and saves
        self.bar.update_absolute(step, total, preview)
        if text is not None and self.node_id is not None:
            server = _server()
            if server is not None:
                server.send_progress_text(text, self.node_id)

    def event(self, name: str, data: dict) -> None:
        server = _server()
        if server is not None:
            server.send_sync(name, data, server.client_id)


def _server() -> Any:
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def input_directory() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def loras_directory() -> str:
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]


def temp_directory() -> str:
    import folder_paths

    return folder_paths.get_temp_directory()


def lora_file_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def lora_file_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", name)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    import comfy.utils

    return comfy.utils.load_torch_file(path, safe_load=True)


def apply_lora(model: Any, clip: Any, weights: dict[str, torch.Tensor], strength_model: float = 1.0,
               strength_clip: float = 1.0) -> tuple[Any, Any]:
    """MODEL/CLIP clones with the LoRA patched in exactly as LoraLoader does (the inputs stay untouched)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, weights, strength_model, strength_clip)


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def encode_conditioning(clip: Any, text: str) -> Any:
    """CONDITIONING exactly as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample_image(model: Any, vae: Any, positive: Any, negative: Any, *, width: int, height: int, seed: int,
                 steps: int, cfg: float, sampler_name: str, scheduler: str) -> torch.Tensor:
    """One image [1,H,W,3] with ComfyUI's own KSampler path; the noise comes from a private generator
    (comfy.sample.prepare_noise would reseed the global RNG) and the global RNG state is restored."""
    import comfy.sample

    rng_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        latent = torch.zeros([1, 4, height // 8, width // 8])
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                      denoise=1.0, disable_pbar=True, seed=seed)
        return vae.decode(samples)
    finally:
        torch.set_rng_state(rng_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def sampler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)
