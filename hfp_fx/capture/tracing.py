"""Step 1 of the flow: turn a user model into a shape-annotated ``torch.fx.GraphModule``.

``trace`` runs ``torch.fx`` symbolic tracing on a :func:`~hfp_fx.capture.copies.state_copy` of the
model (its own Python state, the same tensors), so whatever ``forward`` writes to ``self``
while tracing -- ``Proxy`` objects in caches -- never reaches the user's model.  Submodules
whose ``forward`` cannot be traced (Python control flow on tensor values, unsupported
builtins, ...) are retried as *opaque* leaves: the call stays one ``call_module`` node, and the
channel analysis later treats its inputs and outputs as fixed.  Shapes are added by
:func:`hfp_fx.capture.shapes.propagate_shapes`.

Example::

    >>> import torch, torchvision
    >>> traced = trace(torchvision.models.resnet18())
    >>> traced.opaque
    {}
"""
from __future__ import annotations

import copy
import dis
import functools
import inspect
import logging
import operator
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx

from hfp_fx.capture.copies import lazy_graph_module, meta_copy, shape_only, state_copy
from hfp_fx.capture.export_capture import CAPTURES, export_capture, is_hugging_face
from hfp_fx.passes.registry import DEFAULT_RULES, OpRegistry

log = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedModel", "trace", "capture", "normalize_inputs", "input_names"]

#: How many failing submodules are made opaque before giving up.
MAX_OPAQUE_RETRIES = 64


class TraceError(torch.fx.proxy.TraceError, RuntimeError):
    """The model cannot be captured by ``torch.fx`` at all (a ``torch.fx.proxy.TraceError``)."""


@dataclass
class TracedModel:
    graph_module: torch.fx.GraphModule
    #: qualified name of each submodule that was made opaque -> why its tracing failed
    opaque: Dict[str, str] = field(default_factory=dict)
    #: traced with the example inputs' concrete shapes (the model branches on shapes)
    shape_specialized: bool = False
    #: ``"fx"`` (symbolic tracing) or ``"export"`` (``torch.export``)
    capture: str = "fx"



@functools.lru_cache(maxsize=512)
def _unpack_widths(code) -> Dict[int, int]:
    """Bytecode offset -> count of each ``UNPACK_SEQUENCE`` in ``code``."""
    return {i.offset: i.argval for i in dis.get_instructions(code) if i.opname == "UNPACK_SEQUENCE"}


class _Proxy(torch.fx.Proxy):
    """``torch.fx.Proxy`` whose iteration reads the caller's bytecode once per function.

    Iterating a proxy is only possible where the caller unpacks it (``q, k, v = x.chunk(3)``,
    ``b, t, c = x.shape``): torch.fx finds out by disassembling the calling function on every
    iteration, about 3 ms for ``F.multi_head_attention_forward``, once per attention layer.
    Same decision, from a per-function table.
    """

    def __iter__(self):
        caller = sys._getframe(1)
        width = _unpack_widths(caller.f_code).get(caller.f_lasti)
        if width is not None:
            return (self[i] for i in range(width))
        return self.tracer.iter(self)

    def __getattr__(self, k):
        return _Attribute(self, k)  # (torch.fx's ``Attribute``, iterated as above)


class _Attribute(_Proxy, torch.fx.proxy.Attribute):
    pass


