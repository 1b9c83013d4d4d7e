"""Data-aware saliency: rank each prune group's channels by what they do on calibration batches.

Magnitude saliency (:mod:`hfp_fx.plan.saliency`) sees only weights.  The two kinds here run the
traced model (a copy, in eval mode) on a few batches of the user's data:

* ``"activation"`` (Minitron's width importance): a channel's mean ``|x|`` where it is consumed,
  read at the gate sites of the channel analysis (the inputs that mix channels).  Sites whose
  consumer multiplies the channel by a weight slice (a linear or conv layer reading it) are
  preferred, so a transformer's residual stream is scored by the normalised inputs of the
  projections that read it, an MLP neuron by the input of the down projection, a head's
  channels by the attention output entering ``o_proj``; a group read only by weightless ops
  (a norm, a reduction) uses those sites instead.
* ``"taylor"`` (first order): ``|d loss / d g_c|`` for a gate ``g_c = 1`` multiplied into channel
  ``c`` at every site that consumes it, i.e. ``|sum over sites and positions of x * d loss/d x|``,
  the first-order change of the loss when the channel is switched off, averaged over batches.
  The gates are those HFP trains (:func:`hfp_fx.passes.insert_gates`), so a channel of a coupled
  group is scored once, over every layer it feeds.

The loss for ``"taylor"``: ``calibration_loss(output, inputs)`` when given; otherwise the
next-token cross-entropy for a causal language model (integer ``(B, T)`` ids in, ``(B, T, V)``
logits out) and the cross-entropy against the model's own top class for a classifier
(``(B, C)`` logits out).  Scores are divided by their group's mean, as magnitude scores are, so
the budget projection compares channels across groups.

    >>> import torch, torchvision, hfp_fx
    >>> model, x = torchvision.models.resnet18(), torch.randn(2, 3, 64, 64)
    >>> dg = hfp_fx.dependency_graph(model, x)
    >>> scores = data_saliency(dg, [x], "activation")
    >>> g = dg.prunable_groups[0]
    >>> scores[g.id].shape == (g.channels,), round(float(scores[g.id].mean()), 6)
    (True, 1.0)
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.fx
import torch.nn.functional as F

from hfp_fx.analysis.index import PrunableIndex
from hfp_fx.passes.edit import pick_input
from hfp_fx.passes.insert_gates import insert_gates
from hfp_fx.plan.saliency import mean_one, per_group_scores
from hfp_fx.capture.tracing import normalize_inputs

__all__ = ["data_saliency", "DATA_IMPORTANCE_KINDS", "CalibrationLoss"]

DATA_IMPORTANCE_KINDS = ("activation", "taylor")

#: ``loss(output, inputs) -> scalar``: ``output`` what the traced model returns, ``inputs`` the
#: batch as a tuple of tensors (positional, in the order of the example inputs)
CalibrationLoss = Callable[[Any, tuple], torch.Tensor]


def _batches(calibration: Iterable[Any], device: Optional[torch.device]) -> Iterable[tuple]:
    for batch in calibration:
        inputs = normalize_inputs(batch)
        yield tuple(x.to(device) if device is not None and isinstance(x, torch.Tensor) else x for x in inputs)


def _device_of(gm: torch.nn.Module) -> Optional[torch.device]:
    tensor = next((t for t in (*gm.parameters(), *gm.buffers())), None)
    return None if tensor is None or tensor.device.type == "meta" else tensor.device


class _ActivationRecorder(torch.fx.Interpreter):
    """Runs the traced graph and adds each gate site's per-channel mean ``|x|`` into ``scores``."""

    def __init__(self, gm: torch.fx.GraphModule, sites: List, units_of, scores: Dict[bool, torch.Tensor]):
        super().__init__(gm)
        self.units_of, self.scores = units_of, scores
        self.sites_of: Dict[str, List] = {}
        for site in sites:
            self.sites_of.setdefault(site.node, []).append(site)

    def run_node(self, n: torch.fx.Node) -> Any:
        sites = self.sites_of.get(n.name, ())
        args, kwargs = self.fetch_args_kwargs_from_env(n) if sites else ((), {})
        for site in sites:
            x = pick_input(args, kwargs, site.arg)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                continue
            axis = site.axis % x.dim()
            if x.shape[axis] != site.ids.numel():
                continue  # a size the analysis did not see (cannot happen on the example's shapes)
            dims = [d for d in range(x.dim()) if d != axis]
            per_channel = x.detach().abs().double().mean(dims) if dims else x.detach().abs().double()
            self.scores[site.weight is not None].index_add_(0, self.units_of(site.ids), per_channel.cpu())
        return super().run_node(n)


