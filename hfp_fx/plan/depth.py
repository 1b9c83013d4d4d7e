"""Width and depth under one budget: which residual branches to remove, and how wide the rest.

:func:`depth_saliency` scores each removable depth unit (``dg.depth_units``) by how much its
branch changes the residual stream, ``||f(x)|| / ||x||`` at its add, averaged over batches (the
"block influence" of ShortGPT, per branch).  :func:`plan_width_and_depth` then tries removing
the ``k`` least salient units per unit of cost, for every ``k`` that leaves the widths something
to cut, projects the widths of what remains onto the same exact budget (the cost model without
those branches), and keeps the candidate whose masked model does best on the batches: the
lowest next-token loss for a causal LM (or a given loss), else the output closest to the dense
model's.  The budget is exact for every candidate, and the split between width and depth is
measured, not assumed (``k = 0`` is the width-only plan).

    >>> import torch, torchvision, hfp_fx
    >>> x = torch.randn(2, 3, 64, 64)
    >>> small = hfp_fx.prune(torchvision.models.resnet18().eval(), x, {"macs": 0.5}, depth=True)
    >>> report = small.meta["hfp"]
    >>> report.achieved.macs <= report.target.macs, isinstance(report.removed_units, dict)
    (True, True)
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx

from hfp_fx.analysis.depth import DepthUnit
from hfp_fx.passes.depth import mask_units
from hfp_fx.passes.mask import apply_masks
from hfp_fx.plan.calibration import _batches, _device_of, default_loss
from hfp_fx.plan.cost import CostModel
from hfp_fx.plan.projection import Plan
from hfp_fx.plan.target import ResolvedTarget

__all__ = ["depth_saliency", "plan_width_and_depth", "DepthChoice"]


class _BranchNorms(torch.fx.Interpreter):
    """Runs the graph and records ``||output|| / ||skip||`` at every unit's add."""

    def __init__(self, gm: torch.fx.GraphModule, units: Sequence[DepthUnit]):
        super().__init__(gm)
        self.watch = {u.add: u for u in units}
        self.ratios: Dict[str, List[float]] = {u.id: [] for u in units}

    def run_node(self, n):
        unit = self.watch.get(n.name)
        if unit is not None:
            skip, out = self.env[self._node(unit.skip)], self.env[self._node(unit.output)]
            ratio = float(out.detach().float().norm()) / max(float(skip.detach().float().norm()), 1e-12)
            self.ratios[unit.id].append(ratio)
        return super().run_node(n)

    def _node(self, name: str):
        return self._by_name[name]

    def run(self, *args, **kwargs):
        self._by_name = {n.name: n for n in self.graph.nodes}
        return super().run(*args, **kwargs)


def depth_saliency(dg, units: Sequence[DepthUnit], batches: Iterable[Any]) -> Dict[str, float]:
    """Per unit id: the mean over ``batches`` of ``||f(x)|| / ||x||`` at the unit's add."""
    recorder = _BranchNorms(copy.deepcopy(dg.gm).eval(), units)
    with torch.no_grad():
        for inputs in _batches(batches, _device_of(dg.gm)):
            recorder.run(*inputs)
    return {uid: sum(r) / max(len(r), 1) for uid, r in recorder.ratios.items()}


