"""Handlers for the ATen ops of graphs captured with ``torch.export`` (``capture="export"``).

``torch.export`` records ``torch.ops.aten.*`` overloads instead of ``torch``/``Tensor`` calls.
Where an overload takes its arguments the way the ``torch`` function does, it is registered
with the existing rule (``passthrough``, ``elementwise``, ``reduction``, ``reshape`` with
``rewrite_sizes``, ``permute``, ``transpose``, ``cat``, ``split``, ``matmul``, ``sdpa``,
``linear_fn``, ``layer_norm_fn``, ``rms_norm_fn``); the few that differ get a small adapter here:

* ``aten.embedding(weight, indices)`` (the weight first; ``F.embedding`` is ``(indices, weight)``);
* ``aten.slice.Tensor(x, dim, start, end, step)``, whose bounds the shrink pass rewrites to
  count kept channels (like ``x[:, a:b]``);
* ``aten.select.int(x, dim, index)``, which drops ``dim``;
* ``aten.addmm(bias, x, weight)`` with a ``(in, out)`` weight: Hugging Face's ``Conv1D`` (GPT-2).

Literal sizes in the graph (``view``/``reshape``/``expand`` sizes, slice bounds) are rewritten
by the shrink pass through the handlers' ``rewrite``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler, op_handler
from hfp_fx.passes import rules_layers as L
from hfp_fx.passes import rules_tensor as T

if TYPE_CHECKING:
    from hfp_fx.passes.shrink import ShrinkEdit

A = ChannelAnalysis
aten = torch.ops.aten

__all__ = ["embedding", "slice_tensor", "select_int", "addmm", "index_tensor", "reshape_as", "grouped_mm"]


def _ops(*names):
    """The overloads ``aten.<name>`` that this torch has (``"add.Tensor"``, ...)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def _register(handler: OpHandler, *names: str) -> None:
    DEFAULT_RULES.register(handler, functions=_ops(*names))


# per-position ops: the output carries the first argument's channels
_register(OpHandler(T.passthrough, macs=False, view_step=T._same_dim_step),
          "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "erf",
          "log", "sin", "cos", "reciprocal", "sigmoid_", "tanh_", "hardtanh_", "clamp_", "hardswish_", "gelu_",
          "leaky_relu_", "elu_", "square", "hardswish", "hardsigmoid", "hardtanh", "elu", "leaky_relu",
          "softplus", "mish", "clamp", "clamp_min", "clamp_max", "pow.Tensor_Scalar", "dropout", "native_dropout",
          "feature_dropout", "alpha_dropout", "relu6", "nan_to_num",
          # in-place forms export keeps from the module code (``nn.Dropout(inplace=True)``)
          "dropout_", "feature_dropout_", "alpha_dropout_", "hardsigmoid_", "mish_", "relu6_",
          # bounds given as tensors (``torch.clamp(x, self.lo, self.hi)``): they broadcast like operands
          "clamp.Tensor", "clamp_min.Tensor", "clamp_max.Tensor", "clamp_.Tensor")
# casts and copies: the same values, so top-k channel indices pass through them (keeps_values)
_register(OpHandler(T.passthrough, macs=False, view_step=T._same_dim_step, keeps_values=True),
          "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to.dtype", "to.dtype_layout", "to.device",
          "to.other", "_to_copy", "type_as")
# broadcasting element-wise ops
_register(OpHandler(T.elementwise, macs=False, view_step=T._scalar_operand_step),
          "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor", "mul.Tensor",
          "mul.Scalar", "div.Tensor", "div.Scalar", "div.Tensor_mode", "pow.Tensor_Tensor", "maximum", "minimum",
          "where.self", "masked_fill.Scalar", "masked_fill.Tensor", "addcmul", "addcdiv", "lerp.Scalar",
          "lerp.Tensor",
          # in-place forms (``out += identity``), as the ``Tensor.add_`` methods are
          "add_.Tensor", "add_.Scalar", "sub_.Tensor", "mul_.Tensor", "mul_.Scalar", "div_.Tensor", "masked_fill_.Scalar")
