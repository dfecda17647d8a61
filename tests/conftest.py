"""Test harness shared by all tiers.

Tiers are folders: tests/unit (no ComfyUI import), tests/host (ComfyUI's comfy.* in-process, CPU),
tests/device (the engine with the models on a stand-in accelerator: devkit/standin_device.py), tests/server (a real ComfyUI server with the pack loaded), tests/browser (the real frontend in headless
Chromium against such a server). Each test is marked with its tier
automatically, so `-m unit` / `-m host` / `-m server` select them.

The repo root is registered as the package ``sdxl_lora_trainer`` (the name the setup script links
into ComfyUI's custom_nodes), so tests import engine code as ``sdxl_lora_trainer.trainer.<module>``
without executing the pack's ``__init__`` and without clashing with ComfyUI's own ``nodes`` module.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sdxl_lora_trainer"

if PACKAGE not in sys.modules:
    _pkg = types.ModuleType(PACKAGE)
    _pkg.__path__ = [str(ROOT)]  # a package whose submodules live in the repo root
    _pkg.__file__ = str(ROOT / "__init__.py")
    sys.modules[PACKAGE] = _pkg

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from golden_data import load_golden  # noqa: E402

TIERS = ("unit", "host", "device", "server", "browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def golden():
    """Load a file of ../shared/golden (numbers produced by kohya sd-scripts' own functions)."""
    cache: dict[str, dict] = {}

    def load(name: str) -> dict:
        if name not in cache:
            cache[name] = load_golden(name)
        return cache[name]

    return load
