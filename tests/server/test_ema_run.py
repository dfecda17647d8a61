"""The EMA node through a real ComfyUI server: the _ema file is the EMA of the run's per-step weights, and a resumed
run averages exactly as an uninterrupted one."""

from __future__ import annotations

import glob
import json

import torch
from dataset_factory import kohya_folder
from example_prompts import train_then_test, training_only, with_run_options
from safetensors import safe_open
from safetensors.torch import load_file

RES = 64
DECAY = 0.7


def _prompt(folder: str, name: str, **options) -> dict:
    prompt = with_run_options(
        training_only(train_then_test(folder, steps=6, seed=21, resolution=RES, output_name=name)),
        ema={"decay": DECAY},
        **options,
    )
    prompt["7"]["inputs"]["save_precision"] = "fp32"  # the per-step files are the exact weights
    return prompt


def test_ema_file_is_the_average_of_the_steps_and_resumes_exactly(server):
    kohya_folder(server.base / "input" / "ds_ema", {"1_cat": [(64, 64), (64, 48)]})
    server.run_successfully(
        _prompt("ds_ema", "emarun", checkpointing={"save_every_n_steps": 1, "save_state_every_n_steps": 3})
    )

    final = [f for f in server.trained_loras("emarun_*.safetensors") if "-step" not in f and "_ema" not in f]
    assert len(final) == 1
    ema_path = final[0].replace(".safetensors", "_ema.safetensors")
    trained, averaged = load_file(final[0]), load_file(ema_path)
    assert trained.keys() == averaged.keys()
    steps = [load_file(f) for f in server.trained_loras("emarun_*-step00000?.safetensors")]
    assert len(steps) == 6 and len(server.trained_loras("emarun_*-step00000?_ema.safetensors")) == 6
    # the plain formula over the weights of steps 1..6 (the first update copies)
    expected = {k: v.double() for k, v in steps[0].items()}
    for weights in steps[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * weights[k].double() for k in expected}
    trainable = [k for k in trained if not k.endswith(".alpha")]
    for k in trainable:
        torch.testing.assert_close(averaged[k].double(), expected[k], rtol=1e-5, atol=1e-7)
        assert torch.equal(steps[-1][k], trained[k])
    assert sum(not torch.equal(trained[k], averaged[k]) for k in trainable) == len(trainable)
    with safe_open(ema_path, "pt") as f:
        meta = json.loads(f.metadata()["sdxl_lora_trainer.ema"])
    assert meta["decay"] == DECAY and meta["updates"] == 6

    states = glob.glob(str(server.base / "output" / "sdxl_lora_trainer" / "state" / "emarun_*" / "step-000003"))
    assert len(states) == 1
    entry = server.run_successfully(_prompt("ds_ema", "emaresumed", checkpointing={"resume_from": states[0]}))
    assert "_ema.safetensors" in entry["outputs"]["7"]["text"][0]
    resumed = [f for f in server.trained_loras("emaresumed_*.safetensors") if "_ema" not in f]
    again, again_ema = load_file(resumed[0]), load_file(resumed[0].replace(".safetensors", "_ema.safetensors"))
    for k in trained:
        assert torch.equal(trained[k], again[k]), k
        assert torch.equal(averaged[k], again_ema[k]), k


def _preview_pixels(server, entry: dict) -> list[bytes]:
    """The train node's previews as PreviewImage (node 18) wrote them."""
    return [
        (server.base / im["type"] / im["subfolder"] / im["filename"]).read_bytes()
        for im in entry["outputs"]["18"]["images"]
    ]


def test_previews_render_the_ema_when_asked_and_never_change_the_training(server):
    kohya_folder(server.base / "input" / "ds_ema_prev", {"1_cat": [(64, 64)]})

    def prompt(name: str, use_for_previews: bool) -> dict:
        p = with_run_options(
            training_only(train_then_test("ds_ema_prev", steps=4, seed=9, resolution=RES, output_name=name, lr=2e-2)),
            previews={"every_n_steps": 2, "steps": 3},
            ema={"decay": 0.999, "use_for_previews": use_for_previews},
        )
        p["18"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 7]}}
        return p

    trained = server.run_successfully(prompt("prev_trained", False))
    averaged = server.run_successfully(prompt("prev_averaged", True))
    plain, ema = _preview_pixels(server, trained), _preview_pixels(server, averaged)
    assert len(plain) == len(ema) == 2  # steps 2 and 4
    assert plain != ema, "the previews did not change with use_for_previews"
    # rendering with the EMA swapped in leaves the trained weights bit for bit as they were
    (a,) = [f for f in server.trained_loras("prev_trained_*.safetensors") if "_ema" not in f]
    (b,) = [f for f in server.trained_loras("prev_averaged_*.safetensors") if "_ema" not in f]
    first, second = load_file(a), load_file(b)
    assert all(torch.equal(first[k], second[k]) for k in first)
