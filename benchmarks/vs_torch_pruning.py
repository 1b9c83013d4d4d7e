"""hfp_fx side by side with Torch-Pruning on every torchvision classification model.

For each model (``weights=None``, eval mode; input 1x3x224x224 for ViT/Swin/MaxViT, 1x3x160x160
for inception_v3, else 1x3x128x128 to keep the sweep fast):

* **graph build**: ``hfp_fx.dependency_graph(model, x).seconds`` vs
  ``tp.DependencyGraph().build_dependency(model, example_inputs=x)`` (each after a small warm-up
  build in its process, so neither pays first-call costs);
* **coverage at a MACs target** (default 50% of dense): hfp_fx one-shot ``hfp_fx.prune(model, x,
  {"macs": 0.5})``, checked against ``hfp_fx.mask(model, x, keep)`` (max relative error <= 1e-4);
  Torch-Pruning with its documented iterative loop (``MagnitudePruner``, L1 magnitude importance,
  ``global_pruning=True``, ``pruning_ratio=0.9``, ``iterative_steps=20``, the 1000-way classifier
  ignored) stepping until ``tp.utils.count_ops_and_params`` reports MACs <= target.  Both pruned
  models are run and then counted with ``hfp_fx.count`` (``torch.utils.flop_counter``), so the
  achieved ratios are measured the same way;
* **target gap**: ``(achieved - target) / dense`` MACs, sign included (Torch-Pruning moves in
  whole steps, so it is expected to land below the target);
* **latency** at the same MACs target for ``--latency-models`` (batch 1,
  ``torch.utils.benchmark`` ``blocked_autorange``, median ms; dense, hfp_fx and Torch-Pruning timed
  in the same process).

Torch-Pruning hangs on some models (Swin, MaxViT) and fails on others, so each model's
Torch-Pruning part runs in a subprocess of this script with a timeout (``--tp-timeout``);
a timeout or an exception is recorded, and the sweep goes on.  ``torch_pruning`` is imported only
in that subprocess.

    python benchmarks/vs_torch_pruning.py                              # all 80 models
    python benchmarks/vs_torch_pruning.py --limit 3 --latency-models   # quick check
    python benchmarks/vs_torch_pruning.py --models resnet18 mobilenet_v2 --latency-models resnet18

Writes ``benchmarks/results/vs_torch_pruning.json`` and ``vs_torch_pruning.md``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torchvision

import hfp_fx

RESULTS = Path(__file__).resolve().parent / "results"
FIXED_224 = ("vit_", "swin_", "maxvit_")  # models whose forward needs a fixed input resolution
DEFAULT_LATENCY = ["resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_y_1_6gf"]
NUM_CLASSES = 1000


# --------------------------------------------------------------------------------------------
# shared helpers (main process and worker)
# --------------------------------------------------------------------------------------------
def progress(iterable, total, desc):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not sys.stderr.isatty())
    except ImportError:
        return iterable


def input_size(name: str) -> int:
    if name.startswith(FIXED_224):
        return 224
    return 160 if name == "inception_v3" else 128


def build(name: str):
    """Seeded model and example input: the same weights in the main process and the worker."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    size = input_size(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def logits(out):
    """The classification output (inception/googlenet may return namedtuples in train mode)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"unexpected model output {type(out).__name__}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / (b.abs().max() + 1e-12))


def warmup_model():
    """A small torchvision model for the warm-up build both tools do before timing anything."""
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small(num_classes=10).eval(), torch.randn(1, 3, 32, 32)


def err_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]


# --------------------------------------------------------------------------------------------
# hfp_fx side (main process)
# --------------------------------------------------------------------------------------------
def run_hfp(model, x, target: float, dense) -> tuple:
    """Returns (row fields, pruned model or None)."""
    row = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            dg = hfp_fx.dependency_graph(model, x)
            row["build_wall_s"] = time.perf_counter() - t0
            row["build_s"] = dg.seconds
            row["groups"] = len(dg.groups)
            row["prunable_groups"] = len(dg.prunable_groups)
            row["prunable_fraction"] = dg.prunable_fraction()
            t0 = time.perf_counter()
            small = hfp_fx.prune(model, x, {"macs": target}).eval()
            row["prune_s"] = time.perf_counter() - t0
            with torch.no_grad():
                ref_out = logits(model(x))
                out = logits(small(x))
            row["runs"] = bool(out.shape == ref_out.shape and torch.isfinite(out).all())
            masked = hfp_fx.mask(dg, keep=small.meta["hfp"].keep).eval()
            with torch.no_grad():
                row["max_rel_err_vs_mask"] = rel_err(out, logits(masked(x)))
            del masked, dg
            row["exact"] = bool(row["max_rel_err_vs_mask"] <= 1e-4)
            counts = hfp_fx.count(small, x)
            row["macs"], row["params"] = counts.macs, counts.params
            row["macs_ratio"] = counts.macs / dense.macs
            row["params_ratio"] = counts.params / dense.params
            row["gap"] = (counts.macs - target * dense.macs) / dense.macs
            row["cost_model_macs"] = small.meta["hfp"].achieved.macs
            row["status"] = "ok" if row["runs"] and row["exact"] else ("inexact" if row["runs"] else "broken")
            return row, small
    except Exception as exc:  # noqa: BLE001 - a sweep records failures and goes on
        row.update(status="error", error=err_text(exc), runs=False)
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
        return row, None


# --------------------------------------------------------------------------------------------
# Torch-Pruning side (subprocess: ``--tp-worker NAME``)
# --------------------------------------------------------------------------------------------
def tp_worker(args) -> int:
    """Build, prune and measure one model with Torch-Pruning; write a JSON file after every stage."""
    import torch_pruning as tp

    torch.set_num_threads(args.threads)
    row = {"stage": "start", "tp_version": tp.__version__}

    def save():
        tmp = args.worker_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(row, f)
        os.replace(tmp, args.worker_out)

    save()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wm, wx = warmup_model()
            tp.DependencyGraph().build_dependency(wm, example_inputs=wx)  # warm-up
            model, x = build(args.tp_worker)
            dense = hfp_fx.count(model, x)
            row["stage"] = "build"
            save()
            t0 = time.perf_counter()
            DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
            row["build_s"] = time.perf_counter() - t0
            save()
            ignored = [m for m in model.modules()
                       if (isinstance(m, torch.nn.Linear) and m.out_features == NUM_CLASSES)
                       or (isinstance(m, torch.nn.Conv2d) and m.out_channels == NUM_CLASSES)]
            row["ignored_layers"] = len(ignored)
            row["stage"] = "get_all_groups"
            save()
            try:
                row["groups"] = sum(1 for _ in DG.get_all_groups(ignored_layers=ignored))
            except Exception as exc:  # noqa: BLE001
                row["groups_error"] = err_text(exc)
            del DG
            gc.collect()
            row["stage"] = "pruner init"
            save()
            t0 = time.perf_counter()
            Pruner = getattr(tp.pruner, "MagnitudePruner", None) or tp.pruner.BasePruner
            pruner = Pruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                            pruning_ratio=args.tp_ratio, iterative_steps=args.tp_steps, global_pruning=True,
                            ignored_layers=ignored)
            row["stage"] = "count (tp, dense)"
            save()
            dense_tp_macs, _ = tp.utils.count_ops_and_params(model, x)
            target_tp = args.target * dense_tp_macs
            target_hfp = args.target * dense.macs
            macs_tp = dense_tp_macs
            row["steps"] = 0
            for i in range(args.tp_steps):
                row["stage"] = f"prune step {i + 1}"
                save()
                pruner.step()
                row["steps"] = i + 1
                if args.tp_counter == "tp":
                    macs_tp, _ = tp.utils.count_ops_and_params(model, x)
                    reached = macs_tp <= target_tp
                else:
                    reached = hfp_fx.count(model, x).macs <= target_hfp
                if reached:
                    break
            if args.tp_counter == "tp":
                row["tp_macs_ratio_own_counter"] = float(macs_tp) / float(dense_tp_macs)
            row["prune_s"] = time.perf_counter() - t0
            row["reached_target"] = bool(reached)
            del pruner
            gc.collect()
            row["stage"] = "run"
            save()
            model.eval()
            with torch.no_grad():
                out = logits(model(x))
            row["runs"] = bool(out.shape == (x.shape[0], NUM_CLASSES) and torch.isfinite(out).all())
            row["stage"] = "count"
            save()
            counts = hfp_fx.count(model, x)
            row["macs"], row["params"] = counts.macs, counts.params
            row["macs_ratio"] = counts.macs / dense.macs
            row["params_ratio"] = counts.params / dense.params
            row["gap"] = (counts.macs - args.target * dense.macs) / dense.macs
            if args.save_model:
                row["stage"] = "save"
                save()
                torch.save(model, args.save_model)
            row["stage"] = "done"
            row["status"] = "ok" if row["runs"] else "broken"
    except Exception as exc:  # noqa: BLE001
        row.update(status="error", error=f"{row['stage']}: {err_text(exc)}", runs=False)
        if os.environ.get("BENCH_DEBUG"):
            traceback.print_exc()
    save()
    return 0


def run_tp(name: str, args, save_model: str = "") -> dict:
    """Run the Torch-Pruning worker for ``name`` in a subprocess; never raises, never hangs.

    The worker rewrites its JSON file after every stage (build, each pruning step, ...).  It is
    killed when that file has not changed for ``--tp-stall`` seconds (a hang) or after
    ``--tp-timeout`` seconds in all.
    """
    fd, out_path = tempfile.mkstemp(prefix="tp_worker_", suffix=".json")
    os.close(fd)
    os.remove(out_path)
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tp-worker", name, "--worker-out", out_path,
           "--target", str(args.target), "--tp-steps", str(args.tp_steps), "--tp-ratio", str(args.tp_ratio),
           "--tp-counter", args.tp_counter, "--threads", str(args.threads)]
    if save_model:
        cmd += ["--save-model", save_model]
    start = last = time.monotonic()
    last_mtime = None
    outcome = None
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        time.sleep(0.2)
        now = time.monotonic()
        try:
            mtime = os.stat(out_path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime != last_mtime:
            last_mtime, last = mtime, now
        if now - start > args.tp_timeout:
            outcome = f"timeout: over the {args.tp_timeout:.0f} s limit"
        elif now - last > args.tp_stall:
            outcome = f"timeout: no progress for {args.tp_stall:.0f} s"
        if outcome:
            proc.kill()
            proc.wait()
            break
    row = {"wall_s": time.monotonic() - start}
    try:
        with open(out_path) as f:
            row.update(json.load(f))
    except (OSError, ValueError):
        pass
    finally:
        for p in (out_path, out_path + ".tmp"):
            if os.path.exists(p):
                os.remove(p)
    stage = row.get("stage", "start-up")
    if outcome:
        row.update(status="timeout", runs=False, error=f"{outcome} (during {stage})")
    elif row.get("status") is None:  # the worker died without a final status (crash, killed for memory)
        log.seek(0)
        tail = [ln for ln in log.read().strip().splitlines() if ln.strip()][-1:]
        row.update(status="error", runs=False,
                   error=f"worker exit code {proc.returncode} during {stage}: {' '.join(tail)}"[:400])
    log.close()
    return row


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
def measure(model, x, min_run_time: float) -> dict:
    import torch.utils.benchmark as benchmark

    with torch.inference_mode():
        for _ in range(3):
            model(x)
        timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                                num_threads=torch.get_num_threads())
        m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3}


def run_latency(name, model, small, tp_path, args) -> dict:
    size = args.latency_size or input_size(name)
    x = torch.randn(1, 3, size, size)
    out = {"size": size}
    candidates = [("dense", lambda: model), ("hfp_fx", lambda: small),
                  ("torch_pruning", lambda: torch.load(tp_path, weights_only=False).eval() if tp_path else None)]
    for key, get in candidates:
        try:
            m = get()
            if m is None:
                out[key] = None
                continue
            out[key] = measure(m, x, args.min_run_time)
        except Exception as exc:  # noqa: BLE001
            out[key] = {"error": err_text(exc)}
    return out


# --------------------------------------------------------------------------------------------
# main sweep
# --------------------------------------------------------------------------------------------
def fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def pct(v, spec=".2f"):
    return "-" if v is None else f"{100 * v:{spec}}%"


def summarize(rows, latency_rows, args) -> dict:
    def col(tool, key):
        return [r[tool][key] for r in rows if r[tool].get(key) is not None]

    out = {"models": len(rows), "target_macs": args.target}
    for tool in ("hfp_fx", "torch_pruning"):
        builds = col(tool, "build_s")
        gaps = [abs(r[tool]["gap"]) for r in rows if r[tool].get("runs") and r[tool].get("gap") is not None]
        out[tool] = {
            "covered": sum(bool(r[tool].get("runs")) for r in rows),
            "covered_models": [r["model"] for r in rows if r[tool].get("runs")],
            "failed_models": {r["model"]: r[tool].get("error", r[tool].get("status")) for r in rows
                              if not r[tool].get("runs")},
            "graphs_built": len(builds),
            "build_s_total": sum(builds) if builds else None,
            "build_s_median": statistics.median(builds) if builds else None,
            "abs_gap_median": statistics.median(gaps) if gaps else None,
            "abs_gap_max": max(gaps) if gaps else None,
        }
    out["hfp_fx"]["exact"] = sum(bool(r["hfp_fx"].get("exact")) for r in rows)
    out["torch_pruning"]["timeouts"] = sum(r["torch_pruning"].get("status") == "timeout" for r in rows)
    out["torch_pruning"]["reached_target"] = sum(bool(r["torch_pruning"].get("reached_target")) for r in rows
                                                 if r["torch_pruning"].get("runs"))
    both = [r for r in rows if r["hfp_fx"].get("build_s") is not None and r["torch_pruning"].get("build_s") is not None]
    out["both_built"] = len(both)
    if both:
        hs = sum(r["hfp_fx"]["build_s"] for r in both)
        ts = sum(r["torch_pruning"]["build_s"] for r in both)
        per = [r["torch_pruning"]["build_s"] / r["hfp_fx"]["build_s"] for r in both if r["hfp_fx"]["build_s"] > 0]
        out["build_s_total_on_common_models"] = {"hfp_fx": hs, "torch_pruning": ts}
        out["build_time_ratio_tp_over_hfp_total"] = ts / hs if hs > 0 else None
        out["build_time_ratio_tp_over_hfp_median"] = statistics.median(per) if per else None
    out["latency_models"] = [r["model"] for r in latency_rows]
    return out


def write_markdown(rows, latency_rows, summary, meta, path: Path) -> str:
    from tabulate import tabulate

    def tool_cells(t, hfp: bool):
        if not t.get("runs"):
            return [t.get("status", "-") if t.get("status") != "error" else "error", "-", "-"]
        status = ("exact" if t.get("exact") else "INEXACT") if hfp else ("ok" if t.get("reached_target") else "ok, above target")
        return [status, fmt(t.get("macs_ratio")), pct(t.get("gap"), "+.2f")]

    table = []
    for r in rows:
        h, t = r["hfp_fx"], r["torch_pruning"]
        ratio = (t["build_s"] / h["build_s"]) if h.get("build_s") and t.get("build_s") else None
        table.append([r["model"], r["size"], fmt(h.get("build_s"), ".2f"), fmt(t.get("build_s"), ".2f"),
                      fmt(ratio, ".1f") + ("x" if ratio else ""), *tool_cells(h, True), *tool_cells(t, False),
                      t.get("steps", "-")])
    headers = ["model", "input", "hfp build s", "TP build s", "TP/hfp", "hfp", "hfp MACs", "hfp gap",
               "TP", "TP MACs", "TP gap", "TP steps"]
    hs, ts = summary["hfp_fx"], summary["torch_pruning"]
    text = (f"# hfp_fx vs Torch-Pruning {meta.get('torch_pruning', '?')}\n\n"
            f"torch {meta['torch']}, torchvision {meta['torchvision']}, {meta['threads']} CPU threads, "
            f"MACs target {args_pct(summary['target_macs'])} of dense. MACs ratios are measured with "
            f"`hfp_fx.count` (torch.utils.flop_counter) for both tools; gap = (achieved - target) / dense. "
            f"Torch-Pruning: MagnitudePruner, L1, global, pruning_ratio={meta['tp_ratio']}, "
            f"{meta['tp_steps']} iterative steps, stop at target by its own counter ({meta['tp_counter']}), "
            f"killed after {meta['tp_stall']:.0f} s without progress or {meta['tp_timeout']:.0f} s in all. "
            f"Torch-Pruning is run with one generic configuration (no per-architecture `num_heads` etc.).\n\n## Summary\n\n")
    summ = [
        ["models covered (pruned model runs)", f"{hs['covered']}/{summary['models']}",
         f"{ts['covered']}/{summary['models']}"],
        ["graph built", hs["graphs_built"], ts["graphs_built"]],
        ["graph build total s (all built)", fmt(hs["build_s_total"], ".1f"), fmt(ts["build_s_total"], ".1f")],
        ["graph build median s", fmt(hs["build_s_median"], ".3f"), fmt(ts["build_s_median"], ".3f")],
        ["median abs(achieved - target) / dense", pct(hs["abs_gap_median"]), pct(ts["abs_gap_median"])],
        ["max abs(achieved - target) / dense", pct(hs["abs_gap_max"]), pct(ts["abs_gap_max"])],
    ]
    text += tabulate(summ, headers=["", "hfp_fx", "Torch-Pruning"], tablefmt="github", disable_numparse=True)
    text += (f"\n\nhfp_fx pruned models equal to the masked reference: {hs['exact']}/{summary['models']}. "
             f"Torch-Pruning reached the target within its steps on {ts['reached_target']} of the "
             f"{ts['covered']} models it pruned; timeouts: {ts['timeouts']}.\n")
    if summary.get("build_time_ratio_tp_over_hfp_total") is not None:
        common = summary["build_s_total_on_common_models"]
        text += (f"\nOn the {summary['both_built']} models both tools built a graph for: total build "
                 f"{common['hfp_fx']:.1f} s (hfp_fx) vs {common['torch_pruning']:.1f} s (Torch-Pruning), "
                 f"ratio TP/hfp {summary['build_time_ratio_tp_over_hfp_total']:.2f}x (median per model "
                 f"{summary['build_time_ratio_tp_over_hfp_median']:.2f}x).\n")
    if ts["failed_models"]:
        text += "\nTorch-Pruning failures:\n\n" + "".join(f"* {m}: {e}\n" for m, e in ts["failed_models"].items())
    if hs["failed_models"]:
        text += "\nhfp_fx failures:\n\n" + "".join(f"* {m}: {e}\n" for m, e in hs["failed_models"].items())
    if latency_rows:
        lat = []
        for r in latency_rows:
            def cell(k):
                v = r.get(k)
                if v is None:
                    return "-"
                if "error" in v:
                    return "error"
                return f"{v['median_ms']:.2f} ± {v['iqr_ms']:.2f}"

            def speed(k):
                v, d = r.get(k), r.get("dense")
                if not v or "error" in v or not d or "error" in d:
                    return "-"
                return f"{d['median_ms'] / v['median_ms']:.2f}x"

            lat.append([r["model"], r["size"], cell("dense"), cell("hfp_fx"), fmt(r.get("hfp_macs_ratio")),
                        speed("hfp_fx"), cell("torch_pruning"), fmt(r.get("tp_macs_ratio")), speed("torch_pruning")])
        text += (f"\n## Latency at the {args_pct(summary['target_macs'])} MACs target\n\nbatch 1, "
                 f"{meta['threads']} threads, torch.utils.benchmark blocked_autorange (min_run_time "
                 f"{meta['min_run_time']} s), median ± IQR in ms.\n\n")
        text += tabulate(lat, headers=["model", "input", "dense ms", "hfp_fx ms", "hfp MACs", "hfp speed-up",
                                       "TP ms", "TP MACs", "TP speed-up"], tablefmt="github", disable_numparse=True) + "\n"
    text += "\n## Per model\n\n" + tabulate(table, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
    path.write_text(text)
    return text


def args_pct(v: float) -> str:
    return f"{100 * v:g}%"


# options that change a row's meaning: a resumed sweep must use the interrupted sweep's values
RESUME_MUST_MATCH = ("target", "latency_size", "min_run_time", "tp_steps", "tp_ratio", "tp_counter", "threads")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="model names (default: all torchvision classification models)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N models")
    ap.add_argument("--target", type=float, default=0.5, help="MACs fraction of dense")
    ap.add_argument("--latency-models", nargs="*", default=DEFAULT_LATENCY,
                    help="models to time (must also be in the sweep); give the flag alone for none")
    ap.add_argument("--latency-size", type=int, default=None,
                    help="input size for latency (default: the sweep's input size of that model)")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--tp-stall", type=float, default=120.0,
                    help="kill Torch-Pruning after this many seconds without progress (one build / one step)")
    ap.add_argument("--tp-timeout", type=float, default=900.0, help="total seconds per model for Torch-Pruning")
    ap.add_argument("--tp-steps", type=int, default=20)
    ap.add_argument("--tp-ratio", type=float, default=0.9, help="Torch-Pruning pruning_ratio after all steps")
    ap.add_argument("--tp-counter", choices=["tp", "hfp"], default="tp",
                    help="counter for Torch-Pruning's stopping rule: its own (documented) or hfp_fx.count")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(RESULTS / "vs_torch_pruning.json"))
    ap.add_argument("--from-partial", action="store_true",
                    help="summarise the rows an interrupted sweep left in OUT's .partial.json and stop")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows an interrupted sweep left in OUT's .partial.json and run only the rest")
    # hidden worker mode
    ap.add_argument("--tp-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--save-model", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tp_worker:
        return tp_worker(args)

    if args.from_partial:
        out = Path(args.out)
        if not out.with_suffix(".partial.json").exists():
            ap.error(f"{out.with_suffix('.partial.json')} does not exist (no interrupted sweep to summarise)")
        saved = json.loads(out.with_suffix(".partial.json").read_text())
        finish(saved["rows"], saved["latency"], argparse.Namespace(**saved["args"]), out)
        return 0
    torch.set_num_threads(args.threads)
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if args.models:
        unknown = [m for m in args.models if m not in names]
        if unknown:
            ap.error(f"unknown models: {unknown}")
        names = [n for n in names if n in args.models]
    names = names[: args.limit]
    latency_set = set(args.latency_models or [])
    missing = sorted(latency_set - set(names))
    if missing:
        print(f"note: latency models not in this sweep, skipped: {missing}", file=sys.stderr)
    with warnings.catch_warnings():  # warm-up: first-call costs stay out of the first model's build time
        warnings.simplefilter("ignore")
        hfp_fx.dependency_graph(*warmup_model())

    rows, latency_rows = [], []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    if args.resume and partial.exists():
        saved = json.loads(partial.read_text())
        changed = {k: (v, saved["args"].get(k)) for k, v in vars(args).items()
                   if k in RESUME_MUST_MATCH and saved["args"].get(k) != v}
        if changed:
            ap.error(f"--resume: these options differ from the interrupted sweep's (now, then): {changed}")
        rows, latency_rows = saved["rows"], saved["latency"]
        done = {r["model"] for r in rows}
        print(f"resuming: {len(done)} models kept from {partial}", file=sys.stderr)
        names = [n for n in names if n not in done]
    tmpdir = tempfile.mkdtemp(prefix="vs_tp_")
    bar = progress(names, len(names), "vs torch-pruning")
    for i, name in enumerate(bar):
        model, x = build(name)
        dense = hfp_fx.count(model, x)
        row = {"model": name, "size": x.shape[-1], "dense_macs": dense.macs, "dense_params": dense.params}
        hfp_row, small = run_hfp(model, x, args.target, dense)
        row["hfp_fx"] = hfp_row
        timed = name in latency_set
        if not timed:
            del small
            small = None
        gc.collect()
        tp_path = os.path.join(tmpdir, f"{name}.pt") if timed else ""
        row["torch_pruning"] = run_tp(name, args, save_model=tp_path)
        if timed:
            lat = {"model": name, "hfp_macs_ratio": hfp_row.get("macs_ratio"),
                   "tp_macs_ratio": row["torch_pruning"].get("macs_ratio")}
            lat.update(run_latency(name, model, small if hfp_row.get("runs") else None,
                                   tp_path if row["torch_pruning"].get("runs") and os.path.exists(tp_path) else "",
                                   args))
            latency_rows.append(lat)
            if os.path.exists(tp_path):
                os.remove(tp_path)
        rows.append(row)
        h, t = row["hfp_fx"], row["torch_pruning"]
        msg = (f"[{i + 1}/{len(names)}] {name}: hfp {h.get('status')} build {fmt(h.get('build_s'), '.2f')} s "
               f"MACs {fmt(h.get('macs_ratio'))} | TP {t.get('status')} build {fmt(t.get('build_s'), '.2f')} s "
               f"MACs {fmt(t.get('macs_ratio'))} ({t.get('wall_s', 0):.0f} s)")
        if t.get("error"):
            msg += f" [{t['error'][:120]}]"
        if h.get("error"):
            msg += f" [hfp: {h['error'][:120]}]"
        if hasattr(bar, "write"):
            bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)
        with open(partial, "w") as f:  # an interrupted sweep keeps its rows (see --from-partial)
            json.dump({"args": vars(args), "rows": rows, "latency": latency_rows}, f, indent=1)
        del model, small
        gc.collect()
    try:
        os.rmdir(tmpdir)
    except OSError:
        pass

    finish(rows, latency_rows, args, out)
    partial.unlink(missing_ok=True)
    return 0


def finish(rows, latency_rows, args, out: Path) -> None:
    """Write the JSON and markdown results of ``rows``."""
    tp_version = next((r["torch_pruning"]["tp_version"] for r in rows if r["torch_pruning"].get("tp_version")), "?")
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "torch_pruning": tp_version,
            "hfp_fx": hfp_fx.__version__, "threads": args.threads, "target": args.target,
            "tp_ratio": args.tp_ratio, "tp_steps": args.tp_steps, "tp_counter": args.tp_counter,
            "tp_timeout": args.tp_timeout, "tp_stall": args.tp_stall, "min_run_time": args.min_run_time}
    summary = summarize(rows, latency_rows, args)
    with open(out, "w") as f:
        json.dump({"meta": meta, "summary": summary, "rows": rows, "latency": latency_rows}, f, indent=1)
    print(write_markdown(rows, latency_rows, summary, meta, out.with_suffix(".md")))


if __name__ == "__main__":
    sys.exit(main())
