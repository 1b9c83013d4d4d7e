"""Coupling rules for layers with parameters: conv, linear, norms, embeddings, attention.

Producers (conv, linear) create a fresh element per output feature; their weights are bound to
the elements of both their output and input axes, so shrinking slices them and the cost model
counts them.  Channel-mixing inputs are recorded as gate sites.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelAnalysis, arg, describe
from hfp_fx.capture.meta_shortcuts import layer_shape, norm_shape
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler, op_handler
from hfp_fx.passes.edit import emit, is_aten

A = ChannelAnalysis

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_TRANSPOSED = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


@op_handler(aten=["addmm"])
def addmm(a: A, node: Node):
    """``addmm(bias, x, weight)`` with parameters ``bias`` (out,) and ``weight`` (in, out): a linear
    layer with a transposed weight (Hugging Face ``Conv1D``, GPT-2)."""
    bias, x, weight = node.args[:3]
    ws, bs = a.shape(weight), a.shape(bias)
    plain = arg(node, "beta", 1) == 1 and arg(node, "alpha", 1) == 1
    if not (plain and isinstance(weight, Node) and weight.op == "get_attr" and isinstance(bias, Node)
            and bias.op == "get_attr" and ws is not None and len(ws) == 2 and bs is not None and len(bs) == 1):
        a.fix([a.map(t) for t in node.args if isinstance(t, Node)], f"{describe(node)} with computed operands")
        return None
    return linear_core(a, node, x, weight.target, bias.target, ws[0], ws[1], out_dim=1)


def _pname(node: Node, attr: str) -> str:
    return f"{node.target}.{attr}"


def resize_conv(mod, before) -> None:
    """``in/out_channels`` and ``groups`` from the sliced weight (rows per conv-group are fixed)."""
    w = mod.weight
    if mod.groups > 1:
        per_group = before["weight"][0] // mod.groups  # rows per conv-group (out for conv, in for transposed)
        mod.groups = w.shape[0] // per_group
    if mod.transposed:
        mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
    else:
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_gated_call(mod):
    """A plain conv as ``F.convNd(x, weight, bias, stride, padding, dilation, groups)``."""
    if mod.transposed or mod.padding_mode != "zeros":
        return None
    return _CONV_FUNCTIONS[len(mod.kernel_size)], (mod.stride, mod.padding, mod.dilation, mod.groups)


@op_handler(modules=[*_CONVS, *_TRANSPOSED], shape=layer_shape, resize=resize_conv, gated_call=conv_gated_call)
def conv(a: A, node: Node):
    mod = a.module(node)
    x = node.args[0]
    transposed = isinstance(mod, _TRANSPOSED)
    w = _pname(node, "weight")
    b = _pname(node, "bias") if mod.bias is not None else None
    return conv_core(a, node, x, w, b, mod.in_channels, mod.out_channels, mod.groups,
                     math.prod(mod.kernel_size), transposed, mod)


def conv_core(a: A, node: Node, x, w: str, b: Optional[str], cin: int, cout: int, groups: int, kk: int,
              transposed: bool, mod=None):
    m = a.cmap(x)
    in_shape, out_shape = a.shape(x), a.shape(node)
    if m is not None and m.axis != len(in_shape) - (len(out_shape) - 2) - 1:
        a.fix(m, f"{describe(node, mod)} receives channels on a non-channel dim")
        m = None
    # MACs follow torch.utils.flop_counter: per output position for conv, per input position
    # for transposed conv.
    positions = (math.prod(in_shape) // cin) if transposed else (math.prod(out_shape) // cout)
    if groups == 1:
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        out_ids = a.new(cout)
        a.bind_param(w, out_dim, out_ids, importance="out")
        if m is not None:
            a.bind_param(w, in_dim, m.ids, importance="in")
            a.gate(0, m, weight=(w, in_dim))
            a.add_macs(positions * kk, out_ids, m.ids)
        else:
            a.add_macs(positions * kk * cin, out_ids)
    else:
        in_ids = m.ids if m is not None else a.new(cin, fixed=f"{describe(node, mod)} reads an untracked input")
        if cin == groups:  # depthwise, with an optional channel multiplier
            out_ids = in_ids.repeat_interleave(cout // cin)
        else:  # grouped: whole conv-groups are pruned, input block together with output block
            out_ids = a.new(cout)
            tin, tout = in_ids.reshape(groups, cin // groups), out_ids.reshape(groups, cout // groups)
            a.elements.union_along(tin, (1,))
            a.elements.union_along(tout, (1,))
            a.union(tin[:, 0].contiguous(), tout[:, 0].contiguous())
        # weight is (out, in/groups, k...) or, transposed, (in, out/groups, k...): dim 0 only
        a.bind_param(w, 0, in_ids if transposed else out_ids, importance="in" if transposed else "out")
        if transposed:
            a.add_macs(positions * kk * (cout // groups), in_ids)
        else:
            a.add_macs(positions * kk * (cin // groups), out_ids)
    a.bind_param(b, 0, out_ids)
    return ChannelMap(1, out_ids)


def resize_linear(mod, before) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def linear_gated_call(mod):
    return F.linear, ()


@op_handler(modules=[torch.nn.Linear, torch.nn.LazyLinear], shape=layer_shape, resize=resize_linear,
            gated_call=linear_gated_call)
def linear(a: A, node: Node):
    mod = a.module(node)
    b = _pname(node, "bias") if mod.bias is not None else None
    return linear_core(a, node, node.args[0], _pname(node, "weight"), b, mod.in_features, mod.out_features, mod)


@op_handler(functions=[F.linear], aten=["linear"])
def linear_fn(a: A, node: Node):
    weight, bias = a.arg(node, 1, "weight"), a.arg(node, 2, "bias")
    ws = a.shape(weight)
    if not (isinstance(weight, Node) and weight.op == "get_attr") or ws is None or len(ws) != 2:
        a.fix([a.map(node.args[0]), a.map(weight)], f"{describe(node)} with a computed weight")
        return None
    b = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
    out = linear_core(a, node, node.args[0], weight.target, b, ws[1], ws[0])
    if isinstance(bias, Node) and b is None:
        # a bias computed at run time (BEiT's cat of q, zero and v biases) cannot be sliced: the
        # outputs stay whole; the input columns are still the weight's to prune
        bm = a.cmap(bias)
        if bm is not None and out is not None and bm.size == out.size:
            a.union(out.ids, bm.ids)
        else:
            a.fix(out, f"{describe(node)} with a computed bias")
    return out


def linear_core(a: A, node: Node, x, w: str, b: Optional[str], fin: int, fout: int, mod=None, out_dim: int = 0):
    """A linear layer ``x @ W.T + b`` reading parameter ``w`` of shape ``(fout, fin)``, or
    ``(fin, fout)`` with ``out_dim=1`` (``addmm``, ``x @ W``)."""
    m = a.cmap(x)
    in_shape, out_shape = a.shape(x), a.shape(node)
    out_ids = a.new(fout)
    a.bind_param(w, out_dim, out_ids, importance="out")
    a.bind_param(b, 0, out_ids)
    tokens = math.prod(out_shape) // fout
    if m is not None and m.axis == len(in_shape) - 1:
        a.bind_param(w, 1 - out_dim, m.ids, importance="in")
        a.gate(0, m, weight=(w, 1 - out_dim))
        a.add_macs(tokens, out_ids, m.ids)
        return ChannelMap(len(out_shape) - 1, out_ids)
    if m is not None:  # applied along a non-channel dim (token mixing): channels pass through
        a.fix(out_ids, f"{describe(node, mod)} acts on a dim that is not the channel dim")
        a.add_macs(tokens * fout * fin / m.size, m.ids)
        return m
    a.add_macs(tokens * fin, out_ids)
    return ChannelMap(len(out_shape) - 1, out_ids)


_PER_CHANNEL_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
_INSTANCE_NORMS = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
_NORM_STATE = ("weight", "bias", "running_mean", "running_var")


def _frozen_bn_classes():
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d

        return (FrozenBatchNorm2d,)
    except ImportError:  # pragma: no cover
        return ()


def resize_norm(mod, before) -> None:
    for attr in ("weight", "running_mean"):
        t = getattr(mod, attr, None)
        if isinstance(t, torch.Tensor):
            mod.num_features = t.shape[0]
            return


def rewrite_instance_norm(node: Node, edit) -> None:
    """Instance norm without affine parameters or statistics: ``num_features`` from the channels."""
    m = edit.map_of(node)
    if m is not None:
        edit.module(node).num_features = edit.kept(m)


@op_handler(modules=[*_PER_CHANNEL_NORMS, *_frozen_bn_classes()], macs=False, shape=norm_shape, resize=resize_norm)
def batch_norm(a: A, node: Node):
    """Per-channel normalisation: channels pass through; its parameters and statistics are sliced."""
    mod = a.module(node)
    m = a.cmap(node.args[0])
    if m is None:
        return None
    if m.axis != 1:
        a.fix(m, f"{describe(node, mod)} normalises a dim that is not the channel dim")
        return m
    for attr in _NORM_STATE:
        if isinstance(getattr(mod, attr, None), torch.Tensor):
            a.bind_param(_pname(node, attr), 0, m.ids)
    return m


DEFAULT_RULES.register(OpHandler(batch_norm, macs=False, shape=norm_shape, resize=resize_norm,
                                 rewrite=rewrite_instance_norm), modules=_INSTANCE_NORMS)


# -------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm over the channels: the normalised residual stream of transformers
# -------------------------------------------------------------------------------------------
# A norm over the channel dim reads every channel to compute its statistics, so it is a
# channel-mixing consumer: it gets a gate site on its input, like a linear layer.  The masked
# model therefore normalises a vector whose removed channels are zero, with statistics over the
# *original* width d.  The shrunk model must compute the same thing from the d' kept channels:
#
# * RMSNorm: sum(x^2)/d + eps = (d'/d) (sum(x^2)/d' + eps d/d'), so a standard RMSNorm over d'
#   with eps' = eps d/d' and weight' = weight sqrt(d/d') is exact;
# * LayerNorm: mean = sum(x)/d and var = sum((x - mean)^2 over kept)/d + (d - d')/d mean^2 (the
#   removed zeros' share) cannot be expressed by a standard LayerNorm over d', so the shrink pass
#   writes these few ops into the graph (:func:`_emit_wide_layer_norm`).
#
# Only the last dim may carry the channels (``normalized_shape`` of length 1 over them, as in
# every transformer); other layouts stay fixed with a reason.
def _norm_over_channels(a: A, node: Node, k: int, weight: Optional[str], bias: Optional[str], mod=None):
    """The coupling rule shared by the module and functional forms of LayerNorm and RMSNorm."""
    m = a.cmap(node.args[0])
    if m is None:
        return None
    rank = len(a.shape(node.args[0]))
    if m.axis < rank - k:  # channels outside the normalised dims: a per-position op on them
        return m
    if k != 1:
        a.fix(m, f"{describe(node, mod)} normalises over several dims including the channels")
        return m
    a.gate(0, m)
    a.bind_param(weight, 0, m.ids)
    a.bind_param(bias, 0, m.ids)
    return m


def _get_attr_name(value):
    """``(name, ok)`` of a norm's weight/bias argument: a parameter read by ``get_attr``, or None;
    ``ok`` is False for a computed tensor (its slices cannot be bound)."""
    if value is None:
        return None, True
    if isinstance(value, Node) and value.op == "get_attr":
        return value.target, True
    return None, not isinstance(value, Node)


def _module_param(mod, node: Node, attr: str) -> Optional[str]:
    return _pname(node, attr) if isinstance(getattr(mod, attr, None), torch.Tensor) else None


def _normalises_channels(node: Node, edit, m, k: int) -> bool:
    """Whether the pruned channels of ``m`` lie in the ``k`` normalised (last) dims of ``node``;
    channels on a dim before them (the heads of a per-head q/k norm over ``head_dim``) leave the
    norm a per-position op whose sizes do not change."""
    return edit.changed(m) and m.axis >= len(edit.dense_shape(node)) - k


def _rewrite_norm_module(node: Node, edit) -> None:
    m = edit.map_of(node)
    mod = edit.module(node)
    if not _normalises_channels(node, edit, m, len(mod.normalized_shape)):
        return
    weight = _module_param(mod, node, "weight")
    bias = _module_param(mod, node, "bias")
    if isinstance(mod, torch.nn.LayerNorm):
        _emit_wide_layer_norm(edit, node, node.args[0], weight, bias, mod.eps, m)
    else:
        _emit_rms_norm(edit, node, node.args[0], weight, mod.eps, m)


@op_handler(modules=[torch.nn.LayerNorm], macs=False, shape=norm_shape, rewrite=_rewrite_norm_module)
def layer_norm(a: A, node: Node):
    mod = a.module(node)
    k = len(mod.normalized_shape)
    return _norm_over_channels(a, node, k, _module_param(mod, node, "weight"), _module_param(mod, node, "bias"), mod)


if hasattr(torch.nn, "RMSNorm"):  # (torch >= 2.4)
    DEFAULT_RULES.register(OpHandler(layer_norm, macs=False, rewrite=_rewrite_norm_module), modules=[torch.nn.RMSNorm])


def _norm_fn_args(node: Node, rms: bool):
    """``(x, normalized_shape, weight, bias, eps)`` of ``F.layer_norm`` / ``F.rms_norm`` (no bias)."""
    get = lambda i, name, default=None: node.args[i] if len(node.args) > i else node.kwargs.get(name, default)  # noqa: E731
    if rms:
        return get(0, "input"), get(1, "normalized_shape"), get(2, "weight"), None, get(3, "eps")
    return get(0, "input"), get(1, "normalized_shape"), get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5)


def _rewrite_norm_fn(rms: bool):
    def rewrite(node: Node, edit) -> None:
        m = edit.map_of(node)
        x, shape, weight, bias, eps = _norm_fn_args(node, rms)
        if not _normalises_channels(node, edit, m, len(shape) if isinstance(shape, (list, tuple)) else 1):
            return
        if rms:
            _emit_rms_norm(edit, node, x, weight, eps, m)
        else:
            _emit_wide_layer_norm(edit, node, x, weight, bias, eps, m)

    return rewrite


def _norm_fn(a: A, node: Node, rms: bool):
    x, shape, weight, bias, eps = _norm_fn_args(node, rms)
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    names = []
    for value, what in ((weight, "weight"), (bias, "bias")):
        name, ok = _get_attr_name(value)
        if not ok:
            a.fix(a.map(x), f"{describe(node)} with a computed `{what}`")
            return a.map(x)
        names.append(name)
    return _norm_over_channels(a, node, k, *names)


rewrite_layer_norm_fn, rewrite_rms_norm_fn = _rewrite_norm_fn(False), _rewrite_norm_fn(True)


@op_handler(functions=[F.layer_norm], aten=["layer_norm"], macs=False, shape=norm_shape, rewrite=rewrite_layer_norm_fn)
def layer_norm_fn(a: A, node: Node):
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``."""
    return _norm_fn(a, node, rms=False)


