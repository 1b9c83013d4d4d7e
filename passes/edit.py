"""Small graph-editing helpers shared by the passes."""
from __future__ import annotations

from typing import Union

from torch.fx.node import Node

__all__ = ["input_of", "replace_input"]


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
