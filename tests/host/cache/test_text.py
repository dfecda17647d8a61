"""trainer/cache/text.py on ComfyUI's own SDXL CLIP class (tiny CLIP-L + CLIP-G, real tokenizers, CPU).

With ComfyUI chunking the reference for every cached encoding is what CLIPTextEncode computes for the escaped
caption: ``clip.encode_from_tokens(clip.tokenize(escaped), return_pooled=True)``; kohya's default layout gives the
same for captions of at most 75 tokens and truncates longer ones. Encoder work is counted
with ENCODER_CALLS['clip'] (one call per caption), so invalidation is checked as an exact count.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_lora_trainer.trainer.cache import fingerprints
from sdxl_lora_trainer.trainer.cache import text as tc
from sdxl_lora_trainer.trainer.cache.stores import ENCODER_CALLS, MemoryStore
from sdxl_lora_trainer.trainer.cache.text import LiveCaptionError, TextCache, encode_caption_live
from sdxl_lora_trainer.trainer.comfyui import encoders as comfy_encoders
from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions, escape_for_comfy_tokenizer, process_caption
from sdxl_lora_trainer.trainer.data.dataset import bucket_images, training_dataset
from sdxl_lora_trainer.trainer.data.sources import items_from_images, scan_folder
from sdxl_lora_trainer.trainer.data.token_length import TokenLength

COMFYUI_CHUNKING = TokenLength(comfyui_chunking=True)

LONG = ", ".join(f"tag{i} word{i}" for i in range(60))  # well over 75 tokens: two or more chunks
CAPTIONS = {
    "a.png": "a (red:1.3) car, [blue] sky",  # weighting syntax must stay literal
    "b.png": "a dog",
    "c.png": "a dog",  # duplicate caption
    "d.png": LONG,
}


def _write_png(path, seed, size=(64, 64)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _make_folder(root, captions=CAPTIONS):
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        _write_png(root / name, i)
        (root / name).with_suffix(".txt").write_text(caption)
    return root


def _settings():
    return BucketSettings(resolution=(64, 64), min_bucket_reso=64, max_bucket_reso=128)


def _dataset(root, options=None):
    scan = scan_folder(root)
    part = bucket_images(scan, _settings(), 1, options if options is not None else CaptionOptions())
    return training_dataset([part], [scan])


def _direct(clip, text):
    escaped = escape_for_comfy_tokenizer(text)
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(escaped), return_pooled=True)
    return cond[0], pooled[0]


class Calls:
    def __enter__(self):
        self.start = ENCODER_CALLS["clip"]
        return self

    def __exit__(self, *exc):
        self.n = ENCODER_CALLS["clip"] - self.start


@pytest.fixture
def clip(tiny):
    return tiny[1]


@pytest.fixture
def fresh_clip():
    """A CLIP of its own, for tests that patch weights in place (LoRA) so the session fixture stays pristine."""
    import tiny_sdxl

    return tiny_sdxl.make_clip(seed=1)


@pytest.fixture
def store():
    return MemoryStore(capacity_mb=256)


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "data")


def _tiny_lora(strength_seed=0):
    g = torch.Generator().manual_seed(strength_seed)
    name = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    return {
        f"{name}.lora_up.weight": torch.randn(64, 4, generator=g),
        f"{name}.lora_down.weight": torch.randn(4, 32, generator=g),
        f"{name}.alpha": torch.tensor(4.0),
    }


def _with_lora(clip, strength=1.0, seed=0):
    import comfy.sd

    _, patched = comfy.sd.load_lora_for_models(None, clip, _tiny_lora(seed), 0.0, strength)
    assert len(patched.patcher.patches) == 1
    return patched


# -- correctness ---------------------------------------------------------------------------------


def test_cached_encodings_equal_comfyui_clip_text_encode(clip, store, folder):
    ds = _dataset(folder)
    with Calls() as calls:
        cache = TextCache.build(ds, clip, store=store, token_length=COMFYUI_CHUNKING)
    assert calls.n == 3 and cache.stats.encoded == 3  # "a dog" twice: encoded once
    for i, img in enumerate(ds.images):
        caption = CAPTIONS[img.key.rsplit("/", 1)[-1]]
        context, pooled = cache.encoding(i)
        ref_c, ref_p = _direct(clip, caption)
        assert torch.equal(context, ref_c) and torch.equal(pooled, ref_p), caption
        assert context.dtype == torch.float32 and context.device.type == "cpu"
        assert pooled.shape == (32,)  # CLIP-G pooled (1280 in real SDXL)
        assert context.shape[1] == 64  # CLIP-L + CLIP-G widths (768 + 1280 = 2048 in real SDXL)
        assert cache.caption(i) == caption
    long_i = next(i for i, img in enumerate(ds.images) if img.key.endswith("d.png"))
    assert cache.encoding(long_i)[0].shape[0] >= 154 and cache.encoding(long_i)[0].shape[0] % 77 == 0
    assert cache.encoding(1)[0] is cache.encoding(2)[0]  # shared by the duplicate caption


def test_weighting_syntax_is_encoded_literally(clip, store, folder):
    cache = TextCache.build(_dataset(folder), clip, store=store)
    a = next(i for i, img in enumerate(cache.dataset.images) if img.key.endswith("a.png"))
    unescaped, _ = clip.encode_from_tokens(clip.tokenize(CAPTIONS["a.png"]), return_pooled=True)
    assert not torch.equal(cache.encoding(a)[0], unescaped[0])  # would be weighted (red x1.3) without escaping


def test_prefix_suffix_first_line_and_secondary_separator_are_cached(clip, store):
    options = CaptionOptions(caption_prefix="masterpiece", caption_suffix="by someone", secondary_separator=";;")
    scan = items_from_images([Image.new("RGB", (64, 64), (9, 9, 9))], "a;;b, c\nsecond line")
    part = bucket_images(scan, _settings(), 1, options)
    ds = training_dataset([part], [scan])
    cache = TextCache.build(ds, clip, store=store)
    expected = process_caption(ds.images[0].item.caption, options, random.Random(0))
    assert cache.caption(0) == expected == "masterpiece a,b, c"
    ref_c, ref_p = _direct(clip, expected)
    assert torch.equal(cache.encoding(0)[0], ref_c) and torch.equal(cache.encoding(0)[1], ref_p)


def test_deterministic_captions_make_no_random_draw():
    """The guard rng fails on any draw, so cached_caption proves determinism; and the guard can fail."""
    with pytest.raises(AssertionError):
        process_caption("a, b, c", CaptionOptions(shuffle_caption=True), tc._NoDrawRandom())
    with pytest.raises(AssertionError):
        process_caption("a, b", CaptionOptions(caption_dropout_rate=0.5), tc._NoDrawRandom())
    with pytest.raises(AssertionError):
        process_caption("{x|y}", CaptionOptions(enable_wildcard=True), tc._NoDrawRandom())
    assert process_caption("a, b", CaptionOptions(caption_prefix="p", keep_tokens=1), tc._NoDrawRandom()) == "p a, b"


# -- live captions -------------------------------------------------------------------------------


def test_random_caption_options_make_images_live(clip, store, tmp_path):
    root = tmp_path / "kohya"
    _make_folder(root / "1_fixed", {"f1.png": "fixed one", "f2.png": "fixed two"})
    _make_folder(root / "1_random", {"r1.png": "x, y, z", "r2.png": "u, v, w"})
    scan = scan_folder(root)
    options = {0: CaptionOptions(), 1: CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=0.1)}
    part = bucket_images(scan, _settings(), 1, options)
    ds = training_dataset([part], [scan])
    with Calls() as calls:
        cache = TextCache.build(ds, clip, store=store)
    assert calls.n == 2
    live = sorted(k.rsplit("/", 1)[-1] for k in cache.live_keys)
    assert live == ["r1.png", "r2.png"]
    r1 = next(img for img in ds.images if img.key.endswith("r1.png"))
    assert cache.is_live(r1) and not cache.is_live(next(img for img in ds.images if img.key.endswith("f1.png")))
    with pytest.raises(LiveCaptionError, match="encode_caption_live"):
        cache.encoding(r1)
    text = cache.report_text()
    assert "live: 2 images" in text and "shuffle_caption" in text and "caption_tag_dropout_rate" in text
    assert cache.report_json()["live_images"] == 2


@pytest.mark.parametrize("token_length", [COMFYUI_CHUNKING, None], ids=["comfyui", "kohya-default"])
def test_encode_caption_live_matches_clip_text_encode(clip, token_length):
    """A short caption: ComfyUI's chunking and kohya's default layout give CLIPTextEncode's numbers."""
    with Calls() as calls:
        context, pooled = encode_caption_live(clip, "z, (y:2), x", token_length)
    assert calls.n == 1
    ref_c, ref_p = _direct(clip, "z, (y:2), x")
    assert torch.equal(context, ref_c) and torch.equal(pooled, ref_p)
    assert not context.is_inference() and not context.requires_grad  # usable in the training graph


