"""SDXL text-encoder outputs per caption, encoded once with the CLIP ComfyUI loaded (kohya's
cache_text_encoder_outputs).

What is encoded for a caption: the SDXL context (CLIP-L penultimate hidden states and CLIP-G
penultimate hidden states, concatenated on the feature axis: 2048 wide for real SDXL) and CLIP-G's
pooled output (1280), through the CLIP object ComfyUI loaded (``clip.encode_from_tokens``), with the
token layout ``TokenLength`` chooses (trainer/data/token_length.py): kohya's ``max_token_length``
(by default 75 tokens, longer captions truncated, context 77; 150 / 225: rows of 75 stitched to a
context of 152 / 227), or ComfyUI's own chunking (CLIPTextEncode: any length, context 77 x chunks).

Captions are fed to CLIP LITERALLY (kohya does no prompt weighting): kohya's layouts tokenize the
text with transformers' CLIPTokenizer as kohya does; ComfyUI chunking escapes it with
``captions.escape_for_comfy_tokenizer`` first, so ``(word:1.2)`` stays text.

Only deterministic captions can be cached once: with shuffling, dropout, wildcards or token warm-up
(``CaptionOptions.is_random``) the caption differs per step, so those images are "live": the train
loop encodes them per step with ``encode_caption_live``. For deterministic options the caption is
``process_caption(caption, options, rng)``, which makes no random draw then; this module proves it
by passing an rng that raises on any draw. (When text encoders are trained nothing is cached; the
train loop handles that.)

Keys: a hash of the CLIP weight fingerprint (memoised per model object), the patches on the CLIP's
ModelPatcher (a LoRA from LoraLoader, merges, with strengths), CLIPSetLastLayer's layer, tokenizer
options, the token layout, and the exact escaped text. Identical captions are encoded once. Outputs are float32 CPU
tensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..comfyui import encoders as comfy_encoders
from ..data.captions import CaptionOptions, escape_for_comfy_tokenizer, process_caption
from ..data.dataset import BucketedImage, TrainingDataset
from ..data.token_length import TokenLength, kohya_token_rows, stitched_indices
from .dataset_cache import DatasetCache
from .fingerprints import content_key, module_fingerprint, structure_hash, token_fingerprint
from .lookup import CachedItems, CacheStats
from .stores import (
    ENCODER_CALLS,
    DiskStore,
    ImageRef,
    MemoryStore,
    Tensors,
    memory_store,
)

__all__ = [
    "ENCODER_CALLS",
    "LiveCaptionError",
    "TextCache",
    "TextEncodingError",
    "cached_caption",
    "clip_fingerprint",
    "encode_caption",
    "encode_caption_live",
    "random_caption_options",
]

#: Bump when the way a caption becomes an encoding changes meaning.
TEXT_FORMAT = "text/2"


class TextEncodingError(ValueError):
    """The CLIP produced NaN/inf for a caption."""


class LiveCaptionError(KeyError):
    """The image's caption is random per step, so it has no cached encoding."""


class _NoDrawRandom(random.Random):
    """An rng that fails on any draw: proves a deterministic caption needs no randomness."""

    def random(self) -> float:  # type: ignore[override]
        raise AssertionError("process_caption drew a random number for caption options that are not random")

    def getrandbits(self, k: int) -> int:  # type: ignore[override]
        raise AssertionError("process_caption drew random bits for caption options that are not random")


def cached_caption(img: BucketedImage) -> str:
    """The caption text a non-random image trains with every step (prefix/suffix, first line, separators)."""
    if img.caption_options.is_random:
        raise ValueError(f"caption of {img.key!r} is random per step; it cannot be cached")
    return process_caption(img.item.caption, img.caption_options, _NoDrawRandom())


