"""Op handlers: everything hfp_fx knows about one op family, registered once.

An :class:`OpHandler` holds, for the ops it is registered for:

* ``analyze(analysis, node) -> value`` -- the coupling rule: how channel positions flow from
  inputs to the output (``value`` is a :class:`~hfp_fx.spaces.ChannelMap`, ``None`` or a tuple
  of those), which elements are united or fixed (with a reason), which parameter slices belong
  to which channel (``bind_param``, ``saliency``), the op's MAC terms and its gate sites;
* ``macs`` -- ``False`` for ops that do no multiply-accumulates (the shape pass skips counting);
* ``shape`` -- a shape shortcut for the shape pass: ``(output, MACs)`` built from the op's shape
  rule on ``meta`` tensors, or ``None`` to run the op (:mod:`hfp_fx.capture.meta_shortcuts`);
* ``resize(module)`` -- after the shrink pass sliced a module's tensors, update the attributes
  that mirror their shapes (``Conv2d.in_channels``, ``groups``, ``BatchNorm2d.num_features``);
* ``rewrite(node, edit)`` -- rewrite a node's literal arguments that spell out channel counts
  (``view`` sizes, ``split`` sizes, ``narrow`` bounds, a functional conv's ``groups``);
* ``gated_call(module)`` -- for layers whose weight can carry a gate: ``(F, args)``, the
  functional form the gate pass calls as ``F(x, gated weight, bias, *args)`` (``bias`` the
  module's, or ``None`` when it has none);
* ``decompose(gm, node) -> bool`` -- for layers that cannot express pruned shapes
  (``nn.MultiheadAttention`` ties its input, inner and output widths): write the call out as
  plain ops reading the module's parameters, before the analysis, so that the other handlers
  prune it; ``False`` leaves the call as it is (then ``analyze`` applies);
* ``view_step`` -- for view-like ops (casts, reshapes, permutes, ``expand``, basic indexing):
  which input dim an output dim comes from, so that a parameter seen through the op (a class
  token ``expand``-ed, a layer scale ``view``-ed) is sliced with the channels it meets;
* ``size_arithmetic`` -- scalar functions (``operator.floordiv``, ``math.ceil``, ``int``) that
  carry a size read at run time (``x.shape[1]``) into a derived size, which the shrink pass
  follows (volo's ``C // num_heads``);
* ``reads_indices`` -- the rule understands inputs whose values are channel positions
  (:class:`~hfp_fx.spaces.IndexValues`, a router's top-k experts: ``sort``, ``histc``); for
  other ops the analysis fixes those channels, except for ``keeps_values`` ops (views, casts,
  copies), which pass them on.

Handlers are kept in an :class:`OpRegistry`, keyed by module class, function object,
``Tensor`` method name or operator name (``"namespace::op"``).  **One handler serves both graph
dialects**: a registration names the ``torch`` functions / methods of symbolically traced graphs
and, with ``aten=``, the ``torch.ops.aten`` overloads ``torch.export`` records for the same op
(``aten=("add.Tensor", "add_.Tensor")``); rules read arguments through
:func:`~hfp_fx.passes.channel_analysis.arg`, which names them from the target's signature or
schema, so one body reads ``F.batch_norm(x, running_mean, ...)`` and
``aten.batch_norm(x, weight, ...)`` alike.  The registry also holds the module attributes that
name attention head counts and head widths (``head_count_attributes``,
``head_dim_attributes``), which the reshape rule reads to find the heads dim.  **Lookup rule for modules**: the
exact class first, then the nearest base class in the MRO that has a handler, provided the module still uses that base's
``forward`` (a subclass that overrides ``forward`` may compute something else, so it is traced
through instead).  Attribute resizing alone also applies to such subclasses, since it only
describes the tensors the module holds.  Modules with a handler are traced as single nodes.

``DEFAULT_RULES`` holds hfp_fx's own handlers.  To add or override ops for one call without
touching it, pass a registry of your own (``rules=``) to the public functions::

    >>> import torch, hfp_fx
    >>> from hfp_fx.passes.registry import OpHandler, default_rules
    >>> from hfp_fx.passes.rules_pointwise import passthrough
    >>> def fancy_act(x):
    ...     return x.clamp(min=0) + torch.special.erf(x).clamp(max=0)
    >>> rules = default_rules()                  # a copy: DEFAULT_RULES is not changed
    >>> rules.register(OpHandler(passthrough, macs=False), functions=[fancy_act])
    >>> rules.lookup_function(fancy_act).analyze is passthrough
    True

The function must reach the graph as one ``call_function`` node: declare it a leaf with
``torch.fx.wrap`` at module level, in the module that calls it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch.fx.node import Node

__all__ = ["OpHandler", "OpRegistry", "DEFAULT_RULES", "default_rules", "op_handler", "aten_ops", "HandlerConflict"]

Rule = Callable[..., Any]


@dataclass(frozen=True)
class OpHandler:
    """Everything hfp_fx knows about one op family (see the module docstring for each field)."""

    analyze: Rule
    macs: bool = True
    shape: Optional[Callable[..., Any]] = None
    resize: Optional[Callable[[torch.nn.Module], None]] = None
    rewrite: Optional[Callable[..., None]] = None
    gated_call: Optional[Callable[[torch.nn.Module], Optional[Callable]]] = None
    decompose: Optional[Callable[..., bool]] = None
    #: the rule understands inputs whose values are channel indices (``IndexValues``); for any
    #: other rule the analysis fixes those channels first
    reads_indices: bool = False
    #: for view-like ops: ``step(analysis, node, out dim, in shape, out shape) -> in dim`` (``None``:
    #: that dim is not one input dim kept whole), so a parameter seen through the op is bound
    view_step: Optional[Callable[..., Optional[int]]] = None
    #: the output holds the input's values (views, casts, copies): channel indices pass through
    keeps_values: bool = False
    #: scalar arithmetic that carries a run-time size read into a derived size (shrink follows it)
    size_arithmetic: bool = False

    @property
    def name(self) -> str:
        return getattr(self.analyze, "__name__", repr(self.analyze))


class HandlerConflict(ValueError):
    """An op already has a handler in this registry; pass ``replace=True`` to override it."""


class OpRegistry:
    """Op handlers keyed by module class, function object or ``Tensor`` method name."""

    def __init__(self, base: Optional["OpRegistry"] = None):
        self._modules: Dict[type, OpHandler] = dict(base._modules) if base else {}
        self._functions: Dict[Any, OpHandler] = dict(base._functions) if base else {}
        self._methods: Dict[str, OpHandler] = dict(base._methods) if base else {}
        #: operator names (``"namespace::op"``): ops a library registers only once it is imported
        self._op_names: Dict[str, OpHandler] = dict(base._op_names) if base else {}
        #: module classes that symbolic tracing goes into although torch.fx would keep them whole
        self._traced_through: Tuple[type, ...] = base._traced_through if base else ()
        self._module_cache: Dict[Tuple[type, bool], Optional[OpHandler]] = {}
        #: module attributes naming a head count / a head width (torch, timm, Hugging Face
        #: attention modules): a reshape that splits channels into (heads, head_dim) keeps the
        #: heads dim and unites the rest
        self.head_count_attributes: Tuple[str, ...] = base.head_count_attributes if base else ()
        self.head_dim_attributes: Tuple[str, ...] = base.head_dim_attributes if base else ()

    def trace_through(self, *modules: type) -> None:
        """Trace into these module classes (compositions of other layers, such as torch's
        transformer layers) instead of keeping them whole as torch.fx does for ``torch.nn``."""
        self._traced_through = tuple(dict.fromkeys(self._traced_through + tuple(modules)))

    def traces_through(self, module: torch.nn.Module) -> bool:
        return isinstance(module, self._traced_through)

    def copy(self) -> "OpRegistry":
        return OpRegistry(self)

    # -- registration ----------------------------------------------------------------------
    def register(self, handler: OpHandler, *, modules: Iterable[type] = (), functions: Iterable[Callable] = (),
                 methods: Iterable[str] = (), aten: Iterable[str] = (), op_names: Iterable[str] = (),
                 replace: bool = False) -> None:
        """Register ``handler`` for these module classes, functions, ``Tensor`` method names,
        ATen overloads (``"add.Tensor"``, ``"relu"`` for ``.default``; those this torch lacks are
        skipped) and operator names (``"transformers::grouped_mm_fallback"``: every overload of a
        custom op that may not exist yet, as its library registers it when imported)."""
        if not isinstance(handler, OpHandler):
            raise TypeError(f"register expects an OpHandler, got {type(handler).__name__}; "
                            "wrap a rule function as OpHandler(rule)")
        functions = [*functions, *aten_ops(*aten)]
        for table, keys, kind in ((self._modules, modules, "module"), (self._functions, functions, "function"),
                                  (self._methods, methods, "method"), (self._op_names, op_names, "operator")):
            for key in keys:
                old = table.get(key)
                if old is not None and old is not handler and not replace:
                    raise HandlerConflict(
                        f"{kind} {_key_name(key)} already has the handler `{old.name}`; pass replace=True to "
                        f"override it (or register on a copy: hfp_fx.passes.registry.default_rules())")
                table[key] = handler
        self._module_cache.clear()

    # -- lookup ----------------------------------------------------------------------------
    def lookup_module(self, module: torch.nn.Module, attributes_only: bool = False) -> Optional[OpHandler]:
        """Exact class, then the nearest handled base class whose ``forward`` the module still uses.

        ``attributes_only`` drops the ``forward`` condition (resizing attributes after slicing).
        """
        cls = type(module)
        key = (cls, attributes_only)
        if key not in self._module_cache:
            found = None
            for base in cls.__mro__:
                handler = self._modules.get(base)
                if handler is not None:
                    if base is cls or attributes_only or cls.forward is base.forward:
                        found = handler
                    break
            self._module_cache[key] = found
        return self._module_cache[key]

    def lookup_function(self, fn: Callable) -> Optional[OpHandler]:
        try:
            found = self._functions.get(fn)
        except TypeError:  # unhashable target
            return None
        if found is None and self._op_names and isinstance(fn, torch._ops.OpOverload):
            found = self._op_names.get(fn.name().partition(".")[0])
        return found

    def lookup_method(self, name: str) -> Optional[OpHandler]:
        return self._methods.get(name)

    def lookup(self, node: Node, module: Optional[torch.nn.Module] = None) -> Optional[OpHandler]:
        """The handler of a ``call_module`` / ``call_function`` / ``call_method`` node, if any."""
        if node.op == "call_module":
            return self.lookup_module(module) if module is not None else None
        if node.op == "call_function":
            return self.lookup_function(node.target)
        if node.op == "call_method":
            return self.lookup_method(node.target)
        return None

    def is_leaf(self, module: torch.nn.Module) -> bool:
        """Modules with a handler are kept as single nodes when tracing."""
        return self.lookup_module(module) is not None

    def counts_macs(self, node: Node, module: Optional[torch.nn.Module] = None) -> bool:
        handler = self.lookup(node, module)
        return handler is None or handler.macs

    def handlers(self):
        """Every (kind, key, handler) registered, for documentation and tests."""
        for kind, table in (("module", self._modules), ("function", self._functions), ("method", self._methods),
                            ("operator", self._op_names)):
            for key, handler in table.items():
                yield kind, key, handler


def aten_ops(*names: str) -> list:
    """The overloads ``torch.ops.aten.<name>`` this torch has (``"add.Tensor"``; a bare name is
    the ``.default`` overload)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def _key_name(key: Any) -> str:
    if isinstance(key, str):
        return f"`{key}`" if "::" in key else f"`Tensor.{key}`"
    return f"`{getattr(key, '__module__', None) or ''}.{getattr(key, '__name__', repr(key))}`"