@op_handler(functions=[F.rms_norm] if hasattr(F, "rms_norm") else [], aten=["rms_norm"], macs=False,
            rewrite=rewrite_rms_norm_fn)
def rms_norm_fn(a: A, node: Node):
    """``F.rms_norm(x, normalized_shape, weight, eps)``."""
    return _norm_fn(a, node, rms=True)


def _param_node(graph, name):
    return graph.get_attr(name) if isinstance(name, str) else name


def _replace(edit, node: Node, new: Node) -> None:
    new.meta = dict(node.meta)
    edit.replaced(node, new)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _emit_wide_layer_norm(edit, node: Node, x, weight, bias, eps: float, m, channels_first: bool = False) -> None:
    """LayerNorm of the kept channels with the statistics of the original width (see above).

    ``channels_first``: a one-group GroupNorm, whose statistics run over the channels and every
    dim after them (``C, H, W``) and whose affine parameters are per channel on dim 1.
    """
    shape = edit.dense_shape(node)
    dims = tuple(range(1, len(shape))) if channels_first else (-1,)
    spatial = math.prod(shape[2:]) if channels_first else 1
    d, kept = m.size * spatial, edit.kept(m) * spatial
    graph = node.graph

    aten = is_aten(node)

    def op(fn, *args, **kwargs):
        return emit(graph, fn, args, kwargs, aten=aten)

    def per_channel(param):
        param = _param_node(graph, param)
        if not channels_first:
            return param
        return op("view", param, -1, *([1] * (len(shape) - 2)))

    with graph.inserting_before(node):
        total = op("sum", x, dims, keepdim=True)
        mean = op(operator.mul, total, 1.0 / d)
        centred = op(operator.sub, x, mean)
        squares = op("sum", op(operator.mul, centred, centred), dims, keepdim=True)
        removed = op(operator.mul, op(operator.mul, mean, mean), float(d - kept))
        var = op(operator.mul, op(operator.add, squares, removed), 1.0 / d)
        rstd = op(torch.rsqrt, op(operator.add, var, float(eps)))
        y = op(operator.mul, centred, rstd)
        if weight is not None:
            y = op(operator.mul, y, per_channel(weight))
        if bias is not None:
            y = op(operator.add, y, per_channel(bias))
    _replace(edit, node, y)


