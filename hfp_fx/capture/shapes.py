"""Shapes and MACs of every node: ``node.meta["tensor_meta"]`` and ``node.meta["macs"]``.

``propagate_shapes`` interprets a GraphModule's graph, running ``meta`` copies of its modules
(:class:`hfp_fx.capture.copies.GraphTwin`), so it costs no FLOPs and never touches the user's weights,
batch-norm statistics or Python state.  Each call node's MACs are those of
``torch.utils.flop_counter`` (FLOPs / 2), except for ops whose handler says they do no MACs.
Common ops are answered by their handler's shape shortcut (:mod:`hfp_fx.capture.meta_shortcuts`)
and repeated calls by :mod:`hfp_fx.capture.meta_memo` instead of running PyTorch's meta kernels.

Example::

    >>> import torch, torchvision
    >>> from hfp_fx.capture.tracing import trace
    >>> traced = trace(torchvision.models.resnet18())
    >>> propagate_shapes(traced.graph_module, (torch.randn(1, 3, 64, 64),))
    >>> [n.meta["tensor_meta"].shape for n in traced.graph_module.graph.nodes if n.name == "fc"]
    [torch.Size([1, 1000])]
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional, Tuple

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils.flop_counter import FlopCounterMode

from hfp_fx.capture.copies import GraphTwin
from hfp_fx.capture.meta_memo import MetaMemo, call_key
from hfp_fx.capture.meta_shortcuts import meta_result, tensor_metadata
from hfp_fx.passes.registry import DEFAULT_RULES, OpRegistry

log = logging.getLogger(__name__)

__all__ = ["propagate_shapes", "ShapePropagationError", "FLOP_FORMULAS"]


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``softmax(q k^T) v`` (two batched matmuls), as ``torch.utils.flop_counter``
    counts its CUDA attention kernels; key/value heads may divide the query heads (GQA)."""
    *batch, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * s_q * s_k * d_q + 2 * n * s_q * s_k * d_v


#: formulas ``FlopCounterMode`` lacks: the CPU attention kernel ``scaled_dot_product_attention``
#: dispatches to on real tensors (on meta tensors it decomposes into counted matmuls), so that
#: a real forward counts what the meta pass and the cost model count
FLOP_FORMULAS = {op: _attention_flops for op in
                 [getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)] if op is not None}


class ShapePropagationError(RuntimeError):
    """Running the model on the example inputs failed at one node (named in the message)."""


class _ShapeAndFlopProp(torch.fx.Interpreter):
    """Records each node's output ``tensor_meta`` and its multiply-accumulates (``meta['macs']``).

    Like :class:`torch.fx.passes.shape_prop.ShapeProp`, but a failing node raises
    :class:`ShapePropagationError` naming the node and its op instead of printing a traceback.
    """

    def __init__(self, gm: torch.fx.GraphModule, twin: GraphTwin, *, memoize: bool = True,
                 rules: Optional[OpRegistry] = None, on_meta: bool = False, only: Optional[set] = None):
        # ``gm``'s modules are only read (a shortcut reads a conv's configuration); what runs is
        # the twin's copy of them
        super().__init__(gm, graph=gm.graph)
        self.twin = twin
        # torch.export graphs spell out the capture's device (``arange(..., device=cpu)``,
        # ``x.to(cpu)``): on the meta twin such literals name the meta device
        self.on_meta = on_meta
        self.rules = rules if rules is not None else DEFAULT_RULES
        self.extra_traceback = False  # our message already names the node; FX would append the graph
        self.memo = MetaMemo()
        self.memoize = memoize
        #: names of the nodes to run; any other call node with a recorded ``tensor_meta`` gives
        #: a meta tensor of that layout without running (the nodes a graph edit left as they were)
        self.only = only

    def run_node(self, n):
        if (self.only is not None and n.name not in self.only and n.op in ("call_module", "call_function", "call_method")
                and "tensor_meta" in n.meta):
            return _meta_like(n.meta["tensor_meta"])
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

    def call_module(self, target, args, kwargs):
        return self.twin.module(target)(*args, **kwargs)

    def get_attr(self, target, args, kwargs):
        return self.twin.attr(target)

    def _call(self, n: torch.fx.Node, module: Optional[torch.nn.Module]) -> Tuple[Any, int]:
        """Output and MACs of a call node: from a shape rule, from an equal earlier call, or run."""
        counted = self.rules.counts_macs(n, module)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if self.on_meta:
            args, kwargs = torch.fx.node.map_aggregate((args, kwargs), _to_meta_device)
        found = meta_result(n, module, args, kwargs, self.rules)
        if found is not None:
            return found[0], found[1] if counted else 0
        # the key reads the layouts of the module's tensors: those of the meta copy that would run
        runs = self.twin.module(n.target) if module is not None else n.target
        key = call_key(n.op, runs, args, kwargs) if self.memoize else None
        key = (counted, key) if key is not None else None
        reused = self.memo.get(key)
        if reused is not None:
            return reused
        if self.on_meta and isinstance(n.target, torch._ops.HigherOrderOperator):
            args = tuple(_MetaGraph(v) if isinstance(v, torch.fx.GraphModule) else v for v in args)
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) if counted \
                else contextlib.nullcontext() as counter:
            result = getattr(self, n.op)(n.target, args, kwargs)
        macs = counter.get_total_flops() // 2 if counted else 0
        self.memo.put(key, result, macs)
        return result, macs


