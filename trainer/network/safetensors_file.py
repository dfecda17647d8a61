"""Writing and reading LoRA .safetensors files.

* **Atomic writes** (``atomic_write_safetensors``): a LoraLoader, a file browser or a crash must never see half a
  file: the file is serialized in memory and written by ``trainer/atomic_files.write_atomic`` (hidden temp file,
  fsync, one rename, folder mtimes moved on so ComfyUI lists it; a full disk says which file and how much space).

The addnet hashes (``sshs_model_hash``, ``sshs_legacy_hash``) that A1111-style UIs index LoRAs by are computed
here, over the exact bytes written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from ..atomic_files import write_atomic

SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# addnet's legacy hash: sha256 of the 64 KiB at offset 1 MiB of the serialized file, first 8 hex digits.
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000


# ---------------------------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; {k!r} -> {type(v).__name__}")
        out[k] = v
    return out


def atomic_write_safetensors(
    path: Path | str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    overwrite: bool = False,
) -> None:
    """Write ``tensors`` + ``metadata`` to ``path`` so that the file appears complete or not at all.

    Serialized in memory first, so the bytes are written by ``atomic_files.write_atomic`` (a full disk is a
    ``WriteFailed`` naming the file, the space needed and free). Missing parent folders are created. On any error
    ``path`` is untouched. Without ``overwrite`` an existing ``path`` raises FileExistsError before serializing.
    """
    path = Path(path)
    meta = _check_metadata(metadata)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)")
    write_atomic(path, safetensors.torch.save(dict(tensors), metadata=meta), overwrite=overwrite)


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as kohya's ``precalculate_safetensors_hashes``.

    Both hash the in-memory safetensors serialization of ``tensors`` with only the ``ss_*`` metadata (the
    training record, meant to be immutable; other keys may be edited later without changing the hash):
    the model hash is sha256 over everything after the 8-byte length + JSON header (i.e. the tensor bytes, so it
    equals the same hash of the saved file), the legacy hash is the first 8 hex digits of sha256 over the 64 KiB
    at offset 1 MiB (sha256 of nothing, "e3b0c442", for files under 1 MiB - kohya's behaviour too).
    Pass the tensors as they will be saved (after the dtype cast).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = safetensors.torch.save(dict(tensors), ss_only)
    view = memoryview(blob)
    header_len = int.from_bytes(view[:8], "little")
    model_hash = hashlib.sha256(view[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(view[_LEGACY_HASH_OFFSET : _LEGACY_HASH_OFFSET + _LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def prepare_tensors(tensors: Mapping[str, torch.Tensor], save_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies, every one cast to ``save_dtype`` as kohya's save_weights does (the int64
    ``.alpha`` of a module whose alpha is its rank too).

    Copies, because safetensors refuses tensors that share storage and training keeps using the originals.
    """
    if save_dtype is not None and save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {SAVE_DTYPES} or None, got {save_dtype}")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key!r} is a {type(t).__name__}, not a tensor")
        dtype = save_dtype if save_dtype is not None else t.dtype
        out[key] = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    return out


def save_lora(
    tensors: Mapping[str, torch.Tensor],
    path: Path | str,
    metadata: Mapping[str, str],
    save_dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, str]:
    """Save a kohya LoRA state dict: cast, add ``sshs_model_hash``/``sshs_legacy_hash``, write atomically.

    Returns the metadata actually written. ``save_dtype`` None keeps each tensor's dtype (kohya's default
    save_precision). ``overwrite`` as in ``atomic_write_safetensors``.
    """
    prepared = prepare_tensors(tensors, save_dtype)
    meta = {k: v for k, v in _check_metadata(metadata).items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    model_hash, legacy_hash = sshs_hashes(prepared, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    atomic_write_safetensors(path, prepared, meta, overwrite=overwrite)
    return meta


def read_lora(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors on CPU, metadata)`` of a .safetensors file; metadata is {} when the file has none."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (kohya's ss_* and modelspec.* keys), without loading tensors."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, from its header only (no tensor is loaded)."""
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())