def _emit_rms_norm(edit, node: Node, x, weight, eps: Optional[float], m) -> None:
    """RMSNorm of the kept channels: eps x d/d' and weight x sqrt(d/d') (see above)."""
    d, kept = m.size, edit.kept(m)
    if eps is None:  # torch's default: the machine epsilon of the input's dtype
        eps = torch.finfo(node.meta["tensor_meta"].dtype).eps
    graph, aten = node.graph, is_aten(node)
    factor = math.sqrt(d / kept)
    with graph.inserting_before(node):
        w = None
        if weight is not None:
            w = emit(graph, operator.mul, (_param_node(graph, weight), factor), aten=aten)
        y = emit(graph, F.rms_norm, (x, (kept,), w, float(eps) * d / kept), aten=aten)
        if weight is None:
            y = emit(graph, operator.mul, (y, factor), aten=aten)
    _replace(edit, node, y)


def resize_group_norm(mod, before) -> None:
    """Whole groups were removed: the channels per group stay, the group count follows."""
    per_group = mod.num_channels // mod.num_groups
    if mod.weight is not None and mod.num_groups > 1:  # (one group: the rewrite replaces the call)
        mod.num_channels = mod.weight.shape[0]
        mod.num_groups = mod.num_channels // per_group


def rewrite_group_norm(node: Node, edit) -> None:
    """One group: the statistics of the original ``C, H, W`` (as LayerNorm's, above); several
    groups without affine parameters: the counts follow the kept channels."""
    mod, m = edit.module(node), edit.map_of(node)
    if mod.num_groups == 1 and edit.changed(m):
        _emit_wide_layer_norm(edit, node, node.args[0], _module_param(mod, node, "weight"),
                              _module_param(mod, node, "bias"), mod.eps, m, channels_first=True)
    elif mod.weight is None and edit.changed(m):
        per_group = m.size // mod.num_groups
        mod.num_channels = edit.kept(m)
        mod.num_groups = mod.num_channels // per_group


