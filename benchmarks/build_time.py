"""Graph-build time of hfp_fx and Torch-Pruning, side by side in one process.

For every torchvision classification model (the same seeded models and inputs as
``vs_torch_pruning.py``), time ``hfp_fx.dependency_graph(model, x)`` and Torch-Pruning's
``DependencyGraph().build_dependency(model, example_inputs=x)`` alternately, ``--reps`` times
each, and keep each tool's best time (the least disturbed by other load).  Only graph building
is timed; pruning, coverage and latency are ``vs_torch_pruning.py``'s job, which runs
Torch-Pruning in subprocesses because its pruning loop can hang.

    python benchmarks/build_time.py                       # all 80 models, best of 3 (about 6 min, 1 thread)
    python benchmarks/build_time.py --models resnet50 mobilenet_v2 --reps 5

Writes ``benchmarks/results/build_time.json`` and prints a table; needs the ``bench`` extra.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import hfp_fx

sys.path.append(str(Path(__file__).resolve().parent))  # its sibling modules, however it is loaded
from vs_torch_pruning import build, err_text, input_size, progress, warmup_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        gc.collect()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_model(name: str, reps: int, tp) -> dict:
    model, x = build(name)
    row = {"model": name, "size": input_size(name)}
    for tool, fn in (("hfp_fx", lambda: hfp_fx.dependency_graph(model, x)),
                     ("torch_pruning", lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row[tool] = best_time(fn, reps)
        except Exception as exc:  # noqa: BLE001 - a sweep records failures and goes on
            row[tool] = None
            row[f"{tool}_error"] = err_text(exc)
    return row


def summarise(rows) -> dict:
    both = [r for r in rows if r["hfp_fx"] is not None and r["torch_pruning"] is not None]
    hfp_total = sum(r["hfp_fx"] for r in both)
    tp_total = sum(r["torch_pruning"] for r in both)
    return {"models": len(rows), "both_built": len(both),
            "hfp_built": sum(r["hfp_fx"] is not None for r in rows),
            "tp_built": sum(r["torch_pruning"] is not None for r in rows),
            "hfp_total_s": hfp_total, "tp_total_s": tp_total, "tp_over_hfp_total": tp_total / hfp_total,
            "median_tp_over_hfp": statistics.median(r["torch_pruning"] / r["hfp_fx"] for r in both),
            "hfp_faster_on": sum(r["hfp_fx"] < r["torch_pruning"] for r in both)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="model names (default: all torchvision classification models)")
    ap.add_argument("--reps", type=int, default=3, help="timed builds per tool and model; the best is kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "build_time.json"))
    args = ap.parse_args(argv)
    try:
        import torch_pruning as tp
    except ImportError:
        ap.error("torch-pruning is not installed: pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if args.models:
        unknown = sorted(set(args.models) - set(names))
        if unknown:
            ap.error(f"unknown models: {unknown}")
        names = [n for n in names if n in args.models]
    with warnings.catch_warnings():  # first-call costs stay out of the first model's time
        warnings.simplefilter("ignore")
        wm, wx = warmup_model()
        hfp_fx.dependency_graph(wm, wx)
        tp.DependencyGraph().build_dependency(wm, example_inputs=wx)

    rows = [time_model(name, args.reps, tp) for name in progress(names, len(names), "build time")]
    summary = summarise(rows)
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "torch_pruning": tp.__version__,
            "hfp_fx": hfp_fx.__version__, "threads": args.threads, "reps": args.reps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")

    for r in rows:
        h, t = r["hfp_fx"], r["torch_pruning"]
        ratio = f"{t / h:5.2f}x" if h and t else "   -  "
        print(f"{r['model']:20s} hfp_fx {h * 1e3 if h else float('nan'):8.1f} ms   "
              f"torch-pruning {t * 1e3 if t else float('nan'):8.1f} ms   TP/hfp {ratio}"
              + (f"   [TP: {r['torch_pruning_error'][:60]}]" if r.get("torch_pruning_error") else ""))
    print(f"\n{summary['both_built']} models built by both: total {summary['hfp_total_s']:.2f} s (hfp_fx) vs "
          f"{summary['tp_total_s']:.2f} s (Torch-Pruning), TP/hfp {summary['tp_over_hfp_total']:.2f}x in total, "
          f"median per model {summary['median_tp_over_hfp']:.2f}x, hfp_fx faster on {summary['hfp_faster_on']}; "
          f"built: hfp_fx {summary['hfp_built']}/{summary['models']}, Torch-Pruning {summary['tp_built']}/"
          f"{summary['models']}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
