"""HFP training under DistributedDataParallel (CPU/gloo or CUDA/nccl).

    torchrun --nproc_per_node=2 examples/ddp_train.py --steps 50 --out runs/ddp

Every rank prepares the same model (the analysis is deterministic), trains it wrapped in DDP
with ``loss = task + hfp_fx.complexity_loss(ddp_model)``, and finalizes it.  The script checks
that the complexity loss is identical on every rank and that every rank finalizes to the same
architecture and weights, then rank 0 writes ``summary.json`` and the pruned model
(``hfp_fx.save``) to ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx


class SmallNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                                   nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        return self.head(x.mean((2, 3)))


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--target", default="50%", help="MACs target")
    ap.add_argument("--out", default="runs/ddp")
    args = ap.parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    model = SmallNet()
    example = torch.randn(2, 3, 16, 16)
    prepared = hfp_fx.prepare(model, example, args.target, lambda_init=0.01).to(device)
    ddp = nn.parallel.DistributedDataParallel(prepared, device_ids=[device.index] if backend == "nccl" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank sees its own data
    losses = []
    for _ in range(args.steps):
        x = torch.randn(16, 3, 16, 16, generator=gen).to(device)
        y = torch.randint(0, 10, (16,), generator=gen).to(device)
        closs = hfp_fx.complexity_loss(ddp)
        loss = F.cross_entropy(ddp(x), y) + closs
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(closs.detach()))
    ddp.eval()
    small = hfp_fx.finalize(ddp)
    mine = {"complexity_losses": losses, "fingerprint": fingerprint(small),
            "kept": {k: g.kept for k, g in small.meta["hfp"].groups.items()},
            "achieved": dataclasses.asdict(small.meta["hfp"].achieved)}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        same_loss = all(g["complexity_losses"] == gathered[0]["complexity_losses"] for g in gathered)
        same_model = all(g["fingerprint"] == gathered[0]["fingerprint"] for g in gathered)
        os.makedirs(args.out, exist_ok=True)
        summary = {"world_size": world, "backend": backend, "identical_complexity_loss": same_loss,
                   "identical_finalized_model": same_model, "achieved": mine["achieved"],
                   "target": dataclasses.asdict(small.meta["hfp"].target), "final_complexity": hfp_fx.complexity(ddp)}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        hfp_fx.save(small, os.path.join(args.out, "small.pt"))
        print(json.dumps(summary, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