# reductions: a mean over pruned channels becomes sum * (1 / original count)
_register(OpHandler(T.reduction, macs=False, rewrite=T.rewrite_mean),
          "mean.dim", "sum.dim_IntList", "amax", "amin", "linalg_vector_norm", "norm.ScalarOpt_dim",
          "var.correction", "std.correction", "var.dim", "std.dim")
_register(OpHandler(T.topk, macs=False), "topk")
_register(OpHandler(T.sort, macs=False, reads_indices=True), "sort", "sort.stable")
_register(OpHandler(T.histc, macs=False, rewrite=T.rewrite_histc, reads_indices=True), "histc")
_register(OpHandler(T.along_dim, macs=False), "softmax.int", "_softmax", "log_softmax.int", "_log_softmax",
          "cumsum")
# reshapes, permutations, broadcasting: literal sizes at args[1] are rewritten
_register(OpHandler(T.reshape, macs=False, rewrite=T.rewrite_sizes, view_step=T._reshape_step, keeps_values=True),
          "view", "_unsafe_view", "reshape")
_register(OpHandler(T.reshape, macs=False, view_step=T._reshape_step, keeps_values=True),
          "unsqueeze", "squeeze.dim", "squeeze.dims", "squeeze", "flatten.using_ints")
# ``aten.unflatten(x, dim, sizes)`` (``nn.MultiheadAttention``'s packed q/k/v): sizes at args[2]
_register(OpHandler(T.reshape, macs=False, rewrite=T.rewrite_unflatten, view_step=T._reshape_step, keeps_values=True),
          "unflatten.int")
_register(OpHandler(T.expand, macs=False, rewrite=T.rewrite_sizes, view_step=T._expand_step), "expand")
_register(OpHandler(T.expand_as, macs=False), "expand_as")
_register(OpHandler(T.permute, macs=False, view_step=T._permute_step), "permute")
_register(OpHandler(T.roll, macs=False), "roll")
# fresh tensors: ``new_zeros(x, sizes)`` reads only x's dtype and device, ``zeros_like(x)`` its shape too
_register(OpHandler(T.new_filled, macs=False), "new_zeros", "new_ones", "new_empty", "new_full")
_register(OpHandler(T.passthrough, macs=False, view_step=T._same_dim_step),
          "zeros_like", "ones_like", "empty_like", "full_like")
# ``aten.pad(x, pad, mode, value)`` / ``constant_pad_nd(x, pad, value)``: pads listed from the last dim
_register(OpHandler(T.pad, macs=False), "pad", "constant_pad_nd")
_register(OpHandler(T.transpose, macs=False, view_step=T._transpose_step),
          "transpose.int", "swapaxes", "swapdims", "movedim.int")
_register(OpHandler(T.t, macs=False, view_step=T._transpose_step), "t", "numpy_T")
_register(OpHandler(T.cat, macs=False), "cat")
_register(OpHandler(T.stack, macs=False), "stack")
_register(OpHandler(T.split, macs=False, rewrite=T.rewrite_split), "split.Tensor", "split_with_sizes", "chunk",
          "unbind.int")
_register(OpHandler(T.repeat_interleave, macs=False), "repeat_interleave.self_int")
# channel-mixing ops
_register(OpHandler(T.matmul), "matmul", "bmm", "mm")
_register(OpHandler(T.sdpa), "scaled_dot_product_attention")
_register(OpHandler(T.einsum), "einsum")  # operands packed in a list: einsum(equation, [x, y])
_register(OpHandler(L.linear_fn), "linear")
_register(OpHandler(L.layer_norm_fn, macs=False, rewrite=L.rewrite_layer_norm_fn), "layer_norm")
_register(OpHandler(L.rms_norm_fn, macs=False, rewrite=L.rewrite_rms_norm_fn), "rms_norm")


