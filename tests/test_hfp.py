"""HFP: prepare -> complexity loss -> finalize / prune hit the targets exactly."""
import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn as nn
import torchvision

import hfp_fx
from helpers import apply_plan, assert_close, assert_unchanged, state_snapshot

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(width_mult=0.5),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
}
TARGETS = [{"macs": 0.4}, {"params": "50%"}, {"params": 0.6, "macs": 0.5}]


def assert_meets(counts, target, dense, tol=0.005):
    """Every targeted count is <= its target; the binding one is within ``tol`` of dense below it."""
    gaps = []
    for name in ("params", "macs"):
        t = target.get(name)
        if t is None:
            continue
        value = getattr(counts, name)
        assert value <= t, f"{name} {value} > target {t}"
        gaps.append((t - value) / getattr(dense, name))
    assert min(gaps) <= tol, gaps


def resolved(target, dense):
    return {k: v for k, v in hfp_fx.Target.parse(target).resolve(dense).items()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("target", TARGETS, ids=["macs40", "params50", "both"])
def test_prune_hits_target(name, target):
    model, x = MODELS[name]().eval(), torch.randn(1, 3, 64, 64)
    snap = state_snapshot(model)
    dense = hfp_fx.count(model, x)
    small = hfp_fx.prune(model, x, target)
    achieved = hfp_fx.count(small, x)
    assert achieved.params == small.meta["hfp"].achieved.params
    assert_meets(achieved, resolved(target, dense), dense)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_prepare_finalize_without_training(name):
    model, x = MODELS[name]().eval(), torch.randn(2, 3, 64, 64)
    snap = state_snapshot(model)
    prepared = hfp_fx.prepare(model, x, hfp_fx.Target(macs=0.4)).eval()
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))  # gates start at exactly 1
    small = hfp_fx.finalize(prepared).eval()
    dense = hfp_fx.count(model, x)
    assert_meets(hfp_fx.count(small, x), resolved({"macs": 0.4}, dense), dense)
    assert_unchanged(model, snap)