def _comfy_content_tokens(clip, text):
    """The caption's tokens per encoder from ComfyUI's own tokenizer (its chunks joined, BOS/EOS/padding dropped)."""
    out = {}
    for key, chunks in clip.tokenize(escape_for_comfy_tokenizer(text)).items():
        end = clip.tokenizer.clip_l.end_token
        content = []
        for chunk in chunks:
            ids = [t for t, *_ in chunk]
            stop = ids.index(end, 1)
            content.extend(ids[1:stop])
        out[key] = content
    return out


def test_kohya_default_truncates_long_captions_to_75_tokens(clip, store, folder):
    """kohya's default: BOS + the first 75 tokens + EOS, one row (reference built from ComfyUI's tokenizer by hand);
    shorter captions encode exactly as CLIPTextEncode; the report names the truncated caption and the count."""
    ds = _dataset(folder)
    cache = TextCache.build(ds, clip, store=store)
    assert cache.token_length == TokenLength()
    content = _comfy_content_tokens(clip, LONG)
    assert len(content["l"]) > 75 and content["l"] == content["g"]
    end = clip.tokenizer.clip_l.end_token
    bos = clip.tokenizer.clip_l.start_token
    row_l = [bos, *content["l"][:75], end]
    row_g = [bos, *content["g"][:75], end]
    with torch.inference_mode():
        ref_c, ref_p = clip.encode_from_tokens(
            {"l": [[(t, 1.0) for t in row_l]], "g": [[(t, 1.0) for t in row_g]]}, return_pooled=True
        )
    for i, img in enumerate(ds.images):
        caption = CAPTIONS[img.key.rsplit("/", 1)[-1]]
        context, pooled = cache.encoding(i)
        assert context.shape[0] == 77
        if caption == LONG:
            assert torch.equal(context, ref_c[0]) and torch.equal(pooled, ref_p[0])
        else:
            want_c, want_p = _direct(clip, caption)
            assert torch.equal(context, want_c) and torch.equal(pooled, want_p), caption
    truncated = cache.report_json()["truncated"]
    assert truncated == [{"image": ds.images[3].key, "tokens": len(content["l"]), "cut": len(content["l"]) - 75}]
    text = cache.report_text()
    assert "truncated: 1 captions are longer than 75 tokens" in text
    assert f"{ds.images[3].key}: {len(content['l'])} tokens, {len(content['l']) - 75} cut" in text


