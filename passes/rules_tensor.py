"""Coupling rules for tensor functions and methods (no parameters of their own).

Each rule states how channel positions flow from inputs to outputs.  The invariant every rule
keeps: the pruned op applied to the pruned inputs equals the original output restricted to the
kept positions.  Where an op cannot keep it (reducing over channels, mixing them non-linearly),
the rule fixes the channels and says why.
"""
from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap, IndexValues
from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe, op_name
from hfp_fx.meta_shortcuts import adaptive_avg_pool2d_shape, arithmetic_shape, cat_shape, pointwise_shape
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler, op_handler
from hfp_fx.passes.edit import emit, is_aten
from hfp_fx.passes.rules_layers import linear_core

if TYPE_CHECKING:  # rewrites receive the shrink pass's edit context
    from hfp_fx.passes.shrink import ShrinkEdit

__all__ = ["passthrough", "broadcast_couple", "bind_param_view", "param_view_chain", "reshape_map"]

A = ChannelAnalysis


# -------------------------------------------------------------------------------------------
# elementwise: unary pass-through and broadcasting n-ary ops
# -------------------------------------------------------------------------------------------
#: element-wise activations and dropout: their outputs keep the input's layout, so the shape
#: pass builds them without running the op (``pointwise_shape``)
_ACTIVATION_MODULES = [
    torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Hardswish, torch.nn.Hardsigmoid,
    torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Mish, torch.nn.Identity,
    torch.nn.Dropout, torch.nn.Dropout2d,
]
_ACTIVATION_FUNCTIONS = [F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.dropout, torch.relu,
                         torch.sigmoid, torch.tanh]
#: other per-position ops (run by the shape pass)
_UNARY_FUNCTIONS = [
    torch.relu_, F.relu_, F.elu, F.selu, F.celu, F.mish, F.hardtanh, F.leaky_relu, F.softplus, F.softsign,
    F.tanhshrink, F.logsigmoid, F.sigmoid, F.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt,
    torch.square, torch.clamp, torch.clip, torch.erf, torch.log, torch.sin, torch.cos, torch.reciprocal,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.nn.functional.threshold, operator.pos,
    torch.nan_to_num, torch.sign, torch.floor, torch.round, torch.trunc, torch.frac,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "abs", "abs_", "neg", "neg_",
    "sqrt", "rsqrt", "square", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "clamp_min_",
    "erf", "log", "reciprocal", "requires_grad_", "nan_to_num", "sign", "floor", "round",
    "trunc", "frac", "sin", "cos", "fill_", "zero_", "__neg__",
]
#: casts and copies: the same values (``keeps_values``), so top-k indices pass through them too
_VALUE_FUNCTIONS = [torch.Tensor.contiguous]
_VALUE_METHODS = ["contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "long", "int", "to", "type",
                  "type_as", "cpu", "cuda"]
#: the same ops as ``torch.export`` records them (ATen overloads)
_UNARY_ATEN = [
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "erf", "log",
    "sin", "cos", "reciprocal", "sigmoid_", "tanh_", "hardtanh_", "clamp_", "hardswish_", "gelu_", "leaky_relu_",
    "elu_", "square", "hardswish", "hardsigmoid", "hardtanh", "elu", "leaky_relu", "softplus", "mish", "clamp",
    "clamp_min", "clamp_max", "pow.Tensor_Scalar", "dropout", "native_dropout", "feature_dropout",
    "alpha_dropout", "relu6", "nan_to_num",
    # in-place forms export keeps from the module code (``nn.Dropout(inplace=True)``)
    "dropout_", "feature_dropout_", "alpha_dropout_", "hardsigmoid_", "mish_", "relu6_",
    # bounds given as tensors (``torch.clamp(x, self.lo, self.hi)``): they broadcast like operands
    "clamp.Tensor", "clamp_min.Tensor", "clamp_max.Tensor", "clamp_.Tensor",
    # fresh tensors of ``x``'s shape keep its channels (``new_zeros`` does not: ``new_filled``)
    "zeros_like", "ones_like", "empty_like", "full_like",
]
_VALUE_ATEN = ["clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to.dtype", "to.dtype_layout",
               "to.device", "to.other", "_to_copy", "type_as"]
_UNARY_MODULES = [
    torch.nn.CELU, torch.nn.SELU, torch.nn.Hardtanh, torch.nn.Softplus, torch.nn.Softsign, torch.nn.Tanhshrink,
    torch.nn.LogSigmoid, torch.nn.Threshold, torch.nn.Dropout1d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
]


