"""The ``hfp-fx`` command line (also ``python -m hfp_fx``).

Examples::

    hfp-fx inspect torchvision:resnet50
    hfp-fx inspect timm:convnext_tiny --dot convnext.dot
    hfp-fx count torchvision:mobilenet_v2 --input-size 1,3,160,160
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import torch

import hfp_fx
from hfp_fx.specs import SpecError, load_spec

log = logging.getLogger("hfp_fx")

EPILOG = """examples:
  hfp-fx inspect torchvision:resnet50
  hfp-fx inspect timm:convnext_tiny --dot convnext.dot
  hfp-fx inspect my_models.py:build_net --input-size 1,3,64,64
  hfp-fx count torchvision:mobilenet_v2
"""


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
    model, x = _load(args)
    dg = hfp_fx.dependency_graph(model, x)
    print(dg.summary(max_members=args.members, only_prunable=args.prunable_only))
    c = hfp_fx.count(model, x)
    print(f"dense: {c.params:,} params, {c.macs:,} MACs; graph built in {dg.seconds:.2f} s "
          f"({len(dg.gm.graph.nodes)} nodes)")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(dg.to_dot())
        print(f"wrote {args.dot}")
    return 0


def cmd_count(args) -> int:
    model, x = _load(args)
    c = hfp_fx.count(model, x)
    print(f"params: {c.params:,}\nMACs:   {c.macs:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hfp-fx", description="Holistic Filter Pruning for torch.fx graphs.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("spec", help="torchvision:NAME, timm:NAME, path/to/file.py:factory or package.module:factory")
        p.add_argument("--input-size", help="example input shape, e.g. 1,3,224,224 (default: the model's)")
        p.set_defaults(func=fn)
        return p

    p = add("inspect", cmd_inspect, "print the prune groups of a model")
    p.add_argument("--dot", help="write the dependency graph as Graphviz DOT to this file")
    p.add_argument("--members", type=int, default=3, help="member modules shown per group")
    p.add_argument("--prunable-only", action="store_true", help="list prunable groups only")
    add("count", cmd_count, "print parameters and MACs")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (SpecError, hfp_fx.TraceError, ValueError) as exc:
        print(f"hfp-fx: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
