"""The channel analysis: walk a shape-annotated GraphModule and label every channel axis.

Each node is dispatched to the ``analyze`` rule of its op handler (:mod:`hfp_fx.passes.registry`,
looked up in the analysis' rule set).  Rules see this object and record *facts*:

* ``maps[node]``: the node's :class:`~hfp_fx.spaces.ChannelMap` (or ``None`` / a tuple);
* ``params[name][dim]``: which element each slice of a parameter or buffer belongs to, so the
  shrink pass can slice it and the cost model can count it;
* ``macs``: multiply-accumulate terms ``coeff * prod(kept(row) for row in rows)``;
* ``gates``: where a channel is *consumed* by a channel-mixing op (conv, linear, matmul).
  Zeroing a unit at all of its gate sites makes its contribution exactly zero, which is the
  reference semantics of :func:`hfp_fx.mask` and where :func:`hfp_fx.prepare` puts its gates;
* ``importance``: which weight slices rank each channel by magnitude (:mod:`hfp_fx.plan.saliency`).

Any op without a handler fixes the channels that flow into it, naming the op, so an unknown op can
only make the result less pruned, never wrong.

Example::

    >>> import torch, torchvision
    >>> from hfp_fx.capture.tracing import trace
    >>> from hfp_fx.capture.shapes import propagate_shapes
    >>> from hfp_fx.passes.channel_analysis import ChannelAnalysis
    >>> traced = trace(torchvision.models.resnet18())
    >>> propagate_shapes(traced.graph_module, (torch.randn(1, 3, 64, 64),))
    >>> facts = ChannelAnalysis(traced.graph_module).run()
    >>> facts.params["conv1.weight"][0].numel()
    64
"""
from __future__ import annotations

import functools
import inspect

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
from torch.fx.node import Node

from hfp_fx.spaces import ChannelMap, ElementTable, IndexValues
from hfp_fx.passes import registry

__all__ = ["ChannelAnalysis", "ChannelFacts", "MacTerm", "GateSite", "MagnitudeSlice", "describe", "iter_maps"]


@dataclass
class MacTerm:
    """``coeff * prod(kept positions of each row)`` multiply-accumulates at ``node``."""

    node: str
    coeff: float
    rows: Tuple[torch.Tensor, ...]


@dataclass
class GateSite:
    """Input ``arg`` of ``node`` mixes channels along ``axis``; ``ids`` labels its positions.

    ``weight`` names a ``(parameter, dim)`` whose slices multiply exactly these positions, so a
    gate can be folded into the weight instead of the activation.
    """

    node: str
    arg: Union[int, str, Tuple[int, int]]  #: (i, j): item j of the list argument i
    axis: int
    ids: torch.Tensor
    weight: Optional[Tuple[str, int]] = None
    #: ``"scale"``: removed positions are multiplied by 0; ``"logit"``: they become ``-inf``
    #: (``x + log(gate)``), at the input of a softmax over the channels (a router's experts)
    kind: str = "scale"

    @property
    def name(self) -> str:
        """A stable name derived from the graph (consumer node and argument), e.g. ``fc_0``.

        Gate modules and scale buffers are named after it, so saved files do not depend on the
        order in which rules recorded their sites.
        """
        arg = "_".join(map(str, self.arg)) if isinstance(self.arg, tuple) else self.arg
        return f"{self.node}_{arg}"


@dataclass
class MagnitudeSlice:
    """Slices of ``param`` along ``dim`` hold the weights of channel ``ids`` for magnitude saliency.

    ``role="out"``: the filters that produce the channels (a conv's output rows); ``"in"``: the
    weights that consume them (a conv's input columns, used when a group has no producer).
    """

    param: str
    dim: int
    ids: torch.Tensor
    role: str