def random_caption_options(options: CaptionOptions) -> list[str]:
    """Names of the options that make captions random, for the report."""
    o = options
    names = [
        ("shuffle_caption", o.shuffle_caption),
        ("caption_dropout_rate", o.caption_dropout_rate > 0),
        ("caption_dropout_every_n_epochs", bool(o.caption_dropout_every_n_epochs)),
        ("caption_tag_dropout_rate", o.caption_tag_dropout_rate > 0),
        ("enable_wildcard", o.enable_wildcard),
        ("token_warmup_step", bool(o.token_warmup_step)),
    ]
    return [n for n, on in names if on]


def clip_fingerprint(clip: Any) -> str | None:
    """Hash of the CLIP's weights (memoised per model object), patches and settings; None if it has hooks."""
    settings = comfy_encoders.clip_settings(clip)
    if settings.pop("hooks"):
        return None
    weights = module_fingerprint(comfy_encoders.clip_module(clip), lambda: comfy_encoders.clip_weights(clip))
    token, patches = comfy_encoders.patcher_patches(clip)
    patches_fp = token_fingerprint(("clip", token), lambda: structure_hash(patches))
    return structure_hash({"weights": weights, "patches": patches_fp, "settings": settings})


def caption_token_count(clip: Any, text: str) -> int:
    """Tokens of a caption without BOS/EOS (CLIP-L's tokenizer, as kohya counts them), for the truncation report."""
    return len(comfy_encoders.caption_tokens(clip, text)["l"][0])


def encode_caption(clip: Any, text: str, token_length: TokenLength) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [L, width], pooled [pooled width]) of one literal caption, where ComfyUI's CLIP puts them.

    kohya's layouts: the rows of trainer/data/token_length.kohya_token_rows for CLIP-L and CLIP-G, each row through
    the encoder, the context stitched to 77 / 152 / 227, the pooled output of the first row. ComfyUI chunking: the
    escaped text through CLIPTextEncode's path. Gradients flow when enabled (text-encoder training).
    """
    if token_length.comfyui_chunking:
        cond, pooled = comfy_encoders.encode_text(clip, escape_for_comfy_tokenizer(text))
        return cond[0], pooled[0]
    rows = {
        key: kohya_token_rows(content, bos, eos, pad, token_length.max_token_length)
        for key, (content, bos, eos, pad) in comfy_encoders.caption_tokens(clip, text).items()
    }
    cond, pooled = comfy_encoders.encode_token_rows(clip, rows)
    return cond[0][stitched_indices(token_length.rows)], pooled[0]


def _encode(clip: Any, text: str, token_length: TokenLength) -> tuple[torch.Tensor, torch.Tensor]:
    ENCODER_CALLS["clip"] += 1
    context, pooled = encode_caption(clip, text, token_length)
    return context.to("cpu", torch.float32), pooled.to("cpu", torch.float32)


def encode_caption_live(
    clip: Any, text: str, token_length: TokenLength | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [L, width], pooled [pooled width]) of one processed caption, at train time.

    ``text`` is the caption as process_caption produced it (literal text). Runs under no_grad (frozen
    text encoders), not inference_mode, so the result can be used in autograd; float32 on CPU like the
    cached encodings. ``token_length``: kohya's default (75 tokens) when not given.
    """
    with torch.no_grad():
        return _encode(clip, text, token_length or TokenLength())


def _validate_text(tensors: dict[str, torch.Tensor]) -> str | None:
    ctx, pooled = tensors.get("context"), tensors.get("pooled")
    if ctx is None or pooled is None or ctx.ndim != 2 or pooled.ndim != 1:
        return "does not hold a [tokens, width] context and a [width] pooled output"
    if ctx.dtype != torch.float32 or pooled.dtype != torch.float32:
        return "holds tensors that are not float32"
    if not (torch.isfinite(ctx).all() and torch.isfinite(pooled).all()):
        return "holds NaN/inf values"
    return None


@dataclass
class _Caption:
    """A caption to encode: its literal and escaped text and the first image that has it (named in errors)."""

    text: str
    escaped: str
    first_image: BucketedImage


