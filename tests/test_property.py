"""Property tests: random tiny networks must satisfy every guarantee of the core API.

The networks come from :mod:`netgen`: one or two inputs (``forward(x, y)``, the second image with
its own stem, merged by add or cat), a trunk of conv / residual / concat (with nested concats and
splits inside its branches, and an optional channel shuffle after it) / split / depthwise /
grouped conv / squeeze-excitation (conv or linear gates) / channel shuffle / channels-last linear
/ pooling blocks, and one or two heads (linear, flatten MLP, multi-layer linear, or the raw
feature map) returned as a tensor, a tuple or a dict.  For each drawn network, keep ratio and
seed we check:

1. ``shrink`` computes what ``mask`` computes (and, keeping everything, what the model computes);
2. the cost model's dense counts equal ``hfp_fx.count``, whose MACs equal an independent
   ``FlopCounterMode`` run on a real forward pass;
3. the cost model's prediction for the pruned model equals ``hfp_fx.count`` of the shrunk model;
4. the user's model is never modified;
5. the channel analysis agrees with ``torch.utils.flop_counter`` on every node;
6. ``hfp_fx.prune`` meets a drawn params and/or MACs target (measured with ``hfp_fx.count``),
   respects ``round_to``/``min_channels`` and leaves no slack a further block would fit in, or
   raises :class:`hfp_fx.InfeasibleTargetError` ("not reachable") exactly when the floor (every
   prunable group at its minimum) is above the target.

A second property checks only the grouping logic on plain conv chains with residual adds, against
a union-find over the spec: convs whose outputs meet in an add form exactly one prune group.

Each property is a plain ``check_*`` function plus its strategies (``PROPERTIES``), so
``benchmarks/fuzz.py`` can run the same checks for many more examples.
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import hfp_fx
from helpers import assert_close, assert_unchanged, outputs, random_keep, state_snapshot
from netgen import example_arg, kernels, make, net_specs, targets, widths


def flop_counter_macs(model: nn.Module, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def assert_same_structure(a, b):
    """Same container types, dict keys and tensor shapes (values are compared by assert_close)."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), (list(a), list(b))
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
    assert [t.shape for t in outputs(a)] == [t.shape for t in outputs(b)]


# -------------------------------------------------------------------------------------------
# properties 1-5: the core guarantees on random networks
# -------------------------------------------------------------------------------------------
def check_guarantees(spec, seed, ratio):
    model, inputs = make(spec, seed)
    arg = example_arg(inputs)
    snap = state_snapshot(model)
    with torch.no_grad():
        reference = model(*inputs)

    dg = hfp_fx.dependency_graph(model, arg)
    # 5. the MAC rules agree with torch.utils.flop_counter node by node
    assert not dg.facts.mac_mismatch, dg.facts.mac_mismatch

    # 2. dense counts: cost model == count == an independent FlopCounterMode run
    cm = hfp_fx.CostModel(dg)
    dense = hfp_fx.count(model, arg)
    assert cm.counts() == dense
    assert dense.params == sum(p.numel() for p in model.parameters())
    assert dense.macs == flop_counter_macs(model, inputs)

    # 1. shrink == mask (and shrink without pruning == the model)
    keep = random_keep(dg, seed, ratio)
    masked = hfp_fx.mask(dg, keep=keep).eval()
    small = hfp_fx.shrink(dg, keep=keep).eval()
    small.graph.lint()
    with torch.no_grad():
        out_masked, out_small = masked(*inputs), small(*inputs)
        assert_same_structure(reference, out_small)
        assert_same_structure(reference, out_masked)
        assert_close(out_masked, out_small)
        assert_close(reference, hfp_fx.shrink(dg, keep={}).eval()(*inputs))

    # 3. the cost model predicts the shrunk model exactly
    predicted = cm.counts(dg.alive(keep)[cm.unit_ids])
    assert predicted == hfp_fx.count(small, arg)
    assert predicted.macs == flop_counter_macs(small, inputs)
    if any(len(v) < dg.group(k).channels for k, v in keep.items()):
        assert predicted.params < dense.params

    # 4. nothing above touched the user's model
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert_close(reference, model(*inputs), rtol=0, atol=0)


GUARANTEES = dict(spec=net_specs(), seed=st.integers(0, 2 ** 16), ratio=st.floats(0.05, 0.95))


