"""``nn.MultiheadAttention``: decomposed into plain ops, so heads and channels prune exactly.

The module ties its query input width, its inner width (heads x head_dim) and its output width to
one ``embed_dim``, so it cannot take pruned shapes.  Before the analysis, its handler writes each
call out as the ops it computes (:mod:`hfp_fx.passes.decompose`)::

    q, k, v = split(F.linear(x, in_proj_weight, in_proj_bias), E)     # or three projections
    q = q.unflatten(-1, (num_heads, head_dim)).transpose(-3, -2)      # (batch, heads, tokens, d)
    o = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale=head_dim ** -0.5)
    out = F.linear(o.transpose(-3, -2).flatten(-2), out_proj.weight, out_proj.bias)

reading the module's own parameters.  The generic rules then do the rest: the ``unflatten``
splits the projection's rows into whole heads (the ``num_heads`` hint), SDPA unites the query,
key and value heads, the projections' columns follow the input channels, and the shrink pass
rewrites the split sizes and ``unflatten`` literals.  The scale stays the original
``1 / sqrt(head_dim)``: heads go whole, so ``head_dim`` never changes.

Calls the ops cannot reproduce stay one node and keep their channels fixed, with the reason:
attention weights that are read (they average over the heads), ``bias_k``/``bias_v``,
``add_zero_attn``, per-head 3-d masks, both masks at once, and cross-attention through the
packed ``in_proj_weight`` (the three projections would each need a slice of one parameter).

Example::

    >>> import torch, hfp_fx
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.mha = torch.nn.Linear(4, 16), torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ...     def forward(self, x):
    ...         x = self.inp(x)
    ...         return self.mha(x, x, x, need_weights=False)[0]
    >>> dg = hfp_fx.dependency_graph(Block(), torch.randn(2, 5, 4))
    >>> sorted(g.channels for g in dg.prunable_groups)  # the 4 heads, the input channels
    [4, 16]
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler
from hfp_fx.spaces import ChannelMap

__all__ = ["multihead_attention", "decompose_multihead_attention"]

A = ChannelAnalysis

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
_MHA_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
                 "is_causal": False}


def _call(node: Node) -> Dict[str, Any]:
    """``nn.MultiheadAttention.forward``'s arguments by name, with their defaults."""
    call = dict(_MHA_DEFAULTS)
    call.update(zip(_MHA_ARGS, node.args))
    call.update(node.kwargs)
    return call


