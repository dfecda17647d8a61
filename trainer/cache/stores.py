"""Content-addressed storage for cached VAE latents and text-encoder outputs.

Two stores hold the items:

* ``MemoryStore``: a process-level LRU bounded in MB. It survives between graph runs (ComfyUI keeps
  the process), which is what makes a re-run after a small edit cheap.
* ``DiskStore``: one safetensors file per item in a folder. Files are written atomically (temp file
  in the same folder + ``os.replace``) and carry a checksum of their tensor bytes in their metadata.
  A file that is unreadable, truncated, for another key or fails its checksum is deleted and reported
  (the caller rebuilds it); bad data is never returned.

``ENCODER_CALLS`` counts real VAE / CLIP encode calls, so tests and a stats route can prove that a
re-run did no encoder work.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dataset import BucketedImage

try:  # BLAKE3 is ~10x faster than SHA-256 on large buffers (weights, image files)
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the environment
    _blake3 = None
from . import fingerprints
from .fingerprints import _MB, PathLike, _tagged, canonical_json, new_hasher, update_tensor

Tensors = dict[str, torch.Tensor]
ImageRef = int | str | BucketedImage

#: Real encoder calls made by the caches (one per VAE batch / per CLIP caption), process-wide.
ENCODER_CALLS: dict[str, int] = {"vae": 0, "clip": 0}

DISK_FORMAT = "sdxl_lora_trainer.cache/1"
DEFAULT_MEMORY_MB = 4096.0
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
_STALE_TMP_SECONDS = 3600.0


# -- size accounting -----------------------------------------------------------------------------


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def megabytes(nbytes: int) -> float:
    return nbytes / _MB


# -- in-memory LRU -------------------------------------------------------------------------------


class MemoryStore:
    """Items (dicts of CPU tensors) by key, least recently used evicted beyond ``capacity_mb``.

    Tensors are stored by reference (no copy); callers must not modify them in place. An item larger
    than the whole capacity is not stored. Thread-safe.
    """

    def __init__(self, capacity_mb: float = DEFAULT_MEMORY_MB) -> None:
        self._items: OrderedDict[str, tuple[Tensors, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._size = 0
        self.evictions = 0
        self.capacity_bytes = 0
        self.set_capacity_mb(capacity_mb)

    def set_capacity_mb(self, capacity_mb: float) -> None:
        if capacity_mb < 0:
            raise ValueError(f"capacity_mb must be >= 0, got {capacity_mb}")
        with self._lock:
            self.capacity_bytes = int(capacity_mb * _MB)
            self._evict()

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def size_mb(self) -> float:
        return megabytes(self._size)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:  # no LRU touch
        return key in self._items

    def get(self, key: str) -> Tensors | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return dict(entry[0])

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Store an item; False when it does not fit in the capacity at all."""
        nbytes = tensors_nbytes(tensors)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            if nbytes > self.capacity_bytes:
                return False
            self._items[key] = (dict(tensors), nbytes)
            self._size += nbytes
            self._evict()
            return key in self._items

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._size = 0

    def _evict(self) -> None:
        while self._size > self.capacity_bytes and self._items:
            _, (_, nbytes) = self._items.popitem(last=False)
            self._size -= nbytes
            self.evictions += 1


_PROCESS_STORE: MemoryStore | None = None
_PROCESS_STORE_LOCK = threading.Lock()


def memory_store() -> MemoryStore:
    """The process-level store shared by the latent and text caches (persists across graph runs)."""
    global _PROCESS_STORE
    with _PROCESS_STORE_LOCK:
        if _PROCESS_STORE is None:
            _PROCESS_STORE = MemoryStore(DEFAULT_MEMORY_MB)
        return _PROCESS_STORE


# -- disk ----------------------------------------------------------------------------------------


def tensors_checksum(tensors: Mapping[str, torch.Tensor], algorithm: str | None = None) -> str:
    """``<algorithm>:<hex>`` over names, dtypes, shapes and bytes of all tensors (sorted by name).

    The algorithm is recorded so that a file stays verifiable if blake3 is later unavailable.
    """
    algorithm = fingerprints.HASH_NAME if algorithm is None else algorithm
    h = new_hasher(algorithm)
    for name in sorted(tensors):
        _tagged(h, b"S", name.encode())
        update_tensor(h, tensors[name])
    return f"{algorithm}:{h.hexdigest()}"


class CacheFolderError(ValueError):
    """The disk-cache folder cannot be created or used; the message names it and the fix."""


@dataclass
class DiskRead:
    """Result of ``DiskStore.read``: tensors (None on a miss or a bad file) and a warning for bad files."""

    tensors: Tensors | None
    warning: str | None = None

    @property
    def corrupt(self) -> bool:
        return self.warning is not None