def _outputs(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


def _distortion(model: torch.nn.Module, dense: List[List[torch.Tensor]], batches: List[tuple]) -> float:
    """``sum ||y - y_dense||^2 / sum ||y_dense||^2`` over every output of every batch."""
    num = den = 0.0
    with torch.no_grad():
        for inputs, ref in zip(batches, dense):
            for y, r in zip(_outputs(model(*inputs)), ref):
                if y.is_floating_point():
                    num += float((y.double() - r.double()).pow(2).sum())
                    den += float(r.double().pow(2).sum())
    return num / max(den, 1e-300)


class DepthChoice:
    """The candidate kept: the units removed, the width plan of the rest, its cost model, and
    every candidate's distortion (``tried``: ``(removed unit ids, distortion)``)."""

    def __init__(self, removed: List[DepthUnit], plan: Plan, cost: CostModel, tried: List[Tuple[List[str], float]]):
        self.removed, self.plan, self.cost, self.tried = removed, plan, cost, tried


def _whole(cost: CostModel, dg, target: ResolvedTarget) -> Plan:
    """The plan that prunes no channel (depth only)."""
    counts = cost.counts()
    return Plan({}, counts, counts, target, {g.id: (g.channels, g.channels) for g in dg.prunable_groups})


def _causal_lm_loss(dense_outputs: List[List[torch.Tensor]], batches: List[tuple]) -> Optional[Callable]:
    """The next-token cross-entropy when the model is a causal LM (integer ids in, (B, T, V)
    logits out), which ranks candidates by what the model is for; else ``None``."""
    if not dense_outputs or not dense_outputs[0] or not batches[0]:
        return None
    logits, ids = dense_outputs[0][0], batches[0][0]
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2 and logits.dim() == 3 \
            and logits.shape[:2] == ids.shape:
        return default_loss
    return None


def _loss(model: torch.nn.Module, loss: Callable, batches: List[tuple]) -> float:
    with torch.no_grad():
        return sum(float(loss(model(*inputs), inputs)) for inputs in batches) / max(len(batches), 1)


def plan_width_and_depth(dg, target: ResolvedTarget, project_widths: Callable[[CostModel], Plan],
                         batches: Iterable[Any], max_units: Optional[int] = None,
                         blocks: Optional[Callable[[DepthUnit], str]] = None, widths: bool = True,
                         loss: Optional[Callable] = None, latency=None) -> DepthChoice:
    """Try ``k = 0, 1, ...`` removed units (least salient per unit of cost first) with widths
    projected onto ``target`` by ``project_widths(cost_model_without_them)``; keep the one whose
    masked model does best on ``batches``: the lowest ``loss(output, inputs)`` (default for a
    causal LM: next-token cross-entropy), else the output closest to the dense model's.
    ``latency``: the measured latency model (:class:`~hfp_fx.plan.latency.LatencyTerms`) for a
    latency target; a removed branch takes its timed nodes' terms with it.

    ``blocks(unit)``: units with the same key go together (a decoder layer's attention and MLP,
    so that a Hugging Face config can hold the result).  ``widths=False`` (depth only): the
    fewest units that meet the budget, no channel pruned (the budget is met, not hit exactly).
    """
    batches = list(_batches(batches, _device_of(dg.gm)))  # (run several times: once per candidate)
    units = [u for u in dg.depth_units if u.removable]
    metric = "latency" if target.latency is not None else "macs" if target.macs is not None else "params"

    def size(u: DepthUnit) -> float:  # what removing the unit saves, in the target's quantity
        return getattr(u, metric) if metric != "latency" else u.macs

    def left(cost: CostModel) -> float:
        if metric == "latency":
            return float(cost.latency(torch.ones(cost.num_units, dtype=torch.float64)))
        return getattr(cost.counts(), metric)
    saliency = depth_saliency(dg, units, batches)
    together: Dict[str, List[DepthUnit]] = {}
    for u in units:
        together.setdefault(blocks(u) if blocks is not None else u.id, []).append(u)
    if blocks is not None:  # a block goes only whole: every one of its units removable
        together = {k: v for k, v in together.items() if len(v) == sum(blocks(u) == k for u in dg.depth_units)}
    score = {k: sum(saliency[u.id] for u in v) / max(sum(size(u) for u in v), 1)
             for k, v in together.items()}
    order_blocks = sorted(together, key=score.__getitem__)
    if blocks is not None:
        order_blocks = order_blocks[:-1]  # a decoder keeps at least one layer
    if max_units is not None:
        order_blocks = order_blocks[:max_units]
    if not widths:
        removed: List[DepthUnit] = []
        for key in order_blocks:
            removed += together[key]
            cost = CostModel(dg, latency=latency, removed=removed)
            if left(cost) <= getattr(target, metric):
                return DepthChoice(removed, _whole(cost, dg, target), cost, [([u.id for u in removed], float("nan"))])
        raise ValueError(f"removing every removable depth unit does not meet the {metric} target; "
                         "prune widths too (depth=True)")
    order = [together[key] for key in order_blocks]
    dense_model = copy.deepcopy(dg.gm).eval()
    with torch.no_grad():
        dense = [[t.detach() for t in _outputs(dense_model(*inputs))] for inputs in batches]
    loss = loss if loss is not None else _causal_lm_loss(dense, batches)
    best, tried = None, []
    for k in range(len(order) + 1):
        removed = [u for block in order[:k] for u in block]
        cost = CostModel(dg, latency=latency, removed=removed)
        if k and left(cost) <= getattr(target, metric):
            break  # depth alone meets the budget: no width left to make it exact
        plan = project_widths(cost)
        masked = apply_masks(dg.facts, dg.alive(plan.keep))
        if removed:
            mask_units(masked, removed)
        error = _loss(masked.eval(), loss, batches) if loss is not None else _distortion(masked.eval(), dense, batches)
        tried.append(([u.id for u in removed], error))
        if best is None or error < best[0]:
            best = (error, removed, plan, cost)
    _, removed, plan, cost = best
    return DepthChoice(list(removed), plan, cost, tried)