@op_handler(methods=["size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device", "is_contiguous",
                     "is_floating_point", "stride"], macs=False)
def metadata(a: A, node: Node):
    """``x.size()``, ``x.dim()``, ...: numbers about a tensor, no channels (the shrink pass finds
    reads of a pruned channel dim's size by itself)."""
    return None


# -------------------------------------------------------------------------------------------
# view steps (``OpHandler.view_step``): how an op maps one output dim back to one input dim of the
# same size, so that a parameter seen through it can be bound (``param_view_chain``)
# -------------------------------------------------------------------------------------------
def _same_dim_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    """Per-position unary ops, casts and copies: the same dim, if nothing else is combined."""
    if len(in_shape) != len(out_shape):
        return None
    extra = [v for v in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(v, Node)]
    if extra and node.target not in ("to", "type_as"):  # clamp(min=t) combines another tensor
        return None
    return d


def _scalar_operand_step(a: A, node: Node, d: int, in_shape, out_shape) -> Optional[int]:
    """Arithmetic of one tensor with scalars (Gemma's RMSNorm scale ``1 + w``): the same dim."""
    tensors = [v for v in list(node.args) + list(node.kwargs.values()) if isinstance(v, Node)]
    return d if len(tensors) == 1 and len(in_shape) == len(out_shape) else None


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



@op_handler(modules=_UNARY_MODULES, functions=_UNARY_FUNCTIONS, methods=_UNARY_METHODS, aten=_UNARY_ATEN,
            macs=False, view_step=_same_dim_step)
def passthrough(a: A, node: Node):
    """Per-position ops: the output carries the first tensor argument's channels."""
    out = a.map(node.args[0]) if node.args else None
    if out is not None and isinstance(a.shape(node), torch.Size):
        in_shape, out_shape = a.shape(node.args[0]), a.shape(node)
        if in_shape is not None and len(in_shape) != len(out_shape):
            a.fix(out, f"{describe(node)} changed the rank")
            return None
    # tensor-valued extra arguments (clamp(min=tensor), type_as(other)) broadcast like operands
    others = [x for x in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(x, Node) and a.shape(x) is not None]
    if others and op_name(node) not in ("type_as", "to", "_to_copy"):
        return broadcast_couple(a, node, [node.args[0]] + others)
    return out


DEFAULT_RULES.register(OpHandler(passthrough, macs=False, view_step=_same_dim_step, keeps_values=True),
                       functions=_VALUE_FUNCTIONS, methods=_VALUE_METHODS, aten=_VALUE_ATEN)


DEFAULT_RULES.register(OpHandler(passthrough, macs=False, shape=pointwise_shape, view_step=_same_dim_step),
                       modules=_ACTIVATION_MODULES, functions=_ACTIVATION_FUNCTIONS)

try:  # torchvision's stochastic depth scales whole samples: per position
    from torchvision.ops import stochastic_depth as _sd
    from torchvision.ops import StochasticDepth as _SD

    DEFAULT_RULES.register(OpHandler(passthrough, macs=False, view_step=_same_dim_step), modules=[_SD], functions=[_sd])
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass


def broadcast_couple(a: A, node: Node, operands: Sequence[Any], out_shape: Optional[torch.Size] = None):
    """Broadcasting n-ary op: operands that are full-size along the channel axis must agree."""
    out_shape = a.shape(node) if out_shape is None else out_shape
    if not isinstance(out_shape, torch.Size):
        a.fix([a.map(x) for x in operands], f"{describe(node)} has a non-tensor result")
        return None
    rank = len(out_shape)
    tracked, untracked = [], []
    for x in operands:
        shape = a.shape(x)
        if not isinstance(shape, torch.Size):
            continue
        m = a.map(x)
        if isinstance(m, ChannelMap):
            tracked.append((x, m, m.axis + rank - len(shape), shape[m.axis]))
        elif m is not None:
            a.fix(m, f"{describe(node)} received a tuple")
        elif not any(x is y for y, _ in untracked):  # ``where(c, g, g)``: one operand, bound once
            untracked.append((x, shape))
    if not tracked:
        return None
    axes = {t[2] for t in tracked}
    if len(axes) > 1:
        a.fix([t[1] for t in tracked], f"{describe(node)} combines tensors whose channels lie on different axes")
        return None
    axis = axes.pop()
    size = out_shape[axis]
    full = [m for _, m, _, s in tracked if s == size]
    for _, m, _, s in tracked:
        if s != size:
            a.fix(m, f"{describe(node)} broadcasts a {s}-channel tensor over {size} channels")
    if not full:
        return None
    base = full[0].ids
    for m in full[1:]:
        a.union(base, m.ids)
    for x, shape in untracked:
        d = axis - (rank - len(shape))
        if d >= 0 and shape[d] == size and size > 1:
            # a parameter combined per channel (``x + pos_embedding``, ``x * gamma.view(1, -1, 1, 1)``,
            # ``cat([cls_token.expand(n, -1, -1), x], 1)``): slice it with the channels
            if not bind_param_view(a, x, d, base):
                a.fix(base, f"{describe(node)} combines the channels with the untracked tensor `{x.name}`")
    return ChannelMap(axis, base)


