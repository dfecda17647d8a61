"""The one module of the engine that talks to ComfyUI's objects (MODEL, CLIP, VAE, progress, paths).

Everything else in ``trainer/`` is plain Python/torch and is tested without ComfyUI. ComfyUI is
imported lazily inside the functions, so importing this module never requires ComfyUI either.

How training runs on the MODEL that ComfyUI already loaded, without a second copy of the U-Net:

* Loader nodes run under ``torch.inference_mode()``, so the frozen weights are inference tensors,
  which autograd may not save for backward. ``trainable_weights`` appends a no-op function to each
  comfy.ops layer's ``weight_function`` (and ``bias_function``) list; that routes the layer through ComfyUI's own
  ``cast_bias_weight``, which then hands back a per-forward copy of the weight in the compute dtype
  (one layer at a time, freed with gradient checkpointing). fp16/bf16/fp8 weights are cast to the
  training dtype the same way, so the frozen U-Net stays in the dtype ComfyUI loaded it in.
* LoRA branches are forward hooks on the shared modules (trainer/lora_network.py), registered only
  inside the training context. On exit every hook, weight function, forward override and
  ``requires_grad`` flag is restored, so every other node sees the MODEL exactly as it came in.
"""
from __future__ import annotations

import contextlib
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
    transformer_options (attention patches of other nodes) are passed along as apply_model does.
    """
    options = dict(model.model_options.get("transformer_options", {}))
    device = model.load_device
    return diffusion_model(model)(
        model_input.to(device, dtype), timesteps.to(device).float(), context=context.to(device, dtype),
        y=y.to(device, dtype), transformer_options=options).float()


# -- training context ---------------------------------------------------------------------------

def _identity(weight: torch.Tensor) -> torch.Tensor:
    return weight


@contextlib.contextmanager
def trainable_weights(*modules: torch.nn.Module) -> Iterator[None]:
    """Make frozen comfy.ops layers usable in backward and in the training dtype; undo on exit."""
    touched: list[torch.nn.Module] = []
    flags: list[tuple[torch.nn.Parameter, bool]] = []
    try:
        for root in modules:
            for m in root.modules():
                if isinstance(getattr(m, "weight_function", None), list) and getattr(m, "weight", None) is not None:
                    m.weight_function.append(_identity)
                    if getattr(m, "bias", None) is not None:
                        m.bias_function.append(_identity)
                    touched.append(m)
            for p in root.parameters():
                flags.append((p, p.requires_grad))
                if p.requires_grad:
                    p.requires_grad_(False)
        yield
    finally:
        for m in touched:
            for fns in (m.weight_function, m.bias_function):
                for i in range(len(fns) - 1, -1, -1):
                    if fns[i] is _identity:
                        del fns[i]
                        break
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def checkpoint_targets(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ResBlock and SpatialTransformer modules: kohya checkpoints at this level, not the whole U-Net."""
    return [m for m in unet.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]


@contextlib.contextmanager
def _forwards_overridden(modules: list[torch.nn.Module], make_forward: Any) -> Iterator[int]:
    """Give each shared module an instance-level ``forward`` for this block; removed on exit."""
    patched: list[torch.nn.Module] = []
    try:
        for m in modules:
            m.forward = make_forward(m)
            patched.append(m)
        yield len(patched)
    finally:
        for m in patched:
            if "forward" in m.__dict__:
                del m.forward


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
    return _forwards_overridden(checkpoint_targets(unet) if enabled else [], _checkpointed_forward)


@contextlib.contextmanager
def differentiable_attention() -> Iterator[str]:
    """Use PyTorch SDPA attention while training when ComfyUI picked an inference-only kernel.

    On CPU (and some GPUs) ComfyUI selects sub-quadratic or split attention, which modify tensors
    in place and cannot be back-propagated. The choice is a module global read at call time, so it
    is swapped for this block and restored; sampling nodes are unaffected.
    """
    import comfy.ldm.modules.attention as attention

    before = (attention.optimized_attention, attention.optimized_attention_masked)
    unsafe = {getattr(attention, n, None) for n in ("attention_sub_quad", "attention_split")} - {None}
    if before[0] in unsafe or before[1] in unsafe:
        attention.optimized_attention = attention.attention_pytorch
        attention.optimized_attention_masked = attention.attention_pytorch
    try:
        yield attention.optimized_attention.__name__
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = before


def _clip_layer_forward(layer: torch.nn.Module):
    """ComfyUI's CLIPLayer.forward with out-of-place residual adds (``x += f(x)`` breaks autograd)."""

    def forward(x: torch.Tensor, mask: Any = None, optimized_attention: Any = None) -> torch.Tensor:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


def differentiable_text_encoders(*encoders: torch.nn.Module) -> contextlib.AbstractContextManager[int]:
    """Make ComfyUI's CLIP layers back-propagatable for text-encoder training; undone on exit."""
    layers = [m for enc in encoders for m in enc.modules() if type(m).__name__ == "CLIPLayer"]
    return _forwards_overridden(layers, _clip_layer_forward)


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


def load_device(model: Any) -> torch.device:
    """Where ComfyUI runs this MODEL (the GPU, or the CPU with --cpu)."""
    return model.load_device


def load_for_training(model: Any) -> torch.device:
    """Load the MODEL fully on its device (evicting the VAE/CLIP and others first) and return the device."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], memory_required=0, force_full_load=True)
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
def vae_in_float32(vae: Any, enabled: bool) -> Iterator[None]:
    """kohya's ``no_half_vae``: run the VAE in float32 for this block, then restore its dtype."""
    if not enabled or vae.vae_dtype == torch.float32:
        yield
        return
    before = vae.vae_dtype
    vae.first_stage_model.to(torch.float32)
    vae.vae_dtype = torch.float32
    try:
        yield
    finally:
        vae.first_stage_model.to(before)
        vae.vae_dtype = before


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
