"""kohya's validation schedule and timesteps (train_network.py), and the validation loss in the step logs."""

from __future__ import annotations

import csv
import json

import pytest

from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.logs import write_logs
from sdxl_lora_trainer.trainer.run.loop import LoopState, StepRecord
from sdxl_lora_trainer.trainer.run.validation import ValidationRecord, ValidationSettings, validation_timesteps


def test_timesteps_are_kohyas_linspace_without_the_ends():
    assert validation_timesteps(NoiseSettings()) == [200, 400, 600, 800]
    # np.linspace(100, 900, 6, dtype=int) = [100, 260, 420, 580, 740, 900]
    assert validation_timesteps(NoiseSettings(min_timestep=100, max_timestep=900)) == [260, 420, 580, 740]
    # dtype=int truncates: linspace(0, 999, 6) = 0, 199.8, 399.6, ...
    assert validation_timesteps(NoiseSettings(max_timestep=999)) == [199, 399, 599, 799]


def test_when_validation_is_due():
    default = ValidationSettings()
    assert default.due(7, None) == [] and default.due(7, 3) == ["epoch"]  # kohya: every epoch by default
    every = ValidationSettings(validate_every_n_steps=5, validate_every_n_epochs=2)
    assert every.due(10, None) == ["step"]
    assert every.due(10, 2) == ["step", "epoch"] and every.due(11, 3) == []
    assert every.due(12, 4) == ["epoch"]


def test_widget_values_mean_kohyas_none():
    s = ValidationSettings(validate_every_n_steps=0, max_validation_steps=0, validation_seed=-1)
    assert (s.validate_every_n_steps, s.max_validation_steps, s.validation_seed) == (None, None, None)
    assert s.seed_for(42) == 42 and ValidationSettings(validation_seed=7).seed_for(42) == 7
    with pytest.raises(ValueError, match="validate_every_n_steps"):
        ValidationSettings(validate_every_n_steps=-3)
    with pytest.raises(ValueError, match="validation_seed"):
        ValidationSettings(validation_seed=-2)


def test_logs_carry_the_validation_loss_of_the_validated_steps(tmp_path):
    history = [StepRecord(step, 1, 0.5 / step, 1e-4, 500.0, 0.1) for step in (1, 2, 3)]
    validations = [ValidationRecord(2, 1, 0.25, "step", 0.01)]
    csv_path, jsonl_path = write_logs(tmp_path / "lora.safetensors", history, validations)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["val_loss"] for r in rows] == ["", "0.25", ""]
    lines = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert "val_loss" not in lines[0] and lines[1]["val_loss"] == 0.25


def test_a_resumable_state_keeps_the_validation_history():
    state = LoopState(validation_history=[ValidationRecord(4, 1, 0.3, "epoch", 0.2)])
    back = LoopState.from_saved(json.loads(json.dumps(state.to_json())), {})
    assert back.validation_history == state.validation_history
    old = state.to_json()
    del old["validation_history"]  # a state saved before validation existed
    assert LoopState.from_saved(old, {}).validation_history == []