def bind_param_view(a: A, x: Node, dim: int, ids: torch.Tensor) -> bool:
    """Bind the parameter that untracked operand ``x`` views to channels ``ids`` along its ``dim``.

    A parameter rarely meets the channels directly: a class token is ``expand``-ed to the batch,
    a layer-scale ``gamma`` is ``view``-ed to ``(1, C, 1, 1)``, a position embedding is sliced to
    the number of tokens or cast with ``.to(x.dtype)``.  The chain from the ``get_attr`` to ``x``
    is followed back through such view-like single-input ops (:func:`param_view_chain`); when
    ``dim`` of ``x`` is one dim of the parameter, that dim is bound to ``ids`` and every node on
    the chain gets the channel map it would have had if the parameter were tracked, so the
    shrink pass rewrites their literal sizes (``expand(b, 1, 768)``) and its shape check
    predicts them.  Returns ``False`` (nothing recorded) when the chain cannot be followed.
    """
    found = param_view_chain(a, x, dim)
    if found is None:
        return False
    target, param_dim, chain = found
    a.bind_param(target, param_dim, ids)
    for n, d in chain:
        a.maps[n.name] = ChannelMap(d, ids)
    return True


def param_view_chain(a: A, x: Node, dim: int) -> Optional[Tuple[str, int, List[Tuple[Node, int]]]]:
    """``(parameter name, its dim, [(chain node, dim), ...])`` behind ``x``'s ``dim``, or ``None``.

    Each step maps one output dim of a view-like op to one input dim of the same size:
    A handler's ``view_step`` says whether and how its op qualifies.  Giving a chain node a channel map
    after it was analysed is sound only if no node analysed already read it as untracked, so
    a chain node used by any analysed node other than its successor on the chain stops the walk
    (later users see the map like any tracked input).
    """
    chain: List[Tuple[Node, int]] = []
    consumer, node, d = a.node, x, dim
    while True:
        if node.op == "get_attr":
            return str(node.target), d, chain
        if a.map(node) is not None or node.op not in ("call_method", "call_function"):
            return None
        if any(u is not consumer and u.name in a.maps for u in node.users):
            return None
        handler = a.rules.lookup(node)
        step = handler.view_step if handler is not None else None
        # the input the chain goes on through: ``1.0 + w`` has its tensor second
        src = next((v for v in node.args if isinstance(v, Node)), None)
        if step is None or not isinstance(src, Node):
            return None
        in_shape, out_shape = a.shape(src), a.shape(node)
        if not isinstance(in_shape, torch.Size) or not isinstance(out_shape, torch.Size):
            return None
        prev = step(a, node, d, in_shape, out_shape)
        if prev is None or not 0 <= prev < len(in_shape) or in_shape[prev] != out_shape[d]:
            return None
        chain.append((node, d))
        consumer, node, d = node, src, prev


#: ``+ - * /`` whose output layout the shape pass builds without running them (``arithmetic_shape``)
_ARITHMETIC_FUNCTIONS = [operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                         torch.div]
_ARITHMETIC_METHODS = ["add", "sub", "mul", "div", "__add__", "__sub__", "__mul__", "__truediv__", "__radd__",
                       "__rmul__"]
