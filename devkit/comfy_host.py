"""Find the ComfyUI that the tests run against and import its ``comfy.*`` in-process on CPU.

The setup script provisions ComfyUI 0.30.0 at ``.comfyui/ComfyUI`` (or takes ``COMFYUI_DIR``) and
writes ``.comfyui/env.sh``; tests read the same place so that a plain ``pytest`` after setup works.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def comfyui_dir() -> Path:
    """The ComfyUI root: ``COMFYUI_DIR`` if set, else the one the setup script extracted."""
    env = os.environ.get("COMFYUI_DIR")
    path = Path(env) if env else ROOT / ".comfyui" / "ComfyUI"
    if not (path / "main.py").is_file():
        raise RuntimeError(
            f"No ComfyUI at {path}: run `bash scripts/setup.sh` (or `make test`), "
            "or set COMFYUI_DIR to a ComfyUI checkout."
        )
    return path


def import_comfy() -> Path:
    """Put ComfyUI on ``sys.path`` and force CPU before ``comfy.model_management`` is imported.

    ComfyUI parses ``sys.argv`` only when ``comfy.options.enable_args_parsing`` is on; it is off by
    default, so pytest's own arguments never reach it. ``args.cpu`` must be set before
    ``comfy.model_management`` decides on a device, which happens at its import.
    """
    if "comfy.model_management" in sys.modules:  # already inside a running ComfyUI (server tier)
        return Path(sys.modules["comfy.model_management"].__file__).resolve().parent.parent
    root = comfyui_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_dynamic_vram = True
    import comfy.model_management  # noqa: F401  (decides the device now, with cpu forced)

    return root
