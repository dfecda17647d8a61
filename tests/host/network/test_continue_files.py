"""Continuing from saved files (the Network node's start_from): the algorithm, parts, dims, alphas and LoKr factor
are read back from every algorithm's file; a file of another algorithm, or a toggle for a part the file lacks, is
refused with the fix; a file's part whose toggle is off is applied frozen and saved back unchanged."""

from __future__ import annotations

import pytest
import torch
import training_fixtures as tf
from test_lora_loads_in_comfy import parts

from sdxl_lora_trainer.trainer.network import network_class
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.network.file_config import config_from_file, file_algo, start_from_refusal
from sdxl_lora_trainer.trainer.run.config import TrainConfig

#: algo -> network settings whose file is read back (mixed dims: block dims, conv, LoKr factors, a full LoKr w2)
FILES = {
    "lora": {"network_dim": 4, "network_alpha": 2.0, "conv_dim": 3, "conv_alpha": 0.0},
    "dora": {"network_dim": 4, "network_alpha": 2.0, "conv_dim": 3, "conv_alpha": 1.0},
    "loha": {"network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
    "lokr": {"network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0, "factor": 4},
    "lokr_auto_full": {"network_dim": 64, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
}


def saved(tiny, name: str, seed: int = 0, **kw) -> tuple[NetworkConfig, dict[str, torch.Tensor]]:
    algo = name.split("_")[0]
    config = NetworkConfig(algo=algo, **{**FILES[name], **kw})
    net = network_class(algo).build(*parts(*tiny[:2]), config, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return config, net.state_dict_kohya(torch.float16)


@pytest.mark.parametrize("name", list(FILES))
def test_every_algorithm_file_reads_back_into_the_network_it_holds(tiny, name):
    config, sd = saved(tiny, name, block_dims=",".join(["4"] * 11 + ["2"] * 12))
    assert file_algo(sd) == config.algo
    back = config_from_file(sd)
    assert (back.algo, back.factor if config.algo == "lokr" else -1) == (config.algo, config.factor)
    assert (back.train_unet, back.train_te1, back.train_te2) == (True, True, True)
    dims = {n: d for n, d, _ in back.module_dims}
    assert {2, 4} <= set(dims.values()) or name == "lokr_auto_full"  # per-block dims survive
    fresh = network_class(back.algo).build(*parts(*tiny[:2]), back, torch.Generator().manual_seed(7))
    fresh.load_kohya(sd)  # strict: every key, shape and alpha
    again = fresh.state_dict_kohya(torch.float16)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


def test_a_lokr_factor_no_split_matches_is_refused(tiny):
    _, sd = saved(tiny, "lokr")
    key = next(k for k in sd if k.endswith("lokr_w1") and "_in_layers_2" not in k and "_op" not in k)
    sd = dict(sd, **{key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="no LyCORIS factor"):
        config_from_file(sd)


@pytest.mark.parametrize(
    ("file", "algo", "toggles", "fragment"),
    [
        ("loha", "lora", (True, True, True), "is a loha file, but algo is 'lora': set algo to 'loha'"),
        ("dora", "lokr", (True, True, True), "is a dora file, but algo is 'lokr'"),
        ("lora_unet", "lora", (True, True, False), "has no CLIP-L modules (lora_te1_ keys), so train_clip_l"),
        ("lora", "lora", (False, False, False), "switch on train_unet or train_clip_l or train_clip_g"),
    ],
)
def test_start_from_mismatches_are_said_with_the_fix(tiny, file, algo, toggles, fragment):
    _, sd = saved(tiny, file.split("_")[0])
    if file.endswith("_unet"):
        sd = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    message = start_from_refusal("x.safetensors", sd.keys(), algo, *toggles)
    assert message is not None and fragment in message, message
    matching = (True, False, False) if file.endswith("_unet") else (True, True, True)
    assert start_from_refusal("x.safetensors", sd.keys(), file_algo(sd), *matching) is None


def test_a_text_encoder_lora_continues_with_the_text_encoders_frozen():
    """kohya's default output (U-Net + both text encoders) continued with train_clip_l/g off, as the shipped
    continue_training example does: the U-Net trains, the text-encoder modules are applied as loaded and saved
    back unchanged (issue: this failed after loading with "264 LoRA modules ... match no module")."""
    ds, lat, txt = tf.default_data()
    sd = tf.random_lora_weights(NetworkConfig(network_dim=4, network_alpha=2.0), seed=5)
    assert any(k.startswith("lora_te1_") for k in sd) and any(k.startswith("lora_te2_") for k in sd)
    config = config_from_file(sd, frozen_parts=("te1", "te2"))
    result = tf.run_train(ds, lat, txt, config, TrainConfig(max_train_steps=2, learning_rate=1e-2), initial_weights=sd)
    trained = result.network.state_dict_kohya()
    assert trained.keys() == sd.keys()
    te = [k for k in sd if not k.startswith("lora_unet_")]
    assert all(torch.equal(trained[k], sd[k]) for k in te)
    assert any(not torch.equal(trained[k], sd[k]) for k in sd if k.startswith("lora_unet_"))
    assert "textencoder" not in " ".join(result.group_names)
