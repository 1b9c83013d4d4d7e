"""Step 5 of the flow: the exact budget projection that turns saliencies into a pruning plan.

Inside a prune group every channel costs the same (that is how groups are formed), so the
plan is: per group keep the ``n_g`` most salient channels, and choose the ``n_g`` globally.

1. start from the caller's counts (the hard threshold of trained gates, or all channels);
2. **remove** while any targeted quantity exceeds its budget: repeatedly drop the block of
   ``round_to`` channels with the lowest ``saliency / marginal cost`` (marginal costs are the
   exact first derivatives of the bilinear cost model, recomputed after every batch);
3. **add back**, best ``saliency / marginal cost`` first, every block whose exact cost still fits
   under every budget.  First-order marginals never overestimate the cost of adding a block, so
   a block is skipped only when it truly does not fit: afterwards no remaining block fits the
   slack, i.e. the result is under target by less than one block's cost.

``tied`` classes of groups (``uniform_blocks``: the same layer in every repeated block) move
together: one step removes or adds a block in every member, at the sum of their marginal costs
and the mean of their saliencies, so every member keeps the same count.

A ``fit`` (a callable, passed per call) may then lower some counts further, for a consumer of
the plan that accepts only some widths (:class:`hfp_fx.plan.hf_layouts.ConfigFit`: a Hugging Face config
wants ``hidden_size`` to be a multiple of the kept attention heads).  It only removes channels,
the least salient of their groups, so the targets stay met; the groups it names are then
final, and step 3 runs again for the others to use the freed budget.
"""
from __future__ import annotations

import fnmatch
import heapq
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from hfp_fx.plan.cost import CostModel, Counts
from hfp_fx.plan.target import ResolvedTarget

__all__ = ["Plan", "project", "check_feasible", "metrics_of", "InfeasibleTargetError", "uniform_block_classes", "Fit",
           "min_kept_of", "MaxPrune"]

#: the most of a group that may be removed: one fraction for every group, or per pattern
#: ``{pattern: fraction}`` (see :func:`min_kept_of`)
MaxPrune = Union[None, float, Mapping[str, float]]

#: ``fit(kept, allowed) -> {group id: count}``: ``kept`` maps every prunable group id to its
#: planned count, ``allowed(gid, n)`` says whether ``n`` respects the group's ``min_channels`` /
#: ``round_to``; the result lowers (never raises) the counts of the groups it names
Fit = Callable[[Dict[str, int], Callable[[str, int], bool]], Mapping[str, int]]


class InfeasibleTargetError(ValueError):
    """The target is below what fixed groups and ``min_channels`` allow."""


@dataclass
class Plan:
    keep: Dict[str, List[int]]  #: group id -> kept channel indices (only pruned groups)
    counts: Counts  #: exact params/MACs of the planned model (cost model)
    dense: Counts
    target: ResolvedTarget
    kept_per_group: Dict[str, Tuple[int, int]]  #: group id -> (dense, kept)
    latency_ms: Optional[float] = None  #: the latency model's prediction for the plan, if it has one


