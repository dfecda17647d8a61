"""The cache nodes do no VAE/CLIP work on a re-run, nor in a restarted ComfyUI with the disk cache."""

from __future__ import annotations

import tempfile
from pathlib import Path

from comfy_server import ComfyServer, execution_error
from dataset_factory import kohya_folder


def cache_prompt(folder: str, to_disk: bool, caption_prefix: str = "") -> dict:
    return {
        "1": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0, "v_prediction": False}},
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
                "resolution_width": 64,
                "resolution_height": 64,
                "enable_bucket": True,
                "min_bucket_reso": 32,
                "max_bucket_reso": 128,
                "bucket_reso_steps": 32,
                "bucket_no_upscale": False,
                "batch_size": 1,
                "flip_aug": True,
                "crop_conditioning": "kohya",
                "shuffle_caption": False,
                "keep_tokens": 0,
                "keep_tokens_separator": "",
                "caption_dropout_rate": 0.0,
                "caption_tag_dropout_rate": 0.0,
                "caption_prefix": caption_prefix,
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
                "cache_to_disk": to_disk,
                "disk_folder": "",
            },
        },
        "5": {
            "class_type": "SDXLLoraCacheText",
            "inputs": {"dataset": ["3", 0], "clip": ["1", 1], "cache_to_disk": to_disk, "disk_folder": ""},
        },
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def calls(server) -> dict:
    return server.get("/sdxl_lora_trainer/stats")["encoder_calls"]


def run_ok(server, prompt):
    entry = server.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return entry


def test_rerun_does_no_encoder_work_and_an_edit_reencodes_only_itself(server):
    # captions no other test uses: the server (and its in-memory caches) is shared by the whole session
    kohya_folder(server.base / "input" / "ds_cache", {"1_rerun": [(64, 64), (64, 48), (48, 64)]})
    before = calls(server)
    run_ok(server, cache_prompt("ds_cache", False))
    first = calls(server)
    assert first["vae"] > before["vae"] and first["clip"] - before["clip"] == 3  # 3 captions
    run_ok(server, cache_prompt("ds_cache", False))  # unchanged graph: ComfyUI's cache, nothing runs
    assert calls(server) == first
    # a changed caption prefix makes the nodes run again: every caption changes, no image does
    run_ok(server, cache_prompt("ds_cache", False, caption_prefix="sks"))
    second = calls(server)
    assert second["vae"] == first["vae"], "latents were re-encoded although no image changed"
    assert second["clip"] - first["clip"] == 3
    # one edited caption file: only that caption is encoded again
    (server.base / "input" / "ds_cache" / "1_rerun" / "img_1.txt").write_text("a different caption")
    run_ok(server, cache_prompt("ds_cache", False, caption_prefix="sks"))
    third = calls(server)
    assert third["vae"] == first["vae"] and third["clip"] - second["clip"] == 1


def test_restarted_comfyui_reuses_the_disk_cache():
    base = Path(tempfile.mkdtemp(prefix="comfy-restart-"))
    kohya_folder(base / "input" / "ds_disk", {"1_dog": [(64, 64), (64, 48)]})
    with ComfyServer(base_dir=base) as first:
        run_ok(first, cache_prompt("ds_disk", True))
        encoded = calls(first)
        assert encoded["vae"] > 0 and encoded["clip"] == 2
    with ComfyServer(base_dir=base) as second:
        entry = run_ok(second, cache_prompt("ds_disk", True))
        assert calls(second) == {"vae": 0, "clip": 0}
        reports = " ".join(str(v) for v in entry["outputs"].values())
        assert "from disk" in reports


def test_max_token_length_and_bucketing_off_through_the_graph(server):
    """Cache Text's max_token_length reaches the encodings, its report and the LoRA's ss_max_token_length; with
    enable_bucket off, images of other sizes are scaled and centre-cropped to the resolution instead of refused."""
    import re

    from example_prompts import train_then_test, training_only
    from safetensors import safe_open

    root = server.base / "input" / "ds_tokens"
    kohya_folder(root, {"1_cat": [(64, 64), (96, 72), (48, 80)]})
    (root / "1_cat" / "img_1.txt").write_text(", ".join(f"tag{i} word{i}" for i in range(20)))

    def prompt(name: str, max_token_length: str | None) -> dict:
        p = training_only(train_then_test("ds_tokens", steps=2, seed=3, resolution=64, output_name=name))
        p["3"]["inputs"]["enable_bucket"] = False
        if max_token_length is not None:
            p["5"]["inputs"]["max_token_length"] = max_token_length
        return p

    def lora_meta(name: str) -> dict:
        (path,) = server.trained_loras(f"{name}_*.safetensors")
        with safe_open(str(path), "pt") as f:
            return f.metadata()

    entry = run_ok(server, prompt("tok_default", None))
    report = entry["outputs"]["5"]["text"][0]
    assert "kohya max_token_length 75 (default)" in report
    (line,) = [x for x in report.splitlines() if "img_1.png:" in x]
    tokens, cut = map(int, re.search(r"img_1\.png: (\d+) tokens, (\d+) cut", line).groups())
    assert tokens > 75 and tokens - cut == 75
    assert "truncated: 1 captions are longer than 75 tokens" in report
    meta = lora_meta("tok_default")
    assert meta["ss_max_token_length"] == "None" and meta["ss_enable_bucket"] == "False"

    entry = run_ok(server, prompt("tok_150", "150"))
    report = entry["outputs"]["5"]["text"][0]
    assert "kohya max_token_length 150: context 152" in report and "truncated" not in report
    assert lora_meta("tok_150")["ss_max_token_length"] == "150"
