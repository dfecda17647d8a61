"""kohya's settings into the graph: every key applied or named, kohya's defaults for absent keys, and the ss_*
metadata of the pack's own files reads back into the settings that made them."""

from __future__ import annotations

import json
import time

import pytest
import torch
from kohya_arguments import kohya_arguments

from sdxl_lora_trainer.trainer.kohya_config.config_import import (
    KohyaConfigError,
    args_from_metadata,
    from_kohya_args,
    read_kohya_config_file,
)
from sdxl_lora_trainer.trainer.network.config import NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.network.metadata import build_metadata
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.lora_output import network_metadata, training_metadata
from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings, build_optimizer

#: a valid value for kohya arguments whose value the import interprets (the rest get a value of their type)
SAMPLE_VALUES = {
    "network_module": "networks.lora",
    "network_args": ["conv_dim=4", "conv_alpha=1"],
    "optimizer_type": "Lion",
    "optimizer_args": ["weight_decay=0.1"],
    "lr_scheduler": "cosine",
    "mixed_precision": "bf16",
    "loss_type": "huber",
    "huber_schedule": "constant",
    "save_precision": "bf16",
    "text_encoder_lr": [5e-5],
    "min_timestep": 10,
    "max_timestep": 900,
    "network_train_text_encoder_only": False,
}


def _sample(spec):
    if spec["dest"] in SAMPLE_VALUES:
        return SAMPLE_VALUES[spec["dest"]]
    if spec["flag"]:
        return True
    if spec["choices"]:
        return next(c for c in spec["choices"] if c is not None)
    one = {"int": 2, "float": 0.5, "int_or_float": 3, "str": "value", "Path": "value.toml"}[spec["type"]]
    return [one] if spec["nargs"] in ("*", "+") else one


@pytest.mark.parametrize("name", sorted(kohya_arguments()))
def test_every_kohya_argument_is_applied_or_named(name):
    """No key is ever accepted and ignored: given on its own, each of kohya's arguments is applied, or named in the
    report with where the graph sets it instead, or refused with a message naming it."""
    spec = kohya_arguments()[name]
    args = {name: _sample(spec)}
    if name == "full_bf16":
        args["mixed_precision"] = "bf16"
    try:
        imported = from_kohya_args(args)
    except (KohyaConfigError, ValueError) as e:
        assert name in str(e)
        return
    named = {key for key, _ in imported.not_applied}
    assert name in imported.applied or name in named, (imported.applied, imported.not_applied)


def test_absent_keys_take_kohyas_defaults():
    imported = from_kohya_args({"network_dim": 16})
    t = imported.train
    assert t.learning_rate == 2e-6 and t.max_train_steps == 1600 and t.gradient_checkpointing is False
    assert t.train_dtype == "fp32" and t.optimizer.canonical_type == "AdamW" and t.lr_scheduler == "constant"
    assert imported.network.network_dim == 16 and imported.network.network_alpha == 1.0


def test_max_token_length_is_applied_and_absent_is_kohyas_75():
    from sdxl_lora_trainer.trainer.data.token_length import TokenLength

    assert from_kohya_args({"max_token_length": 225}).train.token_length == TokenLength(225)
    assert from_kohya_args({}).train.token_length == TokenLength()  # kohya's default, not "whatever Cache Text says"
    assert "max_token_length" in from_kohya_args({"max_token_length": 150}).applied
    with pytest.raises(KohyaConfigError, match="max_token_length 100"):
        from_kohya_args({"max_token_length": 100})
    # a kohya LoRA's metadata: ss_max_token_length "225" / "None"
    assert from_kohya_args(args_from_metadata({"ss_max_token_length": "225"})).train.token_length == TokenLength(225)
    assert from_kohya_args(args_from_metadata({"ss_max_token_length": "None"})).train.token_length == TokenLength()


def test_config_file_sections_are_flattened_like_kohya(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        'pretrained_model_name_or_path = "/m.safetensors"\n'
        "[model_arguments]\nv_parameterization = false\n"
        '[additional_network_arguments]\nnetwork_module = "networks.lora"\nnetwork_dim = 32\nnetwork_alpha = 16\n'
        '[optimizer_arguments]\noptimizer_type = "AdamW8bit"\nlearning_rate = 1e-4\nmax_grad_norm = 0.0\n'
    )
    args = read_kohya_config_file(path)
    assert args["network_dim"] == 32 and args["optimizer_type"] == "AdamW8bit" and "optimizer_arguments" not in args
    imported = from_kohya_args(args, source=str(path))
    assert imported.network.network_dim == 32 and imported.network.network_alpha == 16.0
    assert imported.train.optimizer.canonical_type == "AdamW8bit" and imported.train.max_grad_norm == 0.0
    report = imported.report()
    assert "pretrained_model_name_or_path: the MODEL/CLIP/VAE come from the graph" in report
    assert "'/m.safetensors'" in report


