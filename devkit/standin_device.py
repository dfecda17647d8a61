"""A stand-in accelerator for machines without a GPU: a second device with real data and CUDA's rules.

Why: users train on CUDA, CI has no GPU, and the mistakes that only show on a GPU are device mistakes: a tensor
made on the CPU meeting one on the GPU ("Expected all tensors to be on the same device"), a CPU generator used
for a GPU draw, a host<->device copy or a sync per layer. On one CPU every tensor is on the same device, so none
of them can fail. Inside ``StandInDevice()`` tensors on the ``meta`` device are real: each one wraps a CPU tensor
(``StandInTensor``), so forward, backward, optimizers and ComfyUI's own loaders, samplers and casts compute real
numbers there, while every operation is checked the way CUDA checks it:

* an operation that mixes a stand-in tensor with a CPU tensor of one or more dimensions raises CUDA's error
  (0-dim CPU tensors are allowed, as on CUDA; so are CPU index tensors in indexing, which CUDA copies);
* a random draw for the stand-in device with a CPU ``generator`` raises, as CUDA does;
* a draw without a generator uses the stand-in's own device RNG, separate from the CPU's global RNG, as CUDA's
  is; ``torch.meta`` is registered as its device module (``get_rng_state``, ``set_rng_state``, ``manual_seed``)
  and ``torch.utils.checkpoint`` preserves it across the recompute exactly as it preserves CUDA's;
* every host->device copy, device->host copy and sync (``.item()``, ``.cpu()``, ``nonzero``, bool masks) is
  counted in ``transfers``, so a test can show that a training step does not copy or sync per layer.

Values are bit-identical to the same computation on the CPU, so a run on the stand-in can be compared with a CPU
run byte for byte. What it cannot show: kernels (cuDNN, SDPA backends, streams), memory sizes and speed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.checkpoint as checkpoint_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")

_aten = torch.ops.aten

#: ops whose output shape depends on the data: on CUDA they wait for the device (a sync)
_SYNCING = {
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._local_scalar_dense.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.unique_dim.default,
    _aten._unique2.default,
}

#: ops that only compare tensor metadata: any mix of devices is fine
_METADATA = {_aten._has_compatible_shallow_copy_type.default, _aten.is_same_size.default}

#: ops that may take CPU index tensors for a device tensor (CUDA copies them over)
_INDEXING = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}

#: ops that draw random numbers (they honour ``generator``)
_RANDOM = {
    "aten::randn",
    "aten::rand",
    "aten::randint",
    "aten::randperm",
    "aten::bernoulli",
    "aten::bernoulli_",
    "aten::normal",
    "aten::normal_",
    "aten::uniform_",
    "aten::native_dropout",
    "aten::randn_like",
    "aten::rand_like",
    "aten::randint_like",
    "aten::exponential_",
    "aten::random_",
    "aten::multinomial",
    "aten::cauchy_",
    "aten::log_normal_",
    "aten::geometric_",
    "aten::poisson",
}


class StandInTensor(torch.Tensor):
    """A tensor on the stand-in device: reports ``meta``, holds its values in ``elem`` (a CPU tensor)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool | None = None) -> StandInTensor:
        if isinstance(elem, StandInTensor):
            elem = elem.elem
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=DEVICE,
            requires_grad=elem.requires_grad if requires_grad is None else requires_grad,
        )
        r.elem = elem
        return r

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: D105
        return f"StandInTensor({self.elem!r})"

    @property
    def is_meta(self) -> bool:
        """False: the values are real. ComfyUI reads ``is_meta`` to find weights still to be loaded lazily."""
        return False

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001
        device = _ACTIVE[-1] if _ACTIVE else _QUIET
        return device.dispatch(func, args, kwargs or {})


@dataclasses.dataclass
class Transfers:
    """What crossed between the host and the stand-in device."""

    host_to_device: int = 0
    device_to_host: int = 0
    syncs: int = 0  # device->host copies, .item(), data-dependent shapes
    ops: int = 0  # every op that ran on the stand-in device

    def since(self, before: Transfers) -> Transfers:
        return Transfers(*(getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)))

    def copy(self) -> Transfers:
        return dataclasses.replace(self)


def _is_standin(t: Any) -> bool:
    return isinstance(t, StandInTensor)


