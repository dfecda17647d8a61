"""optimizer_args are checked against the chosen optimizer's constructor when the settings are made (before any
model is loaded): unknown names and values of the wrong type are refused with the argument, the expected type and
an example, every problem in one message."""

from __future__ import annotations

import pytest

from sdxl_lora_trainer.trainer.run.optimizers import (
    OptimizerConfigError,
    OptimizerSettings,
    optimizer_settings_error,
)


def refusal(optimizer: str, args: str) -> str:
    with pytest.raises(OptimizerConfigError) as info:
        OptimizerSettings(optimizer, args)
    return str(info.value)


def test_text_where_a_number_belongs():
    message = refusal("AdamW", "weight_decay=abc")
    assert "weight_decay='abc' is text" in message
    assert "AdamW (torch.optim.adamw.AdamW) expects a number for weight_decay" in message
    assert "e.g. weight_decay=0.01" in message  # AdamW's own default


def test_a_number_where_betas_belong():
    message = refusal("AdamW", "betas=1")
    assert "betas=1 is a number" in message and "expects 2 numbers for betas" in message
    assert "e.g. betas=0.9,0.999" in message


def test_wrong_tuple_length_and_non_numbers_in_it():
    assert "expects 2 numbers for betas" in refusal("AdamW", "betas=0.9,0.99,0.999")
    assert "expects 2 numbers for betas" in refusal("AdamW", "betas=(0.9, 'x')")
    assert "expects 2 or 3 numbers for betas" in refusal("CAME", "betas=0.9")  # pytorch-optimizer's Betas


def test_bool_arguments_take_only_booleans():
    message = refusal("Prodigy", "decouple=2")
    assert "decouple=2 is a number" in message and "expects True or False for decouple" in message
    assert "e.g. decouple=True" in message


def test_whole_number_arguments():
    message = refusal("AdamWScheduleFree", "warmup_steps=2.5")
    assert "expects a whole number for warmup_steps" in message and "e.g. warmup_steps=0" in message


def test_string_annotations_are_read(monkeypatch):
    # lion-pytorch writes its annotations as strings ('float')
    pytest.importorskip("lion_pytorch")
    assert "expects a number for weight_decay" in refusal("Lion", "weight_decay='x'")


def test_unknown_argument_lists_the_real_ones():
    message = refusal("AdamW", "bogus_arg=1")
    assert "has no argument 'bogus_arg'" in message and "weight_decay" in message and "betas" in message


def test_unknown_argument_of_a_kwargs_optimizer_is_not_ignored():
    # pytorch-optimizer's constructors take **kwargs and would silently drop a misspelt name
    assert "CAME (pytorch_optimizer.optimizer.came.CAME) has no argument 'weight_decy'" in refusal(
        "CAME", "weight_decy=0.1"
    )


def test_every_problem_in_one_message():
    message = refusal("AdamW", "weight_decay=abc betas=1 nope=3")
    assert "weight_decay='abc'" in message and "betas=1" in message and "'nope'" in message


def test_a_function_argument_cannot_be_set():
    assert "cannot get from optimizer_args" in refusal("ADOPT", "clip_lambda=1")


@pytest.mark.parametrize(
    "optimizer,args",
    [
        ("AdamW", "weight_decay=0.1 betas=0.9,0.99 eps=1e-6 amsgrad=True"),
        ("AdamW", "weight_decay=0"),  # an int where a float is annotated
        ("Prodigy", "d_coef=2 decouple=False beta3=None growth_rate=inf safeguard_warmup=True"),
        ("Adafactor", "relative_step=False scale_parameter=False warmup_init=False beta1=0.9"),
        ("AdamWScheduleFree", "warmup_steps=10 betas=(0.9, 0.99)"),
        ("CAME", "betas=(0.9, 0.999, 0.9999) weight_decay=0.01"),
        ("CAME", "betas=0.9,0.999"),
        ("ADOPT", "weight_decouple=True"),
        ("AdEMAMix", "alpha=5 t_alpha_beta3=1000"),
        ("ProdigyPlusScheduleFree", "d_coef=2.0 use_adopt=True prodigy_steps=100 beta3=None"),
        ("DAdaptAdam", "decouple=True weight_decay=0.01 growth_rate=1.02"),
    ],
)
def test_good_arguments_pass(optimizer, args):
    OptimizerSettings(optimizer, args)
    assert optimizer_settings_error(optimizer, args) is None


def test_queue_time_message_helper():
    assert "weight_decay='abc'" in optimizer_settings_error("AdamW", "weight_decay=abc")
    assert "unknown optimizer_type" in optimizer_settings_error("Adam9000", "")