@pytest.mark.parametrize(
    "args,fragment",
    [
        ({"network_module": "networks.oft"}, "network_module 'networks.oft'"),
        ({"optimizer_type": "SGDNesterov9000"}, "optimizer_type 'SGDNesterov9000'"),
        ({"network_module": "lycoris.kohya", "network_args": ["algo=ia3"]}, "algo='ia3'"),
        ({"mixed_precision": "fp8"}, "mixed_precision 'fp8'"),
    ],
)
def test_what_the_pack_cannot_train_is_refused_by_name(args, fragment):
    with pytest.raises(KohyaConfigError, match=fragment.replace("(", r"\(")):
        from_kohya_args(args)


def test_unknown_network_args_are_named():
    imported = from_kohya_args({"network_args": ["conv_dim=4", "preset=full"]})
    assert imported.network.conv_dim == 4
    assert ("network_args preset", "not an argument of the pack's lora network") in imported.not_applied


def _our_metadata(network: NetworkConfig, config: TrainConfig) -> dict[str, str]:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([param], config.optimizer, config.learning_rate)
    training = training_metadata(config, optimizer, 10, config.max_train_steps, time.time(), "mine")
    dataset = {"resolution": (1024, 1024), "num_train_images": 10, "dataset_dirs": {}, "tag_frequency": {}}
    return build_metadata(training, dataset, network_metadata(network, config), step=config.max_train_steps, epoch=1)


@pytest.mark.parametrize(
    "optimizer,args",
    [
        ("CAME", "weight_decay=0.01 betas=(0.9, 0.999, 0.9999)"),
        ("ADOPT", "weight_decay=0.01"),
        ("AdEMAMix", "alpha=4.0"),
        ("ProdigyPlusScheduleFree", "d_coef=2.0"),
        ("DAdaptAdam", "decouple=True"),
    ],
)
def test_new_optimizers_read_back_from_ss_optimizer(optimizer, args):
    config = TrainConfig(learning_rate=1.0, optimizer=OptimizerSettings(optimizer, args))
    metadata = _our_metadata(NetworkConfig(), config)
    assert metadata["ss_optimizer"].split("(")[0].endswith("." + optimizer)  # kohya's module.Class
    t = from_kohya_args(args_from_metadata(metadata)).train
    assert (t.optimizer.canonical_type, t.optimizer.kwargs) == (optimizer, config.optimizer.kwargs)


def test_kohya_class_path_optimizer_type_is_imported():
    imported = from_kohya_args({"optimizer_type": "pytorch_optimizer.CAME", "optimizer_args": ["weight_decay=0.02"]})
    assert imported.train.optimizer.canonical_type == "CAME"
    assert imported.train.optimizer.kwargs == {"weight_decay": 0.02}


def test_our_own_metadata_reads_back_into_the_same_settings():
    network = NetworkConfig(network_dim=16, network_alpha=8.0, conv_dim=4, conv_alpha=2.0, dropout=0.1)
    config = TrainConfig(
        max_train_steps=300,
        learning_rate=2e-4,
        unet=PartSettings(3e-4),
        clip_l=PartSettings(5e-5),
        clip_g=PartSettings(5e-5),
        optimizer=OptimizerSettings("AdamW", "weight_decay=0.05 betas=(0.9, 0.99)"),
        lr_scheduler="cosine",
        lr_warmup_steps=20,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        scale_weight_norms=2.0,
        seed=77,
        train_dtype="bf16",
        gradient_checkpointing=True,
        loss=LossSettings(loss_type="huber", huber_schedule="exponential", huber_c=0.2, min_snr_gamma=5.0),
        noise=NoiseSettings(noise_offset=0.05, multires_noise_iterations=6, multires_noise_discount=0.4),
    )
    imported = from_kohya_args(args_from_metadata(_our_metadata(network, config)))
    assert imported.network == network
    t = imported.train
    assert t.part_settings() == config.part_settings()
    assert (t.optimizer.canonical_type, t.optimizer.kwargs) == (
        config.optimizer.canonical_type,
        config.optimizer.kwargs,
    )
    for name in (
        "max_train_steps",
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "gradient_accumulation_steps",
        "max_grad_norm",
        "scale_weight_norms",
        "seed",
        "train_dtype",
        "gradient_checkpointing",
        "loss",
        "noise",
    ):
        assert getattr(t, name) == getattr(config, name), name


BLOCK_DIMS = "0," + ",".join(["8"] * 21) + ",0"
BLOCK_LR = "1," + ",".join(["0.5"] * 21) + ",1"


