"""The lookup and write-through the latent and text caches share.

Why one place: both caches look an item up by its content key in the same order (memory store,
then disk, else encode) and write what they get back the same way (memory, and disk when the disk
cache is on; a failed disk write is a warning and the build continues in memory). What differs
between them (the key's inputs, how a batch is encoded, what a valid entry is, the report) stays
in latents.py and text.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from .stores import DiskStore, MemoryStore, Tensors

#: What a cache needs to encode one missing item (its image, its caption, ...); opaque here.
Work = TypeVar("Work")


@dataclass
class CacheStats:
    """Where each unique item of a cache build came from."""

    items: int = 0  # unique cache items (image x flip), after de-duplicating identical ones
    encoded: int = 0  # encoded now (includes rebuilt)
    from_memory: int = 0
    from_disk: int = 0
    rebuilt: int = 0  # disk files found corrupted, deleted and encoded again
    encoder_calls: int = 0  # real encoder calls of this build (batches)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class CachedItems(Generic[Work]):
    """One cache build: every item by key, from memory, disk or the encoder, with its stats and warnings.

    ``store`` None means memory is neither read nor written (inputs that cannot be fingerprinted);
    ``disk`` None means no disk cache. ``validate`` returns a problem string for a bad entry.
    ``kind`` names the cache in warnings ("latent", "text-encoder").
    """

    def __init__(
        self,
        store: MemoryStore | None,
        disk: DiskStore | None,
        validate: Callable[[Tensors], str | None],
        kind: str,
    ) -> None:
        self.store = store
        self.disk = disk
        self.validate = validate
        self.kind = kind
        self.stats = CacheStats()
        self.warnings: list[str] = []
        self.tensors: dict[str, Tensors] = {}  # every item looked up or encoded so far, by key
        self.pending: OrderedDict[str, Work] = OrderedDict()  # missing items, in lookup order
        self._inputs: dict[str, Mapping[str, Any]] = {}  # of pending items: the disk file's metadata
        self._rebuilt: set[str] = set()
        self._disk_failed = False

    def lookup(self, key: str, inputs: Mapping[str, Any], work: Work) -> None:
        """Find the item in memory or on disk, or queue ``work`` to encode it; a repeated key is a no-op.

        A memory hit the disk cache lacks is written through to it.
        """
        if key in self.tensors or key in self.pending:
            return
        self.stats.items += 1
        if self.store is not None:
            hit = self.store.get(key)
            if hit is not None and self.validate(hit) is None:
                self.tensors[key] = hit
                self.stats.from_memory += 1
                # disk caching may have been turned on since this was encoded: without the file a
                # restart would encode it again
                if self.disk is not None and key not in self.disk:
                    self._write(key, hit, inputs)
                return
        if self.disk is not None:
            read = self.disk.read(key, self.validate)
            if read.tensors is not None:
                self.tensors[key] = read.tensors
                self._remember(key, read.tensors)
                self.stats.from_disk += 1
                return
            if read.warning:
                self.warnings.append(read.warning)
                self._rebuilt.add(key)
        self.pending[key] = work
        self._inputs[key] = inputs

    def encode(
        self,
        batches: Iterable[Sequence[str]],
        encode_batch: Callable[[list[Work]], Sequence[Tensors]],
        progress: Callable[[int, int], None] | None = None,
        check_interrupt: Callable[[], None] | None = None,
    ) -> None:
        """Encode the pending items in ``batches`` of keys; each batch is kept and written as soon as it is done.

        ``encode_batch`` returns one item per work item, in order, and raises to refuse a batch
        (NaN); items of earlier batches stay cached. ``progress(done, total)`` follows each batch,
        ``check_interrupt()`` precedes it.
        """
        total = len(self.pending)
        done = 0
        for keys in batches:
            if check_interrupt is not None:
                check_interrupt()
            self.stats.encoder_calls += 1
            with torch.inference_mode():
                outputs = encode_batch([self.pending[key] for key in keys])
                for key, tensors in zip(keys, outputs, strict=True):
                    self.tensors[key] = tensors
                    self._remember(key, tensors)
                    self.stats.encoded += 1
                    self.stats.rebuilt += int(key in self._rebuilt)
                    self._write(key, tensors, self._inputs[key])
            done += len(keys)
            if progress is not None:
                progress(done, total)

    def _remember(self, key: str, tensors: Tensors) -> None:
        if self.store is not None:
            self.store.put(key, tensors)

    def _write(self, key: str, tensors: Tensors, inputs: Mapping[str, Any]) -> None:
        """Write to disk; after one failure (disk full, permissions) the build goes on in memory only."""
        if self.disk is None or self._disk_failed:
            return
        try:
            self.disk.write(key, tensors, inputs=inputs)
        except OSError as e:
            self._disk_failed = True
            self.warnings.append(
                f"could not write the {self.kind} cache to {self.disk.folder} ({e}); "
                "continuing with the in-memory cache only"
            )
