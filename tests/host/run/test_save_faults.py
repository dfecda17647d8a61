"""Faults while a train-node run saves, through the engine (run/job.TrainJob) on the tiny SDXL: a full disk for the
intermediate LoRA, the resumable state, the final LoRA and the logs; leftovers of killed saves swept at the start of
a run; and the MODEL output applying exactly the weights the file holds.

The full disk is ``os.write`` raising ENOSPC for the paths of one file (devkit/full_disk.py): everything above that
call runs as on a real full disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import comfy.model_management
import comfy.sample
import folder_paths
import nodes
import pytest
import torch
import training_fixtures as tf
from full_disk import full_disk

from sdxl_lora_trainer.trainer.atomic_files import WriteFailed
from sdxl_lora_trainer.trainer.comfyui import sampling as comfy_sampling
from sdxl_lora_trainer.trainer.comfyui import services as comfy_services
from sdxl_lora_trainer.trainer.network.config import NetworkConfig, NetworkSetup
from sdxl_lora_trainer.trainer.run.checkpoints import CheckpointSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.job import TrainJob
from sdxl_lora_trainer.trainer.run.lora_output import OutputSettings
from sdxl_lora_trainer.trainer.run.resume_state import StateError, load_state

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)
SUB = "faults"
NO_SUCH_PID = 4_194_304 + 4321  # above Linux's largest pid_max: never a live process


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch):
    """ComfyUI's loras and output folders in tmp_path (the engine asks comfyui/services for them)."""
    loras, output = tmp_path / "loras", tmp_path / "output"
    loras.mkdir()
    output.mkdir()
    monkeypatch.setattr(comfy_services, "loras_directory", lambda: str(loras))
    monkeypatch.setattr(comfy_services, "output_directory", lambda: str(output))
    return loras, output


def run_job(
    name: str,
    *,
    steps: int = 3,
    checkpointing: CheckpointSettings | None = None,
    save_precision: str = "fp16",
    lr: float = 1e-3,
):
    ds, latents, text = tf.default_data()
    model, clip, _ = tf.inference_models()
    job = TrainJob(
        dataset=ds,
        network=NetworkSetup(NET),
        config=TrainConfig(max_train_steps=steps, seed=3, learning_rate=lr, train_dtype="fp32"),
        out=OutputSettings(name=name, subfolder=SUB, save_precision=save_precision),
        checkpointing=checkpointing,
        previews=None,
        node_id=None,
    )
    with torch.inference_mode():  # as ComfyUI's executor runs the node
        return job, job.execute(model, clip, latents, text)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


# -- a full disk ------------------------------------------------------------------------------------------------


