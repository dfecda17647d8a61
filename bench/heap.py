"""glibc's malloc counters (``mallinfo2``): how much of a process's memory is live allocations and how much is freed
memory malloc keeps.

RSS alone cannot tell a leak (live bytes grow step after step) from an allocator that keeps what the last step
freed (live bytes flat, free bytes grow). bench_train.py prints both after each of ours' steps and kohya's.
None where the C library has no mallinfo2 (not glibc, or glibc < 2.33).
"""

from __future__ import annotations

import ctypes
import ctypes.util

GIB = 1024**3


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",  # bytes of the main and other arenas' heaps (brk / heap mappings)
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in mmap'ed chunks (each one returned to the system when freed)
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use in the heaps
            "fordblks",  # bytes free in the heaps (kept by malloc)
            "keepcost",
        )
    ]


def heap_counters() -> dict[str, float] | None:
    """GiB: ``live`` (in use, heaps + mmap'ed chunks), ``kept`` (freed but held by malloc), ``mmapped``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return {
        "live": (info.uordblks + info.hblkhd) / GIB,
        "kept": info.fordblks / GIB,
        "mmapped": info.hblkhd / GIB,
    }


def describe(counters: dict[str, float] | None) -> str:
    if counters is None:
        return "malloc counters unavailable"
    return f"malloc live {counters['live']:.2f} GiB, kept free {counters['kept']:.2f} GiB"
