"""The base checkpoint's name and hashes kohya writes into every LoRA (ss_sd_model_name, ss_sd_model_hash,
ss_new_sd_model_hash), computed as sd-scripts' train_util.model_hash and calculate_sha256 do.

Hashing an SDXL checkpoint reads ~7 GB, so each file is hashed once per process: the result is kept per path, file
size and modification time (a file replaced under the same name is hashed again).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

_LEGACY_OFFSET = 0x100000  # kohya's model_hash: 64 KiB read at 1 MiB (A1111's old short hash)
_LEGACY_LENGTH = 0x10000
_BLOCK = 1024 * 1024  # kohya's calculate_sha256 block size

_cache: dict[tuple[str, int, int], CheckpointHashes] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class CheckpointHashes:
    """``name``: the file's base name (kohya's ss_sd_model_name); ``model_hash``: 8 hex digits of the sha256 of the
    64 KiB at 1 MiB (ss_sd_model_hash); ``sha256``: of the whole file (ss_new_sd_model_hash)."""

    name: str
    model_hash: str
    sha256: str

    def training_metadata(self) -> dict[str, str]:
        """The keys of network.metadata.TRAINING_KEYS these fill."""
        return {"sd_model_name": self.name, "sd_model_hash": self.model_hash, "new_sd_model_hash": self.sha256}


def checkpoint_hashes(path: str | os.PathLike) -> CheckpointHashes:
    """Name and hashes of the checkpoint file at ``path`` (read once per path, size and mtime)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    full = hashlib.sha256()
    with open(real, "rb") as f:
        f.seek(_LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]  # a smaller file: sha256 of nothing, as kohya
        f.seek(0)
        for block in iter(lambda: f.read(_BLOCK), b""):
            full.update(block)
    hashes = CheckpointHashes(name=os.path.basename(os.fspath(path)), model_hash=legacy, sha256=full.hexdigest())
    with _lock:
        _cache[key] = hashes
    return hashes
