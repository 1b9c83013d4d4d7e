"""Finalized models work with the rest of the PyTorch toolchain."""
import copy

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


@pytest.fixture(scope="module")
def onnx_file(small, tmp_path_factory):
    pytest.importorskip("onnx")
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    torch.onnx.export(small, (X,), str(path), dynamo=False)
    return path


def test_onnx_export(small, onnx_file):
    """The exported graph holds the pruned shapes: every conv's weight, the head, the output."""
    import onnx

    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto)
    init = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    exported = [(init[n.input[1]], next(a.i for a in n.attribute if a.name == "group")) for n in convs]
    expected = [(tuple(m.weight.shape), m.groups) for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert exported == expected
    assert expected[0][0][0] < 16  # the convs really are pruned
    assert init["head.weight"] == tuple(small.head.weight.shape)

    def dims(value):
        return [d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [dims(v) for v in proto.graph.input] == [list(X.shape)]
    assert [dims(v) for v in proto.graph.output] == [[X.shape[0], 5]]


def test_onnx_runtime_matches_torch(small, onnx_file):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(out), small(X))


def test_prepared_model_compiles_for_training():
    """The compiled training step computes the eager loss and the eager gradients of every
    parameter, the gates included (on two copies: a training forward updates the loss's state)."""
    prepared = hfp_fx.prepare(Net(), torch.randn(1, 3, 8, 8), "50%").train()
    twin = copy.deepcopy(prepared)

    def step(model, forward):
        loss = forward(X).sum() + hfp_fx.complexity_loss(model)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        gate = hfp_fx.gate_parameters(model)[0]
        return loss.detach(), [p.grad for p in params], next(i for i, p in enumerate(params) if p is gate)

    eager_loss, eager_grads, gate = step(prepared, prepared)
    compiled_loss, compiled_grads, _ = step(twin, torch.compile(twin, backend="aot_eager"))
    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5)
    assert float(eager_grads[gate].abs().sum()) > 0  # the gates learn
    for a, b in zip(compiled_grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
