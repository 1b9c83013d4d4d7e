"""Coupling rules for ops that move elements without computing on them: concatenation,
splitting, indexing and slicing, reshapes, permutations, broadcasting and channel shuffles.

A view keeps each channel's values; the rules track where the channel dim goes and fix the
channels where an op picks or mixes individual ones.  The ``*_step`` functions are the ops'
``OpHandler.view_step`` (one output dim back to one input dim), by which a parameter seen
through a view is bound (:func:`~hfp_fx.passes.rules_pointwise.param_view_chain`).  The
``rewrite_*`` functions make literal sizes, bounds and split sizes count the kept channels.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe, op_name
from hfp_fx.capture.meta_shortcuts import cat_shape
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler, op_handler
from hfp_fx.passes.edit import is_aten
from hfp_fx.passes.rules_pointwise import _is_tuple_shape, bind_param_view, broadcast_couple

if TYPE_CHECKING:  # rewrites receive the shrink pass's edit context
    from hfp_fx.passes.shrink import ShrinkEdit

A = ChannelAnalysis

__all__ = ["reshape", "reshape_map", "cat", "split", "getitem", "permute", "transpose"]

# -------------------------------------------------------------------------------------------
# view steps (``OpHandler.view_step``) of the ops below
# -------------------------------------------------------------------------------------------
def _expand_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    return d - (len(out_shape) - len(in_shape))


def _reshape_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    """A row-major reshape keeps ``d`` separable when its block pairs it with one input dim."""
    for bi, bj in _blocks(list(in_shape), list(out_shape)):
        if d in bj:
            return bi[0] if len(bi) == 1 and len(bj) == 1 else None
    return None


def _permute_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    dims = node.args[1:] if node.op == "call_method" else (a.arg(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if len(dims) != len(in_shape) or not all(isinstance(v, int) for v in dims):
        return None
    return dims[d] % len(in_shape)


def _transpose_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    rank = len(in_shape)
    if node.target in ("t", torch.t):
        return d if rank < 2 else 1 - d
    d0, d1 = a.arg(node, 1, "dim0", a.arg(node, 1, "source")), a.arg(node, 2, "dim1", a.arg(node, 2, "destination"))
    if not (isinstance(d0, int) and isinstance(d1, int)):
        return None
    order = list(range(rank))
    d0, d1 = d0 % rank, d1 % rank
    if node.target in ("movedim", "moveaxis", torch.movedim, torch.moveaxis):
        order.pop(d0)
        order.insert(d1, d0)
    else:
        order[d0], order[d1] = order[d1], order[d0]
    return order[d]


def _getitem_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    """Basic indexing: ``d`` must come from an input dim that is kept whole (``p[:, :n]`` slices tokens).

    A lone index tensor gathers along dim 0 (a relative-position table ``table[index]``): the dims
    after it come through whole, shifted by the index's rank.
    """
    idx = node.args[1]
    if isinstance(idx, Node) and isinstance(a.shape(idx), torch.Size):
        k = len(a.shape(idx))
        return d - k + 1 if d >= k else None
    raw = list(idx) if isinstance(idx, tuple) else [idx]
    if not all(it is None or it is Ellipsis or isinstance(it, (int, slice)) for it in raw):
        return None
    items = _expand_index(idx, len(in_shape))
    items += [slice(None)] * (len(in_shape) - sum(1 for it in items if it is not None))
    in_d = out_d = 0
    for it in items:
        if it is None:
            out_d += 1
            continue
        if isinstance(it, slice):
            if out_d == d:
                whole = all(v is None or isinstance(v, int) for v in (it.start, it.stop, it.step))
                return in_d if whole and it.indices(in_shape[in_d]) == (0, in_shape[in_d], 1) else None
            out_d += 1
        in_d += 1
    return None


# -------------------------------------------------------------------------------------------
# concatenation, splitting, indexing
# -------------------------------------------------------------------------------------------
@op_handler(functions=[torch.cat, torch.concat, torch.concatenate], aten=["cat"], macs=False, shape=cat_shape)
def cat(a: A, node: Node):
    tensors = list(a.arg(node, 0, "tensors"))
    dim = a.arg(node, 1, "dim", 0)
    out_shape = a.shape(node)
    dim %= len(out_shape)
    maps = [a.cmap(t) for t in tensors]
    if not any(m is not None and m.axis == dim for m in maps):
        return broadcast_couple(a, node, tensors)
    pieces = []
    for t, m in zip(tensors, maps):
        if m is not None and m.axis == dim:
            pieces.append(m.ids)
        else:
            if m is not None:
                a.fix(m, f"{describe(node)} concatenates channels with a tensor whose channels lie elsewhere")
            n = a.shape(t)[dim]
            ids = a.new(n)  # a parameter's slice of channels (learned extra channels) is prunable with it
            if m is not None or not bind_param_view(a, t, dim, ids):
                a.fix(ids, f"concatenated by {describe(node)} from untracked `{t.name}`")
            pieces.append(ids)
    return ChannelMap(dim, torch.cat(pieces))


@op_handler(functions=[torch.stack], aten=["stack"], macs=False)
def stack(a: A, node: Node):
    tensors = list(a.arg(node, 0, "tensors"))
    dim = a.arg(node, 1, "dim", 0) % len(a.shape(node))
    in_shape = a.shape(tensors[0])
    m = broadcast_couple(a, node, tensors, out_shape=in_shape)
    if m is None:
        return None
    return ChannelMap(m.axis + (1 if m.axis >= dim else 0), m.ids)


def rewrite_split(node: Node, edit: "ShrinkEdit") -> None:
    """Pieces of a split channel dim get their kept sizes (``chunk`` becomes ``split``)."""
    src = edit.map_of(node.args[0])
    outs = edit.maps_of(node)
    if src is None or not isinstance(outs, tuple) or not edit.changed(src):
        return
    pieces = [m for m in outs if isinstance(m, ChannelMap)]
    if len(pieces) != len(outs) or pieces[0].axis != src.axis or pieces[0].ids is src.ids:
        return  # split along another dim: nothing to rewrite
    if all(p.size == src.size for p in pieces):
        return
    sizes = [edit.kept(p) for p in pieces]
    node.target = ("split" if node.op == "call_method" else
                   torch.ops.aten.split_with_sizes.default if is_aten(node) else torch.split)
    node.args = (node.args[0], sizes, src.axis)
    node.kwargs = {}


@op_handler(functions=[torch.split, torch.chunk, torch.tensor_split, torch.unbind],
            methods=["split", "chunk", "tensor_split", "unbind", "split_with_sizes"],
            aten=["split.Tensor", "split_with_sizes", "chunk", "unbind.int"], macs=False, rewrite=rewrite_split)
def split(a: A, node: Node):
    x = node.args[0]
    shapes = a.shape(node)
    m = a.cmap(x)
    if not _is_tuple_shape(shapes):
        a.fix(m, f"{describe(node)} returned an unexpected value")
        return None
    if m is None:
        return tuple(None for _ in shapes)
    in_shape = a.shape(x)
    name = op_name(node)
    dim = a.arg(node, 1 if name == "unbind" else 2, "dim", 0)
    if not isinstance(dim, int):
        a.fix(m, f"{describe(node)} splits along a dim computed at run time")
        return tuple(None for _ in shapes)
    dim %= len(in_shape)
    if dim != m.axis:
        if name == "unbind":
            axis = m.axis - (1 if m.axis > dim else 0)
            return tuple(ChannelMap(axis, m.ids) for _ in shapes)
        return tuple(m for _ in shapes)
    if name == "unbind" or name == "tensor_split":
        a.fix(m, f"{describe(node)} splits the channel dim into pieces we cannot re-size")
        return tuple(None for _ in shapes)
    out, start = [], 0
    for s in shapes:
        n = s[dim]
        out.append(ChannelMap(dim, m.ids[start:start + n]))
        start += n
    return tuple(out)


def _expand_index(idx, rank: int) -> List[Any]:
    """Basic indexing as one item per indexed dim: the ``Ellipsis`` spelled out as full slices."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    pos = next((i for i, it in enumerate(items) if it is Ellipsis), None)
    if pos is not None:
        items = items[:pos] + [slice(None)] * (rank - consumed) + items[pos + 1:]
    return items