class _RecordingTracer(torch.fx.Tracer):
    """A tracer that remembers which submodule was being traced when an error was raised."""

    def __init__(self, opaque_names: Sequence[str] = (), rules: Optional[OpRegistry] = None):
        super().__init__()
        self.rules = rules if rules is not None else DEFAULT_RULES
        # Buffers become ``get_attr`` nodes as parameters do, so that an in-place write to one in
        # a traced ``forward`` (``self.steps.add_(1)``) is recorded in the graph instead of being
        # run on the user's buffer while tracing and then lost.
        self.proxy_buffer_attributes = True
        self.opaque_names = set(opaque_names)
        self._stack: list = []
        self.failed_in: Optional[str] = None
        self._names_of: Tuple[Optional[torch.nn.Module], Dict[int, str]] = (None, {})

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        # torch.fx finds a tensor attribute's qualified name by scanning every named parameter
        # (then buffer) of the root on each access: quadratic on models whose traced forward reads
        # parameters itself (swin's ``logit_scale`` and position tables).  One id -> name map per
        # root instead, in the same order, so the same (first) name wins for shared tensors.
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._tensor_names().get(id(attr_val))
        if name is None:  # not registered on the root: torch.fx decides (a plain tensor attribute)
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def _tensor_names(self) -> Dict[int, str]:
        if self._names_of[0] is not self.root:
            names: Dict[int, str] = {}
            for n, p in self.root.named_parameters():
                names.setdefault(id(p), n)
            for n, b in self.root.named_buffers():
                names.setdefault(id(b), n)
            self._names_of = (self.root, names)
        return self._names_of[1]

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque_names or self.rules.is_leaf(m):
            return True
        if self.rules.traces_through(m):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self._stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = name
            raise
        finally:
            self._stack.pop()


class _ValueProxy(_Proxy):
    """A proxy that also knows the value its node takes on the example inputs (as meta tensors).

    Python control flow on shapes (``if x.shape[1] != c``, ``for i in range(x.size(0))``,
    ``a, b = x.shape[:2]``) then follows the example, as in ``transformers.utils.fx``.
    """

    def _value(self, why: str):
        value = self.node.meta.get("hfp_value", _UNKNOWN)
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            raise torch.fx.proxy.TraceError(
                f"{why} of `{self.node.name}` depends on tensor values, not only on shapes")
        return value

    def __bool__(self) -> bool:
        return bool(self._value("a branch on the value"))

    def __len__(self) -> int:
        value = self.node.meta.get("hfp_value", _UNKNOWN)
        if isinstance(value, torch.Tensor):
            return len(value)
        return len(self._value("len()"))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __index__(self) -> int:
        return int(self._value("an integer use"))

    __int__ = __index__


_UNKNOWN = object()


class _ShapeTracer(_RecordingTracer):
    """Traces with the example inputs' shapes known: every node's value is computed on meta copies.

    The graph is specialised to the example's shapes wherever the model branches on them.
    """

    def __init__(self, root: torch.nn.Module, example_inputs: Tuple[torch.Tensor, ...],
                 opaque_names: Sequence[str] = (), rules: Optional[OpRegistry] = None):
        super().__init__(opaque_names, rules)
        self.meta_root = shape_only(meta_copy(root))
        self._meta_modules = {id(m) for m in self.meta_root.modules()}
        self.example = [torch.empty_like(x, device="meta") for x in example_inputs]
        self._placeholders = 0

    def call_module(self, m, forward, args, kwargs):
        # computing a value runs a module of the meta copy while torch.fx has patched every
        # module call to come here: run it, it is not part of the traced model
        if id(m) in self._meta_modules:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        # attribute proxies (``x.is_nested``) are not _ValueProxy objects; their node has a value
        value = obj.node.meta.get("hfp_value", _UNKNOWN)
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            return super().to_bool(obj)
        return bool(value)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        try:
            proxy.node.meta["hfp_value"] = self._evaluate(kind, target, args, kwargs)
        except Exception:  # noqa: BLE001 - unknown values only matter if control flow needs them
            proxy.node.meta["hfp_value"] = _UNKNOWN
        return proxy

    def _evaluate(self, kind, target, args, kwargs):
        if kind == "placeholder":
            self._placeholders += 1
            return self.example[self._placeholders - 1]

        def value(a):
            node = a.node if isinstance(a, torch.fx.Proxy) else a
            if isinstance(node, torch.fx.Node):
                v = node.meta.get("hfp_value", _UNKNOWN)
                if v is _UNKNOWN:
                    raise LookupError(node.name)
                return v
            return a

        args = torch.fx.node.map_aggregate(args, value)
        kwargs = torch.fx.node.map_aggregate(kwargs, value)
        with torch.no_grad():
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return self.meta_root.get_submodule(target)(*args, **kwargs)
            if kind == "get_attr":
                return operator.attrgetter(target)(self.meta_root)
        return _UNKNOWN


