"""trainer/data/token_length.py: kohya's max_token_length rows and stitched context layout, against tokens.json.

The golden rows were made by kohya's SdxlTokenizeStrategy; the row/position layout is checked here without a
tokenizer (tests/host/cache/test_token_length_golden.py checks the token ids and the encodings with ComfyUI's CLIP).
"""

from __future__ import annotations

import pytest

from sdxl_lora_trainer.trainer.data.token_length import (
    CHOICES,
    TokenLength,
    kohya_token_rows,
    stitched_indices,
    stitched_positions,
)

BOS, EOS = 49406, 49407


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_stitched_positions_match_kohya(golden, max_token_length):
    cases = [c for c in golden("tokens")["cases"] if c["max_token_length"] == max_token_length]
    assert cases
    for case in cases:
        rows = len(case["input_ids_clip_l"])
        assert rows == TokenLength(max_token_length).rows
        want = [tuple(p) for p in case["context_kept_positions_clip_l"]]
        assert stitched_positions(rows) == want == [tuple(p) for p in case["context_kept_positions_clip_g"]]
        assert len(want) == case["context_length"] == (max_token_length or 75) + 2


def test_rows_from_the_tokens_kohya_kept(golden):
    """Re-chunk the tokens of each golden 225 case (positions 1..75 of its rows, up to the caption's length) with
    every max_token_length and compare with kohya's rows for that length."""
    cases = golden("tokens")["cases"]
    by_caption = {}
    for c in cases:
        by_caption.setdefault(c["caption"], {})[c["max_token_length"]] = c
    checked = 0
    for per_length in by_caption.values():
        if 225 not in per_length or per_length[225]["n_tokens_clip_l"] > 225:
            continue
        n = per_length[225]["n_tokens_clip_l"]
        content = [t for row in per_length[225]["input_ids_clip_l"] for t in row[1:76]][:n]
        for length, case in per_length.items():
            assert kohya_token_rows(content, BOS, EOS, EOS, length) == case["input_ids_clip_l"]
            assert kohya_token_rows(content, BOS, EOS, 0, length) == case["input_ids_clip_g"]
            checked += 1
    assert checked >= 6


def test_row_fixes_by_hand():
    """CLIP-G (pad 0): a row ending mid-text gets EOS last; a row starting with padding gets EOS second.
    CLIP-L (pad = EOS): rows are cut as they are."""
    content = list(range(1, 81))  # 80 tokens: row 0 full (ends mid-text), row 1 holds 5, row 2 is empty
    g = kohya_token_rows(content, BOS, EOS, 0, 225)
    assert [len(r) for r in g] == [77, 77, 77]
    assert g[0] == [BOS, *range(1, 76), EOS]
    assert g[1] == [BOS, 76, 77, 78, 79, 80, EOS] + [0] * 70
    assert g[2] == [BOS, EOS] + [0] * 75
    l_rows = kohya_token_rows(content, BOS, EOS, EOS, 225)
    assert l_rows[0] == [BOS, *range(1, 76), EOS]  # the last position of the 227 ids: EOS padding
    assert l_rows[2] == [BOS] + [EOS] * 76
    assert kohya_token_rows(content, BOS, EOS, 0, None) == [[BOS, *range(1, 76), EOS]]  # truncated


def test_stitched_indices_are_row_major_offsets():
    assert stitched_indices(1) == list(range(77))
    idx = stitched_indices(2)
    assert len(idx) == 152 and idx[:2] == [0, 1] and idx[75:78] == [75, 78, 79] and idx[-2:] == [152, 153]


def test_choices():
    assert [TokenLength.from_choice(c) for c in CHOICES] == [
        TokenLength(),
        TokenLength(150),
        TokenLength(225),
        TokenLength(comfyui_chunking=True),
    ]
    assert [TokenLength.from_choice(c).choice for c in CHOICES] == list(CHOICES)
    assert TokenLength(75) == TokenLength()  # kohya spells 75 as None
    assert TokenLength().limit == 75 and TokenLength(225).limit == 225
    assert TokenLength(comfyui_chunking=True).limit is None
    with pytest.raises(ValueError, match="150 or 225"):
        TokenLength(100)
    with pytest.raises(ValueError, match="ComfyUI chunking"):
        TokenLength(150, comfyui_chunking=True)
    with pytest.raises(ValueError, match="one of"):
        TokenLength.from_choice("300")