_BINARY_FUNCTIONS = [
    operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.subtract, torch.multiply, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.fmax, torch.fmin, torch.where, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.pow, torch.masked_fill, torch.eq, torch.ne, torch.lt,
    torch.le, torch.gt, torch.ge, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
]
_BINARY_METHODS = [
    "add_", "sub_", "mul_", "div_", "true_divide", "maximum", "minimum", "where", "lerp", "lerp_", "addcmul",
    "addcmul_", "addcdiv", "pow", "pow_", "masked_fill", "masked_fill_", "__rsub__", "eq", "ne", "lt", "le",
    "gt", "ge",
]
_BINARY_ATEN = [
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "rsub.Scalar", "rsub.Tensor", "mul.Tensor", "mul.Scalar",
    "div.Tensor", "div.Scalar", "div.Tensor_mode", "pow.Tensor_Tensor", "maximum", "minimum", "where.self",
    "masked_fill.Scalar", "masked_fill.Tensor", "addcmul", "addcdiv", "lerp.Scalar", "lerp.Tensor",
    # in-place forms (``out += identity``), as the ``Tensor.add_`` methods are
    "add_.Tensor", "add_.Scalar", "sub_.Tensor", "mul_.Tensor", "mul_.Scalar", "div_.Tensor", "masked_fill_.Scalar",
]


@op_handler(functions=_BINARY_FUNCTIONS, methods=_BINARY_METHODS, aten=_BINARY_ATEN, macs=False,
            view_step=_scalar_operand_step)
def elementwise(a: A, node: Node):
    return broadcast_couple(a, node, list(node.args) + list(node.kwargs.values()))


DEFAULT_RULES.register(OpHandler(elementwise, macs=False, shape=arithmetic_shape, view_step=_scalar_operand_step,
                                 size_arithmetic=True),
                       functions=_ARITHMETIC_FUNCTIONS, methods=_ARITHMETIC_METHODS)
# Python operators that also derive sizes from sizes read at run time (``C // heads``)
DEFAULT_RULES.register(OpHandler(elementwise, macs=False, view_step=_scalar_operand_step, size_arithmetic=True),
                       functions=[operator.pow, operator.floordiv, operator.mod])
DEFAULT_RULES.register(OpHandler(passthrough, macs=False, view_step=_same_dim_step, size_arithmetic=True),
                       functions=[operator.neg])


@op_handler(functions=[math.ceil, math.floor, int], macs=False, size_arithmetic=True)
def scalar(a: A, node: Node):
    """Python scalar functions of sizes (``math.ceil(H / p)``): no channels; one that reads a
    tensor with channels takes a single value of it."""
    tracked = [a.map(x) for x in node.args if isinstance(x, Node)]
    if any(t is not None for t in tracked):
        a.fix(tracked, f"{describe(node)} reads a tensor as one Python number")
    return None


@op_handler(functions=[torch.max, torch.min], methods=["max", "min"], macs=False)
def max_min(a: A, node: Node):
    second = a.arg(node, 1, "other", a.arg(node, 1, "dim"))
    if isinstance(second, Node) and isinstance(a.shape(second), torch.Size):
        return broadcast_couple(a, node, [node.args[0], second])
    return reduction(a, node)


# -------------------------------------------------------------------------------------------
# reductions, softmax, spatial ops
# -------------------------------------------------------------------------------------------
_REDUCTIONS_F = [torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
                 torch.norm, torch.prod, torch.argmax, torch.argmin, torch.all, torch.any]
_REDUCTIONS_M = ["mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "prod", "argmax", "argmin",
                 "all", "any"]


# positional (dim, keepdim) indices where they differ from (1, 2): norm(x, p, dim, keepdim),
# std/var(x, dim, unbiased, keepdim)
_REDUCTION_ARGS = {"norm": (2, 3), "std": (1, 3), "var": (1, 3), "linalg_vector_norm": (2, 3)}


def _reduced_dims(node: Node, rank: int) -> Optional[List[int]]:
    """The (non-negative) dims a reduction node reduces; every dim for ``dim=None``; ``None`` when
    they are computed at run time."""
    dim_pos, _ = _REDUCTION_ARGS.get(op_name(node), (1, 2))
    dims = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    return sorted({d % rank for d in dims})


def _zero_blind(node: Node) -> bool:
    """Whether the reduction's value is unchanged by extra zero entries: sums, and p-norms with p > 0.

    Such a reduction over the channels is exact on the kept channels once the removed ones are
    zero (its input is a gate site); a mean is ``sum / d`` with the original count ``d``, which
    the shrink pass writes (:func:`rewrite_mean`).  Max/min, variance, products are not.
    """
    name = op_name(node)
    if name in ("sum", "mean"):
        return True
    if name in ("norm", "linalg_vector_norm"):
        default = "fro" if name == "norm" else 2
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", node.kwargs.get("ord", default))
        return p in ("fro", None) or (isinstance(p, (int, float)) and p > 0)
    return False