def _rank(value) -> Optional[int]:
    tm = value.meta.get("tensor_meta") if isinstance(value, Node) else None
    return len(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def _blocker(node: Node, mod: torch.nn.MultiheadAttention) -> Optional[str]:
    """Why this call cannot be written out as plain ops (``None``: it can)."""
    call = _call(node)
    what = describe(node, mod)
    if mod.bias_k is not None or mod.add_zero_attn:
        return f"{what} uses bias_k/bias_v or add_zero_attn"
    if any(user.op != "call_function" or user.target is not operator.getitem for user in node.users):
        return f"{what}: its output tuple is used whole"
    if any(user.args[1] != 0 and user.users for user in node.users):
        return f"{what}: its attention weights are read (an average over the heads)"
    q, k, v = call["query"], call["key"], call["value"]
    if mod._qkv_same_embed_dim and not (q is k is v):
        return f"{what}: cross-attention through the packed in_proj_weight is not decomposed"
    masks = [call[name] for name in ("attn_mask", "key_padding_mask") if call[name] is not None]
    if len(masks) > 1:
        return f"{what} with both attn_mask and key_padding_mask"
    if any(not isinstance(m, Node) or _rank(m) is None for m in masks):
        return f"{what} with a mask that is not a traced tensor"
    if call["attn_mask"] is not None and _rank(call["attn_mask"]) != 2:
        return f"{what} with a per-head (3-d) attn_mask"
    if _rank(q) not in (2, 3) or not all(isinstance(x, Node) for x in (q, k, v)):
        return f"{what} with inputs the analysis cannot see"
    return None


def decompose_multihead_attention(gm: torch.fx.GraphModule, node: Node) -> bool:
    """Replace the call by plain ops (module docstring); ``False`` when :func:`_blocker` objects."""
    mod = gm.get_submodule(node.target)
    if _blocker(node, mod) is not None:
        return False
    call = _call(node)
    E, H = mod.embed_dim, mod.num_heads
    head_dim = E // H
    batched = _rank(call["query"]) == 3
    seq_first = batched and not mod.batch_first
    p = node.target + "."
    g = gm.graph
    before = set(g.nodes)
    with g.inserting_before(node):
        def attr(name):
            return g.get_attr(p + name) if getattr(mod, name.split(".")[0], None) is not None else None

        inputs = [call[name] for name in ("query", "key", "value")]
        if seq_first:  # (tokens, batch, E) -> (batch, tokens, E), once per distinct input
            moved: Dict[Node, Node] = {}
            inputs = [moved.setdefault(x, g.call_method("transpose", (x, 0, 1))) if x not in moved else moved[x]
                      for x in inputs]
        bias = attr("in_proj_bias")
        if mod._qkv_same_embed_dim:  # self-attention: one packed projection
            qkv = g.call_function(F.linear, (inputs[0], attr("in_proj_weight"), bias))
            parts = g.call_function(torch.split, (qkv, E, -1))
            q, k, v = (g.call_function(operator.getitem, (parts, i)) for i in range(3))
        else:  # separate projections; the packed bias is added to their concatenation, so that it is
            # bound whole to the heads' rows instead of being sliced (a computed tensor)
            q, k, v = (g.call_function(F.linear, (x, attr(w), None)) for x, w in
                       zip(inputs, ("q_proj_weight", "k_proj_weight", "v_proj_weight")))
            if bias is not None:
                qkv = g.call_function(operator.add, (g.call_function(torch.cat, ([q, k, v], -1)), bias))
                parts = g.call_function(torch.split, (qkv, E, -1))
                q, k, v = (g.call_function(operator.getitem, (parts, i)) for i in range(3))
        q, k, v = (g.call_method("transpose", (g.call_method("unflatten", (t, -1, (H, head_dim))), -3, -2))
                   for t in (q, k, v))
        mask, causal = _sdpa_mask(g, call, batched)
        dropout = 0.0
        if mod.dropout > 0:  # dropout on the attention weights while training, as the module does
            with warnings.catch_warnings():  # torch.fx warns of get_attr nodes that read a non-tensor
                warnings.simplefilter("ignore", UserWarning)
                training = g.get_attr(p + "training")
            dropout = g.call_function(operator.mul, (training, float(mod.dropout)))
        out = g.call_function(F.scaled_dot_product_attention, (q, k, v),
                              {"attn_mask": mask, "dropout_p": dropout, "is_causal": causal,
                               "scale": 1.0 / math.sqrt(head_dim)})
        out = g.call_method("flatten", (g.call_method("transpose", (out, -3, -2)), -2))
        out = g.call_function(F.linear, (out, attr("out_proj.weight"),
                                         attr("out_proj.bias") if mod.out_proj.bias is not None else None))
        if seq_first:
            out = g.call_method("transpose", (out, 0, 1))
    stack = dict(node.meta.get("nn_module_stack") or {})
    stack[node.target] = (node.target, type(mod))  # rules find num_heads on the module
    for new in g.nodes:
        if new not in before:
            new.meta["nn_module_stack"] = stack
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        g.erase_node(user)
    g.erase_node(node)
    return True


def _sdpa_mask(g, call, batched: bool):
    """``(attn_mask, is_causal)`` for SDPA: a boolean mask flips meaning (MHA: True = masked out)."""
    mask, padding = call["attn_mask"], call["key_padding_mask"]
    if call["is_causal"] and padding is None:
        return None, True  # the module takes its mask as a hint only
    source = padding if padding is not None else mask
    if source is None:
        return None, False
    if padding is not None:  # (batch, keys) -> (batch, 1, 1, keys); unbatched (keys,) -> (1, 1, keys)
        dim = 1 if batched else 0
        mask = g.call_method("unsqueeze", (g.call_method("unsqueeze", (padding, dim)), dim))
    if source.meta["tensor_meta"].dtype == torch.bool:
        mask = g.call_function(torch.logical_not, (mask,))
    return mask, False


def multihead_attention(a: A, node: Node):
    """A call left whole (see :func:`_blocker`): its inputs are fixed, its outputs a new space."""
    mod = a.module(node)
    call = _call(node)
    q, k, v = call["query"], call["key"], call["value"]
    why = _blocker(node, mod) or f"{describe(node, mod)} is not decomposed"
    a.fix([a.map(q), a.map(k), a.map(v)], why)
    qs, ks = a.shape(q), a.shape(k)
    out_shapes = a.shape(node)
    E = mod.embed_dim
    out_ids = a.new(E)
    a.bind_param(f"{node.target}.out_proj.weight", 0, out_ids, importance="out")
    if mod.out_proj.bias is not None:
        a.bind_param(f"{node.target}.out_proj.bias", 0, out_ids)
    Lq = math.prod(qs) // qs[-1]
    Lk = math.prod(ks) // ks[-1]
    batch = qs[0] if len(qs) == 3 and mod.batch_first else (qs[1] if len(qs) == 3 else 1)
    seq_q, seq_k = Lq // batch, Lk // batch
    in_proj = Lq * E * E + Lk * (mod.kdim + mod.vdim) * E
    a.add_macs(in_proj + batch * seq_q * seq_k * E * 2)
    a.add_macs(Lq * E, out_ids)
    return (ChannelMap(len(out_shapes[0]) - 1, out_ids),) + tuple(None for _ in out_shapes[1:])


DEFAULT_RULES.register(OpHandler(multihead_attention, decompose=decompose_multihead_attention),
                       modules=[torch.nn.MultiheadAttention])
# torch's transformer layers are compositions of the layers above: traced into (torch.fx keeps
# every torch.nn module whole by default), so their heads and MLPs prune like a hand-written block's
DEFAULT_RULES.trace_through(torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer,
                            torch.nn.TransformerEncoder, torch.nn.TransformerDecoder, torch.nn.Transformer)
