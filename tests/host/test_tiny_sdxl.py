"""The tiny SDXL fixture is what the engine will see in ComfyUI: check its types and shapes."""

import time

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import torch


def test_types_are_comfyuis_own(tiny):
    model, clip, vae = tiny
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE)
    assert hasattr(clip.cond_stage_model, "clip_l") and hasattr(clip.cond_stage_model, "clip_g")


def test_weights_are_initialised_and_seeded():
    import tiny_sdxl

    a = tiny_sdxl.make_model(3).model.diffusion_model.state_dict()
    b = tiny_sdxl.make_model(3).model.diffusion_model.state_dict()
    c = tiny_sdxl.make_model(4).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for k, v in a.items():
        assert torch.isfinite(v).all(), k
        assert v.abs().max() < 10, k  # torch.empty garbage would show up here


def test_sdxl_forward_shapes(tiny, capsys):
    model, clip, vae = tiny
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    assert cond.shape == (1, 77, 64) and pooled.shape == (1, 32)
    latent = vae.encode(torch.rand(1, 64, 96, 3))
    assert latent.shape == (1, 4, 8, 12)
    y = model.model.encode_adm(
        pooled_output=pooled, width=96, height=64, crop_w=0, crop_h=0, target_width=96, target_height=64
    )
    assert y.shape == (1, 32 + 1536)
    t0 = time.perf_counter()
    out = model.model.apply_model(torch.randn(1, 4, 8, 12), torch.tensor([1.0]), c_crossattn=cond, y=y)
    dt = time.perf_counter() - t0
    assert out.shape == (1, 4, 8, 12) and torch.isfinite(out).all()
    n_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    n_clip = sum(p.numel() for p in clip.cond_stage_model.parameters())
    n_vae = sum(p.numel() for p in vae.first_stage_model.parameters())
    with capsys.disabled():
        print(
            f"\ntiny SDXL: unet {n_unet:,} params, clip {n_clip:,}, vae {n_vae:,}; one 64x96 forward {dt * 1000:.1f} ms"
        )
