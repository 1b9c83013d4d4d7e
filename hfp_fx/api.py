"""The public entry points of the core compiler: analyse, count, mask and shrink a model.

Every function takes the user's ``nn.Module`` and example inputs, and never modifies the model:
the graph module built from it is copied before any weight is touched.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    >>> dg = hfp_fx.dependency_graph(model, x)
    >>> keep = {g.id: range(0, g.channels, 2) for g in dg.prunable_groups}
    >>> small = hfp_fx.shrink(model, x, keep)
    >>> torch.allclose(small.eval()(x), hfp_fx.mask(model, x, keep).eval()(x), atol=1e-5)
    True
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from hfp_fx.plan.cost import Counts
from hfp_fx.capture.export_capture import CAPTURES, example_kwargs, is_hugging_face
from hfp_fx.analysis.graph import DependencyGraph
from hfp_fx.passes.channel_analysis import ChannelAnalysis
from hfp_fx.passes.decompose import decompose
from hfp_fx.passes.depth import mask_units
from hfp_fx.passes.mask import apply_masks
from hfp_fx.passes.registry import OpRegistry
from hfp_fx.passes.shrink import shrink_model
from hfp_fx.progress import stages
from hfp_fx.capture.copies import clone_copy, meta_copy, shape_only, without_grad
from hfp_fx.capture.shapes import FLOP_FORMULAS, propagate_shapes
from hfp_fx.capture.tracing import capture as capture_model, input_names, normalize_inputs

__all__ = ["dependency_graph", "count", "mask", "shrink"]

Keep = Mapping[str, Iterable[int]]


def _unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dependency_graph(model: torch.nn.Module, example_inputs: Any, exclude: Sequence[str] = (),
                     rules: Optional[OpRegistry] = None, capture: str = "auto") -> DependencyGraph:
    """Trace ``model`` and group its channels into prune groups.

    ``exclude`` names submodules (qualified names, e.g. ``"layer4"``) whose channels must never
    be pruned.  ``rules`` is the set of op handlers to use (default: hfp_fx's own,
    ``hfp_fx.passes.registry.DEFAULT_RULES``); pass ``default_rules()`` extended with your own
    handlers to teach hfp_fx an op for this call only.

    ``capture``: ``"auto"`` (the default: ``torch.export`` for Hugging Face models, else symbolic
    tracing, with export as the fallback when tracing fails, so a traceable model's graph is the
    one ``"fx"`` gives), ``"fx"`` (symbolic tracing only) or ``"export"`` (``torch.export``, an
    ATen graph); see :func:`hfp_fx.capture.tracing.capture`.
    ``example_inputs``: a tensor, a tuple of tensors or a dict of keyword tensors
    (``{"input_ids": ids}``); the captured graph takes them positionally.
    """
    if isinstance(model, DependencyGraph):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"hfp_fx expects a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    names = {n for n, _ in model.named_modules()}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"exclude names modules that {type(model).__name__} does not have: {unknown}. "
                         "Use qualified names as listed by model.named_modules().")
    start = time.perf_counter()
    with stages("dependency_graph", ["trace", "shapes", "channels", "groups"]) as stage:
        with stage("trace"):
            traced = capture_model(model, inputs, rules, capture, input_names(example_inputs))
        with stage("shapes"):
            propagate_shapes(traced.graph_module, inputs, rules)
            decompose(traced.graph_module, inputs, rules)
        with stage("channels"):
            facts = ChannelAnalysis(traced.graph_module, root=model, exclude=exclude, opaque=traced.opaque,
                                    rules=rules, example_inputs=inputs).run()
        with stage("groups"):
            dg = DependencyGraph(facts, _unique_params(model), seconds=time.perf_counter() - start)
    dg.shape_specialized = traced.shape_specialized  # traced with the example's concrete shapes
    dg.capture, dg.input_names = traced.capture, input_names(example_inputs)
    return dg


def _is_aten_graph(model: torch.nn.Module) -> bool:
    """A GraphModule of ATen ops (captured by ``torch.export``, or pruned from one)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes if n.op == "call_function")


