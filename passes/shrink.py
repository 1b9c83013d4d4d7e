"""Step 6 of the flow: the rewrite pass that emits a physically smaller GraphModule.

Three edits, all driven by the channel facts and the op handlers:

1. every parameter and buffer bound to channel elements is sliced to the kept positions
   (``index_select`` along each bound dim); aliases of a tied tensor keep pointing at one tensor;
2. each module's handler ``resize``s the attributes that mirror its tensors' shapes
   (``Conv2d.in_channels``, ``groups``, ``Linear.out_features``, ``BatchNorm2d.num_features``);
3. each node's handler ``rewrite``s literal arguments that spell out channel counts:
   ``view``/``reshape``/``expand`` sizes, ``split`` sizes (``chunk`` becomes ``split``),
   ``narrow`` bounds and channel slices ``x[:, a:b]``, a functional conv's ``groups``.

Afterwards the new model's shapes are propagated and compared node by node with the
expected pruned shapes; any difference raises instead of returning a wrong model.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), x)
    >>> g = dg.prunable_groups[0]
    >>> small = shrink_model(dg.facts, dg.alive({g.id: range(g.channels // 2)}))
    >>> small.conv1.out_channels
    32
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Set

import torch
import torch.fx
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap
from hfp_fx.passes.channel_analysis import ChannelFacts
from hfp_fx.passes.depth import drop_unused_state, remove_units
from hfp_fx.passes.edit import input_of, scale_input
from hfp_fx.capture.shapes import propagate_shapes
from hfp_fx.capture.copies import editable_copy

__all__ = ["shrink_model", "add_scale_nodes", "scale_buffer", "ShrinkError", "ShrinkEdit"]


class ShrinkError(RuntimeError):
    """The rewritten model does not have the shapes the plan predicts (a bug: please report)."""


@dataclass
class ShrinkEdit:
    """What a handler's ``rewrite(node, edit)`` may ask while the shrink pass rewrites ``gm``.

    ``alive`` holds one bool per channel element (:meth:`hfp_fx.DependencyGraph.alive`).
    """

    gm: torch.fx.GraphModule
    facts: ChannelFacts
    alive: torch.Tensor
    #: nodes the pass inserted (scale nodes, a rewritten norm's result) -> the node of the
    #: traced graph whose channels they carry
    inserted: Dict[str, str] = field(default_factory=dict)
    #: size reads (``x.shape[d]``, ``x.size(d)``) of a pruned channel dim, found before any rewrite
    #: (a rewrite may replace ``x`` by a node the analysis has no map for)
    pruned_size_reads: Set[str] = field(default_factory=set)

    def module(self, node: Node) -> Optional[torch.nn.Module]:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def map_of(self, value) -> Optional[ChannelMap]:
        """The channel map of a node (by object or name), if it has exactly one."""
        name = value.name if isinstance(value, Node) else value
        name = self.inserted.get(name, name)
        m = self.facts.maps.get(name) if isinstance(name, str) else None
        return m if isinstance(m, ChannelMap) else None

    def replaced(self, node: Node, new: Node) -> None:
        """Record that ``new`` now computes what ``node`` of the traced graph computed."""
        self.inserted[new.name] = self.inserted.get(node.name, node.name)

    def maps_of(self, node: Node):
        """The raw channel labelling of a node: a map, ``None`` or a tuple of those."""
        return self.facts.maps.get(node.name)

    def kept(self, m: ChannelMap) -> int:
        """How many positions of ``m`` are kept."""
        return int(self.alive[m.ids].sum())

    def changed(self, m: Optional[ChannelMap]) -> bool:
        return m is not None and not bool(self.alive[m.ids].all())

    def kept_before(self, m: ChannelMap, pos: int) -> int:
        """How many kept positions of ``m`` lie before position ``pos`` (a slice bound's new value)."""
        return int(self.alive[m.ids[:pos]].sum())

    @staticmethod
    def dense_shape(node: Node) -> torch.Size:
        """The node's shape in the dense model."""
        return node.meta["tensor_meta"].shape


def shrink_model(facts: ChannelFacts, alive: torch.Tensor, verify: bool = True,
                 gm: Optional[torch.fx.GraphModule] = None, scales=(), removed=()) -> torch.fx.GraphModule:
    """Shrink the traced model of ``facts`` (or ``gm``, a copy of it with other weights) to the
    ``alive`` elements, without the residual branches of the depth units ``removed``.

    ``scales`` (see :func:`add_scale_nodes`) are inserted before the handlers rewrite their
    nodes, since a rewrite may replace a gate site's node by several (a LayerNorm over pruned
    channels).
    """
    gm = editable_copy(facts.gm) if gm is None else gm
    # the branches go first, their parameters last: the slicing below finds tensors by name
    remove_units(gm, removed)
    before = {name: tuple(t.shape) for name, t in
              list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))}
    _slice_state(gm, facts, alive)
    _resize_modules(gm, facts, before)
    size_reads = pruned_size_reads(gm, facts, alive)
    inserted = add_scale_nodes(gm, alive, scales)
    edit = ShrinkEdit(gm, facts, alive, inserted, size_reads)
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        handler = facts.rules.lookup(node, edit.module(node))
        if handler is not None and handler.rewrite is not None:
            handler.rewrite(node, edit)
    gm.graph.lint()
    if removed:
        drop_unused_state(gm)
    gm.recompile()
    if verify:
        _verify_shapes(gm, facts, alive)
    return gm


