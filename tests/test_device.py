"""The whole API on the model's device: CPU always, CUDA where a device exists (``-m cuda``).

Every test takes ``device``; the CUDA instances carry the ``cuda`` marker and are skipped, with
that reason, on a machine without CUDA.  ``benchmarks/gpu_suite.sh`` runs ``-m cuda`` on a GPU.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx

from helpers import apply_plan, random_keep

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="no CUDA device here (benchmarks/gpu_suite.sh runs these)")])]


class Net(nn.Module):
    """Residual add, a depthwise conv, a linear head: groups of every coupling kind."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv2 = nn.Conv2d(32, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn(self.conv2(F.relu(self.dw(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def trained_prepared(device, target, steps=8, dtype=None):
    torch.manual_seed(0)
    model, x = Net().to(device), torch.randn(8, 3, 16, 16, device=device)
    prepared = hfp_fx.prepare(model, x[:1], target)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(steps):
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = prepared(x).square().mean() + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return prepared, x


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_finalize_on_the_models_device(device):
    prepared, x = trained_prepared(device, {"macs": 0.5})
    for name, t in [*prepared.named_parameters(), *prepared.named_buffers()]:
        assert t.device.type == device, f"{name} is on {t.device}"
    prepared.eval()
    small = hfp_fx.finalize(prepared)
    assert all(p.device.type == device for p in small.parameters())
    reference = copy.deepcopy(prepared)
    apply_plan(reference, small.meta["hfp"].keep)
    with torch.no_grad():
        assert close(small(x), reference(x))
    assert small.meta["hfp"].achieved.macs <= 0.5 * small.meta["hfp"].dense.macs


@pytest.mark.parametrize("device", DEVICES)
def test_prune_and_shrink_on_the_models_device(device):
    model, x = Net().to(device).eval(), torch.randn(2, 3, 16, 16, device=device)
    small = hfp_fx.prune(model, x, {"params": 0.4})
    assert {p.device.type for p in small.parameters()} == {device}
    dg = hfp_fx.dependency_graph(model, x)
    keep = random_keep(dg, seed=3)
    shrunk, masked = hfp_fx.shrink(dg, keep=keep), hfp_fx.mask(dg, keep=keep)
    with torch.no_grad():
        assert close(shrunk(x), masked(x))
    assert next(model.parameters()).device.type == device  # the user's model stays where it was


AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),  # CPU autocast is bfloat16 only
            *[pytest.param("cuda", dt, id=f"cuda-{name}", marks=DEVICES[1].marks)
              for dt, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"))]]


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_training_steps_move_the_widths(device, dtype):
    prepared, x = trained_prepared(device, {"macs": 0.3}, steps=6, dtype=dtype)
    widths = hfp_fx.gate_parameters(prepared)[0]
    assert widths.dtype == torch.float32 and torch.isfinite(widths).all()
    assert (widths < 1).any(), "the cost term did not move any width under autocast"
    prepared.eval()
    small = hfp_fx.finalize(prepared)
    with torch.no_grad():
        assert torch.isfinite(small(x)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_and_compiled_pruned_model(device):
    if device == "cpu":
        pytest.importorskip("torch._inductor")
    prepared, x = trained_prepared(device, {"macs": 0.5}, steps=0)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)

    def step():
        loss = prepared(x).square().mean() + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    compiled_step = torch.compile(step)
    losses = [float(compiled_step()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    prepared.eval()
    small = hfp_fx.finalize(prepared)
    compiled = torch.compile(small)
    with torch.no_grad():
        assert close(compiled(x), small(x), tol=1e-3)