def rewrite_mean(node: Node, edit: "ShrinkEdit") -> None:
    """A mean over pruned channels: ``sum(x) * (1 / original count)``, the masked model's value."""
    src = edit.map_of(node.args[0])
    if op_name(node) != "mean" or not edit.changed(src):
        return
    shape = edit.dense_shape(node.args[0])
    dims = _reduced_dims(node, len(shape))
    if dims is None or src.axis not in dims:
        return
    count = math.prod(shape[d] for d in dims)
    aten = is_aten(node)  # aten.mean.dim and aten.sum.dim_IntList take the same arguments
    node.target = "sum" if node.op == "call_method" else torch.ops.aten.sum.dim_IntList if aten else torch.sum
    graph = node.graph
    with graph.inserting_after(node):
        scaled = emit(graph, operator.mul, (node, 1.0 / count), aten=aten)
    scaled.meta = dict(node.meta)
    edit.replaced(node, scaled)
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


@op_handler(functions=[*_REDUCTIONS_F], methods=[*_REDUCTIONS_M], macs=False, rewrite=rewrite_mean,
            aten=["mean.dim", "sum.dim_IntList", "amax", "amin", "linalg_vector_norm", "norm.ScalarOpt_dim",
                  "var.correction", "std.correction", "var.dim", "std.dim"])
