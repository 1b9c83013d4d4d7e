"""Bad input gets a clear error; the user's model is never touched; documented behaviours hold."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import hfp_fx
from helpers import apply_plan, assert_close, assert_unchanged, state_snapshot


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)), inplace=True)
        y += self.conv2(y)  # in-place residual
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def test_non_module_and_bad_inputs():
    with pytest.raises(TypeError, match="nn.Module"):
        hfp_fx.dependency_graph(lambda x: x, X)
    with pytest.raises(TypeError, match="example_inputs"):
        hfp_fx.dependency_graph(Net(), None)
    with pytest.raises(TypeError, match=r"example_inputs\[1\]"):
        hfp_fx.dependency_graph(Net(), (X, 3))
    with pytest.raises(hfp_fx.ShapePropagationError, match=r"example inputs failed at node `\w+`, module \w+ \(Conv2d\)"):
        hfp_fx.dependency_graph(Net(), torch.randn(2, 5, 8, 8))
    with pytest.raises(TypeError, match="nn.Module"):
        hfp_fx.count("resnet", X)
    # a norm layer given the wrong width is run (not skipped by the shape shortcut) and named
    with pytest.raises(hfp_fx.ShapePropagationError, match=r"module 0 \(BatchNorm2d\): RuntimeError: running_mean") as err:
        hfp_fx.dependency_graph(nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1)), torch.randn(1, 5, 4, 4))
    assert "While executing" not in str(err.value)


def test_nothing_prunable():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    dg = hfp_fx.dependency_graph(model, X)
    assert not dg.prunable_groups and "model output" in dg.groups[0].reason
    with pytest.raises(ValueError, match="no prunable"):
        hfp_fx.prepare(model, X, "50%")
    with pytest.raises(ValueError, match="no prunable"):
        hfp_fx.prune(model, X, "50%")


def test_user_model_is_never_modified():
    model = Net().train()
    snap = state_snapshot(model)
    before_mode = [m.training for m in model.modules()]
    dg = hfp_fx.dependency_graph(model, X)
    hfp_fx.count(model, X)
    keep = {g.id: [0, 1] for g in dg.prunable_groups}
    hfp_fx.mask(model, X, keep)(X)
    hfp_fx.shrink(model, X, keep)(X)
    small = hfp_fx.prune(model, X, "50%")
    small(X)
    prepared = hfp_fx.prepare(model, X, "50%")
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(3):
        loss = prepared(X).sum() + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    hfp_fx.finalize(prepared)
    assert_unchanged(model, snap)
    assert [m.training for m in model.modules()] == before_mode


class _WritesToItself(nn.Module):
    """Untraceable (branches on a value, so it stays opaque) and writes to ``self`` when run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.register_buffer("seen", torch.zeros(8))
        self.calls = 0

    def forward(self, x):
        if x.sum() > -1e30:  # a value branch: no meta kernel can answer it either
            self.calls += 1
            self.seen.add_(x.detach().mean((0, 2, 3)))
        return self.conv(x)


def test_opaque_module_writing_to_itself_runs_on_a_copy():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _WritesToItself(), nn.Flatten(1),
                          nn.Linear(8 * 64, 4))
    snap = state_snapshot(model)
    dg = hfp_fx.dependency_graph(model, X)  # meta pass fails on the branch, then a real run of a copy
    hfp_fx.count(model, X)
    assert "2" in dg.facts.opaque and model[2].calls == 0
    assert_unchanged(model, snap)


