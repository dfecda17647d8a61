"""Validation loss in real runs on the tiny SDXL: kohya's procedure leaves training untouched and tracks learning.

* a run that validates after every step saves the same LoRA bytes, with the same training losses, as the same run
  without validation (every RNG of the run in use: flips, shuffled captions, LoRA dropouts, noise options);
* the validation figure is a pure function of the weights: no dropout, fixed noise, fixed timesteps;
* held-out near-duplicates of the training images: the validation loss falls as the LoRA learns them;
* a separate validation dataset works like a split, and both at once is refused.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import training_fixtures as tf
from safetensors.torch import save as safetensors_bytes

from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.validation import ValidationRequest, ValidationSettings, Validator

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

TAGS = [
    "red, cube, shiny, small, studio",
    "blue, ball, matte, large, outdoor",
    "green, tree, tall, leafy, park",
    "yellow, house, old, wooden, village",
]
NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)
RANDOM_NET = replace(NET, dropout=0.1, rank_dropout=0.2, module_dropout=0.1)
RANDOM_NOISE = NoiseSettings(
    noise_offset=0.05,
    noise_offset_random_strength=True,
    multires_noise_iterations=3,
    ip_noise_gamma=0.1,
    ip_noise_gamma_random_strength=True,
)


class Recorder(tf.StepWatcher):
    def __init__(self, reseed: bool = False) -> None:
        super().__init__(on_step=self._reseed if reseed else None)
        self.validations = []

    @staticmethod
    def _reseed(record, run) -> None:
        torch.manual_seed(record.step * 7919)  # what a preview's sampler does to the global RNGs
        random.seed(record.step)

    def validation_finished(self, record) -> None:
        self.validations.append(record)


def lora_bytes(result) -> bytes:
    return safetensors_bytes(result.network.state_dict_kohya())


@pytest.fixture(scope="module")
def split_data():
    """Four images, one held out (validation_split 0.25), flips and shuffled captions: every RNG of the run is used."""
    ds = tf.make_dataset(
        4,
        captions=TAGS,
        flip_aug=True,
        caption_options=CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2),
        validation_split=0.25,
        validation_seed=7,
    )
    return (ds, *tf.sources(tf.inference_models(), ds))


def test_the_split_holds_out_images_that_are_cached_but_never_trained(split_data):
    ds, latents, _ = split_data
    assert len(ds.images) == 3 and len(ds.validation_images) == 1
    held_out = ds.validation_images[0]
    assert held_out.key not in {img.key for img in ds.images}
    assert (held_out.key, False) in latents.table  # the caches cover it


def test_validation_leaves_the_training_bytes_unchanged(split_data):
    ds = split_data[0]
    config = TrainConfig(max_train_steps=4, seed=42, learning_rate=1e-3, noise=RANDOM_NOISE)
    every_step = ValidationRequest(ValidationSettings(validate_every_n_steps=1))
    with_validation = tf.run_train(*split_data, RANDOM_NET, config, events=Recorder(reseed=True), validation=every_step)
    without = tf.run_train(
        replace(ds, validation_parts=()), *split_data[1:], RANDOM_NET, config, events=Recorder(reseed=True)
    )
    assert not without.state.validation_history
    # 3 training images, batch 1: epochs end at steps 3 (and the last, partial one at 4): both step and epoch due
    assert [(r.step, r.kind) for r in with_validation.state.validation_history] == [
        (1, "step"),
        (2, "step"),
        (3, "step+epoch"),
        (4, "step+epoch"),
    ]
    assert [r.loss for r in with_validation.state.history] == [r.loss for r in without.state.history]
    assert lora_bytes(with_validation) == lora_bytes(without)


def test_the_validation_loss_is_a_function_of_the_weights_only(split_data, monkeypatch):
    """Each validation is computed twice at the same weights and must agree exactly: LoRA dropouts of 0.5 would
    change every forward if they were on, and the noise would differ if it were not drawn afresh from the seed."""
    computed = Validator.losses
    repeats = []

    def twice(self, global_step=0):
        first = computed(self, global_step)
        repeats.append((first, computed(self, global_step)))
        return first

    monkeypatch.setattr(Validator, "losses", twice)
    watcher = Recorder()
    net = replace(NET, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    result = tf.run_train(
        *split_data,
        net,
        TrainConfig(max_train_steps=2, seed=1, learning_rate=1e-3, noise=RANDOM_NOISE),
        events=watcher,
        validation=ValidationRequest(ValidationSettings(validate_every_n_steps=1, validation_seed=3)),
    )
    assert len(repeats) == 2 and all(a == b for a, b in repeats)
    assert len(repeats[0][0]) == 4  # one held-out batch x kohya's 4 timesteps
    assert [r.loss for r in watcher.validations] == [r.loss for r in result.state.validation_history]
    assert result.state.validation_history[0].loss == sum(repeats[0][0]) / 4


def _near_duplicates(n: int, seed: int = 0):
    """``n`` copies of one picture with a little pixel noise each: what a held-out duplicate of a subject looks like."""
    import numpy as np
    from PIL import Image

    base = np.asarray(tf.draw((64, 64), seed), dtype=np.int16)
    rng = np.random.default_rng(seed + 1)
    return [Image.fromarray(np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)) for _ in range(n)]


def test_the_validation_loss_falls_on_held_out_near_duplicates(capsys):
    from sdxl_lora_trainer.trainer.data.assemble import dataset_from_scan
    from sdxl_lora_trainer.trainer.data.buckets import BucketSettings
    from sdxl_lora_trainer.trainer.data.sources import items_from_images

    scan = items_from_images(_near_duplicates(4), "a red cube")
    settings = BucketSettings((64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    ds = dataset_from_scan(scan, settings, 1, CaptionOptions(), validation_split=0.25, validation_seed=0)
    assert (len(ds.images), len(ds.validation_images)) == (3, 1)
    data = (ds, *tf.sources(tf.inference_models(), ds))
    # conv LoRA too: the tiny U-Net's attention layers alone fit slowly
    net = NetworkConfig(network_dim=8, network_alpha=8.0, conv_dim=8, conv_alpha=8.0, train_te1=False, train_te2=False)
    result = tf.run_train(
        *data,
        net,
        TrainConfig(max_train_steps=30, learning_rate=1e-2, gradient_checkpointing=False),
        validation=ValidationRequest(ValidationSettings(validate_every_n_steps=5, validate_every_n_epochs=1000)),
    )
    losses = [r.loss for r in result.state.validation_history]
    assert [r.step for r in result.state.validation_history] == [5, 10, 15, 20, 25, 30]
    with capsys.disabled():
        print(f"\nvalidation loss on a held-out near-duplicate every 5 steps: {[round(v, 4) for v in losses]}")
    assert losses[-1] < 0.8 * losses[0]


def test_a_separate_validation_dataset_and_a_split_are_exclusive(split_data):
    other = tf.make_dataset(1, image_seed=50)
    other_latents, other_text = tf.sources(tf.inference_models(), other)
    request = ValidationRequest(ValidationSettings(validate_every_n_steps=1), other, other_latents, other_text)
    ds = replace(split_data[0], validation_parts=())
    result = tf.run_train(ds, *split_data[1:], NET, TrainConfig(max_train_steps=2), validation=request)
    assert [r.step for r in result.state.validation_history] == [1, 2]
    with pytest.raises(ValueError, match="use one of the two"):
        tf.run_train(*split_data, NET, TrainConfig(max_train_steps=1), validation=request)
