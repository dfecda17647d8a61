"""API-format prompts of the example workflows, for the server tests and the demo.

``train_then_test`` mirrors example_workflows/train_then_test_sdxl_lora.json: the tiny-model loader
stands in for CheckpointLoaderSimple unless a checkpoint name is given.
"""

from __future__ import annotations

import copy
from typing import Any


def train_then_test(
    folder: str,
    *,
    steps: int = 20,
    seed: int = 1,
    checkpoint: str | None = None,
    resolution: int = 128,
    lr: float = 1e-3,
    output_name: str = "demo_lora",
    sample_steps: int = 4,
    prompt_text: str = "cat photo 0, shape 0",
) -> dict[str, Any]:
    loader = (
        {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
        if checkpoint
        else {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0, "v_prediction": False}}
    )
    return {
        "1": loader,
        "2": {
            "class_type": "SDXLLoraImagesFromFolder",
            "inputs": {
                "folder": folder,
                "layout": "auto",
                "caption_extension": ".txt",
                "default_repeats": 1,
                "recursive": True,
                "strict_captions": False,
                "exif_transpose": True,
            },
        },
        "3": {
            "class_type": "SDXLLoraBuckets",
            "inputs": {
                "images": ["2", 0],
                "resolution_width": resolution,
                "resolution_height": resolution,
                "enable_bucket": True,
                "min_bucket_reso": 64,
                "max_bucket_reso": 2 * resolution,
                "bucket_reso_steps": 32,
                "bucket_no_upscale": False,
                "batch_size": 1,
                "flip_aug": False,
                "crop_conditioning": "kohya",
                "shuffle_caption": False,
                "keep_tokens": 0,
                "keep_tokens_separator": "",
                "caption_dropout_rate": 0.0,
                "caption_tag_dropout_rate": 0.0,
                "caption_prefix": "",
                "caption_suffix": "",
            },
        },
        "4": {
            "class_type": "SDXLLoraCacheLatents",
            "inputs": {
                "dataset": ["3", 0],
                "vae": ["1", 2],
                "batch_size": 2,
                "float32_vae": False,
                "cache_to_disk": False,
                "disk_folder": "",
            },
        },
        "5": {
            "class_type": "SDXLLoraCacheText",
            "inputs": {"dataset": ["3", 0], "clip": ["1", 1], "cache_to_disk": False, "disk_folder": ""},
        },
        "6": {
            "class_type": "SDXLLoraNetwork",
            "inputs": {
                "network_dim": 8,
                "network_alpha": 8.0,
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
                "start_from": "none",
                "algo": "lora",
                "lokr_factor": -1,
            },
        },
        "7": {
            "class_type": "SDXLLoraTrain",
            "inputs": {
                "model": ["1", 0],
                "dataset": ["3", 0],
                "latents": ["4", 0],
                "network": ["6", 0],
                "text": ["5", 0],
                "clip": ["1", 1],
                "max_train_steps": steps,
                "max_train_epochs": 0,
                "learning_rate": lr,
                "unet_lr": 0.0,
                "clip_l_lr": 0.0,
                "clip_g_lr": 0.0,
                "optimizer": "AdamW",
                "optimizer_args": "",
                "lr_scheduler": "constant",
                "lr_warmup_steps": 0.0,
                "lr_scheduler_num_cycles": 1,
                "lr_scheduler_power": 1.0,
                "gradient_accumulation_steps": 1,
                "max_grad_norm": 1.0,
                "scale_weight_norms": 0.0,
                "seed": seed,
                "train_dtype": "fp32",
                "full_bf16": False,
                "gradient_checkpointing": True,
                "output_name": output_name,
                "output_subfolder": "sdxl_lora_trainer",
                "save_precision": "fp16",
                "overwrite": False,
            },
        },
        "8": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": ["7", 3],
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt_text, "clip": ["1", 1]}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "11": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": resolution, "height": resolution, "batch_size": 1},
        },
        "12": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["9", 0],
                "negative": ["10", 0],
                "latent_image": ["11", 0],
                "seed": 7,
                "steps": sample_steps,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "13": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["8", 0],
                "positive": ["9", 0],
                "negative": ["10", 0],
                "latent_image": ["11", 0],
                "seed": 7,
                "steps": sample_steps,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "14": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["14", 0], "filename_prefix": "base"}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "with_lora"}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["7", 5]}},
    }


