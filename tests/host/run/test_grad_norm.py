"""The gradient norm each step records (for the logs): the norm before clipping, whether or not the run clips."""

from __future__ import annotations

import pytest
import training_fixtures as tf

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)


def test_grad_norm_is_measured_before_clipping():
    data = tf.default_data(1)
    clipped = tf.run_train(*data, NET, TrainConfig(max_train_steps=1, seed=5, max_grad_norm=1e-6))
    free = tf.run_train(*data, NET, TrainConfig(max_train_steps=1, seed=5, max_grad_norm=0.0))
    norm = clipped.state.history[0].grad_norm
    assert norm is not None and norm > 1e-6  # so the clipped run really clipped
    # the same first step: clip_grad_norm_'s total (clipping) equals get_total_norm's (no clipping)
    assert free.state.history[0].grad_norm == pytest.approx(norm, rel=1e-5)
    assert clipped.state.history[0].loss == free.state.history[0].loss
