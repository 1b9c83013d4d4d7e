"""Coupling rules for per-position tensor ops: activations, casts, broadcasting arithmetic,
reductions, softmax-like ops, top-k routing, pooling and padding (no parameters of their own).

Each rule states how channel positions flow from inputs to outputs.  The invariant every rule
keeps: the pruned op applied to the pruned inputs equals the original output restricted to the
kept positions.  Where an op cannot keep it (reducing over channels, mixing them non-linearly),
the rule fixes the channels and says why.  The shared helpers for operands and parameters seen
through views (``broadcast_couple``, ``bind_param_view``, ``param_view_chain``) live here too.
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
from hfp_fx.capture.meta_shortcuts import adaptive_avg_pool2d_shape, arithmetic_shape, pointwise_shape
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler, op_handler
from hfp_fx.passes.edit import emit, is_aten

if TYPE_CHECKING:  # rewrites receive the shrink pass's edit context
    from hfp_fx.passes.shrink import ShrinkEdit

A = ChannelAnalysis

__all__ = ["passthrough", "elementwise", "reduction", "broadcast_couple", "bind_param_view", "param_view_chain"]

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


def _is_tuple_shape(s) -> bool:
    return isinstance(s, tuple) and not isinstance(s, torch.Size)
