"""Where the golden numbers live: ../shared/golden beside the clone (or SDXL_LORA_GOLDEN_DIR)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(os.environ.get("SDXL_LORA_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))


def load_golden(name: str) -> dict:
    path = GOLDEN_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"golden file {path} is missing: CI and the README expect ../shared beside the clone")
    return json.loads(path.read_text())
