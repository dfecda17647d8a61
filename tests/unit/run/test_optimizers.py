"""Optimizer / lr-scheduler construction with kohya's semantics (train_util.get_optimizer / get_scheduler_fix).

Scheduler expectations are re-derived here from the documented closed forms (transformers' schedule docs, which
kohya uses), not by calling the library's lambdas.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import sys

import pytest
import torch

from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.optimizers import (
    OPTIMIZER_TYPES,
    OptimizerConfigError,
    OptimizerSettings,
    OptimizerUnavailableError,
    averaged_weights,
    build_optimizer,
    canonical_optimizer_type,
    is_schedule_free,
    optimizer_eval_mode,
    optimizer_metadata_name,
    optimizer_train_mode,
    parse_optimizer_args,
    resolve_optimizer_kwargs,
    switch_to_averaged_weights,
    training_point,
)
from sdxl_lora_trainer.trainer.run.resume_state import _scheduler_state, join_optimizer_state, split_optimizer_state
from sdxl_lora_trainer.trainer.run.schedulers import (
    SCHEDULER_TYPES,
    ScheduleFreeDummyScheduler,
    build_scheduler,
    check_schedule,
    resolve_warmup_steps,
)

EIGHT_BIT = ("AdamW8bit", "Lion8bit", "PagedAdamW8bit", "AdEMAMix8bit")
HAS_CUDA_BNB = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def tiny_param(device: str = "cpu") -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]], device=device))


def take_step(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter) -> torch.Tensor:
    """One real step on loss = sum(p^2 * w); returns the parameter before the step."""
    before = param.detach().clone()
    optimizer.zero_grad()
    loss = (param**2 * torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=param.device)).sum()
    loss.backward()
    optimizer.step()
    return before


# --- parse_optimizer_args -----------------------------------------------------------------------------------------


def test_parse_empty():
    assert parse_optimizer_args("") == {}
    assert parse_optimizer_args("  \n ") == {}
    assert parse_optimizer_args(None) == {}


def test_parse_space_separated_literals():
    args = parse_optimizer_args("weight_decay=0.01 betas=(0.9, 0.99) eps=1e-6 decouple=True d0=1")
    assert args == {"weight_decay": 0.01, "betas": (0.9, 0.99), "eps": 1e-6, "decouple": True, "d0": 1}
    assert type(args["d0"]) is int and type(args["eps"]) is float


def test_parse_kohya_comma_tuple_and_comma_separated_pairs():
    # kohya: "betas=0.9,0.999" is literal_eval("0.9,0.999") == (0.9, 0.999); pairs may also be comma separated
    assert parse_optimizer_args("betas=0.9,0.999") == {"betas": (0.9, 0.999)}
    args = parse_optimizer_args("weight_decay=0.05,betas=0.9,0.999,decouple=False")
    assert args == {"weight_decay": 0.05, "betas": (0.9, 0.999), "decouple": False}
    assert parse_optimizer_args("betas=0.9, 0.999 , eps=1e-8") == {"betas": (0.9, 0.999), "eps": 1e-8}


def test_parse_spaces_around_equals_and_newlines():
    assert parse_optimizer_args("weight_decay = 0.1\nscale_parameter=False") == {
        "weight_decay": 0.1,
        "scale_parameter": False,
    }


def test_parse_unquoted_strings_lowercase_bools_inf():
    args = parse_optimizer_args("mode=fast flag=true other=false nothing=none growth_rate=inf name='a b'")
    assert args == {
        "mode": "fast",
        "flag": True,
        "other": False,
        "nothing": None,
        "growth_rate": math.inf,
        "name": "a b",
    }
    assert args["flag"] is True and args["other"] is False


def test_parse_quotes_hide_separators_keys_and_brackets():
    # inside quotes (escapes included) a comma, "key=" or bracket neither splits pairs nor counts as unbalanced
    args = parse_optimizer_args(r"name='x=1, (' note='it\'s b=2' c=[1, (2, 3)]")
    assert args == {"name": "x=1, (", "note": "it's b=2", "c": [1, (2, 3)]}


@pytest.mark.parametrize("text", ["betas=0.9)", "betas=)(", "name='abc", "name='abc\\"])
def test_parse_rejects_close_before_open_and_open_quotes(text):
    with pytest.raises(OptimizerConfigError, match="unbalanced brackets or quotes") as info:
        parse_optimizer_args(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    "text,bad",
    [
        ("weight_decay", "weight_decay"),
        ("foo weight_decay=0.1", "foo"),
        ("=3", "=3"),
        ("betas=(0.9", "betas=(0.9"),
        ("x=@@", "@@"),
        ("a=b=c", "b=c"),
        ("eps=", "eps="),
    ],
)
def test_parse_errors_name_the_token(text, bad):
    with pytest.raises(OptimizerConfigError) as info:
        parse_optimizer_args(text)
    assert repr(bad) in str(info.value)


def test_parse_rejects_duplicates_and_reserved_keys():
    with pytest.raises(OptimizerConfigError, match="'weight_decay' is given twice"):
        parse_optimizer_args("weight_decay=0.1 weight_decay=0.2")
    with pytest.raises(OptimizerConfigError, match="'lr' cannot be set here"):
        parse_optimizer_args("lr=1e-3")


# --- settings -----------------------------------------------------------------------------------------------------


def test_settings_validate_eagerly():
    with pytest.raises(OptimizerConfigError, match="'oops'"):
        OptimizerSettings(optimizer_args="oops")
    with pytest.raises(OptimizerConfigError, match="unknown optimizer_type"):
        OptimizerSettings(optimizer_type="Adam9000")
    settings = OptimizerSettings("adamw8BIT", "weight_decay=0.1")
    assert settings.canonical_type == "AdamW8bit"
    assert settings.kwargs == {"weight_decay": 0.1}
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.optimizer_type = "Lion"  # frozen


def test_unknown_optimizer_lists_choices():
    with pytest.raises(OptimizerConfigError) as info:
        canonical_optimizer_type("SGDNesterovMagic")
    for name in OPTIMIZER_TYPES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "given,expected",
    [
        ("adamw", "AdamW"),
        ("LION", "Lion"),
        ("prodigy", "Prodigy"),
        ("adamwschedulefree", "AdamWScheduleFree"),
        ("ADAFACTOR", "Adafactor"),
        ("pagedadamw8bit", "PagedAdamW8bit"),
        ("lion8BIT", "Lion8bit"),
        ("came", "CAME"),
        ("adopt", "ADOPT"),
        ("ademamix", "AdEMAMix"),
        ("AdEMAMix8BIT", "AdEMAMix8bit"),
        ("prodigyplusschedulefree", "ProdigyPlusScheduleFree"),
        ("dadaptadam", "DAdaptAdam"),
    ],
)
def test_names_are_case_insensitive(given, expected):
    assert canonical_optimizer_type(given) == expected


@pytest.mark.parametrize(
    "given,expected",
    [
        # kohya's --optimizer_type class paths (train_util.get_optimizer imports them)
        ("pytorch_optimizer.CAME", "CAME"),
        ("pytorch_optimizer.ADOPT", "ADOPT"),
        ("pytorch_optimizer.AdEMAMix", "AdEMAMix"),
        ("bitsandbytes.optim.AdEMAMix8bit", "AdEMAMix8bit"),
        ("prodigyplus.ProdigyPlusScheduleFree", "ProdigyPlusScheduleFree"),
        # the full class paths kohya writes into ss_optimizer
        ("pytorch_optimizer.optimizer.came.CAME", "CAME"),
        ("prodigyplus.prodigy_plus_schedulefree.ProdigyPlusScheduleFree", "ProdigyPlusScheduleFree"),
        ("dadaptation.dadapt_adam.DAdaptAdam", "DAdaptAdam"),
        ("torch.optim.adamw.AdamW", "AdamW"),
        ("schedulefree.adamw_schedulefree.AdamWScheduleFree", "AdamWScheduleFree"),
    ],
)
def test_kohya_class_paths_are_understood(given, expected):
    assert canonical_optimizer_type(given) == expected


def test_class_path_from_another_package_is_refused():
    with pytest.raises(OptimizerConfigError, match="unknown optimizer_type"):
        canonical_optimizer_type("torch.optim.CAME")


# --- each optimizer constructs, steps, and receives its args ----------------------------------------------------


def test_adamw_args_reach_param_groups_and_step():
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("AdamW", "weight_decay=0.123 betas=0.8,0.95 eps=1e-6"), 1e-3)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3
    assert group["weight_decay"] == 0.123  # torch default is 0.01
    assert group["betas"] == (0.8, 0.95)
    assert group["eps"] == 1e-6
    before = take_step(opt, p)
    assert not torch.equal(before, p.detach())


def test_adamw_per_group_lrs_are_kept_and_caller_dicts_untouched():
    a, b = tiny_param(), tiny_param()
    groups = [{"params": [a], "lr": 1e-4}, {"params": [b]}]
    opt = build_optimizer(groups, OptimizerSettings("AdamW"), 3e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 3e-4]
    assert groups == [{"params": [a], "lr": 1e-4}, {"params": [b]}]


def test_unknown_kwarg_is_a_clear_error():
    with pytest.raises(OptimizerConfigError, match="bogus_arg"):
        build_optimizer([tiny_param()], OptimizerSettings("AdamW", "bogus_arg=1"), 1e-3)


def test_empty_params_rejected():
    with pytest.raises(OptimizerConfigError, match="no trainable parameters"):
        build_optimizer([], OptimizerSettings("AdamW"), 1e-4)


def test_lion_is_sign_update_with_args():
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="pip install lion-pytorch")
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("lion", "betas=(0.95, 0.98) weight_decay=0.0"), 0.01)
    assert type(opt) is lion_pytorch.Lion
    assert opt.param_groups[0]["betas"] == (0.95, 0.98)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    before = take_step(opt, p)
    # first Lion step from a zero momentum: p - lr * sign(grad); grad = 2 * p * w has p's sign
    torch.testing.assert_close(p.detach(), before - 0.01 * torch.sign(before), rtol=0, atol=0)


def test_lion_weight_decay_reaches_optimizer():
    pytest.importorskip("lion_pytorch", reason="pip install lion-pytorch")
    opt = build_optimizer([tiny_param()], OptimizerSettings("Lion", "weight_decay=0.25"), 1e-4)
    assert opt.param_groups[0]["weight_decay"] == 0.25  # lion default is 0.0


def test_prodigy_args_and_step():
    prodigyopt = pytest.importorskip("prodigyopt", reason="pip install prodigyopt")
    p = tiny_param()
    opt = build_optimizer(
        [p],
        OptimizerSettings(
            "Prodigy", "d_coef=2.0 weight_decay=0.01 decouple=False use_bias_correction=True safeguard_warmup=True"
        ),
        1.0,
    )
    assert type(opt) is prodigyopt.Prodigy
    group = opt.param_groups[0]
    assert group["lr"] == 1.0
    assert group["d_coef"] == 2.0
    assert group["weight_decay"] == 0.01
    assert group["decouple"] is False
    assert group["use_bias_correction"] is True and group["safeguard_warmup"] is True
    before = take_step(opt, p)
    assert not torch.equal(before, p.detach())


def test_adamw_schedulefree_train_eval_and_args():
    schedulefree = pytest.importorskip("schedulefree", reason="pip install schedulefree")
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("AdamWScheduleFree", "warmup_steps=3 betas=(0.85, 0.99)"), 0.05)
    assert type(opt) is schedulefree.AdamWScheduleFree
    assert is_schedule_free(opt)
    group = opt.param_groups[0]
    assert group["warmup_steps"] == 3 and group["betas"] == (0.85, 0.99)
    assert group["train_mode"] is True  # put in train mode at construction: step() works straight away
    for _ in range(3):
        take_step(opt, p)
    y = p.detach().clone()
    optimizer_eval_mode(opt)
    assert opt.param_groups[0]["train_mode"] is False
    x = p.detach().clone()
    assert not torch.equal(x, y)  # eval swaps in the averaged weights (what must be saved)
    optimizer_train_mode(opt)
    assert opt.param_groups[0]["train_mode"] is True
    torch.testing.assert_close(p.detach(), y, rtol=1e-6, atol=1e-7)
    take_step(opt, p)


def test_mode_helpers_are_noops_for_plain_optimizers():
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("AdamW"), 1e-3)
    assert not is_schedule_free(opt)
    before = p.detach().clone()
    optimizer_eval_mode(opt)
    optimizer_train_mode(opt)
    assert torch.equal(before, p.detach())


def test_adafactor_default_is_relative_step_with_lr_none():
    from transformers.optimization import Adafactor, AdafactorSchedule

    p = torch.nn.Parameter(torch.full((2, 3), 2.0))
    groups = [{"params": [p], "lr": 5e-4}]
    settings = OptimizerSettings("Adafactor")
    opt = build_optimizer(groups, settings, 1e-3)
    assert type(opt) is Adafactor
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert opt.param_groups[0]["lr"] is None  # kohya drops per-group lrs for relative_step
    assert groups[0]["lr"] == 5e-4  # caller's dict untouched
    assert resolve_optimizer_kwargs(settings) == {"relative_step": True}

    sched = build_scheduler(opt, "cosine", 100, 0, initial_lr=1e-3)  # kohya forces AdafactorSchedule
    assert type(sched) is AdafactorSchedule
    assert sched.get_last_lr() == [1e-3]
    opt.zero_grad()
    (p**2).sum().backward()
    opt.step()
    sched.step()
    # Adafactor step size: min(1e-2, 1/sqrt(step)) * max(eps2=1e-3, RMS(p before the step)); RMS(all 2.0) = 2
    assert sched.get_last_lr() == pytest.approx([1e-2 * 2.0], rel=1e-6)
    assert not torch.equal(p.detach(), torch.full((2, 3), 2.0))


def test_adafactor_warmup_init_forces_relative_step():
    opt = build_optimizer([tiny_param()], OptimizerSettings("Adafactor", "relative_step=False warmup_init=True"), 0.0)
    assert opt.defaults["relative_step"] is True and opt.defaults["warmup_init"] is True
    assert opt.defaults["lr"] is None


def test_adafactor_manual_lr_path():
    from transformers.optimization import Adafactor, AdafactorSchedule

    p = tiny_param()
    opt = build_optimizer(
        [p], OptimizerSettings("Adafactor", "relative_step=False scale_parameter=False warmup_init=False"), 2e-4
    )
    assert type(opt) is Adafactor
    assert opt.param_groups[0]["lr"] == 2e-4
    assert opt.defaults["relative_step"] is False and opt.defaults["scale_parameter"] is False
    sched = build_scheduler(opt, "constant_with_warmup", 100, 10)
    assert type(sched) is not AdafactorSchedule
    assert sched.get_last_lr() == [0.0]
    before = take_step(opt, p)
    assert torch.equal(before, p.detach())  # warmup step 0: lr is 0, so the manual lr is really in use
    sched.step()
    assert sched.get_last_lr() == pytest.approx([2e-4 * 1 / 10], rel=1e-12)
    before = take_step(opt, p)
    assert not torch.equal(before, p.detach())


def test_adafactor_manual_lr_advises_against_clipping(caplog):
    manual = OptimizerSettings("Adafactor", "relative_step=False scale_parameter=False warmup_init=False")
    with caplog.at_level("WARNING"):
        build_optimizer([tiny_param()], manual, 2e-4, max_grad_norm=0.0)
    assert "max_grad_norm" not in caplog.text
    with caplog.at_level("WARNING"):
        build_optimizer([tiny_param()], manual, 2e-4, max_grad_norm=1.0)
    assert "Adafactor: max_grad_norm is set" in caplog.text


def test_adafactor_schedule_rejects_warmup_and_wrong_optimizer():
    opt = build_optimizer([tiny_param()], OptimizerSettings("Adafactor"), 1e-3)
    with pytest.raises(OptimizerConfigError, match="warmup steps to 0"):
        build_scheduler(opt, "constant_with_warmup", 100, 10)
    adamw = build_optimizer([tiny_param()], OptimizerSettings("AdamW"), 1e-3)
    with pytest.raises(OptimizerConfigError, match="relative_step=True"):
        build_scheduler(adamw, "adafactor", 100)


# --- the optimizers from pytorch-optimizer, prodigy-plus-schedule-free and dadaptation ---------------------------

#: (name, learning rate, optimizer_args, the class path kohya writes into ss_optimizer)
NEW_OPTIMIZERS = [
    ("CAME", 1e-3, "weight_decay=0.01 betas=(0.9, 0.999, 0.9999)", "pytorch_optimizer.optimizer.came.CAME"),
    ("ADOPT", 1e-3, "weight_decay=0.01 betas=(0.9, 0.9999)", "pytorch_optimizer.optimizer.adopt.ADOPT"),
    ("AdEMAMix", 1e-3, "weight_decay=0.01 alpha=4.0", "pytorch_optimizer.optimizer.ademamix.AdEMAMix"),
    (
        "ProdigyPlusScheduleFree",
        1.0,
        "weight_decay=0.01 d_coef=2.0",
        "prodigyplus.prodigy_plus_schedulefree.ProdigyPlusScheduleFree",
    ),
    ("DAdaptAdam", 1.0, "weight_decay=0.01 decouple=True", "dadaptation.dadapt_adam.DAdaptAdam"),
]


@pytest.mark.parametrize("optimizer_type,lr,args,kohya_class", NEW_OPTIMIZERS)
def test_new_optimizers_build_take_args_and_step(optimizer_type, lr, args, kohya_class):
    p = tiny_param()
    settings = OptimizerSettings(optimizer_type, args)
    opt = build_optimizer([p], settings, lr)
    assert f"{type(opt).__module__}.{type(opt).__name__}" == kohya_class
    group = opt.param_groups[0]
    assert group["lr"] == lr
    for key, value in settings.kwargs.items():
        assert group[key] == value, key
    for _ in range(3):
        before = take_step(opt, p)
    assert not torch.equal(before, p.detach())
    assert torch.isfinite(p).all()
    # kohya's ss_optimizer: module.Class(k=v,...)
    assert (
        optimizer_metadata_name(opt, settings)
        == kohya_class + "(" + ",".join(f"{k}={v}" for k, v in settings.kwargs.items()) + ")"
    )


def test_prodigy_plus_schedule_free_is_schedule_free():
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("ProdigyPlusScheduleFree"), 1.0)
    assert is_schedule_free(opt)
    assert opt.param_groups[0]["train_mode"] is True


@pytest.mark.parametrize("optimizer_type,lr", [("AdamWScheduleFree", 0.05), ("ProdigyPlusScheduleFree", 1.0)])
def test_averaged_weights_restore_the_training_point_bit_for_bit(optimizer_type, lr):
    p, twin = tiny_param(), tiny_param()
    opt = build_optimizer([p], OptimizerSettings(optimizer_type), lr)
    reference = build_optimizer([twin], OptimizerSettings(optimizer_type), lr)
    for _ in range(3):
        take_step(opt, p)
        take_step(reference, twin)
    y = p.detach().clone()
    with averaged_weights(opt):  # around a preview or an intermediate save
        assert opt.param_groups[0]["train_mode"] is False
        x = p.detach().clone()
        assert not torch.equal(x, y)
    assert opt.param_groups[0]["train_mode"] is True
    assert torch.equal(p.detach(), y)  # the plain train() lerp would not give y back exactly
    for _ in range(2):  # and training goes on exactly as without the switch
        take_step(opt, p)
        take_step(reference, twin)
    assert torch.equal(p.detach(), twin.detach())

    point = switch_to_averaged_weights(opt)  # training over: eval mode for good, the training point kept
    averaged = p.detach().clone()
    assert opt.param_groups[0]["train_mode"] is False and torch.equal(point[0], twin.detach())
    with training_point(opt, point):  # what a resumable state saved after training holds
        assert opt.param_groups[0]["train_mode"] is True
        assert torch.equal(p.detach(), twin.detach())
    assert opt.param_groups[0]["train_mode"] is False
    assert torch.equal(p.detach(), averaged)


def test_mode_switches_are_noops_for_other_optimizers():
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("CAME"), 1e-3)
    take_step(opt, p)
    before = p.detach().clone()
    with averaged_weights(opt):
        assert torch.equal(p.detach(), before)
    assert switch_to_averaged_weights(opt) is None
    with training_point(opt, None):
        pass
    assert torch.equal(p.detach(), before)


def test_group_tensors_of_the_optimizer_state_survive_the_state_files():
    # ProdigyPlusScheduleFree keeps running sums as tensors in its param groups; JSON cannot hold them
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("ProdigyPlusScheduleFree"), 1.0)
    take_step(opt, p)
    state = opt.state_dict()
    assert any(isinstance(v, torch.Tensor) for v in state["param_groups"][0].values())
    tensors, meta = split_optimizer_state(state)
    back = join_optimizer_state(tensors, meta)
    assert back["param_groups"][0].keys() == state["param_groups"][0].keys()
    for key, value in state["param_groups"][0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back["param_groups"][0][key], value)
        else:
            assert back["param_groups"][0][key] == value, key


def test_metadata_name_like_kohya():
    opt = build_optimizer([tiny_param()], OptimizerSettings("AdamW", "weight_decay=0.1 betas=0.9,0.99"), 1e-3)
    name = optimizer_metadata_name(opt, OptimizerSettings("AdamW", "weight_decay=0.1 betas=0.9,0.99"))
    assert name == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99))"
    ada = OptimizerSettings("Adafactor")
    assert optimizer_metadata_name(build_optimizer([tiny_param()], ada, 1e-3), ada) == (
        "transformers.optimization.Adafactor(relative_step=True)"
    )
    plain = OptimizerSettings("AdamW")
    assert optimizer_metadata_name(build_optimizer([tiny_param()], plain, 1e-3), plain) == "torch.optim.adamw.AdamW"


@pytest.mark.parametrize(
    "optimizer_type,module,pip_name",
    [
        ("Lion", "lion_pytorch", "lion-pytorch"),
        ("AdamWScheduleFree", "schedulefree", "schedulefree"),
        ("Prodigy", "prodigyopt", "prodigyopt"),
        ("CAME", "pytorch_optimizer", "pytorch-optimizer"),
        ("ADOPT", "pytorch_optimizer", "pytorch-optimizer"),
        ("AdEMAMix", "pytorch_optimizer", "pytorch-optimizer"),
        ("ProdigyPlusScheduleFree", "prodigyplus", "prodigy-plus-schedule-free"),
        ("DAdaptAdam", "dadaptation", "dadaptation"),
    ],
)
def test_missing_package_says_what_to_install(monkeypatch, optimizer_type, module, pip_name):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(OptimizerUnavailableError) as info:
        build_optimizer([tiny_param()], OptimizerSettings(optimizer_type), 1e-3)
    assert f"pip install {pip_name} into ComfyUI's Python" in str(info.value)
    assert sys.executable in str(info.value)


# --- 8-bit (bitsandbytes, CUDA only) -------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer_type", EIGHT_BIT)
def test_8bit_without_cuda_is_a_clear_error(monkeypatch, optimizer_type):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptimizerUnavailableError) as info:
        build_optimizer([tiny_param()], OptimizerSettings(optimizer_type), 1e-3)
    message = str(info.value)
    assert "needs an NVIDIA GPU with CUDA" in message and "Choose AdamW" in message


@pytest.mark.parametrize("optimizer_type", EIGHT_BIT)
def test_8bit_without_bitsandbytes_is_a_clear_error(monkeypatch, optimizer_type):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(OptimizerUnavailableError) as info:
        build_optimizer([tiny_param()], OptimizerSettings(optimizer_type), 1e-3)
    assert "pip install bitsandbytes into ComfyUI's Python" in str(info.value)


@pytest.mark.skipif(not HAS_CUDA_BNB, reason="8-bit optimizers need CUDA and bitsandbytes (not both present here)")
@pytest.mark.parametrize("optimizer_type", EIGHT_BIT)
def test_8bit_constructs_and_steps_on_cuda(optimizer_type):
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))  # >= 4096 elements so the 8-bit state is used
    betas = (0.85, 0.97, 0.999) if optimizer_type == "AdEMAMix8bit" else (0.85, 0.97)  # AdEMAMix: a slow beta3
    opt = build_optimizer([p], OptimizerSettings(optimizer_type, f"weight_decay=0.07 betas={betas}"), 1e-3)
    assert type(opt) is getattr(bnb.optim, optimizer_type)
    assert opt.param_groups[0]["weight_decay"] == 0.07 and tuple(opt.param_groups[0]["betas"]) == betas
    before = p.detach().clone()
    (p**2).sum().backward()
    opt.step()
    assert not torch.equal(before, p.detach())


# --- warmup ---------------------------------------------------------------------------------------------------------


def test_warmup_ratio_of_max_steps():
    assert resolve_warmup_steps(0.1, 200) == 20
    assert resolve_warmup_steps("10%", 200) == 20
    assert resolve_warmup_steps("0.1", 200) == 20
    assert resolve_warmup_steps(20, 200) == 20
    assert resolve_warmup_steps(20.0, 200) == 20
    assert resolve_warmup_steps(0, 200) == 0
    assert resolve_warmup_steps(0.0, 200) == 0


def test_warmup_ratio_truncates_like_kohya():
    # kohya: int(ratio * num_training_steps); 0.29 * 100 == 28.999999999999996 in floating point
    assert 0.29 * 100 < 29
    assert resolve_warmup_steps(0.29, 100) == 28


@pytest.mark.parametrize("bad", [-1, -0.5, 1.5, True, "abc", float("nan")])
def test_warmup_rejects_bad_values(bad):
    with pytest.raises(OptimizerConfigError):
        resolve_warmup_steps(bad, 100)


# --- scheduler curves vs closed forms -------------------------------------------------------------------------------

BASE_LR = 1e-3
N = 100
W = 10


def lr_curve(name: str, total: int, warmup, **kwargs) -> list[float]:
    """lr seen by optimizer step s (s = 0..total+5), stepping the scheduler once per optimizer step."""
    p = tiny_param()
    opt = torch.optim.SGD([p], lr=BASE_LR)
    sched = build_scheduler(opt, name, total, warmup, **kwargs)
    seen = []
    for _ in range(total + 6):
        seen.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
        opt.step()
        sched.step()
    return seen


def warm(s: int, w: int) -> float:
    return s / max(1, w)


def expect_constant_with_warmup(s, w=W):
    return warm(s, w) if s < w else 1.0


def expect_linear(s, w=W, n=N):
    return warm(s, w) if s < w else max(0.0, (n - s) / max(1, n - w))


def expect_cosine(s, w=W, n=N):
    if s < w:
        return warm(s, w)
    progress = (s - w) / max(1, n - w)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def expect_cosine_restarts(s, cycles, w=W, n=N):
    if s < w:
        return warm(s, w)
    progress = (s - w) / max(1, n - w)
    if progress >= 1.0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def expect_polynomial(s, power, w=W, n=N, lr_end=1e-7):
    if s < w:
        return warm(s, w)
    if s > n:
        return lr_end / BASE_LR
    remaining = 1 - (s - w) / (n - w)
    return ((BASE_LR - lr_end) * remaining**power + lr_end) / BASE_LR


def assert_curve(seen: list[float], factor) -> None:
    for s, lr in enumerate(seen):
        expected = BASE_LR * factor(s)
        assert math.isclose(lr, expected, rel_tol=1e-12, abs_tol=1e-18), (s, lr, expected)


def test_constant():
    seen = lr_curve("constant", N, 0)
    assert seen == [BASE_LR] * len(seen)


def test_constant_rejects_warmup():
    opt = torch.optim.SGD([tiny_param()], lr=BASE_LR)
    with pytest.raises(OptimizerConfigError, match="constant_with_warmup"):
        build_scheduler(opt, "constant", N, 5)


def test_constant_with_warmup():
    seen = lr_curve("constant_with_warmup", N, W)
    assert_curve(seen, expect_constant_with_warmup)
    assert seen[0] == 0.0 and seen[5] == pytest.approx(BASE_LR / 2) and seen[W] == BASE_LR


def test_linear():
    seen = lr_curve("linear", N, W)
    assert_curve(seen, expect_linear)
    assert seen[N] == 0.0 and seen[55] == pytest.approx(BASE_LR / 2)


def test_cosine():
    seen = lr_curve("Cosine", N, W)
    assert_curve(seen, expect_cosine)
    assert seen[55] == pytest.approx(BASE_LR / 2) and seen[N] == pytest.approx(0.0, abs=1e-18)


@pytest.mark.parametrize("cycles", [1, 3])
def test_cosine_with_restarts(cycles):
    seen = lr_curve("cosine_with_restarts", N, W, num_cycles=cycles)
    assert_curve(seen, lambda s: expect_cosine_restarts(s, cycles))
    if cycles == 3:
        assert seen[W + 30] == BASE_LR  # second cycle restarts at the full lr
        assert seen[W + 29] < 0.01 * BASE_LR


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_polynomial(power):
    seen = lr_curve("polynomial", N, W, power=power)
    assert_curve(seen, lambda s: expect_polynomial(s, power))
    assert seen[N] == pytest.approx(1e-7, rel=1e-9)


# kohya passes lr_scheduler_num_cycles / 2 to cosine_with_min_lr and warmup_stable_decay: 1 = half a cosine wave
MIN = 0.1


def expect_cosine_with_min_lr(s, m=MIN, w=W, n=N):
    if s < w:
        return warm(s, w)
    progress = (s - w) / max(1, n - w)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - m) + m)


def expect_wsd(s, m=MIN, w=W, decay=20, n=N):
    stable_end = n - decay
    if s < w:
        return warm(s, w) * (1 - m) + m  # transformers' WSD warms up from the min ratio
    if s < stable_end:
        return 1.0
    if s < n:
        progress = (s - stable_end) / decay
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - m) + m
    return m


def expect_rex(s, m=MIN, w=W, n=N):
    if s < w:
        return warm(s, w)
    p = min(1.0, (s - w) / (n - w))
    return m + (1 - m) * (1 - p) / (1 - p / 2)


def test_cosine_with_min_lr():
    seen = lr_curve("cosine_with_min_lr", N, W, min_lr_ratio=MIN)
    assert_curve(seen[: N + 1], expect_cosine_with_min_lr)
    assert seen[N] == pytest.approx(BASE_LR * MIN) and seen[55] == pytest.approx(BASE_LR * (1 + MIN) / 2)


def test_cosine_with_min_lr_zero_is_cosine():
    assert lr_curve("cosine_with_min_lr", N, W)[: N + 1] == pytest.approx(lr_curve("cosine", N, W)[: N + 1])


@pytest.mark.parametrize("decay", [20, 0.2])  # a step count, or a ratio of the training steps
def test_warmup_stable_decay(decay):
    seen = lr_curve("warmup_stable_decay", N, W, min_lr_ratio=MIN, decay_steps=decay)
    assert_curve(seen, expect_wsd)
    assert seen[W : N - 20] == [BASE_LR] * (N - 20 - W)  # the stable part


def test_warmup_stable_decay_shapes_from_scheduler_args():
    seen = lr_curve("warmup_stable_decay", N, 0, decay_steps=20, args="decay_type=linear")
    assert seen[N - 10] == pytest.approx(BASE_LR * 0.5) and seen[N] == 0.0


def test_warmup_stable_decay_needs_decay_steps():
    opt = torch.optim.SGD([tiny_param()], lr=BASE_LR)
    with pytest.raises(OptimizerConfigError, match="needs lr_decay_steps > 0"):
        build_scheduler(opt, "warmup_stable_decay", N, W)
    with pytest.raises(OptimizerConfigError, match="exceed"):
        build_scheduler(opt, "warmup_stable_decay", N, 60, decay_steps=50)


def test_rex():
    seen = lr_curve("rex", N, W, min_lr_ratio=MIN)
    assert_curve(seen, expect_rex)
    # REX's shape: halfway through the decay it is still 2/3 of the way up (linear would be 1/2)
    assert seen[55] == pytest.approx(BASE_LR * (MIN + (1 - MIN) * 2 / 3))
    assert seen[N] == pytest.approx(BASE_LR * MIN)


def test_piecewise_constant_follows_diffusers_rules():
    seen = lr_curve("piecewise_constant", N, 0, args="step_rules='1:10,0.5:40,0.1'")
    expected = [1.0] * 10 + [0.5] * 30 + [0.1] * (N + 6 - 40)
    assert_curve(seen, lambda s: expected[s])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cosine_with_min_lr", {"min_lr_ratio": MIN}),
        ("warmup_stable_decay", {"min_lr_ratio": MIN, "decay_steps": 20}),
        ("rex", {"min_lr_ratio": MIN}),
        ("piecewise_constant", {"args": "step_rules='1:10,0.5:40,0.1'", "warmup": 0}),
    ],
)
def test_new_schedules_resume_from_their_json_state_and_scale_each_group(name, kwargs):
    warmup = kwargs.pop("warmup", W)

    def make():
        a, b = tiny_param(), tiny_param()
        opt = torch.optim.SGD([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 4e-4}], lr=1e-4)
        return opt, build_scheduler(opt, name, N, warmup, **kwargs)

    opt, sched = make()
    for _ in range(33):
        opt.step()
        sched.step()
    saved = json.loads(json.dumps(_scheduler_state(sched.state_dict())))
    opt2, sched2 = make()
    sched2.load_state_dict(saved)
    for _ in range(30):
        for o, sc in ((opt, sched), (opt2, sched2)):
            o.step()
            sc.step()
        assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    ratio = opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"]
    assert ratio == pytest.approx(4.0)  # a factor of each group's own lr


@pytest.mark.parametrize(
    "name,args,decay,ratio,fragment",
    [
        ("piecewise_constant", "", 0, 0.0, "needs lr_scheduler_args step_rules"),
        ("piecewise_constant", "step_rules='1:x,0.1'", 0, 0.0, "factor:step pairs"),
        ("cosine", "step_rules='1:10,0.1'", 0, 0.0, "'step_rules' is not an argument of 'cosine'"),
        ("warmup_stable_decay", "decay_type=square", 10, 0.0, "decay_type='square'"),
        ("cosine", "", 0, 0.1, "lr_scheduler_min_lr_ratio 0.1 is only used by"),
        ("rex", "", 0, 1.5, "from 0 to 1"),
        ("linear", "", 10, 0.0, "lr_decay_steps 10 is only used by warmup_stable_decay"),
        ("exponential", "", 0, 0.0, "unknown lr_scheduler"),
    ],
)
def test_schedule_settings_are_checked_before_training(name, args, decay, ratio, fragment):
    with pytest.raises(OptimizerConfigError, match=re.escape(fragment)):
        check_schedule(name, args, decay, ratio)
    with pytest.raises(OptimizerConfigError, match=re.escape(fragment)):
        TrainConfig(lr_scheduler=name, lr_scheduler_args=args, lr_decay_steps=decay, lr_scheduler_min_lr_ratio=ratio)


def test_warmup_fraction_in_scheduler():
    seen = lr_curve("constant_with_warmup", 200, 0.1)
    assert_curve(seen, lambda s: expect_constant_with_warmup(s, 20))
    assert seen[19] == pytest.approx(BASE_LR * 19 / 20) and seen[20] == BASE_LR


def test_scheduler_scales_each_group():
    a, b = tiny_param(), tiny_param()
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 4e-4}], lr=1e-4)
    sched = build_scheduler(opt, "cosine", N, W)
    for _ in range(40):
        opt.step()
        sched.step()
    factor = expect_cosine(40)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-4 * factor, rel_tol=1e-12)
    assert math.isclose(opt.param_groups[1]["lr"], 4e-4 * factor, rel_tol=1e-12)


def test_unknown_scheduler_lists_choices():
    opt = torch.optim.SGD([tiny_param()], lr=BASE_LR)
    with pytest.raises(OptimizerConfigError) as info:
        build_scheduler(opt, "exponential", N)
    for name in SCHEDULER_TYPES:
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs", [{"num_cycles": 0}, {"power": float("inf")}])
def test_scheduler_rejects_bad_shape_args(kwargs):
    opt = torch.optim.SGD([tiny_param()], lr=BASE_LR)
    with pytest.raises(OptimizerConfigError):
        build_scheduler(opt, "cosine_with_restarts" if "num_cycles" in kwargs else "polynomial", N, 0, **kwargs)


def test_scheduler_rejects_bad_max_steps():
    opt = torch.optim.SGD([tiny_param()], lr=BASE_LR)
    with pytest.raises(OptimizerConfigError, match="max_train_steps"):
        build_scheduler(opt, "linear", 0)


def test_schedule_free_gets_constant_dummy_scheduler():
    pytest.importorskip("schedulefree", reason="pip install schedulefree")
    p = tiny_param()
    opt = build_optimizer([p], OptimizerSettings("AdamWScheduleFree"), 0.02)
    sched = build_scheduler(opt, "cosine", 10, 3)
    assert type(sched) is ScheduleFreeDummyScheduler
    for _ in range(5):
        take_step(opt, p)
        sched.step()
        assert sched.get_last_lr() == [0.02]
    assert sched.state_dict() == {}