def test_token_length_is_part_of_the_key(clip, store, folder):
    """Changing max_token_length re-encodes the long caption AND the short ones (the key says how it was encoded)."""
    TextCache.build(_dataset(folder), clip, store=store)
    with Calls() as calls:
        wide = TextCache.build(_dataset(folder), clip, store=store, token_length=TokenLength(150))
    assert calls.n == 3 and wide.encoding(3)[0].shape[0] == 152 and wide.encoding(0)[0].shape[0] == 152
    assert [(t.limit, t.cut) for t in wide.truncated] == [(150, wide.truncated[0].tokens - 150)]
    with Calls() as calls:
        TextCache.build(_dataset(folder), clip, store=store, token_length=TokenLength(150))
    assert calls.n == 0


# -- re-use and invalidation ---------------------------------------------------------------------


def test_second_build_does_no_clip_work(clip, store, folder):
    first = TextCache.build(_dataset(folder), clip, store=store)
    with Calls() as calls:
        again = TextCache.build(_dataset(folder), clip, store=store)
    assert calls.n == 0 and again.stats.from_memory == 3
    for i in range(len(CAPTIONS)):
        assert torch.equal(again.encoding(i)[0], first.encoding(i)[0])


def test_editing_one_caption_reencodes_only_that_caption(clip, store, folder):
    TextCache.build(_dataset(folder), clip, store=store)
    (folder / "d.txt").write_text("a brand new caption")
    ds = _dataset(folder)
    with Calls() as calls:
        cache = TextCache.build(ds, clip, store=store)
    assert calls.n == 1 and cache.stats.encoded == 1 and cache.stats.from_memory == 2
    d = next(i for i, img in enumerate(ds.images) if img.key.endswith("d.png"))
    assert torch.equal(cache.encoding(d)[0], _direct(clip, "a brand new caption")[0])


