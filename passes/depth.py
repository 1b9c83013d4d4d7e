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

__all__ = ["mask_units", "remove_units", "drop_unused_state", "gate_units", "scale_units"]


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


def remove_units(gm: torch.fx.GraphModule, units: Iterable) -> torch.fx.GraphModule:
    """In place: the readers of each unit's add read its skip input; the branch's nodes are
    deleted (its parameters stay until :func:`drop_unused_state`: the shrink pass, which runs
    this with ``shrink_model(removed=)``, slices tensors by name first)."""
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


def gate_units(gm: torch.fx.GraphModule, units: Iterable, vector: torch.fx.Node, positions: Iterable[int]) -> None:
    """In place: each unit's branch output enters its add multiplied by entry ``positions[i]``
    of the gate vector ``vector`` (HFP's depth gates)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for unit, pos in zip(units, positions):
        add, output = nodes[unit.add], nodes[unit.output]
        with gm.graph.inserting_before(add):
            gate = gm.graph.call_function(operator.getitem, (vector, pos))
            scaled = emit(gm.graph, operator.mul, (output, gate), aten=is_aten(add))
        scaled.meta = dict(output.meta)
        add.replace_input_with(output, scaled)
    gm.graph.lint()
    gm.recompile()


_LINEAR_FUNCTIONS = {torch.nn.functional.linear, torch.ops.aten.linear.default}
_FOLDABLE_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _fold(gm: torch.fx.GraphModule, node: torch.fx.Node, factor: float) -> bool:
    """Multiply the weight and bias of the layer ``node`` (a linear or conv read by ``node``
    alone) by ``factor``: its output scales by it.  ``False`` when ``node`` is no such layer."""
    if len(node.users) != 1:
        return False
    tensors = []
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, _FOLDABLE_MODULES) or \
                sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
            return False
        tensors = [t for t in (module.weight, module.bias) if t is not None]
    elif node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        for arg in node.args[1:3]:
            if arg is None:
                continue
            if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and len(arg.users) == 1):
                return False
            owner, _, attr = str(arg.target).rpartition(".")
            tensors.append(getattr(gm.get_submodule(owner) if owner else gm, attr))
    else:
        return False
    with torch.no_grad():
        for t in tensors:
            t.mul_(factor)
    return True


def scale_units(gm: torch.fx.GraphModule, scales: Iterable, fold: bool = True) -> dict:
    """In place: ``(unit, factor)``: the unit's branch enters its add times the constant ``factor``
    (a trained depth gate kept by ``finalize``), folded into the branch's last layer where it is
    a linear or conv layer of its own (so a Hugging Face decoder keeps its config), else a
    multiplication by the constant.  Returns ``{unit id: factor}`` of the multiplications (what a
    saved plan must record: the folded factors live in the weights)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inserted = {}
    for unit, factor in scales:
        add = nodes[unit.add]
        branch = next((a for a in add.args[:2] if isinstance(a, torch.fx.Node) and a.name == unit.output), None)
        if branch is None:  # the shrink pass rewrote the branch's last node: the input that is not the skip
            branch = next(a for a in add.args[:2] if isinstance(a, torch.fx.Node) and a.name != unit.skip)
        if fold and _fold(gm, branch, factor):
            continue
        with gm.graph.inserting_before(add):
            scaled = emit(gm.graph, operator.mul, (branch, float(factor)), aten=is_aten(add))
        scaled.meta = dict(branch.meta)
        add.replace_input_with(branch, scaled)
        inserted[unit.id] = float(factor)
    gm.graph.lint()
    gm.recompile()
    return inserted
