"""Step 6 of the flow: the rewrite pass that emits a physically smaller GraphModule.

Three edits, all driven by the channel analysis:

1. every parameter and buffer bound to channel elements is sliced to the kept positions
   (``index_select`` along each bound dim);
2. module attributes that mirror those shapes are updated (``Conv2d.in_channels``, ``groups``,
   ``Linear.out_features``, ``BatchNorm2d.num_features``, ...), see ``_MODULE_FIXERS``;
3. node arguments that spell out channel counts are rewritten: ``view``/``reshape``/
   ``expand`` sizes, ``split`` sizes (``chunk`` becomes ``split``), ``narrow`` bounds and
   channel slices ``x[:, a:b]``, see ``_NODE_FIXERS``.

Afterwards the new model's shapes are propagated and compared node by node with the
expected pruned shapes; any difference raises instead of returning a wrong model.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Dict, List

import torch
import torch.fx
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import iter_maps
from hfp_fx.passes.edit import input_of, replace_input

__all__ = ["shrink_model", "add_scale_nodes", "ShrinkError"]


class ShrinkError(RuntimeError):
    """The rewritten model does not have the shapes the plan predicts (a bug: please report)."""


def shrink_model(dg, alive: torch.Tensor, verify: bool = True, gm: torch.fx.GraphModule = None
                 ) -> torch.fx.GraphModule:
    """Shrink ``dg``'s model (or ``gm``, a copy of it with other weights) to the ``alive`` elements."""
    gm = copy.deepcopy(dg.gm) if gm is None else gm
    old_shapes = {name: tuple(t.shape) for name, t in
                  list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))}
    _slice_state(gm, dg, alive)
    for name, mod in gm.named_modules():
        fixer = next((_MODULE_FIXERS[c] for c in type(mod).__mro__ if c in _MODULE_FIXERS), None)
        if fixer is not None:
            fixer(mod, name, old_shapes)
    _fix_modules_from_maps(gm, dg, alive)
    for node in list(gm.graph.nodes):
        fixer = _fixer_for(node)
        if fixer is not None:
            fixer(node, dg, alive)
    gm.graph.lint()
    gm.recompile()
    if verify:
        _verify_shapes(gm, dg, alive)
    return gm


# -------------------------------------------------------------------------------------------
# 1. parameters and buffers
# -------------------------------------------------------------------------------------------
def _slice_state(gm: torch.fx.GraphModule, dg, alive: torch.Tensor) -> None:
    aliases: Dict[int, List[str]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
        tensors[name] = t
    for name, dims in dg.facts.params.items():
        t = tensors[name]
        new = t.detach()
        for dim, ids in dims.items():
            keep = alive[ids]
            if not bool(keep.all()):
                new = new.index_select(dim, torch.nonzero(keep).flatten().to(new.device))
        if new is t.detach():
            continue
        for alias in aliases[id(t)]:
            owner_name, _, attr = alias.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            if isinstance(t, torch.nn.Parameter):
                setattr(owner, attr, torch.nn.Parameter(new.clone(), requires_grad=t.requires_grad))
            else:
                owner._buffers[attr] = new.clone()
        # aliases must keep pointing at one tensor
        if len(aliases[id(t)]) > 1:
            first = aliases[id(t)][0]
            o, _, a0 = first.rpartition(".")
            shared = getattr(gm.get_submodule(o) if o else gm, a0)
            for alias in aliases[id(t)][1:]:
                o2, _, a2 = alias.rpartition(".")
                owner = gm.get_submodule(o2) if o2 else gm
                if isinstance(shared, torch.nn.Parameter):
                    setattr(owner, a2, shared)
                else:
                    owner._buffers[a2] = shared


# -------------------------------------------------------------------------------------------
# 2. module attributes
# -------------------------------------------------------------------------------------------
def _fix_conv(mod, name, old_shapes) -> None:
    w = mod.weight
    transposed = isinstance(mod, (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d))
    old = old_shapes[f"{name}.weight" if name else "weight"]
    if mod.groups > 1:
        per_group = old[0] // mod.groups  # rows per conv-group (out for conv, in for transposed)
        mod.groups = w.shape[0] // per_group
    if transposed:
        mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
    else:
        mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups


def _fix_linear(mod, name, old_shapes) -> None:
    mod.out_features, mod.in_features = mod.weight.shape


def _fix_norm(mod, name, old_shapes) -> None:
    for attr in ("weight", "running_mean"):
        t = getattr(mod, attr, None)
        if isinstance(t, torch.Tensor):
            mod.num_features = t.shape[0]
            return


def _fix_prelu(mod, name, old_shapes) -> None:
    mod.num_parameters = mod.weight.numel()


def _fix_embedding(mod, name, old_shapes) -> None:
    mod.embedding_dim = mod.weight.shape[1]


def _module_fixers() -> Dict[type, Callable]:
    fixers: Dict[type, Callable] = {}
    for cls in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d):
        fixers[cls] = _fix_conv
    fixers[torch.nn.Linear] = _fix_linear
    for cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d):
        fixers[cls] = _fix_norm
    fixers[torch.nn.PReLU] = _fix_prelu
    fixers[torch.nn.Embedding] = _fix_embedding
    return fixers


