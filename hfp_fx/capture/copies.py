"""Copies of user models that the pipeline may run, trace or write to.

No public entry point writes to the user's model, its tensors or its Python state.  Tracing
and shape propagation run a ``forward``, and a ``forward`` may write to ``self`` (caches such
as timm LeViT's ``attention_bias_cache``, counters, lazily built tensors); with torch.fx those
writes would store ``Proxy`` objects in the user's model.  Three copies, from cheap to full:

* :func:`state_copy` -- same parameters and buffers (shared, not copied), but every module and
  every mutable container in a module's ``__dict__`` is the copy's own: what the tracer traces;
* :func:`meta_copy` -- a deep copy whose parameters and buffers are ``meta`` tensors: what
  ``hfp_fx.count`` and the shape tracer run;
* :class:`GraphTwin` -- only what a GraphModule's graph reads, on ``meta`` or cloned, copied
  when first read: what shape propagation runs.

Example::

    >>> import torch
    >>> class Cached(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin, self.cache = torch.nn.Linear(2, 2), {}
    ...     def forward(self, x):
    ...         self.cache["last"] = x
    ...         return self.lin(x)
    >>> model = Cached()
    >>> twin = state_copy(model)
    >>> _ = twin(torch.ones(1, 2))
    >>> model.cache, twin.lin.weight is model.lin.weight
    ({}, True)
"""
from __future__ import annotations

import collections
import copy
import operator
import types
from typing import Any, Callable, Dict, Optional

import torch
import torch.fx

__all__ = ["state_copy", "clone_copy", "meta_copy", "GraphTwin", "shape_only", "without_grad", "lazy_graph_module",
           "editable_copy"]

#: values a module attribute may hold that nothing can write into: shared by the copy
_IMMUTABLE = frozenset([int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device,
                        torch.memory_format, torch.layout, torch.Size, type, types.FunctionType,
                        types.BuiltinFunctionType, range, slice, type(Ellipsis)])
#: containers a forward may write into: copied recursively
_CONTAINERS = frozenset([dict, collections.OrderedDict, list, set, tuple])


class _Copier:
    """Copies a module tree: every module and mutable container anew, tensors through ``tensor``.

    Much cheaper than ``copy.deepcopy`` (which walks every attribute through its generic
    protocol), and it copies tensors ``deepcopy`` refuses (non-leaf tensors cached by a
    ``forward`` that ran with autograd on).  Objects of other types are deep-copied with the same
    memo, or shared if they cannot be (locks, handles: nothing a forward writes into).
    """

    def __init__(self, tensor: Callable[[torch.Tensor], torch.Tensor]):
        self.copies: Dict[int, Any] = {}  # id(original) -> copy; also the deepcopy memo
        self._tensor = tensor
        self._seeded = False

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.copies:
            c = self._tensor(t)
            # (``isinstance(t, Parameter)`` runs a Python __instancecheck__: exact types first)
            param = type(t) is torch.nn.Parameter or (type(t) is not torch.Tensor and isinstance(t, torch.nn.Parameter))
            if param and c is not t:
                c = torch.nn.Parameter(c, requires_grad=t.requires_grad)
            self.copies[id(t)] = c
        return self.copies[id(t)]

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in self.copies:
            return self.copies[id(m)]
        if isinstance(m, torch.jit.ScriptModule):
            return m  # compiled code: no Python state to protect, and nothing to trace into
        c = object.__new__(type(m))
        self.copies[id(m)] = c
        state = m.__dict__.copy()
        # torch.nn's own layers keep no Python state that their forward writes to: their
        # containers (hook dicts) need no copy, only their tensors and submodules
        standard = type(m).__module__.startswith("torch.nn.")
        for k, v in state.items():
            kind = type(v)
            if k == "_parameters" or k == "_buffers":
                state[k] = {name: None if t is None else self.tensor(t) for name, t in v.items()}
            elif k == "_modules":
                state[k] = {name: None if sub is None else self.module(sub) for name, sub in v.items()}
            elif kind not in _IMMUTABLE and not standard:
                state[k] = self.value(v, m)
        c.__dict__.update(state)
        return c

    def value(self, value: Any, owner: torch.nn.Module) -> Any:
        kind = type(value)
        if kind in _IMMUTABLE:
            return value
        if kind in _CONTAINERS:
            if kind is tuple and all(type(v) in _IMMUTABLE for v in value):
                return value  # (3, 3) kernel sizes: nothing inside can change
            if id(value) in self.copies:
                return self.copies[id(value)]
            if not value:
                return kind()
            if kind is dict or kind is collections.OrderedDict:
                new = self.copies[id(value)] = kind()
                for k, v in value.items():
                    new[k] = self.value(v, owner)
                return new
            new = self.copies[id(value)] = kind(self.value(v, owner) for v in value)
            return new
        if isinstance(value, torch.nn.Module):
            return self.module(value)
        if isinstance(value, torch.Tensor):  # (a slow check for other objects: done late)
            return self.tensor(value)
        if not self._seeded:  # an odd object may hold the module's tensors: map them alike
            self._seeded = True
            for t in list(owner.parameters()) + list(owner.buffers()):
                self.tensor(t)
        try:
            return copy.deepcopy(value, self.copies)
        except Exception:  # noqa: BLE001 - locks, handles, ...: nothing a forward writes into
            return value


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