def test_image_edits_do_not_reencode_captions(clip, store, folder):
    TextCache.build(_dataset(folder), clip, store=store)
    _write_png(folder / "a.png", seed=123)
    with Calls() as calls:
        TextCache.build(_dataset(folder), clip, store=store)
    assert calls.n == 0


def test_other_clip_weights_reencode_everything(clip, store, folder):
    import tiny_sdxl

    TextCache.build(_dataset(folder), clip, store=store)
    other = tiny_sdxl.make_clip(seed=5)
    with Calls() as calls:
        cache = TextCache.build(_dataset(folder), other, store=store)
    assert calls.n == 3
    assert torch.equal(cache.encoding(1)[0], _direct(other, "a dog")[0])
    with Calls() as calls:
        TextCache.build(_dataset(folder), clip, store=store)
    assert calls.n == 0


def test_clip_lora_patches_are_part_of_the_key(fresh_clip, store, folder):
    clip = fresh_clip
    plain = TextCache.build(_dataset(folder), clip, store=store)
    lora = _with_lora(clip, 1.0)
    with Calls() as calls:
        patched = TextCache.build(_dataset(folder), lora, store=store)
    assert calls.n == 3
    ref_c, _ = _direct(lora, "a dog")
    assert torch.equal(patched.encoding(1)[0], ref_c)
    assert not torch.equal(patched.encoding(1)[0], plain.encoding(1)[0])  # the LoRA really changes the output
    with Calls() as calls:  # same LoRA, another clone: a hit
        TextCache.build(_dataset(folder), _with_lora(clip, 1.0), store=store)
    assert calls.n == 0
    with Calls() as calls:  # another strength: other inputs
        TextCache.build(_dataset(folder), _with_lora(clip, 0.5), store=store)
    assert calls.n == 3
    with Calls() as calls:  # another LoRA file with the same keys
        TextCache.build(_dataset(folder), _with_lora(clip, 1.0, seed=1), store=store)
    assert calls.n == 3
    with Calls() as calls:  # the unpatched CLIP is still cached and its key was not changed by the patching
        again = TextCache.build(_dataset(folder), clip, store=store)
    assert calls.n == 0 and torch.equal(again.encoding(1)[0], plain.encoding(1)[0])


def test_weight_fingerprint_ignores_in_place_patching(fresh_clip):
    """ComfyUI patches LoRA weights into the shared module in place; the fingerprint uses the originals."""
    import tiny_sdxl

    clip = fresh_clip
    base = fingerprints.tensors_fingerprint(comfy_encoders.clip_weights(tiny_sdxl.make_clip(seed=1)))
    lora = _with_lora(clip)
    _direct(lora, "a dog")  # loads the LoRA clone: its weights are now patched into the module
    key = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    live = dict(clip.cond_stage_model.named_parameters())[key]
    original = dict(tiny_sdxl.make_clip(seed=1).cond_stage_model.named_parameters())[key]
    assert not torch.equal(live, original)  # really patched in place right now
    assert fingerprints.tensors_fingerprint(comfy_encoders.clip_weights(clip)) == base
    assert fingerprints.tensors_fingerprint(comfy_encoders.clip_weights(lora)) == base


def test_clip_set_last_layer_is_part_of_the_key(clip, store, folder):
    TextCache.build(_dataset(folder), clip, store=store)
    last = clip.clone()
    last.clip_layer(-1)
    with Calls() as calls:
        cache = TextCache.build(_dataset(folder), last, store=store)
    assert calls.n == 3
    assert torch.equal(cache.encoding(1)[0], _direct(last, "a dog")[0])


