"""Magnitude saliency: rank each prune group's channels by the size of their weights.

Which weights belong to which channel is op knowledge, so the op handlers record it during the
channel analysis (``bind_param(..., importance="out" | "in")``, kept as
:class:`~hfp_fx.passes.channel_analysis.MagnitudeSlice` facts): the filters that *produce* a
channel (a conv's or linear's output rows) and the weights that *consume* it (their input
columns).  A channel's score is the mean |w| (``"l1"``) or RMS (``"l2"``) of its producing
slices, summed over producers; a group without producers (e.g. fed by a model input through a
residual stream) is ranked by its consumers.  Scores are divided by their group's mean, so
channels compare across groups.

    >>> import torch, torchvision, hfp_fx
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> scores = magnitude_saliency(dg, "l1")
    >>> g = dg.prunable_groups[0]
    >>> scores[g.id].shape == (g.channels,), round(float(scores[g.id].mean()), 6)
    (True, 1.0)
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

__all__ = ["magnitude_saliency", "IMPORTANCE_KINDS", "mean_one", "per_group_scores", "slice_norms"]

IMPORTANCE_KINDS = ("l1", "l2", "uniform")


def magnitude_saliency(dg, importance: str = "l1",
                       tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Per prunable group id, one score per channel (mean 1 within the group).

    ``tensors`` maps the graph's parameter names to their values (default: the graph's own
    parameters); a lazy mapping, e.g. one that reads a checkpoint from disk, is asked once per
    tensor, so the weights never need to be in memory together."""
    if importance not in IMPORTANCE_KINDS:
        raise ValueError(f"importance must be one of {IMPORTANCE_KINDS}, got {importance!r}")
    if tensors is None:
        tensors = dict(dg.gm.named_parameters(remove_duplicate=False))
    scores = {role: torch.zeros(dg.num_elements, dtype=torch.float64) for role in ("out", "in")}
    slices = sorted(dg.magnitude_slices, key=lambda s: s.param) if importance != "uniform" else ()
    name, w = None, None  # (uniform reads no weight)
    for s in slices:
        if s.param != name:
            name, w = s.param, tensors.get(s.param)
        if w is None:
            continue
        if w.is_meta:
            raise ValueError(f"importance={importance!r} ranks channels by their weights, and `{s.param}` is on "
                             "the meta device (no values): load the weights, or plan without them with "
                             "importance='uniform'")
        scores[s.role].index_add_(0, dg.units_of(s.ids), slice_norms(w, s.dim, importance))
    return per_group_scores(dg, scores["out"], scores["in"], uniform=importance == "uniform")


def slice_norms(w: torch.Tensor, dim: int, importance: str = "l1", chunk_elements: int = 1 << 24) -> torch.Tensor:
    """Per index along ``dim``, the mean ``|w|`` (``"l1"``) or RMS (``"l2"``) of its slice, in
    float64, converted ``chunk_elements`` at a time (a float64 copy of a large embedding would
    take four to eight times its memory)."""
    rows = w.detach().transpose(0, dim)
    n = rows.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    step = max(1, chunk_elements // max(1, rows[0].numel())) if n else 1
    for start in range(0, n, step):
        block = rows[start:start + step].double().cpu().reshape(min(step, n - start), -1)
        out[start:start + step] = block.abs().mean(1) if importance == "l1" else block.pow(2).mean(1).sqrt()
    return out


def mean_one(s: torch.Tensor) -> torch.Tensor:
    """``s`` divided by its mean; all ones where ``s`` has no positive entry (nothing to rank by)."""
    return s / s.mean() if bool((s > 0).any()) else torch.ones_like(s)


def per_group_scores(dg, scores: torch.Tensor, fallback: Optional[torch.Tensor] = None,
                     uniform: bool = False) -> Dict[str, torch.Tensor]:
    """Per prunable group, the per-unit ``scores`` of its channels (``fallback``'s where a group
    has no positive score), divided by their group's mean (:func:`mean_one`)."""
    out = {}
    for g in dg.prunable_groups:
        s = scores[g.units]
        if fallback is not None and not bool((s > 0).any()):
            s = fallback[g.units]
        out[g.id] = mean_one(torch.zeros_like(s) if uniform else s)
    return out
