"""Caption processing (kohya's process_caption semantics) and the ComfyUI escape, without ComfyUI."""

from __future__ import annotations

import random

import pytest

from sdxl_lora_trainer.trainer.data.captions import CaptionOptions, escape_for_comfy_tokenizer, process_caption

TAGS = [f"tag{i}" for i in range(12)]
CAPTION = ", ".join(TAGS)


def test_plain_caption_is_unchanged():
    rng = random.Random(0)
    assert process_caption("a photo,of  a cat", CaptionOptions(), rng) == "a photo,of  a cat"
    assert rng.random() == random.Random(0).random()  # nothing was drawn


def test_keep_tokens_alone_does_nothing():
    # kohya only splits/rejoins when shuffling, warming up or dropping tags
    opts = CaptionOptions(keep_tokens=2)
    assert process_caption("a,b ,  c", opts, random.Random(1)) == "a,b ,  c"


def test_shuffle_is_deterministic_per_seed():
    opts = CaptionOptions(shuffle_caption=True)
    outs = [process_caption(CAPTION, opts, random.Random(s)) for s in range(20)]
    assert outs == [process_caption(CAPTION, opts, random.Random(s)) for s in range(20)]
    assert len(set(outs)) > 15
    for out in outs:
        assert sorted(out.split(", ")) == sorted(TAGS)


def test_shuffle_exact_for_fixed_seed():
    opts = CaptionOptions(shuffle_caption=True)
    expected = TAGS[:]
    random.Random(42).shuffle(expected)  # the one draw sequence kohya makes: shuffle(flex tags)
    assert process_caption(CAPTION, opts, random.Random(42)) == ", ".join(expected)


def test_keep_tokens_fixed_prefix():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=3)
    for seed in range(50):
        out = process_caption(CAPTION, opts, random.Random(seed)).split(", ")
        assert out[:3] == TAGS[:3]
        assert sorted(out[3:]) == sorted(TAGS[3:])


def test_keep_tokens_separator_with_fixed_suffix():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    caption = "sks, person ||| red, blue, green, ,yellow ||| masterpiece, best"
    seen = set()
    for seed in range(40):
        out = process_caption(caption, opts, random.Random(seed)).split(", ")
        assert out[:2] == ["sks", "person"]  # the separator wins over keep_tokens
        assert out[-2:] == ["masterpiece", "best"]
        assert sorted(out[2:-2]) == ["blue", "green", "red", "yellow"]  # empty tags dropped here
        seen.add(tuple(out[2:-2]))
    assert len(seen) > 5


def test_empty_tags_are_kept_without_keep_tokens_separator():
    out = process_caption("a,,b", CaptionOptions(shuffle_caption=True), random.Random(3))
    assert sorted(out.split(", ")) == ["", "a", "b"]


def test_custom_separator_rejoins_with_comma_space():
    out = process_caption("x; y; z", CaptionOptions(shuffle_caption=True, caption_separator=";"), random.Random(0))
    assert sorted(out.split(", ")) == ["x", "y", "z"]


def test_secondary_separator_glues_after_shuffle():
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(20):
        out = process_caption("a;;;b, c, d", opts, random.Random(seed))
        assert "a,b" in out
        assert sorted(out.split(", ")) == ["a,b", "c", "d"]


def test_prefix_suffix():
    opts = CaptionOptions(caption_prefix="sks", caption_suffix="style")
    assert process_caption("a cat", opts, random.Random(0)) == "sks a cat style"
    # with shuffling the prefix is glued to the first tag and kept by keep_tokens=1
    opts = CaptionOptions(caption_prefix="sks", shuffle_caption=True, keep_tokens=1)
    for seed in range(10):
        assert process_caption(CAPTION, opts, random.Random(seed)).startswith("sks tag0, ")


def test_first_line_only_without_wildcards():
    assert process_caption("line one\nline two", CaptionOptions(), random.Random(0)) == "line one"


def test_wildcards_exact():
    opts = CaptionOptions(enable_wildcard=True)
    for seed in range(10):
        ref = random.Random(seed)
        line = ref.choice(["{red|blue} {{x}}", "{cat|dog|fox}"])
        if line.startswith("{red"):
            expected = ref.choice(["red", "blue"]) + " {x}"
        else:
            expected = ref.choice(["cat", "dog", "fox"])
        assert process_caption("{red|blue} {{x}}\n{cat|dog|fox}", opts, random.Random(seed)) == expected


# ------------------------------------------------------------------------------------------------------- dropout


def test_caption_dropout_exact_for_seed():
    rate = 0.3
    opts = CaptionOptions(caption_dropout_rate=rate)
    rng, ref = random.Random(1234), random.Random(1234)
    dropped = 0
    for _ in range(200):
        out = process_caption("a cat", opts, rng)
        expected = "" if ref.random() < rate else "a cat"  # one draw per caption, dropped when < rate
        assert out == expected
        dropped += out == ""
    assert 0 < dropped < 200


