"""Latency targets: the measured latency model, its cache, the projection and the measured check.

Timings here are tiny (a few ms of repetitions) and never asserted against wall-clock goals;
the tests check structure, monotonicity, the cache and the correction logic (with a fake clock).
"""
import pytest
import torch
import torchvision

import hfp_fx
from hfp_fx.plan import latency as latency_mod
from hfp_fx.plan.cost import CostModel, Counts
from hfp_fx.plan.latency import LatencyOptions, build_latency_model
from hfp_fx.plan.projection import Plan
from hfp_fx.plan.target import ResolvedTarget, Target

from helpers import apply_plan, assert_close


@pytest.fixture(autouse=True)
def _one_thread():
    """Timings with one thread: several OpenMP threads on a busy machine spin against each other
    (100x slower runs), and these tests only need consistent, not fast, timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fast_options(tmp_path, **kw):
    base = dict(variants=3, node_time=2e-4, min_run_time=0.01, rounds=1, cache_dir=str(tmp_path))
    base.update(kw)
    return LatencyOptions(**base)


def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, stride=2), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()


def test_latency_target_parsing():
    assert Target(latency=0.5).resolve(Counts(10, 10), dense_latency_ms=8.0).latency == 4.0
    assert Target.parse({"latency": "25%", "macs": 0.5}).resolve(Counts(10, 100), 2.0).latency == 0.5
    assert Target(latency="12ms").resolve(Counts(10, 10)).latency == 12.0
    for bad in (2, "3", "x ms", "0ms", True, 1.5):
        with pytest.raises(ValueError, match="latency"):
            Target(latency=bad)
    with pytest.raises(ValueError, match="measured latency"):
        Target(latency=0.5).resolve(Counts(10, 10))


def test_latency_model_is_monotone_and_differentiable(tmp_path):
    model, x = small_cnn(), torch.randn(1, 3, 32, 32)
    dg = hfp_fx.dependency_graph(model, x)
    terms = build_latency_model(dg, fast_options(tmp_path))
    assert terms.dense_ms > 0 and terms.fit["nodes"] > 0 and terms.fit["models"] == 4
    assert all(c > 0 for c, _ in terms.terms) and all(1 <= len(rows) <= 2 for _, rows in terms.terms)
    cm = CostModel(dg, latency=terms)
    ones = torch.ones(cm.num_units, dtype=torch.float64, requires_grad=True)
    dense = cm.latency(ones)
    dense.backward()
    assert (ones.grad >= 0).all() and ones.grad.sum() > 0  # removing a channel never costs time
    half = torch.ones(cm.num_units, dtype=torch.float64)
    for g in dg.prunable_groups:
        half[cm.columns(g.units)[g.channels // 2:]] = 0
    assert float(cm.latency(half)) < float(dense.detach())
    # params/MACs are unchanged by the latency terms sharing the rows
    assert cm.counts() == CostModel(dg).counts()


def test_latency_terms_reproduce_the_fit_on_every_timed_model(tmp_path):
    """The cost model's latency, built from the emitted terms, is the fit's prediction for each
    model that was timed (an off-by-one between coefficients and factors would break it)."""
    from hfp_fx.plan.latency import _variant_keeps

    model, x = small_cnn(), torch.randn(1, 3, 16, 16)
    dg = hfp_fx.dependency_graph(model, x)
    options = fast_options(tmp_path)
    terms = build_latency_model(dg, options)
    cm = CostModel(dg, latency=terms)
    keeps = [{}] + _variant_keeps(dg, options.variants, options.seed)
    assert len(keeps) == len(terms.fit["predicted_ms"]) == terms.fit["models"]
    for keep, predicted in zip(keeps, terms.fit["predicted_ms"]):
        ms = float(cm.latency(dg.alive(keep)[cm.unit_ids].double()))
        assert ms == pytest.approx(predicted, rel=1e-9)


def test_latency_cache_skips_timing_on_the_second_build(tmp_path, monkeypatch):
    model, x = small_cnn(), torch.randn(1, 3, 16, 16)
    dg = hfp_fx.dependency_graph(model, x)
    first = build_latency_model(dg, fast_options(tmp_path))
    assert first.fit["timings"] > 0
    assert list((tmp_path / "latency").glob("*.json"))
    second = build_latency_model(dg, fast_options(tmp_path))
    assert second.fit["timings"] == 0  # every node and model timing came from the cache
    assert second.dense_ms == first.dense_ms and len(second.terms) == len(first.terms)
    monkeypatch.setenv("HFP_FX_CACHE", str(tmp_path / "env"))
    build_latency_model(dg, fast_options(tmp_path, cache_dir=None))
    assert list((tmp_path / "env" / "latency").glob("*.json"))


def reachable_latency(model, x, options, where=0.5):
    """A latency fraction between the model's floor (every group at one channel) and 1: per-op
    overheads make the floor of a small model machine-dependent.  The cache in ``options`` makes
    the later call fit the same latency model."""
    dg = hfp_fx.dependency_graph(model, x)
    cm = CostModel(dg, latency=build_latency_model(dg, options))
    keep = torch.ones(cm.num_units, dtype=torch.float64)
    for g in dg.prunable_groups:
        keep[cm.columns(g.units)[1:]] = 0
    floor = float(cm.latency(keep)) / float(cm.latency(torch.ones_like(keep)))
    return floor + where * (1 - floor)


def test_prune_to_a_latency_target_meets_the_prediction_and_stays_exact(tmp_path):
    model, x = small_cnn(), torch.randn(1, 3, 32, 32)
    options = fast_options(tmp_path, corrections=0)
    goal = reachable_latency(model, x, options)
    small = hfp_fx.prune(model, x, {"latency": goal}, latency_options=options)
    report = small.meta["hfp"]
    lat = report.latency
    assert lat is not None and lat.measured_ms > 0 and lat.corrections == 0
    assert lat.predicted_ms <= lat.target_ms * (1 + 1e-9)
    assert lat.target_ms == pytest.approx(goal * lat.dense_ms)
    assert report.achieved.macs < report.dense.macs
    dg = hfp_fx.dependency_graph(model, x)
    assert_close(small(x), hfp_fx.mask(model, x, report.keep)(x))
    assert hfp_fx.count(small, x).macs == report.achieved.macs and dg.prunable_groups


class _Planned(torch.nn.Module):
    """A stand-in pruned model that knows its predicted latency ratio."""

    def __init__(self, predicted):
        super().__init__()
        self.predicted = predicted


@pytest.mark.parametrize("factor", [1.3, 0.7, 1.05, 0.98])
def test_measured_latency_corrections_move_the_plan_into_the_window(monkeypatch, factor):
    """A clock ``factor`` times the prediction: a model slower than predicted is tightened, a faster
    one loosened, until the measured ratio is in ``[goal * (1 - slack), goal]``."""
    goal, dense_ms = 0.5, 10.0
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency",
                        lambda dense, small, *a: (dense_ms, dense_ms * factor * small.predicted, factor * small.predicted))

    def plan_for(budget):
        ratio = min(1.0, budget.latency / dense_ms)
        if ratio < 0.05:
            raise hfp_fx.InfeasibleTargetError("floor")
        return Plan({}, Counts(1, 1), Counts(1, 1), budget, {}, ratio * dense_ms)

    def build(plan):
        return _Planned(plan.latency_ms / dense_ms), None

    resolved = ResolvedTarget(None, None, goal * dense_ms)
    first = plan_for(resolved)
    options = LatencyOptions(corrections=8, slack=0.03)
    small, plan, report, _ = hfp_fx.train.hfp._meet_latency(torch.nn.Identity(), build(first)[0], first, resolved, dense_ms,
                                                      plan_for, build, (), options)
    assert goal * (1 - options.slack) <= report.measured_ratio <= goal
    assert small.predicted == pytest.approx(plan.latency_ms / dense_ms)
    assert (report.corrections >= 1) == (not goal * (1 - options.slack) <= factor * goal <= goal)


def test_measured_latency_misses_are_reported_with_a_warning(monkeypatch):
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency", lambda dense, small, *a: (1.0, 0.9, 0.9))
    plan = Plan({}, Counts(1, 1), Counts(1, 1), ResolvedTarget(None, None, 0.5), {}, 0.5)
    with pytest.warns(UserWarning, match="misses the target"):
        _, _, report, _ = hfp_fx.train.hfp._meet_latency(torch.nn.Identity(), _Planned(0.5), plan, plan.target, 1.0,
                                                   lambda b: plan, lambda p: (_Planned(0.5), None), (),
                                                   LatencyOptions(corrections=2))
    assert report.measured_ratio == 0.9 and report.corrections == 2


def test_prepare_latency_loss_pushes_widths_and_finalize_reports(tmp_path):
    model, x = small_cnn(), torch.randn(2, 3, 32, 32)
    options = fast_options(tmp_path, corrections=0)
    goal = reachable_latency(model, x, options)
    prepared = hfp_fx.prepare(model, x, {"latency": goal}, latency_options=options)
    info = hfp_fx.complexity(prepared)
    assert info["latency_ratio"] == pytest.approx(1 / goal, rel=1e-6)
    # the loss keeps its targets as integers (whole nanoseconds, so that .half() cannot round them)
    assert info["current_target_latency"] == pytest.approx(info["target_latency"], rel=0, abs=0.5e-6)
    prepared.train()
    loss = hfp_fx.complexity_loss(prepared)
    loss.backward()
    assert float(loss) > 0 and (prepared.hfp.trainable.grad > 0).any()  # widths pushed down
    small = hfp_fx.finalize(prepared)
    report = small.meta["hfp"]
    assert report.latency is not None and report.latency.predicted_ms <= report.latency.target_ms * (1 + 1e-9)
    reference = hfp_fx.prepare(model, x, {"macs": 0.9})
    apply_plan(reference, report.keep)
    assert_close(small.eval()(x), reference.eval()(x))


def test_state_dict_with_two_loss_weights_still_loads(tmp_path):
    model, x = small_cnn(), torch.randn(1, 3, 16, 16)
    prepared = hfp_fx.prepare(model, x, {"macs": 0.5})
    state = prepared.state_dict()
    state["hfp.lambdas"] = state["hfp.lambdas"][:2].clone().fill_(0.5)
    again = hfp_fx.prepare(model, x, {"macs": 0.5})
    again.load_state_dict(state)
    assert again.hfp.lambdas.tolist()[:2] == [0.5, 0.5]


def test_node_timer_times_requested_nodes_only():
    gm = torch.fx.symbolic_trace(small_cnn())
    names = {n.name for n in gm.graph.nodes if n.op == "call_module"}
    chosen = set(sorted(names)[:2])
    timer = latency_mod.NodeTimer(gm, chosen, budget=1e-4)
    with torch.inference_mode():
        out = timer.run(torch.randn(1, 3, 8, 8))
    assert out.shape == (1, 10) and set(timer.times) == chosen and timer.measured == 2
    assert all(t > 0 for t in timer.times.values())
    # a second run with the same cache times nothing
    again = latency_mod.NodeTimer(gm, chosen, budget=1e-4, cache=timer.cache)
    with torch.inference_mode():
        again.run(torch.randn(1, 3, 8, 8))
    assert again.measured == 0 and again.times == timer.times


def test_latency_target_on_torchvision_model(tmp_path):
    model, x = torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64)
    options = fast_options(tmp_path, variants=2, corrections=0)
    small = hfp_fx.prune(model, x, {"latency": reachable_latency(model, x, options), "params": 0.8},
                         latency_options=options)
    report = small.meta["hfp"]
    assert report.achieved.params <= report.target.params
    assert report.latency.predicted_ms <= report.latency.target_ms * (1 + 1e-9)


def test_a_latency_pruned_model_saves_and_loads_with_its_target(tmp_path):
    model, x = small_cnn(), torch.randn(1, 3, 32, 32)
    options = fast_options(tmp_path, corrections=0)
    small = hfp_fx.prune(model, x, {"latency": reachable_latency(model, x, options)}, latency_options=options)
    hfp_fx.save(small, tmp_path / "small.pt")
    again = hfp_fx.load(tmp_path / "small.pt", small_cnn, x)
    assert again.meta["hfp"].target.latency == pytest.approx(small.meta["hfp"].target.latency)
    assert_close(again(x), small(x))


def test_variants_spread_from_narrow_to_wide_at_the_plans_width_step():
    dg = hfp_fx.dependency_graph(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    keeps = latency_mod._variant_keeps(dg, 8, seed=0, round_to=8)
    sizes = {g.id: g.channels for g in dg.prunable_groups}
    fractions = []
    for keep in keeps:
        for gid, kept in keep.items():
            assert kept == list(range(len(kept))) and len(kept) % 8 == 0, (gid, len(kept))
        fractions.append(sum(len(keep.get(g, range(n))) for g, n in sizes.items()) / sum(sizes.values()))
    # one copy near the floor, one near dense: the calibration's constant is pinned from both ends
    assert min(fractions) < 0.2 and max(fractions) > 0.8


def test_node_fit_is_nonnegative_and_recovers_a_separable_time():
    points = [(fi, fo) for fi in (0.25, 0.5, 0.75, 1.0) for fo in (0.125, 0.5, 1.0)]
    xs = [latency_mod._features(p) for p in points]
    exact = [1.0 + 2.0 * fi + 0.0 * fo + 3.0 * fi * fo for fi, fo in points]
    assert latency_mod._fit_nonnegative(xs, exact) == pytest.approx((1.0, 2.0, 0.0, 3.0), abs=1e-9)
    # time that falls as channels are added has no non-negative description but a constant
    falling = [2.0 - fi for fi, _ in points]
    coef = latency_mod._fit_nonnegative(xs, falling)
    assert all(c >= 0 for c in coef) and coef[0] == pytest.approx(sum(falling) / len(falling))


def test_paired_times_alternate_the_order_every_round():
    calls = []
    times = latency_mod.paired_times(lambda: calls.append("a"), lambda: calls.append("b"), (), rounds=4, block=0.0)
    assert [len(t) for t in times] == [4, 4]
    timed = calls[6:]  # two warm-up calls and one sizing call per function come first
    assert timed == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_recalibrate_latency_scales_the_loss_and_the_finalize_plan(tmp_path, monkeypatch):
    """A machine 1.2x slower (relative) than the model predicts: the loss sees 1.2x the predicted
    latency; finalize plans for the target in the model's units (target / scale)."""
    model, x = small_cnn(), torch.randn(2, 3, 32, 32)
    options = fast_options(tmp_path, corrections=0)
    goal = reachable_latency(model, x, options, where=0.9)
    prepared = hfp_fx.prepare(model, x, {"latency": goal}, latency_options=options)
    with torch.no_grad():
        prepared.hfp.gates.width.fill_(0.7)
    predicted = hfp_fx.complexity(prepared)["latency"] / hfp_fx.complexity(prepared)["dense_latency"]
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency", lambda dense, small, *a: (1.0, 1.2 * predicted, 1.2 * predicted))
    info = hfp_fx.recalibrate_latency(prepared)
    assert info["scale"] == pytest.approx(1.2) and info["predicted_ratio"] == pytest.approx(predicted)
    assert float(prepared.hfp.latency_scale) == pytest.approx(1.2)
    after = hfp_fx.complexity(prepared)
    assert after["latency"] / after["dense_latency"] == pytest.approx(1.2 * predicted)
    # a target the scale puts below the model's floor is still finalized (planned unscaled)
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency", lambda dense, small, *a: (1.0, goal, goal))
    with torch.no_grad():
        prepared.hfp.latency_scale.fill_(100.0)
    assert hfp_fx.finalize(prepared).meta["hfp"].latency.predicted_ms <= goal + 1e-9
    # a machine faster than the model (scale 0.8): finalize plans for the looser goal / 0.8
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency",
                        lambda dense, small, *a: (1.0, 0.8 * predicted, 0.8 * predicted))
    assert hfp_fx.recalibrate_latency(prepared)["scale"] == pytest.approx(0.8)
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency", lambda dense, small, *a: (1.0, goal, goal))
    report = hfp_fx.finalize(prepared).meta["hfp"].latency
    assert goal < report.predicted_ms / report.dense_ms <= min(1.0, goal / 0.8) + 1e-9
    with pytest.raises(ValueError, match="needs a latency model"):
        hfp_fx.recalibrate_latency(hfp_fx.prepare(model, x, {"macs": 0.5}))