def count(model: torch.nn.Module, example_inputs: Any, capture: str = "auto") -> Counts:
    """Parameters (``sum(p.numel())``, shared tensors once) and MACs (``torch.utils.flop_counter`` / 2).

    MACs are counted on ``meta`` tensors, so this costs no compute and touches no state.  The
    count runs the model itself, except with ``capture="export"`` (and ``"auto"`` on a Hugging
    Face model) and on a GraphModule of ATen ops: then the captured graph is counted node by
    node on meta tensors, as the cost model is.  A dict of keyword tensors is passed by name,
    with ``use_cache=False`` for Hugging Face models.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"hfp_fx.count expects a torch.nn.Module, got {type(model).__name__}")
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    inputs = normalize_inputs(example_inputs)
    names = input_names(example_inputs)
    extra = example_kwargs(model)

    def call(twin, xs):
        if names is not None:
            return twin(**dict(zip(names, xs)), **extra)
        return twin(*xs, **extra)

    params = _unique_params(model)
    if capture == "export" or (capture == "auto" and is_hugging_face(model)) or _is_aten_graph(model):
        # count the captured ATen graph node by node on meta tensors (what the cost model
        # matches): running such a model itself may need a real forward (Hugging Face masks
        # call ``.item()``), where torch's counter misses the CPU attention kernels
        traced = capture_model(model, inputs, None, "fx" if _is_aten_graph(model) else "export", names)
        propagate_shapes(traced.graph_module, inputs)
        return Counts(params, int(sum(n.meta.get("macs", 0) for n in traced.graph_module.graph.nodes)))
    try:  # a meta copy: no compute, and the user's model is never run
        # no parameter of the copy requires gradients (see copies.without_grad): the count runs
        # the same whether or not the caller turned grad mode off
        twin = without_grad(shape_only(meta_copy(model)))
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            call(twin, [torch.empty_like(x, device="meta") for x in inputs])
    except Exception:  # noqa: BLE001 - ops without meta kernels: count a real run of a copy
        twin = without_grad(shape_only(clone_copy(model)))
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            call(twin, [x.detach() for x in inputs])
    return Counts(params, counter.get_total_flops() // 2)


def mask(model: Union[torch.nn.Module, DependencyGraph], example_inputs: Any = None, keep: Optional[Keep] = None,
         rules: Optional[OpRegistry] = None, capture: str = "auto") -> torch.fx.GraphModule:
    """Same shapes as ``model``; the channels not in ``keep`` contribute exactly zero.

    ``keep`` maps a prune group id to the sorted channel indices to keep; groups not named are
    kept whole.  A depth unit's id (``dg.depth_units``) maps to ``False`` to remove its residual
    branch: its output is multiplied by 0.  This is the reference ``shrink`` must equal.
    """
    dg = model if isinstance(model, DependencyGraph) else dependency_graph(
        model, example_inputs, rules=rules, capture=capture)
    widths, removed = dg.split_keep(keep)
    masked = apply_masks(dg.facts, dg.alive(widths))
    if removed:
        mask_units(masked, removed)
    return masked.train(dg.gm.training)


def shrink(model: Union[torch.nn.Module, DependencyGraph], example_inputs: Any = None, keep: Optional[Keep] = None,
           rules: Optional[OpRegistry] = None, capture: str = "auto") -> torch.fx.GraphModule:
    """A physically smaller GraphModule computing what ``mask(model, example_inputs, keep)`` computes
    (removed depth units' branches deleted)."""
    dg = model if isinstance(model, DependencyGraph) else dependency_graph(
        model, example_inputs, rules=rules, capture=capture)
    widths, removed = dg.split_keep(keep)
    return shrink_model(dg.facts, dg.alive(widths), removed=removed).train(dg.gm.training)
