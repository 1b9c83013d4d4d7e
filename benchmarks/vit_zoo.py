"""How far transformers prune, exactly: ViT-B/16, Swin-T/V2-T, MaxViT-T and timm ViTs.

For every model (random init, eval mode, 1x3x224x224 unless noted):

* **groups**: prunable groups and what they hold (attention heads, the residual stream, MLPs);
* **floor**: MACs and params with one channel left in every prunable group (``CostModel``), the
  least the channel structure allows;
* **prune**: ``hfp_fx.prune(model, x, {"macs": t})`` for t in ``--targets`` (default 20% and
  10%): achieved MACs / params as fractions of dense (counted on the pruned model with
  ``hfp_fx.count``) and seconds;
* **exact**: the 20% model against ``hfp_fx.mask`` on the same plan (max relative error), and a
  random keep of half of every group (heads and residual-stream channels included).

    python benchmarks/vit_zoo.py                       # all models below (~5 min on 2 cores)
    python benchmarks/vit_zoo.py --models vit_b_16 swin_t

Writes ``benchmarks/results/vit_zoo.json`` and prints a table.  For reference, Torch-Pruning's
README reports ViT-B/16 at 17.6 -> 4.6 GMACs (26%) with LayerNorm and heads sliced
approximately.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate

import hfp_fx
from zoo import randomize_zero_weights

RESULTS = Path(__file__).resolve().parent / "results"
TORCHVISION = ["vit_b_16", "swin_t", "swin_v2_t", "maxvit_t"]
TIMM = ["vit_small_patch16_224", "deit_tiny_distilled_patch16_224", "convnextv2_atto"]


def build(name: str):
    if name in TORCHVISION:
        return randomize_zero_weights(torchvision.models.get_model(name, weights=None)).eval()
    import timm

    return randomize_zero_weights(timm.create_model(name, pretrained=False)).eval()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (a.abs().max() + 1e-12))


def kind_of(group) -> str:
    """A label for what a group holds, from its members' parameter names."""
    names = " ".join(m.target for m in group.members)
    if any(k in names for k in ("in_proj_weight", "qkv", "q_proj")) and any(
            m.dim == 0 and any(k in m.target for k in ("in_proj_weight", "qkv", "q_proj")) for m in group.members):
        return "heads"
    if any(k in names for k in ("class_token", "cls_token", "pos_embed", "conv_proj", "patch_embed", "features.0.0",
                                "stem")):
        return "stream"
    return "other"


def run(name: str, targets, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    dg = hfp_fx.dependency_graph(model, x)
    build_s = time.perf_counter() - start
    cm = hfp_fx.CostModel(dg)
    dense = cm.counts()
    floor = cm.counts(dg.alive({g.id: [0] for g in dg.prunable_groups})[cm.unit_ids])
    kinds = {}
    for g in dg.prunable_groups:
        kinds[kind_of(g)] = kinds.get(kind_of(g), 0) + 1
    row = {"model": name, "groups": len(dg.groups), "prunable_groups": len(dg.prunable_groups), "kinds": kinds,
           "prunable_fraction": dg.prunable_fraction(), "build_s": build_s,
           "floor_macs": floor.macs / dense.macs, "floor_params": floor.params / dense.params, "prune": []}
    for t in targets:
        start = time.perf_counter()
        small = hfp_fx.prune(model, x, {"macs": t})
        seconds = time.perf_counter() - start
        counted = hfp_fx.count(small, x)
        entry = {"target": t, "macs": counted.macs / dense.macs, "params": counted.params / dense.params,
                 "seconds": seconds}
        if t == targets[0]:
            keep = small.meta["hfp"].keep
            with torch.no_grad():
                entry["max_rel_err"] = max_rel_err(hfp_fx.mask(dg, keep=keep)(x), small.eval()(x))
        row["prune"].append(entry)
    gen = torch.Generator().manual_seed(seed)
    keep = {g.id: sorted(torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 2)].tolist())
            for g in dg.prunable_groups}
    with torch.no_grad():
        row["random_keep_max_rel_err"] = max_rel_err(hfp_fx.mask(dg, keep=keep)(x), hfp_fx.shrink(dg, keep=keep)(x))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=TORCHVISION + TIMM)
    ap.add_argument("--targets", nargs="*", type=float, default=[0.2, 0.1])
    ap.add_argument("--out", default=str(RESULTS / "vit_zoo.json"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        row = run(name, args.targets)
        rows.append(row)
        print(f"{name}: floor {row['floor_macs']:.3f} MACs, " +
              ", ".join(f"{p['target']:.0%} -> {p['macs']:.4f}" for p in row["prune"]), flush=True)
    table = [[r["model"], r["prunable_groups"], ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items())),
              f"{r['floor_macs']:.2%}", *[f"{p['macs']:.2%} / {p['params']:.2%}" for p in r["prune"]],
              f"{max(r['prune'][0]['max_rel_err'], r['random_keep_max_rel_err']):.1e}"] for r in rows]
    headers = ["model", "prunable groups", "kinds", "MACs floor",
               *[f"prune {t:.0%}: MACs / params" for t in args.targets], "max rel err"]
    print(tabulate(table, headers=headers, tablefmt="github"))
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "input": [1, 3, 224, 224], "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
