"""Peak tensor memory of a piece of code, counted from torch's dispatcher: the figure a memory plan is about.

RSS says little about a training step (the allocator keeps freed blocks, Python keeps its own), and
``torch.cuda.max_memory_allocated`` exists only on CUDA. This counts the bytes of every storage an op creates while
the mode is on, until the storage is freed, and keeps the peak. Storages that existed before (the loaded weights,
the LoRA parameters made earlier) are not counted. The same mode works on real tensors (a measurement) and on
FakeTensorMode tensors, which have shapes and dtypes but no data (a prediction that allocates nothing).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class PeakTensorMemory(TorchDispatchMode):
    """``with PeakTensorMemory() as m: ...``; then ``m.peak`` / ``m.live`` in bytes (storages made inside only).

    ``fake``: count FakeTensorMode tensors (a prediction) instead of real ones; the other kind is never counted, so a
    measurement of code that makes a prediction inside (the run's memory plan) counts only what the run allocates.
    """

    def __init__(self, fake: bool = False) -> None:
        super().__init__()
        self.fake = fake
        self.live = 0
        self.peak = 0
        self._bytes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> bytes counted (0: made outside)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def _note(self, tensors: list[Any], made_here: bool) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor) or isinstance(t, FakeTensor) != self.fake:
                continue
            if t.is_meta and not self.fake:  # FakeTensorMode's own meta work
                continue
            storage = t.untyped_storage()
            if storage in self._bytes:
                continue
            nbytes = storage.nbytes() if made_here else 0
            self._bytes[storage] = nbytes
            if nbytes:
                self.live += nbytes
                weakref.finalize(storage, self._freed, nbytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self._note(tree_flatten((args, kwargs))[0], made_here=False)  # inputs seen first were made outside
        out = func(*args, **kwargs)
        # a result that aliases an input (a view, an in-place op's) makes no storage: under FakeTensorMode a real input
        # (a loaded weight) becomes a fake tensor inside the op, and a view of it must not count as memory
        returns = func._schema.returns
        results = [out] if len(returns) == 1 else list(out or ())  # in-place foreach ops return nothing
        for result, spec in zip(results, returns):
            self._note(tree_flatten(result)[0], made_here=spec.alias_info is None)
        self.peak = max(self.peak, self.live)
        return out
