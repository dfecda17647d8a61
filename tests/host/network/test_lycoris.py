"""LoHa / LoKr (LyCORIS modules) on the tiny SDXL: zero diff at init, files load in ComfyUI's LoraLoader with every
key used and give the same outputs as our hooks, hooks leave the model bit-identical, and training runs.

Same pattern as test_lora_loads_in_comfy.py; the shared fixture is restored bit-exactly.
"""

from __future__ import annotations

import logging
import math

import comfy.model_management
import comfy.sd
import pytest
import torch
import training_fixtures as tf
from test_lora_loads_in_comfy import all_forward_hooks, parts, run_clip, run_unet, same_weights, snapshot, unet_inputs

from sdxl_lora_trainer.trainer.network import network_class
from sdxl_lora_trainer.trainer.network.config import NETWORK_ALGOS, NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.network.loha import LohaNetwork
from sdxl_lora_trainer.trainer.network.lokr import LokrNetwork
from sdxl_lora_trainer.trainer.network.lycoris import LycorisNetwork, is_lycoris_state_dict
from sdxl_lora_trainer.trainer.run.config import TrainConfig

ALGOS = ["loha", "lokr"]
WEIGHT_PREFIX = {"loha": "hada_", "lokr": "lokr_"}


def config(algo: str, **kw) -> NetworkConfig:
    return NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=3, conv_alpha=1.0, algo=algo, **kw)


def randomise(net: LycorisNetwork, seed: int) -> LycorisNetwork:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3, generator=g)
    return net.eval()


@pytest.mark.parametrize("algo", NETWORK_ALGOS)
def test_each_algo_builds_its_own_network_class(tiny, algo):
    model, clip, _ = tiny
    net = network_class(algo).build(*parts(model, clip), config(algo), torch.Generator().manual_seed(0))
    assert net.algo == algo and type(net).__name__.lower() == algo + "network"


@pytest.mark.parametrize("algo", ALGOS)
def test_init_is_zero_diff_seeded_and_leaves_global_rng(tiny, algo):
    model, clip, _ = tiny
    roots = parts(model, clip)
    inputs = unet_inputs(model, clip)
    base_unet, (base_cond, base_pooled) = run_unet(model, inputs), run_clip(clip)
    rng = torch.get_rng_state()
    net = network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(5)).eval()
    assert torch.equal(torch.get_rng_state(), rng)
    twin = network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(5))
    other = network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(6))
    sd, sd_twin, sd_other = net.state_dict_kohya(), twin.state_dict_kohya(), other.state_dict_kohya()
    assert sd.keys() == sd_twin.keys() and all(torch.equal(v, sd_twin[k]) for k, v in sd.items())
    assert any(not torch.equal(v, sd_other[k]) for k, v in sd.items())
    assert net.te1_loras and net.te2_loras and net.unet_loras
    assert any(m.module_type == "conv2d" and m.shape[2:] == (3, 3) for m in net.unet_loras)  # 3x3 convs too
    with net.attach():
        assert torch.equal(run_unet(model, inputs), base_unet)
        cond, pooled = run_clip(clip)
    assert torch.equal(cond, base_cond) and torch.equal(pooled, base_pooled)
    assert all_forward_hooks(*roots) == 0


