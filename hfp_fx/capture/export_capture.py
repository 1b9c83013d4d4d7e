"""Capture a model with ``torch.export`` instead of ``torch.fx`` symbolic tracing.

``torch.export.export(model, args, kwargs, strict=False)`` runs the model's Python with fake
tensors, so data-dependent Python on shapes, ``**kwargs`` forwards, decorators and caches of
Hugging Face models are no obstacle.  Its ``ep.module()`` is an ATen-level ``GraphModule`` whose
parameters are ``get_attr`` nodes; the same op handlers as traced graphs analyse it (their registrations name the ATen overloads too).

The graph module hfp_fx keeps (:class:`~hfp_fx.capture.tracing.TracedModel`) is a plain
``torch.fx.GraphModule`` that takes the example's tensors positionally (a dict of keyword
tensors in its order) and returns the output's tensors: the single tensor when the model
returns one (``logits`` of a Hugging Face model called with ``use_cache=False``), else a tuple
of the pytree leaves of its output.

Example::

    >>> import torch, hfp_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> x = torch.randn(2, 8)
    >>> dg = hfp_fx.dependency_graph(model, x, capture="export")
    >>> [g.channels for g in dg.prunable_groups]
    [16]
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx

from hfp_fx.capture.copies import state_copy

__all__ = ["CAPTURES", "export_capture", "is_hugging_face", "example_kwargs"]

log = logging.getLogger("hfp_fx")

#: the values of the ``capture=`` keyword
CAPTURES = ("fx", "export", "auto")


def is_hugging_face(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    for cls in type(model).__mro__:
        if cls.__name__ == "PreTrainedModel" and (cls.__module__ or "").startswith("transformers."):
            return True
    return False


def example_kwargs(model: torch.nn.Module) -> Dict[str, Any]:
    """Non-tensor keyword arguments the capture passes: ``use_cache=False`` for Hugging Face models
    (no key/value cache objects in the graph; the output is the logits alone)."""
    if not is_hugging_face(model):
        return {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return {"use_cache": False} if "use_cache" in params or accepts_kwargs else {}


def _every_dim_auto(root: torch.nn.Module, args, kwargs) -> Dict[str, Any]:
    """``dynamic_shapes`` marking every dim of every example tensor ``Dim.AUTO``: dynamic where the
    model allows it (batch, sequence length, image size), the example's size where it needs one
    (channels, a flatten into a fixed linear layer)."""
    auto = torch.export.Dim.AUTO
    bound = inspect.signature(root.forward).bind(*args, **kwargs)

    def spec(value):
        return {d: auto for d in range(value.dim())} if isinstance(value, torch.Tensor) and value.dim() else None

    return {name: torch.utils._pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _batch_of_two(inputs: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
    """The example with a batch of 1 repeated to 2: export takes a size of 1 for a constant (and
    specialises the graph to it), so a batch-1 example would give a batch-1 graph."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim()]
    if not tensors or any(x.shape[0] != 1 for x in tensors):
        return tuple(inputs)
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)


def export_capture(model: torch.nn.Module, inputs: Tuple[torch.Tensor, ...],
                   names: Optional[Tuple[str, ...]] = None, dynamic: Optional[bool] = None) -> torch.fx.GraphModule:
    """``torch.export.export`` a :func:`~hfp_fx.capture.copies.state_copy` of ``model`` (non-strict) and
    return the unlifted graph as a plain ``GraphModule`` taking ``inputs`` positionally.

    ``names``: keyword names of ``inputs`` (the example was a dict), else they are positional.
    ``dynamic`` (default: for Hugging Face models): every dim export can leave symbolic stays so
    (:func:`_every_dim_auto`), with a batch of 1 captured as 2, so the graph, and the models pruned
    or prepared from it, run at any batch size and sequence length the model accepts; a model
    whose export fails that way is captured with the example's shapes, as with ``dynamic=False``.
    Other models keep the example's shapes: a reshape that merges a symbolic batch with attention
    heads (``nn.MultiheadAttention``'s ``(T, B * heads, d)``) would fix the heads, which the
    literal sizes of a specialised graph let the analysis prune.
    """
    original = tuple(inputs)
    if dynamic is None:
        dynamic = is_hugging_face(model)
    root = state_copy(model)
    inputs = _batch_of_two(inputs) if dynamic else tuple(inputs)
    kwargs = dict(example_kwargs(model))
    if names is not None:
        kwargs.update(zip(names, inputs))
        args: Tuple[torch.Tensor, ...] = ()
    else:
        args = tuple(inputs)
    try:
        ep = torch.export.export(root, args, kwargs=kwargs, strict=False,
                                 dynamic_shapes=_every_dim_auto(root, args, kwargs) if dynamic else None)
    except Exception as exc:  # noqa: BLE001 - a model export cannot make generic keeps the example's shapes
        if not dynamic:
            raise
        log.info("torch.export with dynamic sizes failed for %s (%s: %s); capturing the example's shapes",
                 type(model).__name__, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return export_capture(model, original, names, dynamic=False)
    unlifted = ep.module()
    graph = unlifted.graph
    # the input guards check the example's exact call; hfp_fx calls the graph positionally
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    # the graph's inputs in export's order (kwargs follow the signature), then as the example gave them
    spec = getattr(unlifted, "_in_spec", None)
    if spec is not None:
        flat = torch.fx._pytree.tree_flatten_spec((args, kwargs), spec)
    else:  # pragma: no cover - older unlifted modules
        flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(flat):
        raise RuntimeError(f"torch.export made {len(placeholders)} inputs of {len(flat)} example values")
    tensors = []
    for node, value in zip(placeholders, flat):
        if any(value is x for x in inputs):
            tensors.append((node, value))
        elif node.users:
            raise RuntimeError(f"the exported graph reads the non-tensor input `{node.target}`")
        else:  # a constant (use_cache=False): specialised away
            graph.erase_node(node)
    ordered = []
    for x in inputs:
        k = next(i for i, (node, value) in enumerate(tensors) if value is x)
        ordered.append(tensors.pop(k)[0])
    for node in reversed(ordered):
        first = next(iter(graph.nodes))
        if first is not node:
            first.prepend(node)
    output = next(iter(graph.find_nodes(op="output")))
    leaves = output.args[0]
    if isinstance(leaves, (tuple, list)) and len(leaves) == 1:
        output.args = (leaves[0],)
    elif isinstance(leaves, list):
        output.args = (tuple(leaves),)
    graph._codegen = torch.fx.graph.CodeGen()
    # dtype/device assertions export records before casts: no channels, and they pin the device
    assert_meta = getattr(torch.ops.aten, "_assert_tensor_metadata", None)
    for node in list(graph.nodes):
        if node.op == "call_function" and assert_meta is not None and node.target is assert_meta.default \
                and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    # torch.load re-traces a saved GraphModule with its tracer class and no arguments
    graph._tracer_cls = None
    graph._tracer_extras = {}
    gm = torch.fx.GraphModule(unlifted, graph, class_name=type(model).__name__)
    gm.training = model.training  # the flag only
    gm.meta["dynamic_shapes"] = bool(dynamic)
    return gm