@settings(deadline=None)
@given(**GUARANTEES)
def test_random_network_guarantees(spec, seed, ratio):
    check_guarantees(spec, seed, ratio)


# -------------------------------------------------------------------------------------------
# property 6: one-shot prune meets a drawn target, or says why it cannot
# -------------------------------------------------------------------------------------------
def allowed_widths(n: int, min_channels: int, round_to: int):
    """``(smallest allowed kept count, block size)`` of an ``n``-channel group, as documented:
    kept counts are multiples of ``round_to`` (or the whole group) and at least ``min_channels``."""
    step = round_to if n >= round_to else n
    return min(n, -(-max(min_channels, 1) // step) * step), step


def check_prune_target(spec, seed, target, importance, round_to, min_channels):
    """Returns the outcome ("met", "infeasible" or "no prunable group") for the fuzz statistics."""
    model, inputs = make(spec, seed)
    arg = example_arg(inputs)
    snap = state_snapshot(model)
    dense = hfp_fx.count(model, arg)
    budget = {k: int(v * getattr(dense, k)) for k, v in target.items()}
    dg = hfp_fx.dependency_graph(model, arg)
    groups = dg.prunable_groups
    cm = hfp_fx.CostModel(dg)

    def exceeds(keep):
        c = cm.counts(dg.alive(keep)[cm.unit_ids])
        return [k for k, t in budget.items() if getattr(c, k) > t]

    # the floor: every prunable group at its smallest allowed width
    floor = {g.id: list(range(allowed_widths(g.channels, min_channels, round_to)[0])) for g in groups}
    try:
        small = hfp_fx.prune(model, arg, target, importance, min_channels=min_channels, round_to=round_to)
    except hfp_fx.InfeasibleTargetError as exc:
        assert "not reachable" in str(exc), str(exc)
        assert exceeds(floor), f"{exc} but the floor meets {budget}"
        assert_unchanged(model, snap)
        return "infeasible"
    except ValueError as exc:
        if not groups and "no prunable channel group" in str(exc):
            return "no prunable group"
        raise
    assert groups, "prune succeeded on a model without prunable groups"
    assert not exceeds(floor)

    # the target is met, measured independently, and the report says so
    achieved = hfp_fx.count(small, arg)
    for k, t in budget.items():
        assert getattr(achieved, k) <= t, f"{k}: {getattr(achieved, k)} > target {t} (dense {getattr(dense, k)})"
    report = small.meta["hfp"]
    assert report.achieved == achieved

    # widths respect round_to / min_channels, and no group could take one more block
    keep = {gid: list(v) for gid, v in report.keep.items()}
    for g in groups:
        kept = keep.get(g.id, list(range(g.channels)))
        n = len(kept)
        lo, step = allowed_widths(g.channels, min_channels, round_to)
        assert n == g.channels or (n >= lo and n % step == 0), (g.id, n, g.channels, lo, step)
        if n < g.channels:
            grow = min(g.channels, (n // step + 1) * step) - n
            extra = [i for i in range(g.channels) if i not in set(kept)][:grow]
            assert exceeds({**keep, g.id: sorted(kept + extra)}), f"{g.id}: {n} -> {n + grow} channels still fits"

    with torch.no_grad():
        assert_same_structure(model(*inputs), small.eval()(*inputs))
    assert_unchanged(model, snap)
    return "met"


PRUNE_TARGET = dict(spec=net_specs(), seed=st.integers(0, 2 ** 16), target=targets(),
                    importance=st.sampled_from(["l1", "l2", "uniform"]), round_to=st.sampled_from([1, 1, 2, 4]),
                    min_channels=st.sampled_from([1, 1, 2]))


@settings(deadline=None)
@given(**PRUNE_TARGET)
def test_prune_meets_target(spec, seed, target, importance, round_to, min_channels):
    check_prune_target(spec, seed, target, importance, round_to, min_channels)


# -------------------------------------------------------------------------------------------
# the grouping logic alone: conv chains with residual adds
# -------------------------------------------------------------------------------------------
class ChainConv(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ChainResidual(nn.Module):
    """``relu(body(x) + shortcut(x))``; body is one conv, or two with a ``mid``-wide hidden layer."""

    def __init__(self, cin, cout, k, mid: Optional[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid or cout, k, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(mid or cout)
        if mid:
            self.conv2 = nn.Conv2d(mid, cout, k, padding=k // 2, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
        else:
            self.conv2 = self.bn2 = None
        self.proj = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if self.conv2 is not None:
            y = self.bn2(self.conv2(F.relu(y)))
        return F.relu(y + (self.proj(x) if self.proj is not None else x))


class Chain(nn.Module):
    def __init__(self, blocks, n_out=5):
        super().__init__()
        c, mods = 3, []
        for kind, out, k, mid in blocks:
            mods.append(ChainConv(c, out, k) if kind == "conv" else ChainResidual(c, out, k, mid))
            c = out
        self.blocks = nn.ModuleList(mods)
        self.fc = nn.Linear(c, n_out)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@st.composite
def chain_specs(draw):
    """A stem conv, then plain convs and residual blocks: ``(kind, out, k, mid)``."""
    blocks = [("conv", draw(widths), draw(kernels), None)]
    c = blocks[0][1]
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)) == 0:
            b = ("conv", draw(widths), draw(kernels), None)
        else:
            b = ("residual", draw(st.one_of(st.just(c), st.just(c), widths)), draw(kernels),
                 draw(st.one_of(st.none(), widths)))
        blocks.append(b)
        c = b[1]
    return blocks


def expected_classes(blocks):
    """Union-find over conv outputs: an add unites the producers of its two operands.

    Returns ``{root: (width, [conv names whose output channels are the class])}``.
    """
    parent, width = {}, {}

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a

    def new(name, w):
        parent[name], width[name] = name, w
        return name

    current = None  # the conv whose output class the running tensor carries
    for i, (kind, out, _, mid) in enumerate(blocks):
        p = f"blocks.{i}"
        if kind == "conv":
            current = new(f"{p}.conv", out)
            continue
        if mid:
            new(f"{p}.conv1", mid)
            body = new(f"{p}.conv2", out)
        else:
            body = new(f"{p}.conv1", out)
        shortcut = new(f"{p}.proj", out) if current is None or width[find(current)] != out else current
        parent[find(body)] = find(shortcut)
        current = body
    classes = {}
    for name in parent:
        classes.setdefault(find(name), (width[name], []))[1].append(name)
    return classes


def check_chain_grouping(blocks, seed):
    torch.manual_seed(seed)
    model = Chain(blocks).eval()
    x = torch.randn(1, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x)
    classes = expected_classes(blocks)

    def group_of_output(conv):
        """The one group that owns every output channel of ``conv`` (weight dim 0)."""
        n = model.get_submodule(conv).out_channels
        owners = [g for g in dg.groups for m in g.members
                  if m.target == f"{conv}.weight" and m.dim == 0]
        assert len(owners) == 1, f"{conv}: output channels split over {[g.id for g in owners]}"
        (g,) = owners
        (m,) = [m for m in g.members if m.target == f"{conv}.weight" and m.dim == 0]
        assert m.offsets == tuple(range(n))
        return g

    seen = {}
    for root, (w, convs) in classes.items():
        groups = {group_of_output(c).id for c in convs}
        # every conv feeding the same chain of adds lands in one group ...
        assert len(groups) == 1, f"{convs} should share one group, got {groups}"
        g = dg.group(groups.pop())
        # ... which is exactly as wide as that chain, prunable, and belongs to no other chain
        assert g.prunable, g.reason
        assert g.channels == w
        assert g.id not in seen, f"{convs} and {seen.get(g.id)} share group {g.id}"
        seen[g.id] = convs
        # the batch norms after those convs are sliced with them
        for c in convs:
            bn = c.replace("conv", "bn") if not c.endswith("proj") else None
            if bn is not None:
                assert any(m.target == f"{bn}.weight" and m.dim == 0 and m.offsets == tuple(range(w))
                           for m in g.members), f"{bn} not in {g.id}"
    # nothing else is prunable: the classifier's outputs are the model output
    assert {g.id for g in dg.prunable_groups} == set(seen)
    assert [g.channels for g in dg.groups if not g.prunable] == [model.fc.out_features]

    # the shrunk model prunes each chain consistently
    keep = random_keep(dg, seed, 0.5)
    small = hfp_fx.shrink(dg, keep=keep)
    for gid, convs in seen.items():
        for c in convs:
            assert small.get_submodule(c).out_channels == len(keep[gid])


CHAIN = dict(blocks=chain_specs(), seed=st.integers(0, 2 ** 16))


@settings(deadline=None)
@given(**CHAIN)
def test_residual_chain_grouping(blocks, seed):
    check_chain_grouping(blocks, seed)


# -------------------------------------------------------------------------------------------
# regression: channel shuffles whose groups dim is the pruned one (sizes computed at run time)
# -------------------------------------------------------------------------------------------
class RuntimeViewShuffle(nn.Module):
    """torchvision's ShuffleNet shuffle, ``view(b, g, c // g, h, w)`` with ``c`` from ``x.size()``,
    where the analysis makes the ``g`` dim the channel axis: more groups than channels per group
    (``mult=1``: 12 channels in 4 groups), or a depthwise multiplier (``mult=2``: ids ``a a b b``
    in 2 groups, only the ``g`` dim varies)."""

    def __init__(self, mult: int):
        super().__init__()
        mid = 12 if mult == 1 else 2
        self.groups = 4 if mult == 1 else 2
        self.a = nn.Conv2d(3, mid, 1)
        self.dw = nn.Conv2d(mid, mid * mult, 3, padding=1, groups=mid)
        self.b = nn.Conv2d(mid * mult, 5, 1)

    def forward(self, x):
        x = self.dw(self.a(x))
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.b(x)


@pytest.mark.parametrize("mult", [1, 2])
def test_runtime_view_shuffle_on_the_groups_dim(mult):
    model, x = RuntimeViewShuffle(mult).eval(), torch.randn(2, 3, 8, 8)
    dg = hfp_fx.dependency_graph(model, x)
    keep = {g.id: list(range(g.channels // 2)) for g in dg.prunable_groups}
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=keep)(x), hfp_fx.shrink(dg, keep=keep)(x))


# -------------------------------------------------------------------------------------------
# the shape pass computes ConvNd/Linear outputs and MACs without running them: same as running
# -------------------------------------------------------------------------------------------
@st.composite
def plain_layers(draw):
    """A Conv1d/2d/3d or Linear with drawn hyper-parameters, and an input shape it accepts."""
    if draw(st.booleans()):
        layer = nn.Linear(draw(st.integers(1, 9)), draw(st.integers(1, 9)), bias=draw(st.booleans()))
        lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        return layer, (*lead, layer.in_features)
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding = draw(st.one_of(st.just("same"), st.just("valid"),
                             st.tuples(*[st.integers(0, 2)] * nd)))
    stride = (1,) * nd if padding == "same" else tuple(draw(st.integers(1, 3)) for _ in range(nd))
    layer = getattr(nn, f"Conv{nd}d")(in_ch, out_ch, kernel, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups, bias=draw(st.booleans()))
    spatial = tuple(draw(st.integers(1, 9)) for _ in range(nd))
    return layer, (draw(st.integers(1, 3)), in_ch, *spatial)


def _outcomes(check, max_examples: int, **strategies) -> Counter:
    """Run ``check`` on ``max_examples`` hypothesis draws; count the outcome names it returns.

    A property that may step aside ("run the op", "keys differ") must show that enough draws
    reached the real comparison: the caller asserts a floor on that outcome.
    """
    seen = Counter()

    @settings(deadline=None, max_examples=max_examples)
    @given(**strategies)
    def run(**case):
        seen[check(**case)] += 1

    run()
    return seen


def test_layer_shortcut_equals_running_the_layer():
    """Conv/linear shapes and MACs built from the formula equal running the layer (most draws
    must reach the comparison, not only the "too small, run it" branch)."""
    seen = _outcomes(_check_layer_shortcut, 150, case=plain_layers())
    assert seen["compared"] >= 60, seen


def _check_layer_shortcut(case) -> str:
    from hfp_fx.capture.meta_shortcuts import meta_result
    from hfp_fx.capture.copies import meta_copy

    layer, shape = case
    twin = meta_copy(layer)
    gm = torch.fx.symbolic_trace(nn.Sequential(twin))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    interp = torch.fx.Interpreter(gm)
    x = torch.empty(shape, device="meta")
    interp.env[node.args[0]] = x
    try:
        with FlopCounterMode(display=False) as counter:
            expected = twin(x)
    except RuntimeError:  # the input is too small for this kernel: the layer must be run
        assert meta_result(node, twin, *interp.fetch_args_kwargs_from_env(node)) is None
        return "refused"
    out, macs = meta_result(node, twin, *interp.fetch_args_kwargs_from_env(node))
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert macs == counter.get_total_flops() // 2
    return "compared"


_SHAPE_KEEPING = [("call_module", nn.ReLU(), {}), ("call_module", nn.ReLU(inplace=True), {}),
                  ("call_module", nn.GELU(), {}), ("call_module", nn.SiLU(inplace=True), {}),
                  ("call_module", nn.Identity(), {}), ("call_module", nn.Dropout(), {}),
                  ("call_function", F.relu, {}), ("call_function", torch.sigmoid, {}),
                  ("call_function", F.relu, {"inplace": True}), ("call_function", F.gelu, {})]
_BINARY = [("call_function", f) for f in (operator.add, operator.mul, operator.sub, operator.truediv, torch.add,
                                          torch.mul)] + [("call_method", m) for m in ("add", "mul", "__radd__")]


@st.composite
def meta_ops(draw):
    """``(op kind, target, args, kwargs)``: an op the shape pass may build without running it."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float64]))
    grad = draw(st.booleans())
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))

    layout = draw(st.sampled_from(["contiguous", "permuted", "strided"]))

    def tensor(s, dt=dtype):
        t = torch.empty(s, dtype=dt, device="meta")
        if layout == "permuted" and len(s) >= 2:  # dense, not contiguous (channels-last is one such)
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        elif layout == "strided" and draw(st.booleans()):  # overlapping-free but not dense
            t = torch.empty((*s[:-1], 2 * s[-1]), dtype=dt, device="meta")[..., ::2]
        if grad:
            t = t.requires_grad_() * 1  # a non-leaf, as inside a real network
        return t

    kind = draw(st.sampled_from(["same", "norm", "binary", "cat", "pool"]))
    if kind == "norm":
        x = tensor((*shape, 3) if len(shape) < 2 else shape)
        norm = draw(st.sampled_from(["layer", "batch", "group"]))
        if norm == "layer":
            module = nn.LayerNorm(x.shape[-1], device="meta", dtype=dtype)
        elif norm == "group" or x.dim() > 5:
            module = nn.GroupNorm(1, x.shape[1], device="meta", dtype=dtype)
        else:
            bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()]
            module = bn(x.shape[1], device="meta", dtype=dtype).eval()
        return "call_module", module, (x,), {}
    if kind == "same":
        op_kind, target, kwargs = draw(st.sampled_from(_SHAPE_KEEPING))
        return op_kind, target, (tensor(shape),), kwargs
    if kind == "binary":
        op_kind, target = draw(st.sampled_from(_BINARY))
        start = draw(st.integers(0, len(shape) - 1))
        other_shape = tuple(draw(st.sampled_from([1, s])) for s in shape)[start:]
        other = draw(st.sampled_from(["broadcast", "float32", "float", "int"]))
        other = {"broadcast": lambda: tensor(other_shape), "float32": lambda: tensor(shape, torch.float32),
                 "float": lambda: draw(st.floats(-2, 2, allow_nan=False)), "int": lambda: draw(st.integers(-3, 3))}[other]()
        x = tensor(shape)
        return op_kind, target, (x, other) if op_kind == "call_method" or draw(st.booleans()) else (other, x), {}
    if kind == "cat":
        dim = draw(st.integers(-len(shape), len(shape) - 1))
        parts = []
        for _ in range(draw(st.integers(1, 3))):
            s = list(shape)
            s[dim] = draw(st.integers(1, 3))
            parts.append(tensor(tuple(s)))
        return "call_function", torch.cat, (tuple(parts), dim), {}
    size = draw(st.one_of(st.integers(1, 3), st.tuples(st.one_of(st.none(), st.integers(1, 3)),
                                                       st.one_of(st.none(), st.integers(1, 3)))))
    x = tensor((*shape[:2], 5, 6))
    if draw(st.booleans()):
        return "call_module", nn.AdaptiveAvgPool2d(size), (x,), {}
    return "call_function", F.adaptive_avg_pool2d, (x, size), {}


def test_meta_shortcuts_equal_running_the_op():
    """Shape, dtype, contiguity, strides of non-unit dims and MACs match a real run, for every
    kind of op with a shortcut (and enough draws reach the comparison, not only "run it")."""
    seen = _outcomes(_check_meta_shortcut, 300, case=meta_ops())
    assert seen["compared"] >= 100, seen
    assert seen["declined"] >= 1, seen  # the strided layouts: the shortcut must know to step aside


def _check_meta_shortcut(case) -> str:
    from hfp_fx.capture.meta_shortcuts import meta_result

    op_kind, target, args, kwargs = case
    graph, root, env = torch.fx.Graph(), nn.Module(), {}

    def placeholder(v):
        if not isinstance(v, torch.Tensor):
            return v
        node = graph.placeholder(f"x{len(env)}")
        env[node] = v
        return node

    graph_args = torch.fx.node.map_aggregate(args, placeholder)
    if op_kind == "call_module":
        root.op = target
        node = graph.call_module("op", graph_args, kwargs)
    else:
        node = getattr(graph, op_kind)(target, graph_args, kwargs)
    graph.output(node)
    interp = torch.fx.Interpreter(torch.fx.GraphModule(root, graph))
    interp.env.update(env)
    module = root.op if op_kind == "call_module" else None
    try:
        with FlopCounterMode(display=False) as counter:
            expected = interp.run_node(node)
    except (RuntimeError, ValueError):  # the op refuses these inputs: no shortcut may accept them either
        assert meta_result(node, module, *interp.fetch_args_kwargs_from_env(node)) is None
        return "refused"
    found = meta_result(node, module, *interp.fetch_args_kwargs_from_env(node))
    if found is None:
        return "declined"  # running the op is always allowed
    out, macs = found
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert out.is_contiguous() == expected.is_contiguous()
    assert [st_ for st_, n in zip(out.stride(), out.shape) if n > 1] == \
        [st_ for st_, n in zip(expected.stride(), expected.shape) if n > 1]
    assert macs == counter.get_total_flops() // 2
    return "compared"


@st.composite
def repeated_calls(draw):
    """``(op kind, target, args, kwargs)`` from a small space, so that two draws often coincide."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    grad = draw(st.booleans())

    def tensor(*shape):
        t = torch.empty(shape, dtype=dtype, device="meta")
        if draw(st.booleans()) and len(shape) >= 2:
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t.requires_grad_() * 1 if grad else t

    kind = draw(st.sampled_from(["mha", "linear", "matmul", "reshape", "conv", "sdpa", "pointwise"]))
    if kind == "pointwise":  # keeps the input's strides
        return "call_function", torch.exp, (tensor(2, 3),), {}
    if kind == "mha":
        embed, heads, batch_first = draw(st.sampled_from([4, 8])), draw(st.sampled_from([1, 2])), draw(st.booleans())
        mha = nn.MultiheadAttention(embed, heads, bias=draw(st.booleans()), batch_first=batch_first,
                                    device="meta", dtype=dtype)
        x = tensor(draw(st.sampled_from([1, 3])), 2, embed)
        kwargs = {"need_weights": draw(st.booleans()), "average_attn_weights": draw(st.booleans())}
        return "call_module", mha, (x, x, x), kwargs
    if kind == "linear":
        x = tensor(draw(st.sampled_from([1, 2])), draw(st.sampled_from([3, 4])))
        return "call_function", F.linear, (x, tensor(draw(st.sampled_from([2, 5])), x.shape[-1])), {}
    if kind == "matmul":
        a = tensor(draw(st.sampled_from([1, 2])), 3, draw(st.sampled_from([2, 4])))
        return "call_function", torch.matmul, (a, tensor(a.shape[-1], draw(st.sampled_from([1, 3])))), {}
    if kind == "reshape":
        x = tensor(2, 3, 4)
        return "call_method", "reshape", (x, draw(st.sampled_from([(6, 4), (4, 6), (-1,), (2, 12)]))), {}
    if kind == "conv":
        conv = nn.Conv2d(4, draw(st.sampled_from([2, 4])), draw(st.sampled_from([1, 3])),
                         stride=draw(st.sampled_from([1, 2])), groups=draw(st.sampled_from([1, 2])),
                         device="meta", dtype=dtype)
        x = tensor(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
        return "call_module", conv.train(draw(st.booleans())), (x,), {}
    q = tensor(1, 2, draw(st.sampled_from([3, 4])), 4)
    return "call_function", F.scaled_dot_product_attention, (q, q, tensor(1, 2, q.shape[2], 2)), \
        {"is_causal": draw(st.booleans())}


def _run_counting(call):
    op_kind, target, args, kwargs = call
    with FlopCounterMode(display=False) as counter:
        if op_kind == "call_module":
            out = target(*args, **kwargs)
        elif op_kind == "call_method":
            out = getattr(args[0], target)(*args[1:], **kwargs)
        else:
            out = target(*args, **kwargs)
    return out, counter.get_total_flops() // 2


def _layouts(out):
    return torch.fx.node.map_aggregate(
        out, lambda t: (tuple(t.shape), t.stride(), t.dtype) if isinstance(t, torch.Tensor) else t)


def test_meta_memo_reuses_only_equal_calls():
    """Two calls with the same key give the same output layouts and MACs, and the memo hands
    back exactly those for the second call (enough draw pairs must share a key to show it)."""
    seen = _outcomes(_check_memo, 300, first=repeated_calls(), second=repeated_calls())
    assert seen["equal keys"] >= 20, seen


def _check_memo(first, second) -> str:
    from hfp_fx.capture.meta_memo import MetaMemo, call_key

    key_first = call_key(first[0], first[1], first[2], first[3])
    key_second = call_key(second[0], second[1], second[2], second[3])
    assert key_first is not None
    if key_first != key_second:
        return "different keys"
    out_first, macs_first = _run_counting(first)
    out_second, macs_second = _run_counting(second)
    assert _layouts(out_first) == _layouts(out_second) and macs_first == macs_second
    memo = MetaMemo()
    memo.put(key_first, out_first, macs_first)
    reused, macs = memo.get(key_second)
    assert _layouts(reused) == _layouts(out_second) and macs == macs_second
    assert type(reused) is type(out_second)
    return "equal keys"


#: name -> (check function, its strategies as keyword arguments); used by benchmarks/fuzz.py
PROPERTIES = {
    "random_network_guarantees": (check_guarantees, GUARANTEES),
    "prune_meets_target": (check_prune_target, PRUNE_TARGET),
    "residual_chain_grouping": (check_chain_grouping, CHAIN),
}


class Router(nn.Module):
    """A mixture-of-experts router in plain torch: scores, a softmax over the experts, top-k,
    per-expert counts, and an output that mixes the kept experts' probabilities."""

    def __init__(self, experts: int, k: int):
        super().__init__()
        self.k, self.experts = k, experts
        self.score, self.mix, self.per_count = nn.Linear(6, experts), nn.Linear(experts, 3), nn.Linear(experts, 3)

    def forward(self, x):
        p = torch.softmax(self.score(x), -1)
        top = torch.topk(p, self.k, -1)
        counts = torch.histc(top.indices.reshape(-1).float(), bins=self.experts, min=0, max=self.experts - 1)
        return self.mix(p) + self.per_count(counts) + top.values.sum(-1, keepdim=True)


@settings(deadline=None)
@given(experts=st.integers(2, 8), k=st.integers(1, 3), data=st.data())
def test_removed_experts_shrink_equals_mask(experts, k, data):
    """Any keep of at least top-k experts: the pruned router equals the reference with the removed
    experts' logits at -inf; fewer than top-k are refused."""
    k = min(k, experts)
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    model, x = Router(experts, k).eval(), torch.randn(5, 6)
    dg = hfp_fx.dependency_graph(model, x, capture="fx")
    (group,) = [g for g in dg.prunable_groups if any(m.target == "score.weight" and m.dim == 0 for m in g.members)]
    assert group.floor == k
    keep = sorted(data.draw(st.sets(st.integers(0, experts - 1), min_size=k, max_size=experts)))
    with torch.no_grad():
        assert_close(hfp_fx.shrink(dg, keep={group.id: keep})(x), hfp_fx.mask(dg, keep={group.id: keep})(x))
    if k > 1:
        with pytest.raises(ValueError, match=f"keep at least {k}"):
            hfp_fx.shrink(dg, keep={group.id: keep[: k - 1]})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 3), min_size=0, max_size=40))
def test_member_runs_list_exactly_the_positions_of_their_group(labels):
    """``Member.runs`` (ranges, built from runs of equal group labels along an axis) hold exactly
    the positions labelled with their group, ascending, with no two ranges touching."""
    from hfp_fx.analysis.graph import Member, _runs_by_group

    runs = _runs_by_group(torch.tensor(labels, dtype=torch.long))
    assert set(runs) == {g for g in labels if g >= 0}
    for g, rs in runs.items():
        member = Member("w", 0, rs)
        assert member.offsets == tuple(i for i, label in enumerate(labels) if label == g)
        assert all(a < b for a, b in rs) and all(b1 < a2 for (_, b1), (a2, _) in zip(rs, rs[1:]))
        assert str(member) == "w[dim 0: " + ",".join(f"{a}:{b}" for a, b in rs) + "]"
