"""One user-written registry that uses every ``OpHandler`` field, and each field shown to matter:
the model prunes exactly with the handlers, and loses that (or fails loudly) without the field.

Fields: ``analyze`` and ``macs`` (every handler), ``shape`` (the shape pass's shortcut),
``resize`` (a module attribute mirroring a tensor), ``rewrite`` (a literal channel count),
``gated_call`` (the gate folded into the layer's weight), ``decompose`` (a layer written out
as plain ops), ``view_step`` (a parameter seen through a user view), ``size_arithmetic`` (a run-
time size carried through a user function) and ````aten=``, which registers the same handler for
an exported graph (``keeps_values`` and ``reads_indices`` are exercised by the mixture-of-experts
tests, ``tests/test_hf_families.py``).
"""
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx
from hfp_fx.passes.registry import OpHandler, default_rules
from hfp_fx.passes.shrink import ShrinkError
from hfp_fx.passes.rules_pointwise import passthrough
from hfp_fx.spaces import ChannelMap

CALLS = Counter()


def gain_fn(x, weight, bias=None):
    return x * weight.view(1, -1, 1, 1)


def as_column(p):
    return p.view(1, -1, 1, 1)


def first_k(x, k):
    return x[:, :k]


def halve(n):
    return n // 2


for _name in ("gain_fn", "as_column", "first_k", "halve"):
    torch.fx.wrap(_name)


class Gain(nn.Module):
    """A per-channel gain with an attribute that mirrors its size."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.channels = c

    def forward(self, x):
        assert x.shape[1] == self.channels, "stale attribute"
        return gain_fn(x, self.weight)


class Twin(nn.Module):
    """A conv whose handler cannot prune it as a module (it ties its widths), written out instead."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) / c)

    def forward(self, x):
        return F.conv2d(x, self.weight, None, 1, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.twin, self.gain = nn.Conv2d(3, 8, 3, padding=1), Twin(8), Gain(8)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.register_buffer("table", torch.randn(9))

    def forward(self, x):
        y = self.gain(self.twin(self.conv1(x))) * as_column(self.scale)
        y = first_k(y, 6)
        # a size read at run time from a pruned dim, carried through `halve`: it must stay 3
        bias = self.table.reshape(halve(y.shape[1]), 3).sum()
        return self.conv2(y) + bias


def gain_rule(a, node):
    m = a.cmap(node.args[0])
    weight = f"{node.target}.weight"
    a.bind_param(weight, 0, m.ids)
    a.gate(0, m, weight=(weight, 0))
    a.add_macs(math.prod(a.shape(node)) // m.size, m.ids)  # one multiply per element
    return m


def gain_shape(n, module, args, kwargs):
    CALLS["shape"] += 1
    x = args[0]
    return torch.empty_like(x), x.numel()


def gain_resize(module, before):
    module.channels = module.weight.numel()


def gain_gated_call(module):
    CALLS["gated_call"] += 1
    return gain_fn, ()


def twin_rule(a, node):
    a.fix(a.cmap(node.args[0]), "Twin ties its widths")
    out = a.new(a.shape(node)[1])
    a.fix(out, "Twin ties its widths")
    return ChannelMap(1, out)


def twin_decompose(gm, node):
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        conv = graph.call_function(F.conv2d, (node.args[0], weight, None, 1, 1))
    node.replace_all_uses_with(conv)
    graph.erase_node(node)
    return True


def column_step(a, node, d, in_shape, out_shape):
    return 0 if d == 1 else None


def first_k_rule(a, node):
    m = a.cmap(node.args[0])
    return ChannelMap(m.axis, m.ids[: node.args[1]])


def first_k_rewrite(node, edit):
    src = edit.map_of(node.args[0])
    if src is not None and edit.changed(src):
        node.args = (node.args[0], edit.kept_before(src, node.args[1]))


def no_channels(a, node):
    return None


def user_rules(**drop):
    """The registry, with the field named in ``drop`` left out of its handler."""
    rules = default_rules()

    def handler(rule, **fields):
        return OpHandler(rule, **{k: v for k, v in fields.items() if k not in drop})

    rules.register(handler(gain_rule, macs=True, shape=gain_shape, resize=gain_resize, gated_call=gain_gated_call),
                   modules=[Gain])
    rules.register(handler(twin_rule, macs=False, decompose=twin_decompose), modules=[Twin])
    rules.register(handler(no_channels, macs=False, view_step=column_step), functions=[as_column])
    rules.register(handler(first_k_rule, macs=False, rewrite=first_k_rewrite), functions=[first_k])
    rules.register(handler(no_channels, macs=False, size_arithmetic=True), functions=[halve])
    return rules


def every_other(dg):
    return {g.id: list(range(0, g.channels, 2)) for g in dg.prunable_groups}


def test_every_field_together_prunes_exactly():
    torch.manual_seed(0)
    model, x, rules = Net().eval(), torch.randn(2, 3, 8, 8), user_rules()
    CALLS.clear()
    dg = hfp_fx.dependency_graph(model, x, rules=rules, capture="fx")
    assert CALLS["shape"] > 0  # the shape pass used the shortcut instead of running Gain
    assert sorted(g.channels for g in dg.prunable_groups) == [2, 6, 8]  # (2: read by nothing)
    assert not dg.facts.mac_mismatch
    keep = every_other(dg)
    small = hfp_fx.shrink(dg, keep=keep)
    assert small.gain.channels == 4 and small.scale.shape == (4,)  # resize; view_step bound `scale`
    assert "first_k(" in small.code and ", 3)" in small.code  # rewrite: 6 -> 3 kept of the first 6
    with torch.no_grad():
        torch.testing.assert_close(small(x), hfp_fx.mask(dg, keep=keep)(x), rtol=1e-5, atol=1e-5)
    cost = hfp_fx.CostModel(dg)
    predicted = cost.counts(dg.alive(keep)[cost.unit_ids])
    assert hfp_fx.count(small, (x,), capture="fx").params == predicted.params
    # Gain's own MAC term (the flop counter sees only a broadcast multiply, no MACs)
    assert cost.counts().macs - predicted.macs > hfp_fx.count(model, x).macs - hfp_fx.count(small, (x,)).macs
    prepared = hfp_fx.prepare(model, x, target={"params": 0.7}, rules=rules, capture="fx")
    assert CALLS["gated_call"] > 0 and "gain_fn(" in prepared.code  # the gate scales Gain's weight
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)  # gates start at 1


def test_without_decompose_the_tied_layer_stays_whole():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x, rules=user_rules(decompose=True), capture="fx")
    assert [g.channels for g in dg.prunable_groups] == []
    assert any("Twin ties its widths" in (g.reason or "") for g in dg.groups)


