"""Write a kohya run folder: dataset (images + captions), dataset.toml, config.toml, sample prompts, launch.sh,
README.txt. Built under a hidden temporary name and renamed into place at the end, so a folder under its real name is
always complete; an existing folder is never replaced (a new name gets ``_2``, ``_3``...)."""

from __future__ import annotations

import math
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

import toml

from ..data.bucket_batches import max_train_steps_for_epochs
from ..data.dataset import TrainingDataset
from ..network.file_names import safe_relative_name
from .config_export import KohyaArgs, sample_prompts_text, to_kohya_args
from .dataset_export import DatasetExport, dataset_export, place_image
from .run import KohyaRun

#: the folder under ComfyUI's output directory that holds exported runs
EXPORT_SUBFOLDER = "kohya_runs"


class ExportError(OSError):
    """Writing the export failed; the message names the folder and what to do. Nothing partial is left behind."""


@dataclass
class KohyaExport:
    folder: Path
    args: KohyaArgs
    dataset: DatasetExport
    num_processes: int
    bytes_copied: int = 0
    lines: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(self.lines)


def _unique_folder(root: Path, name: str) -> Path:
    candidate, n = root / name, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{name}_{n}"
    return candidate


def launch_script(num_processes: int) -> str:
    """The accelerate command kohya documents, run from the export folder (every path in the configs is relative)."""
    multi = " --multi_gpu" if num_processes > 1 else ""
    return f"""#!/usr/bin/env bash
# Train this run with kohya sd-scripts on {num_processes} GPU(s). Needs: a kohya sd-scripts checkout with its
# requirements installed and `accelerate config` done once. SD_SCRIPTS: that checkout; SDXL_CHECKPOINT (optional):
# the SDXL checkpoint on this machine (overrides pretrained_model_name_or_path in config.toml).
set -euo pipefail
cd "$(dirname "$0")"
: "${{SD_SCRIPTS:?set SD_SCRIPTS to your kohya sd-scripts checkout, e.g. SD_SCRIPTS=~/sd-scripts ./launch.sh}}"
extra=()
if [ -n "${{SDXL_CHECKPOINT:-}}" ]; then extra+=(--pretrained_model_name_or_path "$SDXL_CHECKPOINT"); fi
accelerate launch --num_processes {num_processes}{multi} "$SD_SCRIPTS/sdxl_train_network.py" \\
  --config_file config.toml --dataset_config dataset.toml "${{extra[@]}}"
"""


def _schedule_lines(run: KohyaRun, dataset: TrainingDataset, num_processes: int) -> list[str]:
    """What num_processes does to batches and steps, with kohya's formulas (train_network.py)."""
    train = run.train
    batches = dataset.num_batches()
    per_epoch = math.ceil(batches / num_processes / train.gradient_accumulation_steps)
    sizes = sorted({part.batch_size for part in dataset.parts})
    effective = [b * train.gradient_accumulation_steps * num_processes for b in sizes]
    lines = [
        f"num_processes {num_processes}: each optimizer step sees batch_size x gradient_accumulation_steps x "
        f"num_processes = {' / '.join(map(str, effective))} images (one GPU in the graph: "
        f"{' / '.join(str(b * train.gradient_accumulation_steps) for b in sizes)}).",
        f"kohya's optimizer steps per epoch: ceil({batches} batches / {num_processes} / "
        f"{train.gradient_accumulation_steps}) = {per_epoch}.",
    ]
    if train.max_train_epochs > 0:
        steps = max_train_steps_for_epochs(
            train.max_train_epochs, batches, train.gradient_accumulation_steps, num_processes
        )
        lines.append(f"max_train_epochs {train.max_train_epochs} -> {steps} optimizer steps on {num_processes} GPU(s).")
    else:
        epochs = math.ceil(train.max_train_steps / max(1, per_epoch))
        lines.append(
            f"max_train_steps {train.max_train_steps} is kept: on {num_processes} GPU(s) that is about {epochs} "
            "epoch(s), i.e. num_processes times the images the graph's run sees; lower max_train_steps (or set "
            "max_train_epochs) to see the same number of images."
        )
    return lines


