"""On a GPU every random draw is still the run's own and resumable, and a step does not copy or sync per layer."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import training_fixtures as tf
from device_helpers import assert_same_lora, data, lora_bytes, models_on
from standin_device import DEVICE

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.resume_state import load_state, save_state

DROPOUTS = {
    "lora": NetworkConfig(
        network_dim=4,
        network_alpha=2.0,
        train_te1=False,
        train_te2=False,
        dropout=0.2,
        rank_dropout=0.2,
        module_dropout=0.2,
    ),
    "loha": NetworkConfig(
        network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False, dropout=0.2, module_dropout=0.2, algo="loha"
    ),
}
CONFIG = TrainConfig(max_train_steps=4, learning_rate=1e-2, seed=5)


def train(net, config=CONFIG, **kwargs):
    model, clip, _ = models_on(DEVICE)
    with torch.inference_mode():
        return tf.train(model, clip, *data(), net, config, **kwargs)


@pytest.mark.parametrize("algo", list(DROPOUTS))
def test_dropouts_on_the_device_are_seeded_saved_and_resumed(comfy_gpu, tmp_path, algo):
    """The dropout masks drawn on the device (kohya's F.dropout and rank masks, LyCORIS's nn.Dropout) and the
    module-dropout draws on the host come from RNGs the run seeds and saves: a resumed run and a run whose global
    RNGs another node reseeds between steps (a sampler does) both end with the uninterrupted run's bytes."""
    comfy_gpu()
    net = DROPOUTS[algo]
    straight = lora_bytes(train(net))
    assert_same_lora(lora_bytes(train(net)), straight)  # the same seed, the same LoRA

    def reseed(record, run):
        torch.manual_seed(1000 + record.step)
        torch.get_device_module(DEVICE).manual_seed(2000 + record.step)

    assert_same_lora(lora_bytes(train(net, events=tf.StepWatcher(on_step=reseed))), straight)

    def save_at_2(record, run):
        if record.step == 2:
            save_state(
                tmp_path,
                network=run.network.state_dict_kohya(),
                optimizer=run.optimizer.state_dict(),
                scheduler=run.scheduler.state_dict() if run.scheduler else None,
                scaler=None,
                loop=run.state,
                fingerprint={},
            )
            raise KeyboardInterrupt  # stop the run here, as a crash would

    with pytest.raises(KeyboardInterrupt):
        train(net, events=tf.StepWatcher(on_step=save_at_2))
    resumed = train(net, resume=load_state(tmp_path))
    assert resumed.state.global_step == 4
    assert_same_lora(lora_bytes(resumed), straight)

    other_seed = lora_bytes(train(net, replace(CONFIG, seed=6)))
    assert any(not torch.equal(other_seed[k], straight[k]) for k in straight)


def per_step_transfers(standin, net, config):
    """Host<->device traffic of each optimizer step after the first (which loads the model)."""
    marks = []
    train(net, config, events=tf.StepWatcher(on_step=lambda record, run: marks.append(standin.transfers.copy())))
    return [after.since(before) for before, after in zip(marks, marks[1:])]


def test_a_step_copies_and_syncs_per_batch_not_per_layer(comfy_gpu, standin):
    """With every dropout, max-norm and a loss option that weights per timestep, a step makes one sync (the loss
    read back for the log and the NaN check) and copies the batch over; neither grows with the number of LoRA
    layers (conv LoRA adds 66 to the 132 layers here)."""
    comfy_gpu(vram_state="HIGH_VRAM")
    config = replace(CONFIG, scale_weight_norms=0.5, loss=replace(CONFIG.loss, min_snr_gamma=5.0))
    small = per_step_transfers(standin, DROPOUTS["lora"], config)
    big_net = replace(DROPOUTS["lora"], conv_dim=2, conv_alpha=1.0)
    big = per_step_transfers(standin, big_net, config)
    assert [t.syncs for t in small] == [1, 1, 1] and [t.syncs for t in big] == [1, 1, 1]
    assert [t.device_to_host for t in small + big] == [1] * 6
    assert [t.host_to_device for t in small] == [t.host_to_device for t in big]
    # batch size 1: latents, context, pooled (cached on the host), size embedding, noise, timesteps (private
    # host generator, so a CPU and a GPU run draw the same numbers)
    assert [t.host_to_device for t in small] == [6, 6, 6]
