"""DoRA (LyCORIS LoCon + weight decomposition) on the tiny SDXL: files load in ComfyUI's LoraLoader with every key
used and give the same outputs as the training hooks; the magnitude and the norm come from the weights as ComfyUI
loaded them (fp16 / fp8 storage, a LoRA merged by an upstream LoraLoader); training and continuing run.

Same pattern as test_lycoris.py; the shared fixture is restored bit-exactly.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sd
import pytest
import tiny_sdxl
import torch
import training_fixtures as tf
from test_lora_loads_in_comfy import all_forward_hooks, parts, run_clip, run_unet, same_weights, snapshot, unet_inputs

from sdxl_lora_trainer.trainer.comfyui.models import layer_weight
from sdxl_lora_trainer.trainer.network.config import NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.network.dora import DoraNetwork, input_axis_norm
from sdxl_lora_trainer.trainer.network.lora import LoRANetwork
from sdxl_lora_trainer.trainer.network.targets import TargetModule
from sdxl_lora_trainer.trainer.run.config import TrainConfig

CPU = torch.device("cpu")


def config(**kw) -> NetworkConfig:
    return NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=3, conv_alpha=1.0, algo="dora", **kw)


def randomise(net: DoraNetwork, seed: int, magnitude: bool = True) -> DoraNetwork:
    """Random lora_up/lora_down (and magnitude, unless ``magnitude`` is False: then it stays as initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                if magnitude:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5, generator=g))
            else:
                p.normal_(0.0, 0.3, generator=g)
    return net.eval()


def comfy_problems(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower() or r.levelno >= 40]


def test_file_loads_in_comfyui_and_matches_hooks(tiny, caplog):
    model, clip, _ = tiny
    roots = parts(model, clip)
    snap = snapshot(*roots)
    inputs = unet_inputs(model, clip)
    base_unet, (base_cond, base_pooled) = run_unet(model, inputs), run_clip(clip)

    net = DoraNetwork.build(*roots, config(), torch.Generator().manual_seed(0)).eval()
    with net.attach():  # the magnitude is taken at the first forward: no change at init
        torch.testing.assert_close(run_unet(model, inputs), base_unet, rtol=1e-5, atol=1e-5)
        cond, pooled = run_clip(clip)
    torch.testing.assert_close(cond, base_cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, base_pooled, rtol=1e-5, atol=1e-5)
    assert any(m.module_type == "conv2d" and m.shape[2:] == (3, 3) for m in net.unet_loras)  # 3x3 convs too

    randomise(net, 1)
    with net.attach():
        want_unet = run_unet(model, inputs)
        want_cond, want_pooled = run_clip(clip)
    assert all_forward_hooks(*roots) == 0 and same_weights(roots, snap)

    sd = net.state_dict_kohya()
    names = {lora.lora_name for lora in net.loras}
    for k in sd:
        name, weight = k.split(".", 1)
        assert name in names and weight in ("alpha", "dora_scale", "lora_up.weight", "lora_down.weight"), k
    assert sum(k.endswith(".dora_scale") for k in sd) == len(net.loras)
    try:
        with caplog.at_level(logging.WARNING):
            new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        assert comfy_problems(caplog) == []
        assert len(new_model.patches) == len(net.unet_loras)
        assert len(new_clip.patcher.patches) == len(net.te1_loras) + len(net.te2_loras)
        comfy.model_management.load_models_gpu([new_model])
        got_unet = run_unet(new_model, inputs)
        got_cond, got_pooled = run_clip(new_clip)
    finally:
        comfy.model_management.unload_all_models()

    # ComfyUI merges W' in float32; the hooks add x (W' - W) to x W: float32 rounding only
    torch.testing.assert_close(got_cond, want_cond, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_pooled, want_pooled, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_unet, want_unet, rtol=1e-5, atol=1e-4)
    assert (want_unet - base_unet).abs().max() > 0.1
    assert (want_cond - base_cond).abs().max() > 0.1
    assert same_weights(roots, snap) and torch.equal(run_unet(model, inputs), base_unet)

    # the file round-trips into a fresh network (strict load), magnitude included
    fresh = DoraNetwork.build(*roots, config(), torch.Generator().manual_seed(9))
    fresh.load_kohya(sd)
    back = fresh.state_dict_kohya()
    assert back.keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in back.items())
    with fresh.eval().attach():
        torch.testing.assert_close(run_unet(model, inputs), want_unet, rtol=1e-6, atol=1e-6)


def upstream_lora(model, clip) -> dict[str, torch.Tensor]:
    unet, te1, te2 = parts(model, clip)
    net = LoRANetwork.build(
        unet, te1, te2, NetworkConfig(network_dim=4, network_alpha=4.0, conv_dim=2), torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(4))
    return {k: v for k, v in net.state_dict_kohya().items() if k.startswith("lora_unet_")}


#: storage -> how far ComfyUI's result may be from the hooks', relative to the DoRA's change of the output: ComfyUI
#: rounds the merged weight back to the storage dtype (measured on CPU: fp16 7e-4, fp8 0.12, fp32 7e-7)
STORAGES = {"fp16": 1e-3, "fp8": 0.2, "upstream_lora": 1e-5}


