"""The hfp-fx command line: inspect, count, prune (safe save), bench, and its errors."""
import subprocess
import sys

import pytest
import torch
import torchvision

import hfp_fx
from hfp_fx.interop.cli import main

SMALL = ["--input-size", "1,3,64,64"]
NET = ("import torch.nn as nn\n"
       "def build():\n"
       "    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))\n"
       "    m.example_input_shape = (1, 3, 16, 16)\n"
       "    return m\n")


def test_inspect_prints_groups_and_writes_dot(tmp_path, capsys):
    dot = tmp_path / "g.dot"
    assert main(["inspect", "torchvision:resnet18", *SMALL, "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "| group" in out and "channels prunable" in out and "MACs" in out
    assert dot.read_text().startswith("digraph")


def test_count_matches_api(capsys):
    assert main(["count", "torchvision:mobilenet_v3_small", *SMALL]) == 0
    out = capsys.readouterr().out
    c = hfp_fx.count(torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64))
    assert f"{c.params:,}" in out and f"{c.macs:,}" in out


def test_prune_saves_loadable_model(tmp_path, capsys):
    out_file = tmp_path / "r18.pt"
    assert main(["prune", "torchvision:resnet18", *SMALL, "--macs", "40%", "--out", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "kept %" in text and "target" in text and f"hfp_fx.load({str(out_file)!r})" in text
    x = torch.randn(1, 3, 64, 64)
    small = hfp_fx.load(out_file)  # the file records the model spec and the input shape
    assert small.meta["hfp"].model_spec == "torchvision:resnet18"
    assert small.meta["hfp"].inputs == [((1, 3, 64, 64), "float32")]
    c = hfp_fx.count(small, x)
    assert c.macs <= 0.4 * hfp_fx.count(torchvision.models.resnet18(), x).macs
    again = hfp_fx.load(out_file, torchvision.models.resnet18, x)  # code-built models, as before
    with torch.no_grad():
        assert torch.equal(again.eval()(x), small.eval()(x))


def test_prune_out_of_a_user_file_loads_from_another_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "net.py:build", "--macs", "50%", "--out", "small.pt"]) == 0
    monkeypatch.chdir(tmp_path.parent)
    small = hfp_fx.load(tmp_path / "small.pt")
    assert small.meta["hfp"].model_spec == f"{tmp_path / 'net.py'}:build"
    assert small(torch.randn(1, 3, 16, 16)).shape == (1, 4, 14, 14)


def test_plot_without_matplotlib_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(hfp_fx, "prune", lambda *a, **k: pytest.fail("pruned although --plot cannot work"))
    out_file = tmp_path / "r18.pt"
    assert main(["prune", "torchvision:resnet18", *SMALL, "--macs", "40%", "--out", str(out_file),
                 "--plot", str(tmp_path / "w.png")]) == 2
    assert "--plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err
    assert not out_file.exists()


def test_png_without_dot_or_matplotlib_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr(hfp_fx, "dependency_graph", lambda *a, **k: pytest.fail("analysed although --png cannot work"))
    assert main(["inspect", "torchvision:resnet18", *SMALL, "--png", str(tmp_path / "g.png")]) == 2
    assert "--png (without Graphviz's dot) needs matplotlib" in capsys.readouterr().err
    assert main(["inspect", f"{tmp_path / 'net.py'}:build", "--png", str(tmp_path / "g.dot")]) == 2  # .dot needs neither
    assert "no such file" in capsys.readouterr().err


def test_prune_saves_before_plotting(tmp_path, monkeypatch, capsys):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(hfp_fx, "plot_widths", broken_plot)
    (tmp_path / "net.py").write_text(NET)
    out_file = tmp_path / "small.pt"
    assert main(["prune", f"{tmp_path / 'net.py'}:build", "--macs", "50%", "--out", str(out_file),
                 "--plot", str(tmp_path / "w.png")]) == 2
    assert "the plot failed" in capsys.readouterr().err
    report = hfp_fx.load(out_file).meta["hfp"]
    assert report.achieved.macs <= report.target.macs


def test_verbose_shows_the_traceback(capsys):
    assert main(["inspect", "torchvision:no_such_net"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["-v", "inspect", "torchvision:no_such_net"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "load_spec" in err
    assert err.rstrip().splitlines()[-1].startswith("hfp-fx: error: torchvision has no model 'no_such_net'")


def test_user_file_spec(tmp_path, capsys):
    f = tmp_path / "net.py"
    f.write_text(NET)
    assert main(["inspect", f"{f}:build"]) == 0
    assert "g0" in capsys.readouterr().out


def test_errors_are_clear(capsys):
    assert main(["inspect", "torchvision:no_such_net"]) == 2
    assert "no model 'no_such_net'" in capsys.readouterr().err
    assert main(["inspect", "resnet18"]) == 2
    assert "torchvision:NAME" in capsys.readouterr().err
    assert main(["prune", "torchvision:resnet18", *SMALL]) == 2
    assert "--macs" in capsys.readouterr().err
    assert main(["prune", "torchvision:resnet18", *SMALL, "--macs", "abc"]) == 2
    assert "malformed" in capsys.readouterr().err


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "hfp_fx", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "hfp-fx prune" in proc.stdout


def test_prune_to_a_latency_target_prints_predicted_and_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HFP_FX_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # consistent timings on a busy machine
    try:
        assert main(["prune", "torchvision:resnet18", *SMALL, "--latency", "90%"]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "latency:" in text and "measured" in text and "predicted" in text
    assert list((tmp_path / "cache" / "latency").glob("*.json"))
    assert main(["prune", "torchvision:resnet18", *SMALL, "--latency", "3"]) != 0
    assert "latency" in capsys.readouterr().err


def test_prune_uniform_blocks_keeps_one_width_per_kind_of_layer(tmp_path, capsys):
    out_file = tmp_path / "r18.pt"
    args = ["prune", "torchvision:resnet18", *SMALL, "--macs", "50%", "--out", str(out_file)]
    widths = {}
    for flag in ((), ("--uniform-blocks",)):
        assert main([*args, *flag]) == 0
        capsys.readouterr()
        report = hfp_fx.load(out_file).meta["hfp"]
        widths[flag] = {g.name: g.kept for g in report.groups.values()}
    uniform = widths[("--uniform-blocks",)]
    # layer1.0.conv1 and layer1.1.conv1 are the same layer of two blocks of one stage
    assert uniform["layer1.0.conv1"] == uniform["layer1.1.conv1"]
    assert uniform["layer4.0.conv1"] == uniform["layer4.1.conv1"]
    assert widths[()] != uniform  # without the flag the allocation differs
