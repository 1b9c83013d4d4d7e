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
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx

from hfp_fx.capture.copies import state_copy

__all__ = ["CAPTURES", "export_capture", "is_hugging_face", "example_kwargs"]

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


def export_capture(model: torch.nn.Module, inputs: Tuple[torch.Tensor, ...],
                   names: Optional[Tuple[str, ...]] = None) -> torch.fx.GraphModule:
    """``torch.export.export`` a :func:`~hfp_fx.capture.copies.state_copy` of ``model`` (non-strict) and
    return the unlifted graph as a plain ``GraphModule`` taking ``inputs`` positionally.

    ``names``: keyword names of ``inputs`` (the example was a dict), else they are positional.
    """
    root = state_copy(model)
    kwargs = dict(example_kwargs(model))
    if names is not None:
        kwargs.update(zip(names, inputs))
        args: Tuple[torch.Tensor, ...] = ()
    else:
        args = tuple(inputs)
    ep = torch.export.export(root, args, kwargs=kwargs, strict=False)
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
    return gm
