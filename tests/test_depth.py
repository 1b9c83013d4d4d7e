"""Depth units: residual branches found on every model family, removed exactly (shrink == mask)
together with random widths, and the branches that cannot be removed named with the reason."""
import pytest
import torch
import torch.nn as nn
import torchvision

import hfp_fx
from tests.helpers import assert_close, randomize_zero_weights, random_keep


def depth_and_width_keep(dg, seed, ratio=0.5, drop=0.5):
    """Random widths for every group and a random ``drop`` share of the removable units removed."""
    keep = random_keep(dg, seed, ratio)
    units = [u for u in dg.depth_units if u.removable]
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(units), generator=gen)[: max(1, int(len(units) * drop))].tolist()
    keep.update({units[i].id: False for i in chosen})
    return keep, [units[i] for i in chosen]


def tiny_llama_config(transformers):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2)


def check_depth(model, x, seed=0, capture="auto"):
    model = randomize_zero_weights(model.eval())
    inputs = x if isinstance(x, tuple) else (x,)
    dg = hfp_fx.dependency_graph(model, x, capture=capture)
    assert any(u.removable for u in dg.depth_units)
    keep, removed = depth_and_width_keep(dg, seed)
    small = hfp_fx.shrink(dg, keep=keep).eval()
    masked = hfp_fx.mask(dg, keep=keep).eval()
    with torch.no_grad():
        assert_close(masked(*inputs), small(*inputs))
    # the removed branches' parameters are gone: fewer than the same widths alone
    widths_only = hfp_fx.shrink(dg, keep={k: v for k, v in keep.items() if not k.startswith("d")})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(widths_only)
    assert not any(n.name == u.add for u in removed for n in small.graph.nodes)
    return dg, small


@pytest.mark.parametrize("name,size", [("resnet50", 64), ("mobilenet_v2", 64), ("convnext_tiny", 64),
                                       ("vit_b_16", 224), ("swin_t", 96)])
def test_torchvision_shrink_equals_mask_with_depth_and_width(name, size):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    dg, _ = check_depth(model, torch.randn(2, 3, size, size))
    units = dg.depth_units
    expected = {"resnet50": (16, 12), "mobilenet_v2": (10, 10), "convnext_tiny": (18, 18), "vit_b_16": (24, 24),
                "swin_t": (24, 24)}[name]
    assert (len(units), sum(u.removable for u in units)) == expected


def test_llama_layers_are_two_units_each_and_remove_exactly():
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(transformers)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    dg, small = check_depth(model, torch.randint(0, 64, (1, 8)))
    names = [u.name for u in dg.depth_units]
    assert names == [f"model.layers.{i}.{part}" for i in range(4) for part in ("self_attn", "mlp")]


