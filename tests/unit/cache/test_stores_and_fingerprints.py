"""trainer/cache/: content hashing, fingerprint memo, the LRU memory store and the verified disk store."""

from __future__ import annotations

import functools
import gc
import os
import time

import pytest
import torch

from sdxl_lora_trainer.trainer.cache import fingerprints, stores
from sdxl_lora_trainer.trainer.cache.stores import DiskStore, MemoryStore

MB = 1024 * 1024


def _mb_tensor(mb: float, fill: float = 0.0) -> torch.Tensor:
    return torch.full((int(mb * MB) // 4,), fill, dtype=torch.float32)


# -- hashing -------------------------------------------------------------------------------------


def test_hash_file_is_content_not_path_or_mtime(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "sub" / "b.bin"
    b.parent.mkdir()
    a.write_bytes(b"hello world" * 1000)
    b.write_bytes(b"hello world" * 1000)
    h = fingerprints.hash_file(a)
    assert h == fingerprints.hash_file(b)
    os.utime(a, (time.time() + 100, time.time() + 100))
    assert fingerprints.hash_file(a) == h
    data = bytearray(a.read_bytes())
    data[5000] ^= 1
    a.write_bytes(bytes(data))
    assert fingerprints.hash_file(a) != h


def test_hash_file_streams_large_files(tmp_path):
    p = tmp_path / "big.bin"
    data = os.urandom(3 * MB + 17)
    p.write_bytes(data)
    h = fingerprints.new_hasher()
    h.update(data)
    assert fingerprints.hash_file(p, chunk=MB) == h.hexdigest()


def test_content_key_is_deterministic_and_sensitive_to_every_field():
    fields = {"image": "file:abc", "bucket": [128, 64], "flipped": False, "vae": "v1"}
    key = fingerprints.content_key("lat", fields)
    assert key == fingerprints.content_key("lat", dict(reversed(list(fields.items()))))
    assert key.startswith("lat-") and len(key) == 4 + 64
    for name, value in [("image", "file:abd"), ("bucket", [64, 128]), ("flipped", True), ("vae", "v2")]:
        assert fingerprints.content_key("lat", {**fields, name: value}) != key, name
    assert fingerprints.content_key("txt", fields) != key


def test_tensor_fingerprint_covers_dtype_shape_names_and_bytes():
    t = torch.arange(12, dtype=torch.float32)
    base = fingerprints.tensors_fingerprint([("w", t)])
    assert fingerprints.tensors_fingerprint([("w", t.clone())]) == base
    assert fingerprints.tensors_fingerprint([("w", t.view(3, 4))]) != base  # same bytes, other shape
    assert fingerprints.tensors_fingerprint([("w", t.view(torch.int32))]) != base  # same bytes, other dtype
    assert fingerprints.tensors_fingerprint([("v", t)]) != base
    t2 = t.clone()
    t2[7] = 7.5
    assert fingerprints.tensors_fingerprint([("w", t2)]) != base
    # order of the input does not matter, names do
    a, b = torch.ones(2), torch.zeros(2)
    assert fingerprints.tensors_fingerprint([("a", a), ("b", b)]) == fingerprints.tensors_fingerprint(
        [("b", b), ("a", a)]
    )
    # dtypes numpy lacks and non-contiguous tensors hash fine
    assert fingerprints.tensors_fingerprint(
        [("w", torch.ones(4, dtype=torch.bfloat16))]
    ) != fingerprints.tensors_fingerprint([("w", torch.ones(4, dtype=torch.float16))])
    nc = torch.arange(16.0).view(4, 4).t()
    assert fingerprints.tensors_fingerprint([("w", nc)]) == fingerprints.tensors_fingerprint([("w", nc.contiguous())])


def test_inference_tensors_hash_like_normal_ones():
    t = torch.randn(5, 3)
    with torch.inference_mode():
        ti = t.clone()
    assert ti.is_inference()
    assert fingerprints.tensors_fingerprint([("x", ti)]) == fingerprints.tensors_fingerprint([("x", t)])


def test_structure_hash_is_unambiguous():
    h = fingerprints.structure_hash
    distinct = [("ab",), ("a", "b"), ["a", "b"], 1, 1.0, True, "1", None, b"1", {"a": 1}, {"a": 1.0}, {1, 2}, (1, 2)]
    assert len({h(x) for x in distinct}) == len(distinct)
    assert h({"x": 1, "y": 2}) == h({"y": 2, "x": 1})
    assert h((1.0, torch.ones(3))) == h((1.0, torch.ones(3)))
    assert h((1.0, torch.ones(3))) != h((0.5, torch.ones(3)))  # a LoRA strength change


def test_structure_hash_of_functions_covers_captured_values():
    def make(scale):
        return lambda w: w * scale

    assert fingerprints.structure_hash(make(2.0)) == fingerprints.structure_hash(make(2.0))
    assert fingerprints.structure_hash(make(2.0)) != fingerprints.structure_hash(make(3.0))


def test_structure_hash_of_objects_uses_their_attributes():
    class Adapter:
        def __init__(self, weights):
            self.weights = weights

    a = fingerprints.structure_hash(Adapter((torch.ones(2, 2), 4.0)))
    assert a == fingerprints.structure_hash(Adapter((torch.ones(2, 2), 4.0)))
    assert a != fingerprints.structure_hash(Adapter((torch.ones(2, 2) * 2, 4.0)))
    # cycles do not recurse forever
    x: list = [1]
    x.append(x)
    assert isinstance(fingerprints.structure_hash(x), str)


def test_sha256_fallback(monkeypatch):
    monkeypatch.setattr(fingerprints, "HASH_NAME", "sha256")
    h = fingerprints.new_hasher()
    h.update(b"abc")
    assert h.hexdigest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert stores.tensors_checksum({"a": torch.ones(2)}).startswith("sha256:")


# -- fingerprint memo ----------------------------------------------------------------------------


def test_module_fingerprint_is_computed_once_per_module_object():
    fingerprints.clear_fingerprint_memo()
    m1 = torch.nn.Linear(8, 8)
    calls = []

    def tensors(m):
        calls.append(1)
        return list(m.state_dict().items())

    before = fingerprints.FINGERPRINT_COMPUTATIONS["modules"]
    fp = fingerprints.module_fingerprint(m1, lambda: tensors(m1))
    assert fingerprints.module_fingerprint(m1, lambda: tensors(m1)) == fp
    assert len(calls) == 1 and fingerprints.FINGERPRINT_COMPUTATIONS["modules"] == before + 1
    m2 = torch.nn.Linear(8, 8)
    m2.load_state_dict(m1.state_dict())
    assert fingerprints.module_fingerprint(m2, lambda: tensors(m2)) == fp  # same weights, another object: same hash
    assert len(calls) == 2
    with torch.no_grad():
        m2.weight.add_(1)
    m3 = torch.nn.Linear(8, 8)
    m3.load_state_dict(m2.state_dict())
    assert fingerprints.module_fingerprint(m3, functools.partial(tensors, m3)) != fp
    # the memo does not keep models alive
    n = len(fingerprints._MODULE_FP)
    del m3
    gc.collect()
    assert len(fingerprints._MODULE_FP) == n - 1


def test_token_fingerprint_memo():
    fingerprints.clear_fingerprint_memo()
    calls = []
    assert fingerprints.token_fingerprint(("clip", "uuid-1"), lambda: calls.append(1) or "fp1") == "fp1"
    assert fingerprints.token_fingerprint(("clip", "uuid-1"), lambda: calls.append(1) or "other") == "fp1"
    assert fingerprints.token_fingerprint(("clip", "uuid-2"), lambda: calls.append(1) or "fp2") == "fp2"
    assert len(calls) == 2


# -- memory store --------------------------------------------------------------------------------


def test_memory_store_is_bounded_lru():
    store = MemoryStore(capacity_mb=1.0)
    store.put("a", {"t": _mb_tensor(0.4)})
    store.put("b", {"t": _mb_tensor(0.4)})
    assert store.size_bytes == 2 * (int(0.4 * MB) // 4 * 4)
    assert store.get("a") is not None  # a is now the most recently used
    store.put("c", {"t": _mb_tensor(0.4)})  # over 1 MB: evicts the least recently used, b
    assert "b" not in store and "a" in store and "c" in store
    assert store.evictions == 1
    assert store.size_bytes <= store.capacity_bytes
    assert store.get("b") is None


def test_memory_store_accounting_on_replace_discard_and_shrink():
    store = MemoryStore(capacity_mb=2.0)
    store.put("a", {"t": _mb_tensor(0.5)})
    store.put("a", {"t": _mb_tensor(0.25)})
    assert len(store) == 1 and store.size_bytes == (int(0.25 * MB) // 4) * 4
    store.put("b", {"x": _mb_tensor(0.5), "y": _mb_tensor(0.5)})
    assert store.size_mb == pytest.approx(1.25, abs=1e-3)
    store.discard("a")
    assert store.size_mb == pytest.approx(1.0, abs=1e-3)
    assert store.put("huge", {"t": _mb_tensor(3.0)}) is False and "huge" not in store
    store.set_capacity_mb(0.5)
    assert len(store) == 0 and store.size_bytes == 0
    with pytest.raises(ValueError):
        store.set_capacity_mb(-1)


def test_memory_store_returns_the_stored_tensors_without_copy():
    store = MemoryStore(capacity_mb=1.0)
    t = torch.randn(4, 4)
    store.put("k", {"latent": t})
    got = store.get("k")
    assert got["latent"] is t
    got["other"] = t  # mutating the returned dict does not change the store
    assert set(store.get("k")) == {"latent"}


def test_process_store_is_a_singleton():
    assert stores.memory_store() is stores.memory_store()


# -- disk store ----------------------------------------------------------------------------------

KEY = "lat-" + "0" * 64


def test_disk_roundtrip_with_checksum_metadata(tmp_path):
    import json

    disk = DiskStore(tmp_path / "cache")
    tensors = {"latent": torch.randn(4, 8, 8), "half": torch.randn(3).to(torch.bfloat16)}
    n = disk.write(KEY, tensors, inputs={"image": "file:x", "bucket": [64, 64]})
    path = disk.path(KEY)
    assert path.parent == tmp_path / "cache" and path.stat().st_size == n
    read = disk.read(KEY)
    assert read.warning is None and not read.corrupt
    assert set(read.tensors) == set(tensors)
    for k in tensors:
        assert torch.equal(read.tensors[k], tensors[k]) and read.tensors[k].dtype == tensors[k].dtype
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header["__metadata__"]
    assert meta["key"] == KEY and meta["format"] == stores.DISK_FORMAT
    assert meta["checksum"] == stores.tensors_checksum(tensors)
    assert json.loads(meta["inputs"]) == {"image": "file:x", "bucket": [64, 64]}
    assert disk.size_bytes([KEY]) == n == disk.size_bytes()


def test_disk_missing_item_is_a_plain_miss(tmp_path):
    read = DiskStore(tmp_path).read(KEY)
    assert read.tensors is None and read.warning is None


def test_disk_write_accepts_inference_tensors(tmp_path):
    with torch.inference_mode():
        t = torch.randn(4, 4) * 2
    disk = DiskStore(tmp_path)
    disk.write(KEY, {"latent": t})
    assert torch.equal(disk.read(KEY).tensors["latent"], t)


def test_disk_write_is_atomic(tmp_path, monkeypatch):
    disk = DiskStore(tmp_path)
    old = {"latent": torch.zeros(2)}
    disk.write(KEY, old)
    seen = []
    real_replace = os.replace

    def failing_replace(src, dst):
        seen.append((src, dst))
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(stores.os, "replace", failing_replace)
    with pytest.raises(OSError):
        disk.write(KEY, {"latent": torch.ones(2)})
    monkeypatch.setattr(stores.os, "replace", real_replace)
    # the temp file was in the same folder (os.replace is only atomic there) and was cleaned up
    ((src, dst),) = seen
    assert os.path.dirname(src) == os.path.dirname(dst) == str(tmp_path)
    assert not os.path.exists(src)
    assert [p.name for p in tmp_path.iterdir()] == [disk.path(KEY).name]
    # the old complete file is untouched
    assert torch.equal(disk.read(KEY).tensors["latent"], old["latent"])
    # and a successful write replaces it whole
    disk.write(KEY, {"latent": torch.ones(2)})
    assert torch.equal(disk.read(KEY).tensors["latent"], torch.ones(2))


def _corrupt_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: the header still parses
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "truncate_header", "empty", "garbage"])
def test_disk_detects_damaged_files_and_deletes_them(tmp_path, damage):
    disk = DiskStore(tmp_path)
    disk.write(KEY, {"latent": torch.randn(4, 8, 8)})
    path = disk.path(KEY)
    data = path.read_bytes()
    if damage == "flip_byte":
        _corrupt_last_byte(path)
    elif damage == "truncate":
        path.write_bytes(data[:-20])
    elif damage == "truncate_header":
        path.write_bytes(data[:30])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(os.urandom(len(data)))
    read = disk.read(KEY)
    assert read.tensors is None
    assert read.corrupt and str(path) in read.warning and "rebuilt" in read.warning
    if damage == "flip_byte":
        assert "checksum" in read.warning
    assert not path.exists()
    # a rewrite makes it valid again
    disk.write(KEY, {"latent": torch.ones(1)})
    assert torch.equal(disk.read(KEY).tensors["latent"], torch.ones(1))


def test_disk_rejects_a_file_of_another_key(tmp_path):
    disk = DiskStore(tmp_path)
    other = "lat-" + "1" * 64
    disk.write(other, {"latent": torch.ones(2)})
    os.replace(disk.path(other), disk.path(KEY))
    read = disk.read(KEY)
    assert read.tensors is None and "holds key" in read.warning
    assert not disk.path(KEY).exists()


def test_disk_rejects_a_file_with_a_forged_checksum(tmp_path):
    import safetensors.torch

    disk = DiskStore(tmp_path)
    good = {"latent": torch.ones(3)}
    meta = {"format": stores.DISK_FORMAT, "key": KEY, "checksum": stores.tensors_checksum(good)}
    disk.path(KEY).write_bytes(safetensors.torch.save({"latent": torch.zeros(3)}, metadata=meta))
    read = disk.read(KEY)
    assert read.tensors is None and "checksum" in read.warning


def test_disk_validate_callback_rejects_and_deletes(tmp_path):
    disk = DiskStore(tmp_path)
    disk.write(KEY, {"latent": torch.ones(2)})
    read = disk.read(KEY, validate=lambda t: "has the wrong shape" if t["latent"].ndim != 3 else None)
    assert read.tensors is None and "has the wrong shape" in read.warning
    assert not disk.path(KEY).exists()


def test_disk_file_checksummed_with_sha256_stays_readable(tmp_path, monkeypatch):
    disk = DiskStore(tmp_path)
    monkeypatch.setattr(fingerprints, "HASH_NAME", "sha256")
    disk.write(KEY, {"latent": torch.arange(5.0)})
    monkeypatch.undo()
    read = disk.read(KEY)
    assert read.warning is None and torch.equal(read.tensors["latent"], torch.arange(5.0))


def test_disk_removes_only_stale_temp_files(tmp_path):
    stale = tmp_path / f".{KEY}.123.abc.tmp"
    fresh = tmp_path / f".{KEY}.456.def.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    DiskStore(tmp_path)
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", ".hidden", "x" * 300])
def test_disk_rejects_unsafe_keys(tmp_path, bad):
    with pytest.raises(ValueError):
        DiskStore(tmp_path).path(bad)


def test_unusable_cache_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(stores.CacheFolderError, match="cannot use .* as a cache folder"):
        DiskStore(blocker / "sub")
