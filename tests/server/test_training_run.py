"""Live feedback, previews, save-every-N, cancel and exact resume, through a real ComfyUI server."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from comfy_server import WsListener, execution_error
from dataset_factory import kohya_folder
from example_prompts import train_then_test, training_only, with_run_options
from safetensors.torch import load_file

RES = 64


@pytest.fixture(scope="module")
def folder(server) -> str:
    kohya_folder(server.base / "input" / "ds_run", {"1_cat": [(64, 64), (64, 48)]})
    return "ds_run"


def test_progress_events_previews_and_intermediate_files(server, folder):
    prompt = with_run_options(
        training_only(train_then_test(folder, steps=6, seed=11, resolution=RES, output_name="inter")),
        checkpointing={"save_every_n_steps": 2, "keep_last_n": 2},
        previews={"every_n_steps": 3},
    )
    with WsListener(server) as ws:
        server.run_successfully(prompt)
    progress = [d for d in ws.of_type("sdxl_lora_trainer.progress") if d.get("node") == "7"]
    assert [d["step"] for d in progress] == [1, 2, 3, 4, 5, 6]
    assert all(d["total"] == 6 for d in progress)
    assert ws.binary >= 1, "no preview image reached the browser during the run"
    finals = [f for f in server.trained_loras("inter_*.safetensors") if "-step" not in f]
    inter = server.trained_loras("inter_*-step*.safetensors")
    assert len(finals) == 1
    # steps 2, 4, 6 were saved; keep_last_n=2 removed step 2
    assert [os.path.basename(f).split("-step")[1] for f in inter] == ["000004.safetensors", "000006.safetensors"]
    for f in inter:
        meta_step = __import__("safetensors").safe_open(f, "pt").metadata()["ss_steps"]
        assert meta_step == os.path.basename(f).split("-step")[1].split(".")[0].lstrip("0")
    log_csv = finals[0].replace(".safetensors", ".log.csv")
    assert Path(log_csv).read_text().count("\n") == 7  # header + 6 steps


def test_resume_equals_uninterrupted(server, folder):
    base = training_only(train_then_test(folder, steps=6, seed=5, resolution=RES, output_name="full"))
    server.run_successfully(base)
    full = load_file(server.trained_loras("full_*.safetensors")[-1])

    first = with_run_options(
        training_only(train_then_test(folder, steps=6, seed=5, resolution=RES, output_name="half")),
        checkpointing={"save_state_every_n_steps": 3},
    )
    server.run_successfully(first)
    states = sorted(glob.glob(str(server.base / "output" / "sdxl_lora_trainer" / "state" / "half_*" / "step-000003")))
    assert states, "no state folder at step 3"
    resumed = with_run_options(
        training_only(train_then_test(folder, steps=6, seed=5, resolution=RES, output_name="resumed")),
        checkpointing={"resume_from": states[-1]},
    )
    server.run_successfully(resumed)
    again = load_file(server.trained_loras("resumed_*.safetensors")[-1])
    assert full.keys() == again.keys()
    for k in full:
        assert full[k].dtype == again[k].dtype
        assert bytes(full[k].view(-1).view(__import__("torch").uint8).numpy()) == bytes(
            again[k].view(-1).view(__import__("torch").uint8).numpy()
        ), k


def test_cancel_saves_a_loadable_lora_and_a_resumable_state(server, folder):
    prompt = training_only(train_then_test(folder, steps=5000, seed=3, resolution=RES, output_name="cancelled"))
    with WsListener(server) as ws:
        pid = server.queue(prompt)
        ws.wait_for(lambda t, d: t == "sdxl_lora_trainer.progress" and d.get("step", 0) >= 2, timeout=600)
        server.interrupt()
        entry = server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "error"  # ComfyUI reports an interrupted prompt so
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    files = server.trained_loras("cancelled_*.safetensors")
    assert len(files) == 1
    weights = load_file(files[0])
    assert any(k.endswith(".lora_up.weight") for k in weights)
    cancelled = [d for d in ws.of_type("sdxl_lora_trainer.progress") if d.get("cancelled")]
    assert cancelled and "resumable state in" in cancelled[0]["message"]
    state_dir = cancelled[0]["message"].split("resumable state in ")[1].strip()
    assert os.path.isfile(os.path.join(state_dir, "state.json"))
    steps_done = max(d["step"] for d in ws.of_type("sdxl_lora_trainer.progress") if "step" in d)
    assert steps_done < 5000
    # the cancelled LoRA loads in LoraLoader and the state resumes (2 more steps)
    resumed = with_run_options(
        training_only(
            train_then_test(folder, steps=steps_done + 2, seed=3, resolution=RES, output_name="after_cancel")
        ),
        checkpointing={"resume_from": state_dir},
    )
    # the step count is part of max_train_steps only, so the saved state is accepted
    entry = server.run_successfully(resumed)
    assert f"trained {steps_done + 2} steps" in entry["outputs"]["7"]["text"][0]


def test_resume_at_or_past_the_target_stops_and_a_raised_target_trains_on(server, folder):
    """A state at step 4 with max_train_steps 3 or 4: the run says so and saves nothing; with 5 it trains 1 step."""
    first = with_run_options(
        training_only(train_then_test(folder, steps=4, seed=8, resolution=RES, output_name="target")),
        checkpointing={"save_state_every_n_steps": 4},
    )
    server.run_successfully(first)
    states = glob.glob(str(server.base / "output" / "sdxl_lora_trainer" / "state" / "target_*" / "step-000004"))
    assert len(states) == 1, states
    for steps in (3, 4):
        again = with_run_options(
            training_only(train_then_test(folder, steps=steps, seed=8, resolution=RES, output_name="past")),
            checkpointing={"resume_from": states[0]},
        )
        entry = server.run(again, timeout=900)
        error = execution_error(entry)
        assert error is not None and f"{states[0]} is already at step 4 and max_train_steps is {steps}" in error
        assert "nothing was saved" in error and "raise max_train_steps (or max_train_epochs) above 4" in error
        assert server.trained_loras("past_*") == []
    raised = with_run_options(
        training_only(train_then_test(folder, steps=5, seed=8, resolution=RES, output_name="raised")),
        checkpointing={"resume_from": states[0]},
    )
    entry = server.run_successfully(raised)
    assert "trained 5 steps" in entry["outputs"]["7"]["text"][0]
    assert len(server.trained_loras("raised_*.safetensors")) == 1


def lora_bytes(path: str) -> dict[str, bytes]:
    import torch

    return {k: bytes(v.contiguous().view(-1).view(torch.uint8).numpy()) for k, v in load_file(path).items()}


def test_schedule_free_previews_and_intermediate_saves_do_not_change_the_run(server, folder):
    """A schedule-free optimizer previews and saves its averaged weights, then trains on from exactly the point it
    left: the intermediate file at step 2 is the final file of a 2-step run (its averaged weights), and the final
    file of a run with previews and intermediate saves equals the one of a plain run, byte for byte."""

    def schedule_free(name: str, steps: int) -> dict:
        prompt = training_only(train_then_test(folder, steps=steps, seed=8, resolution=RES, lr=2e-3, output_name=name))
        prompt["7"]["inputs"]["optimizer"] = "AdamWScheduleFree"  # constant lr: the first 2 steps of 4 are a 2-step run
        return prompt

    server.run_successfully(schedule_free("sf_two", 2))
    server.run_successfully(schedule_free("sf_plain", 4))
    busy = with_run_options(
        schedule_free("sf_busy", 4), checkpointing={"save_every_n_steps": 2}, previews={"every_n_steps": 2}
    )
    server.run_successfully(busy)
    [two] = server.trained_loras("sf_two_*.safetensors")
    [plain] = server.trained_loras("sf_plain_*.safetensors")
    [step2] = server.trained_loras("sf_busy_*-step000002.safetensors")
    [final] = [f for f in server.trained_loras("sf_busy_*.safetensors") if "-step" not in f]
    assert lora_bytes(step2) == lora_bytes(two)  # the averaged weights, not the training point
    assert lora_bytes(final) == lora_bytes(plain)  # previews and saves left the training point as it was


def test_full_disk_on_the_final_save_still_hands_the_trained_lora_on(server, folder):
    """The disk is full for this run's LoRA and logs (os.write raises ENOSPC for paths with the run's name, through
    the test node 'TestFullDiskFor'): the prompt still succeeds, the report says what was not saved and why, and the
    trained LoRA reaches a KSampler through the MODEL output and 'Save LoRA Weights' through the lora output."""
    prompt = train_then_test(folder, steps=2, seed=13, resolution=RES, output_name="srvfull", sample_steps=2)
    prompt["30"] = {"class_type": "TestFullDiskFor", "inputs": {"model": ["1", 0], "marker": "srvfull_"}}
    prompt["7"]["inputs"]["model"] = ["30", 0]
    del prompt["8"]  # no file to load: the KSampler takes the train node's MODEL
    prompt["13"]["inputs"]["model"] = ["7", 0]
    prompt["31"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["7", 2], "prefix": "rescued/lora"}}
    entry = server.run_successfully(prompt)
    report = entry["outputs"]["7"]["text"][0]
    loras = server.base / "models" / "loras" / "sdxl_lora_trainer"
    assert "ERROR: the LoRA was NOT saved: could not write srvfull_" in report, report
    assert f".safetensors in {loras}: the disk is full (No space left on device); it needs " in report
    assert "connect 'lora' to ComfyUI's 'Save LoRA Weights' node" in report
    assert "WARNING: the step log was not written: could not write srvfull_" in report
    assert [p.name for p in loras.iterdir() if "srvfull" in p.name and "tensorboard" not in p.name] == []
    assert entry["outputs"]["17"]["images"], "the KSampler after the train node's MODEL produced no image"
    (rescued,) = glob.glob(str(server.base / "output" / "rescued" / "lora_*.safetensors"))
    weights = load_file(rescued)
    assert any(k.endswith(".lora_up.weight") for k in weights)
    assert {v.dtype for v in weights.values()} == {__import__("torch").float16}  # as the file would have held it
