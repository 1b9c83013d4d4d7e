"""Transform: put trainable gates where channels are consumed.

``insert_gates(gm, dg, hfp)`` adds the ``hfp`` module (an :class:`hfp_fx.hfp.HFPState`) to a
copy of the traced model, computes the effective gate vector once at the top of ``forward``,
and multiplies every channel-mixing input (the gate sites of the channel analysis) by the gate
values of its channels.  Fixed channels read the constant 1 at index 0 of the vector.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> prepared = hfp_fx.prepare(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), target="50%")
    >>> "self.hfp()" in prepared.code
    True
"""
from __future__ import annotations

import copy
from typing import List

import torch
import torch.fx

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


def insert_gates(dg, hfp: torch.nn.Module) -> torch.fx.GraphModule:
    gm = copy.deepcopy(dg.gm)
    gm.add_submodule("hfp", hfp)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
    with graph.inserting_after(anchor):
        vector = graph.call_module("hfp", ())
    for k, site in enumerate(dg.facts.gates):
        index = hfp.vector_index(site.ids)
        if bool((index == 0).all()):
            continue  # every channel here is fixed
        node = nodes[site.node]
        arg = input_of(node, site.arg)
        rank = len(arg.meta["tensor_meta"].shape)
        name = f"site{k}"
        hfp.sites.add_module(name, SiteGate(index, site.axis, rank))
        with graph.inserting_before(node):
            gated = graph.call_module(f"hfp.sites.{name}", (arg, vector))
        replace_input(node, site.arg, gated)
    graph.lint()
    gm.recompile()
    return gm
