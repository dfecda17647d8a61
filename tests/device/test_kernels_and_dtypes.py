"""ComfyUI's fast kernels and GPU settings meet training: attention kernels and layers without a backward are
swapped for the run, fp16 accumulation is switched off, and train_dtype "auto" asks ComfyUI what the GPU can do."""

from __future__ import annotations

from dataclasses import replace

import comfy.ldm.modules.attention as attention
import comfy.model_management as mm
import pytest
import torch
import training_fixtures as tf
from device_helpers import assert_same_lora, data, lora_bytes, models_on
from standin_device import DEVICE

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.run.config import TrainConfig

NET = NetworkConfig(network_dim=4, network_alpha=2.0, train_te1=False, train_te2=False)
CONFIG = TrainConfig(max_train_steps=1, learning_rate=1e-2, seed=5)


def train(model=None, net=NET, config=CONFIG, **kwargs):
    model = model if model is not None else models_on(DEVICE)[0]
    with torch.inference_mode():
        return tf.train(model, None, *data(), net, config, **kwargs)


# -- attention ------------------------------------------------------------------------------------------------


def no_backward(q, k, v, heads, mask=None, **kwargs):
    """Like --use-flash-attention's custom op: right values, no autograd formula (nothing before it learns)."""
    with torch.no_grad():
        return attention.attention_pytorch(q, k, v, heads, mask=mask, **kwargs)


def quantized_qk(q, k, v, heads, mask=None, **kwargs):
    """Like sage attention's int8 q/k: the loss still falls (v learns), q and k get no gradient."""
    return attention.attention_pytorch(q.detach(), k.detach(), v, heads, mask=mask, **kwargs)


KERNELS = {
    "sub_quadratic": attention.attention_sub_quad,
    "split": attention.attention_split,
    "flash_custom_op": no_backward,
    "sage_quantized": quantized_qk,
}


def qkv_grads(monkeypatch, model=None):
    cap = tf.Capture(monkeypatch)
    result = train(model)
    grads = cap.step_grads[0]
    return result, {
        k: v for k, v in grads.items() if k.split(".")[0].endswith(("to_q", "to_k", "to_v")) and "lora_up" in k
    }


@pytest.fixture
def reference(comfy_gpu, monkeypatch):
    """The LoRA and the q/k/v gradients with PyTorch SDPA selected."""
    comfy_gpu()
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    with monkeypatch.context() as m:
        result, grads = qkv_grads(m)
    return lora_bytes(result), grads


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_every_comfyui_attention_kernel_trains_q_k_v(reference, monkeypatch, kernel):
    want, want_grads = reference
    monkeypatch.setattr(attention, "optimized_attention", KERNELS[kernel])
    monkeypatch.setattr(attention, "optimized_attention_masked", KERNELS[kernel])
    result, grads = qkv_grads(monkeypatch)
    assert len(grads) == len(want_grads) == 66  # 11 transformer blocks x (attn1, attn2) x (q, k, v)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert all(torch.equal(grads[k], want_grads[k]) for k in want_grads)
    assert_same_lora(lora_bytes(result), want)
    assert attention.optimized_attention is KERNELS[kernel]  # ComfyUI's choice is back for sampling


def test_an_attention_override_of_another_node_is_not_used_for_training(reference, monkeypatch):
    want, want_grads = reference
    calls = []

    def override(func, *args, **kwargs):
        calls.append(func.__name__)
        return no_backward(*args, **{k: v for k, v in kwargs.items() if k != "_inside_attn_wrapper"})

    model = models_on(DEVICE)[0].clone()
    model.model_options["transformer_options"]["optimized_attention_override"] = override
    result, grads = qkv_grads(monkeypatch, model)
    assert calls == [] and all(torch.equal(grads[k], want_grads[k]) for k in want_grads)
    assert_same_lora(lora_bytes(result), want)
    assert model.model_options["transformer_options"]["optimized_attention_override"] is override


# -- layers whose kernel has no backward (--fast cublas_ops) --------------------------------------------------


def test_layers_with_a_kernel_without_backward_train_through_comfyuis_path(reference, monkeypatch):
    """comfy.ops' cublas Linear (--fast cublas_ops, fp16 models) multiplies with a kernel that has no backward."""
    want, _ = reference
    model = models_on(DEVICE)[0]
    layers = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith(("attn1.to_out.0", "ff.net.2"))]
    base = type(layers[0])

    class CublasLinear(base):
        def forward_comfy_cast_weights(self, input):
            with torch.no_grad():
                return super().forward_comfy_cast_weights(input)

    for m in layers:
        m.__class__ = CublasLinear
    try:
        result = train(model)
    finally:
        for m in layers:
            m.__class__ = base
    assert "cublas_ops" in "\n".join(result.notes)
    assert_same_lora(lora_bytes(result), want)
    assert all("forward_comfy_cast_weights" not in m.__dict__ for m in layers)


# -- precision --------------------------------------------------------------------------------------------------


def unet_input_dtypes(model):
    seen = set()
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
    return seen, handle


@pytest.mark.parametrize("bf16,fp16,want", [(True, True, "bf16"), (False, True, "fp16"), (False, False, "fp32")])
def test_auto_dtype_asks_comfyui_what_the_gpu_computes_well(comfy_gpu, monkeypatch, bf16, fp16, want):
    comfy_gpu()
    monkeypatch.setattr(mm, "should_use_bf16", lambda device=None, *a, **k: bf16 and device == DEVICE)
    monkeypatch.setattr(mm, "should_use_fp16", lambda device=None, *a, **k: fp16 and device == DEVICE)
    model = models_on(DEVICE)[0]
    seen, handle = unet_input_dtypes(model)
    try:
        result = train(model, config=replace(CONFIG, train_dtype="auto"))
    finally:
        handle.remove()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[want]
    assert result.train_dtype == want and seen == {dtype}
    assert (result.scaler is not None) == (want == "fp16")  # fp16 trains through a gradient scaler


def test_auto_dtype_on_the_cpu_is_fp32():
    model, _, _ = tf.inference_models()
    with torch.inference_mode():
        result = tf.train(model, None, *data(), NET, replace(CONFIG, train_dtype="auto"))
    assert result.train_dtype == "fp32" and result.scaler is None


def test_full_bf16_needs_bf16_from_auto(comfy_gpu, monkeypatch):
    comfy_gpu()
    monkeypatch.setattr(mm, "should_use_bf16", lambda *a, **k: False)
    with pytest.raises(ValueError, match="full_bf16 needs bf16; train_dtype auto chose"):
        train(config=replace(CONFIG, train_dtype="auto", full_bf16=True))


def test_fp16_accumulation_is_off_while_training(comfy_gpu, monkeypatch):
    """--fast fp16_accumulation makes ComfyUI accumulate matmuls in fp16 (a sampling speed-up that makes training
    unstable): it is off inside the run, back on after, and the report says so."""
    comfy_gpu()
    matmul = torch.backends.cuda.matmul
    model = models_on(DEVICE)[0]
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda m, args: seen.append(matmul.allow_fp16_accumulation)
    )
    matmul.allow_fp16_accumulation = True
    try:
        result = train(model)
        after = matmul.allow_fp16_accumulation
    finally:
        matmul.allow_fp16_accumulation = False
        handle.remove()
    assert seen and not any(seen) and after
    assert any("fp16 accumulation" in note for note in result.notes)
