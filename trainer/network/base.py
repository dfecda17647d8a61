"""What every network algorithm shares: forward hooks on the shared modules, CPU state-dict copies, max-norm
statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@contextmanager
def output_hooks(handles: list, targets: Sequence[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks on the shared modules for this block and always remove them (``handles`` is the
    network's list, so ``attached`` can tell); the modules themselves are never changed."""
    try:
        for module, hook in targets:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        handles.clear()


def cpu_state_dict(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a network's state dict, cast to ``dtype`` when given (alpha too, as kohya saves)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu", copy=True)
        out[k] = (v.to(dtype) if dtype is not None else v).contiguous()
    return out


@dataclass(frozen=True)
class MaxNormStats:
    """What max-norm did, as device tensors (reading them is a sync; the training loop never does)."""

    norms: torch.Tensor | None  # [modules] norm after scaling
    scaled: torch.Tensor | None  # [modules] bool: was this module scaled

    @classmethod
    def of(cls, norms: Sequence[torch.Tensor], ratios: Sequence[torch.Tensor]) -> MaxNormStats:
        if not norms:
            return cls(None, None)
        return cls(torch.stack(list(norms)), torch.stack(list(ratios)) != 1)

    def read(self) -> tuple[int, float, float]:
        """(keys_scaled, mean norm, max norm), reduced in Python as kohya does; (0, 0.0, 0.0) for no modules."""
        if self.norms is None:
            return 0, 0.0, 0.0
        values = self.norms.float().cpu().tolist()
        return int(self.scaled.sum().cpu()), sum(values) / len(values), max(values)