@pytest.mark.parametrize("algo", ALGOS)
def test_file_loads_in_comfyui_and_matches_hooks(tiny, caplog, algo):
    model, clip, _ = tiny
    roots = parts(model, clip)
    snap = snapshot(*roots)
    inputs = unet_inputs(model, clip)
    base_unet, (base_cond, base_pooled) = run_unet(model, inputs), run_clip(clip)

    net = randomise(network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(0)), 1)
    assert all_forward_hooks(*roots) == 0
    with net.attach():
        assert all_forward_hooks(*roots) == len(net.loras)
        want_unet = run_unet(model, inputs)
        want_cond, want_pooled = run_clip(clip)
    assert all_forward_hooks(*roots) == 0
    # detached: bit-identical model, and the network holds references only
    assert torch.equal(run_unet(model, inputs), base_unet)
    assert same_weights(roots, snap)
    ours = {id(m) for m in net.modules()}
    assert not any(id(m) in ours for r in roots for m in r.modules())

    sd = net.state_dict_kohya()
    assert is_lycoris_state_dict(sd)
    names = {lora.lora_name for lora in net.loras}
    for k in sd:
        name, weight = k.rsplit(".", 1)
        assert name in names and (weight == "alpha" or weight.startswith(WEIGHT_PREFIX[algo])), k
    try:
        with caplog.at_level(logging.WARNING):
            new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        problems = [
            r.getMessage()
            for r in caplog.records
            if "not loaded" in r.getMessage().lower() or r.levelno >= logging.ERROR
        ]
        assert problems == []
        got_unet = {
            "lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_") for k in new_model.patches
        }
        assert got_unet == {lora.lora_name for lora in net.unet_loras}
        clip_paths = {"clip_l": "lora_te1", "clip_g": "lora_te2"}
        got_clip = {
            clip_paths[k.split(".")[0]] + "_" + k[: -len(".weight")].split(".transformer.", 1)[1].replace(".", "_")
            for k in new_clip.patcher.patches
        }
        assert got_clip == {lora.lora_name for lora in net.te1_loras + net.te2_loras}

        comfy.model_management.load_models_gpu([new_model])
        got_unet_out = run_unet(new_model, inputs)
        got_cond, got_pooled = run_clip(new_clip)
    finally:
        comfy.model_management.unload_all_models()

    # ComfyUI merges W + dW in float32; our hooks add dW x to W x: float32 rounding only
    torch.testing.assert_close(got_cond, want_cond, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_pooled, want_pooled, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_unet_out, want_unet, rtol=1e-5, atol=1e-4)
    # ... and the network changes them far beyond that tolerance
    assert (want_unet - base_unet).abs().max() > 0.1
    assert (want_cond - base_cond).abs().max() > 0.1 and (want_pooled - base_pooled).abs().max() > 0.1

    assert same_weights(roots, snap)
    assert torch.equal(run_unet(model, inputs), base_unet)

    # the file round-trips into a fresh network (strict load)
    fresh = network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(9))
    fresh.load_kohya(sd)
    back = fresh.state_dict_kohya()
    assert back.keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in back.items())
    with pytest.raises(ValueError, match="missing keys"):
        fresh.load_kohya({k: v for k, v in sd.items() if not k.startswith("lora_unet_")})


@pytest.mark.parametrize("algo", ALGOS)
def test_max_norm_and_param_groups(tiny, algo):
    model, clip, _ = tiny
    net = randomise(network_class(algo).build(*parts(model, clip), config(algo), torch.Generator().manual_seed(0)), 2)
    groups, names = net.param_groups(PartSettings(1e-3), PartSettings(1e-4), PartSettings(1e-4))
    assert names == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-4, 1e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="LoRA\\+"):
        net.param_groups(PartSettings(1e-3, 4.0), PartSettings(1e-4), PartSettings(1e-4))
    before = net.state_dict_kohya()
    keys, mean, biggest = net.apply_max_norm(1e-3).read()
    assert keys == len(net.loras) and 0 < mean <= biggest <= 1e-3 * (1 + 1e-4)
    after = net.state_dict_kohya()
    assert any(not torch.equal(v, before[k]) for k, v in after.items())


@pytest.mark.parametrize("algo", ALGOS)
def test_max_norm_is_lycoris_own_formula(tiny, algo):
    """apply_max_norm evaluates LyCORIS's per-module formula on the device (no read-back per module): the weights
    it leaves are LyCORIS's own apply_max_norm's, bit for bit, and so are the returned norms."""
    model, clip, _ = tiny
    roots = parts(model, clip)
    ours = randomise(network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(0)), 2)
    theirs = randomise(network_class(algo).build(*roots, config(algo), torch.Generator().manual_seed(0)), 2)
    with torch.no_grad():  # the median module norm: about half the modules get scaled
        max_norm = float(torch.stack([m.get_weight(m.shape).norm() for m in theirs.loras]).median())
    keys, mean, biggest = ours.apply_max_norm(max_norm).read()
    with torch.no_grad():
        results = [m.apply_max_norm(max_norm) for m in theirs.loras]  # LyCORIS, module by module
    norms = [float(n) for _, n in results]
    assert keys == sum(bool(s) for s, _ in results) and 0 < keys < len(results)  # some scaled, some not
    assert (mean, biggest) == (sum(norms) / len(norms), max(norms))
    mine, want = ours.state_dict(), theirs.state_dict()
    assert all(torch.equal(mine[k], want[k]) for k in want)