# -------------------------------------------------------------------------------------------
# 1. parameters and buffers
# -------------------------------------------------------------------------------------------
def kept_indices(dims: Mapping[int, torch.Tensor], alive: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Per dim of a tensor (its element ids, as ``ChannelFacts.params[name]`` holds them), the
    indices it keeps; dims that keep every index are left out."""
    out = {}
    for dim, ids in dims.items():
        keep = alive[ids]
        if not bool(keep.all()):
            out[dim] = torch.nonzero(keep).flatten()
    return out


def _slice_state(gm: torch.fx.GraphModule, facts: ChannelFacts, alive: torch.Tensor) -> None:
    aliases: Dict[int, List[str]] = {}
    tensors: Dict[str, torch.Tensor] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
        tensors[name] = t
    for name, dims in facts.params.items():
        t = tensors[name]
        new = t.detach()
        for dim, idx in kept_indices(dims, alive).items():
            new = new.index_select(dim, idx.to(new.device))
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


def _resize_modules(gm: torch.fx.GraphModule, facts: ChannelFacts, before: Dict[str, tuple]) -> None:
    """Each module's handler updates the attributes that mirror its (now sliced) tensors."""
    for name, module in gm.named_modules():
        handler = facts.rules.lookup_module(module, attributes_only=True)
        if handler is None or handler.resize is None:
            continue
        prefix = f"{name}." if name else ""
        own = {k: before[prefix + k] for k in list(module._parameters) + list(module._buffers) if prefix + k in before}
        handler.resize(module, own)


def pruned_size_reads(gm: torch.fx.GraphModule, facts: ChannelFacts, alive: torch.Tensor) -> Set[str]:
    """Nodes that read the size of a pruned channel dim at run time: ``x.shape[d]``,
    ``x.size(d)`` or ``x.size()[d]`` where ``d`` is the channel axis of ``x`` and ``x`` loses
    channels, and scalar arithmetic on such sizes (volo's ``C // num_heads``).  Such a size
    follows ``x``'s pruning, which is right only where it sizes ``x``'s own channels."""
    found = set()
    for node in gm.graph.nodes:
        handler = facts.rules.lookup_function(node.target) if node.op == "call_function" else None
        if (handler is not None and handler.size_arithmetic
                and any(isinstance(a, Node) and a.name in found for a in node.args)):
            found.add(node.name)
            continue
        if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
            src, dim = node.args
        elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node)
              and ((node.args[0].op == "call_function" and node.args[0].target is getattr
                    and node.args[0].args[1:] == ("shape",))
                   or (node.args[0].op == "call_method" and node.args[0].target == "size"
                       and len(node.args[0].args) == 1))):
            src, dim = node.args[0].args[0], node.args[1]
        else:
            continue
        m = facts.maps.get(src.name) if isinstance(src, Node) else None
        tm = src.meta.get("tensor_meta") if isinstance(src, Node) else None
        if (isinstance(m, ChannelMap) and isinstance(dim, int) and tm is not None and hasattr(tm, "shape")
                and dim % len(tm.shape) == m.axis and not bool(alive[m.ids].all())):
            found.add(node.name)
    return found


