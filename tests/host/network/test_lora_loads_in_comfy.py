"""Our kohya-format file loads in ComfyUI's own LoRA loader with every key used, and ComfyUI's patched weights give
the same outputs as our network attached with hooks: key names AND the alpha/rank scale convention agree.

Runs on the tiny SDXL (ComfyUI's ModelPatcher / comfy.sd.CLIP); the shared fixture is restored bit-exactly.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sd
import pytest
import torch

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.network.lora import LoRANetwork

PROMPT = "a photo of a cat"


def parts(model, clip):
    cm = clip.cond_stage_model
    return model.model.diffusion_model, cm.clip_l.transformer, cm.clip_g.transformer


def unet_inputs(model, clip):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 12, generator=g)
    t = torch.tensor([3.0, 0.5])
    y = model.model.encode_adm(
        pooled_output=pooled, width=96, height=64, crop_w=0, crop_h=0, target_width=96, target_height=64
    )
    return x, t, cond.repeat(2, 1, 1), y.repeat(2, 1)


def run_unet(model, inputs) -> torch.Tensor:
    x, t, cond, y = inputs
    with torch.no_grad():
        return model.model.apply_model(x, t, c_crossattn=cond, y=y)


def run_clip(clip) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)


def snapshot(*modules) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def same_weights(modules, snap) -> bool:
    return all(torch.equal(v, s[k]) for m, s in zip(modules, snap) for k, v in m.state_dict().items())


def all_forward_hooks(*roots) -> int:
    return sum(len(m._forward_hooks) for r in roots for m in r.modules())


def make_network(model, clip, seed: int = 0) -> LoRANetwork:
    """conv LoRA with conv_alpha 0 (alpha = rank, int64 buffer, quirk 12) and both TEs; lora_up randomised."""
    unet, te1, te2 = parts(model, clip)
    cfg = NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=3, conv_alpha=0)
    net = LoRANetwork.build(unet, te1, te2, cfg, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.normal_(0.0, 0.5, generator=g)
    return net.eval()


def test_attach_and_detach_leave_the_model_unchanged(tiny):
    model, clip, _ = tiny
    roots = parts(model, clip)
    snap = snapshot(*roots)
    inputs = unet_inputs(model, clip)
    base_unet, (base_cond, base_pooled) = run_unet(model, inputs), run_clip(clip)
    net = make_network(model, clip)
    assert all_forward_hooks(*roots) == 0
    with net.attach():
        assert all_forward_hooks(*roots) == len(net.loras)
        hooked = run_unet(model, inputs)
        hooked_cond, _ = run_clip(clip)
    assert all_forward_hooks(*roots) == 0
    assert (hooked - base_unet).abs().max() > 1e-2 and (hooked_cond - base_cond).abs().max() > 1e-2
    after_unet, (after_cond, after_pooled) = run_unet(model, inputs), run_clip(clip)
    assert torch.equal(after_unet, base_unet)
    assert torch.equal(after_cond, base_cond) and torch.equal(after_pooled, base_pooled)
    assert same_weights(roots, snap)
    # the network holds references only: none of ComfyUI's modules is one of its submodules
    ours = {id(m) for m in net.modules()}
    assert not any(id(m) in ours for r in roots for m in r.modules())


def test_kohya_file_loads_in_comfyui_and_matches_hooks(tiny, caplog):
    model, clip, _ = tiny
    roots = parts(model, clip)
    snap = snapshot(*roots)
    net = make_network(model, clip)
    kinds = {lora.kind for lora in net.loras}
    assert kinds == {"linear", "conv1x1", "conv3x3"} and net.te1_loras and net.te2_loras
    assert {lora.alpha.dtype for lora in net.loras} == {torch.float32, torch.int64}

    inputs = unet_inputs(model, clip)
    base_unet, (base_cond, base_pooled) = run_unet(model, inputs), run_clip(clip)
    with net.attach():
        want_unet = run_unet(model, inputs)
        want_cond, want_pooled = run_clip(clip)

    sd = net.state_dict_kohya()
    try:
        with caplog.at_level(logging.WARNING):
            new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        problems = [
            r.getMessage()
            for r in caplog.records
            if "not loaded" in r.getMessage().lower() or r.levelno >= logging.ERROR
        ]
        assert problems == []
        # every module became a patch on exactly the weight it was built on
        assert all(k.startswith("diffusion_model.") and k.endswith(".weight") for k in new_model.patches)
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

    # ComfyUI patches W + alpha/rank * up.down in float32; we add the branch to the output: float32 rounding only
    torch.testing.assert_close(got_cond, want_cond, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got_pooled, want_pooled, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got_unet_out, want_unet, rtol=1e-5, atol=3e-5)
    # ... and the LoRA changes them far beyond that tolerance, so the comparison means something
    assert (want_unet - base_unet).abs().max() > 0.1
    assert (want_cond - base_cond).abs().max() > 0.1 and (want_pooled - base_pooled).abs().max() > 0.1

    # unloading restored the shared fixture
    assert same_weights(roots, snap)
    assert torch.equal(run_unet(model, inputs), base_unet)


def test_training_through_hooks(tiny):
    """Gradients reach every U-Net LoRA weight through the hooks (ComfyUI's weights get none), and the dropouts
    draw from the global RNG as kohya's do: the same RNG state gives the same output, another state another."""
    model, clip, _ = tiny
    x, t, cond, y = unet_inputs(model, clip)
    unet = model.model.diffusion_model

    def network(**dropouts) -> LoRANetwork:
        cfg = NetworkConfig(
            network_dim=4, network_alpha=2.0, conv_dim=3, conv_alpha=1.0, train_te1=False, train_te2=False, **dropouts
        )
        net = LoRANetwork.build(unet, None, None, cfg, torch.Generator().manual_seed(0))
        with torch.no_grad():
            for lora in net.loras:
                lora.lora_up.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
        return net.train()

    def forward(net: LoRANetwork, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with net.attach():
                return model.model.apply_model(x, t, c_crossattn=cond, y=y)

    net = network(dropout=0.1, rank_dropout=0.2)
    out = forward(net, 7)
    params = [p for lora in net.loras for p in (lora.lora_down.weight, lora.lora_up.weight)]
    grads = torch.autograd.grad(out.square().mean(), params)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in unet.parameters())

    net = network(dropout=0.1, rank_dropout=0.2, module_dropout=0.3)
    a, b, c = forward(net, 7), forward(net, 7), forward(net, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    net.eval()
    with net.attach(), torch.no_grad():
        assert not torch.equal(model.model.apply_model(x, t, c_crossattn=cond, y=y), a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saved_in_half_precision_still_loads(tiny, caplog, dtype):
    """--save_precision fp16/bf16: alpha is cast too (kohya), ComfyUI still maps every key."""
    model, clip, _ = tiny
    sd = make_network(model, clip).state_dict_kohya(dtype)
    assert {v.dtype for v in sd.values()} == {dtype}
    try:
        with caplog.at_level(logging.WARNING):
            new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
        assert [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()] == []
        assert len(new_model.patches) + len(new_clip.patcher.patches) == len(sd) // 3
    finally:
        comfy.model_management.unload_all_models()