@pytest.mark.parametrize("storage", list(STORAGES))
def test_magnitude_and_norm_come_from_the_weights_as_comfyui_loaded_them(tiny, caplog, storage):
    _, clip, _ = tiny
    if storage == "upstream_lora":
        model = comfy.sd.load_lora_for_models(tiny[0], None, upstream_lora(tiny[0], clip), 1.0, 0.0)[0]
    else:
        model = tiny_sdxl.make_model(0, weight_dtype={"fp16": torch.float16, "fp8": torch.float8_e4m3fn}[storage])
    unet = model.model.diffusion_model
    stored = {n: m.weight.detach().float().clone() for n, m in unet.named_modules() if hasattr(m, "weight")}
    try:
        comfy.model_management.load_models_gpu([model])  # an upstream LoRA is merged into the weights now
        inputs = unet_inputs(model, clip)
        base = run_unet(model, inputs)
        net = DoraNetwork.build(unet, None, None, config(train_te1=False, train_te2=False), torch.Generator())
        with net.eval().attach():
            torch.testing.assert_close(run_unet(model, inputs), base, rtol=1e-5, atol=1e-5)  # no change at init
        by_module = {id(m): n for n, m in unet.named_modules()}
        moved = 0
        for lora in net.loras:
            layer = lora.org_module[0]
            assert torch.equal(lora.dora_scale, input_axis_norm(layer_weight(layer, CPU)))
            moved += not torch.allclose(lora.dora_scale, input_axis_norm(stored[by_module[id(layer)]]), rtol=1e-6)
        assert (moved > 0) == (storage == "upstream_lora")  # the merged LoRA moved the norms; storage casts do not

        randomise(net, 5, magnitude=False)
        with net.attach():
            want = run_unet(model, inputs)
        with caplog.at_level(logging.WARNING):
            patched = comfy.sd.load_lora_for_models(model, None, net.state_dict_kohya(), 1.0, 0.0)[0]
        assert comfy_problems(caplog) == []
        comfy.model_management.load_models_gpu([patched])
        got = run_unet(patched, inputs)
    finally:
        comfy.model_management.unload_all_models()
    change = (want - base).abs().max()
    assert change > 0.1
    assert (got - want).abs().max() <= STORAGES[storage] * change, ((got - want).abs().max(), change)


def test_max_norm_and_param_groups_with_loraplus(tiny):
    model, clip, _ = tiny
    net = randomise(DoraNetwork.build(*parts(model, clip), config(), torch.Generator().manual_seed(0)), 2)
    groups, names = net.param_groups(PartSettings(1e-3, 4.0), PartSettings(1e-4), PartSettings(1e-4))
    assert names == ["textencoder", "unet", "unet plus"] and [g["lr"] for g in groups] == [1e-4, 1e-3, 4e-3]
    plus = {id(p) for p in groups[2]["params"]}
    assert plus == {id(m.lora_up.weight) for m in net.unet_loras}
    keys, mean, biggest = net.apply_max_norm(1e-3).read()
    assert keys == len(net.loras) and 0 < mean <= biggest <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_a_bf16_layer_adds_the_change_in_bf16_as_under_kohyas_autocast(kind):
    """The weight math (W + dW, its norm) in float32, the layer call with the change in the activation's dtype, as
    kohya's bf16 autocast makes that call. A float32 call of a bf16 activation rounds otherwise (and costs a float32
    matmul of the layer's full size)."""
    conv = kind == "conv3x3"
    base = (torch.nn.Conv2d(6, 5, 3, padding=1) if conv else torch.nn.Linear(16, 12)).to(torch.bfloat16)
    target = TargetModule("lora_unet_test", base, 4, 2.0, "test", conv, 0, True)
    net = randomise(DoraNetwork([DoraNetwork.build_module(target, config(), torch.Generator().manual_seed(0))]), 1)
    x = torch.randn((1, 6, 8, 8) if conv else (3, 16), generator=torch.Generator().manual_seed(2)).bfloat16()
    with net.attach():
        got = base(x)
    (module,) = net.loras
    with torch.no_grad():
        change = net.weight_change(module, base.weight.float())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = base(x) + module.op(x, change, None, **module.kw_dict)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_dropout_is_refused_for_dora():
    from sdxl_lora_trainer.nodes.common import QueueTimeError
    from sdxl_lora_trainer.nodes.network_node import NetworkSettings

    with pytest.raises(ValueError, match="dropout is not supported with algo 'dora'"):
        config(dropout=0.1)
    with pytest.raises(QueueTimeError, match="Set dropout to 0"):  # at queue time, one message on the node
        NetworkSettings.validate_inputs(algo="dora", dropout=0.1)
    assert NetworkSettings.validate_inputs(algo="dora", dropout=0.0, loraplus_lr_ratio=16.0) is True


def test_dora_training_run_changes_weights_and_magnitude():
    ds, lat, txt = tf.default_data()
    net_cfg = NetworkConfig(network_dim=4, network_alpha=1.0, conv_dim=2, train_te1=False, train_te2=False, algo="dora")
    result = tf.run_train(ds, lat, txt, net_cfg, TrainConfig(max_train_steps=2, learning_rate=1e-2, seed=3))
    assert isinstance(result.network, DoraNetwork) and result.state.global_step == 2
    unet = tf.inference_models()[0].model.diffusion_model
    trained = result.network.state_dict_kohya()
    for lora in result.network.loras:
        start = input_axis_norm(layer_weight(lora.org_module[0], CPU))
        assert not torch.equal(trained[f"{lora.lora_name}.dora_scale"], start)  # the magnitude learned
        assert trained[f"{lora.lora_name}.lora_up.weight"].abs().max() > 0
    assert unet is not None
