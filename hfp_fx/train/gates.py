"""The two kinds of HFP gates (``prepare(gates=...)``), over the prunable-channel index space.

:class:`~hfp_fx.analysis.index.PrunableIndex` is the one place that converts between the index spaces HFP uses:

* **element ids** (``dg.units_of`` maps them to units; gate sites label their positions with them);
* **prunable positions**: every channel of every prunable group, concatenated in group order
  (``dg.prunable_groups``); every per-channel HFP vector (gates, ranks, saliency) is indexed by
  them, and group ``i`` holds positions ``offsets[i]:offsets[i + 1]``;
* **gate-vector entries**: ``1 + position``, with entry 0 the constant 1 that fixed channels
  read (the vector ``prepared.hfp()`` computes once per forward pass).

A gate kind is a small module behind one interface (:class:`GateKind`): its trainable parameter,
which channels the forward pass keeps now, the per-channel multipliers of the forward pass, the
values folded into the weights at ``finalize``, the saliency the budget projection ranks by, and
the keep values the cost model sees.  Each kind's constructor takes only the options that shape
it and refuses the others by name.

    >>> import torch, torchvision, hfp_fx
    >>> dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    >>> index = PrunableIndex.of(dg)
    >>> index.num_groups, index.num_channels, index.offsets[:3]
    (12, 2880, (0, 64, 128))
    >>> gates = ChannelGates(index, threshold=0.1)
    >>> int(gates.kept_channels().sum()), gates.gate_of("g1").shape
    (2880, torch.Size([64]))
    >>> WidthGates(index, torch.zeros(2880, dtype=torch.long), threshold=0.1)
    Traceback (most recent call last):
    ...
    ValueError: gates='width' does not take threshold=0.1 (it shapes per-channel gates: use it with gates='channel')
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import torch

from hfp_fx.analysis.index import PrunableIndex

__all__ = ["GateKind", "WidthGates", "ChannelGates"]


class GateKind(torch.nn.Module):
    """The interface of a gate kind; every per-channel result is indexed by prunable position."""

    kind: ClassVar[str]
    #: what the refusal message says about options this kind does not take
    refusal_hint: ClassVar[str] = ""
    #: re-rank the channels every this many training steps (0: never; widths only)
    rerank_every: int = 0

    def __init__(self, index: PrunableIndex, refused: Mapping[str, Any]):
        super().__init__()
        if refused:
            given = ", ".join(f"{k}={v!r}" for k, v in refused.items())
            raise ValueError(f"gates={self.kind!r} does not take {given}"
                             + (f" ({self.refusal_hint})" if self.refusal_hint else ""))
        self.index = index
        self.register_buffer("group_index", index.group_of_positions(), persistent=False)

    @property
    def trainable(self) -> torch.nn.Parameter:
        """The gate parameter (what ``hfp_fx.gate_parameters`` returns)."""
        raise NotImplementedError

    def kept_channels(self) -> torch.Tensor:
        """Per prunable channel: kept (True) or acting as zero (False) in the forward pass now."""
        raise NotImplementedError

    def effective_gates(self) -> torch.Tensor:
        """Per prunable channel, what the forward pass multiplies it by (exact zeros when removed)."""
        raise NotImplementedError

    def gate_values(self) -> torch.Tensor:
        """Per prunable channel, what ``finalize`` folds into the consuming weights if kept."""
        raise NotImplementedError

    def saliency(self) -> torch.Tensor:
        """Per prunable channel, what the budget projection of ``finalize`` ranks by (kept: higher)."""
        raise NotImplementedError

    def keep_surrogate(self) -> torch.Tensor:
        """Per prunable channel, the keep value the loss's cost model sees: exact forward, surrogate gradient."""
        raise NotImplementedError

    def soft_keep(self) -> torch.Tensor:
        """Per prunable channel, a smooth keep value for reporting (``complexity``'s ``*_soft``)."""
        raise NotImplementedError

    def record_taylor(self, grad: torch.Tensor) -> None:
        """Accumulate the task loss's gradient at the gates, for :meth:`rerank` (kinds that re-rank)."""

    def rerank(self) -> None:
        """Re-rank each group's channels (kinds with a ranking); the others have nothing to do."""


