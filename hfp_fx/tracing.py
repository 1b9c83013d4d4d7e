"""Step 1 of the flow: turn a user model into a shape-annotated ``torch.fx.GraphModule``.

``trace`` runs ``torch.fx`` symbolic tracing.  Submodules whose ``forward`` cannot be traced
(Python control flow on tensor values, unsupported builtins, ...) are retried as *opaque*
leaves: the call stays one ``call_module`` node, and the channel analysis later treats its
inputs and outputs as fixed.  ``propagate_shapes`` records every node's output shape in
``node.meta["tensor_meta"]`` by running the graph on ``meta`` tensors, so it costs no FLOPs
and never touches the user's weights or batch-norm statistics.

Example::

    >>> import torch, torchvision
    >>> from hfp_fx.tracing import trace, propagate_shapes
    >>> traced = trace(torchvision.models.resnet18())
    >>> propagate_shapes(traced.graph_module, (torch.randn(1, 3, 64, 64),))
    >>> traced.opaque
    {}
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from hfp_fx.meta_memo import MetaMemo, call_key
from hfp_fx.meta_shortcuts import meta_result, tensor_metadata
from hfp_fx.passes.registry import counts_no_macs, is_rule_leaf

log = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedModel", "trace", "propagate_shapes", "normalize_inputs"]

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


class _RecordingTracer(torch.fx.Tracer):
    """A tracer that remembers which submodule was being traced when an error was raised."""

    def __init__(self, opaque_names: Sequence[str] = ()):
        super().__init__()
        # Buffers become ``get_attr`` nodes as parameters do, so that an in-place write to one in
        # a traced ``forward`` (``self.steps.add_(1)``) is recorded in the graph instead of being
        # run on the user's buffer while tracing and then lost.
        self.proxy_buffer_attributes = True
        self.opaque_names = set(opaque_names)
        self._stack: list = []
        self.failed_in: Optional[str] = None
        self._names_of: Tuple[Optional[torch.nn.Module], Dict[int, str]] = (None, {})

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
        if module_qualified_name in self.opaque_names or is_rule_leaf(m):
            return True
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


class _ValueProxy(torch.fx.Proxy):
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
                 opaque_names: Sequence[str] = ()):
        super().__init__(opaque_names)
        self.meta_root = shape_only(meta_copy(root))
        self.example = [torch.empty_like(x, device="meta") for x in example_inputs]
        self._placeholders = 0

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _ValueProxy(node, self)

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


def normalize_inputs(example_inputs: Any) -> Tuple[torch.Tensor, ...]:
    """Accept a tensor or a tuple/list of tensors and return a tuple."""
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
        f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
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


def trace(model: torch.nn.Module, example_inputs: Optional[Tuple[torch.Tensor, ...]] = None) -> TracedModel:
    """Symbolically trace ``model``; untraceable submodules become opaque leaves (with a warning).

    The returned GraphModule shares submodules with ``model``; callers that modify weights must
    copy it first (every public entry point does).
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
        tracer = _ShapeTracer(model, example_inputs, opaque) if with_shapes else _RecordingTracer(opaque)
        try:
            graph = tracer.trace(model, concrete_args=defaults)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported or retried
            failed = tracer.failed_in
            cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
            if (not failed or failed in opaque) and example_inputs is not None and not with_shapes:
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
                stacklevel=3,
            )
        _drop_none_guards(graph)
        if with_shapes:
            for node in graph.nodes:
                node.meta.pop("hfp_value", None)
            warnings.warn(f"hfp_fx: {type(model).__name__} branches on tensor shapes in its forward; it was "
                          "traced with the example inputs' shapes, so the graph (and the pruned model) is "
                          "specialised to them", stacklevel=3)
        name = type(model).__name__
        gm = torch.fx.GraphModule(tracer.root, graph, class_name=name)
        gm.training = model.training  # the flag only: .train() would reach the user's submodules
        return TracedModel(gm, opaque, shape_specialized=with_shapes)
    raise TraceError(f"gave up after making {MAX_OPAQUE_RETRIES} submodules of {type(model).__name__} opaque")


class ShapePropagationError(RuntimeError):
    """Running the model on the example inputs failed at one node (named in the message)."""