class SquareResidual(nn.Module):
    """Residual blocks ``x + conv(x)`` of square 1x1 convs: one prune group (the residual width
    ``n``) whose cost grows with ``n ** 2``, so the first-order cost of one more channel (the
    derivative at ``n``) is below its exact cost by the number of blocks (params) or the blocks
    times the pixels (MACs)."""

    def __init__(self, width=16, blocks=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.blocks = nn.ModuleList([nn.Conv2d(width, width, 1) for _ in range(blocks)])
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        x = self.stem(x)
        for conv in self.blocks:
            x = x + conv(x)
        return self.head(x.mean((2, 3)))


@functools.lru_cache(maxsize=None)
def square_residual_counts():
    """The model, its input, and the counts of the shrunk model keeping ``n`` residual channels."""
    torch.manual_seed(0)
    model, x = SquareResidual().eval(), torch.randn(1, 3, 4, 4)
    dg = hfp_fx.dependency_graph(model, x)
    (group,) = dg.prunable_groups
    counts = {n: hfp_fx.count(hfp_fx.shrink(dg, keep={group.id: range(n)}), x) for n in range(1, group.channels + 1)}
    return model, x, counts


@pytest.mark.parametrize("metric", ["params", "macs", "both"])
@pytest.mark.parametrize("n", [3, 7, 12])
def test_add_back_checks_the_exact_cost_of_a_quadratic_group(metric, n):
    """Targets in ``[cost(n) + cost'(n), cost(n + 1))``: by its first-order cost one more channel fits,
    by its exact cost it does not.  prune and finalize keep exactly ``n`` channels."""
    model, x, counts = square_residual_counts()
    names = ["params", "macs"] if metric == "both" else [metric]
    targets = []
    for lo_or_hi in (0, 1):
        target = {}
        for name in names:
            value = {k: getattr(c, name) for k, c in counts.items()}
            first_order = (value[n + 1] - value[n - 1]) // 2  # the derivative at n (cost is quadratic in n)
            assert value[n] + first_order < value[n + 1]  # the window is not empty
            target[name] = value[n] + first_order if lo_or_hi == 0 else value[n + 1] - 1
        targets.append(target)
    for target in targets:
        prepared = hfp_fx.prepare(model, x, target).eval()
        for small in (hfp_fx.prune(model, x, target), hfp_fx.finalize(prepared)):
            achieved, report = hfp_fx.count(small, x), small.meta["hfp"]
            assert [g.kept for g in report.groups.values()] == [n], (target, report.groups)
            assert achieved == counts[n]
            assert (achieved.params, achieved.macs) == (report.achieved.params, report.achieved.macs)
            for name, t in target.items():
                # under target, by less than one more channel's cost (the documented slack)
                assert getattr(counts[n], name) <= t < getattr(counts[n + 1], name)


def test_round_to_keeps_multiples():
    model, x = MODELS["resnet18"]().eval(), torch.randn(1, 3, 64, 64)
    small = hfp_fx.prune(model, x, "50%", round_to=8)
    groups = small.meta["hfp"].groups
    assert sum(g.kept < g.dense for g in groups.values()) >= len(groups) // 2  # most groups were cut
    for gid, g in groups.items():
        assert g.kept == g.dense or g.kept % 8 == 0, (gid, g)
    for m in small.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels not in (1000,):
            assert m.out_channels % 8 == 0


def test_projection_fit_only_lowers_counts_and_the_others_refill():
    """A fit (here: the first group a multiple of 4, 10 -> 8) lowers the counts it names; the groups it does
    not name take the freed budget back; a fit that raises a count is refused."""
    from hfp_fx.plan.projection import project
    from hfp_fx.plan.saliency import magnitude_saliency

    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.randn(1, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x)
    cm = hfp_fx.CostModel(dg)
    groups, saliency = dg.prunable_groups, magnitude_saliency(dg, "l1")
    target = hfp_fx.Target(params=0.5).resolve(cm.counts())
    free = project(cm, groups, saliency, target, cost_power=0)
    first = groups[0].id
    seen = []

    def fit(kept, allowed):
        seen.append(dict(kept))
        return {first: kept[first] - kept[first] % 4}

    plan = project(cm, groups, saliency, target, cost_power=0, fit=fit)
    assert seen == [{gid: kept for gid, (_, kept) in free.kept_per_group.items()}]
    assert plan.kept_per_group[first][1] == seen[0][first] - seen[0][first] % 4 < seen[0][first]
    assert plan.counts.params <= target.params
    assert sum(k for gid, (_, k) in plan.kept_per_group.items() if gid != first) > \
        sum(k for gid, (_, k) in free.kept_per_group.items() if gid != first)
    with pytest.raises(ValueError, match="may only lower"):
        project(cm, groups, saliency, target, cost_power=0, fit=lambda kept, allowed: {first: kept[first] + 1})


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("options", [{}, {"gates": "channel"}, {"gates": "channel", "relative_gates": True}],
                         ids=["width", "channel", "channel-relative"])
def test_training_drives_complexity_to_target_and_finalize_is_exact(options):
    torch.manual_seed(0)
    model, x = TinyNet(), torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))
    prepared = hfp_fx.prepare(model, x, {"macs": 0.5}, lambda_init=0.02, **options)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(200):
        loss = nn.functional.cross_entropy(prepared(x), y) + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(hfp_fx.complexity(prepared)["macs_ratio"])
    assert history[0] > 1.5 and min(history[-20:]) <= 1.0
    assert float(hfp_fx.complexity_loss(prepared)) == 0.0
    prepared.eval()
    small = hfp_fx.finalize(prepared).eval()
    report = small.meta["hfp"]
    assert report.achieved.macs <= report.target.macs
    # reference semantics: the prepared model with the removed channels' gates at zero
    apply_plan(prepared, report.keep)
    with torch.no_grad():
        assert_close(prepared(x), small(x))