class _WritesToItsParameter(nn.Module):
    """A root whose traced graph writes to a parameter it reads (``get_attr`` + ``add_``), with an
    opaque submodule that sends the shape pass to its real-run fallback."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.opaque = _WritesToItself()
        self.shift = nn.Parameter(torch.zeros(8, 1, 1))
        self.head = nn.Linear(8 * 64, 4)

    def forward(self, x):
        self.shift.add_(1)
        return self.head(self.opaque(self.stem(x) + self.shift).flatten(1))


def test_graph_writing_to_a_parameter_runs_on_a_copy():
    model = _WritesToItsParameter()
    snap = state_snapshot(model)
    with torch.no_grad():  # lets the in-place write on a leaf through in the fallback run
        hfp_fx.dependency_graph(model, X)
    assert_unchanged(model, snap)


class _CountsItsCalls(nn.Module):
    """A traced ``forward`` that writes to a buffer it owns and whose output depends on it."""

    def __init__(self, opaque: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = _WritesToItself() if opaque else nn.Conv2d(8, 8, 1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.head(torch.relu(self.mid(self.body(self.stem(x))))) * self.calls


@pytest.mark.parametrize("opaque", [False, True])
def test_buffer_written_by_forward_is_recorded_not_run_on_the_user_model(opaque):
    torch.manual_seed(0)
    model = _CountsItsCalls(opaque)
    snap = state_snapshot(model)
    prepared = hfp_fx.prepare(model, X, {"macs": 0.9})
    assert_unchanged(model, snap)  # tracing (and its retry with an opaque submodule) left it alone
    assert float(prepared.calls) == 0
    with torch.no_grad():
        first, second = prepared(X), prepared(X)
    assert float(prepared.calls) == 2  # the write is part of the graph
    assert_close(second, 2 * first)
    small = hfp_fx.finalize(prepared)
    assert float(small.calls) == 2  # the state travels with the pruned model
    assert "add_" in small.code
    apply_plan(prepared, small.meta["hfp"].keep)  # reference: the removed channels switched off
    with torch.no_grad():
        assert_close(small(X), prepared(X))
    assert float(small.calls) == float(prepared.calls) == 3


def test_finalize_twice_and_prepared_untouched():
    torch.manual_seed(0)
    prepared = hfp_fx.prepare(Net(), X, {"params": 0.6}, gates="channel")
    with torch.no_grad():
        prepared.hfp.gates.gate.uniform_(0.2, 1.5)
    before = copy.deepcopy(prepared.state_dict())
    a, b = hfp_fx.finalize(prepared).eval(), hfp_fx.finalize(prepared).eval()
    with torch.no_grad():
        assert torch.equal(a(X), b(X))
    for k, v in prepared.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prepared_model_cast_to_double():
    torch.manual_seed(0)
    prepared = hfp_fx.prepare(Net(), X, {"macs": 0.5}, gates="channel").double().eval()
    with torch.no_grad():
        prepared.hfp.gates.gate.uniform_(0.5, 1.5)
    small = hfp_fx.finalize(prepared).eval()
    out = small(X.double())
    assert out.dtype == torch.float64
    loss = hfp_fx.complexity_loss(prepared)
    assert torch.isfinite(loss)


def test_exclude_unknown_module():
    with pytest.raises(ValueError, match="does not have"):
        hfp_fx.prepare(Net(), X, "50%", exclude=["conv3"])


def test_eval_and_train_mode_runs():
    """In both modes the pruned model computes what the masked dense model computes (batch norm
    from batch statistics in training mode, from the running ones it updated in eval mode)."""
    model = Net()
    small = hfp_fx.prune(model, X, "50%")
    masked = hfp_fx.mask(model, X, small.meta["hfp"].keep)
    assert small.training and masked.training
    out = small.train()(X)
    assert_close(out.detach(), masked.train()(X).detach())
    out.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in small.parameters())
    assert not torch.equal(small.bn.running_mean, torch.zeros_like(small.bn.running_mean))  # stats updated
    small.eval()
    masked.eval()
    with torch.no_grad():
        evaluated = small(X)
        assert_close(evaluated, masked(X))
        assert not torch.allclose(evaluated, out.detach())  # the modes really differ


def test_train_mode_batch_norm_with_one_value_per_channel_is_analysed():
    """Batch 1 at a 1x1 resolution: training-mode batch norm would refuse to run, but shapes are known."""
    model = torchvision.models.resnet18()
    assert model.training
    x = torch.randn(1, 3, 32, 32)  # layer4 sees 1x1 feature maps
    small = hfp_fx.prune(model, x, "50%")
    assert model.training and hfp_fx.count(small, x).macs <= 0.5 * hfp_fx.count(model, x).macs


@pytest.mark.parametrize("training", [True, False])
def test_results_follow_the_mode_of_their_input(training):
    model = torchvision.models.resnet18().train(training)
    x = torch.randn(2, 3, 64, 64)
    assert hfp_fx.prune(model, x, "50%").training is training
    assert hfp_fx.shrink(model, x, {}).training is training
    assert hfp_fx.mask(model, x, {}).training is training
    prepared = hfp_fx.prepare(model, x, "60%")
    assert hfp_fx.finalize(prepared.train(not training)).training is (not training)
    assert model.training is training and all(m.training is training for m in model.modules())


class ShapeBranchingRoot(nn.Module):
    """Python control flow on shapes in the root's own forward: plain symbolic_trace fails."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        if x.shape[-1] % 2:  # odd sizes are padded
            x = F.pad(x, (0, 1, 0, 1))
        b, c = x.shape[:2]
        y = F.relu(self.bn1(self.conv1(x)))
        for _ in range(x.size(0) // b):  # once
            y = y + F.relu(self.bn2(self.conv2(y)))
        return self.head(y.reshape(b, y.size(1), -1).mean(-1))


def test_root_branching_on_shapes_is_traced_with_the_example_shapes():
    model = ShapeBranchingRoot().eval()
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    with pytest.warns(UserWarning, match="specialised"):
        dg = hfp_fx.dependency_graph(model, x)
    assert any(n.target is F.pad for n in dg.gm.graph.nodes)  # the odd-size branch was taken
    assert [g.channels for g in dg.prunable_groups] == [16]
    keep = {dg.prunable_groups[0].id: [0, 3, 4, 9, 15]}
    small = hfp_fx.shrink(dg, keep=keep)
    torch.testing.assert_close(small(x), hfp_fx.mask(dg, keep=keep)(x), rtol=1e-5, atol=1e-5)
    assert small(x).shape == model(x).shape
    with pytest.warns(UserWarning):
        dg_even = hfp_fx.dependency_graph(model, torch.randn(2, 3, 8, 8))
    assert not any(n.target is F.pad for n in dg_even.gm.graph.nodes)


def test_root_branching_on_values_still_names_the_cause():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return self.conv(x)

    with pytest.raises(hfp_fx.TraceError, match="depends on tensor values"):
        hfp_fx.dependency_graph(Root(), X)


def test_count_when_a_parameter_is_a_submodule_input():
    """FlopCounterMode's module tracker used to fail under no_grad on such inputs (timm's CaiT)."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 4, 8))
            self.mix = nn.Linear(8, 8)

        def forward(self, x):
            return self.mix(self.token) + x

    c = hfp_fx.count(Tokens(), torch.randn(1, 4, 8))
    assert c.params == 32 + 72 and c.macs == 4 * 8 * 8


def test_forward_arguments_beyond_the_example_inputs_take_their_defaults():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x, mask=None, scale: float = 2.0):
            y = F.relu(self.conv1(x))
            if mask is not None:  # a placeholder would always take this branch
                y = y * mask
            return self.conv2(y) * scale

    model = Masked().eval()
    small = hfp_fx.prune(model, X, "50%")
    reference = hfp_fx.mask(model, X, small.meta["hfp"].keep)
    torch.testing.assert_close(small(X), reference(X))
    assert hfp_fx.count(small, X).macs <= 0.5 * hfp_fx.count(model, X).macs


def test_defaults_bound_to_none_leave_later_traces_working():
    """A pruned model must not carry FX's None guards: compiling one broke every later trace."""

    class Optional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x, mask=None):
            return self.out(self.conv(x) if mask is None else self.conv(x * mask))

    small = hfp_fx.prune(Optional(), X, "50%")
    assert "assert_is_none" not in small.code
    torch.fx.symbolic_trace(torchvision.models.resnet18())  # still traces


def test_in_place_flags_are_read_from_the_signature():
    """The shape pass knows a functional call writes into its input from the function's own
    ``inplace`` parameter, positional or keyword (no table of functions)."""
    import torch.nn.functional as F
    from hfp_fx.capture.meta_shortcuts import in_place

    x = torch.zeros(1)
    assert in_place(F.relu, (x, True), {}) and in_place(F.dropout, (x, 0.5, True, True), {})
    assert in_place(F.leaky_relu, (x, 0.1, True), {}) and in_place(F.hardtanh, (x, -1.0, 1.0, True), {})
    assert in_place(F.gelu, (x,), {"inplace": True})  # a keyword is taken at its word
    assert not in_place(F.relu, (x,), {}) and not in_place(F.relu, (x, False), {})