def _item_of_dim(items: Sequence[Any], dim: int) -> Optional[int]:
    """Which of the (expanded) index ``items`` indexes input dim ``dim`` (``None``: none does)."""
    in_d = 0
    for i, it in enumerate(items):
        if it is None:  # a new axis indexes no input dim
            continue
        if in_d == dim:
            return i
        in_d += 1
    return None


def rewrite_getitem(node: Node, edit: "ShrinkEdit") -> None:
    """``x[:, a:b]`` on a pruned channel dim: the bounds count kept channels."""
    obj, idx = node.args
    src = edit.map_of(obj) if isinstance(obj, Node) else None
    if src is None or not edit.changed(src):
        return
    items = _expand_index(idx, len(edit.dense_shape(obj)))
    i = _item_of_dim(items, src.axis)
    if i is None or not isinstance(items[i], slice):
        return
    lo, hi, _ = items[i].indices(edit.dense_shape(obj)[src.axis])
    items[i] = slice(edit.kept_before(src, lo), edit.kept_before(src, hi))
    node.args = (obj, tuple(items) if isinstance(idx, tuple) or len(items) > 1 else items[0])


@op_handler(functions=[operator.getitem], macs=False, rewrite=rewrite_getitem, view_step=_getitem_step)
def getitem(a: A, node: Node):
    obj, idx = node.args[0], node.args[1]
    obj_shape = a.shape(obj)
    value = a.map(obj)
    if not isinstance(obj_shape, torch.Size):  # indexing a tuple/list of tensors (split, MHA outputs)
        if isinstance(value, (tuple, list)) and isinstance(idx, (int, slice)):
            return value[idx]
        if value is not None:
            a.fix(value, f"{describe(node)} indexes a container with a run-time value")
        return None
    m = value if isinstance(value, ChannelMap) else None
    if m is None:
        return None
    return index_map(a, node, m, obj_shape, idx)