def test_target_ramp_falls_from_dense_to_target():
    torch.manual_seed(0)
    model, x = TinyNet(), torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))
    ramp = 100
    prepared = hfp_fx.prepare(model, x, {"macs": 0.5}, lambda_init=0.02, ramp_steps=ramp)
    hfp = prepared.hfp
    dense, final = hfp.dense.macs, hfp.target.macs
    with torch.no_grad():  # (no dual step)
        assert float(hfp_fx.complexity_loss(prepared)) == 0.0  # the ramp starts at the dense model
    opt = torch.optim.SGD(prepared.parameters(), lr=0.02, momentum=0.9)
    targets, ratios = [], []  # current target, hard MACs / current target
    for _ in range(200):
        c = hfp_fx.complexity(prepared)
        targets.append(c["current_target_macs"])
        ratios.append(c["macs"] / c["current_target_macs"])
        loss = nn.functional.cross_entropy(prepared(x), y) + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert targets[0] == dense and targets[ramp] == targets[-1] == final
    assert all(a >= b for a, b in zip(targets, targets[1:]))  # never rises
    assert dense > targets[ramp // 2] > final
    assert hfp_fx.complexity(prepared)["current_target_params"] is None  # params not targeted
    assert min(ratios[-20:]) <= 1.0  # at the final target by the end


def test_relative_gates_ignore_a_groups_common_scale():
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, "50%", gates="channel", relative_gates=True).eval()
    assert_close(prepared(x), model(x))
    hfp = prepared.hfp
    gid = hfp.group_ids[0]
    with torch.no_grad():
        hfp.gates.gate_of(gid).uniform_(0.5, 1.0)
        before, kept = prepared(x), hfp_fx.complexity(prepared)["kept_channels"]
        hfp.gates.gate_of(gid).mul_(0.01)  # far below the threshold in absolute terms
        assert_close(prepared(x), before)
        assert hfp_fx.complexity(prepared)["kept_channels"] == kept
    # the cost push has no component along a group's common scale
    hfp_fx.complexity_loss(prepared).backward()
    g, grad = hfp.gates.gate_of(gid).detach(), hfp.gates.gate.grad[hfp.offsets[0]:hfp.offsets[1]]
    assert float((g * grad).sum()).__abs__() <= 1e-6 * float(grad.abs().sum() * g.abs().max())


def test_complexity_loss_is_zero_under_target_and_differentiable():
    model, x = TinyNet(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, {"params": 1.0})
    assert float(hfp_fx.complexity_loss(prepared)) == 0.0
    prepared = hfp_fx.prepare(model, x, "30%")
    loss = hfp_fx.complexity_loss(prepared)
    loss.backward()
    grad = hfp_fx.gate_parameters(prepared)[0].grad
    assert loss > 0 and grad is not None and bool((grad > 0).all())
    c = hfp_fx.complexity(prepared)
    assert c["macs"] == c["dense_macs"] and c["macs_ratio"] == pytest.approx(1 / 0.3, rel=1e-3)


@pytest.mark.parametrize("target", [{"params": 0.5}, {"params": 0.4, "macs": 1.0}, {"params": 0.5, "macs": 0.4},
                                    {"macs": 0.4}], ids=["params", "params-binding", "both", "macs"])
@pytest.mark.parametrize("gates", ["width", "channel"])
def test_complexity_loss_sums_every_targeted_term(target, gates):
    """The documented loss ``U * sum_X lambda_X * max(0, log(X / X_target))``, params term included."""
    model, x = TinyNet(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, target, lambda_init=0.02, gates=gates).train()
    c = hfp_fx.complexity(prepared)
    expected = 0.02 * c["prunable_channels"] * sum(
        max(0.0, math.log(c[f"{k}_soft"] / c[f"target_{k}"])) for k in target)
    with torch.no_grad():  # no dual step
        assert float(hfp_fx.complexity_loss(prepared)) == pytest.approx(expected, rel=1e-5)
    assert expected > 0.02 * c["prunable_channels"] * 0.5  # every case is well over target
    hfp_fx.complexity_loss(prepared).backward()
    assert bool((hfp_fx.gate_parameters(prepared)[0].grad > 0).all())  # pushes every gate down


