"""HFP training under FSDP2 (``torch.distributed.fsdp.fully_shard``).

A prepared model is one ``GraphModule`` whose graph reads every weight with ``get_attr``: its
submodules are parameter holders that are never called, so FSDP's per-module hooks would never
gather a decoder layer's weights on its own.  :func:`fully_shard` therefore shards the prepared
model as one FSDP unit (parameters, gradients and optimizer state sharded across ranks; the
weights gathered for the forward and backward), and keeps the HFP gates out of it: the
complexity loss reads them between steps, where a sharded parameter would be a ``DTensor``
shard.  The gates stay whole on every rank, their gradients are averaged over the ranks as
they are accumulated, and every rank takes the same optimizer step on them, so they stay equal.

``hfp_fx.finalize`` of a sharded model is a collective: every rank gathers the full weights
(``DTensor.full_tensor``), in the same order, and returns the same plain pruned GraphModule,
ready to be sharded again.  ``examples/fsdp_train.py`` trains one under ``torchrun``;
``tests/test_fsdp.py`` runs it on two CPU ranks (gloo) and checks the widths and the pruned
model against one process trained on the same data.
"""
from __future__ import annotations

from typing import Any

import torch

from hfp_fx.train.hfp import HFPState

__all__ = ["fully_shard", "is_sharded"]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` was sharded with FSDP2's ``fully_shard``."""
    fsdp = getattr(getattr(torch.distributed, "fsdp", None), "FSDPModule", None)
    return fsdp is not None and isinstance(model, fsdp)


def fully_shard(prepared: torch.nn.Module, **fsdp_kwargs: Any) -> torch.nn.Module:
    """Shard a model returned by :func:`hfp_fx.prepare` with FSDP2, its gates replicated.

    ``fsdp_kwargs`` go to ``torch.distributed.fsdp.fully_shard`` (``mesh``,
    ``reshard_after_forward``, ``mp_policy``, ...); ``ignored_params`` is extended with the
    gates.  Needs an initialised process group.  Returns ``prepared``, sharded in place (FSDP2
    changes the module's class), for the optimizer to be built on::

        prepared = hfp_fx.fully_shard(hfp_fx.prepare(model, x, {"params": 0.5}))
        opt = torch.optim.AdamW(prepared.parameters())
        ...  # loss = task + hfp_fx.complexity_loss(prepared); backward; step
        small = hfp_fx.finalize(prepared)  # on every rank: the same plain GraphModule
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if not isinstance(getattr(prepared, "hfp", None), HFPState):
        raise TypeError(f"{type(prepared).__name__} is not a model returned by hfp_fx.prepare; shard the "
                        "prepared model (hfp_fx.fully_shard(hfp_fx.prepare(model, x, target)))")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("hfp_fx.fully_shard needs torch.distributed initialised "
                           "(torch.distributed.init_process_group, e.g. under torchrun)")
    gates = set(prepared.hfp.parameters())
    ignored = set(fsdp_kwargs.pop("ignored_params", None) or ()) | gates
    torch_fully_shard(prepared, ignored_params=ignored, **fsdp_kwargs)
    world = dist.get_world_size()

    def average(param: torch.nn.Parameter) -> None:  # what FSDP's reduce-scatter does for the rest
        if param.grad is not None and world > 1:
            dist.all_reduce(param.grad)
            param.grad.div_(world)

    for gate in gates:
        if gate.requires_grad:
            gate.register_post_accumulate_grad_hook(average)
    return prepared
