"""hfp_fx: Holistic Filter Pruning as a torch.fx graph-rewriting compiler pass.

Data flow: model -> :mod:`~hfp_fx.capture.tracing` (on a :mod:`~hfp_fx.capture.copies` copy) -> shapes
(:mod:`~hfp_fx.capture.shapes`) -> channel elements (:mod:`~hfp_fx.spaces`, op handlers in
:mod:`hfp_fx.passes.registry`) -> prune groups (:mod:`~hfp_fx.analysis.graph`) -> cost model
(:mod:`~hfp_fx.plan.cost`) and gates (:mod:`~hfp_fx.train.gates`) -> plan (:mod:`~hfp_fx.plan.projection`)
-> mask / shrink passes (:mod:`hfp_fx.passes`) -> GraphModule.
"""
from hfp_fx.passes import rules_layers as _rules_layers  # noqa: F401  (registers op rules)
from hfp_fx.passes import rules_pointwise as _rules_pointwise  # noqa: F401
from hfp_fx.passes import rules_views as _rules_views  # noqa: F401
from hfp_fx.passes import rules_matmul as _rules_matmul  # noqa: F401
from hfp_fx.passes import rules_attention as _rules_attention  # noqa: F401
from hfp_fx.passes import rules_swin as _rules_swin  # noqa: F401
from hfp_fx.api import count, dependency_graph, mask, shrink
from hfp_fx.plan.cost import CostModel, Counts
from hfp_fx.train.hfp import complexity, complexity_loss, finalize, gate_parameters, prepare, prune, recalibrate_latency
from hfp_fx.train.distill import distillation_loss
from hfp_fx.train.distributed import fully_shard
from hfp_fx.plan.projection import InfeasibleTargetError, Plan
from hfp_fx.plan.report import GroupReport, PruneReport
from hfp_fx.interop.io import load, save
from hfp_fx.interop.hf import to_pretrained
from hfp_fx.interop.checkpoint import prune_checkpoint
from hfp_fx.passes.registry import OpHandler, OpRegistry, default_rules
from hfp_fx.passes.shrink import ShrinkError
from hfp_fx.progress import set_progress
from hfp_fx.plan.target import Target
from hfp_fx.plan.latency import LatencyOptions, LatencyReport
from hfp_fx.analysis.viz import plot_widths, render_graph
from hfp_fx.train.log import ComplexityLog
from hfp_fx.analysis.graph import DependencyGraph, Member, PruneGroup
from hfp_fx.capture.shapes import ShapePropagationError
from hfp_fx.capture.tracing import TraceError

__version__ = "0.1.0"

__all__ = [
    "dependency_graph", "count", "mask", "shrink",
    "prepare", "complexity_loss", "complexity", "finalize", "prune", "gate_parameters", "distillation_loss",
    "recalibrate_latency", "fully_shard",
    "save", "load", "to_pretrained", "prune_checkpoint", "set_progress", "Target", "LatencyOptions", "LatencyReport", "Plan",
    "PruneReport", "GroupReport",
    "render_graph", "plot_widths", "ComplexityLog",
    "DependencyGraph", "PruneGroup", "Member", "Counts", "CostModel",
    "InfeasibleTargetError", "TraceError", "ShapePropagationError", "ShrinkError",
    "OpHandler", "OpRegistry", "default_rules",
]