def test_clip_fingerprint_is_memoised_per_model_object(clip):
    fp = tc.clip_fingerprint(clip)
    n = dict(fingerprints.FINGERPRINT_COMPUTATIONS)
    assert tc.clip_fingerprint(clip) == fp and tc.clip_fingerprint(clip.clone()) == fp
    assert fingerprints.FINGERPRINT_COMPUTATIONS["modules"] == n["modules"]


# -- disk ----------------------------------------------------------------------------------------


def test_disk_cache_survives_a_restart(clip, folder, tmp_path):
    disk = tmp_path / "text_cache"
    first = TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=MemoryStore(64))
    assert len(list(disk.glob("*.safetensors"))) == 3
    with Calls() as calls:
        again = TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=MemoryStore(64))
    assert calls.n == 0 and again.stats.from_disk == 3 and again.warnings == []
    for i in range(len(CAPTIONS)):
        assert torch.equal(again.encoding(i)[0], first.encoding(i)[0])
        assert torch.equal(again.encoding(i)[1], first.encoding(i)[1])


def test_turning_disk_caching_on_writes_memory_hits_through_to_disk(clip, store, folder, tmp_path, monkeypatch):
    from sdxl_lora_trainer.trainer.cache import stores

    disk = tmp_path / "text_cache"
    first = TextCache.build(_dataset(folder), clip, store=store)  # memory only
    with Calls() as calls:  # the same process, now with the disk cache on
        on = TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=store)
    assert calls.n == 0 and on.stats.from_memory == 3 and on.warnings == []
    assert len(list(disk.glob("*.safetensors"))) == 3
    with Calls() as calls:  # a restart: empty memory store, same folder
        again = TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=MemoryStore(64))
    assert calls.n == 0 and again.stats.from_disk == 3 and again.warnings == []
    for i in range(len(CAPTIONS)):
        assert torch.equal(again.encoding(i)[0], first.encoding(i)[0])
        assert torch.equal(again.encoding(i)[1], first.encoding(i)[1])
    writes = []
    monkeypatch.setattr(stores.DiskStore, "write", lambda self, key, *a, **k: writes.append(key))
    TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=store)
    assert writes == []  # a memory hit the disk already holds is not written again


def test_corrupted_disk_file_is_rebuilt_with_a_warning(clip, folder, tmp_path):
    disk = tmp_path / "text_cache"
    first = TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=MemoryStore(64))
    bad = disk / f"{first.cache_key(0)}.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0x01
    bad.write_bytes(bytes(data))
    short = disk / f"{first.cache_key(3)}.safetensors"
    short.write_bytes(short.read_bytes()[:100])
    with Calls() as calls:
        cache = TextCache.build(_dataset(folder), clip, disk_dir=str(disk), store=MemoryStore(64))
    assert calls.n == 2 and cache.stats.rebuilt == 2 and cache.stats.from_disk == 1
    assert any(str(bad) in w and "checksum" in w for w in cache.warnings)
    assert any(str(short) in w for w in cache.warnings)
    assert "rebuilt 2" in cache.report_text()
    for i in range(len(CAPTIONS)):
        assert torch.equal(cache.encoding(i)[0], first.encoding(i)[0])


def test_nan_text_encoding_is_an_error(store, folder, monkeypatch):
    import tiny_sdxl

    clip = tiny_sdxl.make_clip(seed=1)
    nan = (torch.full((1, 77, 64), float("nan")), torch.zeros(1, 32))
    monkeypatch.setattr(comfy_encoders, "encode_text", lambda c, t: nan)  # ComfyUI chunking
    monkeypatch.setattr(comfy_encoders, "encode_token_rows", lambda c, rows: nan)  # kohya's layouts
    for token_length in (COMFYUI_CHUNKING, TokenLength()):
        with pytest.raises(tc.TextEncodingError, match="NaN"):
            TextCache.build(_dataset(folder), clip, store=store, token_length=token_length)


def test_report_and_size(clip, store, folder):
    cache = TextCache.build(_dataset(folder), clip, store=store)
    long_rows = cache.encoding(3)[0].shape[0]
    assert cache.size_bytes == ((77 + 77 + long_rows) * 64 + 3 * 32) * 4
    text = cache.report_text()
    assert "4 of 4 images cached, 3 unique captions" in text and "MB" in text and "live" not in text
