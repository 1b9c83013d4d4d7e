"""FSDP2: two CPU ranks (gloo) train a sharded prepared Llama and finalize to the model one process
trained on the same global batches gives (same kept channels, same logits)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hfp_fx
from test_ddp import free_port

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")
if not hasattr(torch.distributed.fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "fsdp_train.py")


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_sharded_ranks_finalize_to_the_single_process_model(tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "--master_addr=127.0.0.1", SCRIPT, "--steps", "8", "--out", str(tmp_path / "fsdp")])
    run([sys.executable, SCRIPT, "--steps", "8", "--out", str(tmp_path / "one")])
    sharded, single = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("fsdp", "one"))
    assert sharded["world_size"] == 2 and sharded["sharded"] and sharded["identical_finalized_model"]
    assert sharded["keep"] == single["keep"] and sharded["keep"]  # the same widths, something pruned
    assert sharded["achieved"]["params"] <= sharded["target_params"]
    a, b = torch.tensor(sharded["logits"]), torch.tensor(single["logits"])
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())
    assert (tmp_path / "fsdp" / "pruned" / "config.json").exists()  # back to the Hugging Face class


def test_fully_shard_says_what_it_needs():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(TypeError, match="hfp_fx.prepare"):
        hfp_fx.fully_shard(model)
    prepared = hfp_fx.prepare(model, torch.randn(2, 4), {"params": 0.5})
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            hfp_fx.fully_shard(prepared)
