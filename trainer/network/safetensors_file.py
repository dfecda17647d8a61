"""Writing and reading LoRA .safetensors files.

* **Atomic writes** (``atomic_write_safetensors``): a LoraLoader, a file browser or a crash must never see half a
  file. We write a hidden ``.tmp`` file in the same folder (an extension ComfyUI does not list), fsync it and then
  publish it with one rename (or a hard link when replacing is not allowed, so two runs racing for one name cannot
  clobber each other). ComfyUI's filename-list cache is invalidated only when a folder's ``os.path.getmtime``
  changes; on coarse-timestamp filesystems a rename in the same clock tick as an earlier change leaves it equal, so
  we make sure every folder we changed has a newer mtime afterwards (the file shows up without a restart).

The addnet hashes (``sshs_model_hash``, ``sshs_legacy_hash``) that A1111-style UIs index LoRAs by are computed
here, over the exact bytes written.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from .file_names import TEMP_SUFFIX

SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# addnet's legacy hash: sha256 of the 64 KiB at offset 1 MiB of the serialized file, first 8 hex digits.
_LEGACY_HASH_OFFSET = 0x100000
_LEGACY_HASH_LENGTH = 0x10000


# ---------------------------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------------------------


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime  # the same float os.path.getmtime gives ComfyUI
    except OSError:
        return None


def _make_dirs(directory: Path, touched: dict[Path, float]) -> None:
    """``mkdir -p`` that records, for each folder whose entries it changes, its mtime before the change."""
    missing: list[Path] = []
    d = directory
    while not d.is_dir():
        if os.path.lexists(d):
            raise NotADirectoryError(f"{d} exists and is not a folder")
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for m in reversed(missing):
        before = _mtime(m.parent)
        if before is not None:
            touched.setdefault(m.parent, before)
        m.mkdir(exist_ok=True)


def _advance_mtime(directory: Path, before: float) -> None:
    """Make ``os.path.getmtime(directory)`` differ from ``before`` so ComfyUI's cached file list is rebuilt.

    Needed only when the file system's timestamp did not move (same clock tick, coarse granularity): any listing
    ComfyUI cached earlier saw an mtime <= ``before``, so a strictly newer one always invalidates it.
    """
    now = _mtime(directory)
    if now is None or now > before:
        return
    try:
        atime = os.stat(directory).st_atime
        for step in (1e-3, 1.0, 2.0):  # 2 s covers FAT-like granularity
            os.utime(directory, (atime, before + step))
            after = _mtime(directory)
            if after is not None and after > before:
                return
    except OSError:
        pass  # not ours to change (e.g. read-only mount): the file is still written, a refresh will list it


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask() sets it process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows needs write access to flush
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); folders cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file to its name in one step; without ``overwrite`` never replace an existing file."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and fails if the name exists, even when another run just took it
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)") from None
    except OSError:
        # file systems without hard links (FAT, some network mounts): check then rename
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


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

    Missing parent folders are created. On any error the temp file is removed and ``path`` is untouched.
    Without ``overwrite`` an existing ``path`` raises FileExistsError (checked again at publish time).
    """
    path = Path(path)
    meta = _check_metadata(metadata)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; refusing to overwrite it (pass overwrite=True)")
    directory = path.parent
    touched: dict[Path, float] = {}
    _make_dirs(directory, touched)
    # hidden, not a LoRA extension, unique; the name is cut so that the temp name stays within 255 bytes
    short = path.name.encode("utf-8")[:96].decode("utf-8", errors="ignore")
    tmp = directory / f".{short}.{os.getpid()}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    before: float | None = None
    try:
        safetensors.torch.save_file(dict(tensors), str(tmp), metadata=meta)
        if os.name == "posix":
            # safetensors creates files 0600; a LoRA is shared like any model file (ComfyUI in another account or
            # container), so give it the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_current_umask())
        _fsync_file(tmp)
        before = _mtime(directory)
        _publish(tmp, path, overwrite)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
    _fsync_dir(directory)
    if before is not None:
        touched[directory] = before  # compare with the moment just before the rename, not before the temp file
    for d, t in touched.items():
        _advance_mtime(d, t)


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
