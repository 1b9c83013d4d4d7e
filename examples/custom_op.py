"""Teach hfp_fx a custom op: until it has a handler, the channels through it are fixed (with a reason).

    python examples/custom_op.py

``scaled_swish`` stands for any function FX must not trace into (a custom kernel, a C++
extension): ``torch.fx.wrap`` keeps it as one graph node.  hfp_fx knows nothing about it, so it
refuses to prune the channels that flow through it.  One handler in a rule set of our own
declares it a per-channel (pass-through) op that does no MACs; passed as ``rules=``, it makes
those channels prunable for these calls only, and the pruned model stays exact.  hfp_fx's
default rules are not changed.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

import hfp_fx
from hfp_fx.passes.registry import OpHandler, default_rules
from hfp_fx.passes.rules_pointwise import passthrough

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


def prunable_fraction(model: nn.Module, x: torch.Tensor, rules=None) -> float:
    dg = hfp_fx.dependency_graph(model, x, rules=rules)
    for g in dg.groups:
        if not g.prunable and g.name.startswith("conv"):
            log.info("  %s (%s): not prunable: %s", g.id, g.name, g.reason)
    return sum(g.channels for g in dg.prunable_groups) / sum(g.channels for g in dg.groups)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, x = Net().eval(), torch.randn(2, 3, 16, 16)
    before = prunable_fraction(model, x)
    log.info("before registering a rule: %.0f%% of channels prunable", 100 * before)

    rules = default_rules()  # a copy of hfp_fx's handlers
    rules.register(OpHandler(passthrough, macs=False), functions=[scaled_swish])  # channel c in -> channel c out
    after = prunable_fraction(model, x, rules)
    log.info("after: %.0f%% of channels prunable", 100 * after)
    log.info("the default rules still refuse it: %.0f%% prunable", 100 * prunable_fraction(model, x))

    small = hfp_fx.prune(model, x, {"macs": 0.5}, rules=rules)
    reference = hfp_fx.mask(model, x, small.meta["hfp"].keep, rules=rules)  # same shapes, removed channels zeroed
    error = float((small(x) - reference.eval()(x)).abs().max())
    log.info("pruned to %s MACs; max |pruned - masked| = %.2e", f"{small.meta['hfp'].achieved.macs:,}", error)
    return {"before": before, "after": after, "default_after": prunable_fraction(model, x), "max_error": error}


if __name__ == "__main__":
    main()
