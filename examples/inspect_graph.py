"""Look at a model's prune groups: the table, the networkx graph and a picture.

    python examples/inspect_graph.py --model shufflenet_v2_x0_5 --png groups.png

Each prune group is a set of channels that must be removed together (residual adds, concats,
channel shuffles ...); fixed groups say why they are not prunable.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torchvision

import hfp_fx

log = logging.getLogger("inspect_graph")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--png", type=Path, default=None, help="render the group graph to this PNG/SVG")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = torchvision.models.get_model(a.model)
    dg = hfp_fx.dependency_graph(model, torch.randn(1, 3, a.size, a.size))
    print(dg.summary())
    for g in dg.groups:
        if not g.prunable:
            log.info("fixed %s (%s, %d channels): %s", g.id, g.name, g.channels, g.reason)
    nx_graph = dg.to_networkx()
    log.info("networkx view: %d nodes, %d edges", nx_graph.number_of_nodes(), nx_graph.number_of_edges())
    if a.png:
        hfp_fx.render_graph(dg, a.png)
        log.info("wrote %s", a.png)
    return {"groups": len(dg.groups), "prunable": len(dg.prunable_groups)}


if __name__ == "__main__":
    main()