@op_handler(modules=[torch.nn.GroupNorm], macs=False, shape=norm_shape, resize=resize_group_norm,
            rewrite=rewrite_group_norm)
def group_norm(a: A, node: Node):
    """Statistics per group of ``C / G`` channels: a group removed whole leaves the others' alone.

    The channels of one group are one unit (as a grouped conv's), so only whole groups go.  One
    group (a LayerNorm over ``C, H, W``, MetaFormer's norm) is a gate site like LayerNorm, and the
    shrink pass writes the statistics of the original size.
    """
    mod = a.module(node)
    m = a.cmap(node.args[0])
    if m is None:
        return None
    if m.axis != 1:
        a.fix(m, f"{describe(node, mod)} normalises a dim that is not the channel dim")
        return m
    if mod.num_groups == 1:
        a.gate(0, m)
    else:
        a.elements.union_along(m.ids.reshape(mod.num_groups, -1), (1,))
    for attr in ("weight", "bias"):
        if isinstance(getattr(mod, attr, None), torch.Tensor):
            a.bind_param(_pname(node, attr), 0, m.ids)
    return m


def _group_norm_args(node: Node):
    """``(x, num_groups, weight, bias, eps)`` of ``F.group_norm`` / ``aten.group_norm`` (same order)."""
    get = lambda i, name, default=None: node.args[i] if len(node.args) > i else node.kwargs.get(name, default)  # noqa: E731
    return get(0, "input"), get(1, "num_groups"), get(2, "weight"), get(3, "bias"), get(4, "eps", 1e-5)


