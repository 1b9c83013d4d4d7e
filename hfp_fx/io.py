"""Saving pruned models without pickled code.

``save(small, path)`` writes one file holding the pruning plan (JSON text) and the state dict;
it is read with ``torch.load(weights_only=True)``, which executes no pickled code.
``load(path, model_factory, example_inputs)`` rebuilds the pruned architecture from the dense
one (same analysis, same plan) and loads the weights.

    >>> import torch, torchvision, hfp_fx, tempfile, os
    >>> x = torch.randn(1, 3, 64, 64)
    >>> small = hfp_fx.prune(torchvision.models.resnet18(), x, "50%")
    >>> path = os.path.join(tempfile.mkdtemp(), "small.hfp.pt")
    >>> hfp_fx.save(small, path)
    >>> again = hfp_fx.load(path, torchvision.models.resnet18, x)
    >>> torch.equal(again.eval()(x), small.eval()(x))
    True
"""
from __future__ import annotations

import json
from typing import Any, Callable, Union

import torch
import torch.fx

from hfp_fx.api import dependency_graph
from hfp_fx.passes.shrink import add_scale_nodes, shrink_model

__all__ = ["save", "load"]

FORMAT = "hfp_fx.pruned/1"


def save(model: torch.fx.GraphModule, path: Union[str, "os.PathLike"]) -> None:
    """Write the plan and weights of a model returned by ``finalize`` or ``prune``."""
    report = getattr(model, "meta", {}).get("hfp") if isinstance(model, torch.fx.GraphModule) else None
    if report is None:
        raise TypeError("hfp_fx.save expects a model returned by hfp_fx.finalize or hfp_fx.prune "
                        "(it carries the pruning plan in model.meta['hfp'])")
    plan = {"format": FORMAT, "keep": report["keep"], "exclude": report.get("exclude", []),
            "scale_sites": report.get("scale_sites", []),
            "groups": {gid: [g["dense"], g["kept"]] for gid, g in report["groups"].items()},
            "achieved": report["achieved"], "dense": report["dense"], "target": report["target"]}
    torch.save({"plan": json.dumps(plan), "state_dict": model.state_dict()}, path)


def load(path, model_factory: Callable[[], torch.nn.Module], example_inputs: Any) -> torch.fx.GraphModule:
    """Rebuild a pruned model saved by :func:`save` from its dense architecture."""
    blob = torch.load(path, weights_only=True, map_location="cpu")
    plan = json.loads(blob["plan"]) if isinstance(blob, dict) and "plan" in blob else {}
    if plan.get("format") != FORMAT:
        raise ValueError(f"{path} is not an hfp_fx pruned-model file (format {plan.get('format')!r})")
    model = model_factory() if callable(model_factory) and not isinstance(model_factory, torch.nn.Module) \
        else model_factory
    dg = dependency_graph(model, example_inputs, exclude=plan["exclude"])
    dense = {g.id: g.channels for g in dg.prunable_groups}
    recorded = {gid: d for gid, (d, _) in plan["groups"].items()}
    if dense != recorded:
        raise ValueError("the model built by model_factory has different prune groups than the saved plan; "
                         "pass the same architecture (and example input shapes) that was pruned")
    keep = {gid: list(idx) for gid, idx in plan["keep"].items()}
    alive = dg.alive(keep)
    small = shrink_model(dg.facts, alive)
    sites = {f"site{k}": s for k, s in enumerate(dg.facts.gates)}
    add_scale_nodes(small, alive, [(name, sites[name], None) for name in plan["scale_sites"]])
    small.load_state_dict(blob["state_dict"], strict=True)
    small.meta["hfp"] = {"keep": keep, "exclude": plan["exclude"], "scale_sites": plan["scale_sites"],
                         "groups": {gid: {"name": gid, "dense": d, "kept": k} for gid, (d, k) in plan["groups"].items()},
                         "achieved": plan["achieved"], "dense": plan["dense"], "target": plan["target"]}
    return small
