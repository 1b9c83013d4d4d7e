"""Every script under examples/ runs with tiny settings and does what its docstring says."""
import logging
from pathlib import Path

import pytest
import torch

import hfp_fx
from helpers import load_script

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    return load_script(EXAMPLES / f"{name}.py", f"example_{name}")


def test_every_example_is_covered():
    tested = {"quickstart", "one_shot_prune", "inspect_graph", "custom_op", "prune_llama",
              "ddp_train", "fsdp_train"}  # (the last two: tests/test_ddp.py, tests/test_fsdp.py)
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart_meets_target_and_reloads(tmp_path):
    out = load("quickstart").main(["--steps", "3", "--size", "32", "--batch", "4", "--out", str(tmp_path / "m.hfp")])
    assert out["pruned_macs"] <= out["target_macs"] < out["dense_macs"]
    assert out["reload_equal"]


def test_one_shot_prune_reports_speedup(monkeypatch):
    """The reported MACs ratio is the measured one and the speedup is the ratio of the two timings
    of the dense and the pruned model (whose channel counts are multiples of ``--round-to``)."""
    example = load("one_shot_prune")
    pruned, timed = [], []
    real_prune, real_median = hfp_fx.prune, example.median_ms

    def prune(model, x, *args, **kwargs):
        small = real_prune(model, x, *args, **kwargs)
        pruned.append((model, x, small))
        return small

    def median_ms(model, x, min_time):
        ms = real_median(model, x, min_time)
        timed.append((model, ms))
        return ms

    monkeypatch.setattr(hfp_fx, "prune", prune)
    monkeypatch.setattr(example, "median_ms", median_ms)
    out = example.main(["--model", "resnet18", "--size", "64", "--batch", "1", "--min-time", "0.05"])
    ((model, x, small),) = pruned
    dense, achieved = hfp_fx.count(model, x), hfp_fx.count(small, x)
    assert out["macs_ratio"] == achieved.macs / dense.macs
    assert 0.45 < out["macs_ratio"] <= 0.5 and achieved.params < dense.params
    (timed_dense, t_dense), (timed_small, t_small) = timed
    assert timed_dense is model and timed_small is small
    assert out["speedup"] == pytest.approx(t_dense / t_small)
    for name, conv in small.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            assert conv.out_channels % 8 == 0, (name, conv.out_channels)


def test_inspect_graph_renders(tmp_path, capsys):
    png = tmp_path / "g.png"
    out = load("inspect_graph").main(["--model", "shufflenet_v2_x0_5", "--size", "64", "--png", str(png)])
    assert out["prunable"] > 0 and png.stat().st_size > 1000
    assert "| group" in capsys.readouterr().out


def test_custom_op_rule_makes_channels_prunable(caplog):
    with caplog.at_level(logging.INFO):
        out = load("custom_op").main([])
    assert out["before"] == 0 < out["after"]
    assert out["default_after"] == 0  # the handler was registered for those calls only
    assert out["max_error"] < 1e-4
    assert "unsupported function" in caplog.text


def test_prune_llama_comes_back_as_a_llama():
    pytest.importorskip("transformers")
    out = load("prune_llama").main(["--steps", "6", "--batch", "2", "--length", "16"])
    assert out["pruned_params"] <= out["target_params"] < out["dense_params"]
    assert max(out["finalize_error"], out["to_pretrained_error"], out["reload_error"]) < 1e-4
    config = out["config"]
    assert config.hidden_size < 96 and config.hidden_size % config.num_attention_heads == 0
    assert out["generated"].startswith("the quick")  # the prompt, then greedy tokens
