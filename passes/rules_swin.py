"""Coupling rules for torchvision's Swin Transformer (V1 and V2) helper functions.

torchvision wraps ``shifted_window_attention``, ``_get_relative_position_bias`` and
``_patch_merging_pad`` with ``torch.fx.wrap``, so each is one ``call_function`` node.  Without
rules their inputs would be fixed as unsupported; with them the attention heads of every
window-attention block are prunable units (their q, k and v rows of ``qkv``, their columns of
``proj``, their slice of the relative-position bias and, in V2, of ``logit_scale`` and of the
bias MLP's last layer), and the attention's input and output channels are tracked like a
linear layer's.

``shifted_window_attention`` derives its head dim and scale from the input width, so a pruned
node is retargeted to :func:`hfp_fx.functional.window_attention`, which takes every size from
its tensors and the dense scale explicitly.  A node whose sizes did not change keeps calling
torchvision.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Optional

import torch
from torch.fx.node import Node

from hfp_fx.functional import window_attention
from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelAnalysis, describe
from hfp_fx.passes.registry import op_handler

A = ChannelAnalysis

try:
    from torchvision.models import swin_transformer as _tv_swin
except ImportError:  # pragma: no cover - torchvision is a dependency, but keep the rules optional
    _tv_swin = None

_ATTENTIONS = [window_attention]
if _tv_swin is not None:
    _ATTENTIONS.insert(0, _tv_swin.shifted_window_attention)
_SIGNATURE = inspect.signature(window_attention)


def _bound_args(node: Node) -> Dict[str, Any]:
    """The node's arguments by name (torchvision's parameter names are a prefix of ours)."""
    args = dict(zip(list(_SIGNATURE.parameters), node.args))
    args.update(node.kwargs)
    if "input" in args:  # torchvision's name of the first argument
        args["x"] = args.pop("input")
    return args


def _arg_key(node: Node, index: int, names) -> Any:
    """How ``node`` passes one argument: its position, else the keyword it uses (for gate sites)."""
    if len(node.args) > index:
        return index
    return next(n for n in names if n in node.kwargs)


def _param(value) -> Optional[str]:
    return value.target if isinstance(value, Node) and value.op == "get_attr" else None


def _dense_scale(node: Node, args: Dict[str, Any], heads: int) -> float:
    """The query scale of the dense call: torchvision uses ``(C_in // heads) ** -0.5``."""
    if args.get("scale") is not None:
        return float(args["scale"])
    if node.target is window_attention:
        return (args["qkv_weight"].meta["tensor_meta"].shape[0] // (3 * heads)) ** -0.5
    return (args["x"].meta["tensor_meta"].shape[-1] // heads) ** -0.5


def rewrite_window_attention(node: Node, edit) -> None:
    """Call :func:`window_attention` with the kept head count and the dense scale, if anything shrank."""
    args = _bound_args(node)
    heads = int(args["num_heads"])
    qkv = edit.facts.canonical.get(args["qkv_weight"].target, args["qkv_weight"].target)
    rows = edit.facts.params.get(qkv, {}).get(0)
    kept_heads = heads if rows is None else int(edit.alive[rows].sum()) * heads // rows.numel()
    changed = (kept_heads != heads or edit.changed(edit.map_of(args["x"])) or edit.changed(edit.map_of(node)))
    if not changed:
        return
    kwargs = {k: v for k, v in args.items() if k != "x"}
    kwargs["num_heads"] = kept_heads
    kwargs["scale"] = _dense_scale(node, args, heads)
    node.target = window_attention
    node.args = (args["x"],)
    node.kwargs = kwargs


@op_handler(functions=_ATTENTIONS, rewrite=rewrite_window_attention)
def shifted_window_attention(a: A, node: Node):
    """Heads are units; the input is consumed like a linear layer's; the output is a new space."""
    args = _bound_args(node)
    x, heads = args["x"], args.get("num_heads")
    qkv_w, proj_w = _param(args.get("qkv_weight")), _param(args.get("proj_weight"))
    qkv_b, proj_b = args.get("qkv_bias"), args.get("proj_bias")
    logit_scale, bias = args.get("logit_scale"), args.get("relative_position_bias")
    m = a.cmap(x)
    tensors = [v for v in (qkv_b, proj_b, logit_scale) if isinstance(v, Node)]
    xs = a.shape(x)
    if (qkv_w is None or proj_w is None or not isinstance(heads, int) or any(_param(v) is None for v in tensors)
            or not isinstance(args.get("window_size"), (list, tuple)) or xs is None or len(xs) != 4):
        a.fix([m, a.map(bias)], f"{describe(node)} with computed weights or run-time sizes")
        return None
    qs, ps = a.shape(args["qkv_weight"]), a.shape(args["proj_weight"])
    inner, c_in, c_out = qs[0] // 3, qs[1], ps[0]
    head_dim = inner // heads

    head_ids = a.new(heads)
    inner_ids = head_ids.repeat_interleave(head_dim)
    a.bind_param(qkv_w, 0, inner_ids.repeat(3), importance="out")
    a.bind_param(_param(qkv_b), 0, inner_ids.repeat(3))
    a.bind_param(proj_w, 1, inner_ids, importance="in")
    a.bind_param(_param(logit_scale), 0, head_ids)
    # a removed head contributes nothing once its proj columns are zero (mask / gate reference)
    a.gate(_arg_key(node, 2, ("proj_weight",)), ChannelMap(1, inner_ids), weight=(proj_w, 1))
    _couple_bias(a, node, bias, head_ids)

    if m is not None and m.axis != len(xs) - 1:
        a.fix(m, f"{describe(node)} receives channels on a dim other than the last")
        m = None
    if m is not None:
        a.bind_param(qkv_w, 1, m.ids, importance="in")
        a.gate(_arg_key(node, 0, ("input", "x")), m, weight=(qkv_w, 1))
    out_ids = a.new(c_out)
    a.bind_param(proj_w, 0, out_ids, importance="out")
    a.bind_param(_param(proj_b), 0, out_ids)

    # MACs as torch.utils.flop_counter counts them: the two projections and the two attention
    # products, on the padded token grid
    wh, ww = (int(s) for s in args["window_size"])
    tokens = xs[0] * math.ceil(xs[1] / wh) * wh * math.ceil(xs[2] / ww) * ww
    if m is not None:
        a.add_macs(3 * tokens, inner_ids, m.ids)
    else:
        a.add_macs(3 * tokens * c_in, inner_ids)
    a.add_macs(2 * tokens * wh * ww, inner_ids)
    a.add_macs(tokens, out_ids, inner_ids)
    return ChannelMap(len(xs) - 1, out_ids)


def _couple_bias(a: A, node: Node, bias, head_ids: torch.Tensor) -> None:
    """The relative-position bias ``(1, heads, N, N)`` must lose the heads the attention loses."""
    shape = a.shape(bias)
    if shape is None or len(shape) < 3 or shape[-3] == 1:
        return  # no per-head values
    if _param(bias) is not None and shape[-3] == head_ids.numel():  # a stored bias: slice it per head
        a.bind_param(_param(bias), len(shape) - 3, head_ids)
        return
    mb = a.cmap(bias)
    if mb is not None and mb.axis == len(shape) - 3 and mb.size == head_ids.numel():
        a.union(mb.ids, head_ids)
        return
    a.fix(mb, f"{describe(node)}: its relative-position bias is not tracked per head")
    a.fix(head_ids, f"{describe(node)}: its relative-position bias has per-head values that are not pruned "
                    f"with the heads")


def _relative_position_bias(a: A, node: Node):
    """``table[index].view(N, N, heads).permute(2, 0, 1)[None]``: the table's heads land on axis 1."""
    table = a.arg(node, 0, "relative_position_bias_table")
    shape = a.shape(table)
    name = _param(table)
    if name is not None:
        ids = a.new(shape[-1])
        a.bind_param(name, len(shape) - 1, ids)
        return ChannelMap(1, ids)
    m = a.cmap(table)
    if m is None:
        return None
    if m.axis != len(shape) - 1:
        a.fix(m, f"{describe(node)} gathers rows along the channel dim")
        return None
    return ChannelMap(1, m.ids)


def _patch_merging_pad(a: A, node: Node):
    """Four strided slices of the (H, W) grid concatenated on the last dim: ids repeated 4 times."""
    m = a.cmap(a.arg(node, 0, "x"))
    if m is None:
        return None
    rank = len(a.shape(node))
    if m.axis == rank - 1:
        return ChannelMap(m.axis, m.ids.repeat(4))
    if m.axis < rank - 3:
        return m
    a.fix(m, f"{describe(node)} pads and subsamples the channel dim")
    return None


if _tv_swin is not None:
    op_handler(functions=[_tv_swin._get_relative_position_bias], macs=False)(_relative_position_bias)
    op_handler(functions=[_tv_swin._patch_merging_pad], macs=False)(_patch_merging_pad)
