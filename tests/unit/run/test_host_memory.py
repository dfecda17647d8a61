"""trainer/run/host_memory.py: the C heap's freed pages go back to the system (glibc; CI runs on Linux)."""

from __future__ import annotations

import ctypes
import resource

import pytest

from sdxl_lora_trainer.trainer.run import host_memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_freed_heap_memory_is_returned():
    """256 MiB in 100 KiB blocks (below glibc's mmap threshold, so they live in the heap), all freed but the last:
    the heap cannot shrink from its top, so malloc keeps the pages until they are trimmed."""
    if host_memory._malloc_trim() is None:
        pytest.skip("not glibc: there is no malloc_trim to call")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 100 * 1024, 2621
    blocks = [libc.malloc(size) for _ in range(count)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)  # touched: resident
    for b in blocks[:-1]:
        libc.free(b)
    kept = rss_bytes()
    assert host_memory.release_freed_memory() is True
    released = kept - rss_bytes()
    libc.free(blocks[-1])
    assert released > 0.8 * size * (count - 1), f"only {released / 2**20:.0f} MiB of 256 MiB went back"
