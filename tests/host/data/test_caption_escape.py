"""escape_for_comfy_tokenizer against ComfyUI's own prompt parser and tokenizers (comfy/sd1_clip.py, sdxl_clip.py).

kohya feeds captions to CLIP verbatim; ComfyUI parses A1111 weights first. After escaping, ComfyUI must see one
segment of weight 1.0 whose text is the original caption, and produce the same token ids as the plain tokenizer.
"""

from __future__ import annotations

import pytest
from comfy_host import import_comfy

from sdxl_lora_trainer.trainer.data.captions import escape_for_comfy_tokenizer

CAPTIONS = [
    "a (red:1.3) car",
    "smile :)",
    "back\\slash",
    "[x]",
    "((masterpiece)), (best quality:1.2), 1girl",
    "unbalanced ( paren",
    "unbalanced ) paren",
    "already \\(escaped\\) text",
    "trailing backslash \\",
    "emoticons :( :) (:",
    "path C:\\dir\\(x)",
]


@pytest.fixture(scope="module")
def sd1_clip():
    import_comfy()
    import comfy.sd1_clip

    return comfy.sd1_clip


def _parse(sd1_clip, text: str) -> list[tuple[str, float]]:
    """ComfyUI's weighting parse as tokenize_with_weights does it: escape, token_weights, unescape each segment."""
    return [
        (sd1_clip.unescape_important(seg), w) for seg, w in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0)
    ]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_escaped_caption_parses_literally(sd1_clip, caption):
    parsed = _parse(sd1_clip, escape_for_comfy_tokenizer(caption))
    assert all(w == 1.0 for _, w in parsed), parsed
    assert "".join(seg for seg, _ in parsed) == caption


def test_unescaped_weighting_is_parsed(sd1_clip):
    """Control: without escaping ComfyUI changes weights and drops the syntax (so the test above can fail)."""
    parsed = _parse(sd1_clip, "a (red:1.3) car")
    assert any(w != 1.0 for _, w in parsed)
    assert "".join(seg for seg, _ in parsed) != "a (red:1.3) car"


def test_doubling_backslashes_would_be_wrong(sd1_clip):
    parsed = _parse(sd1_clip, "back\\\\slash")
    assert "".join(seg for seg, _ in parsed) != "back\\slash"


@pytest.fixture(scope="module")
def sdxl_tokenizer(sd1_clip):
    import comfy.sdxl_clip

    return comfy.sdxl_clip.SDXLTokenizer()


@pytest.mark.parametrize("caption", CAPTIONS)
def test_sdxl_tokens_equal_plain_tokenizer(sdxl_tokenizer, caption):
    out = sdxl_tokenizer.tokenize_with_weights(escape_for_comfy_tokenizer(caption))
    for key, tok in (("l", sdxl_tokenizer.clip_l), ("g", sdxl_tokenizer.clip_g)):
        pairs = [p for chunk in out[key] for p in chunk]
        assert all(w == 1.0 for _, w in pairs)
        ids = [t for t, _ in pairs]
        plain = tok.tokenizer(caption)["input_ids"]  # <start> ... <end>, what kohya's CLIP tokenizer yields
        assert ids[: len(plain)] == plain
        assert all(t == tok.pad_token for t in ids[len(plain) :])
