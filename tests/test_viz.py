"""Pictures: dependency graph, per-group widths, complexity curves."""
from xml.etree import ElementTree

import pytest
import torch
import torchvision

import hfp_fx

pytest.importorskip("matplotlib")


def assert_picture(path):
    """A PNG that decodes to a non-blank RGB(A) image."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and min(pixels.shape[:2]) > 50
    assert float(pixels[..., :3].std()) > 0.01, f"{path} is blank"


def test_render_plot_and_log(tmp_path):
    model, x = torchvision.models.mobilenet_v3_small(), torch.randn(1, 3, 64, 64)
    dg = hfp_fx.dependency_graph(model, x)
    for name in ("g.png", "g.svg", "g.dot"):
        path = hfp_fx.render_graph(dg, tmp_path / name)
        assert path.stat().st_size > 100
    assert_picture(tmp_path / "g.png")
    assert ElementTree.parse(tmp_path / "g.svg").getroot().tag.endswith("svg")
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    lines = [line.strip() for line in dot.splitlines()]
    for g in dg.groups:  # one node per group, with its size, marked fixed exactly when it is
        (node,) = [line for line in lines if line.startswith(f'"{g.id}" [')]
        assert f"{g.channels} ch" in node and ("fixed" in node) == (not g.prunable), node
        assert any(line.startswith(f'"{g.id}" -> ') for line in lines), f"{g.id} has no member edge"
    for name, m in model.named_modules():  # every conv is drawn, labelled with its module name
        if isinstance(m, torch.nn.Conv2d):
            assert f"\\n{name}\"" in dot, name
    small = hfp_fx.prune(model, x, "50%")
    assert hfp_fx.plot_widths(small, tmp_path / "w.png").stat().st_size > 1000
    assert_picture(tmp_path / "w.png")
    prepared = hfp_fx.prepare(model, x, {"macs": 0.5})
    log = hfp_fx.ComplexityLog(prepared, every=2)
    for _ in range(4):
        log.step(loss=1.0)
    assert [r["step"] for r in log.history] == [0, 2] and log.history[0]["macs_ratio"] == pytest.approx(2.0, rel=1e-3)
    assert log.plot(tmp_path / "c.png").stat().st_size > 1000
    assert_picture(tmp_path / "c.png")
    ramped = hfp_fx.prepare(model, x, {"macs": 0.5}, ramp_steps=3).train()
    log = hfp_fx.ComplexityLog(ramped)
    for _ in range(4):
        log.step()
        hfp_fx.complexity_loss(ramped)  # advances the ramp (training mode, gradients on)
    ramp = [r["current_target_macs"] / r["target_macs"] for r in log.history]
    assert ramp[0] == pytest.approx(2.0) and ramp[-1] == 1.0 and ramp == sorted(ramp, reverse=True)
    assert log.plot(tmp_path / "ramp.png").stat().st_size > 1000
