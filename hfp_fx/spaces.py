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

__all__ = ["ChannelMap", "ElementTable"]


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


class ElementTable:
    """Union-find over channel elements, with the reasons that fix a class.

    Roots are always the smallest id of their class, so a unit's id orders channels the way the
    first producer laid them out.
    """

    def __init__(self):
        self._parent: List[int] = []
        self._fixes: List[Tuple[torch.Tensor, str]] = []
        self._frozen: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, n: int, fixed_reason: Optional[str] = None) -> torch.Tensor:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        ids = torch.arange(start, start + n, dtype=torch.long)
        if fixed_reason is not None:
            self.fix(ids, fixed_reason)
        return ids

    def _find(self, a: int) -> int:
        parent = self._parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Unite ``a[i]`` with ``b[i]`` for every i (shapes must match)."""
        if a is b:
            return
        if a.shape != b.shape:
            raise ValueError(f"cannot unite channel maps of shapes {tuple(a.shape)} and {tuple(b.shape)}")
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        if pairs.numel() == 0:
            return
        pairs = torch.unique(pairs, dim=0)
        self._frozen = None
        find = self._find
        parent = self._parent
        for x, y in pairs.tolist():
            rx, ry = find(x), find(y)
            if rx != ry:
                if rx < ry:
                    parent[ry] = rx
                else:
                    parent[rx] = ry

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
            find = self._find
            self._frozen = torch.tensor([find(i) for i in range(len(self._parent))], dtype=torch.long)
        return self._frozen

    def fixed_units(self) -> Dict[str, torch.Tensor]:
        """Reason -> the units it fixes (sorted, unique)."""
        roots = self.roots()
        by_reason: Dict[str, List[torch.Tensor]] = {}
        for ids, reason in self._fixes:
            by_reason.setdefault(reason, []).append(roots[ids])
        return {reason: torch.unique(torch.cat(units)) for reason, units in by_reason.items()}
