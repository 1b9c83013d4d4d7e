"""Teach hfp_fx a custom op: until it has a rule, the channels through it are fixed (with a reason).

    python examples/custom_op.py

``scaled_swish`` stands for any function FX must not trace into (a custom kernel, a C++
extension): ``torch.fx.wrap`` keeps it as one graph node.  hfp_fx knows nothing about it, so it
refuses to prune the channels that flow through it.  One line registers it as a per-channel
(pass-through) op, after which those channels are prunable and the pruned model stays exact.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

import hfp_fx
from hfp_fx.passes.registry import register_function
from hfp_fx.passes.rules_tensor import passthrough

log = logging.getLogger("custom_op")


def scaled_swish(x: torch.Tensor) -> torch.Tensor:
    return 1.5 * x * torch.sigmoid(x)


torch.fx.wrap("scaled_swish")  # one call_function node in the traced graph


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = scaled_swish(self.bn1(self.conv1(x)))
        x = scaled_swish(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def prunable_fraction(model: nn.Module, x: torch.Tensor) -> float:
    dg = hfp_fx.dependency_graph(model, x)
    for g in dg.groups:
        if not g.prunable and g.name.startswith("conv"):
            log.info("  %s (%s): not prunable: %s", g.id, g.name, g.reason)
    return sum(g.channels for g in dg.prunable_groups) / sum(g.channels for g in dg.groups)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    before = prunable_fraction(model, x)
    log.info("before registering a rule: %.0f%% of channels prunable", 100 * before)

    register_function(scaled_swish)(passthrough)  # elementwise: channel c in -> channel c out
    after = prunable_fraction(model, x)
    log.info("after: %.0f%% of channels prunable", 100 * after)

    small = hfp_fx.prune(model, x, {"macs": 0.5})
    reference = hfp_fx.mask(model, x, keep=small.meta["hfp"].keep)  # same shapes, removed channels zeroed
    error = float((small(x) - reference.eval()(x)).abs().max())
    log.info("pruned to %s MACs; max |pruned - masked| = %.2e", f"{small.meta['hfp'].achieved.macs:,}", error)
    return {"before": before, "after": after, "max_error": error}


if __name__ == "__main__":
    main()
