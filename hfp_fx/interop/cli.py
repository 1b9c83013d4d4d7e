"""The ``hfp-fx`` command line (also ``python -m hfp_fx``).

Examples::

    hfp-fx inspect torchvision:resnet50
    hfp-fx inspect timm:convnext_tiny --dot convnext.dot
    hfp-fx count torchvision:mobilenet_v2 --input-size 1,3,160,160
"""
from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import torch

import hfp_fx
from hfp_fx.interop.specs import SpecError, load_spec, portable_spec

log = logging.getLogger("hfp_fx")

EPILOG = """examples:
  hfp-fx inspect torchvision:resnet50
  hfp-fx inspect timm:convnext_tiny --dot convnext.dot
  hfp-fx inspect my_models.py:build_net --input-size 1,3,64,64
  hfp-fx count torchvision:mobilenet_v2
  hfp-fx prune torchvision:resnet50 --macs 40% --out resnet50_40.pt
  hfp-fx prune torchvision:mobilenet_v2 --macs 50% --params 60% --round-to 8 --out mbv2.pt
  hfp-fx bench torchvision:resnet50 --macs 50%
  hfp-fx prune torchvision:mobilenet_v2 --latency 50% --out mbv2_fast.pt
  hfp-fx prune hf:path/to/llama --params 50% --uniform-blocks --out llama_half
"""


class UsageError(ValueError):
    """A command line that cannot work (e.g. an option whose optional dependency is missing)."""


