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
* the cost model (:mod:`hfp_fx.cost`) turns keep values into params and MACs;
  ``complexity_loss = sum_X lambda_X * max(0, log(X / X_target)) * U`` over the targeted X,
  with ``U`` the number of prunable channels so that ``lambda`` is the mean push per gate.
  Its gradient moves each gate by its channel's marginal global cost: the holistic allocation;
* ``finalize`` projects onto the budget exactly (:mod:`hfp_fx.projection`), folds the kept gate
  values into the consuming weights and shrinks the model.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx

from hfp_fx.api import dependency_graph
from hfp_fx.cost import CostModel, Counts
from hfp_fx.graph import DependencyGraph
from hfp_fx.passes.insert_gates import insert_gates
from hfp_fx.passes.registry import OpRegistry
from hfp_fx.passes.shrink import add_scale_nodes, shrink_model
from hfp_fx.progress import stages
from hfp_fx.saliency import magnitude_saliency
from hfp_fx.projection import Plan, check_feasible, project
from hfp_fx.target import ResolvedTarget, Target

__all__ = ["HFPState", "prepare", "complexity_loss", "complexity", "finalize", "prune", "gate_parameters"]

GATE_KINDS = ("width", "channel")


class HFPState(torch.nn.Module):
    """Gates, cost model, target and loss schedule of a prepared model (``prepared.hfp``)."""

    def __init__(self, dg: DependencyGraph, target: ResolvedTarget, *, threshold: float = 0.05,
                 count: str = "ste", temperature: float = 0.02, lambda_init: float = 1e-3,
                 dual_rate: float = 0.02, warmup_steps: int = 0, min_channels: int = 1, round_to: int = 1,
                 gate_max: Optional[float] = None, cost_power: float = 1.0, relative_gates: bool = False,
                 ramp_steps: int = 0, gates: str = "width"):
        super().__init__()
        if gates not in GATE_KINDS:
            raise ValueError(f"gates must be one of {GATE_KINDS}, got {gates!r}")
        if gates == "width" and (relative_gates or gate_max is not None or count != "ste" or cost_power != 1.0):
            raise ValueError("relative_gates, gate_max, count and cost_power shape per-channel gates: "
                             "use them with gates='channel'")
        if int(ramp_steps) < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        if not 0.0 <= cost_power <= 1.0:
            raise ValueError(f"cost_power must be in [0, 1], got {cost_power}")
        if gate_max is not None and not gate_max > threshold:
            raise ValueError(f"gate_max must be above the threshold {threshold}, got {gate_max}")
        if count not in ("ste", "sigmoid"):
            raise ValueError(f"count must be 'ste' or 'sigmoid', got {count!r}")
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.cost = CostModel(dg)
        groups = dg.prunable_groups
        self.group_ids: List[str] = [g.id for g in groups]
        sizes = [g.channels for g in groups]
        self.offsets: List[int] = [0] + list(torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist()) if sizes else [0]
        units = torch.cat([g.units for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
        self.gates = gates
        self.num_channels = int(units.numel())
        self.register_buffer("group_index", torch.repeat_interleave(torch.arange(len(sizes)),
                                                                    torch.tensor(sizes, dtype=torch.long))
                             if sizes else torch.zeros(0, dtype=torch.long), persistent=False)
        if gates == "channel":
            self.gate = torch.nn.Parameter(torch.ones(units.numel()))
        else:
            self.width = torch.nn.Parameter(torch.ones(len(sizes)))
            # persistent: a reloaded prepared model keeps the ranking its widths were trained with.
            # Integer buffers, so that casting the prepared model (.half()) cannot round them.
            self.register_buffer("rank", _channel_ranks(dg), persistent=True)
            self.register_buffer("group_size", torch.tensor(sizes, dtype=torch.long)[self.group_index],
                                 persistent=False)
        self.register_buffer("columns", self.cost.columns(units), persistent=False)
        self.register_buffer("lambdas", torch.full((2,), float(lambda_init), dtype=torch.float64))
        # targets as a tensor (0 = not targeted) so the loss never syncs with the host; integer,
        # so that casting the prepared model (.half()) cannot round them
        self.register_buffer("targets", torch.tensor([0 if t is None else int(t) for t in (target.params, target.macs)],
                                                     dtype=torch.long), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.dense = self.cost.counts()
        self.register_buffer("dense_counts", torch.tensor([self.dense.params, self.dense.macs], dtype=torch.long),
                             persistent=False)
        # element id -> index into the gate vector (0 = fixed channel, constant 1)
        vec = torch.zeros(dg.roots.numel(), dtype=torch.long)
        unit_pos = torch.zeros(dg.roots.numel(), dtype=torch.long)
        unit_pos[units] = torch.arange(1, units.numel() + 1)
        vec[:] = unit_pos[dg.roots]
        self._element_index = vec
        self.sites = torch.nn.Module()
        self.target = target
        self.threshold, self.count_mode, self.temperature = float(threshold), count, float(temperature)
        self.lambda_init, self.dual_rate, self.warmup_steps = float(lambda_init), float(dual_rate), int(warmup_steps)
        self.min_channels, self.round_to = int(min_channels), int(round_to)
        self.gate_max = None if gate_max is None else float(gate_max)
        self.cost_power = float(cost_power)
        self.relative_gates = bool(relative_gates)
        self.ramp_steps = int(ramp_steps)

    # -- gates ---------------------------------------------------------------------------------
    @property
    def trainable(self) -> torch.nn.Parameter:
        """The gate parameter: per-group widths (``gates="width"``) or per-channel gates."""
        return self.width if self.gates == "width" else self.gate

    def vector_index(self, ids: torch.Tensor) -> torch.Tensor:
        return self._element_index[ids]

    def position(self) -> torch.Tensor:
        """``gates="width"``: per channel, its group's kept width minus the channel's rank.

        A channel is kept while this is above 0.5.  The forward pass sees widths clipped to
        [0, 1] (and at least ``min_channels``), the gradient passes unclipped, so a width pushed
        past 1 comes straight back under the cost push.

        The gradient reaching a width is divided by the mean group size: a width's gradient is
        its group size times a per-channel one (task and cost alike), so without this the step
        a learning rate gives would grow with the model's widths; with it, one learning rate
        moves widths alike in small and large models.
        """
        mean_size = self.num_channels / max(len(self.group_ids), 1)
        width = self.width.double()  # float64 whatever the model's dtype: ranks go to thousands
        w = width.detach() + (width - width.detach()) / mean_size
        w = w + (w.clamp(0, 1) - w).detach()
        n = self.group_size.double()
        floor = n.clamp(max=float(self.min_channels))
        kept = w[self.group_index] * n
        # the floor straight-through too: a width held at min_channels still feels both losses
        # (and can grow back) instead of losing its gradient
        kept = kept + (torch.maximum(kept, floor) - kept).detach()
        return kept - self.rank.double()

    def alive(self) -> torch.Tensor:
        """Per prunable channel: kept (True) or acting as zero (False) in the forward pass now."""
        if self.gates == "width":
            return self.position() > 0.5
        return self.scaled_gates() > self.threshold

    def kept_per_group(self) -> Dict[str, int]:
        """Channels the forward pass keeps now, per group id."""
        counts = torch.zeros(len(self.group_ids), dtype=torch.long, device=self.group_index.device)
        counts.index_add_(0, self.group_index, self.alive().long())
        return dict(zip(self.group_ids, counts.tolist()))

    def _width_mask(self) -> torch.Tensor:
        d = self.position()
        hard = (d > 0.5).to(d.dtype)
        # straight-through on the boundary channel only (0 < d <= 1, one channel per group even
        # when n * width is whole): d task / d width is what fading that one channel in or out
        # is worth, the first-order value of one channel
        window = ((d > 0) & (d <= 1)).to(d.dtype)
        return (hard + (d - d.detach()) * window).to(self.width.dtype)

    def scaled_gates(self) -> torch.Tensor:
        """The gates the threshold and the forward pass see.

        Plain gates by default.  With ``relative_gates`` each gate is divided by the largest gate
        of its group: when batch norm follows the consuming layer, shrinking all gates of a group
        together changes nothing the task loss sees, so absolute gate values drift with the cost
        push; relative ones cannot, and the push can only move a group's channels apart.
        """
        if not self.relative_gates or self.gate.numel() == 0:
            return self.gate
        n_groups = len(self.group_ids)
        top = torch.zeros(n_groups, device=self.gate.device, dtype=self.gate.dtype).scatter_reduce(
            0, self.group_index, self.gate, "amax", include_self=False)
        return self.gate / top.clamp(min=torch.finfo(self.gate.dtype).tiny)[self.group_index]

    def saliency(self) -> torch.Tensor:
        """Per channel, what the budget projection of ``finalize`` ranks by (kept: higher)."""
        if self.gates == "width":
            # as a fraction of the group: untrained widths (all 1) then prune every group alike
            return self.position().detach() / self.group_size.double()
        return self.scaled_gates().detach().clamp(min=0)

    def gate_values(self) -> torch.Tensor:
        """What a kept channel is multiplied by: the gate, capped at ``gate_max`` when set.

        The cap anchors each group's scale: a batch norm after the consuming layer makes a
        uniform shrink of all gates of a group free for the task loss, so without it the gates
        of a group can sink together; with it, channels the task loss needs stay at the cap.
        """
        if self.gates == "width":
            return self.width.new_ones(self.rank.shape)  # kept channels pass unscaled
        g = self.scaled_gates()
        return g if self.gate_max is None else g.clamp(max=self.gate_max)

    def effective_gates(self) -> torch.Tensor:
        # A channel is kept while its gate is above the threshold; gates are not mirrored at zero
        # (|g|), so an optimizer overshooting below zero cannot flip a pruned channel back on.
        if self.gates == "width":
            return self._width_mask()
        g = self.gate_values()
        hard = g * (self.scaled_gates() > self.threshold).to(g.dtype)
        return g + (hard - g).detach()  # exact zeros forward, identity gradient below the cap

    def forward(self) -> torch.Tensor:
        return torch.cat([self.trainable.new_ones(1), self.effective_gates()])

    def gate_of(self, gid: str) -> torch.Tensor:
        if self.gates != "channel":
            raise TypeError("gate_of: per-channel gates exist with gates='channel' only")
        i = self.group_ids.index(gid)
        return self.gate[self.offsets[i]:self.offsets[i + 1]]

    # -- soft channel counts ------------------------------------------------------------------
    def keep_values(self, soft: bool = True) -> torch.Tensor:
        """Keep value per cost-model column: exact hard counts forward, surrogate gradient."""
        keep = torch.ones(self.cost.num_units, dtype=torch.float64, device=self.trainable.device)
        if not soft:
            return keep.index_put((self.columns,), self.alive().double())
        if self.gates == "width":
            return keep.index_put((self.columns,), self._width_mask().double())
        scaled = self.scaled_gates()
        s = scaled.clamp(min=0)
        alive = (scaled > self.threshold).to(s.dtype)
        if s.numel() == 0:
            return keep
        if self.count_mode == "sigmoid":
            k = torch.sigmoid((s - self.threshold) / self.temperature)
        else:
            n_groups = len(self.group_ids)
            alive_sum = torch.zeros(n_groups, device=s.device, dtype=s.dtype).index_add(0, self.group_index,
                                                                                        (s * alive).detach())
            alive_cnt = torch.zeros(n_groups, device=s.device, dtype=s.dtype).index_add(0, self.group_index, alive)
            mean = (alive_sum / alive_cnt.clamp(min=1)).clamp(min=1e-6)[self.group_index]
            # only kept channels are pushed: a gate already below the threshold is left to the task
            # loss (which may revive it) instead of being driven through zero
            surrogate = s * alive / mean
            if self.cost_power != 1.0:
                surrogate = _CompressSpread.apply(surrogate, self.cost_power)
            k = alive + surrogate - surrogate.detach()
        return keep.index_put((self.columns,), k.double())

    def counts(self, soft: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cost.evaluate(self.keep_values(soft))

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
        # Everything stays on the gates' device: no .item()/float() host syncs per step.
        targeted = self.targets > 0
        ratios = torch.stack(self.counts(soft=True)) / self.current_targets().clamp(min=1.0)
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
        return (total * max(self.num_channels, 1)).to(self.trainable.dtype)

    def soft_keep(self) -> torch.Tensor:
        """A smooth keep value per channel, for reporting (``complexity``'s ``*_soft``)."""
        if self.gates == "width":
            return self.position().detach().clamp(0, 1)
        s = self.scaled_gates().detach().clamp(min=0)
        return torch.sigmoid((s - self.threshold) / max(self.temperature, 1e-6))


class _CompressSpread(torch.autograd.Function):
    """Identity forward; backward maps each gradient entry ``d`` to ``sign(d) |d|^p``, rescaled so
    the mean magnitude is unchanged (``lambda`` keeps its meaning).  ``p = 1``: each gate is pushed
    by its channel's marginal cost (the plain gradient); ``p = 0``: every kept gate is pushed
    equally (global gate-magnitude pruning); in between, expensive channels are pushed harder,
    but by less than their cost ratio."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, power: float) -> torch.Tensor:
        ctx.power = power
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mag = grad.abs()
        nonzero = mag > 0
        mean = mag.sum() / nonzero.sum().clamp(min=1)
        compressed = mag.clamp(min=torch.finfo(mag.dtype).tiny) ** ctx.power
        ref = (compressed * nonzero).sum() / nonzero.sum().clamp(min=1)
        return torch.where(nonzero, grad.sign() * compressed * (mean / ref.clamp(min=torch.finfo(mag.dtype).tiny)),
                           torch.zeros_like(grad)), None


def _channel_ranks(dg: DependencyGraph) -> torch.Tensor:
    """Rank of every prunable channel within its group (0 = largest filter L1 norm, kept last)."""
    scores = magnitude_saliency(dg, "l1")
    ranks = [torch.argsort(torch.argsort(scores[g.id], descending=True, stable=True), stable=True)
             for g in dg.prunable_groups]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def _unwrap(model: torch.nn.Module) -> torch.fx.GraphModule:
    while hasattr(model, "module") and not hasattr(model, "hfp"):
        model = model.module  # DistributedDataParallel / DataParallel
    if not isinstance(getattr(model, "hfp", None), HFPState):
        raise TypeError(f"{type(model).__name__} is not a model returned by hfp_fx.prepare "
                        "(or it was already finalized); call hfp_fx.prepare(model, example_inputs, target) first")
    return model


def prepare(model: torch.nn.Module, example_inputs: Any, target: Any, *, exclude: Sequence[str] = (),
            min_channels: int = 1, round_to: int = 1, threshold: float = 0.05, count: str = "ste",
            temperature: float = 0.02, lambda_init: float = 1e-3, dual_rate: float = 0.02,
            warmup_steps: int = 0, gate_max: Optional[float] = None, cost_power: float = 1.0,
            relative_gates: bool = False, ramp_steps: int = 0, gates: str = "width",
            rules: Optional[OpRegistry] = None) -> torch.fx.GraphModule:
    """A trainable copy of ``model`` with one gate per prunable group (see module doc).

    ``target``: ``hfp_fx.Target(params=..., macs=...)``, a dict, or a bare fraction/"40%"/int
    meaning MACs.  The result computes exactly what ``model`` computes (all gates start at 1).
    ``rules``: the op handlers to use (see :func:`hfp_fx.dependency_graph`).
    """
    if int(min_channels) < 1 or int(round_to) < 1:
        raise ValueError(f"min_channels and round_to must be >= 1, got {min_channels} and {round_to}")
    dg = dependency_graph(model, example_inputs, exclude=exclude)
    resolved = Target.parse(target).resolve(CostModel(dg).counts())
    state = HFPState(dg, resolved, threshold=threshold, count=count, temperature=temperature,
                     lambda_init=lambda_init, dual_rate=dual_rate, warmup_steps=warmup_steps,
                     min_channels=min_channels, round_to=round_to, gate_max=gate_max, cost_power=cost_power,
                     relative_gates=relative_gates, ramp_steps=ramp_steps, gates=gates)
    if not dg.prunable_groups:
        raise ValueError(f"{type(model).__name__} has no prunable channel group; see "
                         "hfp_fx.dependency_graph(model, x).summary() for the reasons")
    check_feasible(state.cost, dg.prunable_groups, resolved, min_channels, round_to)
    prepared = insert_gates(dg.facts, state)
    prepared.train(model.training)  # the gates' schedule follows the model's mode
    prepared._hfp_graph = dg
    prepared.meta["hfp_exclude"] = list(exclude)
    return prepared


def gate_parameters(prepared: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The gate parameters (widths or per-channel gates), e.g. for their own optimizer parameter group."""
    return [_unwrap(prepared).hfp.trainable]


def complexity_loss(prepared: torch.nn.Module) -> torch.Tensor:
    """The HFP loss (scalar, differentiable, zero when every targeted count is under target)."""
    return _unwrap(prepared).hfp.loss()


def complexity(prepared: torch.nn.Module) -> Dict[str, float]:
    """Current hard (exact) and soft params/MACs, targets and ratios."""
    hfp = _unwrap(prepared).hfp
    with torch.no_grad():
        hp, hm = hfp.cost.evaluate(hfp.keep_values(soft=False))
        soft = hfp.soft_keep()
        soft_keep = torch.ones(hfp.cost.num_units, dtype=torch.float64, device=soft.device).index_put(
            (hfp.columns,), soft.double())
        sp, sm = hfp.cost.evaluate(soft_keep)
        current = hfp.current_targets().tolist()
        kept = int(hfp.alive().sum())
    out = {"params": int(round(float(hp))), "macs": int(round(float(hm))), "params_soft": float(sp),
           "macs_soft": float(sm), "dense_params": hfp.dense.params, "dense_macs": hfp.dense.macs,
           "kept_channels": kept, "prunable_channels": hfp.num_channels}
    for i, (name, t) in enumerate((("params", hfp.target.params), ("macs", hfp.target.macs))):
        out[f"target_{name}"] = t
        out[f"{name}_ratio"] = out[name] / t if t else None
        out[f"current_target_{name}"] = current[i] if t else None  # where the ramp is now
    return out


def _report(dg: DependencyGraph, plan: Plan, hfp_state=None) -> Dict[str, Any]:
    groups = {}
    for g in dg.prunable_groups:
        dense, kept = plan.kept_per_group[g.id]
        groups[g.id] = {"name": g.name, "dense": dense, "kept": kept}
    return {"dense": {"params": plan.dense.params, "macs": plan.dense.macs},
            "achieved": {"params": plan.counts.params, "macs": plan.counts.macs},
            "target": {"params": plan.target.params, "macs": plan.target.macs},
            "groups": groups, "keep": plan.keep}


def finalize(prepared: torch.nn.Module, target: Any = None, cost_power: float = 0.0) -> torch.fx.GraphModule:
    """Exact budget projection + gate folding + shrink (see module doc).

    ``target`` overrides the prepared target.  The result's ``meta["hfp"]`` holds the report.
    Channels left over the budget after the gate threshold are removed by gate value
    (``cost_power=0``); ``cost_power=1`` ranks them by gate value per unit of marginal cost,
    which strips expensive groups first when the gates carry little information yet.

    Given a ``DistributedDataParallel`` wrapper, ``finalize`` is a collective: every rank must
    call it, and rank 0's buffers (batch-norm statistics, which DDP lets drift per rank) are
    broadcast first, so every rank returns the same architecture and weights.
    """
    if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
        _broadcast_buffers(prepared)
    prepared = _unwrap(prepared)
    hfp: HFPState = prepared.hfp
    dg: DependencyGraph = prepared._hfp_graph
    resolved = hfp.target if target is None else Target.parse(target).resolve(hfp.dense)
    sal = hfp.saliency().cpu()
    saliency = {gid: sal[hfp.offsets[i]:hfp.offsets[i + 1]] for i, gid in enumerate(hfp.group_ids)}
    initial = hfp.kept_per_group()
    with stages("finalize", ["budget projection", "fold gates", "shrink"]) as stage:
        with stage("budget projection"):
            plan = project(hfp.cost, dg.prunable_groups, saliency, resolved, initial=initial,
                           min_channels=hfp.min_channels, round_to=hfp.round_to, cost_power=cost_power)
            alive = dg.alive(plan.keep)
        with stage("fold gates"):
            base = _trained_copy(prepared, dg)
            vector = torch.cat([torch.ones(1), hfp.gate_values().detach().cpu().double().clamp(min=0)])
            scales = _fold_gates(base, dg, vector)  # docs/concepts.md, "Finalize"
        with stage("shrink"):
            small = shrink_model(dg.facts, alive, gm=base)
            add_scale_nodes(small, alive, scales)
    small.train(prepared.training)  # the mode the prepared model is in now
    small.meta["hfp"] = _report(dg, plan)
    small.meta["hfp"]["scale_sites"] = [s[0] for s in scales]
    small.meta["hfp"]["exclude"] = prepared.meta.get("hfp_exclude", [])
    return small


def _trained_copy(prepared: torch.fx.GraphModule, dg: DependencyGraph) -> torch.fx.GraphModule:
    """The traced dense graph holding copies of the prepared model's trained tensors.

    Copies keep their dtype and device (the prepared model may have been moved or cast since
    ``prepare``); the prepared model itself is left untouched.
    """
    base = copy.deepcopy(dg.gm)
    clones: Dict[int, torch.Tensor] = {}  # one clone per tensor, so tied weights stay tied
    state = {}
    for k, v in prepared.state_dict(keep_vars=True).items():
        if not k.startswith("hfp."):
            if id(v) not in clones:
                copy_ = v.detach().clone()
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


def _fold_gates(gm: torch.fx.GraphModule, dg: DependencyGraph, vector: torch.Tensor):
    """Multiply kept gate values into consuming weights; return sites that need a scale node."""
    uses: Dict[Tuple[str, int], int] = {}
    for site in dg.facts.gates:
        if site.weight is not None:
            uses[site.weight] = uses.get(site.weight, 0) + 1
    state = dict(gm.named_parameters(remove_duplicate=False))
    index_of = torch.zeros(dg.roots.numel(), dtype=torch.long)
    pos = 1
    for g in dg.prunable_groups:
        index_of[g.units] = torch.arange(pos, pos + g.channels)
        pos += g.channels
    element_index = index_of[dg.roots]
    pending = []
    for k, site in enumerate(dg.facts.gates):
        scale = vector[element_index[site.ids]]
        if bool((scale == 1).all()):
            continue
        if site.weight is not None and uses[site.weight] == 1 and site.weight[0] in state:
            name, dim = site.weight
            w = state[name]
            shape = [1] * w.dim()
            shape[dim] = -1
            with torch.no_grad():
                w.mul_(scale.to(w.dtype).to(w.device).reshape(shape))
        else:
            pending.append((f"site{k}", site, scale))
    return pending


def prune(model: torch.nn.Module, example_inputs: Any, target: Any, importance: str = "l1", *,
          exclude: Sequence[str] = (), min_channels: int = 1, round_to: int = 1,
          cost_power: float = 0.0, rules: Optional[OpRegistry] = None) -> torch.fx.GraphModule:
    """One-shot pruning without training: magnitude saliency + the same exact global projection.

    ``rules``: the op handlers to use (see :func:`hfp_fx.dependency_graph`).

    Saliency is each channel's mean |weight| (``"l1"``) or RMS (``"l2"``) over the filters that
    produce it, divided by its group's mean, so channels are ranked globally.  ``cost_power``
    (default 0) ranks by saliency alone; 1 ranks by saliency per unit of marginal cost.
    """
    with stages("prune", ["dependency graph", "budget projection", "shrink"]) as stage:
        with stage("dependency graph"):
            dg = dependency_graph(model, example_inputs, exclude=exclude, rules=rules)
        if not dg.prunable_groups:
            raise ValueError(f"{type(model).__name__} has no prunable channel group; see "
                             "hfp_fx.dependency_graph(model, x).summary() for the reasons")
        with stage("budget projection"):
            cm = CostModel(dg)
            resolved = Target.parse(target).resolve(cm.counts())
            plan = project(cm, dg.prunable_groups, magnitude_saliency(dg, importance), resolved,
                           min_channels=min_channels, round_to=round_to, cost_power=cost_power)
        with stage("shrink"):
            small = shrink_model(dg.facts, dg.alive(plan.keep))
    small.train(model.training)
    small.meta["hfp"] = _report(dg, plan)
    small.meta["hfp"]["scale_sites"] = []
    small.meta["hfp"]["exclude"] = list(exclude)
    return small
