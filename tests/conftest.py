"""Test harness shared by all tiers.

Tiers are folders: tests/unit (no ComfyUI import), tests/host (ComfyUI's comfy.* in-process, CPU),
tests/device (the engine with the models on a stand-in accelerator: devkit/standin_device.py), tests/server (a
real ComfyUI server with the pack loaded), tests/browser (the real frontend in headless Chromium against such a
server). Each test is marked with its tier automatically, so `-m unit` / `-m host` / `-m server` select them.

devkit/package_path.py registers the repo root as the package ``sdxl_lora_trainer`` (tests import engine code as
``sdxl_lora_trainer.trainer...``) and puts the development tools of devkit/ on the path; tests/ holds the
test-only helpers (fixtures, golden data, dataset factories).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "devkit"))
import package_path  # noqa: E402

package_path.register()
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