@pytest.mark.parametrize("target", [{"params": 0.5}, {"params": 0.4, "macs": 1.0}], ids=["params", "params-binding"])
def test_a_few_training_steps_lower_params_under_a_params_target(target):
    torch.manual_seed(0)
    model, x = TinyNet(), torch.randn(8, 3, 8, 8)
    y = torch.randint(0, 4, (8,))
    prepared = hfp_fx.prepare(model, x, target, lambda_init=0.02)
    before = hfp_fx.complexity(prepared)
    assert before["params"] == before["dense_params"] > before["target_params"]
    opt = torch.optim.SGD(prepared.parameters(), lr=0.02, momentum=0.9)
    for _ in range(10):
        loss = nn.functional.cross_entropy(prepared(x), y) + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = hfp_fx.complexity(prepared)
    assert after["params"] < 0.95 * before["params"], (before["params"], after["params"])
    assert after["params_soft"] < before["params_soft"]


def test_infeasible_target_states_floor():
    model, x = TinyNet(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="not reachable.*still has"):
        hfp_fx.prepare(model, x, {"params": 10})
    with pytest.raises(ValueError, match="not reachable"):
        hfp_fx.prune(model, x, {"macs": 5})
    for bad in (0, -3, 1.5, "abc", "0%", {"flops": 0.5}):
        with pytest.raises(ValueError):
            hfp_fx.prune(model, x, bad)


def test_a_target_exactly_at_the_floor_is_reachable():
    """The floor (every prunable group at min_channels) is itself a reachable target, one count
    below it is not: the feasibility check compares with ``>``, not ``>=``."""
    model, x = TinyNet(), torch.randn(1, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x)
    cm = hfp_fx.CostModel(dg)
    floor = cm.counts(dg.alive({g.id: [0] for g in dg.prunable_groups})[cm.unit_ids])
    small = hfp_fx.prune(model, x, {"params": floor.params})
    assert small.meta["hfp"].achieved.params == floor.params == hfp_fx.count(small, x).params
    with pytest.raises(hfp_fx.InfeasibleTargetError, match="not reachable"):
        hfp_fx.prune(model, x, {"params": floor.params - 1})


def test_finalize_needs_prepared_model():
    with pytest.raises(TypeError, match="prepare"):
        hfp_fx.finalize(TinyNet())


def test_safe_save_and_load(tmp_path):
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    small = hfp_fx.prune(model, x, "40%").eval()
    path = tmp_path / "small.pt"
    hfp_fx.save(small, path)
    torch.load(path, weights_only=True)  # plain data: no pickled code
    again = hfp_fx.load(path, torchvision.models.resnet18, x).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    with pytest.raises(ValueError, match="different prune groups"):
        hfp_fx.load(path, torchvision.models.resnet34, x)


def _tamper(name, state, plan):
    """Edit a saved file's state dict / plan; return the pattern the load error must match."""
    if name == "missing-weight":
        del state["body.3.weight"]
        return r"missing weights.*body\.3\.weight"
    if name == "missing-buffer":
        del state["body.4.running_var"]
        return r"missing weights.*body\.4\.running_var"
    if name == "extra-key":
        state["body.9.weight"] = torch.ones(3)
        return r"unexpected weights.*body\.9\.weight"
    if name == "wrong-shape":
        state["body.3.weight"] = state["body.3.weight"][1:].clone()
        return r"wrong shapes.*body\.3\.weight"
    assert name == "plan-keep"  # the plan keeps one channel fewer than the weights hold
    plan["keep"]["g1"] = plan["keep"]["g1"][1:]
    return r"group g1 keeps \d+ channels by its count and \d+ by its keep list"


TAMPER = ["missing-weight", "missing-buffer", "extra-key", "wrong-shape", "plan-keep"]


@pytest.mark.parametrize("tamper", TAMPER)
def test_load_rejects_a_file_whose_weights_do_not_match(tamper, tmp_path):
    """A file edited after saving (a key removed or added, a shape changed, the plan changed) is
    refused with an error naming the key, never loaded partially."""
    import json

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    small = hfp_fx.prune(TinyNet().eval(), x, {"macs": 0.5})
    path = tmp_path / "small.pt"
    hfp_fx.save(small, path)
    assert torch.equal(hfp_fx.load(path, TinyNet, x).eval()(x), small.eval()(x))  # untampered: fine
    blob = torch.load(path, weights_only=True)
    plan = json.loads(blob["plan"])
    assert "g1" in plan["keep"] and "body.3.weight" in blob["state_dict"]
    pattern = _tamper(tamper, blob["state_dict"], plan)
    blob["plan"] = json.dumps(plan)
    torch.save(blob, path)
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        hfp_fx.load(path, TinyNet, x)