@pytest.mark.parametrize("algo", ALGOS)
def test_rank_dropout_is_refused_for_lycoris(algo):
    from sdxl_lora_trainer.nodes.common import QueueTimeError
    from sdxl_lora_trainer.nodes.network_node import NetworkSettings

    with pytest.raises(ValueError, match=f"rank_dropout is not supported with algo '{algo}'.*Set rank_dropout to 0"):
        config(algo, rank_dropout=0.1)
    with pytest.raises(QueueTimeError, match="Set rank_dropout to 0"):  # at queue time, one message on the node
        NetworkSettings.validate_inputs(algo=algo, rank_dropout=0.1)
    assert NetworkSettings.validate_inputs(algo="lora", rank_dropout=0.1) is True


def test_lokr_factor_changes_the_factorisation(tiny):
    model, clip, _ = tiny
    roots = parts(model, clip)
    auto = LokrNetwork.build(*roots, config("lokr"), torch.Generator().manual_seed(0)).state_dict_kohya()
    four = LokrNetwork.build(*roots, config("lokr", factor=4), torch.Generator().manual_seed(0)).state_dict_kohya()
    assert auto.keys() != four.keys() or any(auto[k].shape != four[k].shape for k in auto)


def test_loha_training_run_changes_weights():
    ds, lat, txt = tf.default_data()
    net_cfg = NetworkConfig(
        network_dim=4, network_alpha=1.0, conv_dim=2, conv_alpha=1.0, train_te1=False, train_te2=False, algo="loha"
    )
    result = tf.run_train(ds, lat, txt, net_cfg, TrainConfig(max_train_steps=2, learning_rate=1e-2, seed=3))
    assert isinstance(result.network, LohaNetwork)
    initial = LohaNetwork.build(
        tf.inference_models()[0].model.diffusion_model, None, None, net_cfg, torch.Generator().manual_seed(3)
    ).state_dict_kohya()
    trained = result.network.state_dict_kohya()
    assert trained.keys() == initial.keys() and all(
        k.rsplit(".", 1)[1] in ("alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") for k in trained
    )
    assert all(math.isfinite(float(v.float().abs().max())) for v in trained.values())
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert any(k.endswith("hada_w2_a") for k in changed)  # zero at init, so the diff is now non-zero
    assert result.state.global_step == 2


def test_network_node_algo_and_start_from():
    from sdxl_lora_trainer.nodes.network_node import NetworkSettings

    kw = {
        "network_dim": 4,
        "network_alpha": 2.0,
        "conv_dim": 0,
        "conv_alpha": 1.0,
        "train_unet": True,
        "train_clip_l": False,
        "train_clip_g": False,
        "dropout": 0.0,
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "block_dims": "",
        "block_alphas": "",
        "conv_block_dims": "",
        "conv_block_alphas": "",
        "block_lr_weight": "",
    }
    out = NetworkSettings.execute(**kw, start_from="none", algo="lokr", lokr_factor=8)
    config = out.result[0].config
    assert (config.algo, config.factor) == ("lokr", 8)
    with pytest.raises(FileNotFoundError):  # continuing LoHa/LoKr files: tests/host/network/test_continue_files.py
        NetworkSettings.execute(**kw, start_from="some_lora.safetensors", algo="loha", lokr_factor=-1)


def test_metadata_names_lycoris():
    from sdxl_lora_trainer.trainer.run.lora_output import network_metadata

    assert network_metadata(NetworkConfig(algo="lokr", factor=4)) == {
        "dim": 4,
        "alpha": 1.0,
        "dropout": None,
        "module": "lycoris.kohya",
        "args": {"algo": "lokr", "factor": "4", "dropout": None},
    }
    assert "module" not in network_metadata(NetworkConfig())
