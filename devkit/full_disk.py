"""A full disk for tests: ``os.write`` raises ``OSError(ENOSPC)`` for files whose path contains a marker.

Why at ``os.write``: it is the call a real full disk fails in (the pack writes every file's bytes through it,
trainer/atomic_files.write_temp), so everything above it runs as it would on a full disk. Only paths holding a
marker are refused (the open file's path is read from /proc/self/fd, Linux), so the rest of the process, a ComfyUI
server included, writes normally.
"""

from __future__ import annotations

import errno
import os

_REAL_WRITE = os.write


class FullDisk:
    """The replacement ``os.write``; ``refused`` lists every path a write was refused for."""

    def __init__(self, *markers: str) -> None:
        self.markers = set(markers)
        self.refused: list[str] = []

    def write(self, fd: int, data) -> int:
        if self.markers:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if any(m in path for m in self.markers):
                self.refused.append(path)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _REAL_WRITE(fd, data)


def full_disk(monkeypatch, *markers: str) -> FullDisk:
    """For a pytest test: the disk is full for paths containing any of ``markers`` until the test ends."""
    fake = FullDisk(*markers)
    monkeypatch.setattr(os, "write", fake.write)
    return fake


_PROCESS_WIDE: FullDisk | None = None


def fill_disk_for(marker: str) -> FullDisk:
    """In a server process (the test node pack): from now on writes to paths containing ``marker`` fail."""
    global _PROCESS_WIDE
    if _PROCESS_WIDE is None:
        _PROCESS_WIDE = FullDisk()
        os.write = _PROCESS_WIDE.write
    _PROCESS_WIDE.markers.add(marker)
    return _PROCESS_WIDE
