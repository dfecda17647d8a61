"""A run's step log next to its LoRA: ``<lora>.log.csv`` and ``<lora>.log.jsonl`` (the live TensorBoard / W&B log is
trainer/run/live_log.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .loop import StepRecord


def write_logs(lora_path: Path, history: list[StepRecord]) -> tuple[Path, Path]:
    """``<lora>.log.csv`` and ``<lora>.log.jsonl``: step, epoch, loss, lr, mean timestep, seconds, gradient norm."""
    base = lora_path.with_suffix("")
    csv_path, jsonl_path = Path(f"{base}.log.csv"), Path(f"{base}.log.jsonl")
    fields = ["step", "epoch", "loss", "lr", "timestep_mean", "seconds", "grad_norm"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in history:
            w.writerow({k: getattr(r, k) for k in fields})
    with open(jsonl_path, "w") as f:
        for r in history:
            f.write(json.dumps({k: getattr(r, k) for k in fields}) + "\n")
    return csv_path, jsonl_path
