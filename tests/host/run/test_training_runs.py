"""Whole training runs on the tiny SDXL: determinism, learning, the MODEL/CLIP left as they came,
divergence, text-encoder training and exact resume. Models are built and ``train`` is called under
``torch.inference_mode()``, as ComfyUI's loader nodes and executor do.
"""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import comfy.ldm.modules.attention as attention
import comfy.model_management as mm
import comfy.sample
import pytest
import torch
import training_fixtures as tf
from safetensors.torch import save as safetensors_bytes

from sdxl_lora_trainer.trainer.comfyui import encoders as comfy_encoders
from sdxl_lora_trainer.trainer.comfyui import models as comfy_models
from sdxl_lora_trainer.trainer.data.captions import CaptionOptions
from sdxl_lora_trainer.trainer.network import build_network
from sdxl_lora_trainer.trainer.network.config import NetworkConfig, PartSettings
from sdxl_lora_trainer.trainer.objective.noise import NoiseSettings
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.loop import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")
one_thread = tf.one_thread

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)
TAGS = ["red, cube, shiny, small, studio", "blue, ball, matte, large, outdoor", "green, tree, tall, leafy, park"]


def lora_bytes(result) -> bytes:
    return safetensors_bytes(result.network.state_dict_kohya())


@pytest.fixture(scope="module")
def random_data():
    """Three images with flips and shuffled captions (live CLIP encoding): every RNG of the run is used."""
    ds = tf.make_dataset(
        3,
        captions=TAGS,
        flip_aug=True,
        caption_options=CaptionOptions(
            shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.2, token_warmup_min=1, token_warmup_step=4
        ),
    )
    return (ds, *tf.sources(tf.inference_models(), ds))


RANDOM_NET = replace(NET, dropout=0.1, rank_dropout=0.2, module_dropout=0.1)
RANDOM_NOISE = NoiseSettings(
    noise_offset=0.05,
    noise_offset_random_strength=True,
    multires_noise_iterations=3,
    ip_noise_gamma=0.1,
    ip_noise_gamma_random_strength=True,
)


# -- 5. same seed, same bytes ---------------------------------------------------------------------


def test_same_seed_gives_identical_lora_bytes_and_another_seed_does_not(random_data, monkeypatch):
    def run(seed, on_step=None, initial_weights=None):
        return tf.run_train(
            *random_data,
            RANDOM_NET,
            TrainConfig(max_train_steps=3, seed=seed, learning_rate=1e-3, noise=RANDOM_NOISE),
            events=tf.StepWatcher(on_step=on_step),
            initial_weights=initial_weights,
        )

    def reseed(record, run):
        # what a sampler node running in between (a preview) does to the global RNGs
        torch.manual_seed(record.step * 7919)
        random.seed(record.step)

    cap = tf.Capture(monkeypatch)
    a = run(42)
    init_a = cap.initial
    b = run(42, on_step=reseed)
    assert lora_bytes(a) == lora_bytes(b)
    assert [r.loss for r in a.state.history] == [r.loss for r in b.state.history]
    assert lora_bytes(a) != lora_bytes(run(43))
    # the seed drives the training stream (noise, order, flips, captions, dropout), not only the LoRA init
    c = run(43, initial_weights=init_a)
    assert lora_bytes(a) != lora_bytes(c)
    # ... also where batch order and augmentation cannot differ (one image): the noise stream follows the seed
    one = tf.default_data(1)
    losses = [
        tf.run_train(*one, NET, TrainConfig(max_train_steps=1, seed=seed), initial_weights=init_a).state.history[0].loss
        for seed in (42, 43)
    ]
    assert losses[0] != losses[1]


def test_frozen_weights_never_train_and_their_flags_are_restored():
    """A MODEL built outside inference mode whose weights still require grad (a custom loader): train()
    freezes them for the run (no gradient, no change) and gives the flags back."""
    import tiny_sdxl

    model = tiny_sdxl.make_model(0)
    unet = model.model.diffusion_model
    params = list(unet.parameters())
    for p in params[::2]:
        p.requires_grad_(True)
    flags = [p.requires_grad for p in params]
    before = [p.detach().clone() for p in params]
    ds, lat, txt = tf.default_data(2)
    tf.run_train(ds, lat, txt, NET, TrainConfig(max_train_steps=1, learning_rate=1e-2), model=model)
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