def _shape_checks_in(root: torch.nn.Module, failed: str, rules) -> bool:
    """Whether the submodule that failed is one traced through (torch's transformer layers), whose
    fast-path checks (``src.dim() == 3``, ``x.is_nested``) branch on properties the example knows."""
    try:
        return rules.traces_through(root.get_submodule(failed))
    except AttributeError:
        return False


def input_names(example_inputs: Any) -> Optional[Tuple[str, ...]]:
    """The keyword names of a dict of example tensors (``{"input_ids": ids}``), else ``None``."""
    return tuple(example_inputs) if isinstance(example_inputs, dict) else None


def normalize_inputs(example_inputs: Any) -> Tuple[torch.Tensor, ...]:
    """Accept a tensor, a tuple/list of tensors or a dict of keyword tensors and return a tuple
    (a dict's values in its order: the captured graph takes them positionally)."""
    if isinstance(example_inputs, dict) and example_inputs:
        for k, x in example_inputs.items():
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"example_inputs[{k!r}] is a {type(x).__name__}; pass tensors only")
        return tuple(example_inputs.values())
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        for i, x in enumerate(example_inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"example_inputs[{i}] is a {type(x).__name__}; pass tensors only "
                    "(a tensor or a tuple of tensors matching the model's forward arguments)"
                )
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a non-empty tuple of tensors or a dict of keyword tensors, "
        f"got {type(example_inputs).__name__}"
    )


def _defaults_beyond(model: torch.nn.Module, example_inputs) -> Optional[Dict[str, Any]]:
    """``forward`` parameters the example inputs do not supply, bound to their defaults.

    Without this FX makes them placeholders, and ``if mask is not None:`` on a placeholder is
    always true, so the graph would take the branch a call with the default never takes.
    """
    if example_inputs is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = {p.name: p.default for p in positional[len(example_inputs):] if p.default is not p.empty}
    return extra or None


def _drop_none_guards(graph: torch.fx.Graph) -> None:
    """Remove the ``_assert_is_none`` guards FX adds for arguments bound to ``None``.

    They only check that callers pass nothing there; and compiling a GraphModule that calls
    this wrapped FX helper registers its dotted name for patching, which breaks every later
    ``symbolic_trace`` in the process (a ``KeyError`` in torch.fx).
    """
    guard = getattr(torch.fx._symbolic_trace, "_assert_is_none", None)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is guard and not node.users:
            graph.erase_node(node)


