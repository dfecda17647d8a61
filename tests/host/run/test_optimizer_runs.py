"""Each optimizer from pytorch-optimizer, prodigy-plus-schedule-free and dadaptation trains the tiny SDXL on the CPU
and resumes bit-identically from a state folder written and read by the pack's own state files (as a cancelled run
and its resume do), including the schedule-free ones after the run switched them to their averaged weights.
"""

from __future__ import annotations

import pytest
import torch
import training_fixtures as tf
from safetensors.torch import save as safetensors_bytes

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.checkpoints import CheckpointSettings, RunArtifacts
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings, is_schedule_free
from sdxl_lora_trainer.trainer.run.resume_state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)
#: the optimizer and its learning rate (the step-size-estimating ones expect about 1.0)
NEW_CPU_OPTIMIZERS = {
    "CAME": 1e-3,
    "ADOPT": 1e-3,
    "AdEMAMix": 1e-3,
    "ProdigyPlusScheduleFree": 1.0,
    "DAdaptAdam": 1.0,
}


@pytest.fixture(scope="module")
def singles():
    """Two batches of one image each."""
    return tf.default_data(2)


def lora_bytes(result) -> bytes:
    return safetensors_bytes(result.network.state_dict_kohya())


def history(result) -> list[tuple]:
    return [(r.step, r.epoch, r.loss, r.lr, r.timestep_mean) for r in result.state.history]


@pytest.mark.parametrize("optimizer", list(NEW_CPU_OPTIMIZERS))
def test_optimizer_trains_and_resumes_bit_identically_from_a_state_folder(optimizer, singles, tmp_path):
    total, stop_after = 4, 2
    config = TrainConfig(
        max_train_steps=total,
        seed=5,
        learning_rate=NEW_CPU_OPTIMIZERS[optimizer],
        optimizer=OptimizerSettings(optimizer, "weight_decay=0.01"),
    )
    full = tf.run_train(*singles, NET, config)
    assert type(full.optimizer).__name__ == optimizer
    ups = [lora.lora_up.weight.detach() for lora in full.network.loras]
    assert max(u.abs().max().item() for u in ups) > 0  # it trained (lora_up starts at zero)
    assert all(torch.isfinite(p).all() for p in full.network.parameters())

    done: list[int] = []
    part = tf.run_train(
        *singles,
        NET,
        config,
        events=tf.StepWatcher(
            on_step=lambda record, run: done.append(record.step), stop_when=lambda: len(done) >= stop_after
        ),
    )
    assert part.state.interrupted and part.state.global_step == stop_after
    assert (part.training_point is not None) == is_schedule_free(part.optimizer)
    artifacts = RunArtifacts(CheckpointSettings(), lambda *a: None, tmp_path / "state", {"run": optimizer})
    folder = artifacts.save_state(part)  # what Cancel with save_state_on_cancel writes

    resumed = tf.run_train(*singles, NET, config, resume=load_state(folder, {"run": optimizer}))
    assert resumed.state.global_step == total and not resumed.state.interrupted
    assert history(resumed) == history(full)
    assert lora_bytes(resumed) == lora_bytes(full)


@pytest.mark.parametrize(
    "schedule,expected_factors",
    [
        # REX with min ratio 0.1 over 4 steps: 0.1 + 0.9 * (1 - p) / (1 - p / 2), p = step / 4 after each step
        ("rex", [0.1 + 0.9 * (1 - p) / (1 - p / 2) for p in (0.25, 0.5, 0.75, 1.0)]),
        ("piecewise_constant", [1.0, 0.5, 0.5, 0.1]),
    ],
)
def test_new_schedules_drive_a_run(schedule, expected_factors, singles):
    lr = 1e-3
    config = TrainConfig(
        max_train_steps=4,
        learning_rate=lr,
        lr_scheduler=schedule,
        lr_scheduler_min_lr_ratio=0.1 if schedule == "rex" else 0.0,
        lr_scheduler_args="step_rules='1:2,0.5:4,0.1'" if schedule == "piecewise_constant" else "",
    )
    result = tf.run_train(*singles, NET, config)
    # the history logs the lr after each optimizer step's scheduler step, as kohya's progress bar does
    assert [r.lr for r in result.state.history] == pytest.approx([lr * f for f in expected_factors])