# -- 6. it learns ------------------------------------------------------------------------------------


def _eval_set(latent: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor, time_ids, n: int = 16):
    g = torch.Generator().manual_seed(1234)
    x0 = latent.float()[None].repeat(n, 1, 1, 1) * tf.VAE_SCALE
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ac = tf.ref_alphas_cumprod()[t].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    y = torch.cat([pooled[None], tf.ref_size_embedding(torch.tensor([time_ids]))], dim=1).repeat(n, 1)
    return noisy, t, context[None].repeat(n, 1, 1), y, noise


def _eps_loss(network, eval_set) -> float:
    noisy, t, ctx, y, noise = eval_set
    unet = tf.inference_models()[0].model.diffusion_model
    network.eval()
    with torch.inference_mode(), network.attach():
        pred = unet(noisy, t.float(), context=ctx, y=y)
    return ((pred.float() - noise) ** 2).mean().item()


@pytest.mark.slow
def test_overfitting_one_image_lowers_the_eps_loss_on_a_fixed_eval_set(capsys):
    ds = tf.make_dataset(1, captions=["a red cube"])
    lat, txt = tf.sources(tf.inference_models(), ds)
    img = ds.images[0]
    eval_set = _eval_set(lat.table[(img.key, False)], *txt.table[img.key], img.time_ids(False))
    # alpha = dim (scale 1): with kohya's default alpha 1 (scale 1/8) 200 steps at 1e-3 only reach ~15 %
    net = NetworkConfig(network_dim=8, network_alpha=8.0, train_te1=False, train_te2=False)
    model, clip, _ = tf.inference_models()
    before = _eps_loss(build_network(model, clip, net, seed=42), eval_set)
    result = tf.run_train(
        ds, lat, txt, net, TrainConfig(max_train_steps=200, learning_rate=1e-3, gradient_checkpointing=False)
    )
    after = _eps_loss(result.network, eval_set)
    with capsys.disabled():
        print(f"\noverfit: eval eps-MSE {before:.4f} -> {after:.4f} ({100 * (1 - after / before):.1f} % lower)")
    assert after <= 0.7 * before


# -- 7. the MODEL and CLIP are unchanged for every other node ----------------------------------------


def _sample(model, clip, seed: int = 5) -> torch.Tensor:
    """KSampler's path (nodes.common_ksampler): euler / normal, cfg 2, 3 steps on an empty 64x64 latent."""
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a red cube"), return_pooled=True)
        ncond, npooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        positive = [[cond, {"pooled_output": pooled}]]
        negative = [[ncond, {"pooled_output": npooled}]]
        latent = torch.zeros(1, 4, 8, 8)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(
            model, noise, 3, 2.0, "euler", "normal", positive, negative, latent, disable_pbar=True, seed=seed
        )


def _fingerprint(*roots: torch.nn.Module) -> dict:
    """Everything train() touches on the shared modules."""
    out = {
        "attention": (attention.optimized_attention, attention.optimized_attention_masked),
        "in_training": mm.in_training,
        "modules": [],
    }
    for root in roots:
        for name, m in root.named_modules():
            out["modules"].append(
                (
                    name,
                    len(m._forward_hooks),
                    len(m._forward_pre_hooks),
                    len(m._backward_hooks),
                    "forward" in m.__dict__,
                    tuple(getattr(m, "weight_function", ()) or ()),
                    tuple(getattr(m, "bias_function", ()) or ()),
                )
            )
        out["modules"].append(
            tuple((n, p.requires_grad, p.is_inference(), p.dtype, p.device) for n, p in root.named_parameters())
        )
    return out


def _weights(*roots):
    return [{k: v.clone() for k, v in r.state_dict().items()} for r in roots]


def assert_unchanged(roots, fingerprint, weights):
    assert _fingerprint(*roots) == fingerprint
    for r, w in zip(roots, weights):
        sd = r.state_dict()
        assert sd.keys() == w.keys()
        assert all(torch.equal(sd[k], w[k]) for k in w)