#: the run-option nodes with_run_options adds: train node input -> (node id, class, its inputs at their defaults)
_RUN_OPTION_NODES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "checkpointing": (
        "20",
        "SDXLLoraCheckpointing",
        {
            "save_every_n_steps": 0,
            "save_every_n_epochs": 0,
            "keep_last_n": 0,
            "save_state_every_n_steps": 0,
            "save_state_on_cancel": True,
            "resume_from": "",
        },
    ),
    "previews": (
        "21",
        "SDXLLoraPreviews",
        {
            "clip": ["1", 1],
            "vae": ["1", 2],
            "prompts": "cat photo 0",
            "negative": "",
            "every_n_steps": 0,
            "width": 64,
            "height": 64,
            "steps": 2,
            "cfg": 3.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "seed": 0,
        },
    ),
    "ema": (
        "22",
        "SDXLLoraEMA",
        {
            "decay": 0.999,
            "warmup_power": 0.0,
            "update_every_n_steps": 1,
            "start_step": 0,
            "save_as": "extra_file",
            "use_for_previews": True,
        },
    ),
    "logging": ("23", "SDXLLoraLogging", {"wandb_project": "", "wandb_run_name": ""}),
}


def with_run_options(
    prompt: dict[str, Any],
    *,
    checkpointing: dict[str, Any] | None = None,
    previews: dict[str, Any] | None = None,
    ema: dict[str, Any] | None = None,
    logging: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add 'Save Every N & Resume' (node 20), 'Sample Previews' (node 21), 'EMA' (node 22) and/or 'Logging (W&B)'
    (node 23) to a train_then_test prompt, each with the given inputs over its defaults."""
    out = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    chosen = {"checkpointing": checkpointing, "previews": previews, "ema": ema, "logging": logging}
    for input_name, overrides in chosen.items():
        if overrides is None:
            continue
        node_id, class_type, defaults = _RUN_OPTION_NODES[input_name]
        out[node_id] = {"class_type": class_type, "inputs": {**copy.deepcopy(defaults), **overrides}}
        out["7"]["inputs"][input_name] = [node_id, 0]
    return out


def training_only(prompt: dict[str, Any]) -> dict[str, Any]:
    """Drop the sampling half (nodes 8-17): the train node is an output node and runs alone."""
    return {k: v for k, v in prompt.items() if int(k) < 8 or int(k) >= 18}


def add_latent_probes(
    prompt: dict[str, Any], samplers: dict[str, str], image: str, vae: list[Any], prefix: str
) -> None:
    """Save what each sampler made and the latent of ``image`` (a LoadImage name, VAEEncode'd as the latent cache
    does) as ``<prefix>/<kind>_*.latent``; ``samplers`` maps a kind ("base", "lora") to a KSampler node id. The
    learning proofs (server test, demo) compare latents rather than decoded pixels."""
    for kind, sampler in samplers.items():
        prompt[f"probe_{kind}"] = {
            "class_type": "SaveLatent",
            "inputs": {"samples": [sampler, 0], "filename_prefix": f"{prefix}/{kind}"},
        }
    prompt["probe_image"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    prompt["probe_encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["probe_image", 0], "vae": vae}}
    prompt["probe_target"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["probe_encode", 0], "filename_prefix": f"{prefix}/target"},
    }


def probe_latent(output_dir: Any, prefix: str, kind: str) -> Any:
    """The newest latent ``add_latent_probes`` saved for ``kind`` under ComfyUI's output folder, or None."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted((Path(output_dir) / prefix).glob(f"{kind}_*.latent"), key=lambda p: p.stat().st_mtime)
    return load_file(str(files[-1]))["latent_tensor"].float() if files else None