def _meta_like(value: Any) -> Any:
    """A meta tensor of each recorded layout (``TensorMetadata`` is a named tuple: not recursed into)."""
    if isinstance(value, TensorMetadata):
        return torch.empty_strided(value.shape, value.stride, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_meta_like(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta_like(v) for k, v in value.items()}
    return value


def _to_meta_device(value: Any) -> Any:
    return torch.device("meta") if isinstance(value, torch.device) else value


class _MetaGraph(torch.fx.Interpreter):
    """The body of a higher-order op (``torch.export`` wraps a model's ``with torch.no_grad():``
    block in ``wrap_with_set_grad_enabled``), run on meta tensors: its device literals name the
    meta device, as the outer graph's do."""

    def __call__(self, *args):
        return self.run(*args)

    def run_node(self, n):
        with self._set_current_node(n):
            args, kwargs = torch.fx.node.map_aggregate(self.fetch_args_kwargs_from_env(n), _to_meta_device)
            return getattr(self, n.op)(n.target, args, kwargs)


def _op_name(n: torch.fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Tuple[torch.Tensor, ...],
                     rules: Optional[OpRegistry] = None, only: Optional[set] = None) -> None:
    """Fill ``node.meta['tensor_meta']`` (and ``node.meta['macs']``) for every node.

    ``rules`` (default: hfp_fx's own) says which ops do no MACs and gives the shape shortcuts.
    ``only``: the names of the nodes to run after a graph edit (the others keep their recorded
    shapes and MACs, and stand in for their outputs on the meta run).

    Runs the graph on a meta twin of ``gm``'s modules first (no compute, no state change); ops
    without meta kernels fall back to a real run on a full copy.  ``gm``'s own modules are never
    executed: they are the user's.
    """
    meta_inputs = [torch.empty_like(x, device="meta") for x in example_inputs]
    try:
        # the twin's parameters require no gradients: FlopCounterMode's module tracker would
        # otherwise fail under no_grad when a parameter is a module's input (copies.without_grad).
        # A node that fails inside ``torch.export``'s ``wrap_with_set_grad_enabled`` (a ``with
        # torch.no_grad():`` block of the model) leaves grad mode as the block set it: restore it
        with torch.set_grad_enabled(torch.is_grad_enabled()):
            _ShapeAndFlopProp(gm, GraphTwin(gm, "meta"), rules=rules, on_meta=True, only=only).run(*meta_inputs)
    except Exception as exc:  # noqa: BLE001 - fall back to a real run
        log.debug("meta shape propagation failed (%s); using a real forward pass", exc)
        try:
            with torch.no_grad():
                _ShapeAndFlopProp(gm, GraphTwin(gm, None), rules=rules).run(
                    *[x.detach() for x in example_inputs])
        except ShapePropagationError as exc2:
            raise ShapePropagationError(
                f"running {gm.__class__.__name__} on the example inputs failed at {exc2}. "
                "Check that example_inputs match the model's forward signature and expected shapes."
            ) from exc2.__cause__
