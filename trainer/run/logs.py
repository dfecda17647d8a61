"""A run's step log next to its LoRA: ``<lora>.log.csv``, ``<lora>.log.jsonl`` and, when tensorboard is installed,
TensorBoard event files.

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
    """``<lora>.log.csv`` and ``<lora>.log.jsonl``: step, epoch, loss, lr, mean timestep, seconds.

    Raises ``WriteFailed`` (disk full, permissions) naming the log file."""
    base = lora_path.with_suffix("")
    csv_path, jsonl_path = Path(f"{base}.log.csv"), Path(f"{base}.log.jsonl")
    fields = ["step", "epoch", "loss", "lr", "timestep_mean", "seconds"]
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=fields)
    w.writeheader()
    for r in history:
        w.writerow({k: getattr(r, k) for k in fields})
    lines = "".join(json.dumps({k: getattr(r, k) for k in fields}) + "\n" for r in history)
    write_atomic(csv_path, table.getvalue().encode())
    write_atomic(jsonl_path, lines.encode())
    return csv_path, jsonl_path


def write_tensorboard(log_dir: Path, history: list[StepRecord]) -> Path | None:
    """TensorBoard event files when the tensorboard package is installed; otherwise nothing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    writer = SummaryWriter(log_dir=str(log_dir))
    for r in history:
        writer.add_scalar("loss/current", r.loss, r.step)
        writer.add_scalar("lr/unet", r.lr, r.step)
    writer.close()
    return log_dir