def test_ss_network_args_hold_block_dims_lr_weights_and_loraplus_as_kohya_strings():
    """kohya writes json.dumps(net_kwargs): every network_args value as the string it was given, plus the
    "dropout" entry its train_network adds (the network_dropout value itself)."""
    network = NetworkConfig(
        network_dim=8,
        network_alpha=4.0,
        conv_dim=2,
        conv_alpha=1.0,
        block_dims=BLOCK_DIMS,
        block_alphas=",".join(["2"] * 23),
        conv_block_dims="0," + ",".join(["2"] * 21) + ",0",
        conv_block_alphas=",".join(["1"] * 23),
        block_lr_weight=BLOCK_LR,
        module_dropout=0.1,
        dropout=0.05,
    )
    config = TrainConfig(loraplus_lr_ratio=16.0, unet=PartSettings(None, 8.0))
    args = json.loads(_our_metadata(network, config)["ss_network_args"])
    assert args.pop("dropout") == 0.05
    assert all(isinstance(v, str) for v in args.values()), args
    assert args["block_dims"] == BLOCK_DIMS
    assert args["block_alphas"] == ",".join(["2.0"] * 23)
    assert args["conv_block_dims"] == "0," + ",".join(["2"] * 21) + ",0"
    assert args["conv_block_alphas"] == ",".join(["1.0"] * 23)
    assert args["down_lr_weight"] == ",".join(["0.5"] * 9) and args["mid_lr_weight"] == "0.5,0.5,0.5"
    assert args["up_lr_weight"] == ",".join(["0.5"] * 9)
    assert (args["conv_dim"], args["conv_alpha"], args["module_dropout"]) == ("2", "1.0", "0.1")
    assert (args["loraplus_lr_ratio"], args["loraplus_unet_lr_ratio"]) == ("16.0", "8.0")

    imported = from_kohya_args(args_from_metadata(_our_metadata(network, config)))
    assert imported.network == network
    assert imported.train.part_settings() == config.part_settings()
    assert not [k for k, _ in imported.not_applied if k.startswith("network_args")]


def test_ss_network_args_absent_without_network_args_and_dropout_alone_is_not_one():
    meta = _our_metadata(NetworkConfig(dropout=0.1), TrainConfig())
    assert "ss_network_args" not in meta and meta["ss_network_dropout"] == "0.1"


def test_lycoris_dora_reads_as_algo_dora_and_an_output_axis_dora_is_refused():
    args = {"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dora_wd=True", "wd_on_output=False"]}
    assert from_kohya_args(args).network.algo == "dora"
    with pytest.raises(ValueError, match="Set wd_on_output=False"):
        from_kohya_args({"network_module": "lycoris.kohya", "network_args": ["algo=locon", "dora_wd=True"]})


def test_prior_loss_weight_is_applied_and_masked_loss_names_the_dataset():
    imported = from_kohya_args({"prior_loss_weight": 0.3, "masked_loss": True, "reg_data_dir": "reg"})
    assert imported.train.loss.prior_loss_weight == 0.3 and "prior_loss_weight" in imported.applied
    why = dict(imported.not_applied)
    assert "mask folder" in why["masked_loss"] and "alpha_mask" in why["masked_loss"]
    assert "reg_folder" in why["reg_data_dir"]


def test_validation_settings_and_metadata_read_back():
    from sdxl_lora_trainer.trainer.run.validation import ValidationSettings

    settings = ValidationSettings(
        validate_every_n_steps=25, validate_every_n_epochs=2, max_validation_steps=4, validation_seed=11
    )
    imported = from_kohya_args({name: getattr(settings, name) for name in vars(settings)})
    assert imported.validation == settings and not imported.not_applied
    # kohya's validation_split is a dataset setting in the graph: named, with where to set it
    split = from_kohya_args({"validation_split": 0.1})
    assert [key for key, _ in split.not_applied] == ["validation_split"]
    assert "Buckets & Captions" in split.not_applied[0][1]
    # the ss_validation_* metadata the pack writes reads back into the same settings
    config = TrainConfig(max_train_steps=10)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], config.optimizer, config.learning_rate)
    training = training_metadata(
        config, optimizer, 10, 10, time.time(), "mine", validation={**vars(settings), "validation_split": 0.25}
    )
    dataset = {"resolution": (1024, 1024), "num_train_images": 10, "num_validation_images": 3, "dataset_dirs": {}}
    dataset["tag_frequency"] = {}
    meta = build_metadata(training, dataset, network_metadata(NetworkConfig()), step=10, epoch=1)
    assert (meta["ss_validation_split"], meta["ss_num_validation_images"]) == ("0.25", "3")
    back = from_kohya_args(args_from_metadata(meta))
    assert back.validation == settings
    assert "validation_split" in [key for key, _ in back.not_applied]