def test_safe_save_and_load_of_folded_attention_gates(tmp_path):
    """Per-channel gates of an attention block are folded into the weights (no scale node: every
    gate site has a weight; test_io.py covers scale nodes) and the result round-trips."""
    from test_ops import Block, ManualAttention

    torch.manual_seed(0)
    model, x = Block(ManualAttention), torch.randn(2, 5, 8)
    prepared = hfp_fx.prepare(model, x, {"macs": 0.7}, gates="channel")
    with torch.no_grad():
        prepared.hfp.gates.gate.uniform_(0.5, 1.5)
    small = hfp_fx.finalize(prepared).eval()
    assert small.meta["hfp"].scale_sites == [] and small.meta["hfp"].keep
    hfp_fx.save(small, tmp_path / "m.pt")
    again = hfp_fx.load(tmp_path / "m.pt", lambda: Block(ManualAttention), x).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), seed=st.integers(0, 3))
def test_widths_keep_the_top_ranked_channels_exactly(widths, seed):
    """With per-group widths the prepared model is the masked model of the top-ranked channels,
    its hard counts are that model's, and finalize keeps at least those (it only adds back)."""
    torch.manual_seed(seed)
    model, x = TinyNet().eval(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, {"macs": 0.01 + 0.99 * min(widths)}).eval()
    hfp = prepared.hfp
    assert len(hfp.group_ids) == 3 and hfp.gates.kind == "width"
    with torch.no_grad():
        hfp.gates.width.copy_(torch.tensor(widths))
    keep = {}
    for i, gid in enumerate(hfp.group_ids):
        lo, hi = hfp.offsets[i], hfp.offsets[i + 1]
        kept = max(1, int(torch.tensor(widths[i] * (hi - lo) - 0.5).ceil()))  # ranks < n * w - 0.5
        kept = min(kept, hi - lo)
        keep[gid] = sorted(int(c) for c in torch.nonzero(hfp.gates.rank[lo:hi] < kept).flatten())
        assert int(hfp.kept_channels()[lo:hi].sum()) == len(keep[gid]) == kept
    with torch.no_grad():
        assert_close(prepared(x), hfp_fx.mask(model, x, keep)(x))
    c = hfp_fx.complexity(prepared)
    small = hfp_fx.shrink(model, x, keep)
    counted = hfp_fx.count(small, x)
    assert (c["params"], c["macs"]) == (counted.params, counted.macs)
    final = hfp_fx.finalize(prepared, target={"macs": 1.0}).meta["hfp"].groups
    assert all(final[gid].kept >= len(keep[gid]) for gid in keep)


def test_width_cost_push_and_per_channel_options():
    model, x = TinyNet(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, "30%").train()
    hfp_fx.complexity_loss(prepared).backward()
    grad = prepared.hfp.gates.width.grad
    # over target, the cost pushes every group's width down (through its boundary channel)
    assert bool((grad > 0).all())
    for option in ({"relative_gates": True}, {"gate_max": 1.0}, {"count": "sigmoid"}, {"cost_power": 0.5}):
        with pytest.raises(ValueError, match="gates='channel'"):
            hfp_fx.prepare(model, x, "30%", **option)
    with pytest.raises(ValueError, match="gates must be"):
        hfp_fx.prepare(model, x, "30%", gates="filter")


def test_widths_survive_a_cast_to_half():
    """Ranks and group sizes are integers: casting the prepared model cannot round them."""
    model, x = TinyNet().eval(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, "50%").eval()
    with torch.no_grad():
        prepared.hfp.gates.width.fill_(0.5)
    kept = prepared.hfp.kept_channels().clone()
    half = prepared.half()
    assert half.hfp.gates.rank.dtype == torch.long and half.hfp.gates.width.dtype == torch.float16
    assert torch.equal(half.hfp.kept_channels(), kept)
    assert half.hfp.gates.effective_gates().dtype == torch.float16