def _require(module: str, option: str) -> None:
    """Fail before any work when ``option`` needs ``module`` and it is not installed."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{option} needs {module}: pip install {module}") from None


def _input_shape(text: Optional[str], default):
    if not text:
        return default
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SpecError(f"--input-size must look like 1,3,224,224, got {text!r}") from None


def _load(args):
    model, shape = load_spec(args.spec)
    return model, torch.randn(*_input_shape(args.input_size, shape))


def cmd_inspect(args) -> int:
    if args.png and Path(args.png).suffix.lower() != ".dot" and not shutil.which("dot"):
        _require("matplotlib", "--png (without Graphviz's dot)")
    model, x = _load(args)
    dg = hfp_fx.dependency_graph(model, x, capture=args.capture)
    print(dg.summary(max_members=args.members, only_prunable=args.prunable_only))
    c = hfp_fx.count(model, x, capture=args.capture)
    print(f"dense: {c.params:,} params, {c.macs:,} MACs; graph built in {dg.seconds:.2f} s "
          f"({len(dg.gm.graph.nodes)} nodes)")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(dg.to_dot())
        print(f"wrote {args.dot}")
    if args.png:
        print(f"wrote {hfp_fx.render_graph(dg, args.png)}")
    return 0


def cmd_count(args) -> int:
    model, x = _load(args)
    c = hfp_fx.count(model, x, capture=args.capture)
    print(f"params: {c.params:,}\nMACs:   {c.macs:,}")
    return 0


def _target(args):
    target = {k: v for k, v in (("params", args.params), ("macs", args.macs), ("latency", args.latency))
              if v is not None}
    if not target:
        raise SpecError("give a target: --macs 40%, --params 50% (fractions, percentages or counts) "
                        "and/or --latency 50% (or 12ms, measured on this machine)")
    return hfp_fx.Target.parse(target)


def _allocation_table(report, limit: int) -> str:
    from tabulate import tabulate

    groups = report.groups
    rows = [[gid, g.name, g.dense, g.kept, f"{100 * g.kept / g.dense:.0f}%"] for gid, g in groups.items()]
    shown = rows if limit <= 0 else rows[:limit]
    text = tabulate(shown, headers=["group", "first module", "dense", "kept", "kept %"], tablefmt="github")
    if len(shown) < len(rows):
        text += f"\n... {len(rows) - len(shown)} more groups (--show 0 lists all)"
    return text


def _print_counts(report, got) -> None:
    """Dense -> pruned params and MACs (``got``), with the target where one was set."""
    for name in ("params", "macs"):
        dense, now, t = getattr(report.dense, name), getattr(got, name), getattr(report.target, name)
        print(f"{name:>6}: {dense:,} -> {now:,} ({100 * now / dense:.2f}% of dense" + (f"; target {t:,})" if t else ")"))


def cmd_prune(args) -> int:
    if args.plot:
        _require("matplotlib", "--plot")
    if args.spec.startswith("hf:"):
        return _prune_checkpoint(args)
    model, x = _load(args)
    target = _target(args)
    small = hfp_fx.prune(model, x, target, importance=args.importance, round_to=args.round_to,
                         min_channels=args.min_channels, exclude=args.exclude or (), capture=args.capture,
                         uniform_blocks=args.uniform_blocks)
    report = small.meta["hfp"]
    print(_allocation_table(report, args.show))
    _print_counts(report, hfp_fx.count(small, x))
    if report.latency is not None:
        lat = report.latency
        print(f"latency: {lat.dense_ms:.2f} ms -> {lat.measured_ms:.2f} ms measured ({100 * lat.measured_ratio:.1f}% "
              f"of dense; target {lat.target_ms:.2f} ms), predicted {lat.predicted_ms:.2f} ms, "
              f"{lat.corrections} correction(s)")
    if args.out:  # before the plot: a failing plot must not cost the pruned model
        hfp_fx.save(small, args.out, model_spec=portable_spec(args.spec))
        print(f"saved {args.out} (load with hfp_fx.load({str(args.out)!r}))")
    if args.plot:
        print(f"wrote {hfp_fx.plot_widths(small, args.plot, title=args.spec)}")
    return 0


def _prune_checkpoint(args) -> int:
    """``hf:DIR``: a Hugging Face safetensors checkpoint pruned on disk into ``--out`` (a directory)."""
    _require("transformers", "hf:PATH")
    if not args.out:
        raise SpecError("hf:PATH writes a pruned checkpoint: give --out DIR")
    if args.latency is not None or args.plot or args.capture == "fx":
        given = "--latency" if args.latency is not None else "--plot" if args.plot else "--capture fx"
        raise SpecError(f"{given} is not available for hf:PATH (planned on the meta device with torch.export, "
                        "weights read tensor by tensor); load the model and use hfp_fx.prune for it")
    if args.importance not in ("l1", "l2", "uniform"):
        raise SpecError(f"--importance {args.importance} needs the model in memory; hf:PATH takes l1, l2 or uniform")
    ids = None
    if args.input_size:
        ids = torch.zeros(_input_shape(args.input_size, None), dtype=torch.long)
    report = hfp_fx.prune_checkpoint(args.spec[len("hf:"):], args.out, _target(args), importance=args.importance,
                                     example_inputs=ids, round_to=args.round_to, min_channels=args.min_channels,
                                     exclude=args.exclude or ())
    print(_allocation_table(report, args.show))
    _print_counts(report, report.achieved)
    print(f"wrote {args.out} (load with transformers.AutoModelForCausalLM.from_pretrained({str(args.out)!r}))")
    return 0


def cmd_bench(args) -> int:
    import torch.utils.benchmark as benchmark
    from tabulate import tabulate

    model, x = _load(args)
    torch.set_num_threads(args.threads)  # before pruning: a latency target is measured with these threads
    small = hfp_fx.prune(model, x, _target(args), round_to=args.round_to, capture=args.capture)
    rows = []
    for batch in args.batch:
        xb = torch.randn(batch, *x.shape[1:])
        times = {}
        for label, m in (("dense", model.eval()), ("pruned", small.eval())):
            with torch.inference_mode():
                for _ in range(2):
                    m(xb)
                t = benchmark.Timer("m(x)", globals={"m": m, "x": xb}, num_threads=args.threads)
                times[label] = t.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
        dense_c, small_c = hfp_fx.count(model, x, capture=args.capture), hfp_fx.count(small, x)
        speedup = times["dense"] / times["pruned"]
        rows.append([batch, f"{times['dense']:.2f}", f"{times['pruned']:.2f}", f"{speedup:.2f}x",
                     f"{small_c.macs / dense_c.macs:.3f}", f"{speedup * small_c.macs / dense_c.macs:.2f}"])
    print(tabulate(rows, headers=["batch", "dense ms", "pruned ms", "speed-up", "MACs ratio", "efficiency"],
                   tablefmt="github"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hfp-fx", description="Holistic Filter Pruning for torch.fx graphs.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks of errors")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("spec", help="torchvision:NAME, timm:NAME, path/to/file.py:factory or package.module:factory"
                       + ("; or hf:DIR, a Hugging Face safetensors checkpoint pruned on disk, one tensor in memory "
                          "at a time (with --out DIR; layers keep one width)" if name == "prune" else ""))
        p.add_argument("--input-size", help="example input shape, e.g. 1,3,224,224 (default: the model's)")
        p.add_argument("--capture", choices=["fx", "export", "auto"], default="auto",
                       help="how the model is captured: auto (default; torch.fx tracing, torch.export for "
                            "Hugging Face models or when tracing fails), fx or export")
        p.set_defaults(func=fn)
        return p

    p = add("inspect", cmd_inspect, "print the prune groups of a model")
    p.add_argument("--dot", help="write the dependency graph as Graphviz DOT to this file")
    p.add_argument("--png", help="draw the dependency graph to this image (.png/.svg; graphviz or matplotlib)")
    p.add_argument("--members", type=int, default=3, help="member modules shown per group")
    p.add_argument("--prunable-only", action="store_true", help="list prunable groups only")
    add("count", cmd_count, "print parameters and MACs")

    def targets(p):
        p.add_argument("--macs", help="MACs target: fraction (0.4), percentage (40%%) or count")
        p.add_argument("--params", help="parameter target: fraction, percentage or count")
        p.add_argument("--latency", help="latency target, measured here at the example's batch size: "
                                         "fraction (0.5), percentage (50%%) or milliseconds (12ms)")
        p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N")

    p = add("prune", cmd_prune, "one-shot prune to a target and save (safe format)")
    targets(p)
    p.add_argument("--importance", default="l1", choices=["l1", "l2", "uniform"])
    p.add_argument("--min-channels", type=int, default=1)
    p.add_argument("--uniform-blocks", action="store_true",
                   help="one width per kind of layer across repeated blocks (prune(uniform_blocks=True))")
    p.add_argument("--exclude", nargs="*", help="module names never pruned")
    p.add_argument("--out", help="write the pruned model here (hfp_fx.save format; for hf:DIR a checkpoint directory)")
    p.add_argument("--plot", help="write a per-group kept-width bar chart (PNG; needs matplotlib)")
    p.add_argument("--show", type=int, default=40, help="groups listed in the allocation table (0 = all)")
    p = add("bench", cmd_bench, "dense vs pruned latency")
    targets(p)
    p.add_argument("--batch", type=int, nargs="*", default=[1])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--min-run-time", type=float, default=1.0)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (SpecError, hfp_fx.TraceError, ValueError, TypeError, RuntimeError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"hfp-fx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
