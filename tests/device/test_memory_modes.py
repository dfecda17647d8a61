"""Every ComfyUI memory mode trains the same LoRA, also when ComfyUI evicts or reloads the MODEL between steps.

The modes are the states ComfyUI's command line puts model management in: --highvram (weights stay on the GPU),
the legacy default (--disable-dynamic-vram: NORMAL_VRAM), --lowvram / --novram (partial loading: weights that do
not fit are streamed per layer, through reused cast buffers when async offload streams are on, as on NVIDIA),
--gpu-only, and DynamicVRAM (ComfyUI's default on NVIDIA: a ModelPatcherDynamic, which streams through comfy-aimdo;
training goes through ComfyUI's non-dynamic delegate instead). ComfyUI's own code decides what is loaded where.
"""

from __future__ import annotations

from dataclasses import replace

import comfy.model_management as mm
import comfy.model_patcher
import pytest
import tiny_sdxl
import torch
import training_fixtures as tf
from device_helpers import CPU, assert_same_lora, data, lora_bytes, math_attention, models_on
from standin_device import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig
from sdxl_lora_trainer.trainer.run.previews import PreviewRenderer, PreviewSettings

NET = NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, train_te1=False, train_te2=False)
CONFIG = TrainConfig(max_train_steps=3, learning_rate=1e-2, seed=5)
UNET_BYTES = comfy.model_management.module_size(tiny_sdxl.make_unet_model(0).diffusion_model)


def train(models, ds, lat, txt, net=NET, config=CONFIG, **kwargs):
    model, clip, _ = models
    with torch.inference_mode():
        return tf.train(model, clip, ds, lat, txt, net, config, **kwargs)


@pytest.fixture(scope="module")
def want():
    """The reference: the same runs on the CPU."""
    ds, lat, txt = data()
    shuffled = data(shuffle=True)
    te_net = replace(NET, train_te1=True, train_te2=True)
    with math_attention():
        return {
            "unet": lora_bytes(train(models_on(CPU), ds, lat, txt)),
            "te_live": lora_bytes(train(models_on(CPU), *shuffled, net=te_net)),
        }


class Spy:
    """Counts how ComfyUI moved the models: evictions (partial or whole unloads while loaded) and loads that left
    weights streamed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.evictions = 0
        self.streamed_loads = 0
        patcher_class = comfy.model_patcher.ModelPatcher
        unload, detach, load = patcher_class.partially_unload, patcher_class.detach, patcher_class.load

        def partially_unload(patcher, *args, **kwargs):
            freed = unload(patcher, *args, **kwargs)
            self.evictions += int(bool(freed))
            return freed

        def detach_(patcher, *args, **kwargs):
            self.evictions += int(patcher.model.model_loaded_weight_memory > 0)
            return detach(patcher, *args, **kwargs)

        def load_(patcher, *args, **kwargs):
            out = load(patcher, *args, **kwargs)
            self.streamed_loads += int(bool(patcher.model.model_lowvram))
            return out

        monkeypatch.setattr(patcher_class, "partially_unload", partially_unload)
        monkeypatch.setattr(patcher_class, "detach", detach_)
        monkeypatch.setattr(patcher_class, "load", load_)


def small_gpu(fraction: float) -> int:
    """A GPU that holds ComfyUI's inference reserve plus ``fraction`` of the tiny U-Net."""
    return int(mm.minimum_inference_memory() + fraction * UNET_BYTES)


