"""Transform: put trainable gates where channels are consumed.

``insert_gates(gm, dg, hfp)`` adds the ``hfp`` module (an :class:`hfp_fx.hfp.HFPState`) to a
copy of the traced model, computes the effective gate vector once at the top of ``forward``,
and applies the gate values of every channel-mixing input (the gate sites of the channel
analysis).  Where the consumer is a plain ``Conv1d/2d/3d`` or ``Linear`` whose weight slices
multiply exactly the gated positions, the gate scales that weight, ``conv(x, W * g)``, which
equals ``conv(x * g, W)`` and costs a pass over the (small) weight instead of the (large)
activation, forward and backward.  Elsewhere the input itself is multiplied.  Fixed channels
read the constant 1 at index 0 of the vector.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> prepared = hfp_fx.prepare(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), target="50%")
    >>> "self.hfp()" in prepared.code
    True
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import List, Optional

import torch
import torch.fx
import torch.nn.functional as F

from hfp_fx.passes.edit import input_of, replace_input

__all__ = ["insert_gates", "SiteGate"]


class SiteGate(torch.nn.Module):
    """Multiply ``x`` along ``axis`` by ``vector[index]`` (one entry per channel position)."""

    def __init__(self, index: torch.Tensor, axis: int, rank: int):
        super().__init__()
        self.register_buffer("index", index.clone(), persistent=False)
        shape = [1] * rank
        shape[axis] = -1
        self.shape: List[int] = shape

    def forward(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return x * vector.index_select(0, self.index).view(self.shape).to(x.dtype)


_WEIGHT_GATED = {torch.nn.Conv1d: F.conv1d, torch.nn.Conv2d: F.conv2d, torch.nn.Conv3d: F.conv3d,
                 torch.nn.Linear: F.linear}


def _weight_gate_dim(gm: torch.fx.GraphModule, node: torch.fx.Node, site, size: int) -> Optional[int]:
    """The dim of the consumer's weight that can carry this site's gate, if any."""
    if node.op != "call_module" or site.weight is None or site.arg not in (0, "input"):
        return None
    module = gm.get_submodule(node.target)
    if type(module) not in _WEIGHT_GATED or getattr(module, "padding_mode", "zeros") != "zeros":
        return None
    name, dim = site.weight
    if name != f"{node.target}.weight" or module.weight.shape[dim] != size:
        return None
    return dim


def _gate_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, site_module: str, vector: torch.fx.Node) -> None:
    """Replace ``module(x)`` by the functional op on the gated weight."""
    module = gm.get_submodule(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.call_module(site_module, (graph.get_attr(f"{node.target}.weight"), vector))
        bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        x = node.args[0] if node.args else node.kwargs["input"]
        if isinstance(module, torch.nn.Linear):
            call = graph.call_function(F.linear, (x, weight, bias))
        else:
            call = graph.call_function(_WEIGHT_GATED[type(module)], (x, weight, bias, module.stride,
                                                                    module.padding, module.dilation, module.groups))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def insert_gates(dg, hfp: torch.nn.Module) -> torch.fx.GraphModule:
    gm = copy.deepcopy(dg.gm)
    gm.add_submodule("hfp", hfp)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
    with graph.inserting_after(anchor):
        vector = graph.call_module("hfp", ())
    sites_of = Counter(site.node for site in dg.facts.gates)
    for site in dg.facts.gates:
        index = hfp.vector_index(site.ids)
        if bool((index == 0).all()):
            continue  # every channel here is fixed
        node = nodes[site.node]
        name = site.name
        dim = _weight_gate_dim(gm, node, site, index.numel()) if sites_of[site.node] == 1 else None
        if dim is not None:
            weight = gm.get_submodule(node.target).weight
            hfp.sites.add_module(name, SiteGate(index, dim, weight.dim()))
            _gate_weight(gm, node, f"hfp.sites.{name}", vector)
            continue
        arg = input_of(node, site.arg)
        rank = len(arg.meta["tensor_meta"].shape)
        hfp.sites.add_module(name, SiteGate(index, site.axis, rank))
        with graph.inserting_before(node):
            gated = graph.call_module(f"hfp.sites.{name}", (arg, vector))
        replace_input(node, site.arg, gated)
    graph.lint()
    gm.recompile()
    return gm
