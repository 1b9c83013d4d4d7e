"""Model-zoo sweep: build the dependency graph, prune a random half of every group, check exactness.

For every torchvision classification model (80), segmentation model (6) and detection model's
backbone + FPN (12): trace, build prune groups, keep a seeded random 50% of every prunable
group, shrink, run, and compare with the masked reference model.  Prints a table and writes
``benchmarks/results/zoo.json``.

    python benchmarks/zoo.py                      # everything (about 20-30 min on 2 CPU cores)
    python benchmarks/zoo.py --only resnet50 vit_b_16
    python benchmarks/zoo.py --suite classification --limit 10
    python benchmarks/zoo.py --timm                # timm sample: 2 small models per family
                                                   # -> benchmarks/results/zoo_timm.json
    python benchmarks/zoo.py --capture export      # capture with torch.export (ATen graphs)
                                                   # -> benchmarks/results/zoo_export.json
                                                   #    (zoo_timm_export.json with --timm)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import hfp_fx

RESULTS = Path(__file__).resolve().parent / "results"
# models whose forward needs a fixed input resolution
FIXED_224 = ("vit_", "swin_", "maxvit_")


def classification_models():
    return sorted(torchvision.models.list_models(module=torchvision.models))


def segmentation_models():
    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def detection_models():
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


# smaller-first naming conventions in timm; a family's first models by this order are swept
SIZE_HINTS = ("atto", "femto", "pico", "nano", "xxs", "tiny", "xs", "mini", "small", "s0", "b0", "_s", "18", "26")


def _size_rank(name: str):
    hit = [i for i, h in enumerate(SIZE_HINTS) if h in name]
    return (min(hit) if hit else len(SIZE_HINTS), len(name), name)


def timm_models(per_family: int = 2):
    """The ``per_family`` smallest-named architectures of every timm module (family)."""
    import timm

    chosen = []
    for module in timm.list_modules():
        names = sorted(timm.list_models(module=module), key=_size_rank)
        chosen += names[:per_family]
        FAMILY.update((n, module) for n in names[:per_family])
    return chosen


FAMILY = {}  # timm model name -> its timm module (family)


def randomize_zero_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give weight matrices that a model initialises to zero (torchvision's ViT head, some
    layer scales) small random values: an output that does not depend on the pruned channels
    would make any exactness check pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def build(suite: str, name: str):
    """Return (model, example input) for one zoo entry, randomly initialised."""
    if suite == "classification":
        model = randomize_zero_weights(torchvision.models.get_model(name, weights=None))
        size = 224 if name.startswith(FIXED_224) else (128 if name != "inception_v3" else 160)
        return model.eval(), torch.randn(1, 3, size, size)
    if suite == "segmentation":
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
        return model.eval(), torch.randn(1, 3, 128, 128)
    if suite == "timm":
        import timm

        model = randomize_zero_weights(timm.create_model(name, pretrained=False))
        shape = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        return model.eval(), torch.randn(1, *shape)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    size = 320 if "ssd" in name else 128
    return model.backbone.eval(), torch.randn(1, 3, size, size)


def flat_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_tensors(v)]
    return []


def max_rel_error(a, b) -> float:
    errs = []
    for x, y in zip(flat_tensors(a), flat_tensors(b)):
        if x.shape != y.shape:
            return float("inf")
        errs.append(float((x - y).abs().max() / (x.abs().max() + 1e-12)))
    return max(errs) if errs else 0.0


def random_keep(dg, seed: int = 0, ratio: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    return {g.id: sorted(torch.randperm(g.channels, generator=gen)[: max(1, int(g.channels * ratio))].tolist())
            for g in dg.prunable_groups}


def run_one(suite: str, name: str, capture: str = "fx") -> dict:
    row = {"model": name, "suite": suite, "family": FAMILY.get(name, name.split("_")[0]), "capture": capture}
    try:
        torch.manual_seed(0)
        model, x = build(suite, name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = hfp_fx.dependency_graph(model, x, capture=capture)
        row.update(traceable=True, captured_with=dg.capture, seconds=round(dg.seconds, 3), nodes=len(dg.gm.graph.nodes), groups=len(dg.groups),
                   prunable_groups=len(dg.prunable_groups), prunable_fraction=round(dg.prunable_fraction(), 4),
                   mac_mismatch=len(dg.facts.mac_mismatch), opaque=len(dg.facts.opaque),
                   shape_specialized=dg.shape_specialized)
        keep = random_keep(dg)
        dense = hfp_fx.count(model, x)
        masked = hfp_fx.mask(dg, keep=keep).eval()
        small = hfp_fx.shrink(dg, keep=keep).eval()
        pruned = hfp_fx.count(small, x)
        predicted = hfp_fx.CostModel(dg).counts(dg.alive(keep)[hfp_fx.CostModel(dg).unit_ids])
        with torch.no_grad():
            err = max_rel_error(masked(x), small(x))
        row.update(params_dense=dense.params, params_pruned=pruned.params, macs_dense=dense.macs,
                   macs_pruned=pruned.macs, cost_model_exact=(predicted == pruned), max_rel_err=err,
                   exact=bool(err <= 1e-4))
    except hfp_fx.TraceError as exc:
        row.update(exact=False, traceable=False, refused=True, error=f"TraceError: {exc}"[:500])
    except Exception as exc:  # noqa: BLE001 - a sweep reports failures and goes on
        row.update(exact=False, error=f"{type(exc).__name__}: {exc}"[:500])
        if os.environ.get("ZOO_DEBUG"):
            traceback.print_exc()
    gc.collect()
    return row


def _by_reason(rows) -> dict:
    groups = {}
    for r in rows:
        if r.get("exact"):
            continue
        why = r.get("error") or f"max relative error {r.get('max_rel_err')}"
        groups.setdefault(why.splitlines()[0][:160], []).append(r["model"])
    return groups


def report(rows, capture: str = "fx"):
    """Print the table and return the summary of a list of result rows."""
    table = [[r["model"], r.get("nodes"), r.get("groups"), r.get("prunable_groups"),
              f"{100 * r['prunable_fraction']:.0f}%" if "prunable_fraction" in r else "-",
              f"{r['macs_dense'] / 1e6:.0f}M -> {r['macs_pruned'] / 1e6:.0f}M" if "macs_pruned" in r else "-",
              "yes" if r.get("exact") else "NO", r.get("seconds")] for r in rows]
    print(tabulate(table, headers=["model", "nodes", "groups", "prunable", "prunable ch", "MACs dense -> pruned",
                                   "exact", "graph s"], tablefmt="github"))
    secs = [r["seconds"] for r in rows if "seconds" in r]
    summary = {
        "capture": capture, "models": len(rows), "exact": sum(bool(r.get("exact")) for r in rows),
        "cost_model_exact": sum(bool(r.get("cost_model_exact")) for r in rows),
        "traceable": sum(bool(r.get("traceable")) for r in rows),
        "refused_untraceable": sum(bool(r.get("refused")) for r in rows),
        "failed": [r["model"] for r in rows if not r.get("exact") and not r.get("refused")],
        # every failure or refusal by its reason (the error's first line, up to the first colon after the type)
        "not_exact_by_reason": _by_reason(rows),
        "with_opaque_submodules": sum(1 for r in rows if r.get("opaque")),
        "traced_with_example_shapes": sum(1 for r in rows if r.get("shape_specialized")),
        "families": len({r["family"] for r in rows}),
        "graph_seconds_median": statistics.median(secs) if secs else None,
        "graph_seconds_max": max(secs) if secs else None,
        "prunable_fraction_median": statistics.median([r["prunable_fraction"] for r in rows if "prunable_fraction" in r])
        if secs else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
    }
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["all", "classification", "segmentation", "detection", "timm"],
                    default="all", help="'all' is the torchvision zoo; 'timm' sweeps a timm sample")
    ap.add_argument("--timm", action="store_true", help="same as --suite timm")
    ap.add_argument("--per-family", type=int, default=2, help="timm models per family (module)")
    ap.add_argument("--only", nargs="*", help="model names to run")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS, else every core)")
    ap.add_argument("--capture", choices=["fx", "export", "auto"], default="fx",
                    help="how hfp_fx captures each model (the capture= keyword); with 'export' or 'auto' "
                    "the default --out gets a _export / _auto suffix")
    ap.add_argument("--out", default=None, help="default: results/zoo.json (zoo_timm.json with --timm), "
                    "with a _CAPTURE suffix unless --capture fx")
    ap.add_argument("--update", action="store_true", help="rerun only the --only models and replace their rows "
                    "in the existing --out file")
    ap.add_argument("--from-partial", metavar="PATH", help="only summarise the rows of an interrupted run "
                    "(the .partial.json next to --out) into --out")
    args = ap.parse_args(argv)
    if args.timm:
        args.suite = "timm"
    if args.out is None:
        stem = "zoo_timm" if args.suite == "timm" else "zoo"
        args.out = str(RESULTS / (stem + ("" if args.capture == "fx" else f"_{args.capture}") + ".json"))
    if args.from_partial:
        rows = json.loads(Path(args.from_partial).read_text())
        summary = dict(report(rows, rows[0].get("capture", "fx") if rows else args.capture), interrupted=True)
        print(json.dumps(summary, indent=2))
        Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
        return 0
    torch.set_num_threads(args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, os.cpu_count() or 1))
    jobs = []
    if args.suite in ("all", "classification"):
        jobs += [("classification", n) for n in classification_models()]
    if args.suite in ("all", "segmentation"):
        jobs += [("segmentation", n) for n in segmentation_models()]
    if args.suite in ("all", "detection"):
        jobs += [("detection", n) for n in detection_models()]
    if args.suite == "timm":
        jobs += [("timm", n) for n in timm_models(args.per_family)]
    if args.only:
        jobs = [j for j in jobs if j[1] in args.only]
    jobs = jobs[: args.limit]
    rows = []
    partial = Path(args.out).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for i, (suite, name) in enumerate(jobs):
        row = run_one(suite, name, args.capture)
        rows.append(row)
        partial.write_text(json.dumps(rows, indent=1))  # survives an interrupted sweep
        status = "exact" if row.get("exact") else f"FAIL {row.get('error', row.get('max_rel_err'))}"
        print(f"[{i + 1}/{len(jobs)}] {suite}/{name}: {status} "
              f"(graph {row.get('seconds', '-')} s, prunable {row.get('prunable_fraction', '-')})",
              file=sys.stderr, flush=True)
    if args.update:
        fresh = {r["model"]: r for r in rows}
        old = json.loads(Path(args.out).read_text())["rows"]
        rows = [fresh.pop(r["model"], r) for r in old] + list(fresh.values())
    summary = report(rows, args.capture)
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    partial.unlink(missing_ok=True)
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
