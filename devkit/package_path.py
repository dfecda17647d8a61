"""Make the repository importable the way scripts, benchmarks and tests need it, without running ComfyUI.

Two things, in one place:

* ``devkit/`` (this folder) goes on ``sys.path``: the development tools (server harness, tiny SDXL, stand-in
  device, workflow converter...) are imported by their plain names (``import comfy_server``).
* The repository root is registered as the package ``sdxl_lora_trainer`` (the name the setup script links into
  ComfyUI's custom_nodes), so engine code is imported as ``sdxl_lora_trainer.trainer...`` with its relative
  imports intact, without executing the pack's ``__init__`` and without putting the root itself on ``sys.path``
  (its ``nodes/`` would shadow ComfyUI's own ``nodes`` module).

Use from a script: ``sys.path.insert(0, str(ROOT / "devkit")); import package_path; package_path.register()``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "sdxl_lora_trainer"


def register() -> Path:
    """Put devkit/ on sys.path and register the repository as ``sdxl_lora_trainer``; returns the root."""
    devkit = str(ROOT / "devkit")
    if devkit not in sys.path:
        sys.path.insert(0, devkit)
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(ROOT)]  # a package whose submodules live in the repository root
        package.__file__ = str(ROOT / "__init__.py")
        sys.modules[PACKAGE] = package
    return ROOT