@dataclass
class ChannelFacts:
    """What the channel analysis found, the typed input of every later pass.

    ``maps`` labels each node's channel axis, ``params`` binds parameter/buffer dims to elements,
    ``macs`` and ``gates`` are the cost terms and the places channels are consumed; ``rules``
    and ``example_inputs`` are the op handlers and inputs the facts were derived with.
    """

    gm: torch.fx.GraphModule
    elements: ElementTable
    maps: Dict[str, Any]
    params: Dict[str, Dict[int, torch.Tensor]]
    macs: List[MacTerm]
    gates: List[GateSite]
    opaque: Dict[str, str] = field(default_factory=dict)
    #: alias name -> canonical name for tied parameters
    canonical: Dict[str, str] = field(default_factory=dict)
    #: nodes whose MAC rule disagrees with torch.utils.flop_counter: (node, ours, counter's)
    mac_mismatch: List[Tuple[str, int, int]] = field(default_factory=list)
    #: weight slices that rank channels by magnitude (``prune(importance="l1")``, width ranking)
    importance: List[MagnitudeSlice] = field(default_factory=list)
    rules: registry.OpRegistry = field(default_factory=lambda: registry.DEFAULT_RULES)
    example_inputs: Tuple[torch.Tensor, ...] = ()
    #: node name -> {dim: element ids} for views of a parameter pruned on several dims
    param_views: Dict[str, Dict[int, torch.Tensor]] = field(default_factory=dict)
    #: (element ids, fewest that must stay): a ``topk(k)`` over the channels needs k of them
    floors: List[Tuple[torch.Tensor, int, str]] = field(default_factory=list)


