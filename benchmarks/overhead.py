"""Training-step overhead of HFP: the prepared model (gates + ``complexity_loss``) vs the plain model.

A training step is: forward, cross-entropy on random labels (+ ``hfp_fx.complexity_loss`` for the
prepared model), backward, SGD step (momentum 0.9, weight decay 1e-4).  Plain and prepared
steps are interleaved (one of each per round, after a warm-up) so that drifting machine load hits
both alike; the report is the median per-step time (``time.perf_counter``, CUDA synchronised) with
its inter-quartile range, and ``overhead = prepared / plain - 1``.  ``complexity_loss`` forward +
backward is also timed on its own, and so is the gate work (the gate vector and every gated
weight, forward and backward, with the plain step's gradients replaced by ones): that part is
what the gates add by construction and, unlike the step-time difference, is not drowned by the
machine's noise.  The paired overhead comes with a bootstrap 95% interval so a run on a noisy
machine says how far it can be trusted.  Goal: overhead under 3%.

    python benchmarks/overhead.py                                  # resnet50 + mobilenet_v2, batch 32, 224
    python benchmarks/overhead.py --size 128 --steps 10            # quicker
    python benchmarks/overhead.py --models resnet18 --size 96 --batch 4 --steps 3 --warmup 1
    python benchmarks/overhead.py --fx-baseline                    # also the traced model without gates

Runs on the CPU and, when available, on CUDA (``--devices``).  Writes
``benchmarks/results/overhead.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import hfp_fx

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.03


def progress(iterable, total, desc):
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, disable=not sys.stderr.isatty(), leave=False)
    except ImportError:
        return iterable


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stats(times) -> dict:
    ms = [t * 1e3 for t in times]
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "iqr_ms": q[2] - q[0], "q1_ms": q[0], "q3_ms": q[2],
            "min_ms": min(ms), "n": len(ms)}


class Trainer:
    """One model, its optimizer and a timed ``step``."""

    def __init__(self, model, hfp: bool, lr: float):
        self.model = model.train()
        self.hfp = hfp
        self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        self.times = []

    def step(self, x, y, device: str, record: bool = True) -> float:
        sync(device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        if self.hfp:
            loss = loss + hfp_fx.complexity_loss(self.model)
        loss.backward()
        self.opt.step()
        sync(device)
        dt = time.perf_counter() - t0
        if record:
            self.times.append(dt)
        return float(loss.detach())


def time_complexity_loss(prepared, device: str, reps: int) -> dict:
    """``complexity_loss`` forward + backward alone (gate gradient cleared between runs)."""
    gate = hfp_fx.gate_parameters(prepared)[0]
    times = []
    for i in range(reps + 3):
        gate.grad = None
        sync(device)
        t0 = time.perf_counter()
        hfp_fx.complexity_loss(prepared).backward()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return stats(times)


def time_gate_work(prepared, device: str, reps: int) -> dict:
    """Forward + backward of the gate vector and the weight-gate sites alone.

    Activation-gate sites scale with the batch and are not included (the row counts them).
    """
    pairs = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith("hfp.sites.") and node.args[0].op == "get_attr":
            pairs.append((prepared.get_submodule(node.target), prepared.get_parameter(node.args[0].target)))
    ones = [torch.ones_like(weight) for _, weight in pairs]
    times = []
    for i in range(reps + 3):
        sync(device)
        t0 = time.perf_counter()
        vector = prepared.hfp()
        torch.autograd.backward([site(weight, vector) for site, weight in pairs], ones)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    prepared.zero_grad(set_to_none=True)
    return {**stats(times), "weight_sites": len(pairs)}


def bootstrap_median(values, reps: int = 2000, seed: int = 0) -> list:
    """95% bootstrap interval of the median of ``values``."""
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    return [medians[int(0.025 * reps)], medians[int(0.975 * reps) - 1]]


def run(name: str, device: str, args) -> dict:
    torch.manual_seed(0)
    plain = torchvision.models.get_model(name, weights=None)
    example = torch.randn(1, 3, args.size, args.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        prepared = hfp_fx.prepare(plain.eval(), example, {"macs": args.target})
        prepare_s = time.perf_counter() - t0
        traced = hfp_fx.dependency_graph(plain, example).gm if args.fx_baseline else None
    info = hfp_fx.complexity(prepared)
    trainers = {"plain": Trainer(plain.to(device), False, args.lr),
                "prepared": Trainer(prepared.to(device), True, args.lr)}
    if traced is not None:
        trainers["traced"] = Trainer(traced.to(device), False, args.lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    order = list(trainers)
    for _ in range(args.warmup):
        for k in order:
            trainers[k].step(x, y, device, record=False)
    for i in progress(range(args.steps), args.steps, f"{name} {device}"):
        # alternate which model goes first so neither always follows the other
        for k in (order if i % 2 == 0 else order[::-1]):
            trainers[k].step(x, y, device)
    row = {"model": name, "device": device, "batch": args.batch, "size": args.size, "steps": args.steps,
           "warmup": args.warmup, "prepare_s": prepare_s, "gates": info["prunable_channels"],
           "gate_sites": len(list(prepared.hfp.sites.children()))}
    for k, tr in trainers.items():
        row[k] = stats(tr.times)
    row["overhead"] = row["prepared"]["median_ms"] / row["plain"]["median_ms"] - 1
    # per-round paired ratio: robust to load changing between rounds
    paired = [p / q for p, q in zip(trainers["prepared"].times, trainers["plain"].times)]
    row["overhead_paired_median"] = statistics.median(paired) - 1
    row["overhead_paired_ci95"] = [r - 1 for r in bootstrap_median(paired)]
    row["step_times_ms"] = {k: [round(1e3 * t, 2) for t in tr.times] for k, tr in trainers.items()}
    if traced is not None:
        row["fx_overhead"] = row["traced"]["median_ms"] / row["plain"]["median_ms"] - 1
        row["gate_overhead_vs_traced"] = row["prepared"]["median_ms"] / row["traced"]["median_ms"] - 1
    prepared.train()
    row["complexity_loss"] = time_complexity_loss(prepared, device, args.loss_reps)
    row["complexity_loss_share"] = row["complexity_loss"]["median_ms"] / row["plain"]["median_ms"]
    row["gate_work"] = time_gate_work(prepared, device, args.loss_reps)
    row["activation_sites"] = row["gate_sites"] - row["gate_work"]["weight_sites"]
    # what the gates and the loss add by construction, measured apart from the noisy step times
    row["attributable_overhead"] = (row["gate_work"]["median_ms"] + row["complexity_loss"]["median_ms"]) / \
        row["plain"]["median_ms"]
    row["meets_goal"] = bool(row["overhead"] < GOAL)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model (each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--loss-reps", type=int, default=50, help="timed complexity_loss forward+backward runs")
    ap.add_argument("--target", type=float, default=0.5, help="MACs target of the prepared model")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--devices", nargs="*", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--fx-baseline", action="store_true",
                    help="also time the traced GraphModule without gates (separates FX from gate cost)")
    ap.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "cuda" in args.devices and not torch.cuda.is_available():
        ap.error("CUDA is not available")
    rows = []
    for device in args.devices:
        for name in args.models:
            row = run(name, device, args)
            rows.append(row)
            print(f"{name} {device}: plain {row['plain']['median_ms']:.1f} ms, prepared "
                  f"{row['prepared']['median_ms']:.1f} ms, overhead {100 * row['overhead']:+.2f}% "
                  f"(paired {100 * row['overhead_paired_median']:+.2f}%, 95% CI "
                  f"{100 * row['overhead_paired_ci95'][0]:+.2f}..{100 * row['overhead_paired_ci95'][1]:+.2f}%), "
                  f"complexity_loss {row['complexity_loss']['median_ms']:.2f} ms, gate work "
                  f"{row['gate_work']['median_ms']:.1f} ms ({100 * row['attributable_overhead']:.2f}% of a step)",
                  file=sys.stderr, flush=True)
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "hfp_fx": hfp_fx.__version__,
            "threads": args.threads, "goal_overhead": GOAL,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "step": "zero_grad, forward, cross_entropy (+ complexity_loss), backward, SGD(momentum 0.9, wd 1e-4)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(table(rows, meta))
    return 0


def table(rows, meta) -> str:
    from tabulate import tabulate

    def cell(s):
        return f"{s['median_ms']:.1f} ± {s['iqr_ms']:.1f}"

    fx = any("traced" in r for r in rows)
    body = []
    for r in rows:
        line = [r["model"], r["device"], f"{r['batch']}x{r['size']}", r["gates"], cell(r["plain"])]
        if fx:
            line.append(cell(r["traced"]) if "traced" in r else "-")
        lo, hi = r["overhead_paired_ci95"]
        line += [cell(r["prepared"]), f"{100 * r['overhead']:+.2f}%",
                 f"{100 * r['overhead_paired_median']:+.2f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]",
                 f"{r['complexity_loss']['median_ms']:.2f} ± {r['complexity_loss']['iqr_ms']:.2f}",
                 f"{r['gate_work']['median_ms']:.1f} ± {r['gate_work']['iqr_ms']:.1f}",
                 f"{100 * r['attributable_overhead']:.2f}%", "yes" if r["meets_goal"] else "NO"]
        body.append(line)
    headers = ["model", "device", "batch x size", "gates", "plain step ms"] + (["traced step ms"] if fx else []) + \
        ["prepared step ms", "overhead", "paired [95% CI]", "complexity_loss ms", "gate work ms",
         "(loss + gate work) / plain step",
         f"< {100 * meta['goal_overhead']:.0f}%"]
    text = (f"torch {meta['torch']}, {meta['threads']} threads; step = {meta['step']}; median ± IQR over "
            f"interleaved steps; overhead = prepared / plain - 1 (paired: median of per-round ratios, bootstrap "
            f"95% interval); gate work = gate vector + gated weights, forward and backward, alone.\n\n")
    return text + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


if __name__ == "__main__":
    sys.exit(main())