class DiskStore:
    """One safetensors file per item, ``<folder>/<key>.safetensors``, written atomically, verified on read."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheFolderError(
                f"cannot use {self.folder} as a cache folder ({e}); choose a writable folder, or turn the disk "
                "cache off to cache in memory only"
            ) from None
        self._remove_stale_temp_files()

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}")
        return self.folder / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def write(self, key: str, tensors: Mapping[str, torch.Tensor], inputs: Mapping[str, Any] | None = None) -> int:
        """Write an item atomically; returns the file size. Raises OSError (disk full, permissions).

        The file appears under its final name only once complete (``os.replace`` of a temp file in the
        same folder), so a crash leaves either the old file, no file, or a stray temp file, never a
        half-written item under a valid name. No fsync: after a power loss a file may be empty or
        garbage, which the checksum catches on read.
        """
        import safetensors.torch

        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        metadata = {"format": DISK_FORMAT, "key": key, "checksum": tensors_checksum(cpu)}
        if inputs is not None:
            metadata["inputs"] = canonical_json(inputs)
        data = safetensors.torch.save(cpu, metadata=metadata)
        final = self.path(key)
        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        return len(data)

    def read(self, key: str, validate: Callable[[Tensors], str | None] | None = None) -> DiskRead:
        """The item's tensors, or ``DiskRead(None)`` when absent.

        A file that cannot be parsed (truncated, garbage), belongs to another key, fails its checksum,
        or fails ``validate`` (returns a problem string) is deleted and ``DiskRead(None, warning)`` is
        returned so the caller rebuilds it.
        """
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return DiskRead(None)
        except OSError as e:
            return DiskRead(None, self._discard(path, f"could not be read ({e})"))
        problem, tensors = _parse_item(data, key)
        if problem is None and validate is not None and tensors is not None:
            problem = validate(tensors)
        if problem is not None:
            return DiskRead(None, self._discard(path, problem))
        return DiskRead(tensors)

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink()
        except FileNotFoundError:
            pass

    def size_bytes(self, keys: Iterable[str] | None = None) -> int:
        """Bytes on disk of the given keys (or of every item in the folder)."""
        paths = [self.path(k) for k in keys] if keys is not None else list(self.folder.glob("*.safetensors"))
        total = 0
        for p in paths:
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def _discard(self, path: Path, problem: str) -> str:
        try:
            path.unlink()
            action = "deleted; it is rebuilt"
        except FileNotFoundError:
            action = "already gone; it is rebuilt"
        except OSError as e:
            action = f"could not be deleted ({e}); it is rebuilt and overwritten"
        return f"cache file {path} {problem}: {action}"

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writes that crashed (an hour old: never one another process is writing now)."""
        now = time.time()
        for p in self.folder.glob(".*.tmp"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    p.unlink()
            except OSError:
                pass


def _parse_item(data: bytes, key: str) -> tuple[str | None, Tensors | None]:
    """(problem, tensors): problem is None when the file is a complete, intact item for ``key``."""
    import safetensors.torch

    if len(data) < 8:
        return f"is truncated ({len(data)} bytes)", None
    try:
        tensors = safetensors.torch.load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = header.get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error type for every malformed file
        return f"is truncated or corrupted ({type(e).__name__}: {e})", None
    if metadata.get("format") != DISK_FORMAT:
        return f"is not a cache file of this format (format {metadata.get('format')!r})", None
    if metadata.get("key") != key:
        return f"holds key {metadata.get('key')!r}, not {key!r}", None
    checksum = str(metadata.get("checksum", ""))
    algorithm = checksum.split(":", 1)[0]
    try:
        actual = tensors_checksum(tensors, algorithm)
    except ValueError:
        return f"has a checksum of an unavailable kind ({algorithm!r})", None
    if actual != checksum:
        return "failed its checksum (its data is corrupted)", None
    return None, tensors


# -- what the latent and text caches share ----------------------------------------------------


class ImageIndex:
    """Maps an image reference (flat index, image key, or the BucketedImage itself) to a flat index."""

    def __init__(self, images: Sequence[BucketedImage]) -> None:
        self.images = list(images)
        self._by_id = {id(img): i for i, img in enumerate(self.images)}
        self._by_key: dict[str, int] = {}
        self._ambiguous: set[str] = set()
        for i, img in enumerate(self.images):
            if img.key in self._by_key:
                self._ambiguous.add(img.key)
            else:
                self._by_key[img.key] = i

    def index(self, image: ImageRef) -> int:
        if isinstance(image, BucketedImage):
            i = self._by_id.get(id(image))
            if i is None:
                raise KeyError(f"image {image.key!r} is not part of the dataset this cache was built for")
            return i
        if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
            if not 0 <= int(image) < len(self.images):
                raise IndexError(f"image index {image} out of range (the dataset has {len(self.images)} images)")
            return int(image)
        if isinstance(image, str):
            if image in self._ambiguous:
                raise KeyError(
                    f"image key {image!r} occurs in several dataset parts; pass the BucketedImage or "
                    "its index in TrainingDataset.images"
                )
            if image not in self._by_key:
                raise KeyError(f"image {image!r} is not part of the dataset this cache was built for")
            return self._by_key[image]
        raise TypeError(
            f"image reference must be an index, an image key or a BucketedImage, got {type(image).__name__}"
        )
