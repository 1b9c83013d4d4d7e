"""Small graph-editing helpers shared by the passes."""
from __future__ import annotations

from typing import Union

import torch
import torch.fx
from torch.fx.node import Node

__all__ = ["input_of", "replace_input", "scale_input"]


def input_of(node: Node, arg: Union[int, str]):
    """Positional argument ``arg`` (int) or keyword argument ``arg`` (str) of ``node``."""
    return node.args[arg] if isinstance(arg, int) else node.kwargs[arg]


def replace_input(node: Node, arg: Union[int, str], new: Node) -> None:
    """Make ``node`` read ``new`` in place of its argument ``arg``."""
    if isinstance(arg, int):
        args = list(node.args)
        args[arg] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, arg: new}


def scale_input(gm: torch.fx.GraphModule, node: Node, arg: Union[int, str], axis: int, values: torch.Tensor,
                buffer: str) -> Node:
    """Make ``node`` read ``x * values`` (``values`` along ``axis``) in place of its argument ``x``.

    ``values`` becomes the buffer ``buffer`` of ``gm``, shaped to broadcast along ``axis``.
    """
    x = input_of(node, arg)
    shape = [1] * len(x.meta["tensor_meta"].shape)
    shape[axis] = -1
    gm.register_buffer(buffer, values.reshape(shape))
    with gm.graph.inserting_before(node):
        scaled = gm.graph.call_function(torch.mul, (x, gm.graph.get_attr(buffer)))
    replace_input(node, arg, scaled)
    return scaled
