"""HFP training of a Hugging Face Llama under FSDP2 (CPU/gloo or CUDA/nccl).

    torchrun --nproc_per_node=2 examples/fsdp_train.py --steps 20 --out runs/fsdp
    python examples/fsdp_train.py --steps 20 --out runs/single     # one process, no sharding

Every rank prepares the same model (the analysis is deterministic), shards it with
``hfp_fx.fully_shard`` (FSDP2, the gates replicated), trains it on its share of each global batch
with ``loss = next-token loss + hfp_fx.complexity_loss(prepared)``, and finalizes it (a
collective: the full weights are gathered on every rank).  Rank 0 writes ``summary.json``: the
kept channels, whether every rank finalized to the same model, and the pruned model's logits on
a fixed batch, which one process trained on the same global batches must reproduce
(``tests/test_fsdp.py``); the pruned model is saved with ``to_pretrained`` / ``save_pretrained``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

import hfp_fx


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per step, split over the ranks")
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--params", type=float, default=0.5, help="parameter target (fraction)")
    ap.add_argument("--out", default="runs/fsdp")
    args = ap.parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if backend == "nccl" else torch.device("cpu")
    else:
        rank, world, device = 0, 1, torch.device("cpu")
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must split evenly over {world} ranks")
    model = build_model().to(device)
    example = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    prepared = hfp_fx.prepare(model, example, {"params": args.params}, uniform_blocks=True)
    if distributed:
        prepared = hfp_fx.fully_shard(prepared)
    opt = torch.optim.AdamW([p for n, p in prepared.named_parameters() if not n.startswith("hfp.")], lr=3e-3)
    gate_opt = torch.optim.SGD(hfp_fx.gate_parameters(prepared), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(2)  # the same global batches on every rank and in one process
    share = args.global_batch // world
    for step in range(args.steps):
        batch = torch.randint(0, 96, (args.global_batch, args.length), generator=data)
        ids = batch[rank * share:(rank + 1) * share].to(device)
        logits = prepared(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        (loss + hfp_fx.complexity_loss(prepared)).backward()
        opt.step()
        gate_opt.step()
        opt.zero_grad()
        gate_opt.zero_grad()
        if rank == 0 and step % 5 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    small = hfp_fx.finalize(prepared).eval()  # a collective under FSDP: every rank
    probe = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        logits = small(probe).float().cpu()
    same = True
    if distributed:
        prints = [None] * world
        dist.all_gather_object(prints, fingerprint(small))
        same = len(set(prints)) == 1
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = small.meta["hfp"]
        hfp_fx.to_pretrained(small.cpu(), like=model.cpu()).save_pretrained(out / "pruned")
        summary = {"world_size": world, "sharded": distributed, "identical_finalized_model": same,
                   "keep": report.keep, "achieved": {"params": report.achieved.params, "macs": report.achieved.macs},
                   "target_params": report.target.params, "logits": logits.tolist()}
        (out / "summary.json").write_text(json.dumps(summary))
        print(f"world {world}: params {report.achieved.params:,} of {report.dense.params:,}; wrote {out}")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
