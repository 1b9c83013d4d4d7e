"""Transform: put trainable gates where channels are consumed.

``insert_gates(facts, hfp)`` adds the ``hfp`` module (an :class:`hfp_fx.train.hfp.HFPState`) to a
copy of the traced model, computes the effective gate vector once at the top of ``forward``,
and applies the gate values of every channel-mixing input (the gate sites of the channel
analysis).  Where the consumer is a layer whose handler has a ``gated_call`` (plain
``Conv1d/2d/3d``, ``Linear``) and whose weight slices multiply exactly the gated positions, the
gate scales that weight, ``conv(x, W * g)``, which equals ``conv(x * g, W)`` and costs a pass
over the (small) weight instead of the (large) activation, forward and backward.  Elsewhere the
input itself is multiplied.  Fixed channels read the constant 1 at index 0 of the vector.
Gate modules are named after their site (``hfp.sites.<consumer node>_<argument>``).

Example::

    >>> import torch, torchvision, hfp_fx
    >>> prepared = hfp_fx.prepare(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64), target="50%")
    >>> "self.hfp()" in prepared.code
    True
"""
from __future__ import annotations

from collections import Counter
from typing import List

import torch
import torch.fx

from hfp_fx.passes.channel_analysis import ChannelFacts
from hfp_fx.passes.edit import input_of, replace_input
from hfp_fx.capture.copies import editable_copy

__all__ = ["insert_gates", "SiteGate"]


class SiteGate(torch.nn.Module):
    """Multiply ``x`` along ``axis`` by ``vector[index]`` (one entry per channel position), or at
    a softmax's logits (``logit=True``) add its log: ``softmax(x + log g)`` weighs each channel's
    share by ``g``, and a gate at 0 removes it."""

    def __init__(self, index: torch.Tensor, axis: int, rank: int, logit: bool = False):
        super().__init__()
        self.register_buffer("index", index.clone(), persistent=False)
        shape = [1] * rank
        shape[axis] = -1
        self.shape: List[int] = shape
        self.logit = logit

    def forward(self, x: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        g = vector.index_select(0, self.index).view(self.shape).to(x.dtype)
        if self.logit:  # log(0) -> the dtype's most negative finite log: no 0 * inf in the backward
            return x + torch.log(g.clamp_min(torch.finfo(g.dtype).tiny))
        return x * g


def _weight_gated_call(gm: torch.fx.GraphModule, facts: ChannelFacts, node: torch.fx.Node, site, size: int):
    """``(functional op, extra args, weight dim)`` when this site's gate can scale the consumer's weight."""
    if node.op != "call_module" or site.weight is None or site.arg not in (0, "input"):
        return None
    module = gm.get_submodule(node.target)
    handler = facts.rules.lookup_module(module)
    call = handler.gated_call(module) if handler is not None and handler.gated_call is not None else None
    name, dim = site.weight
    if call is None or name != f"{node.target}.weight" or module.weight.shape[dim] != size:
        return None
    return (*call, dim)


def _weight_argument(gm: torch.fx.GraphModule, params, node: torch.fx.Node, site, size: int):
    """``(argument position, parameter name, weight dim, weight rank)`` when a functional consumer
    (an exported graph's ``aten.linear``, ``aten.conv2d``, ``aten.addmm``) reads the site's weight
    as a ``get_attr`` argument: its gate can scale that weight instead of the activation.
    ``params``: ``gm``'s parameters by every name (tied aliases included)."""
    if node.op != "call_function" or site.weight is None or site.kind != "scale":
        return None
    name, dim = site.weight
    param = params.get(name)
    for pos, arg in enumerate(node.args):
        if param is not None and isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            owner, _, attr = str(arg.target).rpartition(".")
            tensor = getattr(gm.get_submodule(owner) if owner else gm, attr)
            if tensor is param and tensor.dim() > dim and tensor.shape[dim] == size:
                return pos, str(arg.target), dim, tensor.dim()
    return None


def _gate_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, site_module: str, vector: torch.fx.Node,
                 fn, extra) -> None:
    """Replace ``module(x)`` by ``fn(x, gated weight, bias, *extra)``."""
    module = gm.get_submodule(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.call_module(site_module, (graph.get_attr(f"{node.target}.weight"), vector))
        bias = graph.get_attr(f"{node.target}.bias") if getattr(module, "bias", None) is not None else None
        x = node.args[0] if node.args else node.kwargs["input"]
        call = graph.call_function(fn, (x, weight, bias, *extra))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)


def insert_gates(facts: ChannelFacts, hfp: torch.nn.Module) -> torch.fx.GraphModule:
    """A copy of the traced model of ``facts`` that applies ``hfp``'s gates at every gate site."""
    gm = editable_copy(facts.gm)
    gm.add_submodule("hfp", hfp)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
    with graph.inserting_after(anchor):
        vector = graph.call_module("hfp", ())
    sites_of = Counter(site.node for site in facts.gates)
    params = dict(gm.named_parameters(remove_duplicate=False))  # once, not per site
    for site in facts.gates:
        index = hfp.vector_index(site.ids)
        if bool((index == 0).all()):
            continue  # every channel here is fixed
        node = nodes[site.node]
        name = site.name
        gated = (_weight_gated_call(gm, facts, node, site, index.numel())
                 if sites_of[site.node] == 1 and site.kind == "scale" else None)
        if gated is not None:
            fn, extra, dim = gated
            weight = gm.get_submodule(node.target).weight
            hfp.sites.add_module(name, SiteGate(index, dim, weight.dim()))
            _gate_weight(gm, node, f"hfp.sites.{name}", vector, fn, extra)
            continue
        found = _weight_argument(gm, params, node, site, index.numel()) if sites_of[site.node] == 1 else None
        if found is not None:  # a functional layer: gate its weight argument (its own get_attr)
            pos, target, dim, rank = found
            hfp.sites.add_module(name, SiteGate(index, dim, rank))
            with graph.inserting_before(node):
                weight = graph.call_module(f"hfp.sites.{name}", (graph.get_attr(target), vector))
            replace_input(node, pos, weight)
            continue
        arg = input_of(node, site.arg)
        rank = len(arg.meta["tensor_meta"].shape)
        hfp.sites.add_module(name, SiteGate(index, site.axis, rank, logit=site.kind == "logit"))
        with graph.inserting_before(node):
            gated = graph.call_module(f"hfp.sites.{name}", (arg, vector))
        replace_input(node, site.arg, gated)
    graph.lint()
    gm.recompile()
    return gm
