"""Coupling rules for layers with parameters: conv, linear, norms, embeddings, attention.

Producers (conv, linear) create a fresh element per output feature; their weights are bound to
the elements of both their output and input axes, so shrinking slices them and the cost model
counts them.  Channel-mixing inputs are recorded as gate sites.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe
from hfp_fx.meta_shortcuts import layer_shape, norm_shape
from hfp_fx.passes.registry import DEFAULT_RULES, OpHandler, op_handler

A = ChannelAnalysis

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_TRANSPOSED = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


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


@op_handler(functions=[F.linear])
def linear_fn(a: A, node: Node):
    weight, bias = a.arg(node, 1, "weight"), a.arg(node, 2, "bias")
    ws = a.shape(weight)
    if not (isinstance(weight, Node) and weight.op == "get_attr") or ws is None or len(ws) != 2:
        a.fix([a.map(node.args[0]), a.map(weight)], f"{describe(node)} with a computed weight")
        return None
    b = bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None
    if isinstance(bias, Node) and b is None:
        a.fix(a.map(node.args[0]), f"{describe(node)} with a computed bias")
        return None
    return linear_core(a, node, node.args[0], weight.target, b, ws[1], ws[0])


def linear_core(a: A, node: Node, x, w: str, b: Optional[str], fin: int, fout: int, mod=None):
    m = a.cmap(x)
    in_shape, out_shape = a.shape(x), a.shape(node)
    out_ids = a.new(fout)
    a.bind_param(w, 0, out_ids, importance="out")
    a.bind_param(b, 0, out_ids)
    tokens = math.prod(out_shape) // fout
    if m is not None and m.axis == len(in_shape) - 1:
        a.bind_param(w, 1, m.ids, importance="in")
        a.gate(0, m, weight=(w, 1))
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


@op_handler(modules=[torch.nn.LayerNorm], macs=False, shape=norm_shape)
def layer_norm(a: A, node: Node):
    mod = a.module(node)
    m = _layer_norm(a, node, len(mod.normalized_shape), mod)
    if m is not None:
        k = m.axis - (len(a.shape(node.args[0])) - len(mod.normalized_shape))
        for attr in ("weight", "bias"):
            if k >= 0 and isinstance(getattr(mod, attr, None), torch.Tensor):
                a.bind_param(_pname(node, attr), k, m.ids)
    return m


if hasattr(torch.nn, "RMSNorm"):  # (torch >= 2.4)
    DEFAULT_RULES.register(OpHandler(layer_norm, macs=False), modules=[torch.nn.RMSNorm])


@op_handler(functions=[F.layer_norm], macs=False, shape=norm_shape)
def layer_norm_fn(a: A, node: Node):
    shape = a.arg(node, 1, "normalized_shape")
    return _layer_norm(a, node, len(shape) if isinstance(shape, (list, tuple)) else 1)


if hasattr(F, "rms_norm"):
    DEFAULT_RULES.register(OpHandler(layer_norm_fn, macs=False), functions=[F.rms_norm])


def _layer_norm(a: A, node: Node, k: int, mod=None):
    m = a.cmap(node.args[0])
    if m is None:
        return None
    if m.axis >= len(a.shape(node.args[0])) - k:
        a.fix(m, f"{describe(node, mod)} normalises over the channels; pruning would change its statistics")
    return m


@op_handler(modules=[torch.nn.GroupNorm], macs=False, shape=norm_shape)
def group_norm(a: A, node: Node):
    mod = a.module(node)
    m = a.cmap(node.args[0])
    if m is None:
        return None
    a.fix(m, f"{describe(node, mod)} normalises groups of channels; pruning would change their statistics")
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


@op_handler(modules=[torch.nn.MultiheadAttention])
def multihead_attention(a: A, node: Node):
    """``nn.MultiheadAttention``: a new output space (``out_proj``); its inputs are kept whole."""
    mod = a.module(node)
    q, k, v = (a.arg(node, i, n) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    reason = f"{describe(node, mod)}: inputs of nn.MultiheadAttention are not pruned"
    a.fix([a.map(q), a.map(k), a.map(v)], reason)
    qs, ks = a.shape(q), a.shape(k)
    out_shapes = a.shape(node)
    out_shape = out_shapes[0]
    E = mod.embed_dim
    out_ids = a.new(E)
    a.bind_param(_pname(node, "out_proj.weight"), 0, out_ids, importance="out")
    if mod.out_proj.bias is not None:
        a.bind_param(_pname(node, "out_proj.bias"), 0, out_ids)
    Lq = math.prod(qs) // qs[-1]
    Lk = math.prod(ks) // ks[-1]
    batch = qs[0] if len(qs) == 3 and mod.batch_first else (qs[1] if len(qs) == 3 else 1)
    seq_q, seq_k = Lq // batch, Lk // batch
    in_proj = Lq * E * E + 2 * Lk * mod.kdim * E if not mod._qkv_same_embed_dim else (Lq + 2 * Lk) * E * E
    attn = batch * seq_q * seq_k * E * 2
    a.add_macs(in_proj + attn)
    a.add_macs(Lq * E, out_ids)
    return (ChannelMap(len(out_shape) - 1, out_ids),) + tuple(None for _ in out_shapes[1:])


@op_handler(functions=[F.batch_norm], macs=False, shape=norm_shape)
def batch_norm_fn(a: A, node: Node):
    """Functional per-channel norm (timm's BatchNormAct2d): parameters are get_attr nodes to slice."""
    m = a.cmap(node.args[0])
    if m is None:
        return None
    if m.axis != 1:
        a.fix(m, f"{describe(node)} normalises a dim that is not the channel dim")
        return m
    names = ("running_mean", "running_var", "weight", "bias")  # same order for both functions
    for i, key in enumerate(names, start=1):
        t = a.arg(node, i, key)
        if isinstance(t, Node):
            if t.op != "get_attr":
                a.fix(m, f"{describe(node)} with a computed `{key}`")
                return m
            a.bind_param(t.target, 0, m.ids)
    return m


DEFAULT_RULES.register(OpHandler(batch_norm_fn, macs=False), functions=[F.instance_norm])


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


@op_handler(functions=[F.conv1d, F.conv2d, F.conv3d], rewrite=rewrite_conv_groups)
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
