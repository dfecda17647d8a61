"""A graph's run as kohya sd-scripts arguments: every key is kohya's, of kohya's type, and reads back unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
from kohya_arguments import kohya_arguments, type_error

from sdxl_lora_trainer.trainer.data.token_length import TokenLength
from sdxl_lora_trainer.trainer.kohya_config.config_export import sample_prompts_text, to_kohya_args
from sdxl_lora_trainer.trainer.kohya_config.config_import import from_kohya_args
from sdxl_lora_trainer.trainer.kohya_config.run import CacheChoices, KohyaRun
from sdxl_lora_trainer.trainer.network.config import LoraPlusRatios, NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.checkpoints import CheckpointSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings
from sdxl_lora_trainer.trainer.run.previews import PreviewSettings
from sdxl_lora_trainer.trainer.run.validation import ValidationRequest, ValidationSettings

BASE = KohyaRun(NetworkConfig(network_dim=8, network_alpha=4.0), TrainConfig(), output_name="mine")
BLOCKS = tuple([1.0] + [0.5] * 9 + [1.0, 0.0, 1.0] + [2.0] * 9 + [1.0])


def net(**kw) -> KohyaRun:
    return replace(BASE, network=replace(BASE.network, **kw))


def train(**kw) -> KohyaRun:
    return replace(BASE, train=replace(BASE.train, **kw))


def loss(**kw) -> KohyaRun:
    return train(loss=LossSettings(**kw))


def noise(**kw) -> KohyaRun:
    return train(noise=NoiseSettings(**kw))


def checkpoints(**kw) -> KohyaRun:
    return replace(BASE, checkpointing=CheckpointSettings(**kw))


def validation(**kw) -> KohyaRun:
    return replace(BASE, validation=ValidationRequest(ValidationSettings(**kw)))


#: one run per setting the export carries, each with that setting away from its default
CARRIED = {
    "network_dim": net(network_dim=32),
    "network_alpha": net(network_alpha=0.5),
    "conv_dim": net(conv_dim=4, conv_alpha=2.0),
    "block_dims": net(block_dims=tuple([0] + [8] * 21 + [0]), block_alphas=tuple([1.0] * 23)),
    "conv_block_dims": net(
        block_dims=tuple([0] + [8] * 21 + [0]),
        conv_block_dims=tuple([0] + [2] * 21 + [0]),
        conv_block_alphas=(1.0,) * 23,
    ),
    "block_lr_weight": net(block_lr_weight=BLOCKS),
    "dropout": net(dropout=0.1),
    "rank_dropout": net(rank_dropout=0.2),
    "module_dropout": net(module_dropout=0.3),
    "unet_only": net(train_te1=False, train_te2=False),
    "text_encoders_only": net(train_unet=False),
    "loha": net(algo="loha", conv_dim=2, conv_alpha=1.0),
    "lokr": net(algo="lokr", factor=4),
    "dora": net(algo="dora", conv_dim=2, conv_alpha=1.0, module_dropout=0.1),
    "max_train_steps": train(max_train_steps=123),
    "max_train_epochs": train(max_train_epochs=7),
    "learning_rate": train(learning_rate=3e-4),
    "unet_lr": train(unet=PartSettings(2e-4)),
    "text_encoder_lr": train(clip_l=PartSettings(5e-5), clip_g=PartSettings(5e-5)),
    "loraplus_lr_ratio": train(loraplus_lr_ratio=16.0),
    "loraplus_unet_lr_ratio": train(unet=PartSettings(loraplus_lr_ratio=8.0)),
    "loraplus_text_encoder_lr_ratio": train(
        clip_l=PartSettings(loraplus_lr_ratio=4.0), clip_g=PartSettings(loraplus_lr_ratio=4.0)
    ),
    "optimizer": train(optimizer=OptimizerSettings("Lion", "weight_decay=0.01 betas=0.9,0.99")),
    "optimizer_strings": train(optimizer=OptimizerSettings("Adafactor", "relative_step=False scale_parameter=False")),
    "lr_scheduler_min_lr_ratio": train(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio=0.1),
    "lr_decay_steps": train(lr_scheduler="warmup_stable_decay", lr_decay_steps=0.2, lr_scheduler_min_lr_ratio=0.05),
    "lr_scheduler_args": train(lr_scheduler="piecewise_constant", lr_scheduler_args="step_rules='1:10,0.5:20,0.1'"),
    "wsd_shapes": train(lr_scheduler="warmup_stable_decay", lr_decay_steps=30, lr_scheduler_args="decay_type='linear'"),
    "optimizer_came": train(optimizer=OptimizerSettings("CAME", "weight_decay=0.01 betas=(0.9, 0.999, 0.9999)")),
    "optimizer_adopt": train(optimizer=OptimizerSettings("ADOPT", "weight_decay=0.01")),
    "optimizer_ademamix": train(optimizer=OptimizerSettings("AdEMAMix", "alpha=4.0")),
    "optimizer_ademamix8bit": train(optimizer=OptimizerSettings("AdEMAMix8bit")),
    "optimizer_prodigy_plus": train(optimizer=OptimizerSettings("ProdigyPlusScheduleFree", "d_coef=2.0")),
    "optimizer_dadapt_adam": train(optimizer=OptimizerSettings("DAdaptAdam", "decouple=True")),
    "lr_scheduler": train(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3),
    "lr_scheduler_power": train(lr_scheduler="polynomial", lr_scheduler_power=2.0),
    "lr_warmup_steps": train(lr_warmup_steps=50),
    "lr_warmup_ratio": train(lr_warmup_steps=0.1),
    "gradient_accumulation_steps": train(gradient_accumulation_steps=4),
    "max_grad_norm": train(max_grad_norm=0.0),
    "scale_weight_norms": train(scale_weight_norms=1.5),
    "seed": train(seed=1234),
    "bf16": train(train_dtype="bf16", full_bf16=True),
    "fp16": train(train_dtype="fp16"),
    "no_gradient_checkpointing": train(gradient_checkpointing=False),
    "token_length": train(token_length=TokenLength(225)),
    "max_token_length_150": train(token_length=TokenLength(150)),
    "loss_type": loss(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=2.0),
    "smooth_l1": loss(loss_type="smooth_l1"),
    "l1": loss(loss_type="l1"),
    "min_snr_gamma": loss(min_snr_gamma=5.0),
    "v_pred_like_loss": loss(v_pred_like_loss=0.3),
    "debiased_estimation_loss": loss(debiased_estimation_loss=True),
    "prior_loss_weight": loss(prior_loss_weight=0.5),
    "noise_offset": noise(noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.01),
    "multires_noise_iterations": noise(multires_noise_iterations=6, multires_noise_discount=0.4),
    "min_timestep": noise(min_timestep=100, max_timestep=900),
    "ip_noise_gamma": noise(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True),
    "save_every_n_steps": checkpoints(save_every_n_steps=100, keep_last_n=3),
    "save_every_n_epochs": checkpoints(save_every_n_epochs=2, keep_last_n=2),
    "save_state": checkpoints(save_every_n_steps=50, save_state_every_n_steps=50),
    "save_state_on_cancel": checkpoints(save_state_on_cancel=False),
    "validate_every_n_steps": validation(validate_every_n_steps=50),
    "validate_every_n_epochs": validation(validate_every_n_epochs=2),
    "max_validation_steps": validation(max_validation_steps=3),
    "validation_seed": validation(validation_seed=9),
}

#: settings kohya has no argument for: exported with a "not carried over" line naming them
NOT_CARRIED = {
    "memory_mode": (train(memory_mode="stream"), "memory_mode stream"),
    "multiplier": (net(multiplier=0.5), "multiplier"),
    "clip_l_only": (net(train_te2=False), "train only"),
    "separate_te_lrs": (train(clip_l=PartSettings(1e-5), clip_g=PartSettings(2e-5)), "CLIP-G learning rate"),
    "separate_te_loraplus": (
        train(clip_l=PartSettings(loraplus_lr_ratio=2.0), clip_g=PartSettings(loraplus_lr_ratio=4.0)),
        "LoRA+ ratio per text encoder",
    ),
    "frozen_parts": (
        net(module_dims=(("lora_unet_a", 4, 1.0), ("lora_te1_b", 4, 1.0)), frozen_parts=("te1", "te2")),
        "CLIP-L + CLIP-G modules of the start_from file applied frozen",
    ),
    "emb_block_lr": (net(block_lr_weight=tuple([0.5] + [1.0] * 22)), "time-embedding/out block"),
    "resume_from": (checkpoints(resume_from="/states/step100"), "resume_from"),
    "rex": (train(lr_scheduler="rex", lr_scheduler_min_lr_ratio=0.1), "kohya has no REX schedule"),
    "state_cadence": (checkpoints(save_every_n_steps=10, save_state_every_n_steps=30), "save_state_every_n_steps"),
    "comfyui_chunking": (train(token_length=TokenLength(comfyui_chunking=True)), "ComfyUI chunking"),
    "preview_sampler": (
        replace(BASE, previews=PreviewSettings(prompts=("x",), sampler_name="res_multistep")),
        "preview sampler",
    ),
    "validation_dataset": (
        replace(BASE, validation=ValidationRequest(dataset=object())),  # any dataset: kohya cannot take one
        "separate validation dataset",
    ),
}

RICH = replace(
    CARRIED["conv_block_dims"],
    train=replace(
        CARRIED["optimizer"].train,
        loss=CARRIED["loss_type"].train.loss,
        noise=CARRIED["noise_offset"].train.noise,
        loraplus_lr_ratio=4.0,
    ),
    checkpointing=CARRIED["save_state"].checkpointing,
    previews=PreviewSettings(prompts=("a dog", "a cat"), negative="blurry", every_n_steps=25, sampler_name="dpmpp_2m"),
    caching=CacheChoices(latents_to_disk=True, vae_batch_size=4, float32_vae=True, text_encoder_outputs=True),
    network_weights="/loras/start.safetensors",
    checkpoint_path="/models/sdxl.safetensors",
    base_weights=(("/loras/style.safetensors", 0.8),),
    v_parameterization=True,
)


@pytest.mark.parametrize("run", [BASE, RICH, *CARRIED.values()], ids=["base", "rich", *CARRIED])
def test_every_key_is_a_kohya_argument_of_kohya_type(run):
    table = kohya_arguments()
    args = to_kohya_args(run).args
    unknown = sorted(set(args) - set(table))
    assert not unknown, f"not arguments of kohya's sdxl_train_network.py: {unknown}"
    errors = [e for name, value in args.items() if (e := type_error(name, value, table[name]))]
    assert not errors, errors


def _carried_view(run: KohyaRun) -> tuple:
    """What the export promises to carry: the network, the run's settings with each part's effective lr/ratio."""
    t = run.train
    return (
        run.network,
        replace(
            t,
            unet=PartSettings(),
            clip_l=PartSettings(),
            clip_g=PartSettings(),
            loraplus_lr_ratio=None,
            optimizer=OptimizerSettings(t.optimizer.optimizer_type),
            token_length=t.token_length or TokenLength(),  # unset = kohya's default (import names it explicitly)
        ),
        (t.optimizer.canonical_type, t.optimizer.kwargs),
        t.part_settings(),
        run.checkpointing
        if run.checkpointing.save_state_every_n_steps in (0, run.checkpointing.save_every_n_steps)
        else None,
        run.validation.settings if run.validation is not None else ValidationSettings(),
    )


@pytest.mark.parametrize("name", list(CARRIED))
def test_each_setting_reads_back_unchanged(name):
    run = CARRIED[name]
    exported = to_kohya_args(run)
    assert not exported.not_carried, exported.not_carried
    imported = from_kohya_args(exported.args)
    back = KohyaRun(
        imported.network,
        imported.train,
        checkpointing=imported.checkpointing,
        validation=ValidationRequest(imported.validation),
    )
    assert _carried_view(back) == _carried_view(run)


@pytest.mark.parametrize("name", list(NOT_CARRIED))
def test_what_kohya_cannot_take_is_named(name):
    run, fragment = NOT_CARRIED[name]
    not_carried = to_kohya_args(run).not_carried
    assert any(fragment in line for line in not_carried), not_carried


def test_the_walk_covers_every_field():
    """A new setting must join CARRIED or NOT_CARRIED (or the list of settings the graph decides): this fails
    when a settings class gains a field the export does not handle."""
    from dataclasses import fields

    covered = set(CARRIED) | set(NOT_CARRIED)
    decided_elsewhere = {"module_dims", "algo", "factor", "train_unet", "train_te1", "train_te2", "conv_alpha",
                         "block_alphas", "conv_block_alphas", "optimizer", "unet", "clip_l", "clip_g", "loss", "noise",
                         "train_dtype", "full_bf16", "gradient_checkpointing", "lr_scheduler_num_cycles",
                         "multires_noise_discount", "noise_offset_random_strength", "adaptive_noise_scale",
                         "max_timestep", "ip_noise_gamma_random_strength", "huber_schedule", "huber_c", "huber_scale",
                         "v_parameterization", "scale_v_pred_loss_like_noise_pred", "keep_last_n",
                         "save_state_every_n_steps"}  # fmt: skip
    names = {
        f.name
        for cls in (NetworkConfig, TrainConfig, LossSettings, NoiseSettings, CheckpointSettings, ValidationSettings)
        for f in fields(cls)
    }
    missing = sorted(n for n in names if n not in covered and n not in decided_elsewhere)
    assert not missing, f"settings the kohya export does not walk: {missing}"


def test_rich_run_arguments():
    out = to_kohya_args(RICH)
    a = out.args
    assert "conv_block_dims=0,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,0" in a["network_args"]
    assert "block_dims=0,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,8,0" in a["network_args"]
    assert "loraplus_lr_ratio=4.0" in a["network_args"]
    assert a["optimizer_args"] == ["weight_decay=0.01", "betas=(0.9, 0.99)"]
    assert a["network_weights"] == "/loras/start.safetensors" and a["dim_from_weights"] is True
    assert a["base_weights"] == ["/loras/style.safetensors"] and a["base_weights_multiplier"] == [0.8]
    assert a["v_parameterization"] is True and a["no_half_vae"] is True and a["vae_batch_size"] == 4
    assert a["cache_latents_to_disk"] is True and a["cache_text_encoder_outputs"] is True
    assert a["sample_sampler"] == "dpmsolver++" and a["sample_every_n_steps"] == 25
    assert a["save_every_n_steps"] == 50 and a["save_state"] is True


@pytest.mark.parametrize(
    "name,kohya_type,package",
    [
        ("optimizer", "Lion", None),
        ("optimizer_came", "pytorch_optimizer.CAME", "pytorch-optimizer"),
        ("optimizer_adopt", "pytorch_optimizer.ADOPT", "pytorch-optimizer"),
        ("optimizer_ademamix", "pytorch_optimizer.AdEMAMix", "pytorch-optimizer"),
        ("optimizer_ademamix8bit", "bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes"),
        ("optimizer_prodigy_plus", "prodigyplus.ProdigyPlusScheduleFree", "prodigy-plus-schedule-free"),
        ("optimizer_dadapt_adam", "DAdaptAdam", "dadaptation"),
    ],
)
def test_optimizer_type_is_what_kohya_get_optimizer_imports(name, kohya_type, package):
    """kohya has short names for its own optimizers and imports any other from a "module.Class" path."""
    out = to_kohya_args(CARRIED[name])
    assert out.args["optimizer_type"] == kohya_type
    if package:  # a package kohya's requirements do not install
        assert any(f"pip install {package}" in note for note in out.notes), out.notes


def test_schedule_arguments_are_kohya_arguments():
    a = to_kohya_args(CARRIED["lr_scheduler_args"]).args
    assert a["lr_scheduler"] == "piecewise_constant" and a["lr_scheduler_args"] == ["step_rules='1:10,0.5:20,0.1'"]
    a = to_kohya_args(CARRIED["lr_decay_steps"]).args
    assert (a["lr_scheduler"], a["lr_decay_steps"], a["lr_scheduler_min_lr_ratio"]) == (
        "warmup_stable_decay",
        0.2,
        0.05,
    )


def test_rex_goes_through_kohya_lr_scheduler_type():
    run, _ = NOT_CARRIED["rex"]
    a = to_kohya_args(run).args
    assert a["lr_scheduler_type"] == "pytorch_optimizer.lr_scheduler.rex.REXScheduler"
    table = kohya_arguments()
    assert not [e for name, value in a.items() if (e := type_error(name, value, table[name]))]
    lr = run.train.learning_rate
    assert a["lr_scheduler_args"] == [
        f"total_steps={run.train.max_train_steps}",
        f"max_lr={lr!r}",
        f"min_lr={lr * 0.1!r}",
    ]


def test_max_token_length_is_kohyas_argument():
    assert to_kohya_args(CARRIED["token_length"]).args["max_token_length"] == 225
    assert "max_token_length" not in to_kohya_args(BASE).args  # kohya's default: 75 tokens
    chunked = to_kohya_args(NOT_CARRIED["comfyui_chunking"][0])
    assert "max_token_length" not in chunked.args


def test_sample_prompts_use_kohya_prompt_options():
    run = replace(
        BASE, previews=PreviewSettings(prompts=("a dog", "a cat"), negative="blurry", width=832, height=1216, seed=5)
    )
    assert sample_prompts_text(run).splitlines() == [
        "a dog --n blurry --w 832 --h 1216 --s 20 --l 7.0 --d 5",
        "a cat --n blurry --w 832 --h 1216 --s 20 --l 7.0 --d 6",
    ]


@pytest.mark.parametrize(
    "ratios",
    [LoraPlusRatios(16.0), LoraPlusRatios(16.0, 8.0, 4.0), LoraPlusRatios(None, 8.0), LoraPlusRatios(None, None, 2.0)],
    ids=["all", "each", "unet", "text_encoders"],
)
def test_network_node_loraplus_reads_back_as_the_same_ratios(ratios):
    """The Network node's LoRA+ ratios (folded into the run's settings as the Train and Export nodes do) export as
    kohya's loraplus_* network_args and import back into the same ratios, on the imported Network output too."""
    run = replace(BASE, train=BASE.train.with_loraplus(ratios))
    exported = to_kohya_args(run)
    assert not exported.not_carried, exported.not_carried
    args = dict(a.split("=", 1) for a in exported.args["network_args"])
    for name in ("lr_ratio", "unet_lr_ratio", "text_encoder_lr_ratio"):
        value = getattr(ratios, name)
        assert args.get(f"loraplus_{name}") == (None if value is None else repr(value)), args
    imported = from_kohya_args(exported.args)
    assert imported.train.part_settings() == run.train.part_settings()
    assert imported.loraplus == ratios
    assert BASE.train.with_loraplus(imported.loraplus).part_settings() == run.train.part_settings()
