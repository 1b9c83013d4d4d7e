"""``capture="export"`` / ``"auto"`` on plain torch models (no transformers needed)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx
from helpers import check_model
from test_transformers import TinyLlama, groups_with


@pytest.mark.parametrize("repeat", ["expand", "interleave", "sdpa"])
def test_exported_tiny_llama_prunes_like_the_traced_one(repeat):
    x = torch.randint(0, 40, (2, 7))
    dg, small = check_model(TinyLlama(repeat), x, capture="export")
    traced = hfp_fx.dependency_graph(TinyLlama(repeat), x)
    assert sorted(g.channels for g in dg.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)
    for layer in range(2):
        group = groups_with(dg, f"layers.{layer}.self_attn.k_proj.weight", 0)[0]
        assert group.prunable and group.channels == 2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(8, 32), nn.Linear(16, 8), nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        a, b = h.split(16, dim=-1)  # a gated unit
        h = self.fc2(torch.cat([F.gelu(a) * b, b[..., 4:12]], -1)[..., :16])
        return self.head(self.norm(x + h)[:, 0])


def test_exported_graph_literals_are_rewritten_by_shrink():
    dg, small = check_model(MLP(), torch.randn(2, 5, 8), capture="export")
    assert not dg.facts.mac_mismatch
    assert any(g.prunable for g in dg.groups)


class Checked(nn.Module):
    """Input validation symbolic tracing cannot follow (``isinstance`` of a proxy)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError("expected a tensor")
        return self.fc2(torch.relu(self.fc1(x)))


def test_auto_falls_back_to_export_when_tracing_fails():
    x = torch.randn(3, 6)
    with pytest.raises(hfp_fx.TraceError):
        hfp_fx.dependency_graph(Checked(), x)
    dg, _ = check_model(Checked(), x, capture="auto")
    assert [g.channels for g in dg.prunable_groups] == [16]


def test_auto_keeps_symbolic_tracing_for_models_it_captures():
    x = torch.randint(0, 40, (2, 7))
    dg = hfp_fx.dependency_graph(TinyLlama("sdpa"), x, capture="auto")
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in dg.gm.graph.nodes)


def test_keyword_examples_and_unknown_capture():
    model, x = Checked(), torch.randn(3, 6)
    dg = hfp_fx.dependency_graph(model, {"x": x}, capture="export")
    assert [g.channels for g in dg.prunable_groups] == [16]
    assert [g.channels for g in hfp_fx.dependency_graph(model, {"x": x}, capture="auto").prunable_groups] == [16]
    with pytest.raises(ValueError, match="capture"):
        hfp_fx.dependency_graph(model, x, capture="dynamo")


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, groups=2), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.relu6(self.b2(self.c2(x)))
        x = x + self.c3(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_exported_cnn_prunes_like_the_traced_one():
    x = torch.randn(2, 3, 16, 16)
    dg, _ = check_model(CNN(), x, capture="export")
    traced = hfp_fx.dependency_graph(CNN(), x)
    assert sorted(g.channels for g in dg.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)


def test_exported_resnet_groups_and_counts_match_the_traced_ones(capsys):
    from hfp_fx.cli import main

    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    exported = hfp_fx.dependency_graph(model, x, capture="export")
    traced = hfp_fx.dependency_graph(model, x)
    assert not exported.facts.mac_mismatch
    assert sorted(g.channels for g in exported.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)
    assert hfp_fx.CostModel(exported).counts() == hfp_fx.CostModel(traced).counts() == hfp_fx.count(model, x)
    assert main(["count", "torchvision:resnet18", "--input-size", "1,3,64,64", "--capture", "export"]) == 0
    assert "11,689,512" in capsys.readouterr().out
