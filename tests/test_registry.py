"""Op handlers: one lookup rule, no silent overwrites, per-call rule sets, and every field used."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx
from hfp_fx.passes.registry import DEFAULT_RULES, HandlerConflict, OpHandler, OpRegistry, default_rules
from hfp_fx.passes.shrink import ShrinkError
from hfp_fx.passes.rules_pointwise import passthrough
from tests.helpers import check_model


class PlainSubclass(nn.Conv2d):
    """Uses nn.Conv2d's forward: the conv handler applies."""


class FlippingConv(nn.Conv2d):
    """Overrides forward: the conv handler must not apply (it would be wrong: channels flip)."""

    def forward(self, x):
        return super().forward(x).flip(1)


def test_lookup_is_exact_class_then_mro_with_the_same_forward():
    conv = DEFAULT_RULES.lookup_module(nn.Conv2d(2, 2, 1))
    assert conv is not None and conv.name == "conv"
    assert DEFAULT_RULES.lookup_module(PlainSubclass(2, 2, 1)) is conv
    assert DEFAULT_RULES.lookup_module(FlippingConv(2, 2, 1)) is None
    # attributes mirror tensors whatever forward does: resizing still applies
    assert DEFAULT_RULES.lookup_module(FlippingConv(2, 2, 1), attributes_only=True) is conv
    assert DEFAULT_RULES.is_leaf(PlainSubclass(2, 2, 1)) and not DEFAULT_RULES.is_leaf(FlippingConv(2, 2, 1))


