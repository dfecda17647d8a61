"""kohya's max_token_length through ComfyUI's SDXL CLIP (tiny encoders, real tokenizer files) against tokens.json.

Token ids: ComfyUI's tokenizer files through transformers' CLIPTokenizer, re-chunked, must be kohya's rows exactly.
Encodings: each golden row through ``clip.encode_from_tokens`` on its own, the context assembled from the golden
kept positions and the pooled output from the golden row, must equal ``encode_caption``'s stitched result.
"""

from __future__ import annotations

import pytest
import torch

from sdxl_lora_trainer.trainer.cache.text import encode_caption
from sdxl_lora_trainer.trainer.comfyui import encoders as comfy_encoders
from sdxl_lora_trainer.trainer.data.token_length import TokenLength, kohya_token_rows


@pytest.fixture
def clip(tiny):
    return tiny[1]


def test_token_ids_match_kohya(golden, clip):
    cases = golden("tokens")["cases"]
    assert len(cases) >= 30
    for case in cases:
        tokens = comfy_encoders.caption_tokens(clip, case["caption"])
        assert len(tokens["l"][0]) == case["n_tokens_clip_l"], case["caption"]
        for key in ("l", "g"):
            content, bos, eos, pad = tokens[key]
            rows = kohya_token_rows(content, bos, eos, pad, case["max_token_length"])
            assert rows == case[f"input_ids_clip_{key}"], (key, case["max_token_length"], case["n_tokens_clip_l"])
        row, pos = case["pooled_from_row_pos"]
        first_g_row = case["input_ids_clip_g"][row]
        assert first_g_row.index(tokens["g"][2]) == pos  # ComfyUI pools at the first EOS of the first row


def _row_outputs(clip, case):
    """Each golden row encoded on its own: (context rows [n, 77, W], pooled per row [n, P])."""
    contexts, pooled = [], []
    for row_l, row_g in zip(case["input_ids_clip_l"], case["input_ids_clip_g"], strict=True):
        c, p = comfy_encoders.encode_token_rows(clip, {"l": [row_l], "g": [row_g]})
        contexts.append(c[0])
        pooled.append(p[0])
    return torch.stack(contexts), torch.stack(pooled)


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_stitched_encoding_matches_kohya_layout(golden, clip, max_token_length):
    cases = [c for c in golden("tokens")["cases"] if c["max_token_length"] == max_token_length]
    # the shortest, one over 75 tokens and the longest of each length
    picked = {
        min(cases, key=lambda c: c["n_tokens_clip_l"])["caption"],
        max(cases, key=lambda c: c["n_tokens_clip_l"])["caption"],
    }
    picked |= {next(c["caption"] for c in cases if 75 < c["n_tokens_clip_l"] < 150)}
    with torch.inference_mode():
        for case in (c for c in cases if c["caption"] in picked):
            rows_c, rows_p = _row_outputs(clip, case)
            want_l = torch.stack([rows_c[r, p] for r, p in case["context_kept_positions_clip_l"]])
            want_g = torch.stack([rows_c[r, p] for r, p in case["context_kept_positions_clip_g"]])
            width_l = clip.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight.shape[0]
            want = torch.cat([want_l[:, :width_l], want_g[:, width_l:]], dim=-1)
            context, pooled = encode_caption(clip, case["caption"], TokenLength(max_token_length))
            assert context.shape[0] == case["context_length"]
            assert torch.equal(context, want), case["n_tokens_clip_l"]
            # the projection of one row vs a batch of rows may round differently in the last bit
            row = case["pooled_from_row_pos"][0]
            assert torch.allclose(pooled, rows_p[row], rtol=1e-5, atol=1e-6)
            ids = case["input_ids_clip_g"]
            others = [r for r in range(len(ids)) if ids[r] != ids[row]]
            assert all(not torch.allclose(pooled, rows_p[r], atol=1e-3) for r in others)
