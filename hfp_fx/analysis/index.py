"""The prunable-channel index space of a dependency graph: one position per prunable channel,
groups in order, with the element and unit ids behind each position (what gates, saliency and
the projection index by)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

__all__ = ["PrunableIndex"]


@dataclass(frozen=True, eq=False)
class PrunableIndex:
    """Where each prunable channel sits: group ids, their offsets, unit ids, element positions."""

    group_ids: Tuple[str, ...]
    offsets: Tuple[int, ...]  #: group ``i`` holds positions ``offsets[i]:offsets[i + 1]``
    units: torch.Tensor  #: unit id of each position
    element_entry: torch.Tensor  #: per element id, ``1 + position`` of its channel; 0 = fixed channel

    @classmethod
    def of(cls, dg) -> "PrunableIndex":
        groups = dg.prunable_groups
        sizes = [g.channels for g in groups]
        offsets = [0] + torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist() if sizes else [0]
        units = torch.cat([g.units for g in groups]) if groups else torch.zeros(0, dtype=torch.long)
        entry_of_unit = torch.zeros(dg.num_elements, dtype=torch.long)
        entry_of_unit[units] = torch.arange(1, units.numel() + 1)
        return cls(tuple(g.id for g in groups), tuple(int(o) for o in offsets), units, entry_of_unit[dg.units_of(torch.arange(dg.num_elements))])

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    @property
    def num_channels(self) -> int:
        return int(self.units.numel())

    def sizes(self) -> torch.Tensor:
        """Channels per group (long)."""
        return torch.tensor([b - a for a, b in zip(self.offsets, self.offsets[1:])], dtype=torch.long)

    def group_of_positions(self) -> torch.Tensor:
        """Per position, the number of its group (long)."""
        return torch.repeat_interleave(torch.arange(self.num_groups), self.sizes())

    def position_of_elements(self, ids: torch.Tensor) -> torch.Tensor:
        """Gate-vector entry of each element id: ``1 + position``, or 0 for a fixed channel."""
        return self.element_entry[ids]

    def group_slice(self, gid: str) -> slice:
        i = self.group_ids.index(gid)
        return slice(self.offsets[i], self.offsets[i + 1])

    def split_per_group(self, vector: torch.Tensor) -> Dict[str, torch.Tensor]:
        """A per-position vector as ``{group id: its slice}`` (views, in group order)."""
        return {gid: vector[self.offsets[i]:self.offsets[i + 1]] for i, gid in enumerate(self.group_ids)}