def index_map(a: A, node: Node, m: ChannelMap, in_shape: torch.Size, idx) -> Optional[ChannelMap]:
    """Channel map of ``x[idx]`` for basic indexing (ints, slices, None, Ellipsis)."""
    raw = list(idx) if isinstance(idx, tuple) else [idx]
    for it in raw:
        if not (it is None or it is Ellipsis or isinstance(it, (int, slice)) or
                (isinstance(it, Node) and a.shape(it) is None)):
            a.fix(m, f"{describe(node)} uses advanced (tensor/list) indexing")
            return None
    items = _expand_index(idx, len(in_shape))
    i = _item_of_dim(items, m.axis)
    if i is None:  # the index stops before the channel dim: it moves by the dims consumed or added
        consumed = sum(1 for it in items if it is not None)
        kept = sum(1 for it in items if it is None or isinstance(it, slice))
        return ChannelMap(kept + (m.axis - consumed), m.ids)
    it = items[i]
    if not isinstance(it, slice):
        a.fix(m, f"{describe(node)} selects a single channel")
        return None
    if not all(v is None or isinstance(v, int) for v in (it.start, it.stop, it.step)) or it.step not in (None, 1):
        a.fix(m, f"{describe(node)} slices the channel dim with a step or run-time bounds")
        return None
    out_axis = sum(1 for it in items[:i] if it is None or isinstance(it, slice))
    return ChannelMap(out_axis, m.ids[it])


def rewrite_narrow(node: Node, edit: "ShrinkEdit") -> None:
    """``x.narrow(dim, start, length)`` on a pruned channel dim: start and length count kept channels."""
    src = edit.map_of(node.args[0])
    if src is None or not edit.changed(src):
        return
    dim, start, length = (node.args[i] if len(node.args) > i else node.kwargs[k]
                          for i, k in ((1, "dim"), (2, "start"), (3, "length")))
    if dim % len(edit.dense_shape(node.args[0])) != src.axis:
        return
    start %= src.size  # a negative start counts from the end
    new_start = edit.kept_before(src, start)
    node.args = (node.args[0], dim, new_start, edit.kept_before(src, start + length) - new_start)
    node.kwargs = {}