_MODULE_FIXERS = _module_fixers()


def _fix_modules_from_maps(gm: torch.fx.GraphModule, dg, alive) -> None:
    """Attributes with no parameter to read them from: the channel count flowing through the node."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        m = _out_map(dg, node)
        if m is None:
            continue
        kept = int(alive[m.ids].sum())
        if isinstance(mod, (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
            mod.num_features = kept
        elif isinstance(mod, torch.nn.Unflatten) and _changed(m, alive):
            sizes = list(mod.unflattened_size)
            k = m.axis - (mod.dim % len(node.args[0].meta["tensor_meta"].shape))
            if 0 <= k < len(sizes) and sizes[k] != -1:
                sizes[k] = kept
                mod.unflattened_size = tuple(sizes)


# -------------------------------------------------------------------------------------------
# 3. node arguments that spell out channel counts
# -------------------------------------------------------------------------------------------
def _out_map(dg, node: Node):
    m = dg.facts.maps.get(node.name)
    return m if isinstance(m, ChannelMap) else None


def _changed(m: ChannelMap, alive) -> bool:
    return m is not None and not bool(alive[m.ids].all())


def _kept_before(m: ChannelMap, alive, pos: int) -> int:
    return int(alive[m.ids[:pos]].sum())


def _fix_sizes(node: Node, dg, alive) -> None:
    """view/reshape/expand: put the new channel count at the output channel axis.

    When a reshape splits the channel dim alone into several dims (a channel shuffle's
    ``view(b, g, c // g, h, w)``), the sizes of the other new dims are structural: an argument
    computed at run time from the channel count (``c // g``) would change with pruning, so it is
    replaced by its traced value.
    """
    m = _out_map(dg, node)
    if m is None:
        return
    changed = _changed(m, alive)
    new = int(alive[m.ids].sum())
    if node.op == "call_method":
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (list, tuple))
        if packed:
            sizes = list(sizes[0])
    else:  # torch.reshape(x, shape)
        key = 1 if len(node.args) > 1 else "shape"
        sizes = list(node.args[1] if key == 1 else node.kwargs["shape"])
    if not sizes or (len(sizes) == 1 and isinstance(sizes[0], Node) and len(node.meta["tensor_meta"].shape) > 1):
        # no sizes, or one computed at run time (``x.view(y.shape)``): it follows the pruned
        # tensors it is read from; the shape check after shrinking verifies that it does
        return
    if not changed and not isinstance(sizes[m.axis], Node):
        return
    # A size read at run time (``B, N, C = x.shape; y.reshape(B, N, C)``) may come from a
    # tensor whose channels are pruned differently, so the channel size is always a literal.
    if not (isinstance(sizes[m.axis], int) and sizes[m.axis] == -1):
        sizes[m.axis] = new
    for d in _structural_dims(node, dg, m) if changed else ():
        if isinstance(sizes[d], Node):
            sizes[d] = int(node.meta["tensor_meta"].shape[d])
    if node.op == "call_method":
        node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
    elif key == 1:
        node.args = (node.args[0], tuple(sizes), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "shape": tuple(sizes)}


def _structural_dims(node: Node, dg, m: ChannelMap) -> List[int]:
    """Output dims that a reshape split off the input's channel dim, other than the channel axis."""
    from hfp_fx.passes.rules_tensor import _blocks

    src = dg.facts.maps.get(node.args[0].name) if isinstance(node.args[0], Node) else None
    if node.target not in ("view", "reshape", torch.reshape) or not isinstance(src, ChannelMap):
        return []
    in_shape = list(node.args[0].meta["tensor_meta"].shape)
    out_shape = list(node.meta["tensor_meta"].shape)
    for bi, bj in _blocks(in_shape, out_shape):
        if bi == [src.axis] and m.axis in bj:
            return [d for d in bj if d != m.axis]
    return []


def _fix_unflatten(node: Node, dg, alive) -> None:
    m = _out_map(dg, node)
    if not _changed(m, alive):
        return
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    sizes = list(node.args[2] if len(node.args) > 2 else node.kwargs["sizes"])
    rank_in = len(node.args[0].meta["tensor_meta"].shape)
    k = m.axis - (dim % rank_in)
    if 0 <= k < len(sizes) and sizes[k] != -1:
        sizes[k] = int(alive[m.ids].sum())
        node.args = (node.args[0], dim, tuple(sizes))
        node.kwargs = {}


def _fix_split(node: Node, dg, alive) -> None:
    src = dg.facts.maps.get(node.args[0].name) if isinstance(node.args[0], Node) else None
    outs = dg.facts.maps.get(node.name)
    if not isinstance(src, ChannelMap) or not isinstance(outs, tuple) or not _changed(src, alive):
        return
    pieces = [m for m in outs if isinstance(m, ChannelMap)]
    if len(pieces) != len(outs) or pieces[0].axis != src.axis or pieces[0].ids is src.ids:
        return  # split along another dim: nothing to rewrite
    if all(p.size == src.size for p in pieces):
        return
    sizes = [int(alive[p.ids].sum()) for p in pieces]
    dim = src.axis
    if node.op == "call_method":
        node.target = "split"
        node.args = (node.args[0], sizes, dim)
    else:
        node.target = torch.split
        node.args = (node.args[0], sizes, dim)
    node.kwargs = {}


def _fix_narrow(node: Node, dg, alive) -> None:
    src = dg.facts.maps.get(node.args[0].name)
    if not isinstance(src, ChannelMap) or not _changed(src, alive):
        return
    args = [node.args[0]] + [node.args[i] if len(node.args) > i else node.kwargs[k]
                             for i, k in ((1, "dim"), (2, "start"), (3, "length"))]
    dim, start, length = args[1:]
    if dim % len(node.args[0].meta["tensor_meta"].shape) != src.axis:
        return
    new_start = _kept_before(src, alive, start)
    new_len = _kept_before(src, alive, start + length) - new_start
    node.args = (node.args[0], dim, new_start, new_len)
    node.kwargs = {}


def _fix_getitem(node: Node, dg, alive) -> None:
    obj, idx = node.args
    if not isinstance(obj, Node):
        return
    src = dg.facts.maps.get(obj.name)
    if not isinstance(src, ChannelMap) or not _changed(src, alive):
        return
    shape = obj.meta["tensor_meta"].shape
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded, ell = [], False
    for it in items:
        if it is Ellipsis and not ell:
            expanded += [slice(None)] * (len(shape) - consumed)
            ell = True
        else:
            expanded.append(it)
    in_d = 0
    for i, it in enumerate(expanded):
        if it is None:
            continue
        if in_d == src.axis and isinstance(it, slice):
            lo, hi, _ = it.indices(shape[src.axis])
            expanded[i] = slice(_kept_before(src, alive, lo), _kept_before(src, alive, hi))
            node.args = (obj, tuple(expanded) if isinstance(idx, tuple) or len(expanded) > 1 else expanded[0])
            return
        in_d += 1


def _fix_functional_conv_groups(node: Node, dg, alive) -> None:
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)``: groups follows the kept inputs."""
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    src = dg.facts.maps.get(node.args[0].name) if isinstance(node.args[0], Node) else None
    if not isinstance(groups, int) or groups == 1 or not isinstance(src, ChannelMap) or not _changed(src, alive):
        return
    per_group = src.size // groups
    new = int(alive[src.ids].sum()) // per_group
    if len(node.args) > 6:
        node.args = (*node.args[:6], new, *node.args[7:])
    else:
        node.kwargs = {**node.kwargs, "groups": new}


def _fixer_for(node: Node):
    if node.op == "call_method":
        return _NODE_FIXERS.get(("call_method", node.target))
    if node.op == "call_function":
        try:
            return _NODE_FIXERS.get(("call_function", node.target))
        except TypeError:
            return None
    return None


_NODE_FIXERS: Dict[Any, Callable] = {
    **{("call_method", n): _fix_sizes for n in ("view", "reshape", "expand", "broadcast_to")},
    ("call_function", torch.broadcast_to): _fix_sizes,
    **{("call_function", f): _fix_functional_conv_groups for f in (torch.nn.functional.conv1d,
                                                                   torch.nn.functional.conv2d,
                                                                   torch.nn.functional.conv3d)},
    ("call_function", torch.reshape): _fix_sizes,
    ("call_method", "unflatten"): _fix_unflatten,
    ("call_function", torch.unflatten): _fix_unflatten,
    **{("call_method", n): _fix_split for n in ("split", "chunk", "split_with_sizes")},
    ("call_function", torch.split): _fix_split,
    ("call_function", torch.chunk): _fix_split,
    ("call_method", "narrow"): _fix_narrow,
    ("call_function", torch.narrow): _fix_narrow,
    ("call_function", operator.getitem): _fix_getitem,
}


# -------------------------------------------------------------------------------------------
# verification
# -------------------------------------------------------------------------------------------
def _verify_shapes(gm: torch.fx.GraphModule, dg, alive: torch.Tensor) -> None:
    from hfp_fx.tracing import propagate_shapes

    expected = {}
    for node in dg.gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        m = dg.facts.maps.get(node.name)
        if isinstance(m, ChannelMap) and tm is not None and hasattr(tm, "shape"):
            shape = list(tm.shape)
            shape[m.axis] = int(alive[m.ids].sum())
            expected[node.name] = tuple(shape)
        elif node.op == "get_attr" and tm is not None and hasattr(tm, "shape"):
            shape = list(tm.shape)
            for dim, ids in dg.facts.params.get(dg.facts.canonical.get(node.target, node.target), {}).items():
                shape[dim] = int(alive[ids].sum())
            expected[node.name] = tuple(shape)
        elif tm is not None and hasattr(tm, "shape"):
            expected[node.name] = tuple(tm.shape)
    ref = next((t for t in gm.parameters() if t.is_floating_point()), None)
    inputs = tuple(x.to(ref.dtype) if ref is not None and x.is_floating_point() else x for x in dg.example_inputs)
    try:
        propagate_shapes(gm, inputs)
    except Exception as exc:
        raise ShrinkError(f"the shrunk model does not run on the example inputs: {exc}") from exc
    for node in gm.graph.nodes:
        if node.name not in expected:
            continue
        tm = node.meta.get("tensor_meta")
        got = tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
        if got != expected[node.name]:
            raise ShrinkError(f"node {node.name} ({node.format_node()}) has shape {got}, "
                              f"expected {expected[node.name]}")


def add_scale_nodes(gm: torch.fx.GraphModule, dg, alive: torch.Tensor, scales) -> None:
    """Insert ``x * buffer`` before consumers whose gate values could not be folded into a weight.

    ``scales`` holds ``(name, gate site, per-position scale or None)``; ``None`` creates the buffer
    with ones, to be filled by ``load_state_dict`` (the safe loading path).
    """
    if not scales:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    ref = next((t for t in gm.parameters() if t.is_floating_point()), torch.empty(0))
    device, dtype = ref.device, ref.dtype
    for name, site, scale in scales:
        node = nodes[site.node]
        keep = alive[site.ids]
        arg = input_of(node, site.arg)
        rank = len(arg.meta["tensor_meta"].shape)
        shape = [1] * rank
        shape[site.axis] = -1
        values = torch.ones(int(keep.sum())) if scale is None else scale[keep]
        buf = f"_hfp_scale_{name}"
        gm.register_buffer(buf, values.reshape(shape).to(device=device, dtype=dtype).clone())
        with gm.graph.inserting_before(node):
            scaled = gm.graph.call_function(torch.mul, (arg, gm.graph.get_attr(buf)))
        replace_input(node, site.arg, scaled)
    gm.graph.lint()
    gm.recompile()