def test_width_gradient_flows_through_one_boundary_channel_and_past_the_floor():
    model, x = TinyNet(), torch.randn(2, 3, 8, 8)
    prepared = hfp_fx.prepare(model, x, "50%", min_channels=4)
    hfp = prepared.hfp
    sizes = torch.tensor([hfp.offsets[i + 1] - hfp.offsets[i] for i in range(len(hfp.group_ids))], dtype=torch.float64)
    mean_size = hfp.num_channels / len(hfp.group_ids)
    for width in (0.5, 0.37, 0.01):  # whole n * width, fractional, below the min_channels floor
        hfp.gates.width.grad = None
        with torch.no_grad():
            hfp.gates.width.fill_(width)
        hfp.gates.effective_gates().sum().backward()
        # d(sum of masks)/d width = n / mean_size: exactly one channel per group carries it
        assert torch.allclose(hfp.gates.width.grad.double(), sizes / mean_size), (width, hfp.gates.width.grad)
        if width == 0.01:
            assert all(int(hfp.kept_channels()[hfp.offsets[i]:hfp.offsets[i + 1]].sum()) == 4 for i in range(3))


class _SmallButNeeded(torch.nn.Module):
    """Channel 0 of ``fc1`` has the smallest filter but is the only one ``fc2`` reads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
        with torch.no_grad():
            self.fc1.weight.normal_()
            self.fc1.weight[0] *= 0.01
            self.fc1.bias.fill_(0.5)
            self.fc1.bias[0] = 0.001
            self.fc2.weight.zero_()
            self.fc2.weight[0, 0] = 5.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_rerank_moves_the_channel_the_loss_needs_to_the_top_and_finalize_stays_exact():
    torch.manual_seed(0)
    model, x = _SmallButNeeded(), torch.randn(16, 4).abs()
    for every in (0, 2):
        prepared = hfp_fx.prepare(model, x[:1], {"params": 0.6}, rerank_every=every)
        gates = prepared.hfp.gates
        assert int(gates.rank[0]) == 7  # magnitude ranks it last
        opt = torch.optim.SGD(hfp_fx.gate_parameters(prepared), lr=0.0)  # the ranking alone decides
        for _ in range(4):
            loss = prepared(x).mean() + 0 * hfp_fx.complexity_loss(prepared)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert int(gates.rank[0]) == (7 if every == 0 else 0)
        assert sorted(gates.rank.tolist()) == list(range(8))
        prepared.eval()
        small = hfp_fx.finalize(prepared)  # 60% of the params: four of fc1's eight channels
        reference = copy.deepcopy(prepared)
        apply_plan(reference, small.meta["hfp"].keep)  # asserts the kept channels are the top-ranked
        with torch.no_grad():
            assert_close(small(x), reference(x))
        assert (0 in small.meta["hfp"].keep.get("g0", [0])) == (every > 0)


def test_rerank_records_the_task_gradient_only_and_breaks_ties_by_the_old_rank():
    model, x = _SmallButNeeded(), torch.randn(4, 4)
    prepared = hfp_fx.prepare(model, x[:1], {"params": 0.5}, rerank_every=1)
    gates = prepared.hfp.gates
    before = gates.rank.clone()
    hfp_fx.complexity_loss(prepared).backward()  # the cost term alone: nothing recorded, nothing moves
    assert float(gates.taylor.abs().sum()) == 0.0 and torch.equal(gates.rank, before)
    with torch.no_grad():
        gates.taylor.zero_()
        gates.taylor[3] = 1.0
    gates.rerank()
    expected = [0 if c == 3 else int(r) + (int(r) < int(before[3])) for c, r in enumerate(before)]
    assert gates.rank.tolist() == expected
    with pytest.raises(ValueError, match="gates='width'"):
        hfp_fx.prepare(model, x[:1], {"params": 0.5}, gates="channel", rerank_every=5)


def test_finalize_names_prepare_for_a_model_it_did_not_prepare():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    with pytest.raises(TypeError, match="hfp_fx.prepare"):
        hfp_fx.finalize(torch.fx.symbolic_trace(model))
    with pytest.raises(TypeError, match="hfp_fx.prepare"):
        hfp_fx.recalibrate_latency(model)