class WidthGates(GateKind):
    """One trainable width per group over a fixed ranking of its channels (``gates="width"``).

    ``rank`` holds each channel's rank within its group (0 = kept longest).  The channels ranked
    below ``round(width * n)`` act as exact zeros; the gradient reaches the width through the
    group's boundary channel (straight-through), see :meth:`position`.

    ``rerank_every=N > 0`` re-ranks each group's channels every ``N`` training steps by their
    first-order (Taylor) importance: the squared gradient of the task loss with respect to each
    channel's gate, averaged over steps (:meth:`record_taylor`; for a removed channel, what
    switching it back on is worth).  The ranking at ``prepare`` (filter magnitude) knows
    nothing of the data; this one follows what the loss needs.
    """

    kind = "width"
    refusal_hint = "it shapes per-channel gates: use it with gates='channel'"

    def __init__(self, index: PrunableIndex, rank: torch.Tensor, *, min_channels: int = 1,
                 min_kept: Optional[torch.Tensor] = None, rerank_every: int = 0, rerank_decay: float = 0.9,
                 **refused: Any):
        super().__init__(index, refused)
        if rank.shape != (index.num_channels,):
            raise ValueError(f"rank needs one entry per prunable channel ({index.num_channels}), got {tuple(rank.shape)}")
        if int(rerank_every) < 0 or not 0.0 <= float(rerank_decay) < 1.0:
            raise ValueError(f"need rerank_every >= 0 and 0 <= rerank_decay < 1, got {rerank_every}, {rerank_decay}")
        self.width = torch.nn.Parameter(torch.ones(index.num_groups))
        # persistent: a reloaded prepared model keeps the ranking its widths were trained with.
        # Integer buffers, so that casting the prepared model (.half()) cannot round them.
        self.register_buffer("rank", rank, persistent=True)
        self.register_buffer("group_size", index.sizes()[self.group_index], persistent=False)
        # per position, the fewest channels its group keeps: min_channels, or a group's max_prune floor
        floor = index.sizes().clamp(max=int(min_channels))
        if min_kept is not None:
            floor = torch.maximum(floor, torch.minimum(min_kept.to(torch.long), index.sizes()))
        self.register_buffer("floor", floor[self.group_index], persistent=False)
        self.rerank_every, self.rerank_decay = int(rerank_every), float(rerank_decay)
        # float64 whatever the model's dtype: squared gradients span many orders of magnitude
        self.register_buffer("taylor", torch.zeros(index.num_channels, dtype=torch.float64), persistent=False)

    def record_taylor(self, grad: torch.Tensor) -> None:
        """Backward hook on the forward pass's gate vector: fold in each channel's d loss / d gate."""
        with torch.no_grad():
            self.taylor.mul_(self.rerank_decay).add_(grad.detach().double().pow(2), alpha=1.0 - self.rerank_decay)

    def rerank(self) -> None:
        """Rank each group's channels by :attr:`taylor` (largest first); ties keep the old order.

        Under ``torch.distributed`` the scores are summed over ranks first, so that every rank
        keeps the same channels."""
        with torch.no_grad():
            scores = self.taylor.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(scores)
            # sort by (group, score descending, old rank): one stable sort per key, least significant first
            order = torch.argsort(self.rank, stable=True)
            order = order[torch.argsort(scores[order], descending=True, stable=True)]
            order = order[torch.argsort(self.group_index[order], stable=True)]
            start = torch.as_tensor(self.index.offsets[:-1], device=order.device)[self.group_index[order]]
            new_rank = torch.empty_like(self.rank)
            new_rank[order] = torch.arange(order.numel(), device=order.device) - start
            self.rank.copy_(new_rank)

    @property
    def trainable(self) -> torch.nn.Parameter:
        return self.width

    def position(self) -> torch.Tensor:
        """Per channel, its group's kept width minus the channel's rank.

        A channel is kept while this is above 0.5.  The forward pass sees widths clipped to
        [0, 1] (and at least ``min_channels`` or the group's ``min_kept``), the gradient passes unclipped, so a width pushed
        past 1 comes straight back under the cost push.

        The gradient reaching a width is divided by the mean group size: a width's gradient is
        its group size times a per-channel one (task and cost alike), so without this the step
        a learning rate gives would grow with the model's widths; with it, one learning rate
        moves widths alike in small and large models.
        """
        mean_size = self.index.num_channels / max(self.index.num_groups, 1)
        width = self.width.double()  # float64 whatever the model's dtype: ranks go to thousands
        w = width.detach() + (width - width.detach()) / mean_size
        w = w + (w.clamp(0, 1) - w).detach()
        n = self.group_size.double()
        floor = self.floor.double()
        kept = w[self.group_index] * n
        # the floor straight-through too: a width held at min_channels still feels both losses
        # (and can grow back) instead of losing its gradient
        kept = kept + (torch.maximum(kept, floor) - kept).detach()
        return kept - self.rank.double()

    def kept_channels(self) -> torch.Tensor:
        return self.position() > 0.5

    def kept_for(self, width: torch.Tensor) -> torch.Tensor:
        """Per channel, whether it would be kept with ``width`` (one value per group) in place of
        the trained widths: the forward pass's rule, without gradients."""
        n = self.group_size.double()
        kept = torch.maximum(width.double().clamp(0, 1)[self.group_index] * n, self.floor.double())
        return kept - self.rank.double() > 0.5

    def effective_gates(self) -> torch.Tensor:
        d = self.position()
        hard = (d > 0.5).to(d.dtype)
        # straight-through on the boundary channel only (0 < d <= 1, one channel per group even
        # when n * width is whole): d task / d width is what fading that one channel in or out
        # is worth, the first-order value of one channel
        window = ((d > 0) & (d <= 1)).to(d.dtype)
        return (hard + (d - d.detach()) * window).to(self.width.dtype)

    def gate_values(self) -> torch.Tensor:
        return self.width.new_ones(self.rank.shape)  # kept channels pass unscaled

    def saliency(self) -> torch.Tensor:
        # as a fraction of the group: untrained widths (all 1) then prune every group alike
        return self.position().detach() / self.group_size.double()

    def keep_surrogate(self) -> torch.Tensor:
        return self.effective_gates()

    def soft_keep(self) -> torch.Tensor:
        return self.position().detach().clamp(0, 1)