class _ProbeGates(torch.nn.Module):
    """Constant-one gates with a gradient: what :func:`insert_gates` expects of an HFP state."""

    def __init__(self, index: PrunableIndex, device: Optional[torch.device]):
        super().__init__()
        self.index = index
        self.sites = torch.nn.Module()
        self.gates = torch.nn.Parameter(torch.ones(index.num_channels, device=device))

    def vector_index(self, ids: torch.Tensor) -> torch.Tensor:
        return self.index.position_of_elements(ids)

    def forward(self) -> torch.Tensor:
        return torch.cat([self.gates.new_ones(1), self.gates])


def default_loss(output: Any, inputs: tuple) -> torch.Tensor:
    """Next-token cross-entropy (causal LM) or cross-entropy against the top class (classifier)."""
    logits = getattr(output, "logits", output)
    if isinstance(logits, (tuple, list)) and logits and isinstance(logits[0], torch.Tensor):
        logits = logits[0]
    ids = inputs[0] if inputs else None
    if (isinstance(logits, torch.Tensor) and logits.dim() == 3 and isinstance(ids, torch.Tensor)
            and not ids.is_floating_point() and ids.dim() == 2 and ids.shape == logits.shape[:2]):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        return F.cross_entropy(logits.float(), logits.detach().argmax(-1))
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    raise ValueError(f"importance='taylor' needs a loss, and the model's output ({shape}) is neither causal-LM "
                     "logits (B, T, V) for integer ids (B, T) nor classifier logits (B, C): pass "
                     "calibration_loss=lambda output, inputs: <scalar loss>")


def _activation(dg, calibration: Iterable[Any]) -> Dict[str, torch.Tensor]:
    gm = copy.deepcopy(dg.gm).eval()
    # indexed by unit (``dg.units_of`` maps element ids to units); True: sites with a weight
    scores = {weighted: torch.zeros(dg.num_elements, dtype=torch.float64) for weighted in (True, False)}
    recorder = _ActivationRecorder(gm, dg.gate_sites, dg.units_of, scores)
    seen = 0
    with torch.no_grad():
        for inputs in _batches(calibration, _device_of(gm)):
            recorder.run(*inputs)
            seen += 1
    _check_seen(seen)
    return per_group_scores(dg, scores[True] / seen, fallback=scores[False] / seen)


def _taylor(dg, calibration: Iterable[Any], loss_fn: Optional[CalibrationLoss]) -> Dict[str, torch.Tensor]:
    index = PrunableIndex.of(dg)
    device = _device_of(dg.gm)
    probe = _ProbeGates(index, device)
    gm = insert_gates(dg.facts, probe).eval()  # a copy: dg.gm is left as it is
    for p in gm.parameters():
        p.requires_grad_(p is probe.gates)  # only the gates need gradients
    total = torch.zeros(index.num_channels, dtype=torch.float64)
    seen = 0
    for inputs in _batches(calibration, device):
        probe.gates.grad = None
        loss = (loss_fn or default_loss)(gm(*inputs), inputs)
        loss.backward()
        total += probe.gates.grad.detach().double().abs().cpu()
        seen += 1
    _check_seen(seen)
    return {gid: mean_one(s) for gid, s in index.split_per_group(total / seen).items()}


def _check_seen(seen: int) -> None:
    if seen == 0:
        raise ValueError("calibration gave no batch: pass an iterable of example inputs (tensors, tuples or "
                         "dicts shaped like example_inputs), e.g. calibration=[x1, x2]")


def data_saliency(dg, calibration: Iterable[Any], importance: str = "activation",
                  calibration_loss: Optional[CalibrationLoss] = None) -> Dict[str, torch.Tensor]:
    """Per prunable group id, one score per channel (mean 1 within the group); see module doc.

    ``calibration``: an iterable of batches, each shaped like the example inputs the graph was
    traced with (a tensor, a tuple, or a dict of keyword tensors); graphs captured by
    ``torch.export`` are specialised to the example's shapes, so give batches of that shape.
    """
    if importance not in DATA_IMPORTANCE_KINDS:
        raise ValueError(f"data_saliency computes {DATA_IMPORTANCE_KINDS}, got {importance!r}")
    if calibration is None:
        raise ValueError(f"importance={importance!r} needs calibration data: pass calibration=[batch, ...] "
                         "(batches shaped like example_inputs)")
    if importance == "activation":
        if calibration_loss is not None:
            raise ValueError("calibration_loss is used by importance='taylor' only")
        return _activation(dg, calibration)
    return _taylor(dg, calibration, calibration_loss)
