"""LoRA module math against network_math.json (kohya's LoRAModule / LoRAInfModule / max-norm on CPU), plus the
parts of trainer/network/ that need no model: init draws, dropouts, config parsing, param groups."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sdxl_lora_trainer.trainer.network.config import (
    NetworkConfig,
    PartSettings,
    block_lr_weight_from_kohya,
    parse_block_list,
)
from sdxl_lora_trainer.trainer.network.lora import LoRAModule, LoRANetwork
from sdxl_lora_trainer.trainer.network.targets import sdxl_block_index

# network_math.json holds float32 results written as doubles: compare at float32 resolution (README: ~1e-6 rel).
F32 = {"rtol": 2e-6, "atol": 1e-6}


def T(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_base(case: dict) -> torch.nn.Module:
    """The base module of a case, rebuilt from its repr and loaded with the golden W / bias."""
    repr_ = case["base_module"]
    if case["kind"] == "linear":
        out_f, in_f = case["W_shape"]
        base = torch.nn.Linear(in_f, out_f, bias=case["bias"] is not None)
    else:
        m = re.match(
            r"Conv2d\((\d+), (\d+), kernel_size=\((\d+), (\d+)\), stride=\((\d+), (\d+)\), padding=\((\d+), (\d+)\)",
            repr_,
        )
        i, o, kh, kw, sh, sw, ph, pw = map(int, m.groups())
        base = torch.nn.Conv2d(i, o, (kh, kw), (sh, sw), (ph, pw), bias=case["bias"] is not None)
    assert repr(base) == repr_
    with torch.no_grad():
        base.weight.copy_(T(case["W"], case["W_shape"]))
        if case["bias"] is not None:
            base.bias.copy_(torch.tensor(case["bias"], dtype=torch.float32))
    return base.eval()


def make_lora(case: dict, base: torch.nn.Module, name: str = "lora_unet_test") -> LoRAModule:
    lora = LoRAModule(name, base, case["rank"], case["alpha_arg"], generator=gen(), multiplier=case["multiplier"])
    with torch.no_grad():
        lora.lora_down.weight.copy_(T(case["lora_down"], case["lora_down_shape"]))
        lora.lora_up.weight.copy_(T(case["lora_up"], case["lora_up_shape"]))
    return lora.eval()


@pytest.fixture(scope="module")
def math_cases(golden):
    return golden("network_math")["cases"]


CASE_KINDS = ["linear", "conv3x3"]  # network_math.json's cases, in file order


def test_every_math_case_is_covered(math_cases):
    assert [c["kind"] for c in math_cases] == CASE_KINDS, "network_math.json changed: parametrize the new cases"


@pytest.mark.parametrize("idx", range(len(CASE_KINDS)), ids=CASE_KINDS)
def test_module_layout_alpha_and_scale(math_cases, idx):
    case = math_cases[idx]
    lora = make_lora(case, make_base(case))
    assert lora.kind == case["kind"]
    assert tuple(lora.lora_down.weight.shape) == tuple(case["lora_down_shape"])
    assert tuple(lora.lora_up.weight.shape) == tuple(case["lora_up_shape"])
    assert lora.lora_down.bias is None and lora.lora_up.bias is None
    assert lora.alpha.item() == case["alpha_buffer"]
    assert str(lora.alpha.dtype) == "torch." + case["alpha_buffer_dtype"]
    assert lora.scale == case["scale"]
    # the original module is referenced, never a submodule: the state dict is kohya's three keys
    assert list(lora.state_dict()) == ["alpha", "lora_down.weight", "lora_up.weight"]
    if case["kind"] != "linear":
        base = lora.org_module
        assert lora.lora_down.kernel_size == base.kernel_size and lora.lora_down.padding == base.padding
        assert lora.lora_down.stride == base.stride
        assert lora.lora_up.kernel_size == (1, 1) and lora.lora_up.stride == (1, 1)


@pytest.mark.parametrize("idx", range(len(CASE_KINDS)), ids=CASE_KINDS)
def test_forward_through_hooks(math_cases, idx):
    case = math_cases[idx]
    base = make_base(case)
    lora = make_lora(case, base)
    x = T(case["x"], case["x_shape"])
    before = base(x)
    torch.testing.assert_close(before, T(case["base_output"], before.shape), **F32)
    net = LoRANetwork.from_modules([lora]).eval()
    with net.attach():
        assert len(base._forward_hooks) == 1
        y = base(x)
    assert tuple(y.shape) == tuple(case["lora_forward_output_shape"])
    torch.testing.assert_close(y, T(case["lora_forward_output"], y.shape), **F32)
    # detached: no hook left, the module computes exactly what it did before
    assert len(base._forward_hooks) == 0
    assert torch.equal(base(x), before)
    # apply() is the same computation without hooks
    torch.testing.assert_close(lora.apply(x, before), y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx", range(len(CASE_KINDS)), ids=CASE_KINDS)
def test_mixed_precision_branch_is_kohyas_autocast(math_cases, idx, dtype):
    """A bf16/fp16 run: the layer and its input in that dtype, the LoRA weights float32. kohya runs its LoRAModule
    under autocast, so the branch computes in the low dtype; ours must give the same output and float32 weight
    gradients bit for bit (a branch computed in float32 and cast back rounds differently)."""
    case = math_cases[idx]
    base = make_base(case).to(dtype)
    lora = make_lora(case, base)
    x = T(case["x"], case["x_shape"]).to(dtype)
    with torch.autocast("cpu", dtype=dtype):  # kohya's LoRAModule.forward, as accelerate runs it
        expected = base(x) + lora.lora_up(lora.lora_down(x)) * lora.multiplier * lora.scale
    expected.float().square().sum().backward()
    expected_grads = [p.grad.clone() for p in (lora.lora_down.weight, lora.lora_up.weight)]
    lora.zero_grad(set_to_none=True)
    with LoRANetwork.from_modules([lora]).eval().attach():
        y = base(x)
    assert y.dtype == dtype
    assert torch.equal(y, expected)
    y.float().square().sum().backward()
    for p, g in zip((lora.lora_down.weight, lora.lora_up.weight), expected_grads):
        assert p.grad.dtype == torch.float32
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("idx", range(len(CASE_KINDS)), ids=CASE_KINDS)
def test_delta_and_merged_weight(math_cases, idx):
    case = math_cases[idx]
    base = make_base(case)
    lora = make_lora(case, base)
    w_before = base.weight.detach().clone()
    delta = lora.delta_weight()
    merged = lora.merged_weight()
    torch.testing.assert_close(delta, T(case["delta_weight_get_weight"], case["W_shape"]), **F32)
    torch.testing.assert_close(merged, T(case["merged_weight"], case["W_shape"]), **F32)
    assert torch.equal(base.weight, w_before)  # merged_weight() never touches the module
    x = T(case["x"], case["x_shape"])
    bias = base.bias.detach() if base.bias is not None else None
    if case["kind"] == "linear":
        out = torch.nn.functional.linear(x, merged, bias)
    else:
        out = torch.nn.functional.conv2d(x, merged, bias, base.stride, base.padding)
    torch.testing.assert_close(out, T(case["merged_module_output"], out.shape), **F32)
    # the merged module and the hooked module agree as closely as kohya measured them to
    with LoRANetwork.from_modules([lora]).eval().attach():
        hooked = base(x)
    assert (hooked - out).abs().max().item() <= 4 * case["max_abs_diff_forward_vs_merged"] + 1e-6


def test_max_norm_regularization(golden):
    for entry in golden("network_math")["max_norm_regularization"]:
        after_key = next(k for k in entry if k.startswith("modules_after"))
        loras = []
        for m in entry["modules_in"]:
            down_shape, up_shape = m["lora_down_shape"], m["lora_up_shape"]
            if m["kind"] == "linear":
                base = torch.nn.Linear(down_shape[1], up_shape[0])
            else:
                k = tuple(down_shape[2:])
                base = torch.nn.Conv2d(down_shape[1], up_shape[0], k, padding=k[0] // 2)
            lora = LoRAModule(m["name"], base, m["rank"], m["alpha"], generator=gen())
            assert lora.kind == m["kind"]
            with torch.no_grad():
                lora.lora_down.weight.copy_(T(m["lora_down"], down_shape))
                lora.lora_up.weight.copy_(T(m["lora_up"], up_shape))
            loras.append(lora)
        net = LoRANetwork.from_modules(loras)
        assert list(net.state_dict()) == entry["state_dict_key_order"]
        params_before = list(net.parameters())
        keys_scaled, mean_norm, max_norm = net.apply_max_norm(entry["max_norm_value"]).read()
        assert keys_scaled == entry["returned_keys_scaled"]
        assert mean_norm == pytest.approx(entry["returned_mean_norm"], rel=2e-6)
        assert max_norm == pytest.approx(entry["returned_max_norm"], rel=2e-6)
        # in place: the very same Parameter objects now hold kohya's scaled values
        assert list(net.parameters()) == params_before
        after = {m["name"]: m for m in entry[after_key]}
        for lora, m in zip(loras, entry["modules_in"]):
            a = after[lora.lora_name]
            torch.testing.assert_close(lora.lora_down.weight, T(a["lora_down"], m["lora_down_shape"]), **F32)
            torch.testing.assert_close(lora.lora_up.weight, T(a["lora_up"], m["lora_up_shape"]), **F32)


# ----------------------------------------------------------------------------------------------------------------
# alpha 0 (quirk 12), init, dropout


def test_alpha_zero_or_none_means_rank_and_int64():
    base = torch.nn.Linear(8, 6)
    for a in (0, 0.0, None, torch.tensor(0.0)):
        lora = LoRAModule("lora_unet_x", base, 4, a, generator=gen())
        assert lora.alpha.dtype == torch.int64 and lora.alpha.item() == 4 and lora.scale == 1.0
    lora = LoRAModule("lora_unet_x", base, 4, 1, generator=gen())
    assert lora.alpha.dtype == torch.float32 and lora.scale == 0.25


@pytest.mark.parametrize("conv", [False, True])
def test_init_matches_kohyas_draws_from_a_seeded_global_rng(conv):
    """kohya's LoRAModule draws from the global RNG: default init of down, of up, then kaiming(down). Re-derived in
    plain torch here; ours must give the same numbers from a private generator and leave the global RNG alone."""
    base = torch.nn.Conv2d(5, 7, 3, padding=1) if conv else torch.nn.Linear(5, 7)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        if conv:
            down = torch.nn.Conv2d(5, 3, 3, 1, 1, bias=False)
            torch.nn.Conv2d(3, 7, 1, 1, bias=False)
        else:
            down = torch.nn.Linear(5, 3, bias=False)
            torch.nn.Linear(3, 7, bias=False)
        torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        expected = down.weight.detach().clone()
        state = torch.get_rng_state()
        lora = LoRAModule("lora_unet_x", base, 3, 1.0, generator=torch.Generator().manual_seed(1234))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(lora.lora_down.weight, expected)
    assert torch.count_nonzero(lora.lora_up.weight) == 0


def test_init_needs_a_cpu_generator():
    with pytest.raises(ValueError, match="Generator"):
        LoRAModule("lora_unet_x", torch.nn.Linear(4, 4), 2, 1.0, generator=None)


def _trained_lora(seed=0, **kw):
    base = torch.nn.Linear(6, 5)
    lora = LoRAModule("lora_unet_x", base, 4, 2.0, generator=gen(seed), **kw)
    with torch.no_grad():
        lora.lora_up.weight.copy_(torch.randn(5, 4, generator=gen(seed + 1)))
    return lora


def test_rank_dropout_mask_and_rescale():
    p = 0.25
    lora = _trained_lora(rank_dropout=p).train()
    x = torch.randn(3, 7, 6, generator=gen(5))
    torch.manual_seed(11)
    got = lora.delta(x)
    torch.manual_seed(11)
    mask = torch.rand((3, 4)) > p  # kohya's mask, per sample x rank, from the global RNG of x's device
    lx = lora.lora_down(x) * mask.unsqueeze(1)
    expected = lora.lora_up(lx) * 1.0 * (lora.scale * (1.0 / (1.0 - p)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    lora.eval()  # no dropout in eval
    torch.testing.assert_close(lora.delta(x), lora.lora_up(lora.lora_down(x)) * 1.0 * lora.scale, rtol=0, atol=0)


def test_rank_dropout_mask_shape_for_convs():
    base = torch.nn.Conv2d(3, 4, 3, padding=1)
    lora = LoRAModule("lora_unet_c", base, 2, 1.0, generator=gen(), rank_dropout=0.5).train()
    with torch.no_grad():
        lora.lora_up.weight.fill_(1.0)
    x = torch.randn(4, 3, 5, 5, generator=gen(2))
    torch.manual_seed(3)
    got = lora.delta(x)
    torch.manual_seed(3)
    mask = (torch.rand((4, 2)) > 0.5)[:, :, None, None]
    expected = lora.lora_up(lora.lora_down(x) * mask) * 1.0 * (lora.scale * 2.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_neuron_dropout_and_module_dropout_draw_as_kohya():
    """kohya: F.dropout on the down output and ``torch.rand(1) < p`` for module dropout, both from the global RNG
    (the training loop owns, seeds and saves it); the same RNG state gives the same masks."""
    lora = _trained_lora(dropout=0.5).train()
    x = torch.randn(2, 9, 6, generator=gen(7))
    torch.manual_seed(4)
    a = lora.delta(x)
    torch.manual_seed(4)
    b = lora.delta(x)
    assert torch.equal(a, b)
    torch.manual_seed(4)
    lx = torch.nn.functional.dropout(lora.lora_down(x), p=0.5)
    torch.testing.assert_close(a, lora.lora_up(lx) * 1.0 * lora.scale, rtol=0, atol=0)

    md = _trained_lora(module_dropout=0.5).train()
    torch.manual_seed(0)
    draws = torch.rand(20)  # one rand(1) per call
    torch.manual_seed(0)
    for r in draws:
        d = md.delta(x)
        assert (d is None) == bool(r.item() < 0.5)
    out = torch.zeros(2, 9, 5)
    md.eval()
    assert md.apply(x, out) is not out


def test_attach_is_exclusive_and_always_detaches():
    base = torch.nn.Linear(4, 4)
    lora = LoRAModule("lora_unet_x", base, 2, 1.0, generator=gen())
    net = LoRANetwork.from_modules([lora])
    with pytest.raises(ValueError, match="boom"), net.attach():
        with pytest.raises(RuntimeError, match="already attached"), net.attach():
            pass
        raise ValueError("boom")
    assert len(base._forward_hooks) == 0 and not net.attached
    # the original module is not a submodule of the network
    assert all(m is not base for m in net.modules())


# ----------------------------------------------------------------------------------------------------------------
# config parsing, block index, param groups


def test_sdxl_block_index():
    assert sdxl_block_index("lora_unet_input_blocks_4_1_proj_in") == 5
    assert sdxl_block_index("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q") == 11
    assert sdxl_block_index("lora_unet_output_blocks_8_0_skip_connection") == 21
    assert sdxl_block_index("lora_unet_time_embed_0") == 0
    assert sdxl_block_index("lora_unet_out_2") == 22
    assert sdxl_block_index("lora_te1_text_model_encoder_layers_0_mlp_fc1") == -1


def test_parse_block_lists():
    assert parse_block_list(",".join(["4"] * 23), "block_dims", True) == (4,) * 23
    assert parse_block_list(" 1, 2.5" + ",0" * 21, "block_alphas", False)[:2] == (1.0, 2.5)
    with pytest.raises(ValueError, match="block_dims must have 23 .* got 22"):
        parse_block_list(",".join(["4"] * 22), "block_dims", True)
    with pytest.raises(ValueError, match="element 3 .*'x'.* integer"):
        parse_block_list("1,2,3,x" + ",1" * 19, "block_dims", True)
    with pytest.raises(ValueError, match="conv_block_dims must have 23"):
        NetworkConfig(block_dims=[4] * 23, conv_block_dims="1,2")


def test_config_rules():
    assert NetworkConfig(conv_dim=0).conv_dim is None and not NetworkConfig(conv_dim=0).conv_enabled
    assert NetworkConfig(network_alpha=None).network_alpha == 1.0
    with pytest.raises(ValueError, match="block_alphas needs block_dims"):
        NetworkConfig(block_alphas=[1.0] * 23)
    with pytest.raises(ValueError, match="rank_dropout"):
        NetworkConfig(rank_dropout=1.0)
    cfg = NetworkConfig(
        network_dim=8,
        network_alpha=4.0,
        conv_dim=2,
        block_dims=[0] + [8] * 21 + [0],
        block_lr_weight=[1.0] * 5 + [0.0] + [1.0] * 17,
    )
    dims, alphas, conv_dims, conv_alphas = cfg.resolved_block_dims()
    assert dims[5] == 0 and conv_dims[5] == 0 and dims[4] == 8 and conv_dims[4] == 2
    assert alphas == [4.0] * 23 and conv_alphas == [1.0] * 23  # conv_alpha None -> 1.0 (kohya)


def test_from_kohya_kwargs_and_block_lr_presets():
    cfg = NetworkConfig.from_kohya_kwargs(
        16,
        8,
        0.1,
        conv_dim="4",
        conv_alpha="1",
        rank_dropout="0.2",
        down_lr_weight="1,1,1,1,1,1,1,1,0",
        mid_lr_weight="2",
        up_lr_weight="zeros+0.5",
    )
    assert (cfg.network_dim, cfg.network_alpha, cfg.conv_dim, cfg.conv_alpha) == (16, 8.0, 4, 1.0)
    assert cfg.dropout == 0.1 and cfg.rank_dropout == 0.2 and cfg.block_mode
    assert cfg.block_lr_weight == tuple([1.0] + [1.0] * 8 + [0.0] + [2.0, 1.0, 1.0] + [0.5] * 9 + [1.0])
    with pytest.raises(ValueError, match="unknown network_args"):
        NetworkConfig.from_kohya_kwargs(4, 1, foo="1")
    with pytest.raises(ValueError, match="param_groups"):
        NetworkConfig.from_kohya_kwargs(4, 1, loraplus_lr_ratio="16")
    cos = block_lr_weight_from_kohya(down_lr_weight="cosine")
    assert cos[1] == pytest.approx(1.0) and cos[9] == pytest.approx(0.0) and cos[10:] == (1.0,) * 13
    assert block_lr_weight_from_kohya(up_lr_weight=[0.5, 0.5]) == tuple([1.0] * 13 + [0.5, 0.5] + [1.0] * 8)
    assert block_lr_weight_from_kohya() is None
    with pytest.raises(ValueError, match="unknown block lr weight"):
        block_lr_weight_from_kohya(down_lr_weight="wavy")


def _toy_network(block_names=("lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_2_2_conv")):
    loras = []
    for name in (
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        *block_names,
    ):
        loras.append(LoRAModule(name, torch.nn.Linear(4, 4), 2, 1.0, generator=gen()))
    return LoRANetwork.from_modules(loras)


def _ids(group):
    return [id(p) for p in group["params"]]


def lrs(learning_rate: float, loraplus_lr_ratio: float | None = None) -> PartSettings:
    return PartSettings(learning_rate, loraplus_lr_ratio)


def test_param_groups_like_kohya():
    net = _toy_network()
    te1, te2, u1, u2 = net.loras
    groups, descs = net.param_groups(lrs(1e-4), lrs(5e-5), lrs(5e-5))
    assert descs == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert _ids(groups[0]) == [id(p) for lora in (te1, te2) for p in (lora.lora_down.weight, lora.lora_up.weight)]

    groups, descs = net.param_groups(lrs(1e-4, 16), lrs(5e-5, 4), lrs(5e-5, 4))
    assert descs == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == [5e-5, 5e-5 * 4, 1e-4, 1e-4 * 16]
    assert _ids(groups[1]) == [id(te1.lora_up.weight), id(te2.lora_up.weight)]
    assert _ids(groups[2]) == [id(u1.lora_down.weight), id(u2.lora_down.weight)]

    groups, descs = net.param_groups(lrs(1e-4), lrs(5e-5), lrs(0.0))  # different TE lrs: split; lr 0 drops the group
    assert descs == ["textencoder 1", "unet"]

    groups, descs = net.param_groups(lrs(1e-4), lrs(5e-5), lrs(5e-5, 4))  # different TE LoRA+ ratios: split too
    assert descs == ["textencoder 1", "textencoder 2", "textencoder 2 plus", "unet"]
    assert [g["lr"] for g in groups] == [5e-5, 5e-5, 5e-5 * 4, 1e-4]

    with pytest.raises(ValueError, match="unet has no learning_rate"):
        net.param_groups(PartSettings(), lrs(5e-5), lrs(5e-5))

    weights = [1.0] * 23
    weights[5] = 0.5
    weights[15] = 0.0  # output_blocks_2 -> block 15
    groups, descs = net.param_groups(lrs(1e-4), lrs(5e-5), lrs(5e-5), block_lr_weight=weights)
    assert descs == ["textencoder", "unet_block5"]  # block 15 has lr 0 -> dropped
    assert groups[1]["lr"] == 1e-4 * 0.5 and _ids(groups[1]) == [id(u1.lora_down.weight), id(u1.lora_up.weight)]
    assert all(p.requires_grad for p in net.parameters())


def test_state_dict_kohya_and_load_roundtrip():
    net = _toy_network()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(9)))
    sd = net.state_dict_kohya()
    assert list(sd) == list(net.state_dict())
    assert all(v.device.type == "cpu" for v in sd.values())
    half = net.state_dict_kohya(torch.float16)
    assert all(v.dtype == torch.float16 for v in half.values())
    cfg = NetworkConfig.from_kohya_state_dict(sd)
    assert cfg.module_dims[0] == ("lora_te1_text_model_encoder_layers_0_mlp_fc1", 2, 1.0)
    assert cfg.train_te1 and cfg.train_te2 and cfg.train_unet and cfg.conv_dim is None
    other = _toy_network()
    other.load_kohya(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    bad = dict(sd)
    bad["lora_unet_nope.alpha"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match="1 unknown keys.*lora_unet_nope"):
        other.load_kohya(bad)
    bad = {k: v for k, v in sd.items() if not k.endswith("fc1.lora_up.weight")}
    with pytest.raises(ValueError, match="2 missing keys"):
        other.load_kohya(bad)
    bad = dict(sd)
    bad["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"] = torch.tensor(3.0)
    with pytest.raises(ValueError, match="alpha"):
        other.load_kohya(bad)
    with pytest.raises(ValueError, match="not kohya SDXL LoRA keys"):
        NetworkConfig.from_kohya_state_dict({"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="missing .*lora_up"):
        NetworkConfig.from_kohya_state_dict({"lora_unet_a.lora_down.weight": torch.zeros(2, 4)})
