"""Small graph-editing helpers shared by the passes."""
from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.fx
from torch.fx.node import Node

__all__ = ["input_of", "pick_input", "replace_input", "scale_input"]


ArgKey = Union[int, str, Tuple[int, int]]


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
        scaled = gm.graph.call_function(op, (x, gm.graph.get_attr(buffer)))
    replace_input(node, arg, scaled)
    return scaled
