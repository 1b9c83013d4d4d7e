"""Holistic Filter Pruning: prepare -> train with ``complexity_loss`` -> finalize.

The method (our specification, consistent with the HFP paper's abstract; see docs/concepts.md):

* ``gates="width"`` (default): every prunable group gets one trainable width ``w`` (the kept
  fraction, init 1) and a fixed ranking of its channels (filter magnitude at ``prepare``); the
  channels ranked below ``round(w * n)`` act as exact zeros in the forward pass, so the network
  always trains the architecture it will be pruned to.  The gradient reaches ``w`` through the
  group's boundary channel (straight-through), so ``d task / d w`` measures what one more
  channel of this group is worth and the cost push what it costs: at equilibrium the two
  balance in every group, the holistic allocation.
* ``gates="channel"``: one gate vector ``g`` (init 1) per group applied where its channels are
  consumed (:mod:`hfp_fx.passes.insert_gates`); gates with ``g <= tau`` act as exact zeros
  (straight-through); the per-channel keep value is straight-through: forward ``1[g > tau]``,
  gradient that of ``g / mean(g of kept channels in the group)`` on kept channels.  When batch
  norm follows the consumer a group's common gate scale is free for the task loss, so the
  cost push sinks a group's gates together (docs/benchmarks.md, Fashion-MNIST);
* the cost model (:mod:`hfp_fx.plan.cost`) turns keep values into params and MACs;
  ``complexity_loss = sum_X lambda_X * max(0, log(X / X_target)) * U`` over the targeted X,
  with ``U`` the number of prunable channels so that ``lambda`` is the mean push per gate.
  Its gradient moves each gate by its channel's marginal global cost: the holistic allocation;
* ``finalize`` projects onto the budget exactly (:mod:`hfp_fx.plan.projection`), folds the kept gate
  values into the consuming weights and shrinks the model.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx

from hfp_fx.api import dependency_graph
from hfp_fx.plan.cost import CostModel
from hfp_fx.analysis.index import PrunableIndex
from hfp_fx.train.gates import ChannelGates, GateKind, WidthGates
from hfp_fx.analysis.graph import DependencyGraph
from hfp_fx.capture.copies import editable_copy
from hfp_fx.plan.latency import LatencyOptions, LatencyReport, build_latency_model, measure_latency
from hfp_fx.plan.hf_layouts import ConfigFit, DecoderLayout, config_fit, layout_of
from hfp_fx.passes.insert_gates import insert_gates
from hfp_fx.passes.registry import OpRegistry
from hfp_fx.passes.shrink import shrink_model
from hfp_fx.passes.depth import gate_units, scale_units
from hfp_fx.plan.depth import plan_width_and_depth
from hfp_fx.progress import stages
from hfp_fx.plan.calibration import DATA_IMPORTANCE_KINDS, CalibrationLoss, data_saliency
from hfp_fx.plan.projection import (InfeasibleTargetError, MaxPrune, Plan, check_feasible, min_kept_of, project,
                               uniform_block_classes)
from hfp_fx.plan.report import PruneReport
from hfp_fx.plan.saliency import IMPORTANCE_KINDS, magnitude_saliency, mean_one
from hfp_fx.plan.target import ResolvedTarget, Target

__all__ = ["HFPState", "prepare", "complexity_loss", "complexity", "finalize", "prune", "gate_parameters",
           "recalibrate_latency"]

GATE_KINDS = ("width", "channel")
BUDGET_MODES = ("penalty", "project")


class HFPState(torch.nn.Module):
    """What both gate kinds share in a prepared model (``prepared.hfp``): the gates (a
    :class:`~hfp_fx.train.gates.GateKind`, ``hfp.gates``), the prunable index, the cost model, the
    target, the loss and its schedule (adaptive weights, warm-up, target ramp)."""

    def __init__(self, cost: CostModel, index: PrunableIndex, gates: GateKind, target: ResolvedTarget, *,
                 min_channels: int = 1, round_to: int = 1, lambda_init: float = 1e-3, dual_rate: float = 0.02,
                 warmup_steps: int = 0, ramp_steps: int = 0, budget: str = "penalty", depth_units: Sequence = ()):
        super().__init__()
        #: HFP over depth (``prepare(depth=True)``): one gate per removable residual branch, from 1;
        #: the branch's output is scaled by it, and the cost model's terms of the branch too
        self.depth_units = list(depth_units)
        self.register_parameter("depth_gates", torch.nn.Parameter(torch.ones(len(self.depth_units)))
                                if self.depth_units else None)
        if int(ramp_steps) < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        if budget not in BUDGET_MODES:
            raise ValueError(f"budget must be one of {BUDGET_MODES}, got {budget!r}")
        if budget == "project" and not isinstance(gates, WidthGates):
            raise ValueError("budget='project' moves per-group widths: use it with gates='width'")
        self.budget = budget
        self.cost = cost
        self.gates = gates
        self.index = index
        self.register_buffer("columns", cost.columns(index.units), persistent=False)
        # one entry per quantity a target can bound: params, MACs, latency (in ns: integer too)
        self.register_buffer("lambdas", torch.full((3,), float(lambda_init), dtype=torch.float64))
        # targets as a tensor (0 = not targeted) so the loss never syncs with the host; integer,
        # so that casting the prepared model (.half()) cannot round them
        latency_ns = None if target.latency is None else max(1, round(target.latency * 1e6))
        self.register_buffer("targets", torch.tensor([0 if t is None else int(t) for t in (target.params, target.macs,
                                                                                            latency_ns)],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # measured / predicted latency of the current widths (recalibrate_latency): the loss and
        # finalize's projection plan for the latency this machine measures, not the model's
        self.register_buffer("latency_scale", torch.ones((), dtype=torch.float64))
        self.dense = cost.counts()
        self.dense_latency_ms = float(cost.latency(torch.ones(cost.num_units, dtype=torch.float64)))
        self.register_buffer("dense_counts", torch.tensor([self.dense.params, self.dense.macs,
                                                           round(self.dense_latency_ms * 1e6)], dtype=torch.long),
                             persistent=False)
        self.sites = torch.nn.Module()
        self.target = target
        self.min_channels, self.round_to = int(min_channels), int(round_to)
        self.lambda_init, self.dual_rate, self.warmup_steps = float(lambda_init), float(dual_rate), int(warmup_steps)
        self.ramp_steps = int(ramp_steps)
        self._steps_since_rerank = 0  # training steps since the width gates last re-ranked

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts saved before the gate kinds were submodules hold their tensors flat
        # (``hfp.width``, ``hfp.rank``, ``hfp.gate``); they now live in ``hfp.gates``
        for name in ("width", "rank", "gate"):
            old, new = prefix + name, prefix + "gates." + name
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        # saved before latency targets: two loss weights (params, MACs)
        state_dict.setdefault(prefix + "latency_scale", self.latency_scale.clone())  # saved before it existed
        lambdas = state_dict.get(prefix + "lambdas")
        if lambdas is not None and lambdas.numel() == 2:
            state_dict[prefix + "lambdas"] = torch.cat([lambdas, self.lambdas[2:].to(lambdas)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- bookkeeping shared by both gate kinds ----------------------------------------------
    @property
    def trainable(self) -> torch.nn.Parameter:
        """The gate parameter: per-group widths (``gates="width"``) or per-channel gates."""
        return self.gates.trainable

    @property
    def group_ids(self) -> Tuple[str, ...]:
        return self.index.group_ids

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Group ``i`` holds positions ``offsets[i]:offsets[i + 1]`` of the per-channel vectors."""
        return self.index.offsets

    @property
    def num_channels(self) -> int:
        return self.index.num_channels

    def vector_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Entry of each element id in the vector ``forward`` returns (0 = fixed, constant 1)."""
        return self.index.position_of_elements(ids)

    def kept_channels(self) -> torch.Tensor:
        """Per prunable channel: kept (True) or acting as zero (False) in the forward pass now."""
        return self.gates.kept_channels()

    def kept_per_group(self) -> Dict[str, int]:
        """Channels the forward pass keeps now, per group id."""
        group_index = self.gates.group_index
        counts = torch.zeros(self.index.num_groups, dtype=torch.long, device=group_index.device)
        counts.index_add_(0, group_index, self.kept_channels().long())
        return dict(zip(self.group_ids, counts.tolist()))

    def forward(self) -> torch.Tensor:
        """The gate vector the gated sites read: entry 0 is the constant 1 of fixed channels,
        then one entry per prunable channel, then one per depth unit (``depth_position``)."""
        if self.budget == "project" and self.training and torch.is_grad_enabled():
            self.project_widths()
        gates = self.gates.effective_gates()
        if self.gates.rerank_every and self.training and gates.requires_grad:
            gates.register_hook(self.gates.record_taylor)  # the task loss's gradient only
        parts = [self.trainable.new_ones(1), gates]
        if self.depth_units:
            parts.append(self.depth_values().to(gates.dtype))
        return torch.cat(parts)

    def depth_values(self) -> torch.Tensor:
        """Per depth unit: the factor its branch's output is scaled by, the gate clipped to [0, 1]
        with the gradient passed straight through (so a gate above 1 still feels both losses);
        ``finalize`` removes the branches below 0.5."""
        g = self.depth_gates
        return g + (g.clamp(0, 1) - g).detach()

    def depth_position(self, i: int) -> int:
        """Entry of depth unit ``i`` in the gate vector."""
        return 1 + self.num_channels + i

    @torch.no_grad()
    def project_widths(self) -> None:
        """``budget="project"``: move the widths onto the budget, if they are over it.

        The exact multiplier instead of a learned one: with ``d_g`` the marginal cost of group
        ``g``'s width (its channel count times the cost-model derivative of one of its channels,
        summed over the targeted quantities, each relative to its target), the widths become
        ``clip(w - nu * d)`` with the smallest ``nu >= 0`` (bisection) for which every targeted
        hard count is at most its current target (the ramp's value).  This is the Euclidean
        projection of the widths onto the linearised budget, so training is projected gradient
        descent: the task gradient moves the widths, the projection keeps the architecture the
        forward pass trains at the budget from the first step, and the allocation settles where
        every group's task gradient is ``nu`` times its marginal cost.  Called at the start of
        every training forward pass.
        """
        gates: WidthGates = self.gates
        targets = self.current_targets()
        targeted = self.targets > 0
        width = gates.width.detach().double().clamp(0, 1)

        def over(w: torch.Tensor) -> bool:
            return bool(((self.counts_of(self.keep_of(gates.kept_for(w))) > targets) & targeted).any())

        if not over(width):
            return
        with torch.enable_grad():
            kept = gates.kept_for(width).double().requires_grad_(True)
            values = self.counts_of(self.keep_of(kept))
            (grad,) = torch.autograd.grad((values / targets.clamp(min=1.0))[targeted].sum(), kept)
        per_group = torch.zeros(self.index.num_groups, dtype=torch.float64, device=grad.device)
        per_group.index_add_(0, gates.group_index, grad)  # = size * mean marginal cost of the group
        direction = per_group.clamp(min=0)
        if not bool((direction > 0).any()):
            return
        moving = direction > 0
        # the nu at which every group that moves is at width 0 (groups without cost never move)
        lo, hi = 0.0, float((width[moving] / direction[moving]).max())
        if over(width - hi * direction):
            lo = hi  # even every width at its floor is over: as far as it goes
        for _ in range(40):
            if hi - lo <= 1e-9 * max(hi, 1e-30):
                break
            mid = (lo + hi) / 2
            if over(width - mid * direction):
                lo = mid
            else:
                hi = mid
        gates.width.copy_((width - hi * direction).clamp(0, 1).to(gates.width.dtype))

    # -- the complexity loss ------------------------------------------------------------------
    def keep_values(self, soft: bool = True) -> torch.Tensor:
        """Keep value per cost-model column: exact hard counts forward, surrogate gradient."""
        return self.keep_of(self.gates.keep_surrogate() if soft else self.kept_channels())

    def keep_of(self, kept: torch.Tensor) -> torch.Tensor:
        """Keep value per cost-model column, from one per prunable channel (fixed channels: 1)."""
        keep = torch.ones(self.cost.num_units, dtype=torch.float64, device=kept.device)
        return keep.index_put((self.columns,), kept.double())

    def counts_of(self, keep: torch.Tensor) -> torch.Tensor:
        """``[params, macs, latency in ns]`` of a keep vector; the latency is the model's prediction
        times ``latency_scale`` (0 without a latency model)."""
        depth = self.depth_values().double() if self.depth_units else None
        params, macs = self.cost.evaluate(keep, depth)
        return torch.stack([params, macs, self.cost.latency(keep) * 1e6 * self.latency_scale])

    def counts(self, soft: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(params, macs, latency in ns)``; latency is 0 without a latency model."""
        return tuple(self.counts_of(self.keep_values(soft)).unbind())

    def current_lambdas(self) -> torch.Tensor:
        if self.warmup_steps <= 0:
            return self.lambdas.clone()  # a snapshot: the dual step below updates the buffer in place
        return self.lambdas * ((self.steps + 1).double() / self.warmup_steps).clamp(max=1.0)

    def current_targets(self) -> torch.Tensor:
        """The targets the loss compares with now (float64; 0 = not targeted).

        With ``ramp_steps`` they fall from the dense counts to the final targets along the cubic
        ``1 - (1 - t / ramp_steps) ** 3`` (fast at first, gentle near the end): the widths are
        then decided while the network learns instead of all at once from its initial weights.
        """
        final = self.targets.double()
        if self.ramp_steps <= 0:
            return final
        progress = (self.steps.double() / self.ramp_steps).clamp(max=1.0)
        reached = 1.0 - (1.0 - progress) ** 3
        dense = self.dense_counts.double()
        return torch.where(self.targets > 0, dense - (dense - final) * reached, final)

    def loss(self) -> torch.Tensor:
        """``sum_X lambda_X * max(0, log(X / X_target)) * U`` over the targeted params/MACs/latency."""
        # Everything stays on the gates' device: no .item()/float() host syncs per step.
        targeted = self.targets > 0
        ratios = self.counts_of(self.keep_values(soft=True)) / self.current_targets().clamp(min=1.0)
        # psi(r) = max(0, log r), written so r -> 0 cannot produce 0 * inf gradients
        psi = torch.log(torch.clamp(torch.where(targeted, ratios, torch.ones_like(ratios)), min=1.0))
        total = (self.current_lambdas() * psi).sum()
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # dual ascent: raise lambda while over target, decay it under
                self.steps += 1
                over = ratios.detach() > 1
                moved = torch.where(over, self.lambdas * (1 + self.dual_rate),
                                    (self.lambdas * (1 - self.dual_rate)).clamp(min=self.lambda_init))
                self.lambdas.copy_(torch.where(targeted, moved, self.lambdas))
                every = self.gates.rerank_every
                if every:  # counted on the host: no device sync between re-rankings
                    self._steps_since_rerank += 1
                    if self._steps_since_rerank >= every:
                        self._steps_since_rerank = 0
                        self.gates.rerank()
        return (total * max(self.num_channels, 1)).to(self.trainable.dtype)


Importance = Union[str, Callable[[DependencyGraph], Mapping[str, torch.Tensor]]]


def saliency_of(dg: DependencyGraph, importance: Importance, calibration: Optional[Iterable[Any]] = None,
                calibration_loss: Optional[CalibrationLoss] = None) -> Dict[str, torch.Tensor]:
    """Per prunable group id, its channels' scores (mean 1 per group) by ``importance``: weight
    magnitude (:mod:`hfp_fx.plan.saliency`: ``"l1"``, ``"l2"``, ``"uniform"``), measured on the
    ``calibration`` batches (:mod:`hfp_fx.plan.calibration`: ``"activation"``, ``"taylor"``), or
    your own: a function of the dependency graph returning, per prunable group id, one
    non-negative score per channel (a group it leaves out is ranked uniformly)."""
    if callable(importance):
        return _custom_saliency(dg, importance(dg))
    if importance in DATA_IMPORTANCE_KINDS:
        _refuse_meta(dg.gm, f"importance={importance!r} runs the model on calibration data")
        return data_saliency(dg, calibration, importance, calibration_loss)
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {IMPORTANCE_KINDS + DATA_IMPORTANCE_KINDS} or a function of "
                         f"the dependency graph, got {importance!r}")
    if calibration is not None or calibration_loss is not None:
        raise ValueError(f"importance={importance!r} reads only the weights: calibration data is used by "
                         f"importance in {DATA_IMPORTANCE_KINDS}")
    return magnitude_saliency(dg, importance)


