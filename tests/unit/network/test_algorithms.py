"""The algorithm registry (trainer/network/__init__.py): algo "lora" never imports LyCORIS, and a network class
builds only its own algo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdxl_lora_trainer.trainer.network.config import NetworkConfig
from sdxl_lora_trainer.trainer.network.lora import LoRANetwork

ROOT = Path(__file__).resolve().parents[3]

# run in a fresh interpreter where importing lycoris fails: building a LoRA must not need it, LoHa must ask for it
WITHOUT_LYCORIS = """
import sys
sys.modules["lycoris"] = None
sys.path.insert(0, "devkit")
import package_path
package_path.register()
import torch
from sdxl_lora_trainer.trainer.network import network_class
from sdxl_lora_trainer.trainer.network.config import NetworkConfig

config = NetworkConfig(train_te1=False, train_te2=False)
net = network_class("lora").build(torch.nn.Linear(2, 2), None, None, config, torch.Generator())
assert type(net).__name__ == "LoRANetwork", type(net)
assert not [m for m in sys.modules if "lycoris" in m and sys.modules[m] is not None], "lycoris was imported"
try:
    network_class("loha")
except ImportError:
    print("loha needs lycoris")
"""


def test_lora_is_built_without_lycoris():
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_LYCORIS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loha needs lycoris"


def test_a_network_class_builds_only_its_algo():
    config = NetworkConfig(algo="loha", train_unet=False, train_te1=False, train_te2=False)
    with pytest.raises(ValueError, match="LoRANetwork builds algo 'lora', not 'loha'"):
        LoRANetwork.build(None, None, None, config, torch.Generator())