@op_handler(functions=_ops("embedding"), macs=False)
def embedding(a: A, node: Node):
    """``aten.embedding(weight, indices, ...)``: the output's last dim is the weight's columns."""
    weight = node.args[0]
    ws = a.shape(weight)
    if not (isinstance(weight, Node) and weight.op == "get_attr") or ws is None or len(ws) != 2:
        a.fix(a.map(weight), f"{describe(node)} with a computed weight")
        return None
    out_ids = a.new(ws[1])
    a.bind_param(weight.target, 1, out_ids, importance="out")
    return ChannelMap(len(a.shape(node)) - 1, out_ids)


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


@op_handler(functions=_ops("slice.Tensor"), macs=False, rewrite=rewrite_slice)
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


@op_handler(functions=_ops("select.int"), macs=False)
def select_int(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    dim = node.args[1] % len(a.shape(node.args[0]))
    if dim == m.axis:
        a.fix(m, f"{describe(node)} picks a single channel")
        return None
    return ChannelMap(m.axis - (1 if m.axis > dim else 0), m.ids)


@op_handler(functions=_ops("reshape_as", "view_as"), macs=False)
def reshape_as(a: A, node: Node):
    """``aten.reshape_as(x, other)``: a reshape to the shape the shrunk model reads from ``other``
    (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``), so the result's channels are ``other``'s."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    out, theirs = T.reshape(a, node), a.map(other)
    if out is None and theirs is None:
        return None
    if isinstance(out, ChannelMap) and isinstance(theirs, ChannelMap) and out.axis == theirs.axis \
            and out.size == theirs.size:
        a.union(out.ids, theirs.ids)
        return out
    a.fix([a.map(node.args[0]), out, theirs], f"{describe(node)} takes its shape from a tensor with other channels")
    return None


@op_handler(functions=_ops("index_select"), macs=False)
def index_select(a: A, node: Node):
    return T.select_like(a, node)


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
    """Chain step (:func:`~hfp_fx.passes.rules_tensor.param_view_chain`): the input dim behind
    output dim ``d``, when it is not one the index tensors produce (a relative-position table
    ``table[index]``: its heads dim comes through whole)."""
    layout = _index_layout(a, node)
    if layout is None:
        return None
    return next((e for e in range(layout[0]) if e not in layout[1] and _index_out_dim(layout, e) == d), None)


@op_handler(functions=_ops("index.Tensor"), macs=False, view_step=_index_step)
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



@op_handler(functions=_ops("addmm"))
def addmm(a: A, node: Node):
    """``addmm(bias, x, weight)`` with parameters ``bias`` (out,) and ``weight`` (in, out): a linear
    layer with a transposed weight (Hugging Face ``Conv1D``)."""
    bias, x, weight = node.args[:3]
    ws, bs = a.shape(weight), a.shape(bias)
    m = a.cmap(x)
    plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    if not (plain and isinstance(weight, Node) and weight.op == "get_attr" and isinstance(bias, Node)
            and bias.op == "get_attr" and ws is not None and bs is not None and len(bs) == 1):
        return _fixed(a, node)
    fin, fout = ws
    out_ids = a.new(fout)
    a.bind_param(weight.target, 1, out_ids, importance="out")
    a.bind_param(bias.target, 0, out_ids)
    tokens = a.shape(x)[0]
    if m is not None and m.axis == 1:
        a.bind_param(weight.target, 0, m.ids, importance="in")
        a.gate(1, m, weight=(weight.target, 0))
        a.add_macs(tokens, out_ids, m.ids)
    else:
        if m is not None:
            a.fix(m, f"{describe(node)} contracts over a dim that is not the channel dim")
        a.add_macs(tokens * fin, out_ids)
    return ChannelMap(1, out_ids)


def _fixed(a: A, node: Node):
    a.fix([a.map(x) for x in node.args if isinstance(x, Node)], f"{describe(node)} with computed operands")
    return None


# convolutional networks (what ``capture="auto"`` falls back to for a CNN tracing cannot capture)
_register(OpHandler(L.conv_fn, rewrite=L.rewrite_conv_groups), "conv1d", "conv2d", "conv3d",
          "conv1d.padding", "conv2d.padding", "conv3d.padding")  # padding="same" / "valid"
for _k, _names in ((1, ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d")),
                   (2, ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
                        "adaptive_max_pool2d")),
                   (3, ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d"))):
    _register(OpHandler(T._spatial(_k), macs=False), *_names)
_register(OpHandler(T._spatial(None), macs=False), "upsample_nearest2d.vec", "upsample_bilinear2d.vec")


# ``aten.group_norm(x, num_groups, weight, bias, eps, cudnn_enabled)``: F.group_norm's order
_register(OpHandler(L.group_norm_fn, macs=False, rewrite=L.rewrite_group_norm_fn), "group_norm")


@op_handler(functions=_ops("batch_norm"), macs=False)
def batch_norm(a: A, node: Node):
    """``aten.batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, ...)``:
    per channel on dim 1 (``F.batch_norm`` puts the running statistics first)."""
    return L.per_channel_norm_args(a, node, ("weight", "bias", "running_mean", "running_var"))


# mixture-of-experts: ``grouped_mm(x, w, offs)``, ``x`` (tokens sorted by expert, K) times the
# expert's ``w[e]`` (K, N) for the rows ``offs`` gives it; transformers' experts hold ``w`` as a
# 3-d parameter (experts, N, K) seen through ``transpose(-2, -1)``
def _expert_weight(a: A, w: Node):
    """``(parameter name, {dim of w: dim of the parameter})`` behind a grouped-mm weight operand:
    the parameter itself or its transpose of the last two dims, read by this node alone."""
    if w.op == "get_attr":
        return str(w.target), {0: 0, 1: 1, 2: 2}
    src = w.args[0] if w.op == "call_function" and w.args else None
    if (w.target in _ops("transpose.int") and isinstance(src, Node) and src.op == "get_attr"
            and len(w.users) == 1 and {d % 3 for d in w.args[1:3]} == {1, 2}):
        return str(src.target), {0: 0, 1: 2, 2: 1}
    return None, None


@op_handler(op_names=["transformers::grouped_mm_fallback"], functions=_ops("_grouped_mm"))
def grouped_mm(a: A, node: Node):
    """The experts' matmul: the tokens' channels ``K`` are contracted with dim 1 of ``w``, the
    output's channels are dim 2 of ``w``, one width for every expert (one 3-d parameter).  When
    the offsets carry the experts (``cumsum(histc(top-k indices))``), whole experts go with
    dim 0 of ``w``: a removed expert gets no tokens."""
    x, w = node.args[0], node.args[1]
    xs, ws = a.shape(x), a.shape(w)
    mx = a.cmap(x)
    param, dims = _expert_weight(a, w) if isinstance(w, Node) else (None, None)
    if param is None or xs is None or ws is None or len(xs) != 2 or len(ws) != 3:
        return _fixed(a, node)
    out_ids = a.new(ws[2])
    a.bind_param(param, dims[2], out_ids, importance="out")
    view = {2: out_ids}
    offsets = a.cmap(node.args[2]) if len(node.args) > 2 else None
    if offsets is not None and offsets.axis == 0 and offsets.size == ws[0]:  # per-expert row ends
        a.bind_param(param, dims[0], offsets.ids)
        view[0] = offsets.ids
    if mx is not None and mx.axis == 1:
        a.bind_param(param, dims[1], mx.ids, importance="in")
        a.gate(0, mx)
        view[1] = mx.ids
        a.add_macs(xs[0], out_ids, mx.ids)
    else:
        if mx is not None:
            a.fix(mx, f"{describe(node)} contracts over a dim that is not the channel dim")
        a.add_macs(xs[0] * xs[1], out_ids)
    if w.op != "get_attr":
        a.param_views[w.name] = view
    return ChannelMap(1, out_ids)
