"""Run each distinct call of the shape pass once (part of step 1).

Transformers repeat one block many times: ViT-H calls ``nn.MultiheadAttention`` 32 times with
the same shapes, Swin calls its wrapped ``shifted_window_attention`` 24 times with 8 distinct
configurations.  On meta tensors such a call costs milliseconds (Python meta kernels) and its
result depends only on what :func:`call_key` records: the target, the layout of every tensor
argument and every constant argument, and for a ``torch.nn`` module its configuration and the
layout of its parameters and buffers.  :class:`MetaMemo` keeps the result layout and MACs of the
first such call and rebuilds them for the next ones.

What is not memoised (``call_key`` returns ``None``): in-place ops, ``out=`` calls and calls
with an ``inplace`` flag set (by keyword or position), real (non-meta) tensors, tensor subclasses, modules defined outside
``torch.nn`` (their ``forward`` may read anything) and ``torch.nn`` modules with hooks or with
attributes that are not plain constants.  Rebuilt tensors carry no autograd state, as the
results of :mod:`hfp_fx.capture.meta_shortcuts` do.

Example::

    >>> import torch
    >>> mha = torch.nn.MultiheadAttention(8, 2, device="meta")
    >>> x = torch.empty(3, 1, 8, device="meta")
    >>> call_key("call_module", mha, (x, x, x), {}) == call_key(
    ...     "call_module", torch.nn.MultiheadAttention(8, 2, device="meta"), (x, x, x), {})
    True
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Optional, Tuple

import torch

from hfp_fx.capture.meta_shortcuts import in_place

__all__ = ["MetaMemo", "call_key"]

_CONSTANTS = (int, float, bool, complex, str, bytes, type(None), type(Ellipsis), torch.dtype, torch.device,
              torch.memory_format, torch.layout)
_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType, types.MethodWrapperType)


class _Unkeyable(Exception):
    """An argument whose effect on the result is not captured by a key."""


def _tensor_key(t: torch.Tensor) -> Hashable:
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "meta" or t.layout != torch.strided:
        raise _Unkeyable
    return ("tensor", tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.requires_grad)


def _key(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if isinstance(value, _CONSTANTS):
        return (type(value), value)  # the type too: 1, 1.0 and True are equal keys otherwise
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple((_key(k), _key(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return (slice, _key(value.start), _key(value.stop), _key(value.step))
    if isinstance(value, torch.nn.Module):
        return _module_key(value)
    if isinstance(value, _FUNCTIONS):
        return (types.FunctionType, value)  # by identity
    raise _Unkeyable


def _module_key(m: torch.nn.Module) -> Hashable:
    """A ``torch.nn`` module's type, configuration and parameter/buffer layouts.

    ``torch.nn`` modules compute from their ``__dict__`` alone; a user module's ``forward`` may
    read globals or mutable state, so it is never keyed.
    """
    if not type(m).__module__.startswith("torch.nn."):
        raise _Unkeyable
    items = []
    for name, value in vars(m).items():
        if name in ("_parameters", "_buffers"):
            items.append((name, tuple((k, _key(t)) for k, t in value.items())))
        elif name == "_modules":
            items.append((name, tuple((k, _module_key(c)) for k, c in value.items())))
        elif isinstance(value, (dict, set)):
            if value and isinstance(value, dict):
                raise _Unkeyable  # hooks, or state the forward may read
        else:
            items.append((name, _key(value)))
    return (type(m), tuple(items))


def _writes_input(target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """An in-place op by name (``add_``), an ``out=`` call, or an ``inplace`` flag set."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or "out" in kwargs or in_place(target, args, kwargs)


def call_key(op: str, target: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Hashable]:
    """What fixes the result of calling ``target`` on meta ``args``, or ``None`` if not memoisable.

    ``target`` is the function, the method name, or the called module.
    """
    if _writes_input(target, args, kwargs):
        return None
    try:
        return (op, _key(target) if op == "call_module" else _key_target(target), _key(args), _key(kwargs))
    except _Unkeyable:
        return None


def _key_target(target: Any) -> Hashable:
    if isinstance(target, str):
        return target
    try:
        hash(target)
    except TypeError:
        raise _Unkeyable from None
    return target


@dataclass(frozen=True)
class _Layout:
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: torch.dtype


def _template(value: Any) -> Any:
    """``value`` with tensors replaced by their layout; raises ``_Unkeyable`` for other objects."""
    if isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor or value.device.type != "meta" or value.storage_offset() != 0:
            raise _Unkeyable  # a view into another tensor: not worth rebuilding
        return _Layout(tuple(value.shape), value.stride(), value.dtype)
    if isinstance(value, _CONSTANTS):
        return value
    if isinstance(value, (tuple, list)):
        items = [_template(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    raise _Unkeyable


def _rebuild(template: Any) -> Any:
    if isinstance(template, _Layout):
        return torch.empty_strided(template.shape, template.stride, dtype=template.dtype, device="meta")
    if isinstance(template, (tuple, list)):
        items = [_rebuild(v) for v in template]
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    return template


class MetaMemo:
    """Results (as layouts) and MACs of calls on meta tensors, by :func:`call_key`."""

    def __init__(self):
        self._seen: Dict[Hashable, Tuple[Any, int]] = {}
        self.hits = 0

    def get(self, key: Optional[Hashable]) -> Optional[Tuple[Any, int]]:
        """A fresh ``(result, MACs)`` for ``key`` if an equal call was recorded (``None`` for key ``None``)."""
        found = self._seen.get(key) if key is not None else None
        if found is None:
            return None
        self.hits += 1
        return _rebuild(found[0]), found[1]

    def put(self, key: Optional[Hashable], result: Any, macs: int) -> None:
        """Record ``result``'s layout and ``macs`` under ``key`` (nothing for key ``None`` or a result
        with anything but tensors and constants)."""
        if key is None:
            return
        try:
            self._seen[key] = (_template(result), macs)
        except _Unkeyable:
            pass
