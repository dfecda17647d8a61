"""Content hashes the caches are keyed by.

Why content hashes: a cached tensor may only be reused for exactly the inputs that produced it. Every
item is therefore stored under a hash of those inputs (image bytes, bucket, flip, model weights,
caption text, ...); a changed input gives a different key, so stale data is never looked up and
nothing has to be invalidated explicitly. Editing one caption re-encodes that caption only.

Hashes use BLAKE3 when the ``blake3`` package is installed (ComfyUI ships it), else SHA-256. Weight fingerprints
are memoised per model object (and per patch token), so a re-run does not hash a model again.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Union

import torch

try:  # BLAKE3 is ~10x faster than SHA-256 on large buffers (weights, image files)
    import blake3 as _blake3
except ImportError:  # pragma: no cover - depends on the environment
    _blake3 = None

PathLike = Union[str, "os.PathLike[str]"]

HASH_NAME = "blake3" if _blake3 is not None else "sha256"

#: Number of weight fingerprints actually computed (not served from the memo), for tests and stats.
FINGERPRINT_COMPUTATIONS: dict[str, int] = {"modules": 0, "tokens": 0}
_MB = 1024 * 1024


# -- hashing -----------------------------------------------------------------------------------


def new_hasher(name: str | None = None) -> Any:
    """A hashlib-like object (``update``/``hexdigest``) for ``name`` ("blake3" or "sha256"; default HASH_NAME)."""
    name = HASH_NAME if name is None else name
    if name == "blake3":
        if _blake3 is None:
            raise ValueError("blake3 is not installed")
        return _blake3.blake3()
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {name!r}")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (CPU, contiguous), for any dtype numpy lacks (bf16, fp8) too."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    try:
        u8 = t.view(torch.uint8)
    except (RuntimeError, TypeError):  # tensor subclasses that cannot be reinterpreted: hash their values
        u8 = t.to(torch.float64).view(torch.uint8)
    return memoryview(u8.numpy()).cast("B")


def update_tensor(h: Any, t: torch.Tensor) -> None:
    """Hash a tensor's dtype, shape and bytes (so equal bytes with another shape hash differently)."""
    h.update(f"T{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(tensor_bytes(t))


def _tagged(h: Any, tag: bytes, payload: bytes) -> None:
    h.update(tag + len(payload).to_bytes(8, "little") + payload)


def update_structure(h: Any, obj: Any, _seen: set[int] | None = None, _depth: int = 0) -> None:
    """Hash nested data (tensors, containers, numbers, strings, simple objects) unambiguously.

    Used for ModelPatcher patches (LoRA adapters, diffs, strengths). Each value is type-tagged and
    length-prefixed so that different structures never produce the same byte stream. Objects are
    hashed by their type and attributes; anything else falls back to ``repr`` (which may contain an
    address: that only causes cache misses, never a wrong reuse).
    """
    seen = set() if _seen is None else _seen
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, enum.Enum):
        _tagged(h, b"M", f"{type(obj).__qualname__}.{obj.name}".encode())
    elif isinstance(obj, int):
        _tagged(h, b"I", str(obj).encode())
    elif isinstance(obj, float):
        _tagged(h, b"F", obj.hex().encode())
    elif isinstance(obj, str):
        _tagged(h, b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _tagged(h, b"Y", bytes(obj))
    elif isinstance(obj, (torch.dtype, torch.device)):
        _tagged(h, b"D", str(obj).encode())
    elif isinstance(obj, torch.Tensor):
        update_tensor(h, obj)
    elif _depth > 64 or id(obj) in seen:
        _tagged(h, b"R", type(obj).__qualname__.encode())
    else:
        seen.add(id(obj))
        try:
            if isinstance(obj, (list, tuple)):
                _tagged(h, b"L" if isinstance(obj, list) else b"U", str(len(obj)).encode())
                for x in obj:
                    update_structure(h, x, seen, _depth + 1)
            elif isinstance(obj, Mapping):
                _tagged(h, b"P", str(len(obj)).encode())
                for k in sorted(obj, key=repr):
                    update_structure(h, k, seen, _depth + 1)
                    update_structure(h, obj[k], seen, _depth + 1)
            elif isinstance(obj, (set, frozenset)):
                _tagged(h, b"E", str(len(obj)).encode())
                for x in sorted(obj, key=repr):
                    update_structure(h, x, seen, _depth + 1)
            elif isinstance(obj, torch.nn.Module):
                _tagged(h, b"O", type(obj).__qualname__.encode())
                update_structure(h, dict(obj.state_dict()), seen, _depth + 1)
            elif isinstance(obj, functools.partial):
                _tagged(h, b"Q", b"partial")
                update_structure(h, (obj.func, obj.args, dict(obj.keywords)), seen, _depth + 1)
            elif isinstance(obj, types.FunctionType):
                # name + code + captured values: two lambdas of one line that close over different values differ
                _tagged(h, b"C", f"{obj.__module__}.{obj.__qualname__}".encode())
                _tagged(h, b"Y", obj.__code__.co_code)
                cells = tuple(c.cell_contents for c in obj.__closure__ or () if _cell_has_value(c))
                update_structure(h, (obj.__defaults__, cells), seen, _depth + 1)
            elif isinstance(obj, types.MethodType):
                _tagged(h, b"Q", b"method")
                update_structure(h, (obj.__func__, obj.__self__), seen, _depth + 1)
            elif callable(obj) and hasattr(obj, "__qualname__"):
                _tagged(h, b"C", f"{getattr(obj, '__module__', '')}.{obj.__qualname__}".encode())
            elif hasattr(obj, "__dict__"):
                _tagged(h, b"O", f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
                update_structure(h, vars(obj), seen, _depth + 1)
            else:
                _tagged(h, b"X", f"{type(obj).__qualname__}:{obj!r}".encode())
        finally:
            seen.discard(id(obj))


def _cell_has_value(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def structure_hash(obj: Any) -> str:
    h = new_hasher()
    update_structure(h, obj)
    return h.hexdigest()


def hash_file(path: PathLike, chunk: int = 4 * _MB) -> str:
    """Hash of a file's bytes (content, not path or mtime: a touched but unchanged file stays a hit)."""
    h = new_hasher()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def hash_pil_image(image: Any) -> str:
    """Hash of an in-memory PIL image's decoded pixels (images that came from the graph have no file)."""
    h = new_hasher()
    h.update(f"{image.mode}|{image.size}|".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of named tensors (names, dtypes, shapes, bytes) in sorted name order."""
    h = new_hasher()
    for name, t in sorted(named, key=lambda kv: kv[0]):
        _tagged(h, b"S", name.encode())
        update_tensor(h, t)
    return h.hexdigest()


def content_key(kind: str, fields: Mapping[str, Any]) -> str:
    """A cache key: ``<kind>-<hash of the canonical JSON of fields>``; fields must be JSON data."""
    text = canonical_json(fields)
    h = new_hasher()
    h.update(kind.encode() + b"\0" + text.encode())
    return f"{kind}-{h.hexdigest()}"


def canonical_json(fields: Mapping[str, Any]) -> str:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


# -- memoised fingerprints -----------------------------------------------------------------------

_MODULE_FP: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_TOKEN_FP: OrderedDict[Hashable, str] = OrderedDict()
_FP_LOCK = threading.Lock()
_TOKEN_FP_MAX = 256


def module_fingerprint(module: torch.nn.Module, named_tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> str:
    """Fingerprint of a model's weights, computed once per nn.Module object.

    Hashing a VAE (84M params) or SDXL's text encoders (820M) on every node run would cost seconds,
    so the result is memoised on the module's identity (weakly: it goes when the model is unloaded
    from ComfyUI's cache). Weights changed in place outside ComfyUI's patch mechanism are not
    noticed; ComfyUI itself never does that (LoRAs and merges are patches, fingerprinted separately).
    """
    with _FP_LOCK:
        fp = _MODULE_FP.get(module)
    if fp is None:
        fp = tensors_fingerprint(named_tensors())
        with _FP_LOCK:
            FINGERPRINT_COMPUTATIONS["modules"] += 1
            _MODULE_FP[module] = fp
    return fp


def token_fingerprint(token: Hashable, compute: Callable[[], str]) -> str:
    """Memoise ``compute()`` on a token that changes whenever the data changes (e.g. patches_uuid)."""
    with _FP_LOCK:
        fp = _TOKEN_FP.get(token)
        if fp is not None:
            _TOKEN_FP.move_to_end(token)
            return fp
    fp = compute()
    with _FP_LOCK:
        FINGERPRINT_COMPUTATIONS["tokens"] += 1
        _TOKEN_FP[token] = fp
        while len(_TOKEN_FP) > _TOKEN_FP_MAX:
            _TOKEN_FP.popitem(last=False)
    return fp


def clear_fingerprint_memo() -> None:
    with _FP_LOCK:
        _MODULE_FP.clear()
        _TOKEN_FP.clear()
