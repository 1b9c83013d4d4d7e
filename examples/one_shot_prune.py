"""One-shot pruning of a torchvision model, without training, and what it buys in latency.

    python examples/one_shot_prune.py --model mobilenet_v2 --macs 50%
    python examples/one_shot_prune.py --model resnet18 --size 64 --batch 1 --min-time 0.05  # smoke run

``hfp_fx.prune`` ranks channels by normalised weight magnitude and projects onto the MACs
budget exactly; fine-tune the result afterwards to recover accuracy.
"""
from __future__ import annotations

import argparse
import logging

import torch
import torch.utils.benchmark as benchmark
import torchvision

import hfp_fx

log = logging.getLogger("one_shot_prune")


def median_ms(model: torch.nn.Module, x: torch.Tensor, min_time: float) -> float:
    with torch.inference_mode():
        model(x)  # warm-up
        timer = benchmark.Timer("model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50", help="a torchvision classification model name")
    p.add_argument("--macs", default="50%")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per model")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = torchvision.models.get_model(a.model).eval()
    example = torch.randn(1, 3, a.size, a.size)
    small = hfp_fx.prune(model, example, {"macs": a.macs}, importance="l1", round_to=a.round_to).eval()
    report = small.meta["hfp"]
    dense, pruned = report.dense, report.achieved
    log.info("%s: MACs %s -> %s (%.1f%%), params %s -> %s", a.model, f"{dense.macs:,}", f"{pruned.macs:,}",
             100 * pruned.macs / dense.macs, f"{dense.params:,}", f"{pruned.params:,}")
    x = torch.randn(a.batch, 3, a.size, a.size)
    t_dense, t_small = median_ms(model, x, a.min_time), median_ms(small, x, a.min_time)
    speedup = t_dense / t_small
    log.info("latency batch %d: dense %.2f ms, pruned %.2f ms: %.2fx faster (MACs ratio %.2fx)", a.batch, t_dense,
             t_small, speedup, dense.macs / pruned.macs)
    return {"macs_ratio": pruned.macs / dense.macs, "speedup": speedup}


if __name__ == "__main__":
    main()
