"""kohya sd-scripts' sdxl_train_network.py argument list, as data (tests/data/kohya/sdxl_train_network_args.json,
dumped from kohya's own parser by scripts/kohya_reference.py: CI cannot fetch sd-scripts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).resolve().parents[2] / "data" / "kohya" / "sdxl_train_network_args.json"


def kohya_arguments() -> dict[str, dict[str, Any]]:
    table = json.loads(TABLE_PATH.read_text())
    return {row["dest"]: row for row in table["arguments"]}


def type_error(name: str, value: Any, spec: dict[str, Any]) -> str | None:
    """Why ``value`` is not what kohya's argument ``name`` holds after argparse, or None. (kohya's config reader
    hands TOML values to argparse without conversion, so the TOML value must already have that type.)"""
    if spec["flag"]:
        return None if value is True else f"{name} is a flag: only true may be written"
    kind = {"int": int, "float": float, "str": str, "Path": str, "int_or_float": (int, float)}.get(spec["type"])
    values = value if spec["nargs"] in ("*", "+") else [value]
    if spec["nargs"] in ("*", "+") and not isinstance(value, list):
        return f"{name} takes a list"
    for v in values:
        if isinstance(v, bool) or kind is None or not isinstance(v, kind):
            return f"{name}: {v!r} is not {spec['type']}"
        if spec["choices"] is not None and v not in spec["choices"]:
            return f"{name}: {v!r} is not one of {spec['choices']}"
    return None