def test_finalize_refuses_a_correction_that_cuts_into_the_trained_widths(monkeypatch):
    """Trained widths keep 100 channels; the clock says the model is 1.5x over the goal, and the
    corrected plan would keep 70: with ``max_correction_cut=0.1`` that correction is refused."""
    goal, dense_ms = 0.5, 10.0
    monkeypatch.setattr(hfp_fx.train.hfp, "measure_latency",
                        lambda dense, small, *a: (dense_ms, dense_ms * 1.5 * small.predicted, 1.5 * small.predicted))

    def plan_for(budget):
        ratio = min(1.0, budget.latency / dense_ms)
        kept = int(round(100 * ratio / goal))  # the trained plan (ratio = goal) keeps 100 of 200
        return Plan({}, Counts(1, 1), Counts(1, 1), budget, {"g0": (200, kept)}, ratio * dense_ms)

    def build(plan):
        return _Planned(plan.latency_ms / dense_ms), None

    resolved = ResolvedTarget(None, None, goal * dense_ms)
    first = plan_for(resolved)
    for cut, refused in ((0.1, True), (0.5, False)):
        options = LatencyOptions(corrections=3, max_correction_cut=cut)
        call = lambda: hfp_fx.train.hfp._meet_latency(torch.nn.Identity(), build(first)[0], first, resolved,  # noqa: E731
                                                dense_ms, plan_for, build, (), options, trained={"g0": 100})
        if refused:
            with pytest.warns(UserWarning, match="kept the trained widths"):
                small, plan, report, _ = call()
            assert report.corrections == 0 and plan.kept_per_group["g0"] == (200, 100)
            assert "would remove 33% of the channels" in report.refused
        else:
            small, plan, report, _ = call()
            assert report.corrections >= 1 and report.refused is None and plan.kept_per_group["g0"][1] < 100