def test_full_disk_on_an_intermediate_lora_and_a_state_warns_and_training_goes_on(comfy_dirs, monkeypatch):
    loras, output = comfy_dirs
    disk = full_disk(monkeypatch, "-step000002.", "step-000002")
    _, result = run_job("inter", checkpointing=CheckpointSettings(save_every_n_steps=1, save_state_every_n_steps=1))
    assert result.state.global_step == 3 and result.saved is not None and result.save_error is None
    assert disk.refused, "the fault never fired"
    names = files_under(loras / SUB)
    assert [n for n in names if "-step" in n] == [
        n for n in names if n.endswith(("-step000001.safetensors", "-step000003.safetensors"))
    ]
    assert len([n for n in names if "-step" in n]) == 2 and not any("/." in n or n.startswith(".") for n in names)
    (run_dir,) = (output / "sdxl_lora_trainer" / "state").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest", "step-000001", "step-000003"]
    assert os.readlink(run_dir / "latest") == "step-000003"
    warnings = [line for line in result.report.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 2, result.report
    lora_warning, state_warning = warnings
    folder = loras / SUB
    assert lora_warning.startswith("WARNING: step 2: the intermediate LoRA was not saved, training continues: ")
    assert f"-step000002.safetensors in {folder}: the disk is full (No space left on device); it needs " in lora_warning
    assert "is free. Fix: free " in lora_warning and "space there, or choose a folder on another disk." in lora_warning
    assert state_warning.startswith("WARNING: step 2: the resumable state was not saved, training continues: ")
    assert f"could not write state.safetensors in {run_dir / 'step-000002'}: the disk is full" in state_warning
    load_state(run_dir / "step-000003")  # the states around the failed one are complete


def test_full_disk_on_the_final_save_keeps_the_trained_lora_on_the_outputs(comfy_dirs, monkeypatch):
    loras, _ = comfy_dirs
    disk = full_disk(monkeypatch, "final_full_")
    job, result = run_job("final_full")
    assert disk.refused
    # nothing, not even a temp file or an empty log (the live TensorBoard log in logs/ was written during training)
    assert result.saved is None and [f for f in files_under(loras) if not f.startswith(f"{SUB}/logs/")] == []
    assert result.save_error.startswith("the LoRA was NOT saved: could not write final_full_")
    assert f".safetensors in {loras / SUB}: the disk is full (No space left on device); it needs " in result.save_error
    assert "ERROR: the LoRA was NOT saved" in result.report
    assert "connect 'lora' to ComfyUI's 'Save LoRA Weights' node" in result.report
    assert "WARNING: the step log was not written: could not write final_full_" in result.report
    # the trained weights are still there: as the file would have held them (fp16), applied to the MODEL output
    trained = job.run.network.state_dict_kohya()
    assert result.weights.keys() == trained.keys()
    assert all(v.dtype == torch.float16 for v in result.weights.values())
    assert all(torch.equal(result.weights[k], trained[k].half()) for k in trained)
    assert len(result.model.patches) == len(NET_MODULES(result.weights))


def NET_MODULES(weights) -> set[str]:  # noqa: N802 - reads as the set it returns
    return {k.rsplit(".", 2)[0] for k in weights if k.endswith(".lora_up.weight")}


def test_a_failed_log_write_is_a_warning_and_leaves_no_empty_log(comfy_dirs, monkeypatch):
    loras, _ = comfy_dirs
    disk = full_disk(monkeypatch, ".log.csv")
    _, result = run_job("logfull", steps=1)
    assert disk.refused
    assert result.saved is not None and result.saved.path.is_file()
    assert not list((loras / SUB).glob("*.log.csv")) and not list((loras / SUB).glob(".*"))
    (warning,) = [line for line in result.report.splitlines() if line.startswith("WARNING:")]
    assert warning.startswith("WARNING: the step log was not written: could not write logfull_")
    assert ".log.csv in " in warning and "the disk is full" in warning


def test_the_write_failure_says_how_much_space_was_needed_and_free(tmp_path, monkeypatch):
    from sdxl_lora_trainer.trainer import atomic_files

    full_disk(monkeypatch, "big.bin")
    asked = []
    real_disk_usage = shutil.disk_usage

    def disk_usage(path):
        asked.append(Path(path))
        return real_disk_usage(path)._replace(free=1_000_000)

    monkeypatch.setattr(atomic_files.shutil, "disk_usage", disk_usage)
    with pytest.raises(WriteFailed) as caught:
        atomic_files.write_atomic(tmp_path / "sub" / "big.bin", b"x" * 3_000_000)
    e = caught.value
    assert e.errno == errno.ENOSPC and e.needed == 3_000_000 and e.free == 1_000_000
    assert str(e) == (
        f"could not write big.bin in {tmp_path / 'sub'}: the disk is full (No space left on device); it needs 2.9 MB "
        "and 976.6 KB is free. Fix: free at least 1.9 MB there, or choose a folder on another disk."
    )
    assert asked == [tmp_path / "sub"]  # created before the write: the free space of the folder itself
    assert list((tmp_path / "sub").iterdir()) == []


# -- leftovers of killed saves -------------------------------------------------------------------------------------


def test_leftovers_of_killed_saves_are_swept_when_a_run_starts(comfy_dirs):
    loras, output = comfy_dirs
    folder = loras / SUB
    folder.mkdir()
    old = time.time() - 10 * 24 * 3600
    dead = folder / f".a_lora.safetensors.{NO_SUCH_PID}.0123abcd.tmp"
    reused = folder / f".b_lora.safetensors.{os.getpid()}.0123abcd.tmp"  # our pid, but written before we started
    live = folder / f".c_lora.safetensors.{os.getpid()}.4567cdef.tmp"  # a write of this process, now
    other = folder / ".not_ours.tmp"
    for p in (dead, reused, live, other):
        p.write_bytes(b"partial")
    os.utime(reused, (old, old))
    states = output / "sdxl_lora_trainer" / "state" / "earlier_run"
    staging = states / f".step-000004.{NO_SUCH_PID}.89ab.tmp"
    staging.mkdir(parents=True)
    (staging / "state.safetensors").write_bytes(b"half")
    only_temp = states / "step-000002"  # written by an earlier version: a mkstemp temp (no pid) and nothing else
    only_temp.mkdir()
    (only_temp / ".state.safetensors.k2j3h4g5.tmp").write_bytes(b"half")
    os.utime(only_temp / ".state.safetensors.k2j3h4g5.tmp", (old, old))
    complete = states / "step-000001"
    complete.mkdir()
    (complete / "state.json").write_text("{}")
    (complete / "state.safetensors").write_bytes(b"x")

    run_job("sweep", steps=1)

    assert not dead.exists() and not reused.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in states.iterdir()) == ["step-000001"]
    with pytest.raises(StateError, match=r"step-000002 is not a training state folder .* next to it: step-000001\."):
        load_state(only_temp)