#: hfp_fx's own handlers (filled by the ``rules_*`` modules on import)
DEFAULT_RULES = OpRegistry()


def default_rules() -> OpRegistry:
    """A copy of hfp_fx's handlers, to extend or override for one call (``rules=``)."""
    return DEFAULT_RULES.copy()


def op_handler(*, modules: Iterable[type] = (), functions: Iterable[Callable] = (), methods: Iterable[str] = (),
               aten: Iterable[str] = (), op_names: Iterable[str] = (), macs: bool = True, shape=None, resize=None,
               rewrite=None, gated_call=None, decompose=None, reads_indices: bool = False, view_step=None,
               keeps_values: bool = False, size_arithmetic: bool = False,
               registry: Optional[OpRegistry] = None, replace: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: make the decorated rule a handler's ``analyze`` and register it.

    Returns the rule itself, so that other handlers can reuse it (``OpHandler(passthrough)``).
    """

    def deco(rule: Rule) -> Rule:
        handler = OpHandler(rule, macs=macs, shape=shape, resize=resize, rewrite=rewrite, gated_call=gated_call,
                            decompose=decompose, reads_indices=reads_indices, view_step=view_step,
                            keeps_values=keeps_values, size_arithmetic=size_arithmetic)
        (registry if registry is not None else DEFAULT_RULES).register(
            handler, modules=modules, functions=functions, methods=methods, aten=aten, op_names=op_names,
            replace=replace)
        return rule

    return deco
