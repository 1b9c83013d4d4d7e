"""Step 4 of the flow: the cost model.

Parameters and MACs of the pruned model are sums of terms ``coeff * prod(L_r)``, one per
parameter tensor and per MAC-producing node, where ``L_r`` is the number of kept positions of a
labelled axis ``r`` (a conv's input channels, a linear's output features, ...).  ``L`` is linear
in the per-unit keep indicators, ``L = A @ keep``, so the whole model is one sparse
matrix-vector product (an ``index_add`` over the incidence triplets) and a gather-multiply-sum: exact for 0/1 keep vectors, differentiable
for soft ones (the HFP loss), and cheap enough to evaluate after every forward pass.

Example::

    >>> import torch, torchvision, hfp_fx
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> cm = CostModel(dg)
    >>> p, m = cm.evaluate(torch.ones(cm.num_units, dtype=torch.float64))
    >>> int(p) == sum(q.numel() for q in torchvision.models.resnet18().parameters())
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["CostModel", "Counts"]


@dataclass(frozen=True)
class Counts:
    params: int
    macs: int

    def __str__(self) -> str:
        return f"params={self.params:,} MACs={self.macs:,}"


def _sum_of_products(coeff: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor,
                     factors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_t coeff[t] * prod_j lengths[rows[t, j]]`` (row -1: the trailing factor 1), each term
    times ``factors[t]`` if given."""
    terms = coeff.to(lengths.dtype) * lengths[rows].prod(dim=1)
    return (terms * factors).sum() if factors is not None else terms.sum()


