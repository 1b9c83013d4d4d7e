"""Gate kinds behind one interface, the prunable index, and the prepared model's state dict."""
import pytest
import torch
import torch.nn as nn

import hfp_fx
import hfp_fx.train.hfp
from hfp_fx.train.gates import ChannelGates, GateKind, PrunableIndex, WidthGates
from hfp_fx.train.hfp import HFPState

from test_hfp import TinyNet

X = torch.randn(2, 3, 8, 8)
PER_CHANNEL = {"threshold": 0.1, "count": "sigmoid", "temperature": 0.5, "gate_max": 1.0, "cost_power": 0.5,
               "relative_gates": True}


@pytest.mark.parametrize("option", sorted(PER_CHANNEL))
def test_width_gates_refuse_per_channel_options_by_name(option):
    value = PER_CHANNEL[option]
    with pytest.raises(ValueError, match=rf"gates='width' does not take {option}={value!r} .*gates='channel'"):
        hfp_fx.prepare(TinyNet(), X, "50%", **{option: value})
    prepared = hfp_fx.prepare(TinyNet(), X, "50%", gates="channel", **{option: value})  # accepted there
    assert getattr(prepared.hfp.gates, "count_mode" if option == "count" else option) == value


def test_per_channel_defaults_are_prepares_defaults():
    """prepare passes a kind only the options the caller changed, so the defaults must agree."""
    index = PrunableIndex.of(hfp_fx.dependency_graph(TinyNet(), X))
    gates = ChannelGates(index)
    assert (gates.threshold, gates.count_mode, gates.temperature, gates.gate_max, gates.cost_power,
            gates.relative_gates) == tuple(hfp_fx.prepare.__kwdefaults__[k] for k in
                                           ("threshold", "count", "temperature", "gate_max", "cost_power",
                                            "relative_gates"))
    with pytest.raises(ValueError, match="gates='channel' does not take min_channels=4"):
        ChannelGates(index, min_channels=4)
    with pytest.raises(ValueError, match="rank needs one entry per prunable channel"):
        WidthGates(index, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("gates", ["width", "channel"])
def test_both_kinds_behind_one_interface(gates):
    prepared = hfp_fx.prepare(TinyNet(), X, "50%", gates=gates, min_channels=2).eval()
    hfp = prepared.hfp
    kind = hfp.gates
    assert isinstance(kind, GateKind) and kind.kind == gates
    assert hfp_fx.gate_parameters(prepared) == [kind.trainable]
    n = hfp.num_channels
    for name in ("kept_channels", "effective_gates", "gate_values", "saliency", "keep_surrogate", "soft_keep"):
        assert getattr(kind, name)().shape == (n,), name
    assert bool(kind.kept_channels().all())  # nothing removed at the start
    with torch.no_grad():  # switch off the lower half of the first group
        sl = hfp.index.group_slice("g0")
        if gates == "width":
            kind.width[0] = 0.5
        else:
            kind.gate[sl][8:] = 0.0
    kept = kind.kept_channels()
    assert int(kept[sl].sum()) == 8 and bool(kept[sl.stop:].all())
    assert hfp.kept_per_group()["g0"] == 8
    assert torch.equal(kind.effective_gates() != 0, kept)
    assert torch.equal(hfp()[1:], kind.effective_gates())  # the vector the sites read
    assert hfp_fx.complexity(prepared)["kept_channels"] == n - 8
    assert not hasattr(hfp, "alive")  # per element is DependencyGraph.alive; per channel is kept_channels


def test_prunable_index_is_the_one_conversion():
    model = TinyNet()
    dg = hfp_fx.dependency_graph(model, X)
    index = PrunableIndex.of(dg)
    groups = dg.prunable_groups
    assert index.group_ids == tuple(g.id for g in groups)
    assert index.offsets == (0, 16, 48, 80) and index.num_channels == 80
    assert torch.equal(index.group_of_positions(), torch.repeat_interleave(torch.arange(3), torch.tensor([16, 32, 32])))
    # every element of channel j of group i reads entry offsets[i] + j + 1; fixed elements read 0
    entry = index.position_of_elements(torch.arange(dg.roots.numel()))
    expected = torch.zeros_like(entry)
    for i, g in enumerate(groups):
        for j, unit in enumerate(g.units.tolist()):
            expected[dg.roots == unit] = index.offsets[i] + j + 1
    assert torch.equal(entry, expected) and bool((entry == 0).any())
    vector = torch.arange(80.0)
    parts = index.split_per_group(vector)
    assert list(parts) == ["g0", "g1", "g2"] and torch.equal(torch.cat(list(parts.values())), vector)
    assert torch.equal(parts["g1"], vector[index.group_slice("g1")])
    prepared = hfp_fx.prepare(model, X, "50%")
    site = dg.facts.gates[0]
    assert torch.equal(prepared.hfp.vector_index(site.ids), index.position_of_elements(site.ids))


def test_prepare_builds_the_cost_model_once(monkeypatch):
    built = []
    real = hfp_fx.train.hfp.CostModel

    def counting(dg, **kw):
        built.append(dg)
        return real(dg, **kw)

    monkeypatch.setattr(hfp_fx.train.hfp, "CostModel", counting)
    hfp_fx.prepare(TinyNet(), X, "50%")
    assert len(built) == 1


@pytest.mark.parametrize("gates,flat", [("width", ["width", "rank"]), ("channel", ["gate"])])
def test_state_dicts_saved_before_the_gate_kinds_load(gates, flat):
    """Prepared models saved before the gate kinds were submodules hold ``hfp.width``/``hfp.rank``
    or ``hfp.gate`` flat (and their ``hfp`` metadata is version 1)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    source = hfp_fx.prepare(model, X, "50%", gates=gates).eval()
    with torch.no_grad():
        source.hfp.gates.trainable.uniform_(0.2, 1.0)
    old = source.state_dict()
    metadata = old._metadata
    for name in flat:
        old[f"hfp.{name}"] = old.pop(f"hfp.gates.{name}")
    metadata.pop("hfp.gates")
    metadata["hfp"] = {"version": 1}
    old.pop("hfp.latency_scale")  # saved before latency scales existed
    assert {k for k in old if k.startswith("hfp.")} == {"hfp.lambdas", "hfp.steps"} | {f"hfp.{n}" for n in flat}
    target = hfp_fx.prepare(model, X, "50%", gates=gates).eval()
    target.load_state_dict(old, strict=True)
    assert torch.equal(target.hfp.gates.trainable, source.hfp.gates.trainable)
    with torch.no_grad():
        assert torch.equal(target(X), source(X))
    # and the current layout round-trips
    again = hfp_fx.prepare(model, X, "50%", gates=gates).eval()
    again.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(again.hfp.gates.trainable, source.hfp.gates.trainable)


def test_hfp_state_is_internal_and_errors_are_public():
    assert "HFPState" not in hfp_fx.__all__ and not hasattr(hfp_fx, "HFPState")
    assert isinstance(hfp_fx.prepare(TinyNet(), X, "50%").hfp, HFPState)
    assert not hasattr(hfp_fx, "InfeasibleTarget")
    assert issubclass(hfp_fx.InfeasibleTargetError, ValueError)
    with pytest.raises(hfp_fx.InfeasibleTargetError, match="not reachable"):
        hfp_fx.prune(TinyNet(), X, {"params": 10})
    from hfp_fx.passes.shrink import ShrinkError

    assert hfp_fx.ShrinkError is ShrinkError and issubclass(ShrinkError, RuntimeError)
    assert issubclass(hfp_fx.TraceError, torch.fx.proxy.TraceError) and issubclass(hfp_fx.TraceError, RuntimeError)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(torch.fx.proxy.TraceError):
        hfp_fx.dependency_graph(Branchy(), X)
    for name in hfp_fx.__all__:
        assert getattr(hfp_fx, name) is not None, name
