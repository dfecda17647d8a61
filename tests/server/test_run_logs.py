"""A run's live TensorBoard log through a real ComfyUI server, read back with TensorBoard's own event reader."""

from __future__ import annotations

import csv
import glob
from pathlib import Path

import pytest
from dataset_factory import kohya_folder
from example_prompts import train_then_test, training_only, with_run_options


def test_tensorboard_log_beside_the_csv_has_every_step_and_the_previews(server):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    kohya_folder(server.base / "input" / "ds_logs", {"1_cat": [(64, 64), (64, 48)]})
    prompt = with_run_options(
        training_only(train_then_test("ds_logs", steps=4, seed=17, resolution=64, output_name="logrun")),
        previews={"every_n_steps": 2},
        logging={},
    )
    entry = server.run_successfully(prompt)

    lora_dir = server.base / "models" / "loras" / "sdxl_lora_trainer"
    folders = glob.glob(str(lora_dir / "logs" / "*_logrun_s17"))
    assert len(folders) == 1, sorted(p.name for p in (lora_dir / "logs").iterdir())
    assert f"TensorBoard log: {folders[0]}" in entry["outputs"]["7"]["text"][0]
    acc = EventAccumulator(folders[0], size_guidance={"scalars": 0, "images": 0})
    acc.Reload()

    (log_csv,) = glob.glob(str(lora_dir / "logrun_*.log.csv"))
    rows = list(csv.DictReader(Path(log_csv).read_text().splitlines()))
    assert [e.step for e in acc.Scalars("loss/current")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("loss/current")] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("grad/norm")] == pytest.approx([float(r["grad_norm"]) for r in rows], rel=1e-6)
    assert all(float(r["grad_norm"]) > 0 for r in rows)
    assert [e.value for e in acc.Scalars("lr/unet")] == pytest.approx([1e-3] * 4)
    assert len(acc.Scalars("loss/average")) == 4
    assert [e.step for e in acc.Images("preview/0")] == [2, 4]