class _ShapeAndFlopProp(torch.fx.Interpreter):
    """Records each node's output ``tensor_meta`` and its multiply-accumulates (``meta['macs']``).

    Like :class:`torch.fx.passes.shape_prop.ShapeProp`, but a failing node raises
    :class:`ShapePropagationError` naming the node and its op instead of printing a traceback.
    """

    def __init__(self, *args, memoize: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_traceback = False  # our message already names the node; FX would append the graph
        self.memo = MetaMemo()
        self.memoize = memoize

    def run_node(self, n):
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        try:
            if n.op in ("call_module", "call_function", "call_method"):
                result, n.meta["macs"] = self._call(n, module)
            else:
                result, n.meta["macs"] = super().run_node(n), 0
        except Exception as exc:  # noqa: BLE001 - re-raised with the node that failed
            what = f"module {n.target} ({type(module).__name__})" if module is not None else f"{n.op} {_op_name(n)}"
            cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
            raise ShapePropagationError(f"node `{n.name}`, {what}: {cause}") from exc
        found = False

        def tensor_meta(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return tensor_metadata(obj)
            return obj

        meta = torch.fx.node.map_aggregate(result, tensor_meta)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def _call(self, n: torch.fx.Node, module: Optional[torch.nn.Module]) -> Tuple[Any, int]:
        """Output and MACs of a call node: from a shape rule, from an equal earlier call, or run."""
        counted = not counts_no_macs(n, module)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        found = meta_result(n, module, args, kwargs)
        if found is not None:
            return found[0], found[1] if counted else 0
        key = call_key(n.op, module if module is not None else n.target, args, kwargs) if self.memoize else None
        key = (counted, key) if key is not None else None
        reused = self.memo.get(key)
        if reused is not None:
            return reused
        with FlopCounterMode(display=False) if counted else contextlib.nullcontext() as counter:
            result = getattr(self, n.op)(n.target, args, kwargs)
        macs = counter.get_total_flops() // 2 if counted else 0
        self.memo.put(key, result, macs)
        return result, macs


def _op_name(n: torch.fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def shape_only(module: torch.nn.Module) -> torch.nn.Module:
    """Put the normalisation layers of a *copy* in eval mode before a shape/MAC pass.

    Their output shapes do not depend on the mode, but in training mode batch norm refuses a
    batch with one value per channel (batch 1 at 1x1 resolution), which example inputs often are.
    """
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    return module


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers are ``meta`` tensors.

    Running it costs no FLOPs and no memory, and whatever its ``forward`` does to ``self``
    (caches, counters, lazily built tensors) lands on the copy, never on the user's model.
    """
    memo: Dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        _tensor_copy(t, memo, "meta")
    return copy.deepcopy(module, memo)


def _tensor_copy(t: torch.Tensor, memo: Dict[int, Any], device: Optional[str]) -> torch.Tensor:
    """``t`` as an empty tensor on ``device`` (``None``: a detached clone), a ``Parameter`` again if
    it was one; made once per tensor and kept in ``memo`` (a ``copy.deepcopy`` memo)."""
    if id(t) not in memo:
        c = t.detach().clone() if device is None else torch.empty_like(t, device=device)
        memo[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(
            t, torch.nn.Parameter) else c
    return memo[id(t)]


def _graph_twin(gm: torch.fx.GraphModule, device: Optional[str]) -> torch.nn.Module:
    """A module holding copies of exactly what ``gm``'s graph calls and reads, for an Interpreter.

    Much cheaper than ``deepcopy(gm)`` (no recompile, intermediate containers are empty modules).
    Modules with a coupling rule are standard torch layers: a shallow copy with its own
    parameter/buffer dicts isolates them.  Any other module (opaque user code that may write to
    ``self``) is deep-copied.  ``device="meta"`` turns every tensor into a meta tensor; with
    ``device=None`` every tensor is cloned, since the graph may write to one it reads with
    ``get_attr`` (``self.w.add_(1)`` in a root ``forward``).
    """
    memo: Dict[int, Any] = {}

    def tensor(t):
        return _tensor_copy(t, memo, device) if isinstance(t, torch.Tensor) else t

    def module_copy(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if is_rule_leaf(m):
            c = copy.copy(m)
            c.__dict__ = dict(m.__dict__)  # own attribute dict: setattr on the copy stays there
            c._parameters = {k: tensor(v) if v is not None else None for k, v in m._parameters.items()}
            c._buffers = {k: tensor(v) if v is not None else None for k, v in m._buffers.items()}
            c._modules = {k: module_copy(v) if v is not None else None for k, v in m._modules.items()}
        else:
            for t in list(m.parameters()) + list(m.buffers()):
                tensor(t)
            c = copy.deepcopy(m, memo)
        memo[id(m)] = c
        return c

    twin = torch.nn.Module()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        *path, leaf = node.target.split(".")
        owner, twin_owner = gm, twin
        for part in path:
            owner = getattr(owner, part)
            if part not in twin_owner._modules:
                twin_owner.add_module(part, torch.nn.Module())
            twin_owner = twin_owner._modules[part]
        value = getattr(owner, leaf)
        if isinstance(value, torch.nn.Module):
            twin_owner._modules[leaf] = module_copy(value)
        elif isinstance(value, torch.nn.Parameter):
            twin_owner._parameters[leaf] = tensor(value)
        else:
            object.__setattr__(twin_owner, leaf, tensor(value))
    return shape_only(twin)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Tuple[torch.Tensor, ...]) -> None:
    """Fill ``node.meta['tensor_meta']`` (and ``node.meta['macs']``) for every node.

    Runs the graph on a meta twin of ``gm``'s modules first (no compute, no state change); ops
    without meta kernels fall back to a real run on a full copy.  ``gm``'s own modules are never
    executed: they are the user's.
    """
    meta_inputs = [torch.empty_like(x, device="meta") for x in example_inputs]
    try:
        # grad mode on: free on meta tensors, and FlopCounterMode's module tracker fails under
        # no_grad when a parameter is a module's input (see api.count)
        _ShapeAndFlopProp(_graph_twin(gm, "meta"), graph=gm.graph).run(*meta_inputs)
    except Exception as exc:  # noqa: BLE001 - fall back to a real run
        log.debug("meta shape propagation failed (%s); using a real forward pass", exc)
        try:
            with torch.no_grad():
                _ShapeAndFlopProp(_graph_twin(gm, None), graph=gm.graph).run(*example_inputs)
        except ShapePropagationError as exc2:
            raise ShapePropagationError(
                f"running {gm.__class__.__name__} on the example inputs failed at {exc2}. "
                "Check that example_inputs match the model's forward signature and expected shapes."
            ) from exc2.__cause__