def _targets_standin(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"


class _DeviceRng(types.ModuleType):
    """``torch.meta``: the device module of the stand-in (its RNG), as ``torch.cuda`` is CUDA's."""

    def __init__(self) -> None:
        super().__init__("torch.meta")
        self._initialized = True

    @staticmethod
    def _generator() -> torch.Generator:
        if not _ACTIVE:
            raise RuntimeError("the stand-in device's RNG is used outside StandInDevice()")
        return _ACTIVE[-1].rng

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return self._generator().get_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        self._generator().set_state(state)

    def manual_seed(self, seed: int) -> None:
        self._generator().manual_seed(int(seed))

    manual_seed_all = manual_seed

    def initial_seed(self) -> int:
        return self._generator().initial_seed()

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def is_available(self) -> bool:
        return True

    @contextlib.contextmanager
    def device(self, index: Any = None) -> Iterator[None]:
        yield


def _register_device_module() -> None:
    if not isinstance(getattr(torch, "meta", None), _DeviceRng):
        torch._register_device_module("meta", _DeviceRng())


_ORIGINAL_GET_DEVICE_MODULE = checkpoint_module._get_device_module
_ORIGINAL_GET_DEVICE_STATES = checkpoint_module.get_device_states
_ORIGINAL_SET_DEVICE_STATES = checkpoint_module.set_device_states


def _get_device_module(device: str = "cuda") -> Any:
    if device == "meta" and _ACTIVE:
        return torch.meta
    return _ORIGINAL_GET_DEVICE_MODULE(device)


def _get_device_states(*args: Any) -> tuple[list[int], list[torch.Tensor]]:
    """torch.utils.checkpoint saves the RNG state of every CUDA device its inputs are on; the same for ours."""
    flat, _ = tree_flatten(args)
    if _ACTIVE and any(_is_standin(a) for a in flat):
        return [0], [torch.meta.get_rng_state()]
    return _ORIGINAL_GET_DEVICE_STATES(*args)


class StandInGenerator(torch.Generator):
    """``torch.Generator(device=<the stand-in>)``: a generator for draws on the device (ComfyUI's samplers make
    one per sampling run). Its state lives on the host; using it for a draw on the host raises, as on CUDA.

    torch hands an op a new Python object for the same generator, so ops recognise it by its state (``is_ours``).
    """

    def __new__(cls, device: Any = "cpu") -> StandInGenerator:
        return super().__new__(cls, device="cpu" if _targets_standin(device) else device)

    def __init__(self, device: Any = "cpu") -> None:
        self.on_standin = _targets_standin(device)
        if self.on_standin:
            _DEVICE_GENERATORS.add(self)


_DEVICE_GENERATORS: weakref.WeakSet[StandInGenerator] = weakref.WeakSet()


def _is_device_generator(generator: torch.Generator | None) -> bool:
    if generator is None or generator.device.type != "cpu":
        return False
    if getattr(generator, "on_standin", False):
        return True
    state = generator.get_state()
    return any(torch.equal(state, g.get_state()) for g in list(_DEVICE_GENERATORS))


_REAL_GENERATOR = torch.Generator


def _host_data_factory(factory: Any) -> Any:
    """``torch.tensor(data, device=...)`` and its kin build their values in C++ without an op a dispatch mode sees
    (on ``meta`` they make a tensor without data): for the stand-in they are made on the host and copied over,
    which is what they do on CUDA. Installed as module attributes, so backward passes and checkpoint recomputes
    (where torch function modes are not active) get them too."""

    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _ACTIVE and _targets_standin(kwargs.get("device")):
            return factory(*args, **{**kwargs, "device": torch.device("cpu")}).to(DEVICE)
        return factory(*args, **kwargs)

    return make


class _AnyGenerator(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _REAL_GENERATOR)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, _REAL_GENERATOR)


class _StandInGeneratorClass(StandInGenerator, metaclass=_AnyGenerator):
    """What ``torch.Generator`` is inside StandInDevice(): a device generator for the stand-in, a plain one else
    (and every generator is an instance of it)."""

    def __new__(cls, device: Any = "cpu") -> torch.Generator:  # type: ignore[misc]
        if _ACTIVE and _targets_standin(device):
            return StandInGenerator(device)
        return _REAL_GENERATOR(device=device)


