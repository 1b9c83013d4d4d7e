"""Depth passes: zero (reference) or remove (rewrite) residual branches found by
:func:`hfp_fx.analysis.depth.find_depth_units`.

``mask_units`` multiplies each removed branch's output by 0 before its add (the model keeps
every shape: what the removal must equal); ``remove_units`` reroutes the add's readers to the
stream, deletes the branch's nodes and the parameters and submodules nothing reads anymore.

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), x)
    >>> unit = next(u for u in dg.depth_units if u.removable)
    >>> small = hfp_fx.shrink(dg, keep={unit.id: False})
    >>> torch.allclose(small(x), hfp_fx.mask(dg, keep={unit.id: False})(x), atol=1e-5)
    True
"""
from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx

from hfp_fx.passes.edit import emit, is_aten

__all__ = ["mask_units", "remove_units", "drop_unused_state"]


def mask_units(gm: torch.fx.GraphModule, units: Iterable) -> torch.fx.GraphModule:
    """In place: each unit's branch output enters its add multiplied by 0."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for unit in units:
        add, output = nodes[unit.add], nodes[unit.output]
        with gm.graph.inserting_before(add):
            zero = emit(gm.graph, operator.mul, (output, 0.0), aten=is_aten(add))
        zero.meta = dict(output.meta)
        add.replace_input_with(output, zero)
    gm.graph.lint()
    gm.recompile()
    return gm


def remove_units(gm: torch.fx.GraphModule, units: Iterable, drop_state: bool = True) -> torch.fx.GraphModule:
    """In place: the readers of each unit's add read its skip input; the branch is deleted, and
    with ``drop_state`` the parameters and submodules nothing reads anymore (the shrink pass,
    which slices by parameter name, drops them itself after slicing)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    stands_for = {}  # a removed add is another unit's stream: it stands for its own skip then

    def resolve(name: str):
        while name in stands_for:
            name = stands_for[name]
        return nodes[name]

    for unit in units:
        add, skip = nodes.pop(unit.add), resolve(unit.skip)
        add.replace_all_uses_with(skip)
        gm.graph.erase_node(add)
        stands_for[unit.add] = skip.name
        for name in reversed(unit.nodes):
            node = nodes.get(name)
            if node is not None and not node.users and node.graph is gm.graph:
                gm.graph.erase_node(node)
                nodes.pop(name)
    for node in list(gm.graph.nodes):  # parameters only the branches read (exported graphs)
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    if drop_state:
        drop_unused_state(gm)
    gm.recompile()
    return gm


def drop_unused_state(gm: torch.fx.GraphModule) -> None:
    """Delete the submodules, parameters and buffers no node reads anymore."""
    gm.delete_all_unused_submodules()
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, _ in named:
        parts = name.split(".")
        if any(".".join(parts[:k]) in used for k in range(1, len(parts) + 1)):
            continue
        owner = gm.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else gm
        if hasattr(owner, parts[-1]):
            delattr(owner, parts[-1])