def rewrite_group_norm_fn(node: Node, edit) -> None:
    """As :func:`rewrite_group_norm`: one group keeps the original statistics, several groups
    (removed whole) get the kept group count."""
    m = edit.map_of(node)
    if not edit.changed(m):
        return
    x, groups, weight, bias, eps = _group_norm_args(node)
    if groups == 1:
        _emit_wide_layer_norm(edit, node, x, weight, bias, eps, m, channels_first=True)
        return
    args = list(node.args) + [None] * max(0, 2 - len(node.args))
    args[1] = edit.kept(m) // (m.size // groups)
    node.args = tuple(args)
    node.kwargs = {k: v for k, v in node.kwargs.items() if k != "num_groups"}


@op_handler(functions=[F.group_norm], aten=["group_norm"], macs=False, rewrite=rewrite_group_norm_fn)
def group_norm_fn(a: A, node: Node):
    """``F.group_norm(x, G, weight, bias, eps)`` with parameter (or no) affine tensors: the module's rule."""
    x, groups, weight, bias, _ = _group_norm_args(node)
    m = a.cmap(x)
    if m is None:
        return None
    if m.axis != 1 or not isinstance(groups, int):
        a.fix(m, f"{describe(node)} normalises a dim that is not the channel dim, or run-time groups")
        return m
    for t in (weight, bias):
        if isinstance(t, Node) and t.op != "get_attr":
            a.fix(m, f"{describe(node)} with computed affine tensors")
            return m
    if groups == 1:
        a.gate(0, m)
    else:
        a.elements.union_along(m.ids.reshape(groups, -1), (1,))
    for t in (weight, bias):
        if isinstance(t, Node):
            a.bind_param(t.target, 0, m.ids)
    return m