class CostModel(torch.nn.Module):
    """Params and MACs (and, given a measured :class:`~hfp_fx.plan.latency.LatencyTerms`, latency in
    milliseconds) as functions of a keep value per unit (``dg.groups[i].units``)."""

    def __init__(self, dg, latency=None, removed: Sequence = (), gated: Sequence = ()):
        """``removed``: depth units (``dg.depth_units``) whose branches are gone: their nodes'
        MACs and their own parameters are not counted.  ``gated``: depth units whose terms are
        multiplied by a keep value of their own (``evaluate(keep, depth)``, HFP's depth gates)."""
        super().__init__()
        gone_nodes = {n for u in removed for n in u.nodes}
        gone_params = {n for u in removed for n in u.param_names}
        self.num_depth = len(gated)
        depth_of_node = {n: i for i, u in enumerate(gated) for n in u.nodes}
        depth_of_param = {n: i for i, u in enumerate(gated) for n in u.param_names}
        unit_ids = dg.unit_ids
        self.num_units = unit_ids.numel()
        col_of = torch.full((dg.num_elements,), -1, dtype=torch.long)
        col_of[unit_ids] = torch.arange(self.num_units)
        self.register_buffer("unit_ids", unit_ids, persistent=False)
        rows: List[torch.Tensor] = []
        row_index = {}

        def row(ids: torch.Tensor) -> int:
            key = id(ids)
            if key not in row_index:
                row_index[key] = len(rows)
                rows.append(ids)
            return row_index[key]

        def terms(items) -> Tuple[torch.Tensor, torch.Tensor]:
            # a term multiplies up to three channel counts: a weight is bilinear in its input and
            # output channels, a mixture-of-experts weight (experts, out, in) trilinear
            coeffs, idx = [], []
            for coeff, rs in items:
                r = [row(x) for x in rs]
                if len(r) > 3:
                    raise NotImplementedError(f"a cost term with {len(r)} channel factors (at most 3)")
                coeffs.append(coeff)
                idx.append(r + [-1] * (3 - len(r)))
            return (torch.tensor(coeffs, dtype=torch.float64),
                    torch.tensor(idx, dtype=torch.long).reshape(-1, 3))

        # parameters the traced graph never uses (e.g. aux heads in eval mode) are not in the
        # pruned model either, so they are not counted; see DependencyGraph.unused_params
        param_items, const_params, param_depth = [], 0.0, []
        seen = set()
        for name, p in dg.gm.named_parameters():
            if id(p) in seen or name in gone_params:
                continue
            seen.add(id(p))
            dims = dg.param_dims(name)
            coeff = float(p.numel())
            for d in dims:
                coeff /= p.shape[d]
            if dims or name in depth_of_param:  # (a gated branch's constant term is a term too)
                param_items.append((coeff, [dims[d] for d in sorted(dims)]))
                param_depth.append(depth_of_param.get(name, -1))
            else:
                const_params += coeff
        mac_items, const_macs, mac_depth = [], 0.0, []
        for t in dg.mac_terms:
            if t.node in gone_nodes:
                continue
            if t.rows or t.node in depth_of_node:
                mac_items.append((t.coeff, list(t.rows)))
                mac_depth.append(depth_of_node.get(t.node, -1))
            else:
                const_macs += t.coeff
        pc, pi = terms(param_items)
        mc, mi = terms(mac_items)
        #: the latency model's terms share the rows (channel axes) of params and MACs
        self.has_latency = latency is not None
        kept_terms = [(c, list(rs)) for k, (c, rs) in enumerate(latency.terms)
                      if k >= len(latency.term_nodes) or latency.term_nodes[k] not in gone_nodes] \
            if latency is not None else []
        lc, li = terms(kept_terms)
        self.register_buffer("latency_coeff", lc, persistent=False)
        self.register_buffer("latency_rows", li, persistent=False)
        self.const_latency = float(latency.const - sum(v for n, v in latency.node_const.items() if n in gone_nodes)) \
            if latency is not None else 0.0
        self.register_buffer("param_coeff", pc, persistent=False)
        self.register_buffer("param_rows", pi, persistent=False)
        self.register_buffer("mac_coeff", mc, persistent=False)
        self.register_buffer("mac_rows", mi, persistent=False)
        # the depth gate of each term (-1: none), when units are gated
        self.register_buffer("param_depth", torch.tensor(param_depth, dtype=torch.long), persistent=False)
        self.register_buffer("mac_depth", torch.tensor(mac_depth, dtype=torch.long), persistent=False)
        self.const_params, self.const_macs = const_params, const_macs
        # incidence A[r, u] = how many positions of row r belong to unit u, as coalesced COO
        # triplets in plain dense buffers (DDP broadcasts buffers and cannot send sparse tensors)
        if rows:
            r_idx = torch.cat([torch.full((ids.numel(),), r, dtype=torch.long) for r, ids in enumerate(rows)])
            u_idx = torch.cat([col_of[dg.units_of(ids)] for ids in rows])
            pair = r_idx * self.num_units + u_idx
            uniq, counts = torch.unique(pair, return_counts=True)
        else:
            uniq = counts = torch.zeros(0, dtype=torch.long)
        self.register_buffer("inc_rows", uniq // max(self.num_units, 1), persistent=False)
        self.register_buffer("inc_cols", uniq % max(self.num_units, 1), persistent=False)
        self.register_buffer("inc_vals", counts.to(torch.float64), persistent=False)
        self.num_rows = len(rows)
        self.col_of = col_of

    def columns(self, units: torch.Tensor) -> torch.Tensor:
        """Column of each unit id in the keep vector."""
        return self.col_of[units]

    def row_lengths(self, keep: torch.Tensor) -> torch.Tensor:
        """Kept positions of every row (``A @ keep``), plus a trailing 1 for absent factors."""
        contrib = keep[self.inc_cols] * self.inc_vals.to(keep.dtype)
        L = keep.new_zeros(self.num_rows).index_add(0, self.inc_rows, contrib)
        return torch.cat([L, L.new_ones(1)])  # index -1 -> factor 1

    def evaluate(self, keep: torch.Tensor, depth: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(params, macs)`` for a keep value per unit column (1 = kept) and, for the gated
        depth units, a keep value per unit (1 = kept, 0 = its branch removed)."""
        L = self.row_lengths(keep)
        pf = mf = None
        if depth is not None and self.num_depth:
            d = torch.cat([depth.to(L.dtype), L.new_ones(1)])  # index -1 -> factor 1
            pf, mf = d[self.param_depth], d[self.mac_depth]
        params = _sum_of_products(self.param_coeff, self.param_rows, L, pf) + self.const_params
        macs = _sum_of_products(self.mac_coeff, self.mac_rows, L, mf) + self.const_macs
        return params, macs

    def latency(self, keep: torch.Tensor) -> torch.Tensor:
        """Predicted latency (ms) for a keep value per unit column; 0 without a latency model."""
        if not self.has_latency:
            return keep.new_zeros(())
        return _sum_of_products(self.latency_coeff, self.latency_rows, self.row_lengths(keep)) + self.const_latency

    def counts(self, alive_units: Optional[torch.Tensor] = None) -> Counts:
        """Exact integer counts for a boolean keep per unit column (default: dense)."""
        keep = torch.ones(self.num_units, dtype=torch.float64) if alive_units is None else alive_units.to(torch.float64)
        p, m = self.evaluate(keep)
        return Counts(int(round(float(p))), int(round(float(m))))