@pytest.mark.parametrize("conv_cls", [PlainSubclass, FlippingConv])
def test_conv_subclasses_prune_exactly(conv_cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), conv_cls(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    dg, _ = check_model(model, torch.randn(2, 3, 8, 8))
    assert dg.prunable_groups
    small = hfp_fx.prune(model, torch.randn(2, 3, 8, 8), {"macs": 0.5})
    layer = small.get_submodule("2")
    if conv_cls is PlainSubclass:  # a leaf: its attributes were resized
        assert isinstance(layer, PlainSubclass) and layer.out_channels == layer.weight.shape[0] < 8
    else:  # traced through: its input channels prune, the flipped outputs are refused with the reason
        assert layer.weight.shape[1] < 8 and layer.weight.shape[0] == 8
        assert any("flip" in (g.reason or "") for g in dg.groups)


def test_registry_refuses_a_silent_overwrite():
    rules = default_rules()
    handler = OpHandler(passthrough, macs=False)
    with pytest.raises(HandlerConflict, match=r"torch.relu.*already has the handler `passthrough`.*replace=True"):
        rules.register(handler, functions=[torch.relu])
    rules.register(handler, functions=[torch.relu], replace=True)
    assert rules.lookup_function(torch.relu) is handler
    assert DEFAULT_RULES.lookup_function(torch.relu) is not handler  # a copy: defaults untouched
    with pytest.raises(TypeError, match="OpHandler"):
        rules.register(passthrough, functions=[torch.exp])


def test_registered_methods_and_functions_exist():
    """Dead entries (names that are not Tensor methods) would never match a node."""
    for kind, key, handler in DEFAULT_RULES.handlers():
        if kind == "method":
            assert hasattr(torch.Tensor, key), f"Tensor.{key} does not exist ({handler.name})"
        elif kind == "function":
            assert callable(key), key
        elif kind == "operator":  # a custom op by name: "namespace::op"
            assert isinstance(key, str) and key.count("::") == 1, key
        else:
            assert issubclass(key, nn.Module), key
    methods = {key for kind, key, _ in DEFAULT_RULES.handlers() if kind == "method"}
    assert {"trunc", "frac", "true_divide"} <= methods


def scaled_tanh(x):
    return 2.0 * torch.tanh(x)


torch.fx.wrap("scaled_tanh")


class Scale(nn.Module):
    """A user layer with a per-channel parameter and an attribute that mirrors its size."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.channels = c

    def forward(self, x):
        assert x.shape[1] == self.channels, "stale attribute"
        return x * self.gamma.view(1, -1, 1, 1)


def scale_rule(a, node):
    m = a.cmap(node.args[0])
    if m is not None:
        a.bind_param(f"{node.target}.gamma", 0, m.ids)
    return m


def resize_scale(module, before):
    module.channels = module.gamma.numel()


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.scale, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(scaled_tanh(self.scale(self.conv1(x))))


def test_per_call_rules_teach_an_op_its_coupling_and_resize():
    torch.manual_seed(0)
    model, x = UserNet().eval(), torch.randn(2, 3, 8, 8)
    # symbolic tracing keeps the unknown function and module opaque (the default "auto" would
    # capture the model with torch.export then, whose ATen ops hfp_fx knows)
    assert not hfp_fx.dependency_graph(model, x, capture="fx").prunable_groups
    rules = default_rules()
    rules.register(OpHandler(passthrough, macs=False), functions=[scaled_tanh])
    rules.register(OpHandler(scale_rule, macs=False, resize=resize_scale), modules=[Scale])
    dg = hfp_fx.dependency_graph(model, x, rules=rules)
    assert [g.channels for g in dg.prunable_groups] == [8]
    keep = {dg.prunable_groups[0].id: [0, 2, 5]}
    small = hfp_fx.shrink(model, x, keep, rules=rules)
    assert small.scale.channels == 3 and small.scale.gamma.shape == (3,)
    with torch.no_grad():
        assert torch.allclose(small(x), hfp_fx.mask(model, x, keep, rules=rules)(x), atol=1e-5)
    assert DEFAULT_RULES.lookup_module(Scale(2)) is None


def test_a_missing_resize_is_caught_by_shape_verification():
    """A handler that slices a parameter but forgets the attribute its forward reads fails loudly."""
    model, x = UserNet().eval(), torch.randn(2, 3, 8, 8)
    rules = default_rules()
    rules.register(OpHandler(passthrough, macs=False), functions=[scaled_tanh])
    rules.register(OpHandler(scale_rule, macs=False), modules=[Scale])
    dg = hfp_fx.dependency_graph(model, x, rules=rules)
    with pytest.raises(ShrinkError, match="stale attribute"):
        hfp_fx.shrink(dg, keep={dg.prunable_groups[0].id: [0, 1]})


def test_functional_conv_groups_are_rewritten():
    """``F.conv2d(..., groups=g)`` with a weight attribute: the handler's rewrite fixes ``groups``."""

    class DW(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 8, 1)
            self.weight = nn.Parameter(torch.randn(8, 1, 3, 3))
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.out(F.conv2d(self.pw(x), self.weight, None, 1, 1, 1, 8))

    check_model(DW().eval(), torch.randn(2, 3, 8, 8))


def test_architecture_doc_example_runs_and_prunes_exactly():
    """docs/architecture.md "Adding an op": its code, then a model that uses both ops."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    section = text.split("## Adding an op", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    code += '''
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.ls, self.conv2 = torch.nn.Conv2d(3, 8, 3), LayerScale(8), torch.nn.Conv2d(8, 4, 3)
    def forward(self, x):
        return self.conv2(soft_clip(self.ls(self.conv1(x))))
'''
    ns = {"__name__": "architecture_example"}
    exec(compile(code, "architecture.md", "exec"), ns)
    model, x = ns["Net"]().eval(), torch.randn(2, 3, 10, 10)
    rules = ns["rules"]
    dg = hfp_fx.dependency_graph(model, x, rules=rules)
    assert [g.channels for g in dg.prunable_groups] == [8]
    small = hfp_fx.prune(model, x, "50%", rules=rules)
    assert small.ls.channels == small.ls.gamma.numel() < 8
    with torch.no_grad():
        reference = hfp_fx.mask(model, x, small.meta["hfp"].keep, rules=rules)(x)
        assert torch.allclose(small(x), reference, atol=1e-5)


def test_an_empty_registry_knows_no_op():
    """All op knowledge is in the handlers: with none, nothing is prunable (no table outside the
    registry makes an op pass channels on), for symbolic tracing and for torch.export."""
    model, x = UserNet().eval(), torch.randn(2, 3, 8, 8)
    assert hfp_fx.dependency_graph(model, x, capture="fx").prunable_groups == []  # (unknown ops: fixed)
    assert hfp_fx.dependency_graph(model, x, capture="export").prunable_groups  # the defaults know these
    for capture in ("fx", "export"):
        dg = hfp_fx.dependency_graph(model, x, rules=OpRegistry(), capture=capture)
        assert dg.prunable_groups == [] and all(g.reason for g in dg.groups), capture
