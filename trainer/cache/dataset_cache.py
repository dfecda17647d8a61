"""What the latent cache and the text cache share once built: the dataset they cover, how they were filled, where
their files are, and how big they are. Each cache adds its own lookups and report lines."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..data.dataset import TrainingDataset
from .lookup import CacheStats
from .stores import DiskStore, ImageIndex, megabytes


def _nbytes(value: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


class DatasetCache:
    """A built cache: ``entries`` (content key -> tensor, or tuple of tensors) for the images of ``dataset``."""

    def __init__(
        self,
        dataset: TrainingDataset,
        entries: Mapping[str, torch.Tensor | tuple[torch.Tensor, ...]],
        stats: CacheStats,
        warnings: list[str],
        disk_dir: str | None,
    ) -> None:
        self.dataset = dataset
        self._index = ImageIndex(dataset.cached_images)
        self._entries = entries
        self.stats = stats
        self.warnings = warnings
        self.disk_dir = disk_dir

    @property
    def size_bytes(self) -> int:
        """Bytes the cached tensors take in memory."""
        return sum(_nbytes(value) for value in self._entries.values())

    @property
    def size_mb(self) -> float:
        return megabytes(self.size_bytes)

    def disk_size_mb(self) -> float:
        """Megabytes of this cache's files in ``disk_dir`` (0 without a disk cache)."""
        if not self.disk_dir:
            return 0.0
        return megabytes(DiskStore(self.disk_dir).size_bytes(self._entries.keys()))

    def size_line(self, what: str) -> str:
        """The report line on memory and disk size; ``what`` says what the memory holds."""
        disk = f"; disk cache {self.disk_dir} ({self.disk_size_mb():.1f} MB)" if self.disk_dir else ""
        return f"  size {self.size_mb:.1f} MB in memory ({what}){disk}"

    def warning_lines(self) -> list[str]:
        if not self.warnings:
            return []
        return [f"  {len(self.warnings)} warnings:", *(f"    {w}" for w in self.warnings)]
