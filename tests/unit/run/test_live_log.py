"""The live run log (trainer/run/live_log.py): TensorBoard events read back with TensorBoard's own reader, kohya's
scalar names and moving average, previews as images, the validation hook, folder names, W&B in offline mode."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdxl_lora_trainer.trainer.run.events import RunEvents, RunObservers
from sdxl_lora_trainer.trainer.run.live_log import LiveLog, LogSettings, new_log_dir
from sdxl_lora_trainer.trainer.run.loop import StepRecord
from sdxl_lora_trainer.trainer.run.validation import ValidationRecord

LOSSES = [0.9, 0.5, 0.7, 0.2, 0.4, 0.6, 0.1]


def _run(history: list[StepRecord] | None = None) -> SimpleNamespace:
    """What the log reads of a TrainResult: group names, the optimizer's groups, steps per epoch, the history."""
    optimizer = SimpleNamespace(param_groups=[{"lr": 1e-4}, {"lr": 2e-4, "d": 0.5}])
    return SimpleNamespace(
        group_names=["textencoder", "unet"],
        optimizer=optimizer,
        steps_per_epoch=3,
        state=SimpleNamespace(history=history or []),
    )


def _record(step: int, loss: float) -> StepRecord:
    return StepRecord(step=step, epoch=1 + (step - 1) // 3, loss=loss, lr=1e-4, timestep_mean=500.0, seconds=0.25,
                      grad_norm=0.1 * step)  # fmt: skip


def _accumulator(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _window_means(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i + 1 - window) : i + 1]) / len(values[max(0, i + 1 - window) : i + 1]) for i in
            range(len(values))]  # fmt: skip


def test_tensorboard_events_read_back_while_the_run_goes(tmp_path):
    log = LiveLog(tmp_path / "run", config={"train": {"learning_rate": 1e-4}})
    observers = RunObservers(RunEvents(), log)
    observers.training_started(_run())
    for step, loss in enumerate(LOSSES[:3], start=1):
        observers.step_finished(_record(step, loss))
    # live: readable before the run ends
    assert _scalars(_accumulator(tmp_path / "run"), "loss/current") == [
        (1, pytest.approx(0.9)),
        (2, pytest.approx(0.5)),
        (3, pytest.approx(0.7)),
    ]
    for step, loss in enumerate(LOSSES[3:], start=4):
        observers.step_finished(_record(step, loss))
    image = torch.zeros(1, 8, 12, 3)
    image[0, :, :6, 0] = 1.0  # left half red
    observers.previews_rendered(6, [image, torch.ones(1, 8, 12, 3)])
    observers.validation_finished(ValidationRecord(step=7, epoch=1, loss=0.33, kind="step", seconds=0.0))
    log.close()

    acc = _accumulator(tmp_path / "run")
    tags = acc.Tags()
    steps = list(range(1, 8))
    assert _scalars(acc, "loss/current") == [(s, pytest.approx(v)) for s, v in zip(steps, LOSSES, strict=True)]
    # kohya's loss/average: mean of the last steps_per_epoch (3) steps' losses
    assert [v for _, v in _scalars(acc, "loss/average")] == pytest.approx(_window_means(LOSSES, 3))
    assert [v for _, v in _scalars(acc, "lr/textencoder")] == pytest.approx([1e-4] * 7)
    assert [v for _, v in _scalars(acc, "lr/unet")] == pytest.approx([2e-4] * 7)
    assert [v for _, v in _scalars(acc, "lr/d*lr/unet")] == pytest.approx([1e-4] * 7)
    assert "lr/d*lr/textencoder" not in tags["scalars"]
    assert [v for _, v in _scalars(acc, "grad/norm")] == pytest.approx([0.1 * s for s in steps])
    assert _scalars(acc, "loss/validation") == [(7, pytest.approx(0.33))]
    assert sorted(tags["images"]) == ["preview/0", "preview/1"]
    event = acc.Images("preview/0")[0]
    assert (event.step, event.width, event.height) == (6, 12, 8)
    import io

    from PIL import Image

    pixels = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
    assert pixels.getpixel((0, 0)) == (255, 0, 0) and pixels.getpixel((11, 0)) == (0, 0, 0)
    assert "config/text_summary" in tags["tensors"]


def test_a_resumed_run_continues_the_moving_average(tmp_path):
    log = LiveLog(tmp_path / "run")
    log.training_started(_run([_record(s, v) for s, v in enumerate(LOSSES[:4], start=1)]))
    log.step_finished(_record(5, LOSSES[4]))
    log.close()
    assert _scalars(_accumulator(tmp_path / "run"), "loss/average") == [(5, pytest.approx(sum(LOSSES[2:5]) / 3))]


def test_log_folders_sort_by_start_time_and_never_share(tmp_path):
    t0 = time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))
    first = new_log_dir(tmp_path, "cat", 7, t0)
    again = new_log_dir(tmp_path, "cat", 7, t0)
    later = new_log_dir(tmp_path, "another", 7, t0 + 3600)
    assert first.name == "20260102-030405_cat_s7" and again.name == "20260102-030405_cat_s7_2"
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == later.name


def test_a_wandb_project_without_wandb_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        LogSettings(wandb_project="my-loras")
    assert LogSettings(wandb_project="  ").wandb_project == ""


def _wandb_records(path: str) -> list:
    """The records of a .wandb file (LevelDB log blocks around wandb's protobuf Records), read with wandb's schema."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if space < 7 or kind == 0:
            pos += space
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            chunks.append(pending + chunk)
    records = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is optional and not installed here")
def test_wandb_offline_run_holds_the_step_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    log = LiveLog(tmp_path / "run", LogSettings(wandb_project="sdxl-tests"), config={"train": {"seed": 3}})
    try:
        log.training_started(_run())
        for step, loss in enumerate(LOSSES[:3], start=1):
            log.step_finished(_record(step, loss))
        log.previews_rendered(3, [torch.ones(1, 8, 8, 3)])
    finally:
        log.close()
    files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, os.listdir(tmp_path / "run")
    deadline = time.monotonic() + 60  # wandb's service writes the file moments after finish() returns
    records = _wandb_records(files[0])
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = _wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("sdxl-tests", "run")
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = [h for h in history if "loss/current" in h]
    assert [(h["_step"], h["loss/current"]) for h in logged] == [(1, 0.9), (2, 0.5), (3, 0.7)]
    assert logged[-1]["lr/unet"] == pytest.approx(2e-4) and logged[-1]["grad/norm"] == pytest.approx(0.3)
    assert any(k.startswith("preview/0") and h["_step"] == 3 for h in history for k in h)  # the image, at step 3


def test_a_log_that_cannot_be_written_stops_with_a_note_not_the_run(tmp_path, monkeypatch):
    log = LiveLog(tmp_path / "run")
    log.training_started(_run())
    log.step_finished(_record(1, 0.5))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(log.tensorboard, "add_scalar", disk_full)
    log.step_finished(_record(2, 0.4))  # no exception: the run goes on
    log.step_finished(_record(3, 0.3))
    log.previews_rendered(3, [torch.ones(1, 4, 4, 3)])
    log.close()
    assert log.tensorboard is None
    assert len(log.notes) == 1 and "stopped at step 2" in log.notes[0] and "No space left" in log.notes[0]
    assert _scalars(_accumulator(tmp_path / "run"), "loss/current") == [(1, pytest.approx(0.5))]

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    unwritable = LiveLog(blocked / "run")
    unwritable.step_finished(_record(1, 0.5))
    unwritable.close()
    assert unwritable.tensorboard is None and "cannot be written" in unwritable.notes[0]
