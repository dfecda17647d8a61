"""A run's step log next to its LoRA: ``<lora>.log.csv`` and ``<lora>.log.jsonl`` (the live TensorBoard / W&B log is
trainer/run/live_log.py).

The CSV and JSONL are written atomically (complete or absent, never a 0-byte log on a full disk); the train node
turns a failed log write into a warning in its report, never a failed run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..atomic_files import write_atomic
from .loop import StepRecord
from .validation import ValidationRecord


def write_logs(
    lora_path: Path, history: list[StepRecord], validations: Sequence[ValidationRecord] = ()
) -> tuple[Path, Path]:
    """``<lora>.log.csv`` and ``<lora>.log.jsonl``: step, epoch, loss, lr, mean timestep, seconds, gradient norm,
    and the validation loss of the steps that were validated (empty in the CSV, absent in the JSONL otherwise).

    Raises ``WriteFailed`` (disk full, permissions) naming the log file."""
    base = lora_path.with_suffix("")
    csv_path, jsonl_path = Path(f"{base}.log.csv"), Path(f"{base}.log.jsonl")
    fields = ["step", "epoch", "loss", "lr", "timestep_mean", "seconds", "grad_norm"]
    val_loss = {r.step: r.loss for r in validations}
    rows = []
    for r in history:
        row = {k: getattr(r, k) for k in fields}
        if r.step in val_loss:
            row["val_loss"] = val_loss[r.step]
        rows.append(row)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=[*fields, "val_loss"], restval="")
    w.writeheader()
    w.writerows(rows)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    write_atomic(csv_path, table.getvalue().encode())
    write_atomic(jsonl_path, lines.encode())
    return csv_path, jsonl_path