@dataclass(frozen=True)
class TruncatedCaption:
    """A caption longer than the token limit: kohya (and so the cache) encodes only its first ``limit`` tokens."""

    image: str  # the image key
    tokens: int  # CLIP-L tokens without BOS/EOS
    limit: int

    @property
    def cut(self) -> int:
        return self.tokens - self.limit


def _encode_checked(clip: Any, caption: _Caption, token_length: TokenLength) -> Tensors:
    context, pooled = _encode(clip, caption.text, token_length)
    if not (torch.isfinite(context).all() and torch.isfinite(pooled).all()):
        where = caption.first_image.item.image_path or caption.first_image.key
        raise TextEncodingError(
            f"the text encoders produced NaN/inf for the caption of {where} "
            f"({caption.escaped[:80]!r}); check the CLIP model (and any LoRA applied to it)"
        )
    return {"context": context.clone(), "pooled": pooled.clone()}


class TextCache(DatasetCache):
    """Text encodings for every non-random caption of a TrainingDataset; see the module docstring."""

    def __init__(
        self,
        dataset: TrainingDataset,
        image_keys: dict[int, str],
        captions: dict[int, str],
        encodings: dict[str, tuple[torch.Tensor, torch.Tensor]],
        live: list[int],
        stats: CacheStats,
        warnings: list[str],
        disk_dir: str | None,
        token_length: TokenLength,
        truncated: list[TruncatedCaption],
    ) -> None:
        super().__init__(dataset, encodings, stats, warnings, disk_dir)
        self._image_keys = image_keys
        self._captions = captions
        self._encodings = encodings
        self._live = live
        self.token_length = token_length
        self.truncated = truncated

    @classmethod
    def build(
        cls,
        dataset: TrainingDataset,
        clip: Any,
        *,
        disk_dir: str | None = None,
        store: MemoryStore | None = None,
        progress: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
        token_length: TokenLength | None = None,
    ) -> TextCache:
        """Look each non-random caption up (memory, then disk) and encode only the missing ones.

        ``token_length``: the token layout (kohya's default, 75 tokens, when not given); it is part of every key.
        """
        token_length = token_length or TokenLength()
        store = memory_store() if store is None else store
        disk = DiskStore(disk_dir) if disk_dir else None
        fingerprint = clip_fingerprint(clip)
        items: CachedItems[_Caption]
        if fingerprint is None:  # no key that is safe to reuse: neither memory nor disk is read or written
            items = CachedItems(None, None, _validate_text, "text-encoder")
            items.warnings.append(
                "the CLIP has hooks (CLIP hook nodes), which cannot be fingerprinted: captions are "
                "encoded now and not reused across runs"
            )
        else:
            items = CachedItems(store, disk, _validate_text, "text-encoder")
        image_keys: dict[int, str] = {}
        captions: dict[int, str] = {}
        live: list[int] = []
        truncated: list[TruncatedCaption] = []
        token_counts: dict[str, int] = {}
        for i, img in enumerate(dataset.cached_images):
            if img.caption_options.is_random:
                live.append(i)
                continue
            text = cached_caption(img)
            escaped = escape_for_comfy_tokenizer(text)
            fields = {"format": TEXT_FORMAT, "clip": fingerprint, "tokens": token_length.choice, "text": escaped}
            key = content_key("txt", fields)
            image_keys[i] = key
            captions[i] = text
            items.lookup(key, fields, _Caption(text, escaped, img))
            if token_length.limit is not None:
                if text not in token_counts:
                    token_counts[text] = caption_token_count(clip, text)
                if token_counts[text] > token_length.limit:
                    truncated.append(TruncatedCaption(img.key, token_counts[text], token_length.limit))

        items.encode(
            [[key] for key in items.pending],
            lambda batch: [_encode_checked(clip, caption, token_length) for caption in batch],
            progress,
            check_interrupt,
        )
        encodings = {key: (t["context"], t["pooled"]) for key, t in items.tensors.items()}
        return cls(
            dataset,
            image_keys,
            captions,
            encodings,
            live,
            items.stats,
            items.warnings,
            disk_dir,
            token_length,
            truncated,
        )

    # -- access ------------------------------------------------------------------------------
    def is_live(self, image: ImageRef) -> bool:
        """True when the image's caption is random per step and must be encoded at train time."""
        return self._index.index(image) not in self._image_keys

    @property
    def live_keys(self) -> list[str]:
        """Image keys whose captions are encoded at train time (random caption options)."""
        return [self._index.images[i].key for i in self._live]

    @property
    def live_indices(self) -> list[int]:
        return list(self._live)

    def encoding(self, image: ImageRef) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [77*chunks, width], pooled [width]) of an image's caption, float32 CPU, shared: clone to modify."""
        i = self._index.index(image)
        key = self._image_keys.get(i)
        if key is None:
            raise LiveCaptionError(
                f"the caption of {self._index.images[i].key!r} uses random caption options, so it has no cached "
                "encoding; encode it per step with encode_caption_live"
            )
        return self._encodings[key]

    def caption(self, image: ImageRef) -> str:
        """The (unescaped) caption text that was encoded for an image."""
        i = self._index.index(image)
        if i not in self._captions:
            raise LiveCaptionError(f"the caption of {self._index.images[i].key!r} is random per step")
        return self._captions[i]

    def cache_key(self, image: ImageRef) -> str:
        return self._image_keys[self._index.index(image)]

    # -- report ------------------------------------------------------------------------------
    def _live_reasons(self) -> list[str]:
        reasons: list[str] = []
        for i in self._live:
            for r in random_caption_options(self._index.images[i].caption_options):
                if r not in reasons:
                    reasons.append(r)
        return reasons

    def report_json(self) -> dict[str, Any]:
        return {
            "images": len(self._index.images),
            "cached_images": len(self._image_keys),
            "unique_captions": len(self._encodings),
            **self.stats.as_dict(),
            "live_images": len(self._live),
            "live_keys": self.live_keys,
            "live_reasons": self._live_reasons(),
            "max_token_length": self.token_length.choice,
            "truncated": [{"image": t.image, "tokens": t.tokens, "cut": t.cut} for t in self.truncated],
            "size_mb": round(self.size_mb, 3),
            "disk_dir": self.disk_dir,
            "disk_size_mb": round(self.disk_size_mb(), 3),
            "warnings": list(self.warnings),
        }

    def report_text(self) -> str:
        s = self.stats
        n = len(self._index.images)
        lines = [
            f"text encodings: {len(self._image_keys)} of {n} images cached, {len(self._encodings)} unique captions",
            f"  encoded {s.encoded} (CLIP calls), from memory {s.from_memory}, from disk {s.from_disk}"
            + (f", rebuilt {s.rebuilt} corrupted disk files" if s.rebuilt else ""),
            self.size_line("float32"),
            f"  tokens: {self.token_length.describe()}",
        ]
        lines.extend(self._truncation_lines())
        if self._live:
            lines.append(
                f"  live: {len(self._live)} images have random caption options ({', '.join(self._live_reasons())}); "
                "their captions are encoded at train time, each step"
                + (
                    f", and truncated to {self.token_length.limit} tokens the same way"
                    if self.token_length.limit
                    else ""
                )
            )
        lines.extend(self.warning_lines())
        return "\n".join(lines)

    def _truncation_lines(self, shown: int = 20) -> list[str]:
        if not self.truncated:
            return []
        limit = self.token_length.limit
        longer = [n for n in (150, 225) if n > limit]
        lines = [
            f"  truncated: {len(self.truncated)} captions are longer than {limit} tokens; only their first {limit} "
            "tokens are trained, as kohya does"
            + (f" (max_token_length {' or '.join(map(str, longer))} keeps more)" if longer else "")
        ]
        lines.extend(f"    {t.image}: {t.tokens} tokens, {t.cut} cut" for t in self.truncated[:shown])
        if len(self.truncated) > shown:
            lines.append(f"    ... and {len(self.truncated) - shown} more")
        return lines
