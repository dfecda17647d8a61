"""The tokenizer folder scripts/kohya_reference.py roundtrip gives kohya (--tokenizer_cache_dir, so kohya runs
offline): built from ComfyUI's bundled CLIP files, it must tokenize every caption as ComfyUI's SDXL tokenizer does,
CLIP-L padded with the end token and CLIP-G with "!" (id 0), as kohya's strategy_sdxl expects."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _kohya_reference():
    spec = importlib.util.spec_from_file_location("kohya_reference", ROOT / "scripts" / "kohya_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("caption", ["a red cube", "sks, A photo of a Dog on the beach at sunset, 4k, highly detailed"])
def test_the_kohya_tokenizer_folder_tokenizes_as_comfyui(tmp_path, caption):
    transformers = pytest.importorskip("transformers")
    import comfy.sdxl_clip

    _kohya_reference().write_tokenizer_folder(str(tmp_path))
    clip_l = transformers.CLIPTokenizer.from_pretrained(tmp_path / "openai_clip-vit-large-patch14")
    clip_g = transformers.CLIPTokenizer.from_pretrained(tmp_path / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")
    assert (clip_l.pad_token_id, clip_g.pad_token_id, clip_l.model_max_length, clip_g.model_max_length) == (
        49407,
        0,
        77,
        77,
    )
    comfy_tokens = comfy.sdxl_clip.SDXLTokenizer().tokenize_with_weights(caption)
    for name, tokenizer in (("l", clip_l), ("g", clip_g)):
        ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == [token for token, *_ in comfy_tokens[name][0]], name
