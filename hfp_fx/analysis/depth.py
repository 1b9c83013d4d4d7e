"""Depth units: residual branches ``y = x + f(x)`` that can be removed whole.

A branch ``f`` whose output reaches the residual stream ``x`` only through one add is a unit of
depth: removing it is exact (``y = x``), and the masked reference is ``x + f(x) * 0``.  A
transformer layer holds two (attention and MLP), a ResNet bottleneck or an inverted residual
one.  The search is structural, on the captured graph, in either dialect:

* the add's two inputs have the output's shape (no broadcasting), one of them (the *skip*) is
  read by the other's computation (the *branch*): the branch is every node after the skip, in
  graph order, that the branch's output needs (earlier nodes, such as rotary tables or masks
  made once for every layer, are inputs to it, not part of it);
* nothing inside the branch is read outside it, and it holds parameters or MACs.

Adds that look like a block but fail a condition are listed too, not removable, with the
reason (a projection shortcut, a branch read elsewhere).

    >>> import torch, torchvision, hfp_fx
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> units = dg.depth_units
    >>> [u.name for u in units if u.removable][:3], sum(u.removable for u in units)
    (['layer1.0', 'layer1.1', 'layer2.1'], 5)
    >>> next(u.reason for u in units if not u.removable)
    'a projection shortcut: neither input of the add is read by the other'
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx
from torch.fx.node import Node

__all__ = ["DepthUnit", "find_depth_units"]

_ADDS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}


@dataclass(frozen=True)
class DepthUnit:
    """One residual branch: ``add = skip + output``, ``output`` computed by ``nodes``."""

    id: str  #: ``"d0"``, ``"d1"``, ... in graph order
    name: str  #: the branch's module path (the deepest module holding all its nodes)
    add: str  #: the residual add node
    skip: str  #: the stream node the branch reads and is added to
    output: str  #: the branch's last node
    nodes: Tuple[str, ...]  #: the branch's nodes (graph order)
    params: int  #: parameters read by the branch alone
    macs: int  #: multiply-accumulates of the branch's nodes
    removable: bool = True
    reason: Optional[str] = None  #: why not, for a unit that is not removable
    param_names: Tuple[str, ...] = ()  #: the parameters read by the branch alone (every alias)


def _is_add(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS and node.kwargs.get("alpha", 1) == 1
    return node.op == "call_method" and node.target in _ADD_METHODS and node.kwargs.get("alpha", 1) == 1


def _shape(node) -> Optional[torch.Size]:
    tm = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return getattr(tm, "shape", None)


def _module_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [entry[0] if isinstance(entry, tuple) else entry for entry in stack.values()]
    if node.op == "call_module":
        paths.append(str(node.target))
    return paths[-1] if paths else ""


def _common_module(nodes: List[Node]) -> str:
    paths = [_module_path(n).split(".") for n in nodes
             if n.op in ("call_module", "call_function", "call_method") and _module_path(n)]
    if not paths:
        return ""
    prefix = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(prefix), len(p)) and prefix[k] == p[k]:
            k += 1
        prefix = prefix[:k]
    return ".".join(prefix)


def _child_name(branch: List[Node]) -> str:
    """Where a block holds two branches (a transformer layer's attention and MLP): the child of
    the deepest module holding the branch that has the most of its MACs."""
    common = _common_module(branch)
    depth = len(common.split(".")) if common else 0
    macs: Dict[str, int] = {}
    for n in branch:
        parts = _module_path(n).split(".")
        if len(parts) > depth and n.op in ("call_module", "call_function", "call_method") and _module_path(n):
            child = ".".join(parts[:depth + 1])
            macs[child] = macs.get(child, 0) + int(n.meta.get("macs", 0) or 0)
    if not macs or len(macs) == 1:
        return common
    return max(macs, key=macs.get)


def _branch(skip: Node, output: Node, position: Dict[Node, int]) -> Tuple[Optional[List[Node]], bool]:
    """Nodes after ``skip`` that ``output`` needs (and whether it reads ``skip``)."""
    start = position[skip]
    seen: Set[Node] = set()
    reads_skip = False
    todo = [output]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in n.all_input_nodes:
            if a is skip:
                reads_skip = True
            elif position[a] > start and a.op != "placeholder":
                todo.append(a)
    return sorted(seen, key=position.__getitem__), reads_skip


def _weighted(gm: torch.fx.GraphModule, node: Node) -> bool:
    """A layer with weights: a module call with parameters, or an op reading a parameter."""
    if node.op == "call_module":
        return any(True for _ in gm.get_submodule(node.target).parameters())
    return node.op in ("call_function", "call_method") and any(a.op == "get_attr" for a in node.all_input_nodes)


def _parameters_read(gm: torch.fx.GraphModule) -> Dict[int, Tuple[int, Set[Node]]]:
    """Every parameter: ``id -> (numel, the call nodes that read it)`` (a module's call reads
    its parameters; a ``get_attr``'s readers are its users)."""
    found: Dict[int, Tuple[int, Set[Node]]] = {}

    def add(t, reader):
        if isinstance(t, torch.nn.Parameter):
            found.setdefault(id(t), (t.numel(), set()))[1].add(reader)

    for n in gm.graph.nodes:
        if n.op == "get_attr":
            owner, _, attr = str(n.target).rpartition(".")
            t = getattr(gm.get_submodule(owner) if owner else gm, attr, None)
            for user in n.users:
                add(t, user)
        elif n.op == "call_module":
            for t in gm.get_submodule(n.target).parameters():
                add(t, n)
    return found


def find_depth_units(gm: torch.fx.GraphModule) -> List[DepthUnit]:
    """Every residual add of ``gm`` that has the shape of a block, removable or not (with why)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    parameters = _parameters_read(gm)
    named = list(gm.named_parameters(remove_duplicate=False))
    units: List[DepthUnit] = []
    branches: Dict[str, List[Node]] = {}
    for add in nodes:
        if not _is_add(add) or len(add.args) < 2:
            continue
        a, b = add.args[0], add.args[1]
        shape = _shape(add)
        if not (isinstance(a, Node) and isinstance(b, Node)) or shape is None or _shape(a) != shape \
                or _shape(b) != shape:
            continue
        found = None
        for skip, output in ((a, b), (b, a)):
            if position[output] > position[skip] and output.op not in ("placeholder", "get_attr"):
                branch, reads_skip = _branch(skip, output, position)
                if reads_skip:
                    found = (skip, output, branch)
                    break
        reason = None
        if found is None:
            if all(_weighted(gm, n) for n in (a, b)):  # two layers' outputs: a projection shortcut
                found = (None, a if position[a] > position[b] else b, [])
                reason = "a projection shortcut: neither input of the add is read by the other"
            else:
                continue
        skip, output, branch = found
        inside = set(branch)
        if reason is None:
            outside = next((n for n in branch for u in n.users if u not in inside and u is not add), None)
            if outside is not None:
                reason = f"`{outside.name}` inside the branch is read outside it"
            elif len(output.users) != 1:
                reason = f"the branch's output `{output.name}` is read outside the add"
        own = {key for key, (size, readers) in parameters.items() if readers and readers <= inside}
        params = sum(parameters[key][0] for key in own)
        own_names = tuple(name for name, p in named if id(p) in own)
        macs = int(sum(n.meta.get("macs", 0) or 0 for n in branch))
        if reason is None and params == 0 and macs == 0:
            continue  # ``x + x * 0.5``: nothing to remove
        name = _common_module(branch) if branch else _module_path(add)
        units.append(DepthUnit(f"d{len(units)}", name, add.name,
                               skip.name if skip is not None else "", output.name, tuple(n.name for n in branch),
                               int(params), macs, reason is None, reason, own_names))
        branches[units[-1].id] = branch
    names = [u.name for u in units]
    return [dataclasses.replace(u, name=_child_name(branches[u.id])) if names.count(u.name) > 1 else u
            for u in units]
