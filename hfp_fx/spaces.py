"""Step 2 of the flow: channel *elements*, the atoms prune groups are made of.

Every position along the channel axis of every traced tensor is labelled with an integer
*element* id.  Sources (a conv's or linear's output features, a model input, the output of an
op we do not understand) create fresh elements; coupling rules *unite* elements that must live
or die together (the two operands of a residual add, the input and output of a depthwise conv,
the members of one attention head, ...).  After the analysis, each union-find class is a
*unit*: one prunable channel.  Units that touched something we cannot prune exactly carry the
reasons why and are *fixed*.

A tensor's channel labelling is a :class:`ChannelMap`: the axis that carries channels and one
element id per position along it.  A position may repeat an id (``flatten`` before a linear
layer maps channel ``c`` to ``H*W`` consecutive features), and ids may appear in any order
(``cat``, channel shuffle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["ChannelMap", "IndexValues", "ElementTable"]


@dataclass
class ChannelMap:
    """Which element each position along ``axis`` of a tensor belongs to."""

    axis: int  #: non-negative dimension index
    ids: torch.Tensor  #: int64, one element id per position along ``axis``

    def __post_init__(self):
        if self.axis < 0:
            raise ValueError("ChannelMap.axis must be non-negative")

    @property
    def size(self) -> int:
        return int(self.ids.numel())

    def moved(self, axis: int) -> "ChannelMap":
        return ChannelMap(axis, self.ids)


@dataclass
class IndexValues:
    """A tensor whose *values* are positions along the channels ``ids``: the expert indices a
    mixture-of-experts router's ``topk`` picks.  Pruning renumbers them among the kept
    channels, which only the ops that know it (``sort``, ``histc``, views) may read."""

    ids: torch.Tensor


class ElementTable:
    """Equivalence classes of channel elements, with the reasons that fix a class.

    ``union`` only records pairs; the classes are resolved once, in :meth:`roots`, by a
    vectorised connected-components pass (the rules never ask for a class while they run).
    Roots are always the smallest id of their class, so a unit's id orders channels the way the
    first producer laid them out.
    """

    def __init__(self):
        self._count = 0
        self._pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._fixes: List[Tuple[torch.Tensor, str]] = []
        self._frozen: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self._count

    def new(self, n: int, fixed_reason: Optional[str] = None) -> torch.Tensor:
        start = self._count
        self._count += n
        self._frozen = None
        ids = torch.arange(start, start + n, dtype=torch.long)
        if fixed_reason is not None:
            self.fix(ids, fixed_reason)
        return ids

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every i (shapes must match)."""
        if a is b:
            return
        if a.shape != b.shape:
            raise ValueError(f"cannot unite channel maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        a, b = a.reshape(-1), b.reshape(-1)
        differ = a != b
        if bool(differ.any()):
            self._pairs.append((a[differ], b[differ]))
            self._frozen = None

    def union_along(self, ids: torch.Tensor, dims: Tuple[int, ...]) -> None:
        """Unite all entries of ``ids`` that differ only in the coordinates ``dims``."""
        if not dims:
            return
        keep = [d for d in range(ids.dim()) if d not in dims]
        flat = ids.permute(*keep, *dims).reshape(-1, int(torch.tensor([ids.shape[d] for d in dims]).prod()))
        first = flat[:, :1].expand_as(flat)
        self.union(first.contiguous(), flat.contiguous())

    def fix(self, ids: torch.Tensor, reason: str) -> None:
        """Mark the classes of ``ids`` unprunable, explaining why."""
        if ids.numel():
            self._fixes.append((ids.reshape(-1), reason))

    # -- after the analysis -------------------------------------------------------------
    def roots(self) -> torch.Tensor:
        """``roots()[e]`` is the unit (smallest element of the class) of element ``e``."""
        if self._frozen is None:
            self._frozen = _smallest_in_component(self._count, self._pairs)
        return self._frozen

    def fixed_units(self) -> Dict[str, torch.Tensor]:
        """Reason -> the units it fixes (sorted, unique)."""
        roots = self.roots()
        by_reason: Dict[str, List[torch.Tensor]] = {}
        for ids, reason in self._fixes:
            by_reason.setdefault(reason, []).append(roots[ids])
        return {reason: torch.unique(torch.cat(units)) for reason, units in by_reason.items()}


def _smallest_in_component(n: int, pairs: List[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """For nodes ``0..n-1`` and the edges in ``pairs``: each node's smallest connected node.

    Label propagation with hooking and pointer jumping: every label is a node of the same
    component and only decreases; the roots (``label[r] == r``) of an edge's two ends are
    hooked onto the smaller one, then every node jumps to its root.  At the fixed point both
    ends of every edge share a label, and it is the component's minimum (that node can only
    label itself).  Rounds are O(log n) in practice, each a few vector ops over the edges.
    """
    label = torch.arange(n, dtype=torch.long)
    if not pairs:
        return label
    u = torch.cat([a for a, _ in pairs])
    v = torch.cat([b for _, b in pairs])
    while True:
        lu, lv = label[u], label[v]
        low = torch.minimum(lu, lv)
        hooked = label.scatter_reduce(0, lu, low, "amin").scatter_reduce(0, lv, low, "amin")
        while True:  # pointer jumping until every node points at a root
            jumped = hooked[hooked]
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, label):
            return label
        label = hooked