@op_handler(modules=[torch.nn.LocalResponseNorm, torch.nn.CrossMapLRN2d], macs=False)
def local_response_norm(a: A, node: Node):
    mod = a.module(node)
    m = a.cmap(node.args[0])
    a.fix(m, f"{describe(node, mod)} mixes neighbouring channels")
    return m


def resize_prelu(mod, before) -> None:
    mod.num_parameters = mod.weight.numel()


@op_handler(modules=[torch.nn.PReLU], macs=False, resize=resize_prelu)
def prelu(a: A, node: Node):
    mod = a.module(node)
    m = a.cmap(node.args[0])
    if m is not None and mod.num_parameters > 1:
        if m.axis != 1:
            a.fix(m, f"{describe(node, mod)} has per-channel slopes on dim 1 only")
        else:
            a.bind_param(_pname(node, "weight"), 0, m.ids)
    return m


def resize_embedding(mod, before) -> None:
    mod.embedding_dim = mod.weight.shape[1]


@op_handler(modules=[torch.nn.Embedding], macs=False, resize=resize_embedding)
def embedding(a: A, node: Node):
    mod = a.module(node)
    out_ids = a.new(mod.embedding_dim)
    a.bind_param(_pname(node, "weight"), 1, out_ids, importance="out")
    return ChannelMap(len(a.shape(node)) - 1, out_ids)


