"""A LoRA written by trainer/network (file_names, safetensors_file, metadata) is listed by ComfyUI at once, under
the returned name, and LoraLoader loads it."""

from __future__ import annotations

import logging
import os

import comfy.lora
import comfy.utils
import folder_paths
import nodes
import pytest
import torch

from sdxl_lora_trainer.trainer import atomic_files
from sdxl_lora_trainer.trainer.network.file_names import unique_lora_path
from sdxl_lora_trainer.trainer.network.metadata import build_metadata
from sdxl_lora_trainer.trainer.network.safetensors_file import read_lora, save_lora

UNET_MODULES = ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
TE_MODULES = ("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1")
RANK, ALPHA = 4, 2.0


@pytest.fixture
def loras_dir(tmp_path):
    """A fresh folder registered for "loras" (as extra_model_paths.yaml would), removed again afterwards."""
    d = tmp_path / "loras"
    d.mkdir()
    folder_paths.add_model_folder_path("loras", str(d))
    folder_paths.filename_list_cache.pop("loras", None)
    yield d
    folder_paths.folder_names_and_paths["loras"][0].remove(str(d))
    folder_paths.filename_list_cache.pop("loras", None)


def _kohya_lora(model, clip, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya-keyed LoRA tensors for a few tiny-SDXL modules, shaped from the weights ComfyUI maps the keys to."""
    g = torch.Generator().manual_seed(seed)
    unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
    clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    unet_sd = model.model.state_dict()
    clip_sd = clip.cond_stage_model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, str] = {}
    for name in UNET_MODULES + TE_MODULES:
        weight_key = unet_map[name] if name in unet_map else clip_map[name]
        out_f, in_f = (unet_sd if name in unet_map else clip_sd)[weight_key].shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, in_f, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, RANK, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
        targets[name] = weight_key
    return tensors, targets


def _metadata(prompt=None, workflow=None) -> dict[str, str]:
    return build_metadata(
        {
            "learning_rate": 1e-4,
            "max_train_steps": 10,
            "num_epochs": 1,
            "num_batches_per_epoch": 10,
            "optimizer": "torch.optim.adamw.AdamW",
            "seed": 0,
            "output_name": "tiny",
        },
        {
            "num_train_images": 10,
            "resolution": 1024,
            "dataset_dirs": {"10_x": {"n_repeats": 10, "img_count": 1}},
            "tag_frequency": {"10_x": {"x": 1}},
        },
        {"dim": RANK, "alpha": ALPHA},
        step=10,
        epoch=1,
        prompt=prompt,
        extra_pnginfo={"workflow": workflow} if workflow is not None else None,
    )


def test_new_file_is_listed_immediately_under_the_returned_name(tiny, loras_dir):
    model, clip, _ = tiny
    before = folder_paths.get_filename_list("loras")  # primes ComfyUI's cache, as an open UI would
    tensors, _ = _kohya_lora(model, clip)
    path, name = unique_lora_path(loras_dir, "trained/tiny", "tiny", "run1")
    save_lora(tensors, path, _metadata(), torch.float16)

    listed = folder_paths.get_filename_list("loras")
    assert name == "trained/tiny/tiny_run1.safetensors" and name not in before
    assert name in listed
    assert folder_paths.get_full_path("loras", name) == str(path)
    assert not [n for n in listed if n.endswith(".tmp") or "/." in n or n.startswith(".")]

    # a second run into the now existing subfolder is listed at once as well, and the first file stays
    path2, name2 = unique_lora_path(loras_dir, "trained/tiny", "tiny", "run1")
    save_lora(tensors, path2, _metadata(), torch.float16)
    listed = folder_paths.get_filename_list("loras")
    assert name2 == "trained/tiny/tiny_run1_2.safetensors" and {name, name2} <= set(listed)


def test_listed_even_when_the_folder_mtime_does_not_move(tiny, loras_dir, monkeypatch):
    """Coarse timestamps: the rename lands in the same tick ComfyUI cached; the writer must still invalidate."""
    model, clip, _ = tiny
    sub = loras_dir / "sub"
    sub.mkdir()
    folder_paths.get_filename_list("loras")
    frozen = os.stat(sub)  # the mtime ComfyUI just cached
    real_publish = atomic_files.publish

    def coarse_publish(tmp, path, overwrite):
        real_publish(tmp, path, overwrite)
        os.utime(path.parent, ns=(frozen.st_atime_ns, frozen.st_mtime_ns))  # temp file + rename in the same tick

    monkeypatch.setattr(atomic_files, "publish", coarse_publish)
    path, name = unique_lora_path(loras_dir, "sub", "tiny", "run2")
    save_lora(_kohya_lora(model, clip)[0], path, _metadata(), None)
    assert name in folder_paths.get_filename_list("loras")


def test_lora_loader_loads_it_with_its_metadata(tiny, loras_dir, caplog):
    import tiny_sdxl

    _, clip, _ = tiny
    fresh = tiny_sdxl.make_model(7)  # patched and unpatched below; the session fixture must stay untouched
    tensors, targets = _kohya_lora(fresh, clip, seed=3)
    prompt = {"3": {"class_type": "SomeTrainer", "inputs": {"steps": 10}}}
    workflow = {"nodes": [{"id": 3}], "links": []}
    path, name = unique_lora_path(loras_dir, "", "tiny", "run3")
    written = save_lora(tensors, path, _metadata(prompt, workflow), torch.float16)
    assert name in folder_paths.get_filename_list("loras")

    with caplog.at_level(logging.WARNING):
        model_lora, clip_lora = nodes.LoraLoader().load_lora(fresh, clip, name, 0.5, 1.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert set(model_lora.patches) == {targets[n] for n in UNET_MODULES}
    assert set(clip_lora.patcher.patches) == {targets[n] for n in TE_MODULES}

    # what ComfyUI reads back: our metadata, byte for byte
    sd, meta = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    assert meta == written and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert set(sd) == set(tensors) and all(v.dtype == torch.float16 for v in sd.values())

    # the patched weight is W + strength * alpha / rank * up @ down of the fp16 values saved
    n = UNET_MODULES[0]
    key = targets[n]
    w = fresh.model.state_dict()[key].clone()
    saved, _ = read_lora(path)
    delta = saved[f"{n}.lora_up.weight"].float() @ saved[f"{n}.lora_down.weight"].float()
    model_lora.patch_model()
    try:
        patched = model_lora.model.state_dict()[key].clone()
    finally:
        model_lora.unpatch_model()
    torch.testing.assert_close(patched, w + 0.5 * (ALPHA / RANK) * delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(fresh.model.state_dict()[key], w)
