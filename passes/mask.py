"""The reference semantics: zero the removed channels at every place they are consumed.

``apply_masks(dg, alive)`` returns a copy of the traced model with the same shapes in which each
channel-mixing consumer (conv, linear, matmul) no longer sees the removed channels: their
weight slices are zeroed where the consumer has a weight, otherwise a ``x * mask`` node is
inserted in front of it.  This equals the model with those channels' gates at zero, and it is
what :func:`hfp_fx.passes.shrink.shrink_model` must reproduce with smaller tensors.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), x)
    >>> g = dg.prunable_groups[0]
    >>> masked = apply_masks(dg, dg.alive({g.id: range(g.channels // 2)}))
"""
from __future__ import annotations

import copy

import torch
import torch.fx

from hfp_fx.passes.edit import input_of, replace_input

__all__ = ["apply_masks"]


def apply_masks(dg, alive: torch.Tensor) -> torch.fx.GraphModule:
    gm = copy.deepcopy(dg.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    state = dict(gm.named_parameters(remove_duplicate=False))
    state.update(dict(gm.named_buffers(remove_duplicate=False)))
    count = 0
    device = next((t.device for t in state.values()), torch.device("cpu"))
    for site in dg.facts.gates:
        keep = alive[site.ids]
        if bool(keep.all()):
            continue
        if site.weight is not None:
            name, dim = site.weight
            with torch.no_grad():
                w = state[name]
                shape = [1] * w.dim()
                shape[dim] = -1
                w.mul_(keep.to(device=w.device, dtype=w.dtype).reshape(shape))
            continue
        node = nodes[site.node]
        arg = input_of(node, site.arg)
        rank = len(arg.meta["tensor_meta"].shape)
        shape = [1] * rank
        shape[site.axis] = -1
        buf = f"_hfp_mask_{count}"
        count += 1
        gm.register_buffer(buf, keep.to(device=device, dtype=arg.meta["tensor_meta"].dtype).reshape(shape))
        with gm.graph.inserting_before(node):
            getter = gm.graph.get_attr(buf)
            gated = gm.graph.call_function(torch.mul, (arg, getter))
        replace_input(node, site.arg, gated)
    gm.recompile()
    return gm
