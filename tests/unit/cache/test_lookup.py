"""trainer/cache/lookup.py: memory, then disk, then encode; write-through; stats and warnings, with a fake encoder."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sdxl_lora_trainer.trainer.cache.lookup import CachedItems
from sdxl_lora_trainer.trainer.cache.stores import DiskStore, MemoryStore


def _valid(tensors: dict[str, torch.Tensor]) -> str | None:
    return None if torch.isfinite(tensors["x"]).all() else "holds NaN/inf values"


def _item(value: float) -> dict[str, torch.Tensor]:
    return {"x": torch.full((4,), value)}


def _build(keys, store, disk):
    """One build over ``keys`` (work = the value to encode); returns the CachedItems and the encoded work."""
    items: CachedItems[float] = CachedItems(store, disk, _valid, "test")
    for key in keys:
        items.lookup(key, {"key": key}, float(len(key)))
    encoded: list[float] = []

    def encode_batch(batch: list[float]) -> list[dict[str, torch.Tensor]]:
        encoded.extend(batch)
        return [_item(v) for v in batch]

    items.encode([[key] for key in items.pending], encode_batch)
    return items, encoded


def test_memory_then_disk_then_encode_with_stats(tmp_path):
    store, disk = MemoryStore(16), DiskStore(tmp_path)
    store.put("a", _item(1.0))
    disk.write("bb", _item(2.0))
    items, encoded = _build(["a", "bb", "ccc", "ccc"], store, disk)
    assert encoded == [3.0]  # the repeated key is encoded once
    s = items.stats
    assert (s.items, s.from_memory, s.from_disk, s.encoded, s.encoder_calls) == (3, 1, 1, 1, 1)
    assert torch.equal(items.tensors["bb"]["x"], _item(2.0)["x"]) and "bb" in store  # a disk hit is kept in memory
    assert "ccc" in store and disk.read("ccc").tensors is not None
    assert items.warnings == []


def test_memory_hit_is_written_through_to_a_disk_that_lacks_it(tmp_path, monkeypatch):
    store, disk = MemoryStore(16), DiskStore(tmp_path)
    _build(["a", "bb"], store, None)  # memory only
    disk.write("bb", _item(2.0))
    writes: list[str] = []
    real_write = DiskStore.write

    def counted_write(self, key, *args, **kwargs):
        writes.append(key)
        return real_write(self, key, *args, **kwargs)

    monkeypatch.setattr(DiskStore, "write", counted_write)
    items, encoded = _build(["a", "bb"], store, disk)  # disk caching turned on
    assert encoded == [] and items.stats.from_memory == 2 and items.warnings == []
    assert writes == ["a"]  # "bb" is on disk already
    assert torch.equal(disk.read("a").tensors["x"], _item(1.0)["x"])
    with safe_open(str(disk.path("a")), "pt") as f:
        assert f.metadata()["inputs"] == '{"key":"a"}'  # the file says what it was made from


def test_without_a_store_nothing_is_read_from_or_kept_in_memory():
    store = MemoryStore(16)
    store.put("a", _item(1.0))
    items, encoded = _build(["a"], None, None)
    assert encoded == [1.0] and items.stats.from_memory == 0


def test_corrupt_disk_file_is_rebuilt_and_a_failed_write_warns_once(tmp_path, monkeypatch):
    disk = DiskStore(tmp_path)
    disk.write("a", {"x": torch.full((4,), float("nan"))})
    items, encoded = _build(["a"], MemoryStore(16), disk)
    assert encoded == [1.0] and items.stats.rebuilt == 1
    assert len(items.warnings) == 1 and "NaN" in items.warnings[0]

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DiskStore, "write", full)
    items, encoded = _build(["bb", "ccc"], MemoryStore(16), disk)
    assert encoded == [2.0, 3.0] and items.stats.encoded == 2  # the build goes on in memory
    assert len(items.warnings) == 1 and "could not write the test cache" in items.warnings[0]


def test_an_encoder_that_returns_too_few_items_is_an_error():
    items: CachedItems[float] = CachedItems(MemoryStore(16), None, _valid, "test")
    items.lookup("a", {}, 1.0)
    items.lookup("b", {}, 2.0)
    with pytest.raises(ValueError):
        items.encode([["a", "b"]], lambda batch: [_item(1.0)])
