"""Caption processing with kohya's semantics (BaseDataset.process_caption), plus escaping for ComfyUI's tokenizer.

Every random decision draws from the ``random.Random`` passed in, in kohya's order, so a seeded generator gives a
reproducible caption stream and the same draws kohya would make from the global ``random`` in that state:

1. prefix / suffix are joined with a space: ``prefix + " " + caption + " " + suffix``. They happen FIRST, so with
   shuffling the prefix becomes part of the first tag (and counts towards keep_tokens).
2. Caption dropout: one ``random()`` draw, only if ``caption_dropout_rate > 0``; dropped when draw < rate. Also dropped
   every N-th epoch (``epoch % caption_dropout_every_n_epochs == 0``). A dropped caption is "" (prefix included).
3. Without wildcards only the first line is used. With ``enable_wildcard`` a multi-line caption picks one line with
   ``choice``, then each ``{a|b|c}`` is replaced by ``choice`` of its options (``{{`` / ``}}`` are literal braces).
4. Tag processing runs only if shuffle_caption, token warm-up or caption_tag_dropout_rate > 0 (keep_tokens alone
   does nothing). The caption is split at ``caption_separator`` and tags are stripped:
   * with ``keep_tokens_separator`` present: the part before it is fixed, a part after a SECOND separator is a fixed
     suffix, empty tags are dropped;
   * otherwise the first ``keep_tokens`` tags are fixed and empty tags are KEPT (``"a,,b"`` -> ``"a, , b"``).
   Token warm-up truncates the flexible tags; then they are shuffled (``shuffle``) and each is dropped when its
   ``random()`` draw is < caption_tag_dropout_rate (one draw per flexible tag, only if the rate > 0). Fixed tags
   are never shuffled or dropped. The result is joined with ``", "`` whatever the separator was.
5. ``secondary_separator`` is replaced by ``caption_separator`` last (after shuffling, so it glues tags together).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's per-subset caption options; defaults are kohya's."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    def __post_init__(self) -> None:
        for name in ("caption_prefix", "caption_suffix"):
            if getattr(self, name) == "":  # an empty widget / TOML value: nothing to add (kohya tests truthiness)
                object.__setattr__(self, name, None)
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.caption_dropout_every_n_epochs < 0:
            raise ValueError(f"caption_dropout_every_n_epochs must be >= 0, got {self.caption_dropout_every_n_epochs}")

    @property
    def is_random(self) -> bool:
        """True when the caption can change from step to step, so its text encoding cannot be cached once."""
        return bool(
            self.shuffle_caption
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs
            or self.caption_tag_dropout_rate > 0
            or self.enable_wildcard
            or self.token_warmup_step
        )


_WILDCARD = re.compile(r"\{([^}]+)\}")


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # protect {{ and }} with markers that do not occur in the caption
    open_marker, close_marker = "⦅", "⦆"
    while open_marker in caption or close_marker in caption:
        open_marker += "⦅"
        close_marker += "⦆"
    caption = caption.replace("{{", open_marker).replace("}}", close_marker)
    caption = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_marker, "{").replace(close_marker, "}")


def _split_tags(caption: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed_suffix) tags."""
    sep = options.caption_separator
    keep_sep = options.keep_tokens_separator
    if keep_sep and keep_sep in caption:
        fixed_part, flex_part = caption.split(keep_sep, 1)
        suffix: list[str] = []
        if keep_sep in flex_part:
            flex_part, suffix_part = flex_part.split(keep_sep, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, suffix
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if options.keep_tokens > 0:
        return tokens[: options.keep_tokens], tokens[options.keep_tokens :], []
    return [], tokens, []


def effective_token_warmup_step(options: CaptionOptions, max_train_steps: int) -> int:
    """A warm-up below 1 is a fraction of max_train_steps (kohya rewrites it as floor(fraction * max_train_steps))."""
    step = options.token_warmup_step
    if step < 1:
        return math.floor(step * max_train_steps)
    return int(step)


def process_caption(
    caption: str,
    options: CaptionOptions,
    rng: random.Random,
    *,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """One training-time caption, as kohya's process_caption builds it (see the module docstring).

    ``epoch`` matters only for caption_dropout_every_n_epochs (kohya's training loop counts epochs from 1);
    ``step`` / ``max_train_steps`` only for token warm-up.
    """
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix

    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    n = options.caption_dropout_every_n_epochs
    dropped = dropped or (n > 0 and epoch % n == 0)
    if dropped:
        return ""

    if options.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = effective_token_warmup_step(options, max_train_steps)
    if options.shuffle_caption or warmup > 0 or options.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _split_tags(caption, options)
        if warmup and step < warmup:
            length = math.floor(step * ((len(flex) - options.token_warmup_min) / warmup)) + options.token_warmup_min
            flex = flex[:length]
        if options.shuffle_caption:
            rng.shuffle(flex)
        if options.caption_tag_dropout_rate > 0:
            flex = [tag for tag in flex if rng.random() >= options.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def escape_for_comfy_tokenizer(text: str) -> str:
    """Make ``text`` encode literally through ComfyUI's CLIP tokenizer (kohya feeds captions to CLIP verbatim).

    ComfyUI (comfy/sd1_clip.py, SDTokenizer.tokenize_with_weights) parses A1111 weighting: ``(word)`` = x1.1,
    ``(word:1.3)`` = weight 1.3, and its only escapes are ``\\(`` and ``\\)`` (escape_important runs before the
    parse, unescape_important after). A backslash before anything else is an ordinary character and is NOT
    unescaped, so backslashes must stay as they are (doubling them would put two into the prompt). Prefixing every
    parenthesis with a backslash is therefore enough; an existing backslash before a parenthesis also survives,
    because ComfyUI consumes only the backslash directly before the parenthesis. Square brackets mean nothing to
    ComfyUI and are left alone.

    Not representable: the control sequences ``\\0\\1`` / ``\\0\\2`` (ComfyUI's internal placeholders). Also note
    that ``embedding:name`` after whitespace loads a textual-inversion embedding if one with that name exists.
    """
    return text.replace("(", "\\(").replace(")", "\\)")
