"""The reference semantics: zero the removed channels at every place they are consumed.

``apply_masks(facts, alive)`` returns a copy of the traced model with the same shapes in which each
channel-mixing consumer (conv, linear, matmul) no longer sees the removed channels: their
weight slices are zeroed where the consumer has a weight, otherwise a ``x * mask`` node is
inserted in front of it.  This equals the model with those channels' gates at zero, and it is
what :func:`hfp_fx.passes.shrink.shrink_model` must reproduce with smaller tensors.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), x)
    >>> g = dg.prunable_groups[0]
    >>> masked = apply_masks(dg.facts, dg.alive({g.id: range(g.channels // 2)}))
"""
from __future__ import annotations


import torch
import torch.fx

from hfp_fx.passes.channel_analysis import ChannelFacts
from hfp_fx.passes.edit import input_of, scale_input
from hfp_fx.capture.copies import editable_copy

__all__ = ["apply_masks"]


def apply_masks(facts: ChannelFacts, alive: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of the traced model in which the channels not ``alive`` (one bool per element)
    contribute nothing at any gate site (are multiplied by 0, or set to ``-inf`` at a softmax's
    ``"logit"`` site)."""
    gm = editable_copy(facts.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    state = dict(gm.named_parameters(remove_duplicate=False))
    state.update(dict(gm.named_buffers(remove_duplicate=False)))
    device = next((t.device for t in state.values()), torch.device("cpu"))
    for site in facts.gates:
        keep = alive[site.ids]
        if bool(keep.all()):
            continue
        if site.weight is not None and site.kind == "scale":
            name, dim = site.weight
            with torch.no_grad():
                w = state[name]
                shape = [1] * w.dim()
                shape[dim] = -1
                w.mul_(keep.to(device=w.device, dtype=w.dtype).reshape(shape))
            continue
        node = nodes[site.node]
        dtype = input_of(node, site.arg).meta["tensor_meta"].dtype
        values = keep.to(device=device, dtype=dtype)
        if site.kind == "logit":  # removed logits at -inf: log(0)
            scale_input(gm, node, site.arg, site.axis, values.log(), f"_hfp_mask_{site.name}", op=torch.add)
        else:
            scale_input(gm, node, site.arg, site.axis, values, f"_hfp_mask_{site.name}")
    gm.recompile()
    return gm
