"""Latency of rewritten models: dense vs ``hfp_fx.prune`` at several MACs or latency targets.

For each model and target (``--kinds macs latency``: a MACs fraction, or a fraction of the dense
model's measured latency, which ``hfp_fx`` meets with its measured latency model), prune
one-shot (L1 saliency, exact global projection) and time
dense and pruned models (fixed threads, warm-up; ``hfp_fx.plan.latency.paired_times``) in ``--rounds``
pairs of short alternating blocks, so that the machine's drift hits both alike: latency is the
median (± IQR) over rounds, the speed-up the median of the per-round ratios.  Reports the MACs ratio, the
measured speed-up and the *latency efficiency* = speed-up / (dense MACs / pruned MACs): 1.0
means the pruned model is exactly as much faster as it is smaller.  ``--round-to 1 8 16`` shows
what hardware-friendly widths do.

    python benchmarks/latency.py                          # defaults below, CPU
    python benchmarks/latency.py --quick                  # two small models, batch 1
    python benchmarks/latency.py --models resnet50 mobilenet_v2 --targets 0.5 --batch 1 32
    python benchmarks/latency.py --channels-last --compile --device cuda --dtype float16
    python benchmarks/latency.py --kinds macs latency --targets 0.5 --batch 1 --threads 2 \\
        --models resnet50 mobilenet_v2 --out benchmarks/results/latency_target.json

Writes ``benchmarks/results/latency.json``, ``latency.md`` and ``latency.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import hfp_fx
from hfp_fx.plan.latency import LatencyOptions, paired_times

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "convnext_tiny",
                  "vit_b_16", "regnet_y_1_6gf"]


def progress(iterable, total, desc):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not sys.stderr.isatty())
    except ImportError:
        return iterable


def paired_measure(dense, dense_x, pruned, pruned_x, rounds: int, min_run_time: float) -> dict:
    """Dense and pruned timed in ``rounds`` pairs of short alternating blocks
    (:func:`hfp_fx.plan.latency.paired_times`): drift of the machine's speed hits both alike, and
    the speed-up is the median of the per-round ratios."""
    dense_t, pruned_t = paired_times(dense, pruned, (dense_x,), (pruned_x,), rounds=rounds, block=min_run_time)
    out = {}
    for name, ts in (("dense", dense_t), ("pruned", pruned_t)):
        ts = [t * 1e3 for t in ts]
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        out[f"{name}_ms"], out[f"{name}_iqr_ms"], out[f"{name}_rounds_ms"] = statistics.median(ts), q[2] - q[0], ts
    out["speedup"] = statistics.median(d / p for d, p in zip(dense_t, pruned_t))
    return out


def measured_row(model, small, report, x, prune_s: float, args, base: dict) -> dict:
    """``base`` plus the paired timing of ``small`` against ``model`` at ``x``, the MACs/params
    ratios and, for a latency target, what the library predicted and measured."""
    dm, dx = prepare_for_timing(model, x, args.channels_last, args.compile, args.device, args.dtype)
    sm, sx = prepare_for_timing(small, x, args.channels_last, args.compile, args.device, args.dtype)
    timing = paired_measure(dm, dx, sm, sx, args.rounds, args.min_run_time)
    dense_c, small_c = hfp_fx.count(model, x[:1]), hfp_fx.count(small, x[:1])
    row = {**base, "macs_ratio": small_c.macs / dense_c.macs, "params_ratio": small_c.params / dense_c.params,
           **timing, "latency_ratio": 1 / timing["speedup"],
           "efficiency": timing["speedup"] * small_c.macs / dense_c.macs, "prune_seconds": prune_s}
    lat = report.latency if report is not None else None
    if lat is not None:  # what the library predicted and measured, vs this script's own measurement
        row.update(predicted_ratio=lat.predicted_ms / lat.dense_ms, library_measured_ratio=lat.measured_ratio,
                   corrections=lat.corrections, latency_model_seconds=lat.model_seconds,
                   prediction_error=(lat.predicted_ms / lat.dense_ms) / row["latency_ratio"] - 1)
    return row


def matched_row(model, macs_row: dict, x, round_to: int, args) -> dict:
    """A latency target at the latency the MACs-targeted model measured: how much more of the
    model (MACs) a latency-aware allocation keeps at the same speed."""
    goal = macs_row["latency_ratio"]
    small, report, prune_s = prune_for(model, "latency", goal, round_to, x, args)
    base = {"model": macs_row["model"], "kind": "matched", "target": goal, "matched_to": macs_row["target"],
            "round_to": round_to, "batch": macs_row["batch"]}
    if small is None:
        return {**base, "infeasible": report}
    row = measured_row(model, small, report, x, prune_s, args, base)
    row["macs_kept_vs_macs_target"] = row["macs_ratio"] / macs_row["macs_ratio"]
    print(f"{row['model']} latency={goal:.3f} (matched to MACs {macs_row['target']:.0%}) batch={row['batch']}: "
          f"ratio {row['latency_ratio']:.3f}, MACs {row['macs_ratio']:.3f} = "
          f"{row['macs_kept_vs_macs_target']:.2f}x the MACs-targeted model's", file=sys.stderr, flush=True)
    return row


def prune_for(model, kind: str, target: float, round_to: int, x, args, depth: bool = False):
    """``(pruned, report, seconds)``, or ``(None, reason, 0)`` when the target is infeasible."""
    options = LatencyOptions(variants=args.latency_variants, rounds=args.rounds, min_run_time=args.min_run_time)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        try:
            small = hfp_fx.prune(model, x, {kind: target}, round_to=round_to, latency_options=options, depth=depth)
        except hfp_fx.InfeasibleTargetError as exc:  # e.g. ViT below its fixed-channel floor
            return None, str(exc), 0.0
    return small, small.meta["hfp"], time.perf_counter() - t0


def prepare_for_timing(model, x, channels_last: bool, compile_: bool, device: str, dtype: str = "float32"):
    # a copy: the caller prunes and counts the float32 model again for the next batch
    model, x = copy.deepcopy(model).eval().to(device, getattr(torch, dtype)), x.to(getattr(torch, dtype))
    if channels_last and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    return model, x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--targets", nargs="*", type=float, default=[0.7, 0.5, 0.3], help="fractions of dense")
    ap.add_argument("--kinds", nargs="*", choices=["macs", "latency"], default=["macs"],
                    help="what the targets bound: MACs, or the measured latency (hfp_fx's latency model)")
    ap.add_argument("--matched", action="store_true",
                    help="after each MACs row, prune to the latency that model measured (a 'matched' row)")
    ap.add_argument("--latency-variants", type=int, default=8, help="shrunk models the latency model times")
    ap.add_argument("--batch", nargs="*", type=int, default=[1, 32])
    ap.add_argument("--round-to", nargs="*", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--min-run-time", type=float, default=0.05, help="seconds of timed runs per block")
    ap.add_argument("--rounds", type=int, default=30, help="pairs of alternating dense/pruned blocks per row")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="dtype of the timed models (pruned in float32 first)")
    ap.add_argument("--depth", nargs="*", choices=["off", "on"], default=["off"],
                    help="on: prune(..., depth=True), which may also remove residual branches (MACs targets)")
    ap.add_argument("--quick", action="store_true", help="resnet18 + mobilenet_v2, batch 1, 50%% only")
    ap.add_argument("--out", default=str(RESULTS / "latency.json"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out and measure the rest")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.targets, args.batch, args.round_to, args.min_run_time = \
            ["resnet18", "mobilenet_v2"], [0.5], [1], [1, 8], 0.02
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    if args.resume and Path(args.out).exists():
        rows = json.loads(Path(args.out).read_text())["rows"]
    done = {(r["model"], r.get("kind", "macs"), r["target"], r["round_to"], r.get("depth", False)) for r in rows}
    jobs = [(m, k, t, r, d == "on") for m in args.models for k in args.kinds for t in args.targets
            for r in args.round_to for d in args.depth if (m, k, t, r, d == "on") not in done]
    meta = {"torch": torch.__version__, "device": args.device, "threads": args.threads,
            "channels_last": args.channels_last, "compile": args.compile, "dtype": args.dtype, "rounds": args.rounds,
            "min_run_time": args.min_run_time,
            "cpu": (os.uname().machine if hasattr(os, "uname") else ""), "complete": False}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for name, kind, target, round_to, depth in progress(jobs, len(jobs), "latency"):
        model = torchvision.models.get_model(name, weights=None).eval().to(args.device)
        size = 224
        small = None
        for batch in args.batch:
            x = torch.randn(batch, 3, size, size, device=args.device)
            # a MACs plan does not depend on the batch; a latency plan is measured at its batch
            if small is None or kind == "latency":
                small, report, prune_s = prune_for(model, kind, target, round_to, x[:1] if kind == "macs" else x, args,
                                                   depth)
                if small is None:
                    rows.append({"model": name, "kind": kind, "target": target, "round_to": round_to, "batch": batch,
                                 "infeasible": report})
                    print(f"{name} {kind}={target:.0%} round_to={round_to}: infeasible ({report})", file=sys.stderr)
                    break
            row = measured_row(model, small, report, x, prune_s, args,
                               {"model": name, "kind": kind, "target": target, "round_to": round_to, "batch": batch,
                                "depth": depth, "removed_units": list(report.removed_units.values())})
            rows.append(row)
            print(f"{name} {kind}={target:.0%} depth={depth} round_to={round_to} batch={batch}: {row['dense_ms']:.1f} -> "
                  f"{row['pruned_ms']:.1f} ms (ratio {row['latency_ratio']:.3f}), MACs {row['macs_ratio']:.3f}, "
                  f"efficiency {row['efficiency']:.2f}", file=sys.stderr, flush=True)
            if kind == "macs" and args.matched:
                rows.append(matched_row(model, row, x, round_to, args))
        write()  # after every model: an interrupted run keeps what it measured
    meta["complete"] = True
    write()
    md = write_markdown(rows, meta, Path(args.out).with_suffix(".md"))
    print(md)
    plot(rows, Path(args.out).with_suffix(".png"))
    return 0


def write_markdown(rows, meta, path: Path) -> str:
    from tabulate import tabulate

    skipped = [r for r in rows if "infeasible" in r]
    rows = [r for r in rows if "infeasible" not in r]

    def predicted(r):
        return f"{r['predicted_ratio']:.3f}" if "predicted_ratio" in r else ""

    table = [[r["model"], r.get("kind", "macs") + (f" +depth ({len(r.get('removed_units', []))} units)"
                                                   if r.get("depth") else ""),
              f"{r['target']:.0%}", r["round_to"], r["batch"],
              f"{r['macs_ratio']:.3f}", f"{r['dense_ms']:.1f} ± {r['dense_iqr_ms']:.1f}",
              f"{r['pruned_ms']:.1f} ± {r['pruned_iqr_ms']:.1f}", f"{1 / r['speedup']:.3f}", predicted(r),
              f"{r['speedup']:.2f}x", f"{r['efficiency']:.2f}"] for r in rows]
    text = (f"Device {meta['device']}, {meta['threads']} threads, torch {meta['torch']}, channels_last="
            f"{meta['channels_last']}, compile={meta['compile']}, dtype={meta.get('dtype', 'float32')}, "
            f"{meta.get('rounds', 1)} alternating rounds. Latency: median ± IQR over rounds; latency ratio: "
            "median of per-round pruned/dense ratios; predicted: the latency model's ratio for the plan.\n\n")
    text += tabulate(table, headers=["model", "target kind", "target", "round_to", "batch", "MACs ratio", "dense ms",
                                     "pruned ms", "latency ratio", "predicted", "speed-up", "efficiency"],
                     tablefmt="github")
    effs = [r["efficiency"] for r in rows if r.get("kind", "macs") == "macs"]
    if effs:
        text += f"\n\nmedian efficiency of MACs targets {statistics.median(effs):.2f}\n"
    errors = [abs(r["prediction_error"]) for r in rows if "prediction_error" in r]
    if errors:
        text += (f"\nlatency model prediction error on the final models (|predicted / measured - 1|): "
                 f"median {statistics.median(errors):.3f}, max {max(errors):.3f} over {len(errors)} rows\n")
    for r in skipped:
        text += (f"\n{r['model']} at {r['target']:.0%} {r.get('kind', 'macs')} (round_to={r['round_to']}): "
                 f"infeasible, {r['infeasible']}\n")
    path.write_text(text)
    return text


def plot(rows, path: Path) -> None:
    """Measured latency ratio against MACs ratio, one colour per model, one marker per target kind."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in rows if "infeasible" not in r]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.5), squeeze=False)
    models = sorted({r["model"] for r in rows})
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    markers = {"macs": "o", "latency": "^", "matched": "s"}
    for ax, batch in zip(axes[0], batches):
        for (model, kind, rt) in sorted({(r["model"], r.get("kind", "macs"), r["round_to"]) for r in rows}):
            pts = sorted((r["macs_ratio"], 1 / r["speedup"]) for r in rows if r["model"] == model and
                         r.get("kind", "macs") == kind and r["round_to"] == rt and r["batch"] == batch)
            if pts:
                ax.plot(*zip(*pts), marker=markers[kind], color=colors[model], ls="-" if kind == "macs" else "--",
                        label=f"{model}, {kind} target" + (f", round_to={rt}" if rt != 1 else ""))
        ax.plot([0, 1], [0, 1], "k:", lw=1, label="latency = MACs")
        ax.set_xlabel("MACs ratio (pruned / dense)")
        ax.set_ylabel("measured latency ratio (pruned / dense)")
        ax.set_title(f"batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
