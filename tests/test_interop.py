"""Finalized models work with the rest of the PyTorch toolchain."""
import importlib.util

import pytest
import torch
import torch.nn as nn

import hfp_fx
from helpers import assert_close


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                               nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.a(x)
        y = torch.relu(y + self.b(y))
        x1, x2 = y.chunk(2, dim=1)
        y = torch.cat([x2, x1], 1)
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return hfp_fx.prune(Net().eval(), torch.randn(1, 3, 8, 8), "50%").eval()


X = torch.randn(2, 3, 8, 8)


def test_torch_compile(small):
    compiled = torch.compile(small, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(X), small(X))


@pytest.mark.slow
def test_torch_compile_inductor(small):
    compiled = torch.compile(small)
    with torch.no_grad():
        assert_close(compiled(X), small(X))


def test_torch_export(small):
    exported = torch.export.export(small, (X,))
    with torch.no_grad():
        assert_close(exported.module()(X), small(X))


def test_jit_trace_and_script(small):
    with torch.no_grad():
        traced = torch.jit.trace(small, (X,))
        assert_close(traced(X), small(X))
    scripted = torch.jit.script(small)
    with torch.no_grad():
        assert_close(scripted(X), small(X))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
def test_onnx_export(small, tmp_path):
    path = tmp_path / "small.onnx"
    torch.onnx.export(small, (X,), str(path), dynamo=False)
    assert path.stat().st_size > 0


def test_prepared_model_compiles_for_training():
    model = Net()
    prepared = hfp_fx.prepare(model, torch.randn(1, 3, 8, 8), "50%")
    compiled = torch.compile(prepared, backend="aot_eager")
    loss = compiled(X).sum() + hfp_fx.complexity_loss(prepared)
    loss.backward()
    assert hfp_fx.gate_parameters(prepared)[0].grad is not None