def _host_data_new_tensor(method: Any) -> Any:
    def new_tensor(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _ACTIVE and _is_standin(self) and kwargs.get("device") is None:
            return method(self.elem, *args, **kwargs).to(DEVICE)
        return method(self, *args, **kwargs)

    return new_tensor


def _host_data_index(method: Any) -> Any:
    """``x[[0, 1], [5, 7]]``: torch turns Python lists into index tensors on x's device in C++ (no data on meta)."""

    def index(self: torch.Tensor, key: Any, *rest: Any) -> Any:
        if _ACTIVE and _is_standin(self):
            key = _device_index(key)
        return method(self, key, *rest)

    return index


def _device_index(index: Any) -> Any:
    if isinstance(index, list):
        return torch.tensor(index, device="cpu").to(DEVICE)
    if isinstance(index, tuple):
        return tuple(_device_index(i) for i in index)
    return index


def _set_device_states(devices: list, states: list, *, device_type: str | None = None) -> None:
    if device_type == "meta" and _ACTIVE:
        for state in states:
            torch.meta.set_rng_state(state)
        return
    _ORIGINAL_SET_DEVICE_STATES(devices, states, device_type=device_type)


class StandInDevice(TorchDispatchMode):
    """Run the block with ``meta`` as a real, CUDA-strict second device (see the module docstring).

    ``seed`` seeds the device RNG (what CUDA's default generator starts from before anyone seeds it).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.rng = torch.Generator().manual_seed(seed)
        self.transfers = Transfers()
        self._patched: list[tuple[Any, str, Any]] = []

    # -- entering and leaving -----------------------------------------------------------------------------
    def __enter__(self) -> StandInDevice:
        _register_device_module()
        _ACTIVE.append(self)
        patches = [
            (checkpoint_module, "_get_device_module", _get_device_module),
            (checkpoint_module, "get_device_states", _get_device_states),
            (checkpoint_module, "set_device_states", _set_device_states),
        ]
        patches += [
            (torch, name, _host_data_factory(getattr(torch, name))) for name in ("tensor", "as_tensor", "asarray")
        ]
        patches += [(torch.Tensor, "new_tensor", _host_data_new_tensor(torch.Tensor.new_tensor))]
        patches += [(torch, "Generator", _StandInGeneratorClass)]
        patches += [
            (torch.Tensor, name, _host_data_index(getattr(torch.Tensor, name)))
            for name in ("__getitem__", "__setitem__")
        ]
        for owner, name, value in patches:
            self._patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, value in reversed(self._patched):
                setattr(owner, name, value)
            self._patched.clear()
            _ACTIVE.remove(self)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return self.dispatch(func, args, kwargs or {})

    # -- the rules ---------------------------------------------------------------------------------------------
    def dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        flat, _ = tree_flatten((args, kwargs))
        on_standin = any(_is_standin(t) for t in flat)
        wants_standin = _targets_standin(kwargs.get("device"))
        if not on_standin and not wants_standin:
            for t in flat:
                if isinstance(t, torch.Tensor) and t.device.type == "meta":
                    raise RuntimeError(
                        f"{func}: a meta tensor without data reached the stand-in device; it was made "
                        "outside StandInDevice()"
                    )
            if _is_device_generator(kwargs.get("generator")):
                raise RuntimeError(
                    "Expected a 'cpu' device type for generator but found 'meta' (a device generator "
                    "was used for a draw on the host)"
                )
            return func(*args, **kwargs)
        self.transfers.ops += 1

        if func is _aten._has_compatible_shallow_copy_type.default:
            return False  # Module.to(): new Parameters, never ``param.data = ...`` (the values live in ``elem``)
        if func in _METADATA:
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func._schema.name in ("aten::to", "aten::_to_copy"):
            return self._to(func, args, kwargs)
        if func is _aten.copy_.default:
            return self._copy_(args[0], args[1], kwargs)
        if func is _aten.set_.source_Tensor and _is_standin(args[0]) and _is_standin(args[1]):
            return self._set_(args[0], args[1])
        if func in _SYNCING:
            self.transfers.syncs += 1

        for t in flat:
            if isinstance(t, torch.Tensor) and not _is_standin(t) and t.device.type == "meta":
                raise RuntimeError(
                    f"{func}: a meta tensor without data met the stand-in device (made by a factory "
                    "the stand-in does not see)"
                )
        cpu_operand = next(
            (t for t in flat if isinstance(t, torch.Tensor) and not _is_standin(t) and t.dim() > 0), None
        )
        if cpu_operand is not None and on_standin:
            if func in _INDEXING and cpu_operand.dtype in (torch.long, torch.int, torch.bool):
                self.transfers.host_to_device += 1
            else:
                raise RuntimeError(
                    f"Expected all tensors to be on the same device, but found at least two devices, meta and cpu! "
                    f"({func}: a CPU tensor of shape {tuple(cpu_operand.shape)} met a tensor on the device)"
                )

        kwargs = dict(kwargs)
        draws_from_device_rng = False
        if func._schema.name in _RANDOM:
            generator = kwargs.get("generator")
            if generator is not None and not _is_device_generator(generator):
                raise RuntimeError(
                    "Expected a 'meta' device type for generator but found 'cpu' (a CPU generator "
                    "was used for a draw on the device)"
                )
            draws_from_device_rng = generator is None
        explicit = kwargs.get("device")
        if wants_standin:
            kwargs["device"] = torch.device("cpu")
        if draws_from_device_rng:  # the device's default generator, not the host's
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.rng.get_state())
                out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
                self.rng.set_state(torch.get_rng_state())
        else:
            out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if explicit is not None and not wants_standin:
            return out  # e.g. empty_like(device_tensor, device="cpu"): made on the host
        return self._wrap_result(func, args, kwargs, out)

    def _to(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        out, crossed = _convert(func, args, kwargs)
        if crossed == "to_host":
            self.transfers.device_to_host += 1
            self.transfers.syncs += 1
        elif crossed == "to_device":
            self.transfers.host_to_device += 1
        return out

    def _copy_(self, dst: torch.Tensor, src: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if _is_standin(dst) and not _is_standin(src) and src.dim() > 0:
            self.transfers.host_to_device += 1
        elif _is_standin(src) and not _is_standin(dst):
            self.transfers.device_to_host += 1
            self.transfers.syncs += 1
        _unwrap(dst).copy_(_unwrap(src), **kwargs)
        return dst

    @staticmethod
    def _set_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``dst.set_(src)``: ``dst`` becomes a tensor over ``src``'s memory, as on CUDA (the wrapper's own shape
        and strides follow ``src``'s; its values are a CPU tensor sharing ``src``'s)."""
        elem = _unwrap(src)
        dst.elem = _unwrap(dst).set_(elem)
        with torch._C._DisableTorchDispatch():
            _aten.set_.source_Tensor(dst, src)
        return dst

    @staticmethod
    def _wrap_result(func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        written = _written_argument(func, args, kwargs)
        if written is not None:
            return written  # in-place and out= ops return the very tensor they wrote, as torch does
        return tree_map(lambda t: StandInTensor(t) if isinstance(t, torch.Tensor) and not _is_standin(t) else t, out)


def _written_argument(func: Any, args: tuple, kwargs: dict) -> Any:
    """The argument an in-place (``add_``) or out= op returns, or None for ops that return new tensors."""
    schema = func._schema
    if len(schema.returns) != 1 or schema.returns[0].alias_info is None or not schema.returns[0].alias_info.is_write:
        return None
    alias = schema.returns[0].alias_info.before_set
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write and arg.alias_info.before_set == alias:
            if arg.kwarg_only or i >= len(args):
                return kwargs.get(arg.name)
            return args[i]
    return None


def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name (its schema's)."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
    return bound


def _convert(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | None]:
    """``to`` / ``_to_copy`` between the host and the stand-in: (result, "to_device" | "to_host" | None)."""
    bound = _bind(func, args, kwargs)
    src = bound["self"]
    other = bound.get("other")
    target = bound.get("device") if bound.get("device") is not None else (other.device if other is not None else None)
    to_standin = _targets_standin(target) if target is not None else _is_standin(src)
    dtype = bound.get("dtype") or (other.dtype if other is not None else None) or src.dtype
    copy = func._schema.name == "aten::_to_copy" or bool(bound.get("copy", False))
    if to_standin == _is_standin(src) and dtype == src.dtype and not copy:
        return src, None
    extra = {k: bound[k] for k in ("memory_format",) if bound.get(k) is not None}
    out = _unwrap(src).to(dtype=dtype, copy=True, **extra)
    crossed = None if to_standin == _is_standin(src) else ("to_device" if to_standin else "to_host")
    return (StandInTensor(out) if to_standin else out), crossed


def _unwrap(t: Any) -> Any:
    return t.elem if isinstance(t, StandInTensor) else t


class _Quiet:
    """Outside StandInDevice(): stand-in tensors still compute (reading results back), without the checks."""

    def dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if func._schema.name in ("aten::to", "aten::_to_copy"):
            return _convert(func, args, kwargs)[0]
        kwargs = dict(kwargs)
        explicit = kwargs.get("device")
        if _targets_standin(explicit):
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if explicit is not None and not _targets_standin(explicit):
            return out
        return StandInDevice._wrap_result(func, args, kwargs, out)


_QUIET = _Quiet()
_ACTIVE: list[StandInDevice] = []


def values(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor behind a stand-in tensor (a plain tensor is returned as it is), without counting a copy."""
    return t.elem if isinstance(t, StandInTensor) else t


def on_standin(t: Any) -> bool:
    return isinstance(t, StandInTensor)


__all__ = ["DEVICE", "StandInDevice", "StandInGenerator", "StandInTensor", "Transfers", "on_standin", "values"]
if "torch.meta" in sys.modules and not isinstance(sys.modules["torch.meta"], _DeviceRng):  # pragma: no cover
    raise RuntimeError("torch.meta is already registered by something else")
