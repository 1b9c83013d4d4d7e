"""Small graph-editing helpers shared by the passes."""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.node import Node

__all__ = ["input_of", "pick_input", "replace_input", "scale_input", "is_aten", "emit"]

_aten = torch.ops.aten
#: the ATen overload a rewrite emits for a torch-level op in a graph of ATen ops (torch.export):
#: a shrunk exported graph stays in its own dialect
_ATEN_OF: Dict[Any, Any] = {
    operator.mul: _aten.mul.Tensor, torch.mul: _aten.mul.Tensor, operator.add: _aten.add.Tensor,
    torch.add: _aten.add.Tensor, operator.sub: _aten.sub.Tensor, torch.rsqrt: _aten.rsqrt.default,
    torch.sum: _aten.sum.dim_IntList, F.rms_norm: _aten.rms_norm.default,
    torch.split: _aten.split_with_sizes.default, "sum": _aten.sum.dim_IntList, "view": _aten.view.default,
}


ArgKey = Union[int, str, Tuple[int, int]]


def is_aten(node: Node) -> bool:
    """Whether ``node`` is an ATen op (a graph captured with ``torch.export``)."""
    return isinstance(node.target, torch._ops.OpOverload)


def emit(graph: torch.fx.Graph, fn: Union[Callable, str], args: tuple, kwargs: Optional[dict] = None,
         aten: bool = False) -> Node:
    """Insert ``fn(*args, **kwargs)`` (a function, or a ``Tensor`` method named by a string), as
    its ATen overload when ``aten``: ``sum`` / ``view`` take their keyword ``keepdim`` and sizes
    positionally there (``aten.sum.dim_IntList(x, dims, keepdim)``, ``aten.view(x, sizes)``)."""
    kwargs = dict(kwargs or {})
    if aten and fn in _ATEN_OF:
        if fn in ("sum", torch.sum):
            args = (args[0], list(args[1]), kwargs.pop("keepdim", False))
        elif fn == "view":
            args = (args[0], list(args[1:]))
        return graph.call_function(_ATEN_OF[fn], tuple(args), kwargs)
    if isinstance(fn, str):
        return graph.call_method(fn, tuple(args), kwargs)
    return graph.call_function(fn, tuple(args), kwargs)


def input_of(node: Node, arg: ArgKey):
    """Positional argument ``arg`` (int), keyword argument ``arg`` (str), or item ``j`` of the list
    argument ``i`` (``arg == (i, j)``: ``aten.einsum(equation, [x, y])``) of ``node``."""
    return pick_input(node.args, node.kwargs, arg)


def pick_input(args, kwargs, arg: ArgKey):
    """What :func:`input_of` picks, from an ``(args, kwargs)`` pair: a node's, or the values an
    ``Interpreter`` fetched for them."""
    if isinstance(arg, tuple):
        return args[arg[0]][arg[1]]
    return args[arg] if isinstance(arg, int) else kwargs[arg]


def replace_input(node: Node, arg: ArgKey, new: Node) -> None:
    """Make ``node`` read ``new`` in place of its argument ``arg``."""
    if isinstance(arg, tuple):
        items = list(node.args[arg[0]])
        items[arg[1]] = new
        args = list(node.args)
        args[arg[0]] = items
        node.args = tuple(args)
    elif isinstance(arg, int):
        args = list(node.args)
        args[arg] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, arg: new}


def scale_input(gm: torch.fx.GraphModule, node: Node, arg: ArgKey, axis: int, values: torch.Tensor,
                buffer: str, op=torch.mul) -> Node:
    """Make ``node`` read ``x * values`` (``values`` along ``axis``) in place of its argument ``x``
    (``op=torch.add``: ``x + values``, a logit gate's ``log(keep)``).

    ``values`` becomes the buffer ``buffer`` of ``gm``, shaped to broadcast along ``axis``.
    """
    x = input_of(node, arg)
    shape = [1] * len(x.meta["tensor_meta"].shape)
    shape[axis] = -1
    gm.register_buffer(buffer, values.reshape(shape))
    with gm.graph.inserting_before(node):
        scaled = emit(gm.graph, op, (x, gm.graph.get_attr(buffer)), aten=is_aten(node))
    replace_input(node, arg, scaled)
    return scaled