@dataclass
class _Group:
    gid: str
    cols: torch.Tensor  # cost-model column of each channel, most salient first
    order: torch.Tensor  # channel index of each entry, most salient first
    sal: torch.Tensor  # saliency, descending
    size: int
    lo: int
    step: int
    n: int

    def next_removal(self) -> Optional[Tuple[int, float]]:
        if self.n <= self.lo:
            return None
        new = max(self.lo, self.n - self.step if self.n % self.step == 0 else self.n - self.n % self.step)
        return new, float(self.sal[new:self.n].mean())

    def next_addition(self) -> Optional[Tuple[int, float]]:
        if self.n >= self.size:
            return None
        new = min(self.size, (self.n // self.step + 1) * self.step)
        return new, float(self.sal[self.n:new].mean())


def min_kept_of(groups: Sequence, max_prune: MaxPrune) -> Dict[str, int]:
    """Per group id, the fewest channels ``max_prune`` lets the plan keep (groups not limited: absent).

    ``max_prune`` is the largest fraction of a group that may be removed: a float for every
    group, or ``{pattern: fraction}`` where a pattern names a group by its id (``"g0"``) or
    matches (``fnmatch``) its name, the first module that owns one of its channels
    (``"model.embed_tokens"`` for a Llama's residual stream, ``"*.mlp.*"`` for its MLPs; see
    ``dependency_graph(...).summary()``).  A group several patterns match takes the strictest.  This is the per-axis
    cap of LLM pruners (at most 40% of the residual stream, say), so that neither a learned nor a
    one-shot allocation can strip one kind of layer.

        >>> from types import SimpleNamespace as NS
        >>> gs = [NS(id="g0", name="embed", channels=10, members=[]),
        ...       NS(id="g1", name="layers.0.mlp.up", channels=8, members=[])]
        >>> min_kept_of(gs, {"embed": 0.4, "*.mlp.*": 0.5})
        {'g0': 6, 'g1': 4}
    """
    if max_prune is None:
        return {}
    patterns = {"*": max_prune} if isinstance(max_prune, (int, float)) else dict(max_prune)
    out: Dict[str, int] = {}
    for pattern, fraction in patterns.items():
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"max_prune[{pattern!r}] = {fraction!r} must be a fraction in [0, 1] of the group "
                             "that may be removed")
        matched = [g for g in groups if pattern == g.id or fnmatch.fnmatchcase(g.name, pattern)]
        if not matched:
            names = ", ".join(f"{g.id} ({g.name})" for g in groups[:12])
            raise ValueError(f"max_prune pattern {pattern!r} matches no prunable group; patterns match a group's "
                             f"id or name, e.g. {names}")
        for g in matched:
            # removing at most fraction * n channels keeps at least n - floor(fraction * n)
            lo = g.channels - int(fraction * g.channels + 1e-9)
            out[g.id] = max(out.get(g.id, 0), lo)
    return out


def _lower_limit(size: int, min_channels: int, round_to: int, min_kept: int = 0) -> Tuple[int, int]:
    """(smallest allowed kept count, block size) for a group of ``size`` channels."""
    step = round_to if size >= round_to else size
    lo = min(size, max(min_channels, step, min_kept))
    if lo != size:
        lo = min(size, -(-lo // step) * step)
    return lo, step


def _unit_step(state: List[_Group], unit: List[int], kind: str) -> Optional[Tuple[int, float]]:
    """The next removal/addition of a unit of groups: the first member's new count (members have
    equal sizes and counts), at the mean saliency of the block over the members."""
    steps = [state[i].next_removal() if kind == "removal" else state[i].next_addition() for i in unit]
    if steps[0] is None:
        return None
    return steps[0][0], sum(sal for _, sal in steps) / len(steps)


def metrics_of(cm: CostModel, keep: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every quantity a target can bound, for a keep value per cost-model column."""
    params, macs = cm.evaluate(keep)
    return {"params": params, "macs": macs, "latency": cm.latency(keep)}


#: what raises a group's floor besides min_channels / round_to, for InfeasibleTargetError
_FLOORS = ", and per-group floors: max_prune, a top-k, or what uniform_blocks keeps whole for the config"


def check_feasible(cm: CostModel, groups: Sequence, target: ResolvedTarget, min_channels: int = 1,
                   round_to: int = 1, min_kept: Optional[Mapping[str, int]] = None) -> Counts:
    """Raise :class:`InfeasibleTargetError` unless the target is reachable; return the smallest counts.

    ``min_kept``: per group id, the fewest channels it may keep (:func:`min_kept_of`)."""
    keep = torch.ones(cm.num_units, dtype=torch.float64)
    min_kept = min_kept or {}
    for g in groups:
        lo, _ = _lower_limit(g.channels, min_channels, round_to, min_kept.get(g.id, 0))
        cols = cm.columns(g.units)
        keep[cols[lo:]] = 0.0
    floor = {k: float(v) for k, v in metrics_of(cm, keep).items()}
    dense = {k: float(v) for k, v in metrics_of(cm, torch.ones(cm.num_units, dtype=torch.float64)).items()}
    for name, t in target.items():
        value = floor[name]
        if value > t:
            shown = f"{value:.3f} ms" if name == "latency" else f"{round(value):,} {name}"
            raise InfeasibleTargetError(
                f"target {name}={t:,} is not reachable: with every prunable group at its minimum "
                f"(min_channels={min_channels}, round_to={round_to}{_FLOORS if min_kept else ''}) "
                f"the model still has {shown} "
                f"({100 * value / max(dense[name], 1e-12):.1f}% of dense); fixed groups "
                "and excluded modules set that floor")
    return Counts(int(round(floor["params"])), int(round(floor["macs"])))


def uniform_block_classes(groups: Sequence) -> List[List[str]]:
    """Prunable groups that are the same layer of repeated blocks: their members' names are equal
    once the block indices (``layers.3.``) are blanked, and they have as many channels."""
    classes: Dict[tuple, List[str]] = {}
    for g in groups:
        names = tuple(sorted({(re.sub(r"\.\d+(?=\.)", ".#", m.target), m.dim) for m in g.members}))
        classes.setdefault((g.channels, names), []).append(g.id)
    return [ids for ids in classes.values() if len(ids) > 1]


def _allowed(n: int, lo: int, step: int, size: int) -> int:
    n = max(lo, min(size, n))
    return n if n == size else max(lo, (n // step) * step)


def project(cm: CostModel, groups: Sequence, saliency: Mapping[str, torch.Tensor], target: ResolvedTarget,
            initial: Optional[Mapping[str, int]] = None, min_channels: int = 1, round_to: int = 1,
            cost_power: float = 1.0, tied: Sequence[Sequence[str]] = (), fit: Optional[Fit] = None,
            min_kept: Optional[Mapping[str, int]] = None) -> Plan:
    """Choose kept channels per group so every targeted count is <= its target (see module doc).

    Blocks are ranked by ``saliency / marginal_cost ** cost_power``: 1 trades importance against
    cost (trained HFP gates already encode both), 0 ranks by saliency alone and leaves the cost
    model only the job of meeting the budget (one-shot magnitude pruning, where cost-ranking
    would strip the most expensive layers down to one channel).  ``tied``: classes of group ids
    that keep one count (:func:`uniform_block_classes`).  ``fit``: a :data:`Fit`, applied after
    the add-back step (module doc).  ``min_kept``: per group id, the fewest channels it keeps
    (:func:`min_kept_of`).
    """
    if min_channels < 1 or round_to < 1:
        raise ValueError("min_channels and round_to must be >= 1")
    dense = cm.counts()
    min_kept = min_kept or {}
    # a fit may also ask for multiples per group from the start (ConfigFit.round_to_of): lowering
    # every count afterwards would freeze those groups out of the refill
    round_to_of = dict(getattr(fit, "round_to_of", None) or {})
    state: List[_Group] = []
    for g in groups:
        sal = saliency[g.id].detach().double().reshape(-1)
        order = torch.argsort(-sal, stable=True)
        lo, step = _lower_limit(g.channels, min_channels, math.lcm(round_to, round_to_of.get(g.id, 1)),
                                min_kept.get(g.id, 0))
        n0 = g.channels if initial is None else int(initial.get(g.id, g.channels))
        state.append(_Group(g.id, cm.columns(g.units)[order], order, sal[order], g.channels, lo, step,
                            _allowed(n0, lo, step, g.channels)))
    index = {s.gid: i for i, s in enumerate(state)}
    units: List[List[int]] = []  # groups that move together (a tied class, or one group)
    taken = set()
    for ids in tied:
        members = [index[g] for g in ids if g in index and index[g] not in taken]
        if len(members) > 1:
            n = max(state[i].n for i in members)
            for i in members:
                state[i].n = n
            taken.update(members)
            units.append(members)
    units += [[i] for i in range(len(state)) if i not in taken]
    metrics = target.items()
    all_cols = torch.cat([s.cols for s in state]) if state else torch.zeros(0, dtype=torch.long)
    rank = torch.cat([torch.arange(s.size) for s in state]) if state else torch.zeros(0, dtype=torch.long)
    owner = torch.cat([torch.full((s.size,), i) for i, s in enumerate(state)]) if state else rank

    def keep_vector() -> torch.Tensor:
        n = torch.tensor([s.n for s in state], dtype=torch.long)
        keep = torch.ones(cm.num_units, dtype=torch.float64)
        if state:
            keep[all_cols] = (rank < n[owner]).double()
        return keep

    def evaluate(with_grad: bool = False):
        keep = keep_vector().requires_grad_(with_grad)
        exact = metrics_of(cm, keep)
        values = {name: float(v.detach()) for name, v in exact.items()}
        grads = {}
        if with_grad:
            for name, _ in metrics:
                (g,) = torch.autograd.grad(exact[name], keep, retain_graph=True)
                grads[name] = torch.stack([g[s.cols[0]] for s in state]) if state else g[:0]
        return values, grads

    check_feasible(cm, groups, target, min_channels, round_to, min_kept)

    # 2. remove
    while True:
        values, grads = evaluate(with_grad=True)
        violated = [(name, t) for name, t in metrics if values[name] > t]
        if not violated:
            break
        per_group = torch.zeros(len(state), dtype=torch.float64)
        excess = 0.0
        for name, t in violated:
            per_group += grads[name] / t
            excess += (values[name] - t) / t
        weight = [float(per_group[u].sum()) for u in units]
        heap = []
        for k, u in enumerate(units):
            nxt = _unit_step(state, u, "removal")
            if nxt is not None and weight[k] > 0:
                heap.append((nxt[1] / weight[k] ** cost_power, k))
        if not heap:
            break  # unreachable after the feasibility check, kept as a guard
        heapq.heapify(heap)
        removed = 0.0
        while heap and removed < excess:
            _, k = heapq.heappop(heap)
            new, _ = _unit_step(state, units[k], "removal")
            removed += weight[k] * (state[units[k][0]].n - new)
            for i in units[k]:
                state[i].n = new
            nxt = _unit_step(state, units[k], "removal")
            if nxt is not None:
                heapq.heappush(heap, (nxt[1] / weight[k] ** cost_power, k))

    # 3. add back
    def add_back(blocked: set) -> None:
        while True:
            values, grads = evaluate(with_grad=True)
            best = None
            for k, u in enumerate(units):
                if k in blocked:
                    continue
                nxt = _unit_step(state, u, "addition")
                if nxt is None:
                    continue
                new, sal = nxt
                cost, fits = 0.0, True
                for name, t in metrics:
                    inc = float(grads[name][u].sum()) * (new - state[u[0]].n)
                    if values[name] + inc > t + 1e-6:
                        fits = False
                        break
                    cost += inc / t
                if fits:
                    score = sal / max(cost, 1e-30) ** cost_power
                    if best is None or score > best[0]:
                        best = (score, k, new)
            if best is None:
                break
            _, k, new = best
            old = state[units[k][0]].n
            for i in units[k]:
                state[i].n = new
            trial, _ = evaluate()
            if any(trial[name] > t for name, t in metrics):
                for i in units[k]:
                    state[i].n = old
                blocked.add(k)

    add_back(set())

    # 4. fit: lower what the caller's consumer cannot take, then refill with the other groups
    if fit is not None:
        def allowed(gid: str, n: int) -> bool:
            s = state[index[gid]] if gid in index else None
            return s is not None and _allowed(n, s.lo, s.step, s.size) == n

        wanted = dict(fit({s.gid: s.n for s in state}, allowed))
        for gid, n in wanted.items():
            if not allowed(gid, n) or n > state[index[gid]].n:
                raise ValueError(f"fit asked for {n} channels in group {gid} (planned: "
                                 f"{state[index[gid]].n if gid in index else 'not prunable'}); "
                                 "a fit may only lower counts, to ones min_channels and round_to allow")
            state[index[gid]].n = n
        if any(len({state[i].n for i in u}) > 1 for u in units):
            raise ValueError("fit gave the groups of one uniform_blocks class different counts")
        add_back({k for k, u in enumerate(units) if any(state[i].gid in wanted for i in u)})

    values, _ = evaluate()
    counts = Counts(int(round(values["params"])), int(round(values["macs"])))
    keep = {s.gid: sorted(s.order[: s.n].tolist()) for s in state if s.n < s.size}
    return Plan(keep, counts, dense, target, {s.gid: (s.size, s.n) for s in state},
                values["latency"] if cm.has_latency else None)
