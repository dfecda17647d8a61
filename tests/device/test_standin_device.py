"""The stand-in accelerator itself: it must fail where CUDA fails, and compute what the CPU computes."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from standin_device import DEVICE, on_standin, values

pytestmark = pytest.mark.usefixtures("standin")


def test_mixing_host_and_device_tensors_raises_as_on_cuda():
    x = torch.ones(3, 4).to(DEVICE)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        _ = x + torch.ones(3, 4)
    with pytest.raises(RuntimeError, match="same device"):
        torch.nn.functional.mse_loss(x, torch.zeros(3, 4))
    assert on_standin(x * torch.tensor(2.0))  # a 0-dim host tensor is a scalar, as on CUDA
    assert values(x[torch.tensor([0, 2])]).shape == (2, 4)  # host index tensors are copied over, as on CUDA


def test_generators_must_be_on_the_device_they_draw_for():
    with pytest.raises(RuntimeError, match="CPU generator"):
        torch.randn(3, device=DEVICE, generator=torch.Generator().manual_seed(0))
    device_generator = torch.Generator(device=DEVICE)
    device_generator.manual_seed(0)
    assert on_standin(torch.randn(3, device=DEVICE, generator=device_generator))
    with pytest.raises(RuntimeError, match="device generator"):
        torch.randn(3, generator=device_generator)


def test_the_device_has_its_own_global_rng():
    module = torch.get_device_module(DEVICE)
    module.manual_seed(7)
    a = values(torch.rand(4, device=DEVICE))
    torch.manual_seed(123)  # the host's RNG: the device's stream is not affected
    module.manual_seed(7)
    assert torch.equal(values(torch.rand(4, device=DEVICE)), a)
    state = module.get_rng_state()
    b = values(torch.rand(4, device=DEVICE))
    module.set_rng_state(state)
    assert torch.equal(values(torch.rand(4, device=DEVICE)), b) and not torch.equal(a, b)


def test_checkpointing_replays_device_dropout_in_the_recompute():
    lin = torch.nn.Linear(8, 8).to(DEVICE)
    x = torch.randn(4, 8).to(DEVICE).requires_grad_(True)

    def block(t):
        return torch.nn.functional.dropout(lin(t), 0.5)

    torch.get_device_module(DEVICE).manual_seed(3)
    plain = torch.autograd.grad(block(x).square().sum(), x)[0]
    torch.get_device_module(DEVICE).manual_seed(3)
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    recomputed = torch.autograd.grad(out.square().sum(), x)[0]
    assert torch.equal(values(plain), values(recomputed))


def test_values_are_the_cpus_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    want = conv(x).relu().mean(dim=(2, 3))
    conv.to(DEVICE)
    got = conv(x.to(DEVICE)).relu().mean(dim=(2, 3))
    assert got.device == DEVICE and torch.equal(values(got), want)
    assert torch.equal(values(torch.tensor([[1.5, 2.5]], device=DEVICE)), torch.tensor([[1.5, 2.5]]))


def test_copies_and_syncs_are_counted(standin):
    before = standin.transfers.copy()
    x = torch.ones(5).to(DEVICE)
    y = (x * 2).sum()
    float(y)
    x.cpu()
    torch.nonzero(x)
    got = standin.transfers.since(before)
    assert (got.host_to_device, got.device_to_host, got.syncs) == (1, 1, 3)