def _custom_saliency(dg: DependencyGraph, scores: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if not isinstance(scores, Mapping):
        raise TypeError(f"an importance function must return a dict of group id -> scores, got {type(scores).__name__}")
    groups = {g.id: g for g in dg.prunable_groups}
    unknown = sorted(set(scores) - set(groups))
    if unknown:
        raise ValueError(f"the importance function scored groups that are not prunable groups of this graph: "
                         f"{unknown[:5]}; use the ids of dg.prunable_groups")
    out = {}
    for gid, g in groups.items():
        s = torch.as_tensor(scores.get(gid, torch.ones(g.channels))).detach().double().cpu().reshape(-1)
        if s.numel() != g.channels or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError(f"importance for group {gid} ({g.name}) must be {g.channels} finite, non-negative "
                             f"scores, got {s.numel()} values")
        out[gid] = mean_one(s)
    return out


def _refuse_meta(model: torch.nn.Module, what: str) -> None:
    """A clear error where weights are needed and the model's are on the meta device."""
    name = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if name is not None:
        raise ValueError(f"{what}, which needs the weights, and `{name}` is on the meta device (no values): "
                         "load the weights first; without them, dependency_graph, count and "
                         "prune(..., importance='uniform') plan on the meta device")


def _channel_ranks(dg: DependencyGraph, scores: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Rank of every prunable channel within its group (0 = most salient, kept last)."""
    ranks = [torch.argsort(torch.argsort(scores[g.id], descending=True, stable=True), stable=True)
             for g in dg.prunable_groups]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def _floors(dg: DependencyGraph, max_prune: MaxPrune, fit) -> Dict[str, int]:
    """Per group id, the fewest channels ``max_prune`` and the graph (a top-k over the group)
    allow, raised where a config fit needs it."""
    min_kept = min_kept_of(dg.prunable_groups, max_prune)
    for g in dg.prunable_groups:
        if g.floor > 1:
            min_kept[g.id] = max(min_kept.get(g.id, 0), g.floor)
    return fit.raise_floors(min_kept) if fit is not None else min_kept


def _unwrap(model: torch.nn.Module) -> torch.fx.GraphModule:
    while hasattr(model, "module") and not hasattr(model, "hfp"):
        model = model.module  # DistributedDataParallel / DataParallel
    if not isinstance(getattr(model, "hfp", None), HFPState):
        raise TypeError(f"{type(model).__name__} is not a model returned by hfp_fx.prepare "
                        "(or it was already finalized); call hfp_fx.prepare(model, example_inputs, target) first")
    return model



@dataclass
class PreparedConfig:
    """How :func:`prepare` set a model up, kept on it as ``prepared.hfp_config`` for
    :func:`finalize` and :func:`recalibrate_latency`: the dependency graph the gates were
    inserted from and the options the plan must honour again at the cut."""

    graph: DependencyGraph
    exclude: List[str]
    uniform_blocks: bool
    latency_options: LatencyOptions
    #: widths a Hugging Face config accepts (:func:`~hfp_fx.plan.hf_layouts.config_fit`), or None
    fit: Optional[ConfigFit]
    #: per-group floors from ``max_prune`` (:func:`~hfp_fx.plan.projection.min_kept_of`), or None
    min_kept: Optional[Dict[str, int]]
    #: a Hugging Face decoder's layout (depth gates then remove whole layers), or None
    layout: Optional[DecoderLayout] = None

    @staticmethod
    def of(prepared: torch.nn.Module) -> "PreparedConfig":
        config = getattr(prepared, "hfp_config", None)
        if not isinstance(config, PreparedConfig):
            raise TypeError(f"{type(prepared).__name__} was not returned by hfp_fx.prepare (no hfp_config); "
                            "prepare the model first: prepared = hfp_fx.prepare(model, x, target)")
        return config


def prepare(model: torch.nn.Module, example_inputs: Any, target: Any, *, exclude: Sequence[str] = (),
            min_channels: int = 1, round_to: int = 1, threshold: float = 0.05, count: str = "ste",
            temperature: float = 0.02, lambda_init: float = 1e-3, dual_rate: float = 0.02,
            warmup_steps: int = 0, gate_max: Optional[float] = None, cost_power: float = 1.0,
            relative_gates: bool = False, ramp_steps: int = 0, gates: str = "width",
            rules: Optional[OpRegistry] = None, capture: str = "auto",
            uniform_blocks: bool = False, latency_options: Optional[LatencyOptions] = None,
            rerank_every: int = 0, importance: Importance = "l1", calibration: Optional[Iterable[Any]] = None,
            calibration_loss: Optional[CalibrationLoss] = None, max_prune: MaxPrune = None,
            budget: str = "penalty", depth: bool = False) -> torch.fx.GraphModule:
    """A trainable copy of ``model`` with one gate per prunable group (see module doc).

    ``target``: ``hfp_fx.Target(params=..., macs=...)``, a dict, or a bare fraction/"40%"/int
    meaning MACs.  The result computes exactly what ``model`` computes (all gates start at 1).
    ``threshold``, ``count``, ``temperature``, ``gate_max``, ``cost_power`` and ``relative_gates``
    shape per-channel gates: with ``gates="width"`` a value other than the default is refused.
    ``rules``, ``capture``: the op handlers to use and how the model is captured (see
    :func:`hfp_fx.dependency_graph`).  ``uniform_blocks=True``: :func:`finalize` keeps the same
    widths in every repeated block (:func:`hfp_fx.plan.projection.uniform_block_classes`); the gates
    still train one width per group, the projection makes them equal.  For a Llama-style Hugging
    Face model it also keeps the hidden size a multiple of the kept attention heads, as the
    model's config requires (:func:`hfp_fx.plan.hf_layouts.config_fit`; see :func:`hfp_fx.to_pretrained`).
    A ``latency`` target measures a latency model first (:mod:`hfp_fx.plan.latency`, options in
    ``latency_options``); the loss then pushes the predicted latency like params and MACs.
    ``rerank_every=N`` (widths only): every ``N`` training steps, re-rank each group's channels
    by their Taylor importance measured during training (:class:`hfp_fx.train.gates.WidthGates`),
    so the widths cut the channels the loss needs least, not the smallest filters of ``model``.
    ``importance`` (widths only): the ranking the widths cut along, as :func:`prune` takes it
    (``"l1"`` filter magnitude; ``"activation"`` or ``"taylor"`` measured on ``calibration``).
    ``max_prune``: the largest fraction of a group that may be removed, for every group or per
    pattern (:func:`hfp_fx.plan.projection.min_kept_of`); the widths never go below it and
    :func:`finalize` keeps it.  ``budget``: how training meets the target; ``"penalty"`` (default)
    is ``complexity_loss`` with its adaptive weight (dual ascent); ``"project"`` (widths only)
    also moves the widths onto the (ramped) budget at the start of every training forward pass
    (:meth:`HFPState.project_widths`), so the forward pass always trains an architecture within
    the budget and ``finalize`` has next to nothing left to cut.
    """
    if gates not in GATE_KINDS:
        raise ValueError(f"gates must be one of {GATE_KINDS}, got {gates!r}")
    if int(min_channels) < 1 or int(round_to) < 1:
        raise ValueError(f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}")
    wanted = Target.parse(target)
    # the per-channel options the caller changed: a gate kind refuses those it does not take
    chosen = {k: v for k, v in dict(threshold=threshold, count=count, temperature=temperature, gate_max=gate_max,
                                    cost_power=cost_power, relative_gates=relative_gates).items()
              if v != _PER_CHANNEL_DEFAULTS[k]}
    dg = dependency_graph(model, example_inputs, exclude=exclude, rules=rules, capture=capture)
    _refuse_meta(model, "prepare makes a model to train")
    if depth and wanted.latency is not None:
        raise NotImplementedError("prepare(depth=True) takes a params or MACs target; a latency target with depth "
                                  "gates is not supported yet (prepare with depth=False)")
    units = [u for u in dg.depth_units if u.removable] if depth else []
    latency = build_latency_model(dg, latency_options, round_to=round_to) if wanted.latency is not None else None
    cost = CostModel(dg, latency=latency, gated=units)
    index = PrunableIndex.of(dg)
    fit = config_fit(model, dg) if uniform_blocks else None
    min_kept = _floors(dg, max_prune, fit)
    if gates == "width":
        ranks = _channel_ranks(dg, saliency_of(dg, importance, calibration, calibration_loss))
        floors = torch.tensor([min_kept.get(gid, 0) for gid in index.group_ids], dtype=torch.long)
        kind: GateKind = WidthGates(index, ranks, min_channels=min_channels, min_kept=floors,
                                    rerank_every=rerank_every, **chosen)
    elif rerank_every or importance != "l1" or calibration is not None or max_prune is not None:
        given = [name for name, v in (("rerank_every", rerank_every), ("importance", importance != "l1"),
                                      ("calibration", calibration is not None), ("max_prune", max_prune is not None))
                 if v]
        raise ValueError(f"{', '.join(given)} shape per-group widths (a channel ranking, a floor): "
                         "use them with gates='width'")
    else:
        kind = ChannelGates(index, **chosen)
    state = HFPState(cost, index, kind, wanted.resolve(cost.counts(), _dense_ms(cost)), min_channels=min_channels,
                     round_to=round_to,
                     lambda_init=lambda_init, dual_rate=dual_rate, warmup_steps=warmup_steps, ramp_steps=ramp_steps,
                     budget=budget, depth_units=units)
    if not dg.prunable_groups:
        raise ValueError(f"{type(model).__name__} has no prunable channel group; see "
                         "hfp_fx.dependency_graph(model, x).summary() for the reasons")
    check_feasible(cost, dg.prunable_groups, state.target, min_channels, round_to, min_kept)
    # the gates live where the weights live, so a CUDA model trains without another .to()
    device = next((t.device for t in (*model.parameters(), *model.buffers())), None)
    if device is not None and device.type != "meta":
        state.to(device)
    prepared = insert_gates(dg.facts, state)
    if units:
        vector = next(n for n in prepared.graph.nodes if n.op == "call_module" and n.target == "hfp")
        gate_units(prepared, units, vector, [state.depth_position(i) for i in range(len(units))])
    prepared.train(model.training)  # the gates' schedule follows the model's mode
    prepared.hfp_config = PreparedConfig(dg, list(exclude), bool(uniform_blocks),
                                         latency_options or LatencyOptions(), fit, min_kept,
                                         layout_of(model) if uniform_blocks else None)
    return prepared


def _dense_ms(cost: CostModel) -> Optional[float]:
    """The latency model's value for the dense model: fractions of it are budgets, so the
    model's own scale (not one timing of the dense model) is what a fraction is relative to."""
    return float(cost.latency(torch.ones(cost.num_units, dtype=torch.float64))) if cost.has_latency else None


_PER_CHANNEL_DEFAULTS = {k: prepare.__kwdefaults__[k]
                         for k in ("threshold", "count", "temperature", "gate_max", "cost_power", "relative_gates")}


def gate_parameters(prepared: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The gate parameters (widths or per-channel gates, and the depth gates of
    ``prepare(depth=True)``), e.g. for their own optimizer parameter group."""
    hfp = _unwrap(prepared).hfp
    return [hfp.trainable] + ([hfp.depth_gates] if hfp.depth_units else [])


def complexity_loss(prepared: torch.nn.Module) -> torch.Tensor:
    """The HFP loss (scalar, differentiable, zero when every targeted count is under target)."""
    return _unwrap(prepared).hfp.loss()


def complexity(prepared: torch.nn.Module) -> Dict[str, float]:
    """Current hard (exact) and soft params/MACs, targets and ratios."""
    hfp: HFPState = _unwrap(prepared).hfp
    with torch.no_grad():
        hp, hm, hard_ns = hfp.counts_of(hfp.keep_values(soft=False)).tolist()
        sp, sm, soft_ns = hfp.counts_of(hfp.keep_of(hfp.gates.soft_keep())).tolist()
        current = hfp.current_targets().tolist()
        kept = int(hfp.kept_channels().sum())
        scale = float(hfp.latency_scale)
        hard_latency, soft_latency = hard_ns * 1e-6, soft_ns * 1e-6
    out = {"params": int(round(float(hp))), "macs": int(round(float(hm))), "params_soft": float(sp),
           "macs_soft": float(sm), "dense_params": hfp.dense.params, "dense_macs": hfp.dense.macs,
           "kept_channels": kept, "prunable_channels": hfp.num_channels}
    if hfp.cost.has_latency:  # milliseconds, predicted by the latency model (times latency_scale)
        out.update(latency=hard_latency, latency_soft=soft_latency, dense_latency=hfp.dense_latency_ms,
                   latency_scale=scale)
    for i, (name, t) in enumerate((("params", hfp.target.params), ("macs", hfp.target.macs),
                                   ("latency", hfp.target.latency))):
        if name == "latency" and not hfp.cost.has_latency:
            continue
        out[f"target_{name}"] = t
        out[f"{name}_ratio"] = out[name] / t if t else None
        # where the ramp is now (latency: ns -> ms)
        out[f"current_target_{name}"] = (current[i] * (1e-6 if name == "latency" else 1)) if t else None
    return out


def finalize(prepared: torch.nn.Module, target: Any = None, cost_power: float = 0.0) -> torch.fx.GraphModule:
    """Exact budget projection + gate folding + shrink (see module doc).

    ``target`` overrides the prepared target.  The result's ``meta["hfp"]`` holds the report
    (a :class:`~hfp_fx.plan.report.PruneReport`).  Channels left over the budget after the gate
    threshold are removed by saliency (``cost_power=0``); ``cost_power=1`` ranks them by
    saliency per unit of marginal cost, which strips expensive groups first when the gates carry
    little information yet.  With a latency target the pruned model is then measured against the
    dense one and the plan tightened while it misses (``LatencyOptions.corrections``); the
    report's ``latency`` gives predicted and measured values.

    Given a ``DistributedDataParallel`` wrapper, ``finalize`` is a collective: every rank must
    call it, and rank 0's buffers (batch-norm statistics, which DDP lets drift per rank) are
    broadcast first, so every rank returns the same architecture and weights.  So it is for a
    model sharded with FSDP2 (:func:`hfp_fx.fully_shard`): every rank gathers the full weights and
    returns the same plain (unsharded) GraphModule.
    """
    if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
        _broadcast_buffers(prepared)
    prepared = _unwrap(prepared)
    config = PreparedConfig.of(prepared)
    hfp: HFPState = prepared.hfp
    dg = config.graph
    if target is None:
        resolved = hfp.target
    else:
        budget = Target.parse(target)
        if budget.latency is not None and not hfp.cost.has_latency:
            raise ValueError("finalize(target=...) with a latency budget needs a latency model: "
                             "prepare the model with a latency target")
        resolved = budget.resolve(hfp.dense, hfp.dense_latency_ms if hfp.cost.has_latency else None)
    saliency = hfp.index.split_per_group(hfp.gates.saliency().cpu())
    initial = hfp.kept_per_group()
    tied = uniform_block_classes(dg.prunable_groups) if config.uniform_blocks else ()
    removed, scaled = _depth_decision(prepared, hfp, config)
    plan_cost = CostModel(dg, removed=removed) if hfp.depth_units else hfp.cost
    depth_scales: Dict[str, float] = {}  # kept branches scaled by a multiplication (not folded)

    scale = float(hfp.latency_scale)
    if resolved.latency is not None and scale != 1.0:  # plan in the latency model's units
        resolved_plan = ResolvedTarget(resolved.params, resolved.macs, min(resolved.latency / scale, hfp.dense_latency_ms))
    else:
        resolved_plan = resolved

    def plan_for(budget: ResolvedTarget) -> Plan:
        return project(plan_cost, dg.prunable_groups, saliency, budget, initial=initial,
                       min_channels=hfp.min_channels, round_to=hfp.round_to, cost_power=cost_power, tied=tied,
                       fit=config.fit, min_kept=config.min_kept)

    def build(plan: Plan) -> Tuple[torch.fx.GraphModule, list]:
        base = _trained_copy(prepared, dg)
        vector = torch.cat([torch.ones(1), hfp.gates.gate_values().detach().cpu().double().clamp(min=0)])
        scales = _fold_gates(base, dg, hfp.index, vector)  # docs/concepts.md, "Finalize"
        if not hfp.depth_units:
            return shrink_model(dg.facts, dg.alive(plan.keep), gm=base, scales=scales), scales
        gone = {n for u in removed for n in u.nodes}
        scales = [s for s in scales if s[1].node not in gone]  # (sites inside removed branches go with them)
        small = shrink_model(dg.facts, dg.alive(plan.keep), gm=base, scales=scales, removed=removed)
        depth_scales.clear()
        depth_scales.update(scale_units(small, scaled))
        return small, scales

    names = ["budget projection", "fold gates and shrink"] + (["measure latency"] if resolved.latency else [])
    with stages("finalize", names) as stage:
        with stage("budget projection"):
            try:
                plan = plan_for(resolved_plan)
            except InfeasibleTargetError:
                if resolved_plan is resolved:
                    raise
                resolved_plan = resolved  # the measured scale puts the target out of reach: best effort
                plan = plan_for(resolved)
        with stage("fold gates and shrink"):
            small, scales = build(plan)
        latency = None
        if resolved.latency is not None:
            with stage("measure latency"):
                small, plan, latency, scales = _meet_latency(
                    _trained_copy(prepared, dg), small, plan, resolved, _dense_ms(hfp.cost), plan_for, build, dg.example_inputs,
                    config.latency_options, scales,
                    planned=resolved_plan.latency, trained=initial)
    small.train(prepared.training)  # the mode the prepared model is in now
    small.meta["hfp"] = PruneReport.of(dg, plan, scale_sites=[name for name, _, _ in scales],
                                       exclude=config.exclude, latency=latency,
                                       removed_units={u.id: u.name for u in removed}, depth_scales=depth_scales,
                                       dense_counts=hfp.dense)
    return small


def _depth_decision(prepared, hfp: HFPState, config: PreparedConfig):
    """``(removed units, [(kept unit, its gate) where the gate is not 1])`` from the depth gates:
    a branch goes when its gate is below 0.5 (on a Hugging Face decoder with ``uniform_blocks``,
    a layer goes whole when the mean of its two gates is)."""
    if not hfp.depth_units:
        return [], []
    values = hfp.depth_values().detach().cpu().double().tolist()
    layout = config.layout if config.uniform_blocks else None
    key = _decoder_layer_of(layout) if layout is not None else (lambda u: u.id)
    blocks: Dict[str, List[int]] = {}
    for i, unit in enumerate(hfp.depth_units):
        blocks.setdefault(key(unit), []).append(i)
    gone = set()
    for members in blocks.values():
        if sum(values[i] for i in members) / len(members) < 0.5:
            gone.update(members)
    removed = [u for i, u in enumerate(hfp.depth_units) if i in gone]
    scaled = [(u, values[i]) for i, u in enumerate(hfp.depth_units) if i not in gone and values[i] != 1.0]
    return removed, scaled


def _meet_latency(dense: torch.nn.Module, small: torch.nn.Module, plan: Plan, resolved: ResolvedTarget,
                  model_dense_ms: float, plan_for, build, inputs, options: LatencyOptions, extra=None,
                  planned: Optional[float] = None, trained: Optional[Dict[str, int]] = None):
    """Measure ``small`` against ``dense`` (paired rounds) and correct the plan by the miss.

    The latency model predicts, the budget is a measured ratio: while the measured ratio is over
    the budget, or more than ``options.slack`` under it, the budget the latency model plans for
    is moved (by ``goal / measured`` until one plan that meets and one that misses are known,
    then by bisection between them) and the model rebuilt, ``options.corrections`` times at most.
    The result is the measured model closest to the budget from below (else the last one).
    Returns ``(small, plan, LatencyReport, extra)``; ``build(plan)`` gives ``(small, extra)``.
    ``planned``: the budget ``plan`` was made for (default: the target).  ``trained``: per group,
    the channels trained gates kept; a correction that would remove more than
    ``options.max_correction_cut`` of them is refused (the report's ``refused`` says why).
    """
    goal = resolved.latency / model_dense_ms  # the budget as a fraction of the dense latency
    limit = goal * (1 + options.tolerance)
    planned = resolved.latency if planned is None else planned
    meets, misses = None, None
    corrections, best, last, refused = 0, None, None, None
    dense = dense.eval()
    while True:
        mode = small.training
        dense_ms, small_ms, ratio = measure_latency(dense, small.eval(), inputs, options.rounds, options.min_run_time)
        small.train(mode)
        report = LatencyReport(dense_ms, goal * dense_ms, plan.latency_ms * dense_ms / model_dense_ms,
                               small_ms, ratio, corrections)
        last = (small, plan, report, extra)
        if ratio <= limit:
            meets = planned if meets is None else max(meets, planned)
            if best is None or ratio > best[2].measured_ratio:
                best = last
        else:
            misses = planned if misses is None else min(misses, planned)
        if goal * (1 - options.slack) <= ratio <= limit or corrections >= options.corrections:
            break
        if meets is not None and misses is not None:
            planned = (meets + misses) / 2
        else:
            planned = min(planned * goal / ratio, model_dense_ms)
        try:
            candidate = plan_for(ResolvedTarget(resolved.params, resolved.macs, planned))
        except InfeasibleTargetError:
            break  # as small as the model gets: the report says how close it came
        cut = _cut_of_trained(candidate, trained)
        if cut > options.max_correction_cut:
            refused = (f"meeting the measured latency ({ratio:.3f} of dense, target {goal:.3f}) would remove "
                       f"{cut:.0%} of the channels the trained gates kept (LatencyOptions.max_correction_cut="
                       f"{options.max_correction_cut}); kept the trained widths. Call "
                       "hfp_fx.recalibrate_latency(prepared) a few times during training so the loss aims at the "
                       "measured latency, or allow a deeper cut")
            break
        plan = candidate
        small, extra = build(plan)
        corrections += 1
    chosen = best or last
    if refused is not None:
        chosen[2].refused = refused
        warnings.warn(refused, stacklevel=3)
    elif chosen[2].measured_ratio > limit:
        warnings.warn(f"measured latency {chosen[2].measured_ratio:.3f} of dense misses the target {goal:.3f} "
                      f"after {corrections} correction(s) (predicted {chosen[2].predicted_ms / chosen[2].dense_ms:.3f}); "
                      "timings on a loaded machine vary (see hfp_fx.plan.latency.LatencyOptions)", stacklevel=3)
    return chosen


def _cut_of_trained(plan: Plan, trained: Optional[Dict[str, int]]) -> float:
    """The share of the trained gates' kept channels that ``plan`` removes (0 without trained widths)."""
    if not trained:
        return 0.0
    before = sum(trained.values())
    after = sum(min(plan.kept_per_group[gid][1], n) for gid, n in trained.items() if gid in plan.kept_per_group)
    return max(0.0, 1.0 - after / max(before, 1))


def recalibrate_latency(prepared: torch.nn.Module) -> Dict[str, float]:
    """Measure the prepared model at its current widths and aim the loss at measured latency.

    The latency model predicts; the machine measures.  This shrinks a copy to the widths the
    gates keep now, times it against the dense model (paired rounds,
    :func:`hfp_fx.plan.latency.measure_latency`, with the prepared model's ``LatencyOptions``) and sets
    ``prepared.hfp.latency_scale = measured / predicted``: from then on ``complexity_loss`` and
    :func:`finalize`'s projection compare ``predicted * scale`` with the target, so training
    settles on widths that measure on target and ``finalize`` seldom has to correct (and cut
    into) what was learned.  Call it a few times during the gated phase, e.g. when the target
    ramp has ended and again near its end.  Under ``torch.distributed`` rank 0 measures and
    broadcasts the scale.  Returns ``{"predicted_ratio", "measured_ratio", "scale"}``.
    """
    prepared = _unwrap(prepared)
    config = PreparedConfig.of(prepared)
    hfp: HFPState = prepared.hfp
    if not hfp.cost.has_latency:
        raise ValueError("recalibrate_latency needs a latency model: prepare the model with a latency target "
                         "(hfp_fx.prepare(model, x, {'latency': 0.5}))")
    dg = config.graph
    with torch.no_grad():
        kept = hfp.kept_channels().cpu()
        keep = {gid: torch.nonzero(k).flatten().tolist() for gid, k in hfp.index.split_per_group(kept).items()}
        keep = {gid: idx for gid, idx in keep.items() if len(idx) < hfp.index.group_slice(gid).stop
                - hfp.index.group_slice(gid).start}
        predicted = float(hfp.cost.latency(hfp.keep_values(soft=False).cpu())) / hfp.dense_latency_ms
    options = config.latency_options
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    measured = torch.zeros((), dtype=torch.float64)
    if not distributed or torch.distributed.get_rank() == 0:
        dense = _trained_copy(prepared, dg).eval()
        small = shrink_model(dg.facts, dg.alive(keep), gm=copy.deepcopy(dense)).eval()
        _, _, ratio = measure_latency(dense, small, dg.example_inputs, options.rounds, options.min_run_time)
        measured.fill_(ratio)
    if distributed:
        measured = measured.to(hfp.latency_scale.device)
        torch.distributed.broadcast(measured, src=0)
    scale = float(measured) / max(predicted, 1e-12)
    hfp.latency_scale.fill_(scale)
    return {"predicted_ratio": predicted, "measured_ratio": float(measured), "scale": scale}


def _trained_copy(prepared: torch.fx.GraphModule, dg: DependencyGraph) -> torch.fx.GraphModule:
    """The traced dense graph holding copies of the prepared model's trained tensors.

    Copies keep their dtype and device (the prepared model may have been moved or cast since
    ``prepare``); the prepared model itself is left untouched.  Weights sharded with FSDP2
    (:func:`hfp_fx.fully_shard`) are gathered whole on every rank.
    """
    base = editable_copy(dg.gm)
    clones: Dict[int, torch.Tensor] = {}  # one clone per tensor, so tied weights stay tied
    state = {}
    for k, v in prepared.state_dict(keep_vars=True).items():
        if not k.startswith("hfp."):
            if id(v) not in clones:
                # a parameter sharded by FSDP2 is a DTensor: gathered whole (a collective, made
                # by every rank in this same order)
                full = getattr(v, "full_tensor", None)
                copy_ = (full() if callable(full) else v).detach().clone()
                clones[id(v)] = torch.nn.Parameter(copy_, v.requires_grad) if isinstance(v, torch.nn.Parameter) else copy_
            state[k] = clones[id(v)]
    base.load_state_dict(state, strict=True, assign=True)
    return base


def _broadcast_buffers(ddp: torch.nn.parallel.DistributedDataParallel) -> None:
    import torch.distributed as dist

    group = getattr(ddp, "process_group", None)
    with torch.no_grad():
        for t in list(ddp.module.buffers()) + list(ddp.module.parameters()):
            if t.is_floating_point() or t.dtype in (torch.long, torch.int):
                dist.broadcast(t.data, src=0, group=group)


def _readers(gm: torch.fx.GraphModule) -> Dict[int, int]:
    """How many graph nodes read each parameter (by tensor identity, so tied aliases count together;
    a ``get_attr`` counts each of its users).

    A gate may be folded into a weight only if the site's consumer is the weight's one reader: an
    embedding tied to the LM head would otherwise scale its own output with the head's gate.
    """
    readers: Dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            tensors, count = {id(t) for t in gm.get_submodule(node.target).parameters()}, 1
        elif node.op == "get_attr":  # one get_attr node may feed several ops (an exported tied weight)
            owner, _, attr = node.target.rpartition(".")
            tensors, count = {id(getattr(gm.get_submodule(owner) if owner else gm, attr))}, max(1, len(node.users))
        else:
            continue
        for t in tensors:
            readers[t] = readers.get(t, 0) + count
    return readers


def _fold_gates(gm: torch.fx.GraphModule, dg: DependencyGraph, index: PrunableIndex, vector: torch.Tensor):
    """Multiply kept gate values into consuming weights; return ``(name, site, scale)`` of the
    sites that need a scale node, named after the site (``GateSite.name``)."""
    uses: Dict[Tuple[str, int], int] = {}
    for site in dg.gate_sites:
        if site.weight is not None and site.kind == "scale":
            uses[site.weight] = uses.get(site.weight, 0) + 1
    state = dict(gm.named_parameters(remove_duplicate=False))
    readers = _readers(gm)
    pending = []
    for site in dg.gate_sites:
        scale = vector[index.position_of_elements(site.ids)]
        if bool((scale == 1).all()):
            continue
        if (site.weight is not None and site.kind == "scale" and uses[site.weight] == 1 and site.weight[0] in state
                and readers.get(id(state[site.weight[0]])) == 1):
            name, dim = site.weight
            w = state[name]
            shape = [1] * w.dim()
            shape[dim] = -1
            with torch.no_grad():
                w.mul_(scale.to(w.dtype).to(w.device).reshape(shape))
        else:
            pending.append((site.name, site, scale))
    return pending


def prune(model: torch.nn.Module, example_inputs: Any, target: Any, importance: Importance = "l1", *,
          exclude: Sequence[str] = (), min_channels: int = 1, round_to: int = 1,
          cost_power: float = 0.0, rules: Optional[OpRegistry] = None, capture: str = "auto",
          uniform_blocks: bool = False, latency_options: Optional[LatencyOptions] = None,
          calibration: Optional[Iterable[Any]] = None, calibration_loss: Optional[CalibrationLoss] = None,
          max_prune: MaxPrune = None, depth: Union[bool, str] = False) -> torch.fx.GraphModule:
    """One-shot pruning without training: magnitude saliency + the same exact global projection.

    ``rules``, ``capture``: the op handlers to use and how the model is captured (see
    :func:`hfp_fx.dependency_graph`).  ``uniform_blocks=True``: every repeated block (groups
    whose members' names are equal up to the block index, e.g. ``layers.3.mlp``) keeps the same
    width, so the result fits one configuration of the architecture; for a Llama-style Hugging
    Face model the hidden size also stays a multiple of the kept attention heads, so that
    :func:`hfp_fx.to_pretrained` gives a model its config accepts (:func:`hfp_fx.plan.hf_layouts.config_fit`).

    Saliency (``"l1"``): for every weight slice that produces a channel (a conv's or linear
    layer's output filters, as each op handler declares; see :mod:`hfp_fx.plan.saliency`), the mean
    |w| of the slice, summed over those tensors (coupled layers, e.g. the convs feeding a
    residual sum, all count); for a group that no producer holds, the same over the input slices
    of the weights that consume it.  ``"l2"`` takes the RMS instead of the mean |w|,
    ``"uniform"`` gives every channel 1.  Data-aware kinds run the model on ``calibration`` (an
    iterable of batches shaped like ``example_inputs``; :mod:`hfp_fx.plan.calibration`):
    ``"activation"`` ranks a channel by its mean ``|x|`` where a layer reads it, ``"taylor"`` by
    ``|d loss / d gate|`` (``calibration_loss(output, inputs)``, by default next-token
    cross-entropy for a causal LM).  Or pass a function ``importance(dg) -> {group id: scores}``
    (one non-negative score per channel, e.g. from weights read off disk, as
    :func:`hfp_fx.prune_checkpoint` does).  Each group's saliencies are divided by their mean, so
    channels are ranked globally.  ``max_prune`` caps the fraction removed from every group or
    from the groups a pattern names (:func:`hfp_fx.plan.projection.min_kept_of`), e.g.
    ``{"model.embed_tokens": 0.4}`` keeps 60% of a Llama's residual stream.  ``cost_power`` (default 0) ranks by saliency alone; 1 ranks
    by saliency per unit of marginal cost.

    A ``latency`` target (``{"latency": 0.5}``: half the dense model's measured latency, or
    ``"12ms"``) first measures a latency model of ``model`` on its device with the example
    inputs' batch size (:mod:`hfp_fx.plan.latency`; options, cache and timing budget in
    ``latency_options``), projects onto it, then measures the pruned model against the dense
    one and tightens the plan while it misses; ``report.latency`` has predicted and measured.

    ``depth=True`` may also remove whole residual branches (``dg.depth_units``: transformer
    attention/MLP sub-blocks, ResNet bottlenecks, inverted residuals), chosen with the widths
    under the same exact params/MACs budget (:mod:`hfp_fx.plan.depth`: candidates removing the
    least influential branches, each completed by the width projection, compared by their
    output on ``calibration``, or on the example inputs); ``report.removed_units`` names them.
    With ``uniform_blocks=True`` a Hugging Face decoder loses whole layers (both branches), which
    :func:`hfp_fx.to_pretrained` writes as a config with fewer layers.  ``depth="only"`` removes
    the least influential branches until the budget is met and prunes no channel.
    """
    if depth not in (False, True, "only"):
        raise ValueError(f"depth must be False, True or 'only', got {depth!r}")
    budget = Target.parse(target)
    stage_names = ["dependency graph", "latency model", "budget projection", "shrink", "measure latency"]
    with stages("prune", stage_names if budget.latency is not None else stage_names[:1] + stage_names[2:4]) as stage:
        with stage("dependency graph"):
            dg = dependency_graph(model, example_inputs, exclude=exclude, rules=rules, capture=capture)
        if not dg.prunable_groups:
            raise ValueError(f"{type(model).__name__} has no prunable channel group; see "
                             "hfp_fx.dependency_graph(model, x).summary() for the reasons")
        latency = None
        if budget.latency is not None:
            with stage("latency model"):
                latency = build_latency_model(dg, latency_options, round_to=round_to)
        with stage("budget projection"):
            cm = CostModel(dg, latency=latency)
            resolved = budget.resolve(cm.counts(), _dense_ms(cm))
            tied = uniform_block_classes(dg.prunable_groups) if uniform_blocks else ()
            # with depth units the calibration batches also choose the split between width and depth
            saliency = saliency_of(dg, importance, None if depth and importance not in DATA_IMPORTANCE_KINDS
                                   else calibration, calibration_loss)
            fit = config_fit(model, dg) if uniform_blocks else None
            min_kept = _floors(dg, max_prune, fit)

            plan_cost = cm  # (without the removed branches, once depth chose them)

            def plan_for(b: ResolvedTarget) -> Plan:
                return project(plan_cost, dg.prunable_groups, saliency, b, min_channels=min_channels,
                               round_to=round_to, cost_power=cost_power, tied=tied, fit=fit, min_kept=min_kept)

            choice = None
            if depth:
                layout = layout_of(model) if uniform_blocks else None
                choice = plan_width_and_depth(
                    dg, resolved, lambda cost: project(cost, dg.prunable_groups, saliency, resolved,
                                                       min_channels=min_channels, round_to=round_to,
                                                       cost_power=cost_power, tied=tied, fit=fit,
                                                       min_kept=min_kept),
                    calibration if calibration is not None else [dg.example_inputs],
                    blocks=_decoder_layer_of(layout) if layout is not None else None, widths=depth is True,
                    loss=calibration_loss, latency=latency)
                plan, plan_cost = choice.plan, choice.cost  # later latency corrections keep the branches gone
                removed = {u.id: u.name for u in choice.removed}
            else:
                plan, removed = plan_for(resolved), {}

        def build(p: Plan) -> torch.fx.GraphModule:
            return shrink_model(dg.facts, dg.alive(p.keep), removed=choice.removed if removed else ())
        with stage("shrink"):
            small = build(plan)
        report = None
        if latency is not None:
            with stage("measure latency"):
                small, plan, report, _ = _meet_latency(
                    copy.deepcopy(dg.gm), small, plan, resolved, _dense_ms(cm), plan_for,
                    lambda p: (build(p), None), dg.example_inputs,
                    latency_options or LatencyOptions())
                report.model_seconds = latency.seconds
    small.train(model.training)
    small.meta["hfp"] = PruneReport.of(dg, plan, exclude=exclude, latency=report, removed_units=removed,
                                       dense_counts=cm.counts())
    return small


def _decoder_layer_of(layout):
    """A depth unit's decoder layer (``model.layers.3.``), the block Hugging Face removes whole."""
    prefix, _, _ = layout.layer.partition("{}")

    def block(unit) -> str:
        rest = unit.name[len(prefix):] if unit.name.startswith(prefix) else ""
        index = rest.split(".")[0]
        return prefix + index if index.isdigit() else unit.id

    return block