def _roots(model, clip):
    return (model.model.diffusion_model, *comfy_models.text_encoders(clip))


def test_model_is_unchanged_for_other_nodes(random_data):
    model, clip, _ = tf.inference_models()
    roots = _roots(model, clip)
    fp, w = _fingerprint(*roots), _weights(*roots)
    before = _sample(model, clip)
    result = tf.run_train(
        *random_data,
        replace(RANDOM_NET, train_te1=True, train_te2=True, conv_dim=4),
        TrainConfig(max_train_steps=2, learning_rate=1e-2, noise=RANDOM_NOISE),
    )
    assert any(torch.count_nonzero(lora.lora_up.weight) for lora in result.network.loras)  # it did train
    assert_unchanged(roots, fp, w)
    after = _sample(model, clip)
    assert torch.equal(before, after)


def test_a_cpu_run_hands_the_freed_heap_back_after_every_step(random_data, monkeypatch):
    """On the CPU the activations live in the C heap: after each optimizer step its free pages go back to the
    system (trainer/run/host_memory.py), with the EMA update still run."""
    from sdxl_lora_trainer.trainer.run import session
    from sdxl_lora_trainer.trainer.run.ema import EmaSettings

    released: list[int] = []
    monkeypatch.setattr(session, "release_freed_memory", lambda: released.append(1) or True)
    config = TrainConfig(max_train_steps=3, gradient_accumulation_steps=2)
    result = tf.run_train(*random_data, RANDOM_NET, config, ema=EmaSettings(decay=0.9))
    assert result.state.global_step == 3 and len(released) == 3 and result.ema.updates == 3


# -- 8. divergence ------------------------------------------------------------------------------------


def test_nan_loss_raises_and_the_bad_step_changes_nothing(monkeypatch):
    ds, lat, txt = tf.default_data(2)
    poisoned = tf.DictLatents(table=dict(lat.table))
    model, clip, _ = tf.inference_models()
    roots = _roots(model, clip)
    fp, w = _fingerprint(*roots), _weights(*roots)
    cap = tf.Capture(monkeypatch)
    snapshots = []

    def on_step(record, run):
        snapshots.append(run.network.state_dict_kohya())
        if record.step == 1:  # from now on every latent holds a NaN
            for k, v in poisoned.table.items():
                bad = v.clone()
                bad[0, 0, 0] = float("nan")
                poisoned.table[k] = bad

    with pytest.raises(TrainingDiverged, match=r"The loss became nan at step 2 \(epoch 1\)") as info:
        tf.run_train(
            ds,
            poisoned,
            txt,
            NET,
            TrainConfig(max_train_steps=4, learning_rate=1e-2),
            events=tf.StepWatcher(on_step=on_step),
        )
    assert "lower learning rate" in str(info.value)
    assert len(snapshots) == 1
    after = cap.network.state_dict_kohya()
    assert all(torch.equal(after[k], snapshots[0][k]) for k in after)
    assert any(not torch.equal(after[k], cap.initial[k]) for k in after)  # step 1 did update
    assert all(p.grad is None for p in cap.network.parameters())
    assert_unchanged(roots, fp, w)


# -- 9. text-encoder training ----------------------------------------------------------------------------


