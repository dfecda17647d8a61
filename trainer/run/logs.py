"""A run's step log next to its LoRA: ``<lora>.log.csv`` and ``<lora>.log.jsonl`` (the live TensorBoard / W&B log is
trainer/run/live_log.py).

The CSV and JSONL are written atomically (complete or absent, never a 0-byte log on a full disk); the train node
turns a failed log write into a warning in its report, never a failed run.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..atomic_files import write_atomic
from .loop import StepRecord


def write_logs(lora_path: Path, history: list[StepRecord]) -> tuple[Path, Path]:
    """``<lora>.log.csv`` and ``<lora>.log.jsonl``: step, epoch, loss, lr, mean timestep, seconds, gradient norm.

    Raises ``WriteFailed`` (disk full, permissions) naming the log file."""
    base = lora_path.with_suffix("")
    csv_path, jsonl_path = Path(f"{base}.log.csv"), Path(f"{base}.log.jsonl")
    fields = ["step", "epoch", "loss", "lr", "timestep_mean", "seconds", "grad_norm"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=fields)
    w.writeheader()
    for r in history:
        w.writerow({k: getattr(r, k) for k in fields})
    lines = "".join(json.dumps({k: getattr(r, k) for k in fields}) + "\n" for r in history)
    write_atomic(csv_path, table.getvalue().encode())
    write_atomic(jsonl_path, lines.encode())
    return csv_path, jsonl_path
