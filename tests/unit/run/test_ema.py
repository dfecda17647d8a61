"""EMA of the adapter weights (trainer/run/ema.py) against the plain formula, its schedule, state and swap."""

from __future__ import annotations

import pytest
import torch

from sdxl_lora_trainer.trainer.network.lora import LoRAModule, LoRANetwork
from sdxl_lora_trainer.trainer.run.ema import AdapterEma, EmaSettings


def _network(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoRANetwork:
    modules = [
        LoRAModule(f"lora_unet_m{i}", torch.nn.Linear(6, 5), 3, 2.0, generator=torch.Generator().manual_seed(seed + i))
        for i in range(2)
    ]
    return LoRANetwork.from_modules(modules).to(dtype)


def _perturb(network: LoRANetwork, step: int) -> None:
    """A stand-in optimizer step: deterministic new weights."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


def _plain_ema(weights_per_step: list[dict[str, torch.Tensor]], settings: EmaSettings) -> dict[str, torch.Tensor]:
    """The textbook recursion in float64: first averaged step copies; then ema = d * ema + (1 - d) * w."""
    ema: dict[str, torch.Tensor] | None = None
    t = 0
    for step, weights in enumerate(weights_per_step, start=1):
        first = max(1, settings.start_step)
        if step < first or (step - first) % settings.update_every_n_steps:
            continue
        if ema is None:
            ema = {k: v.double().clone() for k, v in weights.items()}
        else:
            d = settings.decay
            if settings.warmup_power:
                d = min(d, 1 - (1 + t) ** -settings.warmup_power)
            ema = {k: d * ema[k] + (1 - d) * weights[k].double() for k in ema}
        t += 1
    assert ema is not None
    return ema


@pytest.mark.parametrize(
    "settings",
    [
        EmaSettings(decay=0.9),
        EmaSettings(decay=0.99, warmup_power=2 / 3),
        EmaSettings(decay=0.8, update_every_n_steps=3, start_step=4),
        EmaSettings(decay=0.95, warmup_power=0.75, update_every_n_steps=2, start_step=1),
    ],
    ids=["plain", "warmup", "every3-from4", "warmup-every2"],
)
def test_ema_equals_the_plain_formula(settings):
    network = _network()
    ema = AdapterEma(network, settings)
    history = []
    for step in range(1, 13):
        _perturb(network, step)
        history.append({k: v.detach().clone() for k, v in network.named_parameters()})
        ema.after_step(step)
    expected = _plain_ema(history, settings)
    assert set(ema.averages) == set(expected)
    for k, v in ema.averages.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-7)
    assert ema.updates == sum(settings.due(s) for s in range(1, 13))
    # the average is not the last weights (the test could not tell an EMA from a copy otherwise)
    assert any(not torch.equal(ema.averages[k], history[-1][k]) for k in expected)


def test_schedule_of_updates_and_decays():
    s = EmaSettings(decay=0.999, warmup_power=1.0, update_every_n_steps=3, start_step=5)
    assert [step for step in range(1, 15) if s.due(step)] == [5, 8, 11, 14]
    assert s.decay_at(0) == 0.0  # the first update copies
    assert s.decay_at(1) == pytest.approx(0.5)  # 1 - 2^-1
    assert s.decay_at(9) == pytest.approx(0.9)
    assert s.decay_at(10**6) == 0.999  # capped at decay
    assert EmaSettings(decay=0.9).decay_at(1) == 0.9
    assert [step for step in range(1, 4) if EmaSettings(start_step=0).due(step)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.0}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"warmup_power": -1.0}, "warmup_power"),
        ({"update_every_n_steps": 0}, "update_every_n_steps"),
        ({"start_step": -1}, "start_step"),
        ({"save_as": "both"}, "save_as"),
    ],
)
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmaSettings(**kwargs)


def test_fp32_averages_of_bf16_weights_and_the_saved_dict():
    network = _network(dtype=torch.bfloat16)
    ema = AdapterEma(network, EmaSettings(decay=0.5))
    for step in range(1, 4):
        _perturb(network, step)
        ema.after_step(step)
    assert all(v.dtype == torch.float32 for v in ema.averages.values())
    saved = ema.state_dict_kohya()
    assert saved.keys() == network.state_dict_kohya().keys()  # alphas included, kohya's layout
    for k, v in ema.averages.items():
        assert torch.equal(saved[k], v)


def test_swapped_in_computes_with_the_average_and_restores_bit_exactly():
    network = _network()
    ema = AdapterEma(network, EmaSettings(decay=0.7))
    for step in range(1, 5):
        _perturb(network, step)
        ema.after_step(step)
    trained = {k: v.detach().clone() for k, v in network.named_parameters()}
    with ema.swapped_in():
        for k, p in network.named_parameters():
            assert torch.equal(p, ema.averages[k])
    for k, p in network.named_parameters():
        assert torch.equal(p, trained[k])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")
    for k, p in network.named_parameters():
        assert torch.equal(p, trained[k])


def test_state_round_trip_continues_exactly():
    settings = EmaSettings(decay=0.9, warmup_power=0.75)
    network = _network()
    whole = AdapterEma(network, settings)
    for step in range(1, 7):
        _perturb(network, step)
        whole.after_step(step)

    network2 = _network()
    first = AdapterEma(network2, settings)
    for step in range(1, 4):
        _perturb(network2, step)
        first.after_step(step)
    resumed = AdapterEma(network2, settings)
    resumed.load_state(first.state_tensors(), first.updates)
    for step in range(4, 7):
        _perturb(network2, step)
        resumed.after_step(step)
    for k in whole.averages:
        assert torch.equal(whole.averages[k], resumed.averages[k])
    with pytest.raises(ValueError, match="do not match"):
        resumed.load_state({"x": torch.zeros(1)}, 1)
