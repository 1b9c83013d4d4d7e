"""HFP in a plain training loop: prepare -> train with the complexity loss -> finalize -> save.

    python examples/quickstart.py                      # ResNet-18, 64x64 synthetic data, 200 steps
    python examples/quickstart.py --steps 5 --size 32  # a smoke run (what CI runs)

Synthetic images keep the example self-contained; swap ``batches()`` for your DataLoader.
The gates get their own optimizer parameter group (constant learning rate, no weight decay),
the rest of the model trains as usual.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import hfp_fx

log = logging.getLogger("quickstart")


def batches(steps: int, batch: int, size: int, classes: int):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        yield torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, classes, (batch,), generator=gen)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--macs", default="50%", help="MACs target (fraction, percent or absolute)")
    p.add_argument("--out", type=Path, default=None, help="where to save the pruned model (default: a temp dir)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = torchvision.models.resnet18(num_classes=10)
    example = torch.randn(1, 3, a.size, a.size)
    prepared = hfp_fx.prepare(model, example, {"macs": a.macs})
    gates = hfp_fx.gate_parameters(prepared)
    others = [p for p in prepared.parameters() if all(p is not g for g in gates)]
    opt = torch.optim.SGD([{"params": others, "lr": 0.01, "weight_decay": 1e-4},
                           {"params": gates, "lr": 0.1, "weight_decay": 0.0}], momentum=0.9)

    prepared.train()
    for step, (x, y) in enumerate(batches(a.steps, a.batch, a.size, 10)):
        loss = F.cross_entropy(prepared(x), y) + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, a.steps // 5) == 0 or step == a.steps - 1:
            c = hfp_fx.complexity(prepared)
            log.info("step %d: loss %.3f, MACs %.3f of target", step, float(loss), c["macs_ratio"])

    small = hfp_fx.finalize(prepared.eval())  # exact budget projection + shrink
    dense, pruned = hfp_fx.count(model, example), hfp_fx.count(small, example)
    log.info("dense %s -> pruned %s (MACs %.1f%% of dense)", dense, pruned, 100 * pruned.macs / dense.macs)

    out = a.out or Path(tempfile.mkdtemp()) / "resnet18_pruned.hfp"
    hfp_fx.save(small, out)  # plan JSON + weights-only state dict: loading runs no pickled code
    reloaded = hfp_fx.load(out, lambda: torchvision.models.resnet18(num_classes=10), example)
    x = torch.randn(2, 3, a.size, a.size)
    same = torch.allclose(reloaded.eval()(x), small(x), atol=1e-5)
    log.info("saved to %s; reloaded model gives the same outputs: %s", out, same)
    return {"dense_macs": dense.macs, "pruned_macs": pruned.macs, "target_macs": prepared.hfp.target.macs,
            "reload_equal": same}


if __name__ == "__main__":
    main()