def test_without_view_step_the_viewed_parameter_fixes_its_channels():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x, rules=user_rules(view_step=True), capture="fx")
    assert [g.channels for g in dg.prunable_groups] == [8]
    assert any("untracked" in (g.reason or "") for g in dg.groups)


@pytest.mark.parametrize("field", ["rewrite", "resize", "size_arithmetic"])
def test_without_a_shrink_field_shrinking_fails_loudly(field):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x, rules=user_rules(**{field: True}), capture="fx")
    with pytest.raises((ShrinkError, AssertionError, RuntimeError)):  # at shrink time, or at the first call
        hfp_fx.shrink(dg, keep=every_other(dg))(x)


def test_without_shape_or_gated_call_the_defaults_take_over():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    CALLS.clear()
    rules = user_rules(shape=True, gated_call=True)
    dg = hfp_fx.dependency_graph(model, x, rules=rules, capture="fx")
    assert CALLS["shape"] == 0 and sorted(g.channels for g in dg.prunable_groups) == [2, 6, 8]
    prepared = hfp_fx.prepare(model, x, target={"params": 0.7}, rules=rules, capture="fx")
    assert CALLS["gated_call"] == 0
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)


class Expm1Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.expm1(self.conv1(x)))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_one_registration_serves_both_graph_dialects(capture):
    """``functions=`` and ``aten=`` in one registration: the same handler for both graphs."""
    torch.manual_seed(0)
    model, x = Expm1Net().eval(), torch.randn(2, 3, 8, 8)
    assert hfp_fx.dependency_graph(model, x, capture=capture).prunable_groups == []  # expm1 unknown
    rules = default_rules()
    rules.register(OpHandler(passthrough, macs=False), functions=[torch.expm1], aten=["expm1"])
    dg = hfp_fx.dependency_graph(model, x, rules=rules, capture=capture)
    assert [g.channels for g in dg.prunable_groups] == [8]
    keep = every_other(dg)
    with torch.no_grad():
        torch.testing.assert_close(hfp_fx.shrink(dg, keep=keep)(x), hfp_fx.mask(dg, keep=keep)(x),
                                   rtol=1e-5, atol=1e-5)