def test_caption_dropout_drops_prefix_too():
    opts = CaptionOptions(caption_dropout_rate=1.0, caption_prefix="sks")
    assert process_caption("a cat", opts, random.Random(0)) == ""


def test_caption_dropout_statistics():
    rate, n = 0.25, 20000
    opts = CaptionOptions(caption_dropout_rate=rate)
    rng = random.Random(7)
    frac = sum(process_caption("a cat", opts, rng) == "" for _ in range(n)) / n
    sigma = (rate * (1 - rate) / n) ** 0.5
    assert abs(frac - rate) < 4 * sigma


def test_caption_dropout_every_n_epochs():
    opts = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert process_caption("a cat", opts, random.Random(0), epoch=3) == ""
    assert process_caption("a cat", opts, random.Random(0), epoch=6) == ""
    assert process_caption("a cat", opts, random.Random(0), epoch=4) == "a cat"


def test_tag_dropout_exact_for_seed():
    rate = 0.4
    opts = CaptionOptions(caption_tag_dropout_rate=rate, keep_tokens=2)
    rng, ref = random.Random(99), random.Random(99)
    for _ in range(50):
        out = process_caption(CAPTION, opts, rng)
        kept = [t for t in TAGS[2:] if ref.random() >= rate]  # one draw per flexible tag, in order
        assert out == ", ".join(TAGS[:2] + kept)


def test_shuffle_then_tag_dropout_exact_for_seed():
    rate = 0.5
    opts = CaptionOptions(shuffle_caption=True, caption_tag_dropout_rate=rate, caption_dropout_rate=0.1, keep_tokens=1)
    rng, ref = random.Random(5), random.Random(5)
    for _ in range(50):
        out = process_caption(CAPTION, opts, rng)
        if ref.random() < 0.1:  # caption dropout first
            assert out == ""
            continue
        flex = TAGS[1:]
        ref.shuffle(flex)  # then the shuffle
        flex = [t for t in flex if ref.random() >= rate]  # then one draw per tag
        assert out == ", ".join(TAGS[:1] + flex)


def test_tag_dropout_statistics():
    rate, n = 0.3, 3000
    opts = CaptionOptions(caption_tag_dropout_rate=rate)
    rng = random.Random(11)
    kept = sum(len([t for t in process_caption(CAPTION, opts, rng).split(", ") if t]) for _ in range(n))
    total = n * len(TAGS)
    sigma = (rate * (1 - rate) / total) ** 0.5
    assert abs((1 - kept / total) - rate) < 4 * sigma


def test_token_warmup():
    opts = CaptionOptions(token_warmup_step=10, token_warmup_min=1)
    assert process_caption(CAPTION, opts, random.Random(0), step=0) == "tag0"
    # floor(5 * (12 - 1) / 10) + 1 = 6 tags at step 5
    assert process_caption(CAPTION, opts, random.Random(0), step=5) == ", ".join(TAGS[:6])
    assert process_caption(CAPTION, opts, random.Random(0), step=10) == CAPTION
    # a fraction of max_train_steps
    frac = CaptionOptions(token_warmup_step=0.5, token_warmup_min=2)
    assert process_caption(CAPTION, frac, random.Random(0), step=0, max_train_steps=20) == "tag0, tag1"


def test_private_rng_only():
    random.seed(0)
    state = random.getstate()
    opts = CaptionOptions(shuffle_caption=True, caption_dropout_rate=0.2, caption_tag_dropout_rate=0.2)
    for seed in range(20):
        process_caption(CAPTION, opts, random.Random(seed))
    assert random.getstate() == state


def test_option_validation():
    with pytest.raises(ValueError):
        CaptionOptions(caption_dropout_rate=1.5)
    with pytest.raises(ValueError):
        CaptionOptions(caption_tag_dropout_rate=-0.1)
    with pytest.raises(ValueError):
        CaptionOptions(caption_separator="")


# -------------------------------------------------------------------------------------------------------- escape


@pytest.mark.parametrize(
    "text,escaped",
    [
        ("a (red:1.3) car", "a \\(red:1.3\\) car"),
        ("smile :)", "smile :\\)"),
        ("back\\slash", "back\\slash"),  # ComfyUI has no backslash escape: leave it alone
        ("[x]", "[x]"),
        ("already \\(escaped\\)", "already \\\\(escaped\\\\)"),
        ("plain", "plain"),
    ],
)
def test_escape_for_comfy_tokenizer(text, escaped):
    assert escape_for_comfy_tokenizer(text) == escaped
