"""Transform: write layers that cannot take pruned shapes out as plain ops, before the analysis.

Some layers tie widths together that pruning separates: ``nn.MultiheadAttention`` has one
``embed_dim`` for its query input, its heads and its output.  Their handlers' ``decompose(gm,
node)`` replaces such a call by the equivalent ``F.linear`` / ``F.scaled_dot_product_attention``
/ reshape ops, reading the module's own parameters (``get_attr``), so the state dict keeps its
names and every later pass -- analysis, gates, mask, shrink -- sees ops it already handles.  The
new nodes inherit the call's ``nn_module_stack`` plus the module itself, so rules that read
module attributes (``num_heads``) find them.  Shapes are propagated again afterwards.

Example::

    >>> import torch, hfp_fx
    >>> from hfp_fx.capture.tracing import trace
    >>> from hfp_fx.capture.shapes import propagate_shapes
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    ...     def forward(self, x):
    ...         return self.mha(x, x, x, need_weights=False)[0]
    >>> x = torch.randn(1, 3, 8)
    >>> gm = trace(Block(), (x,)).graph_module
    >>> propagate_shapes(gm, (x,))
    >>> decompose(gm, (x,))
    1
    >>> "scaled_dot_product_attention" in gm.code
    True
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.fx

from hfp_fx.passes.registry import DEFAULT_RULES, OpRegistry
from hfp_fx.capture.shapes import propagate_shapes

__all__ = ["decompose"]


def decompose(gm: torch.fx.GraphModule, example_inputs: Tuple[torch.Tensor, ...],
              rules: Optional[OpRegistry] = None) -> int:
    """Decompose every call whose handler asks for it; return how many were decomposed."""

    rules = rules if rules is not None else DEFAULT_RULES
    done = 0
    before = {n.name for n in gm.graph.nodes}
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        handler = rules.lookup_module(gm.get_submodule(node.target))
        if handler is not None and handler.decompose is not None and handler.decompose(gm, node):
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
        # the nodes the handlers wrote; the rest keep their shapes (one meta run, no other op run)
        propagate_shapes(gm, example_inputs, rules, only={n.name for n in gm.graph.nodes} - before)
    return done