def trace(model: torch.nn.Module, example_inputs: Optional[Tuple[torch.Tensor, ...]] = None,
          rules: Optional[OpRegistry] = None, _stacklevel: int = 3) -> TracedModel:
    """Symbolically trace ``model``; untraceable submodules become opaque leaves (with a warning).

    Modules with an op handler in ``rules`` (default: hfp_fx's own) are kept as single nodes.

    The model is traced as a :func:`~hfp_fx.capture.copies.state_copy`: the returned GraphModule shares
    parameter and buffer tensors with ``model`` (callers that modify weights must copy it first;
    every public entry point does) but no module object or Python container.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):
        gm = torch.fx.GraphModule(model, copy.deepcopy(model.graph))
        gm.training = model.training
        return TracedModel(gm)
    opaque: Dict[str, str] = {}
    with_shapes = False  # switched on when the root's own forward needs the example's shapes
    defaults = _defaults_beyond(model, example_inputs)
    for _ in range(MAX_OPAQUE_RETRIES):
        # a fresh copy per attempt: forward-time writes (proxies in caches) land on the copy, and
        # a failed attempt's proxies must not be read back by the next one
        root = state_copy(model)
        tracer = _ShapeTracer(root, example_inputs, opaque, rules) if with_shapes else _RecordingTracer(opaque, rules)
        try:
            graph = tracer.trace(root, concrete_args=defaults)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported or retried
            failed = tracer.failed_in
            cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            if (not failed or failed in opaque or _shape_checks_in(root, failed, tracer.rules)) and example_inputs is not None \
                    and not with_shapes:
                log.info("plain tracing of %s failed (%s); retrying with the example's shapes",
                         type(model).__name__, cause)
                with_shapes, opaque = True, {}
                continue
            if not failed or failed in opaque:
                raise TraceError(
                    f"torch.fx cannot trace {type(model).__name__} (failing in its own forward): {cause}. "
                    "Make the data-dependent control flow static, wrap the failing function with "
                    "torch.fx.wrap, or prune a traceable submodule instead."
                ) from exc
            opaque[failed] = cause
            continue
        if opaque:
            warnings.warn(
                "hfp_fx: these submodules could not be traced and are kept whole (their channels are "
                "not pruned): " + "; ".join(f"{k} ({v})" for k, v in opaque.items()),
                stacklevel=_stacklevel,
            )
        _drop_none_guards(graph)
        if with_shapes:
            for node in graph.nodes:
                node.meta.pop("hfp_value", None)
            # torch.load re-traces a saved GraphModule with this class and no arguments
            graph._tracer_cls = _RecordingTracer
            warnings.warn(f"hfp_fx: {type(model).__name__} branches on tensor shapes in its forward; it was "
                          "traced with the example inputs' shapes, so the graph (and the pruned model) is "
                          "specialised to them", stacklevel=_stacklevel)
        name = type(model).__name__
        gm = lazy_graph_module(tracer.root, graph, class_name=name)
        gm.training = model.training  # the flag only: .train() would reach the user's submodules
        return TracedModel(gm, opaque, shape_specialized=with_shapes)
    raise TraceError(f"gave up after making {MAX_OPAQUE_RETRIES} submodules of {type(model).__name__} opaque")


def _positional_names(model: torch.nn.Module, names: Tuple[str, ...]) -> bool:
    """Whether keyword example tensors are the first positional parameters of ``forward``, in order."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return tuple(params[:len(names)]) == tuple(names)


def _exported(model: torch.nn.Module, example_inputs, names) -> TracedModel:
    gm = export_capture(model, example_inputs, names)
    return TracedModel(gm, shape_specialized=not gm.meta.get("dynamic_shapes"), capture="export")


def capture(model: torch.nn.Module, example_inputs: Tuple[torch.Tensor, ...], rules: Optional[OpRegistry] = None,
            how: str = "auto", names: Optional[Tuple[str, ...]] = None) -> TracedModel:
    """The one place that decides how a model is captured (the ``capture=`` keyword).

    ``"fx"``: :func:`trace` (symbolic tracing); ``"export"``: ``torch.export``
    (:func:`hfp_fx.capture.export_capture.export_capture`, an ATen graph); ``"auto"``: ``torch.export``
    for Hugging Face models, else symbolic tracing, then ``torch.export`` when tracing raises or
    leaves submodules opaque (the traced graph is kept if the export fails too).
    ``names``: the keyword names of a dict of example tensors.
    """
    if how not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {how!r}")
    if isinstance(model, torch.fx.GraphModule) or how == "fx":
        if names is not None and not isinstance(model, torch.fx.GraphModule) and not _positional_names(model, names):
            raise TypeError(f"symbolic tracing takes the example tensors positionally, and {list(names)} are not "
                            f"the first parameters of {type(model).__name__}.forward; pass a tuple or "
                            "capture='export'")
        return trace(model, example_inputs, rules, _stacklevel=4)
    if how == "export" or is_hugging_face(model) or (names is not None and not _positional_names(model, names)):
        return _exported(model, example_inputs, names)
    try:  # "auto" on a plain model: what symbolic tracing captures whole is kept as it is
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traced = trace(model, example_inputs, rules)
    except torch.fx.proxy.TraceError as exc:
        log.info("symbolic tracing of %s failed (%s); capturing with torch.export", type(model).__name__, exc)
        traced, caught, fx_error = None, [], exc
    if traced is None or traced.opaque:
        try:
            return _exported(model, example_inputs, names)
        except Exception as exc:  # noqa: BLE001 - keep what tracing managed
            if traced is None:
                raise TraceError(f"neither torch.fx nor torch.export can capture {type(model).__name__}. "
                                 f"torch.fx: {fx_error} torch.export: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return traced
