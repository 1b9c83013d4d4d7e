"""Saving pruned models without pickled code.

``save(small, path)`` writes one file holding the pruning plan (JSON text) and the state dict;
it is read with ``torch.load(weights_only=True)``, which executes no pickled code.  ``load``
rebuilds the pruned architecture from the dense one (same analysis, same plan) and loads the
weights.  The dense model comes from ``model_factory`` or, for files that record a model spec
(``hfp-fx prune --out``, or ``save(..., model_spec=...)``), from that spec alone; the example
inputs default to zeros of the recorded shapes and dtypes.

    >>> import torch, torchvision, hfp_fx, tempfile, os
    >>> x = torch.randn(1, 3, 64, 64)
    >>> small = hfp_fx.prune(torchvision.models.resnet18(), x, "50%")
    >>> path = os.path.join(tempfile.mkdtemp(), "small.hfp.pt")
    >>> hfp_fx.save(small, path)
    >>> again = hfp_fx.load(path, torchvision.models.resnet18, x)
    >>> torch.equal(again.eval()(x), small.eval()(x))
    True
    >>> hfp_fx.save(small, path, model_spec="torchvision:resnet18")
    >>> torch.equal(hfp_fx.load(path).eval()(x), small(x))
    True
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.fx

from hfp_fx.api import dependency_graph
from hfp_fx.plan.cost import Counts
from hfp_fx.passes.registry import OpRegistry
from hfp_fx.passes.depth import scale_units
from hfp_fx.passes.shrink import scale_buffer, shrink_model
from hfp_fx.plan.projection import Plan
from hfp_fx.plan.report import PruneReport
from hfp_fx.interop.specs import load_spec
from hfp_fx.plan.target import ResolvedTarget

__all__ = ["save", "load", "FORMAT"]

FORMAT = "hfp_fx.pruned/2"
#: files of format 1 name their scale sites ``site{k}``, ``k`` an index into the channel
#: analysis' gate sites (``dg.gate_sites``), and record no input shapes and no model spec
_FORMAT_1 = "hfp_fx.pruned/1"
_PLAN_KEYS = ("keep", "exclude", "scale_sites", "groups", "achieved", "dense", "target")

PathLike = Union[str, os.PathLike]


def save(model: torch.fx.GraphModule, path: PathLike, *, model_spec: Optional[str] = None) -> None:
    """Write the plan and weights of a model returned by ``finalize``, ``prune`` or ``load``.

    ``model_spec`` (e.g. ``"torchvision:resnet18"``, see :mod:`hfp_fx.interop.specs`) records how to
    build the dense model, so that ``load(path)`` needs nothing else; by default the report's
    own (set when the model was loaded from such a file).
    """
    report = getattr(model, "meta", {}).get("hfp") if isinstance(model, torch.fx.GraphModule) else None
    if not isinstance(report, PruneReport):
        raise TypeError("hfp_fx.save expects a model returned by hfp_fx.finalize, hfp_fx.prune or hfp_fx.load "
                        "(it carries the pruning plan in model.meta['hfp'])")
    spec = report.model_spec if model_spec is None else model_spec
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"model_spec must be a string like 'torchvision:resnet18', got {type(spec).__name__}")
    widths = {k: v for k, v in report.keep.items() if k not in report.removed_units}
    plan = {"format": FORMAT, "keep": widths, "removed_units": report.removed_units,
            "depth_scales": report.depth_scales,
            "exclude": report.exclude, "scale_sites": report.scale_sites,
            "groups": {gid: [g.dense, g.kept] for gid, g in report.groups.items()},
            "achieved": _counts(report.achieved), "dense": _counts(report.dense), "target": {**_counts(report.target), "latency_ms": report.target.latency},
            "inputs": [{"shape": list(shape), "dtype": dtype} for shape, dtype in report.inputs],
            "model_spec": spec, "capture": report.capture, "input_names": report.input_names}
    torch.save({"plan": json.dumps(plan), "state_dict": model.state_dict()}, path)


def load(path: PathLike, model_factory: Optional[Callable[[], torch.nn.Module]] = None,
         example_inputs: Any = None, rules: Optional[OpRegistry] = None) -> torch.fx.GraphModule:
    """Rebuild a pruned model saved by :func:`save` from its dense architecture.

    ``rules``: the op handlers the model was pruned with, if not hfp_fx's own.

    ``model_factory`` returns the dense model (or is it); without it the file's model spec
    builds it.  ``example_inputs`` default to zeros of the recorded shapes and dtypes.  Raises
    ``ValueError`` for a file ``save`` did not write, a damaged or modified one, or a dense
    model with other prune groups.
    """
    plan, state = _read(path)
    spec = plan.get("model_spec")
    if model_factory is None:
        if not spec:
            raise ValueError(f"{path} records no model spec (it was saved from Python): pass the dense "
                             "architecture, hfp_fx.load(path, model_factory, example_inputs)")
        model, _ = load_spec(spec)
    elif callable(model_factory) and not isinstance(model_factory, torch.nn.Module):
        model = model_factory()
    else:
        model = model_factory
    if example_inputs is None:
        example_inputs = _recorded_inputs(plan, path)
        names = plan.get("input_names")
        if isinstance(names, list) and len(names) == len(example_inputs):
            example_inputs = dict(zip((str(n) for n in names), example_inputs))
    saved = _saved_plan(plan, path)
    capture = plan.get("capture", "fx")
    if capture not in ("fx", "export"):
        raise _damaged(path, f"it records an unknown capture {capture!r}")
    dg = dependency_graph(model, example_inputs, exclude=plan["exclude"], rules=rules, capture=capture)
    dense = {g.id: g.channels for g in dg.prunable_groups}
    if dense != {gid: d for gid, (d, _) in saved.kept_per_group.items()}:
        shapes = ", ".join(str(list(s["shape"])) for s in plan.get("inputs") or [])
        raise ValueError("the dense model has different prune groups than the saved plan; pass the same "
                         "architecture (and example input shapes) that was pruned"
                         + (f" (the file records input shapes {shapes})" if shapes else ""))
    alive = dg.alive(saved.keep)
    scale_sites = _scale_site_names(plan, dg, state, path)
    sites = {s.name: s for s in dg.gate_sites}
    removed = _removed_units(plan, dg, path)
    small = shrink_model(dg.facts, alive, scales=[(name, sites[name], None) for name in scale_sites], removed=removed)
    depth_scales = {str(k): float(v) for k, v in (plan.get("depth_scales") or {}).items()}
    if depth_scales:
        units = {u.id: u for u in dg.depth_units}
        if any(uid not in units for uid in depth_scales):
            raise _damaged(path, f"its depth_scales name units {sorted(set(depth_scales) - set(units))} "
                                 "the model does not have")
        scale_units(small, [(units[uid], f) for uid, f in depth_scales.items()], fold=False)
    _check_weights(small, state, path)
    small.load_state_dict(state, strict=True)
    small.meta["hfp"] = PruneReport.of(dg, saved, scale_sites=scale_sites, exclude=plan["exclude"], model_spec=spec,
                                       removed_units={u.id: u.name for u in removed}, depth_scales=depth_scales)
    return small


def _removed_units(plan: Dict[str, Any], dg, path: PathLike) -> List:
    """The depth units the saved model removed, as this dense model's units (same ids and names)."""
    saved = plan.get("removed_units") or {}
    if not isinstance(saved, dict):
        raise _damaged(path, "its removed_units is not a mapping")
    units = {u.id: u for u in dg.depth_units} if saved else {}
    removed = []
    for uid, name in saved.items():
        unit = units.get(uid)
        if unit is None or unit.name != name or not unit.removable:
            raise ValueError(f"the saved model removed depth unit {uid} ({name}), which the dense model does not have "
                             "as a removable branch; pass the same architecture that was pruned")
        removed.append(unit)
    return removed


