"""The report a pruned model carries in ``model.meta["hfp"]`` (``prune``, ``finalize``, ``load``).

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> small = hfp_fx.prune(torchvision.models.resnet18(), x, "50%")
    >>> report = small.meta["hfp"]
    >>> report.achieved.macs <= report.target.macs, report.groups["g1"].name, report.inputs
    (True, 'layer1.0.conv1', [((1, 3, 64, 64), 'float32')])
    >>> again = hfp_fx.prune(torchvision.models.resnet18(), x, "50%", max_prune=report.max_prune()).meta["hfp"]
    >>> all(again.groups[gid].kept >= g.kept for gid, g in report.groups.items())
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from hfp_fx.plan.cost import Counts
from hfp_fx.plan.latency import LatencyReport
from hfp_fx.plan.target import ResolvedTarget

__all__ = ["PruneReport", "GroupReport"]


@dataclass(frozen=True)
class GroupReport:
    """One prunable group of the pruned model."""

    name: str  #: the first module owning one of its channels (``PruneGroup.name``)
    dense: int  #: channels before pruning
    kept: int  #: channels kept


@dataclass
class PruneReport:
    """What was pruned, to which budget, and what ``hfp_fx.save`` needs to rebuild it."""

    dense: Counts  #: params/MACs of the traced dense model
    achieved: Counts  #: params/MACs of the pruned model (cost model, exact)
    target: ResolvedTarget  #: the absolute budget (``None`` where not targeted)
    groups: Dict[str, GroupReport]  #: every prunable group, in graph order
    keep: Dict[str, List[int]]  #: the keep dict (pruned groups only)
    scale_sites: List[str] = field(default_factory=list)  #: gate sites that got an ``x * buffer`` node
    exclude: List[str] = field(default_factory=list)  #: modules excluded from pruning
    inputs: List[Tuple[Tuple[int, ...], str]] = field(default_factory=list)  #: example inputs' (shape, dtype)
    model_spec: Optional[str] = None  #: how to rebuild the dense model (``"torchvision:resnet18"``), if known
    capture: str = "fx"  #: how the dense model was captured (``"fx"`` or ``"export"``)
    input_names: Optional[List[str]] = None  #: keyword names of the example tensors, if given as a dict
    latency: Optional[LatencyReport] = None  #: predicted and measured latency, for a latency target
    #: depth units removed (``prune(..., depth=True)``): id -> the branch's module path; ``keep``
    #: maps their ids to ``False``
    removed_units: Dict[str, str] = field(default_factory=dict)
    #: kept depth units whose branch output is multiplied by a constant (HFP depth gates that
    #: could not be folded into a layer): id -> factor
    depth_scales: Dict[str, float] = field(default_factory=dict)

    def max_prune(self) -> Dict[str, float]:
        """These widths as floors for another cut of the same architecture: per group id, the
        fraction removed here, as ``prune(..., max_prune=...)`` takes it (each group then keeps at
        least the channels it keeps here; ``0.0`` where it stays whole).  The recipe that uses
        it: HFP chooses the widths, one-shot importance cuts the dense weights to them
        (docs/api.md, "HFP as the allocation search")."""
        return {gid: (g.dense - g.kept) / g.dense for gid, g in self.groups.items()}

    @classmethod
    def of(cls, dg, plan, *, scale_sites: Sequence[str] = (), exclude: Sequence[str] = (),
           model_spec: Optional[str] = None, latency: Optional[LatencyReport] = None,
           removed_units: Optional[Dict[str, str]] = None,
           depth_scales: Optional[Dict[str, float]] = None, dense_counts: Optional[Counts] = None) -> "PruneReport":
        """The report of ``plan`` (a :class:`hfp_fx.Plan`) applied to the analysed model ``dg``.
        ``dense_counts``: the dense model's counts where the plan's are not (a plan made with the cost
        model without removed depth units counts the model without them as dense)."""
        groups = {}
        for g in dg.prunable_groups:
            dense, kept = plan.kept_per_group[g.id]
            groups[g.id] = GroupReport(g.name, int(dense), int(kept))
        inputs = [(tuple(x.shape), str(x.dtype).replace("torch.", "")) for x in dg.example_inputs]
        keep = {k: list(v) for k, v in plan.keep.items()}
        keep.update({uid: False for uid in removed_units or {}})
        return cls(dense_counts if dense_counts is not None else plan.dense, plan.counts, plan.target, groups, keep,
                   list(scale_sites), list(exclude), inputs, model_spec, getattr(dg, "capture", "fx"),
                   None if getattr(dg, "input_names", None) is None else list(dg.input_names), latency,
                   dict(removed_units or {}), dict(depth_scales or {}))
