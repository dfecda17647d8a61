"""Resumable training state as safetensors + JSON: loading never executes code (no pickle).

A state folder holds ``state.safetensors`` (LoRA weights, optimizer tensors, RNG states) and
``state.json`` (counters, optimizer hyper-parameters and scalar state, scheduler and grad-scaler
state, the loop's Python RNG state and loss history, and a fingerprint of the run settings that
must not change on resume). A run with an EMA adds its fp32 averages (``ema.*`` tensors) and its
update count. Both files are written atomically, tensors first, so a folder is either the old state
or the new one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..atomic_files import WriteFailed, temp_path, write_atomic
from .loop import LoopState

STATE_FORMAT = "sdxl_lora_trainer.state/1"
TENSORS = "state.safetensors"
META = "state.json"


class StateError(ValueError):
    pass


def _json_value(v: Any) -> Any:
    """Optimizer/scheduler values that JSON can hold; tuples are kept as lists (restored below)."""
    if isinstance(v, torch.Tensor):
        raise TypeError("tensors go to safetensors")
    if isinstance(v, float) and not math.isfinite(v):
        return {"__float__": repr(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [_json_value(x) for x in v]}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise StateError(f"cannot store a {type(v).__name__} in the training state")


def _from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if "__float__" in v:
            return float(v["__float__"])
        if "__tuple__" in v:
            return tuple(_from_json(x) for x in v["__tuple__"])
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def split_optimizer_state(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (per-parameter state, and per-group ones such as ProdigyPlusScheduleFree's running sums) for
    safetensors; everything else for JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, entry in opt_state["state"].items():
        scalars[str(pid)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[str(pid)][name] = _json_value(value)
    groups = []
    for index, group in enumerate(opt_state["param_groups"]):
        plain = {}
        for name, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer_group.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value
        groups.append(plain)
    return tensors, {"state": scalars, "param_groups": _json_value(groups)}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(_from_json(v)) for pid, v in meta["state"].items()}
    groups: list[dict] = _from_json(meta["param_groups"])
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
        elif key.startswith("optimizer_group."):
            _, index, name = key.split(".", 2)
            groups[int(index)][name] = value
    return {"state": state, "param_groups": groups}


def save_state(
    folder: str | os.PathLike,
    *,
    network: dict[str, torch.Tensor],
    optimizer: dict,
    scheduler: dict | None,
    scaler: dict | None,
    loop: LoopState,
    fingerprint: dict,
    ema: dict[str, torch.Tensor] | None = None,
    ema_updates: int = 0,
) -> Path:
    """Write the state folder atomically: both files into a hidden staging folder, then one rename.

    A save that fails (disk full: ``WriteFailed`` naming the state folder) leaves nothing behind; an existing folder
    of the same step is replaced only once the new one is complete.
    """
    out = Path(folder)
    tensors = {f"network.{k}": v.detach().cpu().contiguous() for k, v in network.items()}
    opt_tensors, opt_meta = split_optimizer_state(optimizer)
    tensors.update(opt_tensors)
    for name, t in loop.tensors().items():
        if t is not None:
            tensors[f"rng.{name}"] = t
    for name, t in (ema or {}).items():
        tensors[f"ema.{name}"] = t.detach().cpu().contiguous()
    meta = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "optimizer": opt_meta,
        "scheduler": _json_value(_scheduler_state(scheduler)),
        "scaler": _json_value(scaler),
        "loop": loop.to_json(),
        "ema": {"updates": ema_updates} if ema is not None else None,
    }
    files = {TENSORS: safetensors_bytes(tensors), META: json.dumps(meta, indent=1).encode()}
    staging = temp_path(out)
    try:
        for name, data in files.items():
            write_atomic(staging / name, data)
        _move_into_place(staging, out)
    except WriteFailed as e:
        raise e.shown_as(out / e.path.name, sum(len(d) for d in files.values())) from e.original
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the complete staging folder to ``out``; an older folder of that name is moved aside first."""
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    aside = temp_path(out)
    os.rename(out, aside)
    os.rename(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


def _scheduler_state(state: dict | None) -> dict | None:
    """LambdaLR keeps plain functions as None in its state dict; anything else callable is dropped."""
    if state is None:
        return None
    return {k: v for k, v in state.items() if not callable(v)}


def is_complete_state(folder: Path) -> bool:
    """A folder that can be resumed: both files present (a save in progress or killed is a hidden staging folder)."""
    return (folder / META).is_file() and (folder / TENSORS).is_file()


def complete_states(run_folder: Path) -> list[Path]:
    """The resumable step folders of one run's state folder, oldest step first (``latest`` and hidden ones left out)."""
    try:
        children = sorted(p for p in Path(run_folder).iterdir() if p.name.startswith("step-") and not p.is_symlink())
    except OSError:
        return []
    return [p for p in children if is_complete_state(p)]


def load_state(folder: str | os.PathLike, fingerprint: dict | None = None) -> dict:
    """Read a state folder; with ``fingerprint`` refuse a state written for other run settings."""
    root = Path(folder)
    meta_path, tensor_path = root / META, root / TENSORS
    if not is_complete_state(root):
        nearby = complete_states(root.parent) if root.parent != root else []
        hint = f" Complete states next to it: {', '.join(p.name for p in nearby)}." if nearby else ""
        raise StateError(
            f"{root} is not a training state folder (it needs {META} and {TENSORS}); pick the "
            f"folder a previous run saved its state to.{hint}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
    except Exception as e:  # noqa: BLE001 - any parse error means the folder is unusable
        raise StateError(f"the training state in {root} is damaged ({e}); resume from an older state.") from e
    if meta.get("format") != STATE_FORMAT:
        raise StateError(f"{root}: unknown state format {meta.get('format')!r}")
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        diff = sorted(
            k
            for k in set(fingerprint) | set(meta.get("fingerprint", {}))
            if fingerprint.get(k) != meta.get("fingerprint", {}).get(k)
        )
        raise StateError(
            f"{root} was saved by a run with different settings ({', '.join(diff)}); resuming "
            "needs the same dataset, network and training settings (only max steps may grow)."
        )
    network = {k[len("network.") :]: v for k, v in tensors.items() if k.startswith("network.")}
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    loop = LoopState.from_saved(meta["loop"], rng)
    ema = None
    if meta.get("ema") is not None:
        ema = {
            "tensors": {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")},
            "updates": meta["ema"]["updates"],
        }
    return {
        "network": network,
        "optimizer": join_optimizer_state(tensors, meta["optimizer"]),
        "scheduler": _from_json(meta["scheduler"]),
        "scaler": _from_json(meta["scaler"]),
        "loop": loop,
        "ema": ema,
    }