def _counts(c) -> Dict[str, Optional[int]]:
    return {"params": c.params, "macs": c.macs}


def _damaged(path: PathLike, what: str) -> ValueError:
    return ValueError(f"{path}: {what}; the file was modified or damaged (write it again with hfp_fx.save)")


def _read(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    try:
        blob = torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch.load makes of a foreign file
        cause = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
        raise ValueError(f"{path} is not an hfp_fx pruned-model file (torch.load cannot read it: {cause})") from exc
    text = blob.get("plan") if isinstance(blob, dict) else None
    try:
        plan = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        plan = None
    if not isinstance(plan, dict):
        raise ValueError(f"{path} is not an hfp_fx pruned-model file (it holds no pruning plan)")
    if plan.get("format") not in (FORMAT, _FORMAT_1):
        raise ValueError(f"{path} is not an hfp_fx pruned-model file (format {plan.get('format')!r}; "
                         f"this version reads {FORMAT} and {_FORMAT_1})")
    missing = [k for k in _PLAN_KEYS if k not in plan]
    if missing:
        raise _damaged(path, f"the pruning plan lacks {missing}")
    state = blob.get("state_dict")
    if not isinstance(state, dict):
        raise _damaged(path, "it holds no state dict")
    return plan, state


def _saved_plan(plan: Dict[str, Any], path: PathLike) -> Plan:
    try:
        keep = {str(gid): [int(i) for i in idx] for gid, idx in plan["keep"].items()}
        groups = {str(gid): (int(d), int(k)) for gid, (d, k) in plan["groups"].items()}
        saved = Plan(keep, Counts(int(plan["achieved"]["params"]), int(plan["achieved"]["macs"])),
                     Counts(int(plan["dense"]["params"]), int(plan["dense"]["macs"])),
                     ResolvedTarget(*(None if plan["target"][k] is None else int(plan["target"][k])
                                      for k in ("params", "macs")),
                                    None if plan["target"].get("latency_ms") is None
                                    else float(plan["target"]["latency_ms"])), groups)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise _damaged(path, f"its pruning plan is malformed ({type(exc).__name__}: {exc})") from exc
    for gid, (dense, kept) in groups.items():
        if kept != len(keep.get(gid, range(dense))):
            raise _damaged(path, f"group {gid} keeps {kept} channels by its count and "
                                 f"{len(keep.get(gid, range(dense)))} by its keep list")
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise _damaged(path, f"its keep list names groups {unknown} that the plan does not have")
    return saved


def _recorded_inputs(plan: Dict[str, Any], path: PathLike) -> Tuple[torch.Tensor, ...]:
    recorded = plan.get("inputs")
    if not recorded:
        raise ValueError(f"{path} records no example input shapes (saved by an older hfp_fx): "
                         "pass example_inputs, hfp_fx.load(path, model_factory, example_inputs)")
    inputs = []
    for item in recorded:
        dtype = getattr(torch, str(item.get("dtype")), None) if isinstance(item, dict) else None
        if not isinstance(dtype, torch.dtype) or not isinstance(item.get("shape"), list):
            raise _damaged(path, f"a recorded example input is malformed: {item!r}")
        inputs.append(torch.zeros([int(d) for d in item["shape"]], dtype=dtype))
    return tuple(inputs)


def _scale_site_names(plan: Dict[str, Any], dg, state: Dict[str, torch.Tensor], path: PathLike) -> List[str]:
    """The plan's scale sites as ``GateSite.name``; format-1 names (``site{k}``) are mapped, and
    their buffers in ``state`` renamed to match."""
    names = [str(n) for n in plan["scale_sites"]]
    if plan["format"] == _FORMAT_1:
        by_old = {f"site{k}": site.name for k, site in enumerate(dg.gate_sites)}
        for old in names:
            if old in by_old and scale_buffer(old) in state:
                state[scale_buffer(by_old[old])] = state.pop(scale_buffer(old))
        names = [by_old.get(n, n) for n in names]  # an unknown old name is refused below
    known = {site.name for site in dg.gate_sites}
    if any(n not in known for n in names):
        raise _damaged(path, f"scale sites {[n for n in names if n not in known]} do not exist in this model")
    return names


def _check_weights(small: torch.nn.Module, state: Dict[str, Any], path: PathLike) -> None:
    expected = small.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__} "
              f"in the file, {tuple(v.shape)} in the model" for k, v in expected.items()
              if k in state and not (isinstance(state[k], torch.Tensor) and state[k].shape == v.shape)]
    problems = [f"{label} {items[:5]}" + (f" (+{len(items) - 5})" if len(items) > 5 else "")
                for label, items in (("missing weights", missing), ("unexpected weights", unexpected),
                                     ("wrong shapes", shapes)) if items]
    if problems:
        raise _damaged(path, "its weights do not fit the architecture its plan describes: " + "; ".join(problems))
