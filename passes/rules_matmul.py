"""Coupling rules for matrix products and attention: ``matmul``/``bmm``/``mm``, ``einsum`` and
``scaled_dot_product_attention``.

Contracted dims unite the channels of both operands; a product with a transposed parameter is a
linear layer (``linear_core``); attention unites the heads of queries, keys and values.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe, op_name
from hfp_fx.passes.registry import op_handler
from hfp_fx.passes.rules_layers import linear_core
from hfp_fx.passes.rules_pointwise import bind_param_view


A = ChannelAnalysis

__all__ = ["matmul", "einsum", "sdpa"]

# -------------------------------------------------------------------------------------------
# matrix products and attention
# -------------------------------------------------------------------------------------------
def _batch_partner(a: A, node: Node, other: Any, dim: int, m: ChannelMap) -> None:
    """Channels on a batch-like axis (heads) meet ``other`` there: a parameter (or a view of one)
    is bound, a broadcast size 1 is fine, any other untracked tensor fixes them."""
    shape = a.shape(other)
    if not isinstance(shape, torch.Size) or dim < 0 or shape[dim] == 1:
        return
    if not bind_param_view(a, other, dim, m.ids):
        a.fix(m, f"{describe(node)} combines the channels with the untracked tensor `{getattr(other, 'name', other)}`")


def _transposed_weight(a: A, y: Any) -> Optional[str]:
    """The 2-d parameter ``W`` when ``y`` is ``W.T`` (``t``, ``numpy_T``, ``transpose(0, 1)``) read
    by this matmul alone: ``x @ W.T`` is a linear layer (Falcon's)."""
    if not isinstance(y, Node) or y.op not in ("call_function", "call_method") or len(y.users) != 1 or not y.args:
        return None
    src = y.args[0]
    if not (isinstance(src, Node) and src.op == "get_attr" and len(a.shape(src) or ()) == 2):
        return None
    name = op_name(y)
    swapped = name in ("t", "numpy_T", "T") or (name in ("transpose", "swapaxes") and
                                                {d % 2 for d in y.args[1:3] if isinstance(d, int)} == {0, 1})
    return str(src.target) if swapped else None


def _linear_through_transpose(a: A, node: Node, x: Node, y: Node, weight: str) -> Optional[ChannelMap]:
    """``x @ W.T``: a linear layer (:func:`~hfp_fx.passes.rules_layers.linear_core`); the view
    ``W.T`` is shape-checked on both of its pruned dims."""
    mx = a.cmap(x)
    if mx is not None and mx.axis != len(a.shape(x)) - 1:
        a.fix(mx, f"{describe(node)} contracts over a dim that is not the channel dim")
        x = None  # then read like an untracked input
    fin, fout = a.shape(y)
    out = linear_core(a, node, x, weight, None, fin, fout)
    dims = a.params[a.canonical.get(weight, weight)]
    a.param_views[y.name] = {1: dims[0], **({0: dims[1]} if 1 in dims else {})}
    return out


@op_handler(functions=[torch.matmul, operator.matmul, torch.bmm, torch.mm], methods=["matmul", "bmm", "mm", "__matmul__"],
            aten=["matmul", "bmm", "mm"])
def matmul(a: A, node: Node):
    x, y = node.args[0], node.args[1]
    xs, ys, out = a.shape(x), a.shape(y), a.shape(node)
    weight = _transposed_weight(a, y)
    if weight is not None and xs is not None and len(xs) >= 2:
        return _linear_through_transpose(a, node, x, y, weight)
    mx, my = a.cmap(x), a.cmap(y)
    if xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
        a.fix([mx, my], f"{describe(node)} with 1-d operands")
        return None
    k = xs[-1]
    rank = len(out)
    contraction = None
    out_map: Optional[ChannelMap] = None

    def contracted(m, is_x):
        return m is not None and m.axis == (len(xs) - 1 if is_x else len(ys) - 2)

    if contracted(mx, True) or contracted(my, False):
        if contracted(mx, True) and contracted(my, False):
            a.union(mx.ids, my.ids)
            contraction = mx.ids
            a.gate(0, mx)
        else:
            m, other, pos = (mx, y, len(ys) - 2) if contracted(mx, True) else (my, x, len(xs) - 1)
            if other.op == "get_attr":
                a.bind_param(other.target, pos, m.ids)
                contraction = m.ids
                a.gate(0 if m is mx else 1, m)
            else:
                a.fix(m, f"{describe(node)} contracts the channels with the untracked tensor `{other.name}`")
    candidates = []
    if mx is not None and mx.axis == len(xs) - 2:
        candidates.append(ChannelMap(rank - 2, mx.ids))
    if my is not None and my.axis == len(ys) - 1:
        candidates.append(ChannelMap(rank - 1, my.ids))
    batch = [(t, m) for t, m in ((x, mx), (y, my)) if m is not None and m.axis < len(a.shape(t)) - 2]
    if batch:
        base_t, base = batch[0]
        axis = base.axis + rank - len(a.shape(base_t))
        for _, m in batch[1:]:
            if m.size == base.size:
                a.union(base.ids, m.ids)
            else:
                a.fix(m, f"{describe(node)} broadcasts channels")
        if len(batch) == 1:  # the other operand meets these channels (heads) untracked
            other = y if base_t is x else x
            _batch_partner(a, node, other, axis - rank + len(a.shape(other)), base)
        candidates.insert(0, ChannelMap(axis, base.ids))
    for extra in candidates[1:]:
        a.fix(extra, f"{describe(node)} would produce channels on two axes")
    out_map = candidates[0] if candidates else None
    numel = math.prod(out)
    coeff = numel * k
    rows = []
    if out_map is not None:
        coeff /= out[out_map.axis]
        rows.append(out_map.ids)
    if contraction is not None:
        coeff /= k
        rows.append(contraction)
    a.add_macs(coeff, *rows)
    return out_map


def _einsum_parts(node: Node):
    """``(input subscripts, output subscript, operands)`` of a two-operand ``torch.einsum``
    without ellipsis, else ``None``."""
    equation = node.args[0] if node.args else None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or "..." in equation or "->" not in equation or len(operands) != 2:
        return None
    lhs, out = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    if len(inputs) != 2 or any(len(set(t)) != len(t) for t in inputs):
        return None
    return inputs, out, operands


@op_handler(functions=[torch.einsum], aten=["einsum"])  # ATen packs the operands in a list
def einsum(a: A, node: Node):
    """Two-operand ``einsum`` (attention written as ``'bhid,bhjd->bhij'``): matmul's rule by letters.

    Each operand's channel axis names a letter.  A letter kept in the output is a batch-like
    axis (heads): operands carrying channels on it are united and the output carries them.  A
    contracted letter is a contraction: tracked on both sides, united and gated; tracked on one
    side against a parameter, the parameter's dim is bound.  MACs are the product of every
    letter's size (the flop counter's count), with tracked letters as rows.
    """
    parts = _einsum_parts(node)
    maps = [a.cmap(x) for x in node.args[1:]] if parts is None else [a.cmap(x) for x in parts[2]]
    if parts is None:
        a.fix(maps, f"{describe(node)} with an equation the analysis does not follow (ellipsis, not two operands)")
        return None
    inputs, out, operands = parts
    sizes = {}
    for sub, x in zip(inputs, operands):
        sizes.update(zip(sub, a.shape(x)))
    letters = {}  # letter -> [(operand index, map)]
    for i, (sub, m) in enumerate(zip(inputs, maps)):
        if m is not None:
            letters.setdefault(sub[m.axis], []).append((i, m))
    out_map, rows = None, {}
    for letter, tracked in letters.items():
        if len({m.size for _, m in tracked}) > 1:
            a.fix([m for _, m in tracked], f"{describe(node)} broadcasts channels")
            continue
        for _, m in tracked[1:]:
            a.union(tracked[0][1].ids, m.ids)
        ids = tracked[0][1].ids
        if letter in out and len(tracked) == 1 and letter in inputs[1 - tracked[0][0]]:
            other_sub = inputs[1 - tracked[0][0]]
            _batch_partner(a, node, operands[1 - tracked[0][0]], other_sub.index(letter), tracked[0][1])
        if letter in out:
            if out_map is not None:
                a.fix(ids, f"{describe(node)} would produce channels on two axes")
                continue
            out_map = ChannelMap(out.index(letter), ids)
            rows[letter] = ids
            continue
        if len(tracked) == 1:  # contracted against the other operand
            i = tracked[0][0]
            other, other_sub = operands[1 - i], inputs[1 - i]
            if letter in other_sub and isinstance(other, Node) and other.op == "get_attr":
                a.bind_param(other.target, other_sub.index(letter), ids)
            else:
                a.fix(ids, f"{describe(node)} contracts the channels with the untracked tensor `{getattr(other, 'name', other)}`")
                continue
        # the operand's argument: ``einsum(eq, x, y)``, or ``einsum(eq, [x, y])`` (aten.einsum)
        packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        a.gate((1, tracked[0][0]) if packed else 1 + tracked[0][0], tracked[0][1])
        rows[letter] = ids
    coeff = math.prod(sizes.values()) / math.prod(sizes[letter] for letter in rows)
    a.add_macs(coeff, *rows.values())
    return out_map


@op_handler(functions=[F.scaled_dot_product_attention], aten=["scaled_dot_product_attention"])
def sdpa(a: A, node: Node):
    q, k, v = (a.arg(node, i, n) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    qs, ks, vs = a.shape(q), a.shape(k), a.shape(v)
    mq, mk, mv = a.cmap(q), a.cmap(k), a.cmap(v)
    rank = len(qs)
    batch = [m for m in (mq, mk, mv) if m is not None and m.axis < rank - 2]
    other = [m for m in (mq, mk) if m is not None and m.axis >= rank - 2]
    a.fix(other, f"{describe(node)}: its default scale depends on the head dim, and it mixes tokens")
    out_map = None
    if mv is not None and mv.axis == rank - 1:
        out_map = mv
    elif mv is not None and mv.axis == rank - 2:
        a.fix(mv, f"{describe(node)} mixes tokens")
    if batch:
        if len(batch) != 3 or len({m.axis for m in batch}) != 1:
            a.fix(batch, f"{describe(node)}: query, key and value must carry the same heads")
        elif _unite_heads(a, node, *batch):
            _bind_attn_mask(a, node, batch[0], rank)
            if out_map is not None:
                a.fix(out_map, f"{describe(node)} would produce channels on two axes")
            out_map = batch[0]
    L, E, S, Ev = qs[-2], qs[-1], ks[-2], vs[-1]
    coeff = math.prod(qs[:-2]) * L * S * (E + Ev)
    if out_map is not None and out_map.axis < rank - 2:
        a.add_macs(coeff / qs[out_map.axis], out_map.ids)
    elif out_map is not None:
        a.add_macs(math.prod(qs[:-2]) * L * S * E)
        a.add_macs(math.prod(qs[:-2]) * L * S, out_map.ids)
    else:
        a.add_macs(coeff)
    return out_map


def _unite_heads(a: A, node: Node, q: ChannelMap, k: ChannelMap, v: ChannelMap) -> bool:
    """Unite each query head with the key/value head it reads; False (and fixed) when unclear.

    With ``enable_gqa=True`` query head ``i`` reads key/value head ``i // (Hq / Hkv)``
    (grouped-query attention), so a key/value head goes with its whole group of query heads.
    """
    if q.size == k.size == v.size:
        a.union(q.ids, k.ids)
        a.union(q.ids, v.ids)
        return True
    if a.arg(node, 7, "enable_gqa", False) and k.size == v.size and q.size % k.size == 0:
        a.union(k.ids, v.ids)
        a.union(q.ids, k.ids.repeat_interleave(q.size // k.size))
        return True
    a.fix([q, k, v], f"{describe(node)}: query, key and value carry different numbers of heads "
                     "(grouped-query attention needs enable_gqa=True or repeated key/value heads)")
    return False


def _bind_attn_mask(a: A, node: Node, heads: ChannelMap, rank: int) -> None:
    """An ``attn_mask`` with one slice per head (a relative-position bias) must lose the same heads."""
    mask = a.arg(node, 3, "attn_mask")
    if not isinstance(mask, Node):
        return
    ms = a.shape(mask)
    axis = heads.axis - rank + len(ms)  # broadcasting aligns the trailing dims
    if axis < 0 or ms[axis] == 1:
        return
    mm = a.cmap(mask)
    if mm is not None and mm.axis == axis and len(mm.ids) == len(heads.ids):
        a.union(mm.ids, heads.ids)
    else:
        a.fix(heads, f"{describe(node)}: its attn_mask has per-head values that are not pruned with the heads")