@op_handler(functions=[torch.narrow], methods=["narrow"], macs=False, rewrite=rewrite_narrow)
def narrow(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    dim, start, length = (a.arg(node, i, n) for i, n in ((1, "dim"), (2, "start"), (3, "length")))
    rank = len(a.shape(node.args[0]))
    if not all(isinstance(v, int) for v in (dim, start, length)):
        a.fix(m, f"{describe(node)} uses run-time arguments")
        return None
    if dim % rank != m.axis:
        return m
    start %= m.size  # narrow(dim, -k, k): the last k channels
    return ChannelMap(m.axis, m.ids[start:start + length])


def _slice_args(node: Node):
    get = lambda i, name, default: node.args[i] if len(node.args) > i else node.kwargs.get(name, default)  # noqa: E731
    return get(1, "dim", 0), get(2, "start", None), get(3, "end", None), get(4, "step", 1)


def rewrite_slice(node: Node, edit: "ShrinkEdit") -> None:
    """``aten.slice(x, dim, start, end)`` on a pruned channel dim: the bounds count kept channels."""
    src = edit.map_of(node.args[0])
    if src is None or not edit.changed(src):
        return
    dim, start, end, step = _slice_args(node)
    if dim % len(edit.dense_shape(node.args[0])) != src.axis:
        return
    lo, hi, _ = slice(start, end).indices(edit.dense_shape(node.args[0])[src.axis])
    node.args = (node.args[0], dim, edit.kept_before(src, lo), edit.kept_before(src, max(lo, hi)), step)
    node.kwargs = {}


@op_handler(aten=["slice.Tensor"], macs=False, rewrite=rewrite_slice)
def slice_tensor(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    dim, start, end, step = _slice_args(node)
    rank = len(a.shape(node.args[0]))
    if not all(v is None or isinstance(v, int) for v in (dim, start, end, step)):
        a.fix(m, f"{describe(node)} uses run-time arguments")
        return None
    if dim % rank != m.axis:
        return m
    if step not in (None, 1):
        a.fix(m, f"{describe(node)} slices the channel dim with a step")
        return None
    return ChannelMap(m.axis, m.ids[slice(start, end)])


@op_handler(functions=[torch.select, torch.index_select], methods=["select", "index_select"],
            aten=["select.int", "index_select"], macs=False)
def select_like(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    dim = a.arg(node, 1, "dim")
    rank = len(a.shape(node.args[0]))
    if not isinstance(dim, int) or dim % rank == m.axis:
        a.fix(m, f"{describe(node)} picks individual channels")
        return None
    if op_name(node) == "select":
        return ChannelMap(m.axis - (1 if m.axis > dim % rank else 0), m.ids)
    return m


def _index_layout(a: A, node: Node):
    """``aten.index.Tensor(x, [i0, None, i2, ...])``: (rank of ``x``, indexed dims, the index tensors'
    broadcast rank, whether the indexed dims are adjacent), or ``None`` when an index is not a tensor."""
    x, indices = node.args[0], node.args[1]
    shape = a.shape(x)
    if not isinstance(shape, torch.Size) or not isinstance(indices, (list, tuple)):
        return None
    dims = [d for d, i in enumerate(indices) if i is not None]
    shapes = [a.shape(indices[d]) for d in dims]
    if not dims or not all(isinstance(s, torch.Size) for s in shapes):
        return None
    return len(shape), dims, len(torch.broadcast_shapes(*shapes)), dims == list(range(dims[0], dims[-1] + 1))


def _index_out_dim(layout, d: int):
    """Where input dim ``d`` (not indexed) lands in the output of ``aten.index.Tensor``."""
    rank, dims, k, adjacent = layout
    if adjacent:
        return d if d < dims[0] else d - len(dims) + k
    return k + sum(1 for e in range(d) if e not in dims)  # separated indices: their dims go first


def _index_step(a: A, node: Node, d: int, in_shape, out_shape):
    """Chain step (:func:`param_view_chain`): the input dim behind
    output dim ``d``, when it is not one the index tensors produce (a relative-position table
    ``table[index]``: its heads dim comes through whole)."""
    layout = _index_layout(a, node)
    if layout is None:
        return None
    return next((e for e in range(layout[0]) if e not in layout[1] and _index_out_dim(layout, e) == d), None)


@op_handler(aten=["index.Tensor"], macs=False, view_step=_index_step)
def index_tensor(a: A, node: Node):
    """``x[i, j]`` with index tensors (``aten.index.Tensor``): gathering along other dims keeps the
    channels; gathering along the channel dim picks individual channels."""
    x, indices = node.args[0], node.args[1]
    m = a.cmap(x)
    tracked = [a.map(i) for i in (indices if isinstance(indices, (list, tuple)) else ()) if isinstance(i, Node)]
    if any(t is not None for t in tracked):
        a.fix(tracked, f"{describe(node)} uses channels as indices")
    if m is None:
        return None
    layout = _index_layout(a, node)
    if layout is None or m.axis in layout[1]:
        a.fix(m, f"{describe(node)} picks individual channels")
        return None
    return ChannelMap(_index_out_dim(layout, m.axis), m.ids)


# -------------------------------------------------------------------------------------------
# reshapes and permutations
# -------------------------------------------------------------------------------------------
@op_handler(modules=[torch.nn.Flatten], functions=[torch.flatten, torch.squeeze, torch.unsqueeze, torch.ravel],
            methods=["flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "squeeze_", "unsqueeze_", "ravel"],
            aten=["unsqueeze", "squeeze.dim", "squeeze.dims", "squeeze", "flatten.using_ints"],
            macs=False, view_step=_reshape_step, keeps_values=True)
def reshape(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    return reshape_map(a, node, m, a.shape(node.args[0]), a.shape(node))


@op_handler(aten=["reshape_as", "view_as"], macs=False)
def reshape_as(a: A, node: Node):
    """``aten.reshape_as(x, other)``: a reshape to the shape the shrunk model reads from ``other``
    (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``), so the result's channels are ``other``'s."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    out, theirs = reshape(a, node), a.map(other)
    if out is None and theirs is None:
        return None
    if isinstance(out, ChannelMap) and isinstance(theirs, ChannelMap) and out.axis == theirs.axis \
            and out.size == theirs.size:
        a.union(out.ids, theirs.ids)
        return out
    a.fix([a.map(node.args[0]), out, theirs], f"{describe(node)} takes its shape from a tensor with other channels")
    return None


def _blocks(in_shape: Sequence[int], out_shape: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pair groups of input dims with groups of output dims that hold the same elements."""
    blocks, i, j = [], 0, 0
    n, k = len(in_shape), len(out_shape)
    while i < n and j < k:
        if in_shape[i] == 1 and out_shape[j] != 1:
            i += 1
            continue
        if out_shape[j] == 1 and in_shape[i] != 1:
            j += 1
            continue
        bi, bj, pi, pj = [i], [j], in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                bi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                bj.append(j)
                pj *= out_shape[j]
        blocks.append((bi, bj))
        i += 1
        j += 1
    return blocks


# attributes that name a head count or a head width on attention modules (torch, timm, Hugging Face)
DEFAULT_RULES.head_count_attributes = ("num_heads", "heads", "n_heads", "num_attention_heads",
                                       "num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head")
DEFAULT_RULES.head_dim_attributes = ("head_dim", "head_size", "attention_head_size", "dim_head")


def reshape_map(a: A, node: Node, m: ChannelMap, in_shape: torch.Size, out_shape: torch.Size):
    """Any row-major reshape (view, flatten, unflatten, squeeze, ...).

    Merging the channel dim with others repeats each channel's id over the merged positions
    (``flatten`` before a linear).  Splitting it into several dims requires the kept channels to
    form a product set, so ids are united along all but one of the new dims: the attention
    heads dim when the enclosing module has ``num_heads``, else the largest dim (the
    ``C // groups`` dim of a channel shuffle).
    """
    if in_shape[m.axis] == 1:
        a.fix(m, f"{describe(node)} reshapes a single channel")
        return None
    block = next(((bi, bj) for bi, bj in _blocks(list(in_shape), list(out_shape)) if m.axis in bi), None)
    if block is None:
        a.fix(m, f"{describe(node)} reshapes in a way the analysis cannot follow")
        return None
    bi, bj = block
    if ((0 in bi and len(bi) > 1) or (0 in bj and len(bj) > 1)) and not _literal_sizes(node):
        # e.g. (B, heads*d) -> (B*heads, d): the kept count would be baked in for one batch size
        # (sizes that are literals already, as torch.export records them, hold one batch size anyway)
        a.fix(m, f"{describe(node)} merges the channel dim with the batch dim")
        return None
    block_in = [in_shape[d] for d in bi]
    view = [1] * len(bi)
    view[bi.index(m.axis)] = in_shape[m.axis]
    table = m.ids.reshape(view).expand(block_in).reshape([out_shape[d] for d in bj])
    varying = [k for k in range(table.dim())
               if table.shape[k] > 1 and not torch.equal(table, table.narrow(k, 0, 1).expand_as(table))]
    if not varying:
        a.fix(m, f"{describe(node)} reshapes the channel dim away")
        return None
    if len(varying) == 1:
        keep = varying[0]
    else:
        heads = a.hints(node, a.rules.head_count_attributes)
        head_dims = a.hints(node, a.rules.head_dim_attributes)
        sizes = [table.shape[k] for k in varying]
        candidates = [k for k, n in zip(varying, sizes) if n in heads and k != table.dim() - 1]
        if not candidates and len(varying) == 2 and sizes[1] in head_dims:
            candidates = [varying[0]]  # (heads, head_dim) with a head count no attribute names
        if candidates:  # (qkv, heads, head_dim): heads sits just before head_dim
            keep = candidates[-1]
        else:
            keep = max(varying, key=lambda k: (table.shape[k], k))
        a.elements.union_along(table, tuple(k for k in varying if k != keep))
    index = [0] * table.dim()
    index[keep] = slice(None)
    return ChannelMap(bj[keep], table[tuple(index)].contiguous())


def _literal_sizes(node: Node) -> bool:
    """Does ``node`` (a view, reshape or unflatten) spell its target sizes as integer literals?"""
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
            sizes = sizes[0]
    elif node.op == "call_function":
        name = op_name(node)
        sizes = node.args[2] if name == "unflatten" and len(node.args) > 2 else node.args[1] if len(node.args) > 1 \
            and name in ("view", "reshape", "_unsafe_view") else None
    else:
        return False
    return isinstance(sizes, (list, tuple)) and len(sizes) > 0 and all(isinstance(v, int) for v in sizes)


def rewrite_sizes(node: Node, edit: "ShrinkEdit") -> None:
    """view/reshape/expand: put the new channel count at the output channel axis.

    When a reshape splits the channel dim alone into several dims (a channel shuffle's
    ``view(b, g, c // g, h, w)``), the sizes of the other new dims are structural: an argument
    computed at run time from the channel count (``c // g``) would change with pruning, so it is
    replaced by its traced value.
    """
    m = edit.map_of(node)
    if m is None and not _reads_pruned_channels([*node.args[1:], *node.kwargs.values()], edit):
        return
    changed, packed, key = edit.changed(m), False, None
    if node.op == "call_method":
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
        if packed:
            sizes = list(sizes[0])
    else:  # torch.reshape(x, shape), torch.broadcast_to(x, size)
        key = 1 if len(node.args) > 1 else next(k for k in ("shape", "size") if k in node.kwargs)
        sizes = list(node.args[1] if key == 1 else node.kwargs[key])
    if not sizes or (len(sizes) == 1 and isinstance(sizes[0], Node) and len(edit.dense_shape(node)) > 1):
        # no sizes, or one computed at run time (``x.view(y.shape)``): it follows the pruned
        # tensors it is read from; the shape check after shrinking verifies that it does
        return
    # A size read at run time from a pruned channel dim (maxvit's ``B, G, P, D = x.shape;
    # out.reshape(B, G, P, D)``, where ``out``'s channels are untracked or pruned apart from
    # ``x``'s) would follow ``x``'s pruning: every other dim keeps its dense, traced size.
    stale = [d for d, s in enumerate(sizes) if (m is None or d != m.axis) and _reads_pruned_channels(s, edit)]
    for d in stale:
        sizes[d] = int(edit.dense_shape(node)[d])
    if m is None or (not changed and not isinstance(sizes[m.axis], Node)):
        if stale:
            _set_sizes(node, sizes, packed, key)
        return
    # A size read at run time (``B, N, C = x.shape; y.reshape(B, N, C)``) may come from a
    # tensor whose channels are pruned differently, so the channel size is always a literal.
    if not (isinstance(sizes[m.axis], int) and sizes[m.axis] == -1):
        sizes[m.axis] = edit.kept(m)
    for d in _structural_dims(node, edit, m) if changed else ():
        if isinstance(sizes[d], Node):
            sizes[d] = int(edit.dense_shape(node)[d])
    _set_sizes(node, sizes, packed, key)


def _set_sizes(node: Node, sizes: list, packed: bool, key) -> None:
    """Write ``sizes`` back the way the node spelled them (one packed tuple, or the argument ``key``)."""
    if node.op == "call_method":
        node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
    elif key == 1:
        node.args = (node.args[0], tuple(sizes), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, key: tuple(sizes)}


def _reads_pruned_channels(arg, edit: "ShrinkEdit") -> bool:
    """Is ``arg`` (or an item of it) a size read at run time from a pruned channel dim?"""
    if isinstance(arg, (list, tuple)):
        return any(_reads_pruned_channels(a, edit) for a in arg)
    return isinstance(arg, Node) and arg.name in edit.pruned_size_reads


def _structural_dims(node: Node, edit: "ShrinkEdit", m: ChannelMap) -> List[int]:
    """Output dims that a reshape split off the input's channel dim, other than the channel axis."""
    src = edit.map_of(node.args[0])
    if node.target not in ("view", "reshape", torch.reshape) or src is None:
        return []
    in_shape = list(edit.dense_shape(node.args[0]))
    out_shape = list(edit.dense_shape(node))
    for bi, bj in _blocks(in_shape, out_shape):
        if bi == [src.axis] and m.axis in bj:
            return [d for d in bj if d != m.axis]
    return []


def rewrite_unflatten(node: Node, edit: "ShrinkEdit") -> None:
    """``x.unflatten(dim, sizes)`` / ``nn.Unflatten``: the kept count at the channel's new dim."""
    m = edit.map_of(node)
    if not edit.changed(m):
        return
    module = edit.module(node)
    if module is not None:
        dim, sizes = module.dim, list(module.unflattened_size)
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = list(node.args[2] if len(node.args) > 2 else node.kwargs["sizes"])
    k = m.axis - (dim % len(edit.dense_shape(node.args[0])))
    if not (0 <= k < len(sizes)) or sizes[k] == -1:
        return
    sizes[k] = edit.kept(m)
    if module is not None:
        module.unflattened_size = tuple(sizes)
    else:
        node.args = (node.args[0], dim, tuple(sizes))
        node.kwargs = {}


DEFAULT_RULES.register(OpHandler(reshape, macs=False, rewrite=rewrite_sizes, view_step=_reshape_step,
                                 keeps_values=True),
                       functions=[torch.reshape], methods=["view", "reshape"], aten=["view", "_unsafe_view", "reshape"])
DEFAULT_RULES.register(OpHandler(reshape, macs=False, rewrite=rewrite_unflatten, view_step=_reshape_step,
                                 keeps_values=True),
                       modules=[torch.nn.Unflatten], functions=[torch.unflatten], methods=["unflatten"],
                       aten=["unflatten.int"])


@op_handler(functions=[torch.permute], methods=["permute"], aten=["permute"], macs=False, view_step=_permute_step)
def permute(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    dims = node.args[1:] if node.op == "call_method" else (a.arg(node, 1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    rank = len(a.shape(node.args[0]))
    if not all(isinstance(d, int) for d in dims):
        a.fix(m, f"{describe(node)} permutes with run-time dims")
        return None
    dims = [d % rank for d in dims]
    return ChannelMap(dims.index(m.axis), m.ids)


@op_handler(functions=[torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis],
            methods=["transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "transpose_"],
            aten=["transpose.int", "swapaxes", "swapdims", "movedim.int"], macs=False, view_step=_transpose_step)
def transpose(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    d0, d1 = a.arg(node, 1, "dim0", a.arg(node, 1, "source")), a.arg(node, 2, "dim1", a.arg(node, 2, "destination"))
    rank = len(a.shape(node.args[0]))
    if not (isinstance(d0, int) and isinstance(d1, int)):
        a.fix(m, f"{describe(node)} uses run-time dims")
        return None
    name = op_name(node)
    order = list(range(rank))
    d0, d1 = d0 % rank, d1 % rank
    if name in ("movedim", "moveaxis"):
        order.pop(d0)
        order.insert(d1, d0)
    else:
        order[d0], order[d1] = order[d1], order[d0]
    return ChannelMap(order.index(m.axis), m.ids)


@op_handler(functions=[torch.t], methods=["t"], aten=["t", "numpy_T"], macs=False, view_step=_transpose_step)
def t(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    rank = len(a.shape(node.args[0]))
    return ChannelMap(m.axis if rank < 2 else 1 - m.axis, m.ids)


@op_handler(functions=[torch.broadcast_to], methods=["expand", "broadcast_to"], aten=["expand"], macs=False,
            rewrite=rewrite_sizes,
            view_step=_expand_step)
def expand(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    in_shape, out_shape = a.shape(node.args[0]), a.shape(node)
    axis = m.axis + len(out_shape) - len(in_shape)
    if out_shape[axis] != in_shape[m.axis]:
        a.fix(m, f"{describe(node)} broadcasts a single channel")
        return None
    return ChannelMap(axis, m.ids)


@op_handler(methods=["expand_as"], aten=["expand_as"], macs=False)
def expand_as(a: A, node: Node):
    """``x.expand_as(other)`` has ``other``'s shape: it broadcasts like ``x + other`` (a per-row norm
    expanded over the channels of ``other`` follows their pruning)."""
    return broadcast_couple(a, node, [node.args[0], a.arg(node, 1, "other")])


@op_handler(methods=["repeat"], macs=False)
def repeat(a: A, node: Node):  # (repeat counts are per dim: nothing to rewrite)
    m = a.cmap(node.args[0])
    if m is None:
        return None
    in_shape, out_shape = a.shape(node.args[0]), a.shape(node)
    axis = m.axis + len(out_shape) - len(in_shape)
    reps = out_shape[axis] // in_shape[m.axis]
    return ChannelMap(axis, m.ids.repeat(reps))


@op_handler(functions=[torch.repeat_interleave], methods=["repeat_interleave"], aten=["repeat_interleave.self_int"],
            macs=False)
def repeat_interleave(a: A, node: Node):
    """``x.repeat_interleave(r, dim)``: each channel repeated ``r`` times in place (grouped-query
    attention repeating key/value heads); the repeat count does not change with pruning."""
    m = a.cmap(node.args[0])
    if m is None:
        return None
    repeats, dim = a.arg(node, 1, "repeats"), a.arg(node, 2, "dim")
    rank = len(a.shape(node.args[0]))
    if not isinstance(repeats, int) or not isinstance(dim, int):
        a.fix(m, f"{describe(node)} repeats by run-time counts or over the flattened tensor")
        return None
    if dim % rank != m.axis:
        return m
    return ChannelMap(m.axis, m.ids.repeat_interleave(repeats))


# -------------------------------------------------------------------------------------------
# channel shuffles
# -------------------------------------------------------------------------------------------
def _shuffle_rule(a: A, node: Node, groups: int):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    if m.axis != 1 or m.size % groups:
        a.fix(m, f"{describe(node)} shuffles a dim other than channels")
        return None
    table = m.ids.reshape(groups, m.size // groups)
    a.elements.union_along(table, (0,))  # every group keeps the same channel indices
    return ChannelMap(1, table.t().reshape(-1).contiguous())


@op_handler(modules=[torch.nn.ChannelShuffle], macs=False)
def channel_shuffle_module(a: A, node: Node):
    return _shuffle_rule(a, node, a.module(node).groups)


@op_handler(functions=[F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle], macs=False)
def channel_shuffle_fn(a: A, node: Node):
    return _shuffle_rule(a, node, a.arg(node, 1, "groups"))


@op_handler(modules=[torch.nn.PixelShuffle, torch.nn.PixelUnshuffle], functions=[F.pixel_shuffle, F.pixel_unshuffle, torch.pixel_shuffle, torch.pixel_unshuffle], macs=False)
def pixel_shuffle(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    in_shape, out_shape = a.shape(node.args[0]), a.shape(node)
    if m.axis != len(in_shape) - 3:
        a.fix(m, f"{describe(node, a.module(node))} acts on the channel dim's neighbours")
        return None
    cin, cout = in_shape[m.axis], out_shape[m.axis]
    if cout < cin:  # shuffle: r*r consecutive channels become one output channel
        table = m.ids.reshape(cout, cin // cout)
        a.elements.union_along(table, (1,))
        return ChannelMap(m.axis, table[:, 0].contiguous())
    return ChannelMap(m.axis, m.ids.repeat_interleave(cout // cin))