def iter_maps(value) -> Iterable[ChannelMap]:
    if isinstance(value, ChannelMap):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_maps(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_maps(v)


def describe(node: Node, module: Optional[torch.nn.Module] = None) -> str:
    if node.op == "call_module":
        return f"module `{node.target}` ({type(module).__name__ if module is not None else '?'})"
    if node.op == "call_function":
        t = node.target
        return f"function `{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', repr(t))}` (node {node.name})"
    if node.op == "call_method":
        return f"method `Tensor.{node.target}` (node {node.name})"
    return f"{node.op} `{node.target}`"


class ChannelAnalysis:
    """Run every node's coupling rule over a GraphModule annotated by ``propagate_shapes``."""

    def __init__(self, gm: torch.fx.GraphModule, root: Optional[torch.nn.Module] = None,
                 exclude: Sequence[str] = (), opaque: Optional[Dict[str, str]] = None,
                 rules: Optional[registry.OpRegistry] = None, example_inputs: Tuple[torch.Tensor, ...] = ()):
        self.gm = gm
        self.rules = rules if rules is not None else registry.DEFAULT_RULES
        self.example_inputs = tuple(example_inputs)
        self.importance: List[MagnitudeSlice] = []
        self.root = root if root is not None else gm  # for attribute hints like ``num_heads``
        self.exclude = tuple(exclude)
        self.opaque = dict(opaque or {})
        self.elements = ElementTable()
        self.maps: Dict[str, Any] = {}
        self.params: Dict[str, Dict[int, torch.Tensor]] = {}
        #: nodes that view a parameter with channels on several dims (a transposed 3-d expert
        #: weight): node name -> {dim: element ids}, for the shrink pass's shape check
        self.param_views: Dict[str, Dict[int, torch.Tensor]] = {}
        self.floors: List[Tuple[torch.Tensor, int, str]] = []
        self.macs: List[MacTerm] = []
        self.gates: List[GateSite] = []
        self.mac_mismatch: List[Tuple[str, int, int]] = []
        self._modules = dict(gm.named_modules())
        # tied weights: every alias of a tensor is bound under its first name
        self.canonical: Dict[str, str] = {}
        first: Dict[int, str] = {}
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
            self.canonical[name] = first.setdefault(id(t), name)
        self.node: Optional[Node] = None

    # -- queries rules use ---------------------------------------------------------------
    def module(self, node: Node) -> Optional[torch.nn.Module]:
        return self._modules.get(node.target) if node.op == "call_module" else None

    def map(self, arg: Any) -> Any:
        return self.maps.get(arg.name) if isinstance(arg, Node) else None

    def cmap(self, arg: Any) -> Optional[ChannelMap]:
        m = self.map(arg)
        return m if isinstance(m, ChannelMap) else None

    @staticmethod
    def shape(arg: Any):
        """``torch.Size`` for a tensor node, a tuple of shapes for a tuple of tensors, else None."""
        if not isinstance(arg, Node):
            return None
        tm = arg.meta.get("tensor_meta")
        return _shape_of(tm)

    def arg(self, node: Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def hints(self, node: Node, names: Sequence[str]) -> set:
        """Every integer attribute named in ``names`` on the innermost module that traced ``node``
        and has any of them (query and key/value head counts, say)."""
        stack = node.meta.get("nn_module_stack") or {}
        paths = [entry[0] if isinstance(entry, tuple) else entry for entry in stack.values()]
        for path in reversed([""] + paths):  # the root last: its own forward has no stack entry
            try:
                mod = self.root.get_submodule(path) if path else self.root
            except AttributeError:
                continue
            found = {v for v in (getattr(mod, n, None) for n in names) if isinstance(v, int) and not isinstance(v, bool)}
            if found:
                return found
        return set()

    # -- facts rules record ---------------------------------------------------------------
    def new(self, n: int, fixed: Optional[str] = None) -> torch.Tensor:
        return self.elements.new(n, fixed)

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.elements.union(a, b)

    def fix(self, value: Any, reason: str) -> None:
        """Fix every element in ``value``: an id tensor, a ChannelMap, or containers of them."""
        if isinstance(value, torch.Tensor):
            self.elements.fix(value, reason)
            return
        if isinstance(value, IndexValues):
            self.elements.fix(value.ids, reason)
            return
        if isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, IndexValues):
                    self.elements.fix(v.ids, reason)
        for m in iter_maps(value):
            self.elements.fix(m.ids, reason)

    def bind_param(self, name: Optional[str], dim: int, ids: torch.Tensor, importance: Optional[str] = None) -> None:
        """Positions along ``dim`` of parameter/buffer ``name`` belong to elements ``ids``.

        ``importance="out"`` / ``"in"`` also makes these slices rank the channels by magnitude
        (:class:`MagnitudeSlice`): the weights that produce, or consume, them.
        """
        if name is None:
            return
        name = self.canonical.get(name, name)
        if importance is not None:
            self.importance.append(MagnitudeSlice(name, dim, ids, importance))
        dims = self.params.setdefault(name, {})
        if dim in dims:
            self.union(dims[dim], ids)
        else:
            dims[dim] = ids

    def add_macs(self, coeff: float, *rows: Optional[torch.Tensor]) -> None:
        if coeff:
            self.macs.append(MacTerm(self.node.name, float(coeff), tuple(r for r in rows if r is not None)))

    def gate(self, arg: Union[int, str, Tuple[int, int]], m: ChannelMap, weight: Optional[Tuple[str, int]] = None,
             kind: str = "scale") -> None:
        if weight is not None:  # tied weights: one canonical name, so folding counts every use
            weight = (self.canonical.get(weight[0], weight[0]), weight[1])
        self.gates.append(GateSite(self.node.name, arg, m.axis, m.ids, weight, kind))

    def floor(self, ids: torch.Tensor, count: int, why: str) -> None:
        """At least ``count`` of the channels ``ids`` must stay (``why`` says for what)."""
        self.floors.append((ids, int(count), why))

    # -- the walk -------------------------------------------------------------------------
    def run(self) -> ChannelFacts:
        for node in self.gm.graph.nodes:
            self.node = node
            self.maps[node.name] = self._visit(node)
        self.node = None
        return ChannelFacts(self.gm, self.elements, self.maps, self.params, self.macs, self.gates, self.opaque,
                            self.canonical, self.mac_mismatch, self.importance, self.rules, self.example_inputs,
                            self.param_views, self.floors)

    def _visit(self, node: Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self.fix([self.map(a) for a in _flatten_args(node.args)], "model output")
            return None
        module = self.module(node)
        excluded = self._excluded_by(node)
        macs_before = len(self.macs)
        if node.op == "call_module" and node.target in self.opaque:
            out = self._unknown(node, module, f"opaque module `{node.target}` (not traceable: {self.opaque[node.target]})")
        else:
            handler = self.rules.lookup(node, module)
            indices = [v for v in (self.map(x) for x in _flatten_args((node.args, node.kwargs)))
                       if isinstance(v, IndexValues)]
            if indices and not (handler is not None and handler.reads_indices):
                if handler is not None and handler.keeps_values and len(indices) == 1:
                    return indices[0]  # a view or cast of the indices: still the same positions
                self.fix(indices, f"{describe(node, module)} reads channel indices (a top-k's) as values")
            if handler is None:
                if node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr":
                    return self._named_field(node)
                out = self._unknown(node, module, f"unsupported {describe(node, module)}")
            else:
                out = handler.analyze(self, node)
        self._check_macs(node, macs_before)
        if excluded:
            reason = f"excluded by the user (`{excluded}`)"
            self.fix(out, reason)
            self.fix([self.map(a) for a in _flatten_args((node.args, node.kwargs))], reason)
        return out

    def _named_field(self, node: Node) -> Any:
        """``result.values`` / ``result.indices`` of a (values, indices) named tuple (``topk``,
        ``sort``): that item's map; other attributes carry no channels."""
        value = self.map(node.args[0]) if node.args else None
        field_name = node.args[1] if len(node.args) > 1 else None
        if isinstance(value, (tuple, list)) and len(value) == 2 and field_name in ("values", "indices"):
            return value[0 if field_name == "values" else 1]
        return None

    def _check_macs(self, node: Node, start: int) -> None:
        """Keep the cost model equal to ``torch.utils.flop_counter`` node by node.

        Nodes without a MAC rule (opaque modules, unknown ops) get a constant term with the
        counter's value; a rule that disagrees with the counter is recorded in ``mac_mismatch``.
        """
        counted = node.meta.get("macs")
        if counted is None:
            return
        mine = sum(t.coeff * math.prod(r.numel() for r in t.rows) for t in self.macs[start:])
        if len(self.macs) == start:
            if counted:
                self.macs.append(MacTerm(node.name, float(counted), ()))
        elif abs(mine - counted) > 1e-6 * max(counted, 1):
            self.mac_mismatch.append((node.name, int(mine), int(counted)))

    def _unknown(self, node: Node, module, reason: str) -> Any:
        self.fix([self.map(a) for a in _flatten_args((node.args, node.kwargs))], reason)
        shape = self.shape(node)
        if isinstance(shape, tuple) and not isinstance(shape, torch.Size):
            return tuple(None for _ in shape)
        return None

    def _excluded_by(self, node: Node) -> Optional[str]:
        if not self.exclude:
            return None
        paths = []
        if node.op == "call_module":
            paths.append(str(node.target))
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            paths.append(entry[0] if isinstance(entry, tuple) else str(entry))
        for p in paths:
            for ex in self.exclude:
                if p == ex or p.startswith(ex + "."):
                    return ex
        return None


def _shape_of(tm):
    if tm is None:
        return None
    if hasattr(tm, "shape") and hasattr(tm, "dtype"):
        return torch.Size(tm.shape)
    if isinstance(tm, (tuple, list)):
        return tuple(_shape_of(t) for t in tm)
    if isinstance(tm, dict):
        return {k: _shape_of(v) for k, v in tm.items()}
    return None


@functools.lru_cache(maxsize=None)
def _parameter_names(target: Any) -> Optional[Tuple[str, ...]]:
    if isinstance(target, torch._ops.OpOverload):
        return tuple(argument.name for argument in target._schema.arguments)
    try:
        return tuple(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def arg(node: Node, name: str, default: Any = None, index: Optional[int] = None) -> Any:
    """Argument ``name`` of a call, found by the name the target's signature (a Python function)
    or schema (an ATen overload) gives it, so that one rule reads both dialects:
    ``arg(node, "weight")`` is ``args[3]`` of ``F.batch_norm`` and ``args[1]`` of
    ``aten.batch_norm``.  ``index`` is the position to fall back on when the target has no
    signature (``Tensor`` methods, C builtins)."""
    if name in node.kwargs:
        return node.kwargs[name]
    try:
        names = _parameter_names(node.target) if not isinstance(node.target, str) else None
    except TypeError:  # unhashable target
        names = None
    if names is not None and name in names:
        index = names.index(name)
    elif names is not None:
        return default
    if index is not None and len(node.args) > index:
        return node.args[index]
    return default


def op_name(node: Node) -> str:
    """The bare op name of a call: ``view`` for ``aten.view.default``, ``torch.reshape`` or ``x.view``."""
    target = node.target
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet if packet is not None else target, "__name__", "")


def _flatten_args(args) -> List[Any]:
    out: List[Any] = []

    def walk(a):
        if isinstance(a, (tuple, list)):
            for x in a:
                walk(x)
        elif isinstance(a, dict):
            for x in a.values():
                walk(x)
        else:
            out.append(a)

    walk(args)
    return out
