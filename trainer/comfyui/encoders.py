"""VAE and CLIP encoding exactly as ComfyUI's nodes do it, and what the caches fingerprint of them."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

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


def caption_tokens(clip: Any, text: str) -> dict[str, tuple[list[int], int, int, int]]:
    """Per SDXL text encoder ("l" = CLIP-L, "g" = CLIP-G): (the caption's token ids without BOS/EOS, untruncated,
    bos, eos, pad), as kohya tokenizes: transformers' CLIPTokenizer on the literal text (no prompt-weight parsing),
    here with the tokenizer files of ComfyUI's SDXL CLIP. The pad ids are ComfyUI's: EOS for CLIP-L, 0 for CLIP-G
    (kohya sets CLIP-G's pad id to 0 too)."""
    out = {}
    for key, tokenizer in (("l", clip.tokenizer.clip_l), ("g", clip.tokenizer.clip_g)):
        ids = tokenizer.tokenizer(text, truncation=False)["input_ids"]
        out[key] = (list(ids[1:-1]), tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token)
    return out


def encode_token_rows(clip: Any, rows: dict[str, list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*rows, 2048], pooled [1, 1280]) of given token rows ({"l": rows, "g": rows}, each 77 long),
    through the same ``encode_from_tokens`` as CLIPTextEncode: every row is encoded on its own, the outputs are
    concatenated along the token axis, and the pooled output is the first row's."""
    tokens = {key: [[(token, 1.0) for token in row] for row in key_rows] for key, key_rows in rows.items()}
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


# -- what the latent / text-encoder caches fingerprint (trainer/cache/fingerprints.py hashes it) -------


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
    wrappers = {
        k: [getattr(f, "__qualname__", type(f).__qualname__) for f in fns]
        for k, fns in p.weight_wrapper_patches.items()
    }
    objects = {k: type(v).__qualname__ for k, v in p.object_patches.items()}
    return p.patches_uuid, {"patches": p.patches, "weight_wrappers": wrappers, "object_patches": objects}


def clip_settings(clip: Any) -> dict[str, Any]:
    """CLIP settings outside its weights that change the encoding (CLIPSetLastLayer, tokenizer options).

    Hooks (CLIP hook nodes) cannot be fingerprinted by content; ``hooks`` is then True and the caller
    must not reuse an encoding.
    """
    hooks = (
        getattr(clip.patcher, "forced_hooks", None) is not None
        or getattr(clip, "apply_hooks_to_conds", None) is not None
    )
    return {"layer_idx": clip.layer_idx, "tokenizer_options": dict(clip.tokenizer_options), "hooks": bool(hooks)}


def encode_conditioning(clip: Any, text: str) -> Any:
    """CONDITIONING exactly as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))