class ChannelGates(GateKind):
    """One trainable gate per prunable channel (``gates="channel"``), see :mod:`hfp_fx.train.hfp`.

    ``threshold``: gates ``<= threshold`` act as exact zeros; ``count``: ``"ste"`` (hard counts,
    surrogate gradient) or ``"sigmoid"`` (``sigmoid((g - threshold) / temperature)``);
    ``gate_max``: cap on a kept channel's multiplier; ``cost_power``: spread of the cost push
    (1 = marginal cost, 0 = equal); ``relative_gates``: gates divided by their group's largest.
    """

    kind = "channel"

    def __init__(self, index: PrunableIndex, *, threshold: float = 0.05, count: str = "ste",
                 temperature: float = 0.02, gate_max: Optional[float] = None, cost_power: float = 1.0,
                 relative_gates: bool = False, **refused: Any):
        super().__init__(index, refused)
        if not 0.0 <= cost_power <= 1.0:
            raise ValueError(f"cost_power must be in [0, 1], got {cost_power}")
        if gate_max is not None and not gate_max > threshold:
            raise ValueError(f"gate_max must be above the threshold {threshold}, got {gate_max}")
        if count not in ("ste", "sigmoid"):
            raise ValueError(f"count must be 'ste' or 'sigmoid', got {count!r}")
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self.gate = torch.nn.Parameter(torch.ones(index.num_channels))
        self.threshold, self.count_mode, self.temperature = float(threshold), count, float(temperature)
        self.gate_max = None if gate_max is None else float(gate_max)
        self.cost_power = float(cost_power)
        self.relative_gates = bool(relative_gates)

    @property
    def trainable(self) -> torch.nn.Parameter:
        return self.gate

    def gate_of(self, gid: str) -> torch.Tensor:
        """A view of one group's gates."""
        return self.gate[self.index.group_slice(gid)]

    def scaled_gates(self) -> torch.Tensor:
        """The gates the threshold and the forward pass see.

        Plain gates by default.  With ``relative_gates`` each gate is divided by the largest gate
        of its group: when batch norm follows the consuming layer, shrinking all gates of a group
        together changes nothing the task loss sees, so absolute gate values drift with the cost
        push; relative ones cannot, and the push can only move a group's channels apart.
        """
        if not self.relative_gates or self.gate.numel() == 0:
            return self.gate
        top = torch.zeros(self.index.num_groups, device=self.gate.device, dtype=self.gate.dtype).scatter_reduce(
            0, self.group_index, self.gate, "amax", include_self=False)
        return self.gate / top.clamp(min=torch.finfo(self.gate.dtype).tiny)[self.group_index]

    def kept_channels(self) -> torch.Tensor:
        return self.scaled_gates() > self.threshold

    def gate_values(self) -> torch.Tensor:
        """The gate, capped at ``gate_max`` when set.

        The cap anchors each group's scale: a batch norm after the consuming layer makes a
        uniform shrink of all gates of a group free for the task loss, so without it the gates
        of a group can sink together; with it, channels the task loss needs stay at the cap.
        """
        g = self.scaled_gates()
        return g if self.gate_max is None else g.clamp(max=self.gate_max)

    def effective_gates(self) -> torch.Tensor:
        # A channel is kept while its gate is above the threshold; gates are not mirrored at zero
        # (|g|), so an optimizer overshooting below zero cannot flip a pruned channel back on.
        g = self.gate_values()
        hard = g * (self.scaled_gates() > self.threshold).to(g.dtype)
        return g + (hard - g).detach()  # exact zeros forward, identity gradient below the cap

    def saliency(self) -> torch.Tensor:
        return self.scaled_gates().detach().clamp(min=0)

    def keep_surrogate(self) -> torch.Tensor:
        """Forward: ``1[g > threshold]``; gradient that of ``g / mean(g of kept channels in the group)``
        on kept channels (``count="ste"``), or the sigmoid relaxation (``count="sigmoid"``)."""
        scaled = self.scaled_gates()
        s = scaled.clamp(min=0)
        alive = (scaled > self.threshold).to(s.dtype)
        if self.count_mode == "sigmoid":
            return torch.sigmoid((s - self.threshold) / self.temperature)
        n_groups = self.index.num_groups
        alive_sum = torch.zeros(n_groups, device=s.device, dtype=s.dtype).index_add(0, self.group_index,
                                                                                    (s * alive).detach())
        alive_cnt = torch.zeros(n_groups, device=s.device, dtype=s.dtype).index_add(0, self.group_index, alive)
        mean = (alive_sum / alive_cnt.clamp(min=1)).clamp(min=1e-6)[self.group_index]
        # only kept channels are pushed: a gate already below the threshold is left to the task
        # loss (which may revive it) instead of being driven through zero
        surrogate = s * alive / mean
        if self.cost_power != 1.0:
            surrogate = _CompressSpread.apply(surrogate, self.cost_power)
        return alive + surrogate - surrogate.detach()

    def soft_keep(self) -> torch.Tensor:
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