# -------------------------------------------------------------------------------------------
# verification
# -------------------------------------------------------------------------------------------
def _verify_shapes(gm: torch.fx.GraphModule, facts: ChannelFacts, alive: torch.Tensor) -> None:

    expected = {}
    for node in facts.gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        m = facts.maps.get(node.name)
        if isinstance(m, ChannelMap) and tm is not None and hasattr(tm, "shape"):
            shape = list(tm.shape)
            shape[m.axis] = int(alive[m.ids].sum())
            expected[node.name] = tuple(shape)
        elif (node.op == "get_attr" or node.name in facts.param_views) and tm is not None and hasattr(tm, "shape"):
            shape = list(tm.shape)
            dims = (facts.param_views.get(node.name)
                    or facts.params.get(facts.canonical.get(node.target, node.target), {}))
            for dim, ids in dims.items():
                shape[dim] = int(alive[ids].sum())
            expected[node.name] = tuple(shape)
        elif tm is not None and hasattr(tm, "shape"):
            expected[node.name] = tuple(tm.shape)
    ref = next((t for t in gm.parameters() if t.is_floating_point()), None)
    inputs = tuple(x.to(ref.dtype) if ref is not None and x.is_floating_point() else x for x in facts.example_inputs)
    try:
        propagate_shapes(gm, inputs, facts.rules)
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


def scale_buffer(name: str) -> str:
    """The buffer that holds the scales of scale site ``name`` (saved files key it this way)."""
    return f"_hfp_scale_{name}"


def add_scale_nodes(gm: torch.fx.GraphModule, alive: torch.Tensor, scales) -> Dict[str, str]:
    """Insert ``x * buffer`` before consumers whose gate values could not be folded into a weight
    (``x + buffer`` with the gates' logs at a softmax's ``"logit"`` site).

    ``scales`` holds ``(name, gate site, per-position scale or None)``; ``None`` creates the buffer
    with ones (zeros at a logit site), to be filled by ``load_state_dict`` (the safe loading
    path).  Returns the inserted nodes' names, each mapped to the node it scales.
    """
    inserted: Dict[str, str] = {}
    if not scales:
        return inserted
    nodes = {n.name: n for n in gm.graph.nodes}
    ref = next((t for t in gm.parameters() if t.is_floating_point()), torch.empty(0))
    device, dtype = ref.device, ref.dtype
    for name, site, scale in scales:
        keep = alive[site.ids]
        values = torch.ones(int(keep.sum())) if scale is None else scale[keep]
        logit = site.kind == "logit"
        x = input_of(nodes[site.node], site.arg)
        scaled = scale_input(gm, nodes[site.node], site.arg, site.axis,
                             (values.log() if logit else values).to(device=device, dtype=dtype).clone(),
                             scale_buffer(name), op=torch.add if logit else torch.mul)
        scaled.meta = dict(x.meta)  # the same (dense) layout as its input
        inserted[scaled.name] = inserted.get(x.name, x.name)
    gm.graph.lint()
    gm.recompile()
    return inserted
