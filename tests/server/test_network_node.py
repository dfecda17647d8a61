"""The Network node through a real ComfyUI server: LoRA+ ratios, continuing from files, DoRA."""

from __future__ import annotations

import json

import pytest
from comfy_server import ServerError
from dataset_factory import kohya_folder
from example_prompts import train_then_test, training_only
from safetensors import safe_open

RES = 64


@pytest.fixture(scope="module")
def folder(server) -> str:
    kohya_folder(server.base / "input" / "ds_network", {"1_cat": [(64, 64), (64, 48)]})
    return "ds_network"


def saved_file(server, entry: dict) -> str:
    report = entry["outputs"]["7"]["text"][0]
    name = next(ln for ln in report.splitlines() if ln.startswith("lora_name: "))[len("lora_name: ") :]
    return str(server.base / "models" / "loras" / name)


def queue_errors(server, prompt: dict, node: str) -> str:
    with pytest.raises(ServerError) as err:
        server.queue(prompt)
    reply = str(err.value)
    assert "-> 400" in reply, reply
    errors = json.loads(reply.split(": ", 1)[1])["node_errors"][node]["errors"]
    return " ".join(e["details"] for e in errors)


def test_loraplus_ratios_reach_the_optimizer_groups_and_the_metadata(server, folder):
    prompt = training_only(train_then_test(folder, steps=1, seed=3, resolution=RES, lr=1e-3, output_name="plus"))
    prompt["6"]["inputs"].update(loraplus_lr_ratio=16.0, loraplus_unet_lr_ratio=8.0)
    entry = server.run_successfully(prompt)
    report = entry["outputs"]["7"]["text"][0]
    assert "parameter groups (kohya's names): unet lr 0.001, unet plus lr 0.008" in report, report
    with safe_open(saved_file(server, entry), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert (args["loraplus_lr_ratio"], args["loraplus_unet_lr_ratio"]) == ("16.0", "8.0")

    plain = training_only(train_then_test(folder, steps=1, seed=3, resolution=RES, lr=1e-3, output_name="noplus"))
    report = server.run_successfully(plain)["outputs"]["7"]["text"][0]
    assert "parameter groups (kohya's names): unet lr 0.001\n" in report + "\n", report


def test_loraplus_with_loha_is_refused_at_queue_time(server, folder):
    prompt = training_only(train_then_test(folder, steps=1, seed=3, resolution=RES, output_name="plusloha"))
    prompt["6"]["inputs"].update(algo="loha", loraplus_lr_ratio=16.0)
    messages = queue_errors(server, prompt, "6")
    assert "LoRA+ (loraplus_*_lr_ratio) is not supported with algo 'loha'" in messages, messages
    assert not server.trained_loras("plusloha*")


def test_start_from_mismatches_are_refused_at_queue_time(server, folder):
    first = training_only(train_then_test(folder, steps=1, seed=4, resolution=RES, output_name="unetonly"))
    start = saved_file(server, server.run_successfully(first))
    name = start.split("/models/loras/", 1)[1]
    prompt = training_only(train_then_test(folder, steps=1, seed=4, resolution=RES, output_name="mismatch"))
    prompt["6"]["inputs"].update(start_from=name, train_clip_l=True)
    messages = queue_errors(server, prompt, "6")
    assert "has no CLIP-L modules (lora_te1_ keys), so train_clip_l has nothing to continue" in messages, messages
    prompt["6"]["inputs"].update(train_clip_l=False, algo="dora")
    messages = queue_errors(server, prompt, "6")
    assert f"start_from {name} is a lora file, but algo is 'dora': set algo to 'lora'" in messages, messages