def state_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its own Python state and the same parameter and buffer tensors.

    Every submodule is a new object with its own ``__dict__``; dicts, lists, sets and tuples in
    it are copied recursively (tensors, modules and immutable values inside are kept or mapped
    to their copies).  What the tracer traces.
    """
    return _Copier(lambda t: t).module(module)


def clone_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with its own Python state and detached clones of every tensor it holds."""
    return _Copier(_clone).module(module)


def meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters, buffers and other tensors are ``meta``.

    Running it costs no FLOPs and no memory, and whatever its ``forward`` does to ``self``
    (caches, counters, lazily built tensors) lands on the copy, never on the user's model.
    """
    return _Copier(_meta).module(module)


def shape_only(module: torch.nn.Module) -> torch.nn.Module:
    """Put the normalisation layers of a *copy* in eval mode before a shape/MAC pass.

    Their output shapes do not depend on the mode, but in training mode batch norm refuses a
    batch with one value per channel (batch 1 at 1x1 resolution), which example inputs often are.
    """
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase):
            m.eval()
    return module


def without_grad(module: torch.nn.Module) -> torch.nn.Module:
    """Make the parameters of a *copy* not require gradients before a shape/MAC pass.

    A shape/MAC pass computes no gradients; and ``FlopCounterMode``'s module tracker registers
    backward hooks on the module inputs that require them, which fails ("Expected gradient
    function to be set") when grad mode is off and a parameter's view is a submodule's input
    (a latent query ``self.latent.expand(...)`` fed to a Linear).  With no parameter requiring
    gradients the pass runs the same under ``torch.no_grad()`` as with autograd on.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class GraphTwin:
    """Copies of what a GraphModule's graph calls and reads, each made when first asked for.

    What an Interpreter over ``gm``'s graph runs instead of ``gm``'s own modules and tensors.
    ``device="meta"`` turns every tensor into a meta tensor; with ``device=None`` every tensor is
    cloned, since the graph may write to one it reads with ``get_attr`` (``self.w.add_(1)`` in a
    root ``forward``).  Copied modules are ready for a shape pass (:func:`shape_only`,
    :func:`without_grad`).  On demand, because shape propagation answers most nodes from their
    configuration (a conv's output shape) and runs only the rest: copying every module first
    was a third of the shape pass of a deep CNN.  One copy per tensor, shared by every module
    and attribute that holds it (tied weights stay tied).

        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        >>> twin = GraphTwin(gm, "meta")
        >>> layer = twin.module("0")
        >>> layer.weight.device, layer.weight.requires_grad, layer is twin.module("0")
        (device(type='meta'), False, True)
        >>> gm.get_submodule("0").weight.is_meta  # the graph module's own weights stay as they were
        False
    """

    def __init__(self, gm: torch.fx.GraphModule, device: Optional[str]):
        self.gm = gm
        self._copier = _Copier(_meta if device == "meta" else _clone)
        self._copies: Dict[str, Any] = {}

    def module(self, target: str) -> torch.nn.Module:
        """The copy of submodule ``target`` (a ``call_module`` node's target)."""
        if target not in self._copies:
            self._copies[target] = without_grad(shape_only(self._copier.module(self.gm.get_submodule(target))))
        return self._copies[target]

    def attr(self, target: str) -> Any:
        """The copy of attribute ``target`` (a ``get_attr`` node's target): a module, tensor or value."""
        if target not in self._copies:
            value = operator.attrgetter(target)(self.gm)
            if isinstance(value, torch.nn.Module):
                return self.module(target)
            if isinstance(value, torch.Tensor):
                value = self._copier.tensor(value)
                if value.requires_grad and value.is_leaf:
                    value.requires_grad_(False)
            self._copies[target] = value
        return self._copies[target]


_LAZY = getattr(getattr(torch.fx, "_lazy_graph_module", None), "_LazyGraphModule", None)


def lazy_graph_module(root: torch.nn.Module, graph: torch.fx.Graph, class_name: str) -> torch.fx.GraphModule:
    """A GraphModule that generates its Python code on first call, not now.

    The captured graph of an analysis is read, copied and rewritten far more often than it is
    run, and code generation is a third of the graph build of a small CNN (about 10 ms of
    MobileNetV2's 35).  Passes rewrite an :func:`editable_copy` of it, a plain GraphModule.
    """
    if _LAZY is None:  # pragma: no cover - a torch without lazy graph modules
        return torch.fx.GraphModule(root, graph, class_name=class_name)
    return _LAZY(root, graph, class_name=class_name)


def editable_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` as a plain GraphModule, for a pass to rewrite and hand to the user.

    A copy of a lazy graph module (:func:`lazy_graph_module`) is lazy too, which
    ``torch.jit.script`` and ``torch.compile`` do not take; the copy is rebuilt as a plain
    GraphModule over the copied modules and tensors (everything its graph reads), with the
    original's ``meta`` and train/eval flag.
    """
    dup = copy.deepcopy(gm)
    if _LAZY is None or not isinstance(dup, _LAZY):
        return dup
    plain = torch.fx.GraphModule(dup, dup.graph)  # named GraphModule, as deepcopy names a copy
    plain.meta = dup.meta
    plain.training = dup.training
    return plain
