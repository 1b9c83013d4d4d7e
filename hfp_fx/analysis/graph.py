"""Step 3 of the flow: prune groups, the user-facing view of the channel analysis.

A *unit* (one union-find class of channel elements, see :mod:`hfp_fx.spaces`) is one prunable
channel.  Units that occur with the same multiplicity in the same parameters and MAC terms are
interchangeable for the cost model, so they form one :class:`PruneGroup` (for a plain conv that
is its output channels plus everything coupled to them).  ``keep`` dictionaries name groups by
``id`` and channels by their index inside the group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx

from hfp_fx.passes.channel_analysis import ChannelFacts, GateSite, MacTerm, MagnitudeSlice
from hfp_fx.analysis.depth import DepthUnit, find_depth_units
from hfp_fx.analysis.viz import summary_table, to_dot, to_networkx

__all__ = ["Member", "PruneGroup", "DependencyGraph"]


def _runs_by_group(group: torch.Tensor) -> Dict[int, Tuple[Tuple[int, int], ...]]:
    """Group index -> the runs ``(start, stop)`` of positions holding it (ascending, adjacent runs
    merged), for one axis; -1 entries skipped.  An axis is a few contiguous blocks, even after a
    concat, so runs are short where the positions are long (every channel of a 1280-wide conv)."""
    n = group.numel()
    if n == 0:
        return {}
    cuts = (torch.nonzero(group[1:] != group[:-1]).flatten() + 1).tolist()
    starts, ends = [0] + cuts, cuts + [n]
    found: Dict[int, List[Tuple[int, int]]] = {}
    for gi, a, b in zip(group[starts].tolist(), starts, ends):
        if gi >= 0:
            found.setdefault(gi, []).append((a, b))
    return {gi: tuple(runs) for gi, runs in found.items()}


def _ranges(runs: Sequence[Tuple[int, int]]) -> str:
    """``((0, 3), (5, 7))`` -> ``"0:3,5:7"``."""
    return ",".join(f"{a}:{b}" for a, b in runs)


@dataclass
class Member:
    """Positions ``offsets`` along ``dim`` of tensor ``target`` belong to the group."""

    target: str  #: parameter/buffer name, e.g. ``layer1.0.conv1.weight``
    dim: int
    runs: Tuple[Tuple[int, int], ...]  #: the positions as ascending ``(start, stop)`` ranges

    @property
    def offsets(self) -> Tuple[int, ...]:
        """The positions, one by one (ascending)."""
        return tuple(p for a, b in self.runs for p in range(a, b))

    @property
    def module(self) -> str:
        return self.target.rsplit(".", 1)[0] if "." in self.target else "(root)"

    def __str__(self) -> str:
        return f"{self.target}[dim {self.dim}: {_ranges(self.runs)}]"


@dataclass
class PruneGroup:
    id: str  #: stable name used in ``keep`` dictionaries, e.g. ``"g3"``
    name: str  #: the first module that owns one of its channels, for humans
    channels: int
    prunable: bool
    reason: Optional[str]
    members: List[Member] = field(default_factory=list)
    reasons: List[str] = field(default_factory=list, repr=False)  #: every reason, when not prunable
    units: torch.Tensor = field(default=None, repr=False)  #: unit id of each channel, in order
    #: the fewest channels the graph itself needs (a ``topk(k)`` over them: k), and why
    floor: int = 1
    floor_reason: Optional[str] = field(default=None, repr=False)

    @property
    def modules(self) -> List[str]:
        seen: Dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.module, None)
        return list(seen)


class DependencyGraph:
    """Prune groups of a traced model, plus the facts the passes need.

    Build it with :func:`hfp_fx.dependency_graph`.
    """

    def __init__(self, facts: ChannelFacts, model_params: int, seconds: float = 0.0):
        self.facts = facts
        self.gm: torch.fx.GraphModule = facts.gm
        self.example_inputs: Tuple[torch.Tensor, ...] = facts.example_inputs
        self.roots = facts.elements.roots()
        self.seconds = seconds
        #: parameters of the user's model that the traced graph never uses (e.g. aux heads in eval
        #: mode); the graph module, the pruned model and the cost model do not contain them
        self.unused_params = model_params - sum(p.numel() for p in self.gm.parameters())
        #: True when the root's forward branches on shapes and was traced with the example's shapes
        self.shape_specialized = False
        #: how the model was captured (``"fx"`` or ``"export"``) and the keyword names of a dict
        #: of example tensors (``None`` for positional ones); ``hfp_fx.save`` records both
        self.capture = "fx"
        self.input_names = None
        self.groups: List[PruneGroup] = []
        self._build_groups()
        self._by_id = {g.id: g for g in self.groups}
        self._depth_units: Optional[List[DepthUnit]] = None

    # -- construction ---------------------------------------------------------------------
    def rows(self) -> List[torch.Tensor]:
        """Every labelled axis that costs something: parameter dims, MAC terms, gate sites."""
        rows = [ids for dims in self.facts.params.values() for ids in dims.values()]
        rows += [r for t in self.facts.macs for r in t.rows]
        rows += [g.ids for g in self.facts.gates]
        return rows

    def _build_groups(self) -> None:
        roots = self.roots
        n = roots.numel()
        # Two units belong to one group when every costed axis holds them equally often: hash
        # each unit's occurrence counts over the rows with two random weights per row (int64
        # arithmetic wraps, which keeps it a hash).  Rows are mostly the same few tensors (a
        # conv's output ids label its weight, bias, BN, MAC terms and gate): hash each distinct
        # tensor once with the sum of its rows' weights, which gives the same sums.
        gen = torch.Generator().manual_seed(1234)
        rows = self.rows()
        h1 = torch.zeros(n, dtype=torch.long)
        h2 = torch.zeros(n, dtype=torch.long)
        seen = torch.zeros(n, dtype=torch.bool)
        if rows:
            w = torch.randint(1, 2 ** 62, (len(rows), 2), generator=gen)
            slot: Dict[int, int] = {}
            distinct: List[torch.Tensor] = []
            for r in rows:
                if id(r) not in slot:
                    slot[id(r)] = len(distinct)
                    distinct.append(r.reshape(-1))
            summed = torch.zeros(len(distinct), 2, dtype=torch.long).index_add_(
                0, torch.tensor([slot[id(r)] for r in rows]), w)
            lengths = torch.tensor([r.numel() for r in distinct])
            elem_units = roots[torch.cat(distinct)]
            h1.index_add_(0, elem_units, summed[:, 0].repeat_interleave(lengths))
            h2.index_add_(0, elem_units, summed[:, 1].repeat_interleave(lengths))
            seen[elem_units] = True
        reasons = self.facts.elements.fixed_units()
        units = torch.nonzero(seen & (roots == torch.arange(n))).flatten()
        fixed = torch.zeros(n, dtype=torch.long)
        for fixed_units in reasons.values():
            fixed[fixed_units] = 1
        # one int64 key per unit: both hashes mixed (odd multiplier, wrapping), lowest bit = fixed
        mixed = h1[units] ^ (h2[units] * -7046029254386353131)
        keys = (mixed & -2) | fixed[units]
        _, inverse = torch.unique(keys, return_inverse=True)
        n_groups = int(inverse.max()) + 1 if units.numel() else 0
        first = torch.full((n_groups,), n, dtype=torch.long).scatter_reduce(0, inverse, units, "amin")
        rank = torch.empty(n_groups, dtype=torch.long)
        rank[torch.argsort(first)] = torch.arange(n_groups)
        gidx = rank[inverse]
        group_of = torch.full((n,), -1, dtype=torch.long)
        group_of[units] = gidx
        by_group = units[torch.argsort(gidx * n + units)]
        sizes = torch.bincount(gidx, minlength=n_groups).tolist()
        ordered = [t for t in torch.split(by_group, sizes)] if n_groups else []
        self._group_of_unit = group_of
        members: List[List[Member]] = [[] for _ in ordered]
        runs_of: Dict[int, Dict[int, Tuple[Tuple[int, int], ...]]] = {}  # id(ids) -> group -> runs
        for name, dims in self.facts.params.items():
            for dim, ids in dims.items():
                if id(ids) not in runs_of:
                    runs_of[id(ids)] = _runs_by_group(group_of[roots[ids.reshape(-1)]])
                for gi, runs in runs_of[id(ids)].items():
                    members[gi].append(Member(name, dim, runs))
        group_reasons: List[set] = [set() for _ in ordered]
        for why, fixed_units in reasons.items():
            for gi in torch.unique(group_of[fixed_units]).tolist():
                if gi >= 0:
                    group_reasons[gi].add(why)
        floors: Dict[int, Tuple[int, str]] = {}
        for ids, count, why in self.facts.floors:
            for gi in torch.unique(group_of[roots[ids.reshape(-1)]]).tolist():
                if gi >= 0 and count > floors.get(gi, (1, ""))[0]:
                    floors[gi] = (count, why)
        for gi, us in enumerate(ordered):
            why = sorted(group_reasons[gi])
            mem = members[gi]
            name = mem[0].module if mem else f"unit{int(us[0])}"
            floor, floor_reason = floors.get(gi, (1, None))
            self.groups.append(PruneGroup(
                id=f"g{gi}", name=name, channels=int(us.numel()), prunable=not why,
                reason=_summarize(why), reasons=why, members=mem, units=us.clone(),
                floor=min(floor, int(us.numel())), floor_reason=floor_reason))

    # -- queries --------------------------------------------------------------------------
    def group(self, gid: str) -> PruneGroup:
        try:
            return self._by_id[gid]
        except KeyError:
            raise KeyError(f"no prune group {gid!r}; groups are {', '.join(g.id for g in self.groups[:8])}, ...") from None

    @property
    def prunable_groups(self) -> List[PruneGroup]:
        return [g for g in self.groups if g.prunable]

    def prunable_fraction(self) -> float:
        """Fraction of channels (units, i.e. group channels) that are in prunable groups."""
        total = sum(g.channels for g in self.groups)
        return sum(g.channels for g in self.prunable_groups) / total if total else 0.0

    def alive(self, keep: Optional[Mapping[str, Iterable[int]]] = None) -> torch.Tensor:
        """Boolean per element: is its unit kept?  ``keep`` maps group id -> kept channel indices."""
        alive = torch.ones(self.roots.numel(), dtype=torch.bool)
        for gid, idx in (keep or {}).items():
            g = self.group(gid)
            if not g.prunable:
                raise ValueError(f"group {gid} ({g.name}) is not prunable: {g.reason}")
            idx = torch.as_tensor(list(idx), dtype=torch.long)
            if idx.numel() == 0:
                raise ValueError(f"keep[{gid!r}] is empty; every group keeps at least one channel")
            if idx.numel() < g.floor:
                raise ValueError(f"keep[{gid!r}] keeps {idx.numel()} channels of {g.name}, but {g.floor_reason}: "
                                 f"keep at least {g.floor}")
            if idx.min() < 0 or idx.max() >= g.channels or torch.unique(idx).numel() != idx.numel():
                raise ValueError(f"keep[{gid!r}] must hold distinct channel indices in [0, {g.channels})")
            alive[g.units] = False
            alive[g.units[idx]] = True
        return alive[self.roots]

    # -- queries: what the cost model, gates, saliency and io read ------------------------------
    # Facts are labelled by channel *element* ids; ``units_of`` turns them into the unit ids
    # that groups (``PruneGroup.units``), ``alive`` and the cost model index.
    @property
    def num_elements(self) -> int:
        return int(self.roots.numel())

    def units_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The unit of each element id (elements united by the analysis share one)."""
        return self.roots[ids]

    @property
    def unit_ids(self) -> torch.Tensor:
        """Every unit, sorted (a unit's id is one of its element ids)."""
        return torch.unique(self.roots)

    def param_dims(self, name: str) -> Dict[int, torch.Tensor]:
        """The element ids bound to each dim of parameter or buffer ``name`` ({} when it has none)."""
        return self.facts.params.get(name, {})

    @property
    def mac_terms(self) -> Tuple[MacTerm, ...]:
        """MAC terms: ``coeff * prod(kept channels of each row)``."""
        return tuple(self.facts.macs)

    @property
    def gate_sites(self) -> Tuple[GateSite, ...]:
        """Where channels are consumed (what ``prepare`` gates and ``calibration`` records)."""
        return tuple(self.facts.gates)

    @property
    def magnitude_slices(self) -> Tuple[MagnitudeSlice, ...]:
        """The weight slices that rank each channel by magnitude."""
        return tuple(self.facts.importance)

    def channel_map(self, node: str):
        """The channels node ``node``'s output carries (a ``ChannelMap``, a tuple of them, or None)."""
        return self.facts.maps.get(node)

    # -- presentation (hfp_fx/analysis/viz.py) ---------------------------------------------------------
    def summary(self, max_members: int = 3, only_prunable: bool = False) -> str:
        """A table of groups: id, channels, member modules, prunable or why not."""
        return summary_table(self, max_members, only_prunable)

    def to_networkx(self):
        """A DiGraph of FX nodes (data flow) and group nodes linked to the modules they touch."""
        return to_networkx(self)

    def to_dot(self) -> str:
        """Graphviz DOT text: ops as boxes, prunable groups in colour, fixed groups grey."""
        return to_dot(self)

    # -- depth ----------------------------------------------------------------------------------
    @property
    def depth_units(self) -> List[DepthUnit]:
        """Residual branches, removable whole (:mod:`hfp_fx.analysis.depth`); found on first use."""
        if self._depth_units is None:
            self._depth_units = find_depth_units(self.gm)
        return self._depth_units

    def split_keep(self, keep: Optional[Mapping[str, Any]]) -> Tuple[Dict[str, Iterable[int]], List[DepthUnit]]:
        """``keep`` as (channels to keep per group id, depth units to remove): a depth unit's id
        maps to ``False`` (remove) or ``True`` (keep)."""
        widths, removed = {}, []
        units = {u.id: u for u in self.depth_units} if any(k not in self._by_id for k in keep or {}) else {}
        for key, value in (keep or {}).items():
            if key in self._by_id or key not in units:
                widths[key] = value
                continue
            unit = units[key]
            if not isinstance(value, bool):
                raise ValueError(f"keep[{key!r}] (depth unit {unit.name}) must be True (keep) or False (remove), "
                                 f"got {value!r}")
            if not value:
                if not unit.removable:
                    raise ValueError(f"depth unit {key} ({unit.name}) cannot be removed: {unit.reason}")
                removed.append(unit)
        return widths, removed

    def groups_of(self, ids: torch.Tensor) -> List[str]:
        """Ids of the groups that own some of these elements (sorted by group index)."""
        gidx = torch.unique(self._group_of_unit[self.roots[ids]]).tolist()
        return [f"g{x}" for x in sorted(gidx) if x >= 0]


def _summarize(reasons: List[str], shown: int = 2) -> Optional[str]:
    if not reasons:
        return None
    text = "; ".join(reasons[:shown])
    return text + (f" (and {len(reasons) - shown} more)" if len(reasons) > shown else "")