MODES = {
    "highvram": {"vram_state": "HIGH_VRAM"},
    "normal": {"vram_state": "NORMAL_VRAM"},
    "lowvram_streams": {"vram_state": "LOW_VRAM", "memory_fraction": 0.5, "streams": 2},
    "lowvram": {"vram_state": "LOW_VRAM", "memory_fraction": 0.5},
    "novram_streams": {"vram_state": "NO_VRAM", "streams": 2},
    "gpu_only": {"vram_state": "HIGH_VRAM", "gpu_only": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_memory_mode_trains_the_cpu_lora(comfy_gpu, monkeypatch, want, mode):
    spec = dict(MODES[mode])
    fraction = spec.pop("memory_fraction", None)
    gpu = comfy_gpu(memory=small_gpu(fraction) if fraction else 8 << 30, **spec)
    spy = Spy(monkeypatch)
    got = train(models_on(DEVICE, gpu_only=gpu.gpu_only), *data())
    assert_same_lora(lora_bytes(got), want["unet"])
    if mode.startswith(("lowvram", "novram")):
        assert spy.streamed_loads > 0, "ComfyUI never streamed weights: the mode was not exercised"


def test_evictions_by_live_captions_keep_text_encoder_training_exact(comfy_gpu, monkeypatch, want):
    """A small GPU with async offload streams: every live caption encode makes ComfyUI evict part of the U-Net
    (and the U-Net part of the CLIP); training reloads what it needs and the streamed weights never alias."""
    comfy_gpu(memory=small_gpu(0.6), vram_state="NORMAL_VRAM", streams=2)
    spy = Spy(monkeypatch)
    net = replace(NET, train_te1=True, train_te2=True)
    got = train(models_on(DEVICE), *data(shuffle=True), net=net)
    assert spy.evictions > 0, "nothing was evicted: the reload path was not exercised"
    assert_same_lora(lora_bytes(got), want["te_live"])


@pytest.mark.parametrize("streams", [0, 2])
def test_previews_between_steps_leave_training_exact(comfy_gpu, monkeypatch, want, streams):
    """Sample previews after every step (ComfyUI's KSampler + VAE decode on a GPU too small for all of it) evict
    the U-Net and reseed the global RNGs; the next step reloads and trains exactly as without previews."""
    comfy_gpu(memory=small_gpu(0.8), vram_state="NORMAL_VRAM", streams=streams)
    spy = Spy(monkeypatch)
    model, clip, vae = models_on(DEVICE)
    with torch.inference_mode():
        renderer = PreviewRenderer(
            PreviewSettings(
                prompts=("a red cube",),
                width=64,
                height=64,
                steps=2,
                cfg=2.0,
                sampler_name="euler_ancestral",
                every_n_steps=1,
            ),
            clip,
            vae,
        )

    def preview(record, run):
        renderer.render(run.models.model, run.network)

    got = train((model, clip, vae), *data(), events=tf.StepWatcher(on_step=preview))
    assert len(renderer.images) == CONFIG.max_train_steps and spy.evictions > 0
    assert_same_lora(lora_bytes(got), want["unet"])


@pytest.fixture
def aimdo():
    """comfy-aimdo's host library, which ModelPatcherDynamic needs to exist (its GPU side is never used here)."""
    import importlib

    import comfy_aimdo.control
    import comfy_aimdo.host_buffer

    if not comfy_aimdo.control.init():
        pytest.skip("comfy-aimdo's library does not load on this machine")
    if comfy_aimdo.host_buffer.lib is None:  # bound when it was imported, before init (as main.py does it)
        importlib.reload(comfy_aimdo.host_buffer)


def test_dynamic_vram_trains_through_the_non_dynamic_delegate(comfy_gpu, aimdo, want):
    """DynamicVRAM: the incoming MODEL is a ModelPatcherDynamic (it would stream weights through comfy-aimdo's
    buffers, which need a real GPU); training builds ComfyUI's non-dynamic delegate and never runs or loads the
    dynamic patcher's modules."""
    comfy_gpu(vram_state="NORMAL_VRAM")
    model, clip, vae = models_on(DEVICE, patcher_class=comfy.model_patcher.ModelPatcherDynamic)
    assert model.is_dynamic()
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        got = train((model, clip, vae), *data())
    finally:
        handle.remove()
    assert calls == [] and not any(lm.model is model for lm in mm.current_loaded_models)
    assert got.models.model.model is not model.model and not got.models.model.is_dynamic()
    assert_same_lora(lora_bytes(got), want["unet"])


def test_a_dynamic_model_that_comfyui_cannot_reload_is_refused_clearly(comfy_gpu, aimdo):
    comfy_gpu()
    model, clip, _ = models_on(DEVICE, patcher_class=comfy.model_patcher.ModelPatcherDynamic)
    model.cached_patcher_init = None
    with pytest.raises(ValueError, match="--disable-dynamic-vram"):
        train((model, clip, None), *data())


@pytest.mark.parametrize("memory_mode, streamed", [("auto", True), ("full", False), ("stream", True)])
def test_the_memory_plan_decides_what_comfyui_streams(comfy_gpu, monkeypatch, want, memory_mode, streamed):
    """The plan's step reaches ComfyUI as memory_required. As on NVIDIA (ComfyUI's MIN_WEIGHT_MEMORY_RATIO 0), a GPU
    that holds the U-Net next to ComfyUI's inference reserve but not next to the planned step: ``auto`` streams part
    of the U-Net to leave the step its room, ``full`` keeps every weight resident, ``stream`` streams. Each trains
    the CPU's LoRA. The step is planned large (the tiny model's own step is smaller than ComfyUI's reserve, which
    would hide the plan)."""
    from sdxl_lora_trainer.trainer.run import session

    monkeypatch.setattr(mm, "MIN_WEIGHT_MEMORY_RATIO", 0.0)
    step = int(mm.minimum_inference_memory()) + UNET_BYTES
    monkeypatch.setattr(session, "activation_bytes", lambda *args, **kwargs: step)
    comfy_gpu(memory=small_gpu(1.5), vram_state="NORMAL_VRAM")
    lowvram_at_step: list[bool] = []
    watcher = tf.StepWatcher(on_step=lambda record, run: lowvram_at_step.append(run.models.model.model.model_lowvram))
    got = train(models_on(DEVICE), *data(), config=replace(CONFIG, memory_mode=memory_mode), events=watcher)
    assert got.memory_plan is not None and got.memory_plan.activations == step
    assert_same_lora(lora_bytes(got), want["unet"])
    assert lowvram_at_step == [streamed] * CONFIG.max_train_steps


class ResidentWeightCopies(TorchDispatchMode):
    """Counts copies made on the device of frozen weights that already are on the device (``.to``, ``clone``,
    ``copy_`` from a frozen parameter): what a forward makes when a weight wrapper sits on a resident layer."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        source = {
            torch.ops.aten._to_copy.default: args[0] if args else None,
            torch.ops.aten.clone.default: args[0] if args else None,
            torch.ops.aten.copy_.default: args[1] if len(args) > 1 else None,
        }.get(func)
        result = args[0] if func is torch.ops.aten.copy_.default else out
        if (
            isinstance(source, torch.nn.Parameter)
            and not source.requires_grad
            and source.device == DEVICE
            and isinstance(result, torch.Tensor)
            and result.device == DEVICE
        ):
            self.count += 1
        return out


@pytest.mark.parametrize("mode", ["highvram", "normal", "lowvram_streams", "gpu_only"])
def test_resident_weights_are_used_in_place_not_copied_per_forward(comfy_gpu, want, mode):
    """A step copies no frozen weight that is already on the device: the loaded weights are used in place (an alias
    that autograd may save replaces an inference tensor once per run), and only streamed layers get ComfyUI's cast
    copy. The old way, a weight wrapper on every layer, copied the whole U-Net in each forward and recompute."""
    spec = dict(MODES[mode])
    fraction = spec.pop("memory_fraction", None)
    gpu = comfy_gpu(memory=small_gpu(fraction) if fraction else 8 << 30, **spec)
    counter = ResidentWeightCopies()
    per_step: list[int] = []

    def count(record, run):
        per_step.append(counter.count)

    with counter:
        got = train(models_on(DEVICE, gpu_only=gpu.gpu_only), *data(), events=tf.StepWatcher(on_step=count))
    assert_same_lora(lora_bytes(got), want["unet"])
    assert len(per_step) == CONFIG.max_train_steps
    assert [b - a for a, b in zip(per_step, per_step[1:])] == [0] * (CONFIG.max_train_steps - 1)
