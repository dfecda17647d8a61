"""Every training option reaches the loss or the optimizer: each test fails if its option is ignored.

Loss and noise options are checked against the first-principles reference of kohya's objective
(tests/training_fixtures.py), AND the reference with the option must differ from the reference without
it, so an engine that dropped the option could not pass. Optimizer-side options are checked by what
they must do to the update (AdamW's first step moves each lora_up entry by ~lr, clipping bounds the
gradient norm, max-norm bounds each module's weight norm, ...).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import training_fixtures as tf

from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.network.config import NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.objective.loss_weighting import LossSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.optimizers import OptimizerSettings

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)


@pytest.fixture(scope="module")
def pair():
    """One batch of two images (batch size 2)."""
    ds = tf.make_dataset(2, batch_size=2)
    return (ds, *tf.sources(tf.inference_models(), ds))


@pytest.fixture(scope="module")
def singles():
    """Two batches of one image each."""
    return tf.default_data(2)


@pytest.fixture(scope="module")
def nonzero_init():
    return tf.random_lora_weights(NET, seed=21)


def ups(network) -> dict[str, torch.Tensor]:
    return {lora.lora_name: lora.lora_up.weight.detach().clone() for lora in network.loras}


def max_abs_up(network) -> float:
    return max(lora.lora_up.weight.detach().abs().max().item() for lora in network.loras)


def flat(grads: dict[str, torch.Tensor], suffix: str = "") -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads) if k.endswith(suffix)])


# -- loss and noise options vs the reference -----------------------------------------------------

# name: (option on, option off, v-prediction model)
OPTION_CASES = {
    "loss_l1": (LossSettings(loss_type="l1"), LossSettings(), False),
    "loss_huber_snr": (LossSettings(loss_type="huber", huber_schedule="snr", huber_c=0.1), LossSettings(), False),
    "loss_huber_exponential": (
        LossSettings(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5),
        LossSettings(loss_type="huber", huber_schedule="snr", huber_c=0.2),
        False,
    ),
    "loss_huber_constant": (
        LossSettings(loss_type="huber", huber_schedule="constant", huber_c=0.3, huber_scale=2.0),
        LossSettings(loss_type="huber", huber_schedule="snr", huber_c=0.3),
        False,
    ),
    "loss_smooth_l1": (
        LossSettings(loss_type="smooth_l1", huber_c=0.1),
        LossSettings(loss_type="huber", huber_c=0.1),
        False,
    ),
    "min_snr_gamma_eps": (LossSettings(min_snr_gamma=1.0), LossSettings(), False),
    "min_snr_gamma_v": (LossSettings(min_snr_gamma=1.0), LossSettings(), True),
    "debiased_estimation_eps": (LossSettings(debiased_estimation_loss=True), LossSettings(), False),
    "debiased_estimation_v": (LossSettings(debiased_estimation_loss=True), LossSettings(), True),
    "scale_v_pred_loss_like_noise_pred": (LossSettings(scale_v_pred_loss_like_noise_pred=True), LossSettings(), True),
    "v_pred_like_loss": (LossSettings(v_pred_like_loss=0.3), LossSettings(), False),
    "noise_offset": (NoiseSettings(noise_offset=0.1), NoiseSettings(), False),
    "noise_offset_random_strength": (
        NoiseSettings(noise_offset=0.1, noise_offset_random_strength=True),
        NoiseSettings(noise_offset=0.1),
        False,
    ),
    "adaptive_noise_scale": (
        NoiseSettings(noise_offset=0.05, adaptive_noise_scale=2.0),
        NoiseSettings(noise_offset=0.05),
        False,
    ),
    "multires_noise": (NoiseSettings(multires_noise_iterations=6, multires_noise_discount=0.3), NoiseSettings(), False),
    "ip_noise_gamma": (NoiseSettings(ip_noise_gamma=0.5), NoiseSettings(), False),
    "ip_noise_gamma_random_strength": (
        NoiseSettings(ip_noise_gamma=0.5, ip_noise_gamma_random_strength=True),
        NoiseSettings(ip_noise_gamma=0.5),
        False,
    ),
    # not [200, 300): CPU randint is low + r % range, so [0, 1000) and [200, 300) can draw the same t
    "min_max_timestep": (NoiseSettings(min_timestep=500, max_timestep=700), NoiseSettings(), False),
}


def _split(settings):
    if isinstance(settings, LossSettings):
        return NoiseSettings(), settings
    return settings, LossSettings()


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_option_reaches_the_loss(case, pair, monkeypatch):
    ds, lat, txt = pair
    on, off, v = OPTION_CASES[case]
    noise_on, loss_on = _split(on)
    noise_off, loss_off = _split(off)
    cap = tf.Capture(monkeypatch)
    result = tf.run_train(
        ds,
        lat,
        txt,
        NET,
        TrainConfig(max_train_steps=1, seed=3, noise=noise_on, loss=loss_on),
        model=tf.inference_models(v_prediction=v)[0],
    )
    items = tf.batch_keys(cap.batches[0], lat)
    kw = {"seed": 3, "v_pred": v, "grads": False}
    ref_on, _, t_on = tf.reference_step(
        items, ds, lat, txt, cap.initial, noise_settings=noise_on, loss_settings=loss_on, **kw
    )
    ref_off, _, _ = tf.reference_step(
        items, ds, lat, txt, cap.initial, noise_settings=noise_off, loss_settings=loss_off, **kw
    )
    assert torch.equal(cap.results[0].timesteps.cpu(), t_on)
    assert result.state.history[0].loss == pytest.approx(ref_on.item(), rel=1e-5)
    # the option changes this batch's loss by far more than the tolerance above, so an engine ignoring it fails
    assert abs(ref_on.item() - ref_off.item()) > 1e-4 * abs(ref_off.item()), (ref_on.item(), ref_off.item())


def test_timesteps_stay_in_min_max_range(pair, monkeypatch):
    ds, lat, txt = pair
    cap = tf.Capture(monkeypatch)
    result = tf.run_train(
        ds, lat, txt, NET, TrainConfig(max_train_steps=4, noise=NoiseSettings(min_timestep=200, max_timestep=300))
    )
    ts = torch.cat([r.timesteps for r in cap.results])
    assert ts.numel() == 8 and ts.min() >= 200 and ts.max() < 300
    assert all(200 <= r.timestep_mean < 300 for r in result.state.history)
    # min == max: no draw, every timestep is max (kohya's get_timesteps)
    result = tf.run_train(
        ds, lat, txt, NET, TrainConfig(max_train_steps=2, noise=NoiseSettings(min_timestep=500, max_timestep=500))
    )
    assert [r.timestep_mean for r in result.state.history] == [500.0, 500.0]


# -- learning rates and optimizers ----------------------------------------------------------------


@pytest.mark.parametrize("learning_rate,unet_lr,expected", [(1e-3, None, 1e-3), (3e-3, None, 3e-3), (1e-3, 4e-4, 4e-4)])
def test_learning_rate_and_unet_lr_set_the_step_size(learning_rate, unet_lr, expected, singles):
    # AdamW's first step moves each parameter by lr * g / (|g| + eps): lora_up starts at 0, so max |lora_up| = lr
    config = TrainConfig(max_train_steps=1, learning_rate=learning_rate, unet=PartSettings(learning_rate=unet_lr))
    result = tf.run_train(*singles, NET, config)
    assert max_abs_up(result.network) == pytest.approx(expected, rel=1e-4)
    assert result.state.history[0].lr == pytest.approx(expected)


def test_optimizer_type_and_args_are_used(singles, monkeypatch):
    lr = 1e-3
    runs = {}
    for opt in (
        OptimizerSettings("AdamW"),
        OptimizerSettings("Lion", optimizer_args="weight_decay=0.5 betas=(0.8,0.95)"),
    ):
        cap = tf.Capture(monkeypatch)
        result = tf.run_train(*singles, NET, TrainConfig(max_train_steps=1, learning_rate=lr, optimizer=opt))
        runs[opt.optimizer_type] = (cap, result)
    cap, result = runs["Lion"]
    assert type(result.optimizer).__name__ == "Lion"
    group = result.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.5 and tuple(group["betas"]) == (0.8, 0.95)
    # Lion's first step: p * (1 - lr*wd) - lr * sign(g); lora_down has no gradient yet (lora_up = 0)
    for lora in result.network.loras:
        down0 = cap.initial[lora.lora_name + ".lora_down.weight"]
        torch.testing.assert_close(lora.lora_down.weight.detach(), down0 * (1 - lr * 0.5), rtol=1e-6, atol=0)
        up = lora.lora_up.weight.detach()
        g = cap.step_grads[0][lora.lora_name + ".lora_up.weight"]
        assert torch.equal(up, -lr * torch.sign(g))
    cap, result = runs["AdamW"]
    assert type(result.optimizer).__name__ == "AdamW"
    for lora in result.network.loras:  # AdamW's default decoupled weight decay is 0.01
        down0 = cap.initial[lora.lora_name + ".lora_down.weight"]
        torch.testing.assert_close(lora.lora_down.weight.detach(), down0 * (1 - lr * 0.01), rtol=1e-6, atol=0)


@pytest.mark.parametrize("optimizer", ["Prodigy", "Adafactor", "AdamWScheduleFree"])
def test_other_cpu_optimizers_train(optimizer, singles):
    lr = 1.0 if optimizer == "Prodigy" else 1e-3
    scheduler = "adafactor" if optimizer == "Adafactor" else "constant"
    result = tf.run_train(
        *singles,
        NET,
        TrainConfig(
            max_train_steps=2, learning_rate=lr, lr_scheduler=scheduler, optimizer=OptimizerSettings(optimizer)
        ),
    )
    assert type(result.optimizer).__name__ == optimizer
    assert max_abs_up(result.network) > 0
    assert all(torch.isfinite(p).all() for p in result.network.parameters())


def test_lr_scheduler_and_warmup_drive_the_optimizer(singles, monkeypatch):
    lr = 1e-3
    cap = tf.Capture(monkeypatch)
    after_step = []
    result = tf.run_train(
        *singles,
        NET,
        TrainConfig(max_train_steps=4, learning_rate=lr, lr_scheduler="linear", lr_warmup_steps=2),
        events=tf.StepWatcher(on_step=lambda record, run: after_step.append(max_abs_up(cap.network))),
    )
    # transformers' linear schedule with 2 warmup steps of 4: factors 0 (first step), 1/2, 1, 1/2, then 0
    assert [r.lr for r in result.state.history] == pytest.approx([lr / 2, lr, lr / 2, 0.0])
    assert after_step[0] == 0.0  # the first step ran at lr 0: nothing moved
    # second step at lr/2 (Adam's bias-corrected m/sqrt(v) after two gradients is ~1, not exactly 1)
    assert 0.45 * lr < after_step[1] < 0.55 * lr


def test_gradient_accumulation_averages_micro_batch_gradients(singles, nonzero_init, monkeypatch):
    ds, lat, txt = singles
    cap = tf.Capture(monkeypatch)
    result = tf.run_train(
        ds,
        lat,
        txt,
        NET,
        TrainConfig(max_train_steps=1, seed=5, gradient_accumulation_steps=2, max_grad_norm=0.0),
        initial_weights=nonzero_init,
    )
    assert result.steps_per_epoch == 1 and len(cap.batches) == 2 and len(cap.step_grads) == 1
    gen, py = torch.Generator().manual_seed(5), random.Random(5)
    losses, grads = [], []
    for batch in cap.batches:  # the noise stream continues from one micro-batch to the next
        loss, g, _ = tf.reference_step(tf.batch_keys(batch, lat), ds, lat, txt, cap.initial, seed=5, gen=gen, py=py)
        losses.append(loss.item())
        grads.append(g)
    assert result.state.history[0].loss == pytest.approx(sum(losses) / 2, rel=1e-5)
    want = {k: (grads[0][k] + grads[1][k]) / 2 for k in grads[0]}
    got = cap.step_grads[0]
    for name in want:
        assert (got[name] - want[name]).norm() <= 1e-5 * want[name].norm(), name
    single = {k: grads[0][k] for k in grads[0]}  # what one micro-batch alone would give
    assert (flat(got) - flat(single)).norm() > 1e-2 * flat(single).norm()


def test_max_grad_norm_clips(singles, nonzero_init, monkeypatch):
    cap = tf.Capture(monkeypatch)
    tf.run_train(*singles, NET, TrainConfig(max_train_steps=1, max_grad_norm=0.0), initial_weights=nonzero_init)
    raw = cap.step_grads[0]
    norm = flat(raw).norm().item()
    limit = norm / 2
    cap = tf.Capture(monkeypatch)
    tf.run_train(*singles, NET, TrainConfig(max_train_steps=1, max_grad_norm=limit), initial_weights=nonzero_init)
    clipped = cap.step_grads[0]
    assert flat(clipped).norm().item() <= limit * (1 + 1e-5)
    torch.testing.assert_close(flat(clipped), flat(raw) * (limit / norm), rtol=1e-4, atol=1e-6 * norm)


def _module_norms(network) -> list[float]:
    out = []
    for lora in network.loras:
        up, down = lora.lora_up.weight.detach(), lora.lora_down.weight.detach()
        out.append(((up @ down) * (lora.alpha_value / down.shape[0])).norm().item())
    return out


def test_scale_weight_norms_bounds_every_module(singles, nonzero_init):
    cfg = {"max_train_steps": 3, "learning_rate": 1e-2}
    free = _module_norms(tf.run_train(*singles, NET, TrainConfig(**cfg), initial_weights=nonzero_init).network)
    limit = max(free) / 2
    bounded = _module_norms(
        tf.run_train(*singles, NET, TrainConfig(**cfg, scale_weight_norms=limit), initial_weights=nonzero_init).network
    )
    assert max(bounded) <= limit * (1 + 1e-4)
    assert sum(n > limit for n in free) >= 1


def test_loraplus_lr_ratio_scales_lora_up(singles):
    lr = 1e-3
    result = tf.run_train(*singles, NET, TrainConfig(max_train_steps=1, learning_rate=lr, loraplus_lr_ratio=4.0))
    assert max_abs_up(result.network) == pytest.approx(4 * lr, rel=1e-4)
    assert sorted(g["lr"] for g in result.optimizer.param_groups) == pytest.approx([lr, 4 * lr])
    assert "unet plus" in result.group_names


# -- network dropouts ------------------------------------------------------------------------------


def test_module_dropout_skips_whole_modules(singles):
    def zero_modules(result):
        return sum(torch.count_nonzero(u) == 0 for u in ups(result.network).values())

    base = tf.run_train(*singles, NET, TrainConfig(max_train_steps=1))
    dropped = tf.run_train(*singles, replace(NET, module_dropout=0.5), TrainConfig(max_train_steps=1))
    assert zero_modules(base) == 0
    assert 0 < zero_modules(dropped) < len(dropped.network.loras)


def test_rank_dropout_drops_whole_ranks(singles):
    def zero_columns(result):
        return sum(int((u.abs().sum(dim=0) == 0).sum()) for u in ups(result.network).values())

    base = tf.run_train(*singles, NET, TrainConfig(max_train_steps=1))
    dropped = tf.run_train(*singles, replace(NET, rank_dropout=0.5), TrainConfig(max_train_steps=1))
    assert zero_columns(base) == 0
    assert zero_columns(dropped) > 0


def test_neuron_dropout_changes_the_gradients(singles, monkeypatch):
    grads = []
    for dropout in (None, 0.5):
        cap = tf.Capture(monkeypatch)
        tf.run_train(*singles, replace(NET, dropout=dropout), TrainConfig(max_train_steps=1))
        grads.append(flat(cap.step_grads[0], "lora_up.weight"))
    assert (grads[0] - grads[1]).norm() > 0.05 * grads[0].norm()


# -- precision, checkpointing, epochs --------------------------------------------------------------


def test_bf16_runs_close_to_fp32(singles, nonzero_init, monkeypatch):
    runs = {}
    for dtype in ("fp32", "bf16"):
        cap = tf.Capture(monkeypatch)
        result = tf.run_train(
            *singles,
            NET,
            TrainConfig(max_train_steps=2, train_dtype=dtype, max_grad_norm=0.0),
            initial_weights=nonzero_init,
        )
        runs[dtype] = (cap, result)
    (c32, r32), (c16, r16) = runs["fp32"], runs["bf16"]
    l32, l16 = r32.state.history[0].loss, r16.state.history[0].loss
    assert l16 != l32  # the U-Net really ran in bf16 ...
    assert l16 == pytest.approx(l32, rel=3e-2)  # ... and gives nearly the same loss and gradient
    g32, g16 = flat(c32.step_grads[0]), flat(c16.step_grads[0])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.98
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in r16.network.parameters())


def test_full_bf16_keeps_the_lora_in_bf16(singles):
    result = tf.run_train(
        *singles, NET, TrainConfig(max_train_steps=2, train_dtype="bf16", full_bf16=True, learning_rate=1e-3)
    )
    params = list(result.network.parameters())
    assert params and all(p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all() for p in params)
    assert any(p.abs().sum() > 0 for n, p in result.network.named_parameters() if "lora_up" in n)


def test_fp16_trains_with_a_grad_scaler(singles, monkeypatch):
    """fp16 compute gets kohya's/accelerate's GradScaler: the loss is scaled for backward and unscaled before
    the step, so the LoRA update matches the fp32 one in direction."""
    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def spy(self, outputs):
        out = real_scale(self, outputs)
        scaled.append((float(outputs.detach()), float(out.detach())))
        return out

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    runs = {
        dtype: tf.run_train(
            *singles, NET, TrainConfig(max_train_steps=2, train_dtype=dtype, learning_rate=1e-3, seed=3)
        )
        for dtype in ("fp32", "fp16")
    }
    assert scaled and all(big > small * 100 for small, big in scaled)  # the default scale is 65536
    assert runs["fp16"].scaler is not None and runs["fp32"].scaler is None
    up = {
        d: torch.cat([p.detach().flatten().float() for n, p in r.network.named_parameters() if "lora_up" in n])
        for d, r in runs.items()
    }
    assert up["fp16"].abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(up["fp32"], up["fp16"], dim=0) > 0.9


def test_gradient_checkpointing_recomputes_and_gives_the_same_result(singles, nonzero_init):
    model = tf.inference_models()[0]
    # a Linear inside a ResBlock: it runs once per forward, and once more per backward when checkpointed
    # (the last ResBlock: its input depends on LoRA outputs, so backward passes through it)
    probe = [m for m in model.model.diffusion_model.modules() if type(m).__name__ == "ResBlock"][-1].emb_layers[1]
    calls = [0]
    handle = probe.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    net = replace(NET, dropout=0.2, rank_dropout=0.2, module_dropout=0.2)
    runs = {}
    try:
        for gc in (False, True):
            calls[0] = 0
            result = tf.run_train(
                *singles,
                net,
                TrainConfig(max_train_steps=3, learning_rate=1e-2, gradient_checkpointing=gc),
                initial_weights=nonzero_init,
            )
            runs[gc] = (calls[0], result)
    finally:
        handle.remove()
    assert runs[False][0] == 3 and runs[True][0] == 6
    (_, off), (_, on) = runs[False], runs[True]
    assert [r.loss for r in on.state.history] == pytest.approx([r.loss for r in off.state.history], rel=1e-6)
    a, b = off.network.state_dict_kohya(), on.network.state_dict_kohya()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def test_token_warmup_follows_the_optimizer_step(monkeypatch):
    """kohya's token warm-up uses the dataset's current_step = global_step: at accumulation 2 both
    micro-batches of a step see the same step, and the caption grows as optimizer steps are done."""
    from sdxl_lora_trainer.trainer.run import session as ts

    tags = ", ".join(f"tag{i}" for i in range(9))
    ds = tf.make_dataset(
        2, captions=[tags, tags], caption_options=CaptionOptions(token_warmup_min=1, token_warmup_step=4)
    )
    lat, txt = tf.sources(tf.inference_models(), ds)
    seen = []
    live = ts.live_text_encoder

    def recording(clip, **kwargs):
        encode = live(clip, **kwargs)

        def wrapped(captions):
            seen.extend(captions)
            return encode(captions)

        return wrapped

    monkeypatch.setattr(ts, "live_text_encoder", recording)
    tf.run_train(ds, lat, txt, NET, TrainConfig(max_train_steps=5, gradient_accumulation_steps=2))
    # floor(step * (9 - 1) / 4) + 1 tags while step < 4; steps 0, 1, 2, 3, 4 (two micro-batches each)
    want = [min(9, (s * 8) // 4 + 1) if s < 4 else 9 for s in range(5) for _ in range(2)]
    assert [len(c.split(", ")) for c in seen] == want


@pytest.mark.parametrize("ga,steps", [(1, 4), (2, 2)])
def test_max_train_epochs_overrides_max_train_steps(ga, steps, singles):
    result = tf.run_train(
        *singles, NET, TrainConfig(max_train_steps=1, max_train_epochs=2, gradient_accumulation_steps=ga)
    )
    assert result.total_steps == steps
    assert [r.epoch for r in result.state.history] == [1] * (steps // 2) + [2] * (steps // 2)


@pytest.mark.parametrize("token_length", [None, 225], ids=["kohya-75", "kohya-225"])
def test_live_captions_use_the_text_caches_token_length(token_length, monkeypatch):
    """Captions encoded at train time (shuffled here) take Cache Text's max_token_length: contexts of 77 / 227, the
    same as the cached ones, and a run's settings that name another layout are refused."""
    from sdxl_lora_trainer.trainer.cache.stores import MemoryStore
    from sdxl_lora_trainer.trainer.cache.text import TextCache
    from sdxl_lora_trainer.trainer.data.token_length import TokenLength
    from sdxl_lora_trainer.trainer.run import session as ts

    long = ", ".join(f"tag{i} word{i}" for i in range(40))  # over 150 tokens
    ds = tf.make_dataset(2, captions=[long, "a, b, c"], caption_options=CaptionOptions(shuffle_caption=True))
    lat, _ = tf.sources(tf.inference_models(), ds)
    with torch.inference_mode():
        text = TextCache.build(
            ds, tf.inference_models()[1], store=MemoryStore(64), token_length=TokenLength(token_length)
        )
    assert text.live_indices == [0, 1]
    lengths = []
    live = ts.live_text_encoder

    def recording(clip, **kwargs):
        encode = live(clip, **kwargs)

        def wrapped(captions):
            out = encode(captions)
            lengths.extend(ctx.shape[0] for ctx, _ in out)
            return out

        return wrapped

    monkeypatch.setattr(ts, "live_text_encoder", recording)
    result = tf.run_train(ds, lat, text, NET, TrainConfig(max_train_steps=2))
    assert lengths == [(token_length or 75) + 2] * 2
    assert result.token_length == TokenLength(token_length)
    with pytest.raises(ValueError, match="set max_token_length to 150 on 'Cache Text'"):
        tf.run_train(ds, lat, text, NET, TrainConfig(max_train_steps=1, token_length=TokenLength(150)))