def test_text_encoder_training_gets_gradients_and_leaves_clip_unchanged(monkeypatch):
    ds, lat, txt = tf.default_data(2)
    model, clip, _ = tf.inference_models()
    te1, te2 = comfy_models.text_encoders(clip)
    fp, w = _fingerprint(te1, te2), _weights(te1, te2)
    with torch.inference_mode():
        before = comfy_encoders.encode_text(clip, "a red cube")
    cap = tf.Capture(monkeypatch)
    lrs = {
        "learning_rate": 1e-3,
        "unet": PartSettings(learning_rate=1e-3),
        "clip_l": PartSettings(learning_rate=2e-4),
        "clip_g": PartSettings(learning_rate=3e-4),
    }
    result = tf.run_train(
        ds,
        lat,
        txt,
        replace(NET, train_te1=True, train_te2=True),
        TrainConfig(max_train_steps=1, max_grad_norm=0.0, **lrs),
    )
    net = result.network
    assert net.te1_loras and net.te2_loras and net.unet_loras
    grads = cap.step_grads[0]
    for loras, lr in ((net.te1_loras, 2e-4), (net.te2_loras, 3e-4)):
        # (CLIP-L's last layer gets none: SDXL uses its penultimate hidden state, in kohya too)
        with_grad = [
            lora
            for lora in loras
            if lora.lora_name + ".lora_up.weight" in grads
            and torch.count_nonzero(grads[lora.lora_name + ".lora_up.weight"])
        ]
        assert len(with_grad) >= len(loras) // 2
        # AdamW's first step moves lora_up (from 0) by ~lr per entry: the TE learning rates are used
        step = max(lora.lora_up.weight.detach().abs().max().item() for lora in with_grad)
        assert step == pytest.approx(lr, rel=1e-4)
    assert result.group_names == ["textencoder 1", "textencoder 2", "unet"]
    with torch.inference_mode():
        after = comfy_encoders.encode_text(clip, "a red cube")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert_unchanged((te1, te2), fp, w)


# -- 10. exact resume ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["lora", "dora"])
def test_resume_continues_bit_identically(random_data, algo):
    """Stopped after step 3 and resumed from the state: the same losses, learning rates and LoRA bytes as one run
    (DoRA too: its magnitude vectors are trained parameters and part of the state)."""
    net = RANDOM_NET if algo == "lora" else replace(RANDOM_NET, algo=algo, dropout=0.0, rank_dropout=0.0)
    total, stop_after = 5, 3
    config = TrainConfig(
        max_train_steps=total,
        seed=9,
        learning_rate=2e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        gradient_accumulation_steps=2,
        noise=RANDOM_NOISE,
    )
    full = tf.run_train(*random_data, net, config)
    assert full.steps_per_epoch == 2  # 3 batches at accumulation 2: the cut below falls inside epoch 2

    done = []
    part = tf.run_train(
        *random_data,
        net,
        config,
        events=tf.StepWatcher(
            on_step=lambda record, run: done.append(record.step), stop_when=lambda: len(done) >= stop_after
        ),
    )
    assert part.state.interrupted and part.state.global_step == stop_after
    resume = {
        "network": part.network.state_dict_kohya(),
        "optimizer": copy.deepcopy(part.optimizer.state_dict()),
        "scheduler": copy.deepcopy(part.scheduler.state_dict()),
        "loop": copy.deepcopy(part.state),
    }
    resumed = tf.run_train(*random_data, net, config, resume=resume)
    assert resumed.state.global_step == total and not resumed.state.interrupted
    assert [(r.step, r.epoch, r.loss, r.lr, r.timestep_mean) for r in resumed.state.history] == [
        (r.step, r.epoch, r.loss, r.lr, r.timestep_mean) for r in full.state.history
    ]
    assert lora_bytes(resumed) == lora_bytes(full)


# -- fp8 weights ------------------------------------------------------------------------------------


def test_fp8_weights_train_through_comfy_casting(random_data):
    """A U-Net stored in fp8 (ComfyUI's --fp8 loading) trains: the frozen weights are cast per forward by
    comfy.ops, stay fp8 and unchanged, and the LoRA learns."""
    import tiny_sdxl

    with torch.inference_mode():
        model = tiny_sdxl.make_model(0, weight_dtype=torch.float8_e4m3fn)
    unet = model.model.diffusion_model
    q = unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight
    assert q.dtype == torch.float8_e4m3fn
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fixed = tf.make_dataset(2)
    latents, text = tf.sources(tf.inference_models(), fixed)
    result = tf.run_train(
        fixed, latents, text, NET, TrainConfig(max_train_steps=2, learning_rate=1e-3, seed=1), model=model
    )
    ups = [v for k, v in result.network.state_dict_kohya().items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(u).all() for u in ups)
    assert any(u.abs().sum() > 0 for u in ups), "the LoRA did not learn on the fp8 model"
    after = unet.state_dict()
    for k, v in before.items():  # compare raw bytes: torch.equal has no fp8 kernel on CPU
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k
