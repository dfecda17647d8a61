"""Validation loss and proof of learning, through a real ComfyUI server (POST /prompt).

* Validation: a dataset with a validation_split and the 'Validation' node: the validation loss arrives live as a
  second series of progress events, comes out of the Train node's last output (drawn here by ComfyUI's own 'Plot
  Loss Graph'), is written to the CSV/JSONL logs and recorded in the LoRA's ss_validation_* metadata.
* Learning: the tiny model trained on one image until it overfits; ComfyUI's LoraLoader + KSampler at the training
  seed then sample a latent much closer to that image's latent than the same KSampler without the LoRA.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from comfy_server import WsListener
from dataset_factory import kohya_folder
from example_prompts import add_latent_probes, probe_latent, train_then_test, training_only
from safetensors import safe_open

RES = 64
TRAIN = "7"


def lora_file(server, name: str) -> str:
    files = server.trained_loras(f"{name}_*.safetensors")
    assert len(files) == 1, files
    return files[0]


def test_validation_loss_is_a_live_series_an_output_a_log_column_and_metadata(server):
    kohya_folder(server.base / "input" / "ds_val", {"1_cat": [(64, 64), (64, 64), (64, 64)]})
    prompt = training_only(train_then_test("ds_val", steps=4, seed=2, resolution=RES, output_name="validated"))
    prompt["3"]["inputs"].update(validation_split=0.34, validation_seed=3)  # 3 images: 2 train, 1 held out
    prompt["30"] = {
        "class_type": "SDXLLoraValidation",
        "inputs": {
            "validate_every_n_steps": 1,
            "validate_every_n_epochs": 1,
            "max_validation_steps": 0,
            "validation_seed": -1,
        },
    }
    prompt[TRAIN]["inputs"]["validation"] = ["30", 0]
    prompt["31"] = {"class_type": "LossGraphNode", "inputs": {"loss": [TRAIN, 8], "filename_prefix": "val_graph"}}
    with WsListener(server) as ws:
        entry = server.run_successfully(prompt, timeout=1200)
    events = [d for d in ws.of_type("sdxl_lora_trainer.progress") if d.get("node") == TRAIN]
    steps = [d["step"] for d in events if not d.get("validation")]
    validations = [d for d in events if d.get("validation")]
    assert steps == [1, 2, 3, 4]
    # 2 batches per epoch: epochs end at steps 2 and 4, where both kinds are due (computed once)
    assert [(d["step"], d["kind"]) for d in validations] == [
        (1, "step"),
        (2, "step+epoch"),
        (3, "step"),
        (4, "step+epoch"),
    ]
    assert all(isinstance(d["val_loss"], float) and math.isfinite(d["val_loss"]) for d in validations)
    # each validation event follows its step's progress event
    order = [(d["step"], bool(d.get("validation"))) for d in events]
    assert order == [(s, v) for s in (1, 2, 3, 4) for v in (False, True)]
    # the node's validation_loss output, drawn by ComfyUI's Plot Loss Graph
    assert entry["outputs"]["31"]["images"], entry["outputs"].get("31")
    report = entry["outputs"][TRAIN]["text"][0]
    assert "validation loss" in report and "validation: 1 images in 1 batches" in report
    path = lora_file(server, "validated")
    rows = Path(path.replace(".safetensors", ".log.csv")).read_text().splitlines()
    assert rows[0].endswith(",val_loss")
    logged = [float(r.rsplit(",", 1)[1]) for r in rows[1:]]
    assert logged == pytest.approx([d["val_loss"] for d in validations], rel=1e-6)
    jsonl = [json.loads(line) for line in Path(path.replace(".safetensors", ".log.jsonl")).read_text().splitlines()]
    assert [row["val_loss"] for row in jsonl] == logged
    meta = safe_open(path, "pt").metadata()
    assert meta["ss_num_validation_images"] == "1"
    assert meta["ss_validation_split"] == "0.34"
    assert meta["ss_validate_every_n_steps"] == "1" and meta["ss_validate_every_n_epochs"] == "1"
    assert meta["ss_validation_seed"] == "None" and meta["ss_max_validation_steps"] == "None"
    assert meta["ss_num_train_images"] == "2"


def learning_prompt(folder: str, image: str, *, steps: int, seed: int, lr: float, sample_steps: int) -> dict:
    """Train on ``folder`` (one image), then KSampler at the training seed with and without the LoRA; the two
    samples and the training image's latent (VAEEncode, what the latent cache holds) are saved as .latent files."""
    prompt = train_then_test(
        folder, steps=steps, seed=seed, resolution=RES, lr=lr, sample_steps=sample_steps, output_name="learned"
    )
    prompt["6"]["inputs"].update(conv_dim=8, conv_alpha=8.0)  # the tiny U-Net's attention alone fits slowly
    for node in ("12", "13"):
        prompt[node]["inputs"].update(seed=seed, cfg=1.0)
    for node in ("14", "15", "16", "17", "18"):
        del prompt[node]
    add_latent_probes(prompt, {"base": "12", "lora": "13"}, image, ["1", 2], "proof")
    return prompt


@pytest.mark.slow
@pytest.mark.timeout(1800)  # minutes on a loaded shared CPU; well under one on a free core
def test_a_lora_overfit_on_one_image_samples_that_image_through_comfyui(server, capsys):
    root = kohya_folder(server.base / "input" / "ds_learn", {"1_cat": [(RES, RES)]})
    shutil.copyfile(root / "1_cat" / "img_0.png", server.base / "input" / "learn_target.png")
    server.run_successfully(
        learning_prompt("ds_learn", "learn_target.png", steps=60, seed=11, lr=1e-2, sample_steps=20), timeout=1200
    )
    base, lora, target = (probe_latent(server.base / "output", "proof", kind) for kind in ("base", "lora", "target"))
    assert target is not None and base is not None and lora is not None, "a latent probe saved nothing"
    assert base.shape == lora.shape == target.shape == (1, 4, RES // 8, RES // 8)
    mse_base = float(((base - target) ** 2).mean())
    mse_lora = float(((lora - target) ** 2).mean())
    with capsys.disabled():
        print(
            f"\nsampled latent vs the training latent: MSE without LoRA {mse_base:.4f}, with LoRA {mse_lora:.4f} "
            f"({mse_base / mse_lora:.1f}x closer)"
        )
    assert mse_lora * 2.5 < mse_base