# -- masked loss and regularization images ---------------------------------------------------------


def _with_masks(latents, fill) -> tf.DictLatents:
    """The same latents with a latent-size loss mask per (image, flip) made by ``fill(latent)``."""
    return tf.DictLatents(table=latents.table, masks={key: fill(lat) for key, lat in latents.table.items()})


def test_loss_mask_reaches_the_loss(pair):
    ds, lat, txt = pair
    config = TrainConfig(max_train_steps=2, seed=4)
    plain = tf.run_train(ds, lat, txt, NET, config)
    ones = tf.run_train(ds, _with_masks(lat, lambda t: torch.ones(t.shape[1:])), txt, NET, config)
    half = tf.run_train(ds, _with_masks(lat, lambda t: torch.full(t.shape[1:], 0.5)), txt, NET, config)

    def left_only(t):
        mask = torch.zeros(t.shape[1:])
        mask[:, : t.shape[2] // 2] = 1.0
        return mask

    left = tf.run_train(ds, _with_masks(lat, left_only), txt, NET, config)
    losses = [[h.loss for h in r.state.history] for r in (plain, ones, half, left)]
    assert losses[1] == losses[0]  # a mask of ones is exactly no mask (kohya's filler for unmasked images)
    # the mask multiplies the element-wise loss before the mean: 0.5 everywhere halves the first step's loss exactly
    assert losses[2][0] == losses[0][0] / 2
    assert losses[3][0] != losses[0][0] and losses[3][1] != losses[0][1]
    assert not any("masked loss" in note for note in plain.notes)


def test_prior_loss_weight_weights_reg_samples(pair):
    ds, lat, txt = pair
    reg = replace(ds, parts=tuple(replace(p, images=tuple(_as_reg(img) for img in p.images)) for p in ds.parts))
    config = TrainConfig(max_train_steps=1, seed=4)
    plain = tf.run_train(ds, lat, txt, NET, config)
    weighted = tf.run_train(reg, lat, txt, NET, replace(config, loss=LossSettings(prior_loss_weight=0.25)))
    unweighted = tf.run_train(reg, lat, txt, NET, config)
    assert unweighted.state.history[0].loss == plain.state.history[0].loss  # prior_loss_weight 1: no change
    assert weighted.state.history[0].loss == pytest.approx(plain.state.history[0].loss * 0.25, rel=1e-6)
    assert "regularization images: 2, their loss weighted by prior_loss_weight 0.25" in weighted.notes
    no_reg = tf.run_train(ds, lat, txt, NET, replace(config, loss=LossSettings(prior_loss_weight=0.25)))
    assert "prior_loss_weight 0.25 has no effect: the dataset has no regularization images" in no_reg.notes


def _as_reg(img):
    return replace(img, item=replace(img.item, is_reg=True))
