"""optimizer_args checked against the optimizer's own constructor before training.

WHY: a value of the wrong type (``weight_decay=abc``, ``betas=1``) otherwise surfaces as a Python type error from
inside the optimizer, after the models were loaded and the latents cached; an argument the constructor does not name
is either a TypeError then or, for optimizers that take ``**kwargs`` (pytorch-optimizer's), silently ignored. The
expected type comes from the parameter's annotation where Python can read it, else from its default value.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: the constructor arguments optimizer_args never sets (the pack passes them)
_PASSED_BY_THE_PACK = ("self", "params", "lr")


@dataclass(frozen=True)
class ExpectedType:
    """What one constructor argument takes: kinds among bool, int, float, str, none, sequence; ``lengths`` of a
    sequence when known; ``default`` for the example in messages."""

    kinds: frozenset[str]
    lengths: frozenset[int] = frozenset()
    default: Any = inspect.Parameter.empty

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):
            return "bool" in self.kinds
        if isinstance(value, int):
            return bool({"int", "float"} & self.kinds)
        if isinstance(value, float):
            return "float" in self.kinds
        if isinstance(value, str):
            return "str" in self.kinds
        if value is None:
            return "none" in self.kinds
        if isinstance(value, (tuple, list)):
            if "sequence" not in self.kinds or (self.lengths and len(value) not in self.lengths):
                return False
            return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return False

    def describe(self) -> str:
        words = []
        if "bool" in self.kinds:
            words.append("True or False")
        if "float" in self.kinds:
            words.append("a number")
        elif "int" in self.kinds:
            words.append("a whole number")
        if "sequence" in self.kinds:
            sizes = sorted(self.lengths)
            words.append(f"{' or '.join(map(str, sizes))} numbers" if sizes else "a list of numbers")
        if "str" in self.kinds:
            words.append("text")
        if "none" in self.kinds:
            words.append("None")
        return " or ".join(words) if words else "a value this optimizer cannot get from optimizer_args"

    def example(self, key: str) -> str:
        default = self.default
        if default is inspect.Parameter.empty or default is None or not self.accepts(default):
            default = _SAMPLES.get(next((k for k in _SAMPLE_ORDER if k in self.kinds), ""))
            if "sequence" in self.kinds and self.lengths:
                default = (0.9, 0.999, 0.9999)[: min(self.lengths)]
        if default is None:
            return ""
        if isinstance(default, (tuple, list)):
            return f"{key}={','.join(repr(v) for v in default)}"
        return f"{key}={default!r}"


_SAMPLE_ORDER = ("float", "int", "bool", "sequence", "str")
_SAMPLES: dict[str, Any] = {"float": 0.1, "int": 1, "bool": True, "sequence": (0.9, 0.999), "str": "text"}


def _kinds_of_annotation(annotation: Any) -> tuple[set[str], set[int]] | None:
    """Kinds (and sequence lengths) an annotation allows; None when it says nothing we can check."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        lengths: set[int] = set()
        for arg in typing.get_args(annotation):
            if arg is torch.Tensor:  # lr/weight_decay as tensors: not reachable from optimizer_args text
                continue
            part = _kinds_of_annotation(arg)
            if part is None:
                return None
            kinds |= part[0]
            lengths |= part[1]
        return kinds, lengths
    if annotation is type(None):
        return {"none"}, set()
    if annotation is bool:
        return {"bool"}, set()
    if annotation is int:
        return {"int"}, set()
    if annotation is float:
        return {"float"}, set()
    if annotation is str:
        return {"str"}, set()
    if annotation in (tuple, list) or origin in (tuple, list):
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"sequence"}, {len(args)}
        return {"sequence"}, set()
    if origin is typing.Literal:
        return {"str"} if all(isinstance(a, str) for a in typing.get_args(annotation)) else None
    if annotation is Callable or origin is Callable or origin is typing.Callable:
        return set(), set()  # a function: optimizer_args cannot give one
    return None


def _kinds_of_default(default: Any) -> tuple[set[str], set[int]] | None:
    if isinstance(default, bool):
        return {"bool"}, set()
    if isinstance(default, (int, float)):
        return {"int", "float"} if isinstance(default, int) else {"float"}, set()
    if isinstance(default, str):
        return {"str"}, set()
    if isinstance(default, tuple):
        return {"sequence"}, {len(default)}
    if callable(default):
        return set(), set()
    return None


def expected_type(parameter: inspect.Parameter) -> ExpectedType | None:
    """What ``parameter`` takes, from its annotation, else its default; None when neither tells."""
    found = _kinds_of_annotation(parameter.annotation) or _kinds_of_default(parameter.default)
    if found is None:
        return None
    kinds, lengths = found
    if parameter.default is None:
        kinds = kinds | {"none"}
    return ExpectedType(frozenset(kinds), frozenset(lengths), parameter.default)


def _signature(cls: type) -> inspect.Signature:
    try:
        return inspect.signature(cls.__init__, eval_str=True)
    except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated: use them as written
        return inspect.signature(cls.__init__)


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return "True/False"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if value is None:
        return "None"
    if isinstance(value, (tuple, list)):
        return f"{len(value)} value{'s' if len(value) != 1 else ''}"
    return type(value).__name__


def arg_type_problems(cls: type, optimizer_type: str, kwargs: dict[str, Any]) -> list[str]:
    """One line per optimizer_args entry ``cls``'s constructor cannot take: an argument it does not name, or a value
    of another type than it expects (with the type and an example)."""
    parameters = {
        name: p
        for name, p in _signature(cls).parameters.items()
        if name not in _PASSED_BY_THE_PACK and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    where = f"{optimizer_type} ({cls.__module__}.{cls.__name__})"
    problems = []
    for key, value in kwargs.items():
        if key not in parameters:
            problems.append(f"{where} has no argument {key!r}; its arguments are: {', '.join(parameters)}")
            continue
        expected = expected_type(parameters[key])
        if expected is None or expected.accepts(value):
            continue
        example = expected.example(key)
        problems.append(
            f"{key}={value!r} is {_describe_value(value)}, but {where} expects {expected.describe()} for {key}"
            + (f", e.g. {example}" if example else "")
        )
    return problems