def test_the_summary_lists_depth_units():
    dg = hfp_fx.dependency_graph(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    text = dg.summary()
    assert "depth unit" in text and "layer1.0" in text and "8 depth units, 5 removable" in text


class Tapped(nn.Module):
    """A residual block whose inner activation is also an output: the branch cannot go."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        h = torch.relu(self.a(x))
        return x + self.b(h), h.mean()


def test_a_branch_read_elsewhere_is_named_not_removable():
    dg = hfp_fx.dependency_graph(Tapped(), torch.randn(1, 3, 8, 8))
    (unit,) = dg.depth_units
    assert not unit.removable and "read outside" in unit.reason
    with pytest.raises(ValueError, match="cannot be removed: .*read outside"):
        hfp_fx.shrink(dg, keep={unit.id: False})


def test_a_projection_shortcut_is_named_and_a_bad_value_refused():
    dg = hfp_fx.dependency_graph(torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32))
    projection = next(u for u in dg.depth_units if not u.removable)
    assert projection.name == "layer2.0" and "projection shortcut" in projection.reason
    removable = next(u for u in dg.depth_units if u.removable)
    with pytest.raises(ValueError, match="True .keep. or False .remove."):
        hfp_fx.mask(dg, keep={removable.id: [0, 1]})
    # True keeps the branch: the same model as no entry
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(hfp_fx.shrink(dg, keep={removable.id: True})(x), hfp_fx.shrink(dg, keep={})(x))


def check_depth_prune(model, x, target):
    small = hfp_fx.prune(model, x, target, depth=True)
    report = small.meta["hfp"]
    metric = next(iter(target))
    assert getattr(report.achieved, metric) <= getattr(report.target, metric)
    counted = hfp_fx.count(small, x)
    assert (counted.params, counted.macs) == (report.achieved.params, report.achieved.macs)
    assert report.dense == hfp_fx.count(model, x)
    assert all(report.keep[uid] is False for uid in report.removed_units)
    with torch.no_grad():  # the plan, depth units included, is the masked reference's
        assert_close(hfp_fx.mask(model, x, keep=report.keep)(x), small(x))
    return small, report


def test_prune_with_depth_removes_bottlenecks_exactly_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, x = randomize_zero_weights(torchvision.models.resnet50().eval()), torch.randn(2, 3, 64, 64)
    small, report = check_depth_prune(model, x, {"macs": 0.5})
    assert report.removed_units and all(name.startswith("layer") for name in report.removed_units.values())
    removed = tuple(f"{name}." for name in report.removed_units.values())  # their parameters are gone
    assert not any(name.startswith(removed) for name, _ in small.named_parameters())
    hfp_fx.save(small, tmp_path / "small.pt")
    loaded = hfp_fx.load(tmp_path / "small.pt", lambda: torchvision.models.resnet50().eval())
    assert loaded.meta["hfp"].removed_units == report.removed_units
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


@pytest.mark.slow
def test_prune_with_depth_on_vit_is_exact():
    torch.manual_seed(0)
    model = randomize_zero_weights(torchvision.models.vit_b_16().eval())
    check_depth_prune(model, torch.randn(1, 3, 224, 224), {"params": 0.5})


def test_prune_with_depth_meets_a_latency_target_with_the_latency_model_without_the_branches(tmp_path):
    """A removed branch takes its timed nodes' terms and intercepts out of the latency model;
    the plan is made and measured like a width-only one."""
    from hfp_fx.plan.cost import CostModel
    from hfp_fx.plan.latency import LatencyOptions, build_latency_model

    torch.set_num_threads(1)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    options = LatencyOptions(variants=3, node_time=2e-4, min_run_time=0.01, rounds=1, cache_dir=str(tmp_path))
    dg = hfp_fx.dependency_graph(model, x)
    latency = build_latency_model(dg, options)
    unit = next(u for u in dg.depth_units if u.removable)
    ones = torch.ones(CostModel(dg).num_units, dtype=torch.float64)
    full, without = (float(CostModel(dg, latency=latency, removed=r).latency(ones)) for r in ((), [unit]))
    assert without < full  # its nodes' share is gone
    small = hfp_fx.prune(model, x, {"latency": 0.7}, depth=True, latency_options=options)
    report = small.meta["hfp"]
    assert report.latency is not None and report.latency.measured_ms is not None
    with torch.no_grad():
        assert_close(hfp_fx.mask(model, x, keep=report.keep)(x), small(x))


def test_llama_with_two_of_four_layers_removed_round_trips_through_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(transformers)
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 8))
    dg = hfp_fx.dependency_graph(model, ids)
    keep = {u.id: False for u in dg.depth_units if u.name.startswith(("model.layers.1.", "model.layers.3."))}
    keep.update({g.id: list(range(g.channels // 2)) for g in dg.prunable_groups})  # and half of every width
    small = hfp_fx.shrink(dg, keep=keep)
    hf = hfp_fx.to_pretrained(small, like=model)  # checks itself against `small`
    assert hf.config.num_hidden_layers == 2 and len(hf.model.layers) == 2
    hf.save_pretrained(tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, small(ids), rtol=1e-4, atol=1e-5)
    one_branch = hfp_fx.shrink(dg, keep={dg.depth_units[2].id: False})
    with pytest.raises(ValueError, match="lost its attention branch only.*stays a GraphModule"):
        hfp_fx.to_pretrained(one_branch, like=model)


@pytest.mark.parametrize("depth", [True, "only"])
def test_prune_with_depth_and_uniform_blocks_removes_whole_decoder_layers(depth):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_llama_config(transformers)
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (2, 8))
    small = hfp_fx.prune(model, {"input_ids": ids}, {"params": 0.6}, depth=depth, uniform_blocks=True)
    report = small.meta["hfp"]
    layers = {name.rsplit(".", 1)[0] for name in report.removed_units.values()}
    assert len(report.removed_units) == 2 * len(layers)  # attention and MLP together, if any
    assert layers or depth is True  # (the joint plan may find widths better: next-token loss decides)
    assert report.achieved.params <= report.target.params
    if depth == "only":
        assert all(g.kept == g.dense for g in report.groups.values())
    hf = hfp_fx.to_pretrained(small, like=model)  # checks itself against `small`
    assert hf.config.num_hidden_layers == 4 - len(layers)


def test_hfp_depth_gates_start_exact_and_finalize_removes_and_scales_branches(tmp_path):
    """prepare(depth=True): one gate per removable branch, from 1 (the prepared model is the
    model); finalize removes the branches below 0.5 and scales the kept ones by their gate, and
    equals the prepared model with the removed channels' and branches' gates at zero."""
    from tests.helpers import apply_plan

    torch.manual_seed(0)
    model, x = randomize_zero_weights(torchvision.models.resnet18().eval()), torch.randn(2, 3, 32, 32)
    prepared = hfp_fx.prepare(model, x, {"macs": 0.6}, depth=True).eval()
    hfp = prepared.hfp
    assert len(hfp.depth_units) == 5 and any(p is hfp.depth_gates for p in hfp_fx.gate_parameters(prepared))
    with torch.no_grad():
        assert_close(prepared(x), model(x))
    loss = hfp_fx.complexity_loss(prepared)
    loss.backward()
    assert float(hfp.depth_gates.grad.abs().sum()) > 0  # the budget pushes the branches down
    with torch.no_grad():
        hfp.depth_gates[0] = 0.2  # removed
        hfp.depth_gates[3] = 0.7  # kept, scaled
    small = hfp_fx.finalize(prepared)
    report = small.meta["hfp"]
    assert list(report.removed_units) == [hfp.depth_units[0].id]
    assert report.achieved.macs <= report.target.macs
    assert hfp_fx.count(small, x).macs == report.achieved.macs
    assert report.depth_scales == {hfp.depth_units[3].id: pytest.approx(0.7)}  # (a BatchNorm ends the branch)
    hfp_fx.save(small, tmp_path / "small.pt")  # the scale is in the plan: load rebuilds it
    loaded = hfp_fx.load(tmp_path / "small.pt", lambda: torchvision.models.resnet18().eval())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
    apply_plan(prepared, report.keep)
    with torch.no_grad():
        hfp.depth_gates[0] = 0.0
        assert_close(prepared(x), small(x))


def test_hfp_depth_gates_train_a_branch_away():
    torch.manual_seed(0)
    model, x = randomize_zero_weights(torchvision.models.resnet18().eval()), torch.randn(2, 3, 32, 32)
    prepared = hfp_fx.prepare(model, x, {"macs": 0.4}, depth=True)
    opt = torch.optim.SGD(hfp_fx.gate_parameters(prepared), lr=0.2)
    for _ in range(30):
        opt.zero_grad()
        hfp_fx.complexity_loss(prepared).backward()
        opt.step()
    values = prepared.hfp.depth_values().detach()
    assert float(values.min()) < 0.5  # the cheapest way under the budget includes whole branches
    small = hfp_fx.finalize(prepared)
    assert small.meta["hfp"].removed_units and small.meta["hfp"].achieved.macs <= small.meta["hfp"].target.macs


def test_hfp_depth_gates_remove_whole_decoder_layers_under_uniform_blocks():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(tiny_llama_config(transformers)).eval(), torch.randint(0, 64, (2, 8))
    prepared = hfp_fx.prepare(model, {"input_ids": ids}, {"params": 0.8}, depth=True, uniform_blocks=True)
    hfp = prepared.hfp
    names = [u.name for u in hfp.depth_units]
    with torch.no_grad():  # layer 1: mean 0.3 (goes whole); layer 2: mean 0.6 (stays, both scaled)
        hfp.depth_gates[names.index("model.layers.1.self_attn")] = 0.2
        hfp.depth_gates[names.index("model.layers.1.mlp")] = 0.4
        hfp.depth_gates[names.index("model.layers.2.self_attn")] = 0.3
        hfp.depth_gates[names.index("model.layers.2.mlp")] = 0.9
    small = hfp_fx.finalize(prepared)
    assert sorted(small.meta["hfp"].removed_units.values()) == ["model.layers.1.mlp", "model.layers.1.self_attn"]
    hf = hfp_fx.to_pretrained(small, like=model)  # the kept gates are folded into o_proj / down_proj
    assert hf.config.num_hidden_layers == 3
