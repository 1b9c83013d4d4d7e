"""Every script under examples/ runs with tiny settings and does what its docstring says."""
import importlib.util
import logging
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_covered():
    tested = {"quickstart", "one_shot_prune", "inspect_graph", "custom_op", "ddp_train"}  # ddp: tests/test_ddp.py
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart_meets_target_and_reloads(tmp_path):
    out = load("quickstart").main(["--steps", "3", "--size", "32", "--batch", "4", "--out", str(tmp_path / "m.hfp")])
    assert out["pruned_macs"] <= out["target_macs"] < out["dense_macs"]
    assert out["reload_equal"]


def test_one_shot_prune_reports_speedup():
    out = load("one_shot_prune").main(["--model", "resnet18", "--size", "64", "--batch", "1", "--min-time", "0.05"])
    assert 0.45 < out["macs_ratio"] <= 0.5
    assert out["speedup"] > 0


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