def test_a_killed_state_save_is_never_a_step_folder(tmp_path, monkeypatch):
    """The state is written as a hidden staging folder: whatever fails, no half-written step folder appears."""
    from sdxl_lora_trainer.trainer.run.loop import LoopState
    from sdxl_lora_trainer.trainer.run.resume_state import save_state

    full_disk(monkeypatch, "state.json")
    with pytest.raises(WriteFailed, match=r"could not write state.json in .*step-000005: the disk is full"):
        save_state(
            tmp_path / "step-000005",
            network={"w": torch.ones(2)},
            optimizer={"state": {}, "param_groups": []},
            scheduler=None,
            scaler=None,
            loop=LoopState(),
            fingerprint={},
        )
    assert list(tmp_path.iterdir()) == []


# -- what you test is what you ship ----------------------------------------------------------------------------


def ksampler(model, clip) -> torch.Tensor:
    """KSampler's path (comfy.sample.sample, euler, 3 steps, cfg 5) from a fixed noise: the latent it returns."""
    positive = nodes.CLIPTextEncode().encode(clip, "a red cube")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    try:
        return comfy.sample.sample(
            model, noise, 3, 5.0, "euler", "normal", positive, negative, latent, denoise=1.0, disable_pbar=True, seed=5
        )
    finally:
        comfy.model_management.unload_all_models()


def test_the_model_output_applies_exactly_the_weights_in_the_file(comfy_dirs, monkeypatch):
    loras, _ = comfy_dirs
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    job, result = run_job("shipped", steps=2, lr=5e-2, save_precision="fp16")
    model, clip, _ = tf.inference_models()

    from_node = ksampler(result.model, clip)
    loaded, _ = nodes.LoraLoader().load_lora(model, clip, result.saved.lora_name, 1.0, 1.0)
    from_file = ksampler(loaded, clip)
    assert torch.equal(from_node, from_file)  # the same tensors patched the same way: bit-equal

    # the comparison can fail: the fp32 training weights (what the node applied before) give another latent
    fp32_model, _ = comfy_sampling.apply_lora(model, clip, job.run.network.state_dict_kohya())
    assert not torch.equal(ksampler(fp32_model, clip), from_file)
    assert not torch.equal(ksampler(model, clip), from_file)  # and the LoRA does something