def _readme(run: KohyaRun, export: KohyaExport, schedule: list[str]) -> str:
    checkpoint = run.checkpoint_path or "<the SDXL checkpoint file you loaded in ComfyUI>"
    lines = [
        "kohya sd-scripts run exported from a ComfyUI graph (SDXL LoRA Trainer pack)",
        "",
        "Files: config.toml (--config_file), dataset.toml (--dataset_config), images/ (the dataset: every image and",
        "its caption .txt, as the graph trained on them), launch.sh (the accelerate command), sample_prompts.txt when",
        "the graph had sample previews.",
        "",
        "Checkpoint: pretrained_model_name_or_path in config.toml is",
        f"  {checkpoint}",
        "Point it at that file on the machine that trains (or run with SDXL_CHECKPOINT=/path/to/file.safetensors).",
        "",
        "Run it:",
        "  SD_SCRIPTS=/path/to/sd-scripts ./launch.sh",
        "(the command inside: accelerate launch --num_processes N [--multi_gpu] sdxl_train_network.py --config_file",
        " config.toml --dataset_config dataset.toml; the LoRA goes to output/, TensorBoard logs to logs/).",
        "",
        "Batches and steps:",
        *[f"  {line}" for line in schedule],
        "",
        "Continue in ComfyUI: copy output/<name>.safetensors into ComfyUI's models/loras folder and pick it in the",
        "Network node's start_from.",
    ]
    if export.args.not_carried or export.dataset.notes or export.args.notes:
        lines += ["", "Not carried over (kohya has no equivalent; the exported run goes the way described):"]
        lines += [f"  - {item}" for item in export.args.not_carried]
        lines += ["", "Where kohya's run differs from the graph's:"]
        lines += [f"  - {item}" for item in export.args.notes + export.dataset.notes]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def export_kohya_run(
    run: KohyaRun, dataset: TrainingDataset, output_root: str | Path, name: str, num_processes: int = 1
) -> KohyaExport:
    """Write the run folder ``<output_root>/kohya_runs/<name>`` (or ``<name>_2``...) and return what was written."""
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    stem = safe_relative_name("", name)
    root = Path(output_root) / EXPORT_SUBFOLDER
    args = to_kohya_args(run)
    data = dataset_export(dataset)
    export = KohyaExport(folder=_unique_folder(root, stem), args=args, dataset=data, num_processes=num_processes)
    tmp = root / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir(parents=True)
        for rel, item in data.images:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            export.bytes_copied += place_image(item, target)
        for rel, text in data.captions:
            _write_text(tmp / rel, text)
        _write_text(tmp / "dataset.toml", toml.dumps(data.config))
        _write_text(tmp / "config.toml", toml.dumps(args.args))
        if run.previews is not None:
            _write_text(tmp / "sample_prompts.txt", sample_prompts_text(run))
        schedule = _schedule_lines(run, dataset, num_processes)
        _write_text(tmp / "launch.sh", launch_script(num_processes))
        os.chmod(tmp / "launch.sh", os.stat(tmp / "launch.sh").st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        _write_text(tmp / "README.txt", _readme(run, export, schedule))
        export.folder = _unique_folder(root, stem)
        os.rename(tmp, export.folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"could not write the kohya run folder {root / stem} ({e.strerror or e}); nothing was left behind. "
            "Free disk space or check that ComfyUI's output folder is writable, then queue again."
        ) from e
    export.lines = [
        f"kohya run written to {export.folder}",
        f"  {len(data.images)} images in {len(data.config['datasets'])} dataset(s); "
        f"{export.bytes_copied / 1e6:.1f} MB copied (the rest hard-linked)",
        f"  run it: SD_SCRIPTS=/path/to/sd-scripts {export.folder / 'launch.sh'}",
        *[f"  {line}" for line in schedule],
    ]
    if args.not_carried:
        export.lines.append("not carried over:")
        export.lines += [f"  - {item}" for item in args.not_carried]
    if args.notes or data.notes:
        export.lines.append("where kohya's run differs:")
        export.lines += [f"  - {item}" for item in args.notes + data.notes]
    return export
