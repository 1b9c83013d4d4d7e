"""benchmarks/lm_brown.py: the corpus reader, and the whole --quick run offline (synthetic text)."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import load_script

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lm_brown.py"


def load():
    return load_script(SCRIPT, "lm_brown")


def test_brown_reader_strips_tags_and_splits_by_document(tmp_path):
    lm = load()
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, 1/2/cd (/( so/rb )/) ./.\n\n"
              "\tIt/pps ended/vbd ./.\n")
    tarball = tmp_path / "corpus.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for i in range(40):
            name = f"c{'ab'[i // 20]}{i % 20 + 1:02d}"
            data = tagged.replace("jury", f"jury{i}").encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        readme = tarfile.TarInfo("package/README")
        tar.addfile(readme, io.BytesIO(b""))
    docs = lm.brown_documents(tarball, expected=40)
    assert [n for n, _ in docs][:2] == ["ca01", "ca02"] and len(docs) == 40
    assert docs[0][1] == 'The jury0 said "no evidence", 1/2 (so).\nIt ended.'
    train, val, info = lm.split_documents(docs)
    assert info["val_documents"] == 2 and info["val_names"] == ["ca20", "cb20"]
    assert b"jury19" in bytes(val.tolist()) and b"jury19" not in bytes(train.tolist())
    with pytest.raises(RuntimeError, match="expected 500"):
        lm.brown_documents(tarball)


def test_schedule_and_windows():
    lm = load()
    assert lm.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lm.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lm.lr_factor(100, 100, 10) == pytest.approx(0.1)
    import torch

    val = torch.arange(1000, dtype=torch.uint8)
    w = lm.eval_windows(val, 16, 8)
    assert w.shape == (8, 17) and w[0, 0] == 0


@pytest.mark.slow
def test_quick_run_offline(tmp_path):
    """The whole --quick run on the synthetic text: every method, exact hfp/magnitude, ~50% params."""
    out = tmp_path / "lm.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--synthetic", "--cache-dir", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["data"]["source"] == "synthetic"
    rows = {r["method"]: r for r in result["rows"]}
    # (depth_only is skipped: whole layers alone cannot stop at 50% of this model)
    assert set(rows) == {"dense", "dense_ft", "hfp", "hfp_alloc", "hfp_search", "magnitude", "activation", "taylor",
                         "tp_llm", "magnitude_depth"}
    assert rows["taylor"]["importance"] == "taylor" and rows["hfp"]["distill"] is False
    for method in ("hfp", "hfp_alloc", "hfp_search", "magnitude", "activation", "taylor"):
        assert 0.48 <= rows[method]["params_ratio"] <= 0.5
        detail = next(d for d in result["details"] if d["method"] == method)
        assert max(detail["exactness"].values()) < 1e-4
    # the search variants keep at least every learned width
    for method in ("hfp_alloc", "hfp_search"):
        detail = next(d for d in result["details"] if d["method"] == method)[method]
        assert all(detail["kept_per_group"][g] >= k for g, k in detail["learned_kept_per_group"].items())
    assert abs(rows["tp_llm"]["params_ratio"] - 0.5) < 0.03
    assert all(r["tokens_per_s_ratio"]["b1"] > 0 and r["val_ppl"] > 1 for r in rows.values())


def test_max_prune_option():
    lm = load()
    assert lm.parse_max_prune("model.embed_tokens=0.3,*.mlp.*=0.5") == {"model.embed_tokens": 0.3, "*.mlp.*": 0.5}
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        lm.parse_max_prune("0.3")


def test_oracle_shapes_sit_on_the_iso_parameter_line_and_are_cut_exactly():
    import torch

    import hfp_fx

    oracle = load_script(SCRIPT.parent / "lm_oracle.py", "lm_oracle")
    args = oracle.lm.parse_args(["--quick"])
    cfg = oracle.lm.model_config(args)  # 2 layers, hidden 64, 4 heads / 2 KV heads, MLP 172
    dense = oracle.params_of(cfg, 64, 2, 172)
    shapes = oracle.iso_param_shapes(cfg, 0.5, [64, 56, 48, 40], [2, 1])
    assert shapes and all(h % (2 * kv) == 0 for h, kv, _ in shapes)
    for h, kv, m in shapes:  # the widest MLP under the budget, within 2% of it
        assert 0.48 * dense <= oracle.params_of(cfg, h, kv, m) <= 0.5 * dense
        assert m == 172 or oracle.params_of(cfg, h, kv, m + 1) > 0.5 * dense
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 16))
    dg = hfp_fx.dependency_graph(model, {"input_ids": ids}, capture="export")
    h, kv, m = shapes[0]
    small = oracle.constrained_magnitude(model, dg, (h, kv, m))
    c = small.config
    assert (c.hidden_size, c.num_key_value_heads, c.intermediate_size) == (h, kv, m)
    assert sum(p.numel() for p in small.parameters()) == oracle.params_of(cfg, h, kv, m)
