"""Allocation oracle for the language-model benchmark: which widths recover best at 50% params?

``lm_brown.py`` compares *methods*, and a method's result mixes two things: the allocation it
chose (hidden size, MLP width, KV heads) and how well its weights recover.  This script fixes
the recovery and varies the allocation: for a grid of uniform-block shapes on the iso-parameter
line (every shape at most ``--target`` of the dense params, the MLP as wide as the budget lets
it be once the hidden size and KV heads are chosen), it cuts the same trained dense model by
one-shot magnitude **constrained to that shape** (per group, the channels of largest filter L1
norm, the same ranking as ``lm_brown.py``'s ``magnitude``), goes back to ``LlamaForCausalLM``
with ``hfp_fx.to_pretrained`` and fine-tunes with exactly ``lm_brown.py``'s schedule and budget.
The val perplexity against the hidden fraction is then the landscape every method's allocation
sits on; ``--shapes-from`` adds the shapes methods chose in an ``lm_brown.py`` result, so each is
ranked among the grid under the same recovery.

    python benchmarks/lm_oracle.py --reuse-dense                      # the grid, 1 seed (~25 min)
    python benchmarks/lm_oracle.py --reuse-dense --shapes-from benchmarks/results/lm_brown.json \\
        --only-methods --out /tmp/methods.json                        # the methods' shapes only
    python benchmarks/lm_oracle.py --reuse-dense --best 3 --seeds 1 2 --from benchmarks/results/lm_oracle.json
    python benchmarks/lm_oracle.py --merge a.json b.json --out c.json  # rows of split runs
    python benchmarks/lm_oracle.py --report benchmarks/results/lm_oracle.json \\
        --methods-json benchmarks/results/lm_brown.json                # table + plot again

Every other option (model, data, fine-tune budget, ``--distill``) is ``lm_brown.py``'s, passed
through.  Writes ``benchmarks/results/lm_oracle.json`` and ``lm_oracle.png``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_HERE = Path(__file__).resolve().parent

import torch  # noqa: E402

import hfp_fx  # noqa: E402
from hfp_fx.plan.hf_layouts import config_fit  # noqa: E402
from hfp_fx.plan.saliency import magnitude_saliency  # noqa: E402


def load_lm_brown():
    spec = importlib.util.spec_from_file_location("lm_brown", _HERE / "lm_brown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lm = load_lm_brown()
RESULTS = _HERE / "results"
Shape = Tuple[int, int, int]  # (hidden, kv heads, intermediate)


def params_of(cfg, hidden: int, kv: int, intermediate: int) -> int:
    """Parameters of the Llama ``cfg`` at these widths (built on the meta device: no memory)."""
    import transformers

    new = copy.deepcopy(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    new.hidden_size, new.intermediate_size, new.head_dim = hidden, intermediate, head_dim
    new.num_attention_heads = kv * (cfg.num_attention_heads // cfg.num_key_value_heads)
    new.num_key_value_heads = kv
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.LlamaForCausalLM(new).parameters())


def iso_param_shapes(cfg, target: float, hiddens: List[int], kvs: List[int]) -> List[Shape]:
    """Per (hidden, kv), the widest MLP that keeps the params <= ``target`` of dense, where that
    is within 2% of the target (a small hidden size with the whole MLP is not on the line)."""
    dense = params_of(cfg, cfg.hidden_size, cfg.num_key_value_heads, cfg.intermediate_size)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    shapes = []
    for kv in kvs:
        for h in hiddens:
            if h % (kv * group) or h > cfg.hidden_size:
                continue  # the config wants the hidden size a multiple of the attention heads
            lo, hi = 0, cfg.intermediate_size
            while lo < hi:  # the largest m with params <= target
                mid = (lo + hi + 1) // 2
                if params_of(cfg, h, kv, mid) <= target * dense:
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= 1 and params_of(cfg, h, kv, lo) >= (target - 0.02) * dense:
                shapes.append((h, kv, lo))  # (not a shape whose whole MLP stays under the budget)
    return shapes


def constrained_magnitude(dense, dg, shape: Shape):
    """One-shot L1 magnitude at exactly ``shape``: per group its top channels, back to the HF class."""
    fit = config_fit(dense, dg)
    if fit is None:
        raise SystemExit("the oracle needs a Llama-style model (hfp_fx.plan.hf_layouts.config_fit)")
    hidden, kv, intermediate = shape
    saliency = magnitude_saliency(dg, "l1")
    counts = {fit.hidden: hidden, **{gid: kv for gid in fit.kv_groups}}
    for g in dg.prunable_groups:
        if g.id not in counts:
            counts[g.id] = intermediate  # the MLP groups (the only others in a Llama)
    keep = {gid: sorted(torch.argsort(-saliency[gid], stable=True)[:n].tolist()) for gid, n in counts.items()}
    small = hfp_fx.shrink(dg, keep=keep).eval()
    return hfp_fx.to_pretrained(small, like=dense).eval()


def method_shapes(path: Path) -> Dict[str, Shape]:
    """The (hidden, kv, intermediate) each pruning method of an ``lm_brown.py`` result ended with."""
    result = json.loads(path.read_text())
    shapes = {}
    for d in result["details"]:
        if d["method"] in ("dense", "dense_ft"):
            continue
        w = d["widths"]
        shapes.setdefault(d["method"], (w["hidden_size"], w["num_key_value_heads"], w["intermediate_size"]))
    return shapes


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 224, 192, 176, 160, 144, 128, 96])
    p.add_argument("--kv", type=int, nargs="+", default=[2, 1])
    p.add_argument("--shapes-from", type=Path, default=None, help="add the shapes of an lm_brown.py result")
    p.add_argument("--only-methods", action="store_true", help="with --shapes-from: only those shapes")
    p.add_argument("--from", dest="from_json", type=Path, default=None, help="with --best: an earlier oracle run")
    p.add_argument("--best", type=int, default=0, help="rerun the best N shapes of --from (other --seeds)")
    p.add_argument("--oracle-out", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None)
    p.add_argument("--merge", type=Path, nargs="+", default=None)
    p.add_argument("--methods-json", type=Path, nargs="*", default=[],
                   help="lm_brown.py results whose methods are placed on the plot")
    ours, rest = p.parse_known_args(argv)
    return ours, rest


def summarize(rows: List[dict]) -> List[dict]:
    by_shape: Dict[tuple, List[dict]] = {}
    for r in rows:
        by_shape.setdefault((r["hidden"], r["kv"], r["intermediate"]), []).append(r)
    out = []
    for (h, kv, m), rs in by_shape.items():
        ppl = [r["val_ppl"] for r in rs]
        out.append({"hidden": h, "kv": kv, "intermediate": m, "hidden_fraction": rs[0]["hidden_fraction"],
                    "params_ratio": rs[0]["params_ratio"], "seeds": len(rs), "val_ppl": statistics.fmean(ppl),
                    "val_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                    "val_ppl_after_pruning": statistics.fmean(r["val_ppl_after_pruning"] for r in rs),
                    "methods": sorted({m for r in rs for m in r.get("methods", [])})})
    out.sort(key=lambda s: s["val_ppl"])
    for i, s in enumerate(out):
        s["rank"] = i + 1
    return out


def table(result: dict) -> str:
    from tabulate import tabulate

    rows = [[s["rank"], s["hidden"], s["kv"], s["intermediate"], f"{s['hidden_fraction']:.3f}",
             f"{s['params_ratio']:.3f}", s["seeds"], f"{s['val_ppl_after_pruning']:.2f}",
             f"{s['val_ppl']:.3f}" + (f" ± {s['val_ppl_std']:.3f}" if s["seeds"] > 1 else ""),
             ", ".join(s["methods"])] for s in result["summary"]]
    return tabulate(rows, headers=["rank", "hidden", "KV heads", "MLP", "hidden frac", "params ratio", "seeds",
                                   "ppl after cut", "val ppl after fine-tune", "method's shape"], tablefmt="github")


def plot(result: dict, methods_json: List[Path], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for kv, marker in ((2, "o"), (1, "s")):
        pts = sorted((s["hidden_fraction"], s["val_ppl"], s["val_ppl_std"]) for s in result["summary"]
                     if s["kv"] == kv and not s["methods"])
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker=marker, label=f"oracle: {kv} KV head(s), widest MLP", capsize=2)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][2:] * 3)
    for path_ in methods_json:
        res = json.loads(Path(path_).read_text())
        hidden0 = res["dense"]["widths"]["hidden_size"]
        widths = {d["method"]: d["widths"]["hidden_size"] for d in res["details"]}
        for s in res["summary"]:
            if s["method"] in ("dense", "dense_ft"):
                continue
            tag = Path(path_).stem.replace("lm_brown", "").strip("_")
            label = s["method"] + (f" ({tag})" if tag else "")
            ax.errorbar([widths[s["method"]] / hidden0], [s["val_ppl"]], yerr=[s["val_ppl_std"]], marker="*",
                        markersize=11, linestyle="none", color=next(colors), label=label, capsize=2)
    ax.set_xlabel("hidden size kept (fraction of dense)")
    ax.set_ylabel("val perplexity per byte after fine-tuning")
    ax.set_title(f"Allocation oracle: Llama on Brown at {result['settings']['target']:.0%} params")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    ours, rest = parse(argv)
    out = ours.oracle_out or RESULTS / "lm_oracle.json"
    if ours.merge:
        parts = [json.loads(p.read_text()) for p in ours.merge]
        result = copy.deepcopy(parts[0])
        for part in parts[1:]:
            if part["dense_val_ppl"] != result["dense_val_ppl"]:
                raise SystemExit("error: the parts were run on different dense models")
            result["rows"] += part["rows"]
            result["seconds_cpu"] = round(result["seconds_cpu"] + part["seconds_cpu"], 1)
        result["summary"] = summarize(result["rows"])
    elif ours.report:
        result = json.loads(ours.report.read_text())
    else:
        result = run(ours, rest)
    if ours.merge or not ours.report:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    print(table(result))
    plot(result, ours.methods_json, out.with_suffix(".png") if not ours.report else ours.report.with_suffix(".png"))
    return result


def run(ours, rest) -> dict:
    a = lm.parse_args(rest)
    torch.set_num_threads(a.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    train, val, info = lm.load_data(a)
    a.data_source, a.train_data = info["source"], train
    cfg = lm.model_config(a)
    lm.resolve_schedule(a)
    windows = lm.eval_windows(val, a.seq_len, a.eval_windows)
    dense, _ = lm.get_dense(a, cfg, train)
    dense_eval = lm.evaluate(dense, windows, a.eval_batch)
    dense_params = sum(p.numel() for p in dense.parameters())
    example = lm.Batches(train, a.batch_size, a.seq_len, seed=999).next()[:, :-1]
    dg = hfp_fx.dependency_graph(dense, {"input_ids": example}, capture="export")

    shapes: Dict[Shape, List[str]] = {}
    if ours.best:
        earlier = json.loads(ours.from_json.read_text())
        for s in earlier["summary"][:ours.best]:
            shapes[(s["hidden"], s["kv"], s["intermediate"])] = s["methods"]
    elif not ours.only_methods:
        for shape in iso_param_shapes(cfg, a.target, ours.hidden, ours.kv):
            shapes[shape] = []
    if ours.shapes_from is not None and not ours.best:
        for method, shape in method_shapes(ours.shapes_from).items():
            shapes.setdefault(shape, []).append(method)
    print(f"{len(shapes)} shapes x seeds {a.seeds}: {sorted(shapes)}", flush=True)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "train_data"},
              "dense_val_ppl": dense_eval["val_ppl"], "dense_params": dense_params, "rows": []}
    for seed in a.seeds:
        for shape, methods in sorted(shapes.items(), reverse=True):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = constrained_magnitude(dense, dg, shape)
            params = sum(p.numel() for p in model.parameters())
            after = lm.evaluate(model, windows, a.eval_batch)["val_ppl"]
            data = lm.Batches(train, a.batch_size, a.seq_len, seed=1000 + seed)
            opt = lm.adamw(model, a.finetune_lr, a.weight_decay)
            lm.train_steps(f"oracle {shape}", model, data, [opt], 0, a.finetune_steps, a.finetune_steps,
                           a.warmup_finetune, a.log_every, **lm.distill_options(a, dense))
            ev = lm.evaluate(model, windows, a.eval_batch)
            row = {"hidden": shape[0], "kv": shape[1], "intermediate": shape[2],
                   "hidden_fraction": shape[0] / cfg.hidden_size, "params": params,
                   "params_ratio": params / dense_params, "seed": seed, "val_ppl_after_pruning": after,
                   "val_ppl": ev["val_ppl"], "methods": methods, "seconds": round(time.perf_counter() - t0, 1)}
            result["rows"].append(row)
            print(f"==> {shape} seed {seed}: params {row['params_ratio']:.3f}, ppl after cut {after:.3f}, "
                  f"after fine-tune {ev['val_ppl']:.3f} ({row['seconds']} s)", flush=True)
            result["summary"] = summarize(result["rows"])
            result["seconds_cpu"] = round(time.process_time() - cpu0, 1)
            result["seconds_wall"] = round(time.perf_counter() - wall0, 1)
            path = ours.oracle_out or RESULTS / "lm_oracle.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
