"""Which modules get LoRA on ComfyUI's full-size SDXL, under which kohya names, dims, alphas and block indexes.

ComfyUI's own UNetModel (SDXL config) and CLIPTextModel (CLIP-L / CLIP-G configs) are built on the meta device, so
nothing but the small LoRA weights is allocated; the network is compared with lora_keys.json, which kohya's
create_network wrote on its own SDXL U-Net and transformers' text encoders.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import comfy.ops
import pytest
import torch
from comfy.clip_model import CLIPTextModel
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.network.lora import LoRANetwork

COMFY_DIR = Path(comfy.ops.__file__).resolve().parent

# comfy/model_detection.py's SDXL unet config (supported_models.SDXL, num_head_channels 64)
SDXL_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

UNET_CASES = ["case_a_unet_linear_default", "case_b_unet_with_conv_dim"]
TE_CASES = ["case_c_text_encoders"]
OTHER_ENTRIES = {"_meta", "saved_state_dict_keys_a_plus_c", "quirk_class_attribute_mutation"}


@pytest.fixture(scope="module")
def sdxl_meta():
    """(unet, te1, te2): ComfyUI's SDXL U-Net and both text encoders, every weight on meta."""
    ops = comfy.ops.disable_weight_init
    unet = UNetModel(**SDXL_UNET, dtype=torch.float32, device="meta", operations=ops)
    te1 = CLIPTextModel(json.loads((COMFY_DIR / "sd1_clip_config.json").read_text()), torch.float32, "meta", ops)
    te2 = CLIPTextModel(json.loads((COMFY_DIR / "clip_config_bigg.json").read_text()), torch.float32, "meta", ops)
    for m in (unet, te1, te2):
        assert all(p.device.type == "meta" for p in m.parameters())
    return unet, te1, te2


def config_for(args: dict, **flags) -> NetworkConfig:
    """The golden entry's create_network arguments, parsed the way kohya parses --network_args strings."""
    return NetworkConfig.from_kohya_kwargs(
        args["network_dim"], args["network_alpha"], **flags, **args.get("kwargs", {})
    )


def build(sdxl_meta, config: NetworkConfig, seed: int = 0) -> LoRANetwork:
    unet, te1, te2 = sdxl_meta
    return LoRANetwork.build(unet, te1, te2, config, torch.Generator().manual_seed(seed))


def describe(lora) -> dict:
    d = {
        "name": lora.lora_name,
        "kind": lora.kind,
        "in": lora.in_dim,
        "out": lora.out_dim,
        "rank": lora.lora_dim,
        "alpha": lora.alpha.item(),
        "alpha_buffer_dtype": str(lora.alpha.dtype).replace("torch.", ""),
        "scale": lora.scale,
        "dim_source": lora.dim_source,
    }
    if lora.kind != "linear":
        d.update(kernel=list(lora.kernel_size), stride=list(lora.stride), padding=list(lora.padding))
    if lora.lora_name.startswith("lora_unet_"):
        d["block_index"] = lora.block_index
    return d


def encoder_of(name: str) -> str:
    return {"lora_unet": "unet", "lora_te1": "te1", "lora_te2": "te2"}[
        name.split("_", 2)[0] + "_" + name.split("_", 2)[1]
    ]


def test_every_golden_case_is_covered(golden):
    cases = set(golden("lora_keys")) - OTHER_ENTRIES
    assert cases == set(UNET_CASES + TE_CASES), "lora_keys.json has a case this test does not check"


@pytest.mark.parametrize("case", UNET_CASES + TE_CASES)
def test_modules_match_kohya(golden, sdxl_meta, case):
    entry = golden("lora_keys")[case]
    te_case = case in TE_CASES
    cfg = config_for(entry["args"], train_unet=not te_case, train_te1=te_case, train_te2=te_case)
    net = build(sdxl_meta, cfg)
    got = [describe(lora) for lora in net.loras]
    want = entry["modules"]
    assert [g["name"] for g in got] == [w["name"] for w in want]  # same set, same (creation) order
    for g, w in zip(got, want):
        assert g == {k: w[k] for k in g}, g["name"]
        assert set(w) == set(g), g["name"]
        assert g["scale"] == w["alpha"] / w["rank"]
    counts = Counter(f"{encoder_of(lora.lora_name)}:{lora.kind}" for lora in net.loras)
    assert dict(counts) == entry["counts"]
    assert len(net.loras) == entry["n_modules"]


def test_saved_state_dict_keys_shapes_dtypes(golden, sdxl_meta):
    entry = golden("lora_keys")["saved_state_dict_keys_a_plus_c"]
    net = build(sdxl_meta, config_for(entry["args"]))
    sd = net.state_dict_kohya()
    got = [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in sd.items()]
    assert [g["key"] for g in got] == [w["key"] for w in entry["keys"]]
    assert got == entry["keys"]
    assert len(sd) == entry["n_keys"]