def reduction(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return tuple(None for _ in a.shape(node)) if _is_tuple_shape(a.shape(node)) else None
    in_shape = a.shape(node.args[0])
    _, keep_pos = _REDUCTION_ARGS.get(op_name(node), (1, 2))
    keepdim = bool(a.arg(node, keep_pos, "keepdim", False))
    dims = _reduced_dims(node, len(in_shape))
    if dims is None:
        a.fix(m, f"{describe(node)} reduces over dims computed at run time")
        return None
    if m.axis in dims:
        if _zero_blind(node) and not _is_tuple_shape(a.shape(node)):
            a.gate(0, m)  # reads every channel: removed ones must be zero there
            return None
        a.fix(m, f"{describe(node)} reduces over the channel dim; pruning would change its value")
        return None
    axis = m.axis if keepdim else m.axis - sum(1 for d in dims if d < m.axis)
    out = ChannelMap(axis, m.ids)
    return (out, out) if _is_tuple_shape(a.shape(node)) else out


@op_handler(functions=[F.normalize], macs=False)
def normalize(a: A, node: Node):
    """``F.normalize(x, p, dim)``: a p-norm (p > 0) ignores zeros, so over the channels it is exact
    once the removed channels are zero (a gate site), and the output keeps the channels."""
    m = a.cmap(node.args[0])
    if m is None:
        return None
    p = a.arg(node, 1, "p", 2.0)
    dim = a.arg(node, 2, "dim", 1)
    rank = len(a.shape(node.args[0]))
    if not isinstance(dim, int) or dim % rank != m.axis:
        return m if isinstance(dim, int) else a.fix(m, f"{describe(node)} uses a run-time dim")
    if not (isinstance(p, (int, float)) and p > 0):
        a.fix(m, f"{describe(node)} with p <= 0 counts the removed channels")
        return None
    a.gate(0, m)
    return m


@op_handler(modules=[torch.nn.Softmax, torch.nn.LogSoftmax],
            functions=[F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.cumsum, torch.cumprod],
            methods=["softmax", "log_softmax", "cumsum", "cumprod"],
            aten=["softmax.int", "_softmax", "log_softmax.int", "_log_softmax", "cumsum"], macs=False)
def along_dim(a: A, node: Node):
    """Ops that mix values along one ``dim``: fine unless that dim carries channels.

    Two exceptions are exact: a softmax over the channels, whose removed inputs the reference
    sets to ``-inf`` (a ``"logit"`` gate site: the softmax of the rest is the softmax over the
    kept channels, and the removed outputs are 0), and a cumsum over per-channel counts of top-k
    indices (``histc``) read only as a grouped matmul's offsets: a removed channel counts 0, so
    its offset only marks an empty group (MoE experts).
    """
    m = a.cmap(node.args[0])
    if m is None:
        return None
    module = a.module(node)
    dim = getattr(module, "dim", None) if module is not None else a.arg(node, 1, "dim")
    rank = len(a.shape(node.args[0]))
    if dim is None or not isinstance(dim, int) or dim % rank == m.axis:
        name = type(module).__name__.lower() if module is not None else op_name(node)
        if isinstance(dim, int) and name in ("softmax", "_softmax"):
            a.gate(0, m, kind="logit")
            return m
        if isinstance(dim, int) and name == "cumsum" and _counts_of_indices(a, node.args[0]) and _only_offsets(a, node):
            return m
        a.fix(m, f"{describe(node, module)} mixes values across channels")
    return m


def _keeps_values(a: A, node: Node) -> bool:
    handler = a.rules.lookup(node, a.module(node))
    return handler is not None and handler.keeps_values


def _only_offsets(a: A, node: Node) -> bool:
    """Whether every reader of ``node`` (through casts) is a grouped matmul's offsets: a removed
    channel's running sum repeats the previous one, which only an empty group of rows ignores."""
    for user in node.users:
        if _keeps_values(a, user):
            if not _only_offsets(a, user):
                return False
        elif not (op_name(user) in ("grouped_mm_fallback", "_grouped_mm") and len(user.args) > 2
                  and user.args[2] is node):
            return False
    return True


def _counts_of_indices(a: A, x: Node) -> bool:
    """Whether ``x`` is (a cast of) a ``histc`` node: per-channel counts of top-k indices."""
    while isinstance(x, Node) and x.op != "placeholder" and _keeps_values(a, x) and x.args:
        x = x.args[0]
    return isinstance(x, Node) and op_name(x) == "histc"


@op_handler(functions=[torch.topk], methods=["topk"], aten=["topk"], macs=False)
def topk(a: A, node: Node):
    """``topk(x, k, dim)``: over the channels, the indices become :class:`IndexValues` (which
    channels were picked) and at least ``k`` channels must stay; over another dim, both outputs
    keep ``x``'s channels."""
    x = node.args[0]
    m = a.cmap(x)
    if m is None:
        return None
    k, dim = a.arg(node, 1, "k"), a.arg(node, 2, "dim", -1)
    if not isinstance(k, int) or not isinstance(dim, int):
        a.fix(m, f"{describe(node)} with a computed k or dim")
        return None
    if dim % len(a.shape(x)) != m.axis:
        return (m, m)
    a.floor(m.ids, k, f"{describe(node)} picks {k} of them")
    return (None, IndexValues(m.ids))


@op_handler(functions=[torch.sort], methods=["sort"], aten=["sort", "sort.stable"], macs=False, reads_indices=True)
def sort(a: A, node: Node):
    """Sorted top-k indices are still indices (the permutation is not); sorting along another
    dim than the channels keeps them."""
    x = node.args[0]
    value = a.map(x)
    if isinstance(value, IndexValues):
        return (value, None)
    m = a.cmap(x)
    if m is None:
        return None
    dim = a.arg(node, 1, "dim", -1)
    if isinstance(dim, int) and dim % len(a.shape(x)) != m.axis:
        return (m, m)
    a.fix(m, f"{describe(node)} sorts across channels")
    return None


def _histc_args(node: Node):
    get = lambda i, name, default: node.args[i] if len(node.args) > i else node.kwargs.get(name, default)  # noqa: E731
    return get(1, "bins", 100), get(2, "min", 0), get(3, "max", 0)


def rewrite_histc(node: Node, edit) -> None:
    """One bin per kept channel: ``bins`` and ``max`` count the kept channels."""
    m = edit.map_of(node)
    if m is None or not edit.changed(m):
        return
    n = edit.kept(m)
    node.args = (node.args[0], n, 0, n - 1)
    node.kwargs = {}


@op_handler(functions=[torch.histc], methods=["histc"], aten=["histc"], macs=False, rewrite=rewrite_histc,
            reads_indices=True)
def histc(a: A, node: Node):
    """``histc(indices, bins=n, min=0, max=n - 1)`` of top-k channel indices: one count per
    channel (how many tokens each expert gets)."""
    value = a.map(node.args[0])
    if isinstance(value, IndexValues):
        n = value.ids.numel()
        if _histc_args(node) == (n, 0, n - 1):
            return ChannelMap(0, value.ids)
        a.fix(value.ids, f"{describe(node)} counts channel indices in bins other than one per channel")
        return None
    a.fix(a.cmap(node.args[0]), f"{describe(node)} mixes values across channels")
    return None


def _spatial(k: Optional[int]):
    """Rule for ops that act on the last ``k`` dims (pooling, interpolation)."""

    def rule(a: A, node: Node):
        m = a.cmap(node.args[0]) if node.args else None
        if m is None:
            return None
        out_shape = a.shape(node)
        if _is_tuple_shape(out_shape):  # max_pool with return_indices
            out_shape = out_shape[0]
        in_shape = a.shape(node.args[0])
        kk = k if k is not None else max(len(in_shape) - 2, 1)
        if m.axis >= len(in_shape) - kk or len(out_shape) != len(in_shape):
            a.fix(m, f"{describe(node, a.module(node))} acts on the channel dim")
            return None
        return m

    return rule


for _k, _mods, _fns, _aten in [
    (1, [torch.nn.MaxPool1d, torch.nn.AvgPool1d, torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveMaxPool1d,
         torch.nn.LPPool1d],
     [F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d],
     ["max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d"]),
    (2, [torch.nn.MaxPool2d, torch.nn.AvgPool2d, torch.nn.AdaptiveMaxPool2d, torch.nn.LPPool2d, torch.nn.ZeroPad2d,
         torch.nn.ReflectionPad2d, torch.nn.ReplicationPad2d],
     [F.max_pool2d, F.avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d],
     ["max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_max_pool2d"]),
    (3, [torch.nn.MaxPool3d, torch.nn.AvgPool3d, torch.nn.AdaptiveAvgPool3d, torch.nn.AdaptiveMaxPool3d],
     [F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d],
     ["max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d"]),
]:
    DEFAULT_RULES.register(OpHandler(_spatial(_k), macs=False), modules=_mods, functions=_fns, aten=_aten)
DEFAULT_RULES.register(OpHandler(_spatial(2), macs=False, shape=adaptive_avg_pool2d_shape),
                       modules=[torch.nn.AdaptiveAvgPool2d], functions=[F.adaptive_avg_pool2d],
                       aten=["adaptive_avg_pool2d"])
DEFAULT_RULES.register(OpHandler(_spatial(None), macs=False),
                       modules=[torch.nn.Upsample, torch.nn.UpsamplingNearest2d, torch.nn.UpsamplingBilinear2d],
                       functions=[F.interpolate, F.upsample], aten=["upsample_nearest2d.vec", "upsample_bilinear2d.vec"])


@op_handler(functions=[F.pad], aten=["pad", "constant_pad_nd"], macs=False)
def pad(a: A, node: Node):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    pads = a.arg(node, 1, "pad")
    rank = len(a.shape(node.args[0]))
    if not isinstance(pads, (list, tuple)):
        a.fix(m, f"{describe(node)} pads dims computed at run time")
        return None
    for i in range(0, len(pads), 2):
        d = rank - 1 - i // 2
        if d == m.axis and (pads[i] != 0 or pads[i + 1] != 0):
            a.fix(m, f"{describe(node)} pads the channel dim")
            return None
    return m


@op_handler(methods=["new_zeros", "new_ones", "new_empty", "new_full"],
            aten=["new_zeros", "new_ones", "new_empty", "new_full"], macs=False)
def new_filled(a: A, node: Node):
    """``x.new_zeros(sizes)`` and kin: a fresh tensor of literal sizes; ``x`` gives only its dtype and device.
    (``torch.zeros_like(x)`` takes ``x``'s shape, so it keeps ``x``'s channels: ``passthrough``.)"""
    return None


DEFAULT_RULES.register(OpHandler(passthrough, macs=False, view_step=_same_dim_step),
                       functions=[torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like])


@op_handler(functions=[torch.roll], methods=["roll"], aten=["roll"], macs=False)
def roll(a: A, node: Node):
    """``roll(x, shifts, dims)`` (Swin's shifted windows): per channel unless it rolls the channel dim."""
    m = a.cmap(node.args[0])
    if m is None:
        return None
    dims = a.arg(node, 2, "dims", ())
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    rank = len(a.shape(node.args[0]))
    if not dims or not all(isinstance(d, int) for d in dims) or m.axis in {d % rank for d in dims}:
        # no dims: the flattened tensor is rolled, which moves values across channels
        a.fix(m, f"{describe(node)} rolls the channel dim")
        return None
    return m


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


def _is_tuple_shape(s) -> bool:
    return isinstance(s, tuple) and not isinstance(s, torch.Size)

