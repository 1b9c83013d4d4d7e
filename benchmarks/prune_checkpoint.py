"""Time and peak memory of pruning a large Hugging Face checkpoint on disk (``hfp-fx prune hf:DIR``).

No 8B weights can be downloaded here, so the script writes a checkpoint of random bf16 weights for
a Llama-3-8B-shaped config (or the 1B config) in shards of ``--shard-gb`` (5 GB, as the hub's),
one tensor in memory at a time, then runs

    /usr/bin/time -v hfp-fx prune hf:DIR --params 50% --uniform-blocks --out OUT

in a fresh process and records its wall time and maximum resident set size, the kept widths and
that ``OUT`` holds a loadable config.  Exactness against the in-memory path is the test suite's job
(``tests/test_checkpoint.py``); random weights rank channels arbitrarily, which changes nothing
about time or memory.

    python benchmarks/prune_checkpoint.py                         # 8B: ~16 GB written, ~25 GB of disk
    python benchmarks/prune_checkpoint.py --model llama-3.2-1b    # 2.5 GB, a minute or two
    python benchmarks/prune_checkpoint.py --keep                  # leave the checkpoints in --dir

Writes ``benchmarks/results/prune_checkpoint.json`` (``--out``); needs ``transformers``.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from hfp_fx.interop.safetensors_stream import INDEX_NAME, write_safetensors

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS = {  # the public configs' shapes (no weights)
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                       tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True),
}


def write_random_checkpoint(directory: Path, config, shard_bytes: int, seed: int = 0) -> int:
    """A safetensors checkpoint of ``config`` with N(0, 0.02) bf16 weights (norms at 1), in shards of
    at most ``shard_bytes``, written one tensor at a time; returns the bytes written."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    seen, shapes = set(), {}
    for name, p in model.named_parameters():  # (tied weights once, under their first name)
        if id(p) not in seen:
            seen.add(id(p))
            shapes[name] = (tuple(p.shape), torch.bfloat16)
    shards, current, size = [], {}, 0
    for name, (shape, dtype) in shapes.items():
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = (shape, dtype), size + nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)

    def produce(name):
        shape = shapes[name][0]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)

    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / file, shard, produce)
        weight_map.update({k: file for k in shard})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    return total


def timed_prune(src: Path, out: Path, params: str) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "hfp_fx", "prune", f"hf:{src}", "--params", params,
           "--uniform-blocks", "--out", str(out), "--show", "6"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(v) * 60 ** i for i, v in enumerate(reversed(wall.split(":"))))
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", done.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([\d.]+)", done.stderr).group(1))
    return {"command": " ".join(cmd[2:]).replace(sys.executable, "python"), "wall_s": round(seconds, 1),
            "cpu_s": round(user + system, 1), "max_rss_gb": round(rss_kb / 2 ** 20, 2), "stdout": done.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="llama-3-8b")
    ap.add_argument("--params", default="50%")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--dir", default="/tmp/hfp_fx_checkpoint", help="where the checkpoints are written")
    ap.add_argument("--keep", action="store_true", help="leave the checkpoints on disk")
    ap.add_argument("--out", default=str(RESULTS / "prune_checkpoint.json"))
    args = ap.parse_args()
    import transformers

    root = Path(args.dir)
    src, out = root / f"{args.model}-random", root / f"{args.model}-pruned"
    for d in (src, out):
        shutil.rmtree(d, ignore_errors=True)
    config = transformers.LlamaConfig(**CONFIGS[args.model])
    start = time.perf_counter()
    written = write_random_checkpoint(src, config, int(args.shard_gb * 2 ** 30))
    write_s = time.perf_counter() - start
    print(f"wrote {written / 2 ** 30:.2f} GiB of random bf16 weights to {src} in {write_s:.0f} s")
    try:
        run = timed_prune(src, out, args.params)
        print(run["stdout"])
        small = transformers.AutoConfig.from_pretrained(out)
        pruned_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        row = {"model": args.model, "params_target": args.params, "dense_gib": round(written / 2 ** 30, 2),
               "pruned_gib": round(pruned_bytes / 2 ** 30, 2), "shards": len(list(src.glob("*.safetensors"))),
               "hidden_size": [config.hidden_size, small.hidden_size],
               "intermediate_size": [config.intermediate_size, small.intermediate_size],
               "heads": [config.num_attention_heads, small.num_attention_heads],
               "kv_heads": [config.num_key_value_heads, small.num_key_value_heads],
               **{k: v for k, v in run.items() if k != "stdout"}}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{args.model}: {run['wall_s']} s wall, {run['cpu_s']} CPU-s, peak RSS {run['max_rss_gb']} GiB")
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "cpus": torch.get_num_threads()}
    path = Path(args.out)  # one row per model: a run replaces its model's row
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if r["model"] != args.model] + [{**row, "meta": meta}]
    path.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