def test_no_process_global_state(golden, sdxl_meta):
    """kohya: a default network built after a conv_dim one wraps 750 U-Net modules (quirk 11). Here: 722."""
    g = golden("lora_keys")
    quirk = g["quirk_class_attribute_mutation"]
    first, second = quirk["sequence"]
    a = build(sdxl_meta, config_for(first, train_te1=False, train_te2=False))
    b = build(sdxl_meta, config_for(second, train_te1=False, train_te2=False))
    assert len(a.loras) == quirk["counts_in_same_process"][0]["n_unet"]
    assert len(b.loras) == g["case_a_unet_linear_default"]["n_modules"] != quirk["counts_in_same_process"][1]["n_unet"]
    assert [lora.lora_name for lora in b.loras] == [m["name"] for m in g["case_a_unet_linear_default"]["modules"]]


def test_block_dims_and_alphas(golden, sdxl_meta):
    """block_dims/block_alphas: lora_keys.json has no such case, so the golden block_index of every case-b module is
    the reference: rank = block_dims[idx] (conv_block_dims for 3x3 convs), 0 drops it, alpha 0 = rank (int64)."""
    modules = golden("lora_keys")["case_b_unet_with_conv_dim"]["modules"]
    block_dims = [0] + [(i % 4) * 4 for i in range(1, 22)] + [0]  # some blocks disabled (dim 0)
    block_alphas = [float(i % 3) for i in range(23)]  # alpha 0 in every third block
    conv_block_dims = [0] + [8 if i % 2 else 0 for i in range(1, 22)] + [0]
    conv_block_alphas = [0.5] * 23
    cfg = NetworkConfig(
        network_dim=16,
        network_alpha=8.0,
        block_dims=block_dims,
        block_alphas=block_alphas,
        conv_block_dims=conv_block_dims,
        conv_block_alphas=conv_block_alphas,
        train_te1=True,
        train_te2=True,
    )
    net = build(sdxl_meta, cfg)
    by_name = {lora.lora_name: lora for lora in net.unet_loras}
    expected = []
    for m in modules:
        idx = m["block_index"]
        conv = m["kind"] == "conv3x3"
        dim = (conv_block_dims if conv else block_dims)[idx]
        if dim == 0:
            assert m["name"] not in by_name
            continue
        expected.append(m["name"])
        lora = by_name[m["name"]]
        alpha = (conv_block_alphas if conv else block_alphas)[idx]
        assert lora.lora_dim == dim, m["name"]
        if alpha == 0:
            assert lora.alpha.dtype == torch.int64 and lora.alpha.item() == dim and lora.scale == 1.0
        else:
            assert lora.alpha.dtype == torch.float32 and lora.alpha.item() == alpha and lora.scale == alpha / dim
        assert lora.dim_source == ("conv_block_dims" if conv else "block_dims")
    assert [lora.lora_name for lora in net.unet_loras] == expected
    # block dims are U-Net only: the TEs keep network_dim / network_alpha
    assert len(net.te1_loras) == 72 and len(net.te2_loras) == 192
    assert {(lora.lora_dim, lora.alpha.item()) for lora in net.te1_loras + net.te2_loras} == {(16, 8.0)}


def test_block_lr_weight_zero_drops_blocks(golden, sdxl_meta):
    modules = golden("lora_keys")["case_a_unet_linear_default"]["modules"]
    weights = [1.0] * 23
    weights[5] = 0.0
    weights[20] = 0.0
    net = build(sdxl_meta, NetworkConfig(block_lr_weight=weights, train_te1=False, train_te2=False))
    assert [lora.lora_name for lora in net.loras] == [m["name"] for m in modules if m["block_index"] not in (5, 20)]


def test_from_kohya_state_dict_rebuilds_the_same_network(golden, sdxl_meta):
    """kohya's create_network_from_weights: dims/alphas per module from the file, conv modules included."""
    for args, te in (
        (golden("lora_keys")["case_b_unet_with_conv_dim"]["args"], False),
        (golden("lora_keys")["saved_state_dict_keys_a_plus_c"]["args"], True),
    ):
        src = build(sdxl_meta, config_for(args, train_te1=te, train_te2=te), seed=1)
        with torch.no_grad():
            for lora in src.loras:
                lora.lora_up.weight.normal_(generator=torch.Generator().manual_seed(2))
        sd = src.state_dict_kohya()
        cfg = NetworkConfig.from_kohya_state_dict(sd)
        assert (cfg.train_te1, cfg.train_te2, cfg.train_unet) == (te, te, True)
        dst = build(sdxl_meta, cfg, seed=3)
        assert [describe(lora) | {"dim_source": None} for lora in dst.loras] == [
            describe(lora) | {"dim_source": None} for lora in src.loras
        ]
        dst.load_kohya(sd)
        out = dst.state_dict_kohya()
        assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_unknown_module_in_file_is_named(sdxl_meta):
    cfg = NetworkConfig(
        module_dims=(("lora_unet_input_blocks_4_1_proj_in", 4, 1.0), ("lora_unet_input_blocks_99_1_proj_in", 4, 1.0)),
        train_te1=False,
        train_te2=False,
    )
    with pytest.raises(ValueError, match="lora_unet_input_blocks_99_1_proj_in"):
        build(sdxl_meta, cfg)