@op_handler(functions=[F.embedding], aten=["embedding"], macs=False)
def embedding_fn(a: A, node: Node):
    """``F.embedding(indices, weight)`` / ``aten.embedding(weight, indices)``: the output's last
    dim is the weight's columns."""
    weight = arg(node, "weight")
    ws = a.shape(weight)
    if not (isinstance(weight, Node) and weight.op == "get_attr") or ws is None or len(ws) != 2:
        a.fix(a.map(weight), f"{describe(node)} with a computed weight")
        return None
    out_ids = a.new(ws[1])
    a.bind_param(weight.target, 1, out_ids, importance="out")
    return ChannelMap(len(a.shape(node)) - 1, out_ids)


@op_handler(functions=[F.batch_norm], aten=["batch_norm"], macs=False, shape=norm_shape)
def batch_norm_fn(a: A, node: Node):
    """Functional per-channel norm (timm's BatchNormAct2d, ``aten.batch_norm``): its tensors,
    found by name (``F.batch_norm`` puts the running statistics first, ATen the affine
    parameters), are ``get_attr`` nodes bound to the channels."""
    m = a.cmap(node.args[0])
    if m is None:
        return None
    if m.axis != 1:
        a.fix(m, f"{describe(node)} normalises a dim that is not the channel dim")
        return m
    for key in ("weight", "bias", "running_mean", "running_var"):
        t = arg(node, key)
        if isinstance(t, Node):
            if t.op != "get_attr":
                a.fix(m, f"{describe(node)} with a computed `{key}`")
                return m
            a.bind_param(t.target, 0, m.ids)
    return m


DEFAULT_RULES.register(OpHandler(batch_norm_fn, macs=False), functions=[F.instance_norm], aten=["instance_norm"])


def rewrite_conv_groups(node: Node, edit) -> None:
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)``: groups follows the kept inputs."""
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    src = edit.map_of(node.args[0])
    if not isinstance(groups, int) or groups == 1 or not edit.changed(src):
        return
    new = edit.kept(src) // (src.size // groups)
    if len(node.args) > 6:
        node.args = (*node.args[:6], new, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}


@op_handler(functions=[F.conv1d, F.conv2d, F.conv3d], rewrite=rewrite_conv_groups,
            aten=["conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding"])
def conv_fn(a: A, node: Node):
    """Functional conv with a parameter weight (timm's same-padding convs)."""
    weight, bias = a.arg(node, 1, "weight"), a.arg(node, 2, "bias")
    groups = a.arg(node, 6, "groups", 1)
    ws = a.shape(weight)
    plain = isinstance(weight, Node) and weight.op == "get_attr" and isinstance(groups, int)
    if not plain or (isinstance(bias, Node) and bias.op != "get_attr"):
        a.fix([a.map(node.args[0]), a.map(weight)], f"{describe(node)} with a computed weight")
        return None
    b = bias.target if isinstance(bias, Node) else None
    return conv_core(a, node, node.args[0], weight.target, b, ws[1] * groups, ws[0], groups,
                     math.prod(ws[2:]), transposed=False)


# mixture-of-experts: ``grouped_mm(x, w, offs)``, ``x`` (tokens sorted by expert, K) times the
# expert's ``w[e]`` (K, N) for the rows ``offs`` gives it; transformers' experts hold ``w`` as a
# 3-d parameter (experts, N, K) seen through ``transpose(-2, -1)``
def _expert_weight(a: A, w: Node):
    """``(parameter name, {dim of w: dim of the parameter})`` behind a grouped-mm weight operand:
    the parameter itself or its transpose of the last two dims, read by this node alone."""
    if w.op == "get_attr":
        return str(w.target), {0: 0, 1: 1, 2: 2}
    src = w.args[0] if w.op == "call_function" and w.args else None
    if (w.target is torch.ops.aten.transpose.int and isinstance(src, Node) and src.op == "get_attr"
            and len(w.users) == 1 and {d % 3 for d in w.args[1:3]} == {1, 2}):
        return str(src.target), {0: 0, 1: 2, 2: 1}
    return None, None


@op_handler(op_names=["transformers::grouped_mm_fallback"], aten=["_grouped_mm"])
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
        a.fix([a.map(t) for t in node.args if isinstance(t, Node)], f"{describe(node)} with computed operands")
        return None
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
