"""The run's settings: each value lives once, widget zeros mean "the run's value", bad numbers fail at once."""

from __future__ import annotations

import dataclasses

import pytest

from sdxl_lora_trainer.trainer.network.config import PartSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings


@pytest.mark.parametrize("field", ["learning_rate", "max_grad_norm"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True])
def test_run_numbers_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_parts_take_the_run_values_they_do_not_set():
    config = TrainConfig(
        learning_rate=1e-4,
        loraplus_lr_ratio=16,
        unet=PartSettings(learning_rate=3e-4),
        clip_g=PartSettings(loraplus_lr_ratio=4),
    )
    assert config.part_settings() == {
        "unet": PartSettings(3e-4, 16),
        "clip_l": PartSettings(1e-4, 16),
        "clip_g": PartSettings(1e-4, 4),
    }
    assert TrainConfig(learning_rate=2e-4).part_settings()["clip_l"] == PartSettings(2e-4, None)


def test_zero_has_the_meaning_kohya_gives_it():
    # a part lr of 0 trains nothing of the part (kohya drops the group); a LoRA+ ratio of 0 is no ratio (kohya's `or`)
    assert PartSettings(learning_rate=0.0).with_run_defaults(1e-4, None).learning_rate == 0.0
    assert PartSettings(loraplus_lr_ratio=0).loraplus_lr_ratio is None
    assert TrainConfig(loraplus_lr_ratio=0).loraplus_lr_ratio is None
    assert TrainConfig(unet=PartSettings(loraplus_lr_ratio=0), loraplus_lr_ratio=8).part_settings()["unet"] == (
        PartSettings(1e-4, 8)
    )


def test_widget_zero_means_the_run_value():
    # the train node's unet_lr / clip_l_lr / clip_g_lr widgets cannot be empty: 0 there is "use learning_rate"
    assert PartSettings.from_widgets(learning_rate=0.0) == PartSettings()
    assert PartSettings.from_widgets(learning_rate=5e-5, loraplus_lr_ratio=0.0) == PartSettings(5e-5, None)


@pytest.mark.parametrize("kwargs", [{"learning_rate": -1e-4}, {"loraplus_lr_ratio": float("nan")}])
def test_part_numbers_are_checked(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PartSettings(**kwargs)


def test_no_setting_is_stored_twice():
    # the optimizer settings carry the choice of optimizer only; the lr and the clipping are the run's
    assert {f.name for f in dataclasses.fields(OptimizerSettings)} == {"optimizer_type", "optimizer_args"}
    assert {f.name for f in dataclasses.fields(PartSettings)} == {"learning_rate", "loraplus_lr_ratio"}
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not run_fields & {"unet_lr", "text_encoder_lr1", "text_encoder_lr2", "loraplus_unet_lr_ratio"}


def test_network_node_loraplus_replaces_only_the_ratios_it_sets():
    from sdxl_lora_trainer.trainer.network.config import LoraPlusRatios

    base = TrainConfig(learning_rate=1e-4, loraplus_lr_ratio=4, clip_l=PartSettings(loraplus_lr_ratio=2))
    assert base.with_loraplus(LoraPlusRatios(0, 0, 0)) is base  # 0 = not set on the Network node
    parts = base.with_loraplus(LoraPlusRatios(16)).part_settings()
    assert [parts[p].loraplus_lr_ratio for p in ("unet", "clip_l", "clip_g")] == [16, 2, 16]
    parts = base.with_loraplus(LoraPlusRatios(None, 8, 3)).part_settings()
    assert [parts[p].loraplus_lr_ratio for p in ("unet", "clip_l", "clip_g")] == [8, 3, 3]
    with pytest.raises(ValueError, match="loraplus_unet_lr_ratio"):
        LoraPlusRatios(None, -1.0)


def test_token_length_comes_from_the_text_cache_and_must_agree_with_the_run():
    from sdxl_lora_trainer.trainer.data.token_length import TokenLength

    assert TrainConfig().resolve_token_length(None) == TokenLength()  # kohya's default
    assert TrainConfig().resolve_token_length(TokenLength(150)) == TokenLength(150)  # Cache Text's choice
    assert TrainConfig(token_length=TokenLength(225)).resolve_token_length(None) == TokenLength(225)  # live captions
    assert TrainConfig(token_length=TokenLength(225)).resolve_token_length(TokenLength(225)) == TokenLength(225)
    with pytest.raises(ValueError, match="encoded with max_token_length ComfyUI chunking.*set max_token_length to 75"):
        TrainConfig(token_length=TokenLength()).resolve_token_length(TokenLength(comfyui_chunking=True))


def test_every_trained_part_at_learning_rate_0_is_named():
    """learning_rate 0 and no per-part rate: the message names every input that would have to change."""
    zero = TrainConfig(learning_rate=0.0)
    assert zero.zero_learning_rate_error() == (
        "every learning rate is 0 (learning_rate 0, unet_lr 0 (= learning_rate), clip_l_lr 0 (= learning_rate), "
        "clip_g_lr 0 (= learning_rate)), so nothing would train. Set learning_rate above 0 (e.g. 1e-4), or the "
        "learning rate of each part you train."
    )
    te_only_rate = TrainConfig(learning_rate=0.0, clip_l=PartSettings(1e-4))
    assert te_only_rate.zero_learning_rate_error() is None  # CLIP-L would learn
    assert "(learning_rate 0, unet_lr 0 (= learning_rate))" in te_only_rate.zero_learning_rate_error(["unet"])
    explicit = TrainConfig(learning_rate=1e-4, unet=PartSettings(0.0))  # e.g. kohya's unet_lr = 0 imported
    assert "(unet_lr 0)" in explicit.zero_learning_rate_error(["unet"])
    assert TrainConfig(learning_rate=1e-4).zero_learning_rate_error(["unet"]) is None
