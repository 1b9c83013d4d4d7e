"""Property tests: random tiny CNN/MLP networks must satisfy every guarantee of the core API.

A network is a list of block specs (conv, residual, concat, split/chunk, depthwise, grouped conv,
squeeze-excitation, channel shuffle, pooling) plus a head; :class:`Net` builds the modules from
the specs and its ``forward`` just runs them in order, so ``torch.fx`` traces through every
block's own ``forward``.  For each drawn network, keep ratio and seed we check:

1. ``shrink`` computes what ``mask`` computes (and, keeping everything, what the model computes);
2. the cost model's dense counts equal ``hfp_fx.count``, whose MACs equal an independent
   ``FlopCounterMode`` run on a real forward pass;
3. the cost model's prediction for the pruned model equals ``hfp_fx.count`` of the shrunk model;
4. the user's model is never modified;
5. the channel analysis agrees with ``torch.utils.flop_counter`` on every node.

A second property checks only the grouping logic on plain conv chains with residual adds, against
a union-find over the spec: convs whose outputs meet in an add form exactly one prune group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import hfp_fx
from helpers import assert_close, assert_unchanged, random_keep, state_snapshot

MAX_W = 24
ACTS = ("relu", "silu", "gelu", "hardswish")
_ACT_MODULES = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish}
_ACT_FUNCTIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "hardswish": F.hardswish}


# -------------------------------------------------------------------------------------------
# building blocks
# -------------------------------------------------------------------------------------------
class Act(nn.Module):
    """An activation, either as its ``nn`` module or as the functional call."""

    def __init__(self, name: str, functional: bool):
        super().__init__()
        self.fn = _ACT_FUNCTIONS[name] if functional else None
        self.mod = None if functional else _ACT_MODULES[name]()

    def forward(self, x):
        return self.fn(x) if self.mod is None else self.mod(x)


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, k, act, functional=False, groups=1, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        self.act = Act(act, functional) if act else None

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.act(x) if self.act is not None else x


class Residual(nn.Module):
    def __init__(self, cin, cout, k, act, mid, use_torch_add):
        super().__init__()
        if mid:
            self.body = nn.Sequential(ConvBNAct(cin, mid, k, act), ConvBNAct(mid, cout, k, None))
        else:
            self.body = ConvBNAct(cin, cout, k, None)
        self.proj = ConvBNAct(cin, cout, 1, None) if cin != cout else None
        self.act = Act(act, functional=True)
        self.use_torch_add = use_torch_add

    def forward(self, x):
        shortcut = self.proj(x) if self.proj is not None else x
        y = self.body(x)
        return self.act(torch.add(y, shortcut) if self.use_torch_add else y + shortcut)


class Concat(nn.Module):
    """Branches (``None`` = the input itself) concatenated along channels."""

    def __init__(self, cin, widths, k, act):
        super().__init__()
        self.branches = nn.ModuleList([nn.Identity() if w == 0 else ConvBNAct(cin, w, k, act) for w in widths])

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class SplitBranches(nn.Module):
    """``split``/``chunk`` along channels, a conv (or nothing) per piece, then ``cat``."""

    def __init__(self, sizes, widths, how, k, act):
        super().__init__()
        self.sizes, self.how = list(sizes), how
        self.branches = nn.ModuleList([nn.Identity() if w == 0 else ConvBNAct(s, w, k, act)
                                       for s, w in zip(sizes, widths)])

    def forward(self, x):
        if self.how == "torch.split":
            pieces = torch.split(x, self.sizes, dim=1)
        elif self.how == "Tensor.split":
            pieces = x.split(self.sizes, 1)
        elif self.how == "torch.chunk":
            pieces = torch.chunk(x, len(self.sizes), dim=1)
        else:
            pieces = x.chunk(len(self.sizes), 1)
        return torch.cat([b(pieces[i]) for i, b in enumerate(self.branches)], 1)


class SqueezeExcite(nn.Module):
    def __init__(self, c, hidden, pool_module):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if pool_module else None
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        s = self.pool(x) if self.pool is not None else F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class Shuffle(nn.Module):
    def __init__(self, c, groups, minus_one):
        super().__init__()
        self.c, self.groups, self.minus_one = c, groups, minus_one

    def forward(self, x):
        b, h, w = x.size(0), x.size(2), x.size(3)
        x = x.view(b, self.groups, self.c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1 if self.minus_one else self.c, h, w)


class Pool(nn.Module):
    def __init__(self, kind, halve, functional):
        super().__init__()
        self.kind, self.halve, self.functional = kind, halve, functional
        k, s, p = (2, 2, 0) if halve else (3, 1, 1)
        self.args = (k, s, p)
        self.mod = None if functional else (nn.MaxPool2d if kind == "max" else nn.AvgPool2d)(k, s, p)

    def forward(self, x):
        if self.mod is not None:
            return self.mod(x)
        return (F.max_pool2d if self.kind == "max" else F.avg_pool2d)(x, *self.args)


class GapHead(nn.Module):
    def __init__(self, c, n_out, flatten):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten() if flatten == "module" else None
        self.how = flatten
        self.fc = nn.Linear(c, n_out)

    def forward(self, x):
        x = self.pool(x)
        if self.flatten is not None:
            x = self.flatten(x)
        elif self.how == "method":
            x = x.flatten(1)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


class FlatHead(nn.Module):
    def __init__(self, features, hidden, n_out):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


# -------------------------------------------------------------------------------------------
# specs: plain data, so hypothesis prints a readable counterexample
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    kind: str
    out: int  #: channels after the block
    args: Tuple  #: kind-specific, see ``build_block``


@dataclass(frozen=True)
class NetSpec:
    batch: int
    blocks: Tuple[Block, ...]
    head: Tuple  #: ("gap", n_out, flatten_how) or ("flat", hidden, n_out)


def build_block(b: Block, cin: int, size: int) -> nn.Module:
    a = b.args
    if b.kind == "conv":  # (k, act, functional, bias)
        return ConvBNAct(cin, b.out, a[0], a[1], functional=a[2], bias=a[3])
    if b.kind == "residual":  # (k, act, mid, use_torch_add)
        return Residual(cin, b.out, a[0], a[1], a[2], a[3])
    if b.kind == "concat":  # (widths, k, act)
        return Concat(cin, a[0], a[1], a[2])
    if b.kind == "split":  # (sizes, widths, how, k, act)
        return SplitBranches(a[0], a[1], a[2], a[3], a[4])
    if b.kind == "depthwise":  # (mult, act)
        return ConvBNAct(cin, cin * a[0], 3, a[1], groups=cin)
    if b.kind == "grouped":  # (groups, k, act)
        return ConvBNAct(cin, b.out, a[1], a[2], groups=a[0])
    if b.kind == "se":  # (hidden, pool_module)
        return SqueezeExcite(cin, a[0], a[1])
    if b.kind == "shuffle":  # (groups, minus_one)
        return Shuffle(cin, a[0], a[1])
    if b.kind == "pool":  # (kind, halve, functional)
        return Pool(a[0], a[1], a[2])
    raise AssertionError(b.kind)


class Net(nn.Module):
    """The network a :class:`NetSpec` describes; ``forward`` runs the blocks in order."""

    def __init__(self, spec: NetSpec, in_ch: int = 3, size: int = 8):
        super().__init__()
        c, s = in_ch, size
        blocks = []
        for b in spec.blocks:
            blocks.append(build_block(b, c, s))
            c = b.out
            if b.kind == "pool" and b.args[1]:
                s //= 2
        self.blocks = nn.ModuleList(blocks)
        if spec.head[0] == "gap":
            self.head = GapHead(c, spec.head[1], spec.head[2])
        else:
            self.head = FlatHead(c * s * s, spec.head[1], spec.head[2])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial batch-norm affine parameters and statistics, so eval mode is not an identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def make(spec: NetSpec, seed: int) -> Tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = Net(spec)
    randomize_norms(model)
    return model.eval(), torch.randn(spec.batch, 3, 8, 8)


# -------------------------------------------------------------------------------------------
# strategies
# -------------------------------------------------------------------------------------------
widths = st.integers(2, MAX_W)
acts = st.sampled_from(ACTS)
kernels = st.sampled_from([1, 3])


@st.composite
def compositions(draw, total: int, parts: int):
    """``parts`` positive integers summing to ``total``."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    edges = [0] + cuts + [total]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


@st.composite
def blocks_for(draw, c: int, size: int) -> Block:
    kinds = ["conv", "residual", "concat", "depthwise", "se", "pool"]
    if c >= 2:
        kinds += ["split", "shuffle"]
    if c % 2 == 0:
        kinds.append("grouped")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return Block("conv", draw(widths), (draw(kernels), draw(acts), draw(st.booleans()), draw(st.booleans())))
    if kind == "residual":
        out = draw(st.one_of(st.just(c), widths))
        mid = draw(st.one_of(st.none(), widths))
        return Block("residual", out, (draw(kernels), draw(acts), mid, draw(st.booleans())))
    if kind == "concat":
        n = draw(st.integers(2, 3))
        branch = st.integers(2, 8) if c > 12 else st.one_of(st.just(0), st.integers(2, 8))
        ws = tuple(draw(st.lists(branch, min_size=n, max_size=n)))
        out = sum(c if w == 0 else w for w in ws)
        return Block("concat", out, (ws, draw(kernels), draw(acts)))
    if kind == "split":
        how = draw(st.sampled_from(["torch.split", "Tensor.split", "torch.chunk", "Tensor.chunk"]))
        if how.endswith("chunk"):
            n = draw(st.sampled_from([p for p in (2, 3) if c % p == 0] or [1]))
            sizes = (c // n,) * n
        else:
            sizes = draw(compositions(c, draw(st.integers(2, min(3, c)))))
        ws = tuple(draw(st.lists(st.one_of(st.just(0), st.integers(2, 8)), min_size=len(sizes), max_size=len(sizes))))
        out = sum(s if w == 0 else w for s, w in zip(sizes, ws))
        return Block("split", out, (sizes, ws, how, draw(kernels), draw(acts)))
    if kind == "depthwise":
        mult = draw(st.sampled_from([1, 2])) if c <= 12 else 1
        return Block("depthwise", c * mult, (mult, draw(acts)))
    if kind == "grouped":
        g = draw(st.sampled_from([g for g in (2, 4) if c % g == 0]))
        out = g * draw(st.integers(1, MAX_W // g))
        return Block("grouped", out, (g, draw(kernels), draw(acts)))
    if kind == "se":
        return Block("se", c, (draw(st.integers(2, 8)), draw(st.booleans())))
    if kind == "shuffle":
        g = draw(st.sampled_from([g for g in (2, 3, 4) if c % g == 0] or [1]))
        return Block("shuffle", c, (g, draw(st.booleans())))
    halve = size >= 2 and draw(st.booleans())
    return Block("pool", c, (draw(st.sampled_from(["max", "avg"])), halve, draw(st.booleans())))


@st.composite
def net_specs(draw) -> NetSpec:
    c, size, blocks = 3, 8, []
    for _ in range(draw(st.integers(0, 6))):
        b = draw(blocks_for(c, size))
        blocks.append(b)
        c = b.out
        if b.kind == "pool" and b.args[1]:
            size //= 2
    if draw(st.booleans()):
        head = ("gap", draw(st.integers(2, 10)), draw(st.sampled_from(["module", "method", "function"])))
    else:
        head = ("flat", draw(widths), draw(st.integers(2, 10)))
    return NetSpec(draw(st.sampled_from([1, 2])), tuple(blocks), head)


# -------------------------------------------------------------------------------------------
# property 1-5: the core guarantees on random networks
# -------------------------------------------------------------------------------------------
def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@settings(deadline=None)
@given(spec=net_specs(), seed=st.integers(0, 2 ** 16), ratio=st.floats(0.05, 0.95))
def test_random_network_guarantees(spec, seed, ratio):
    model, x = make(spec, seed)
    snap = state_snapshot(model)
    with torch.no_grad():
        reference = model(x)

    dg = hfp_fx.dependency_graph(model, x)
    # 5. the MAC rules agree with torch.utils.flop_counter node by node
    assert not dg.facts.mac_mismatch, dg.facts.mac_mismatch

    # 2. dense counts: cost model == count == an independent FlopCounterMode run
    cm = hfp_fx.CostModel(dg)
    dense = hfp_fx.count(model, x)
    assert cm.counts() == dense
    assert dense.params == sum(p.numel() for p in model.parameters())
    assert dense.macs == flop_counter_macs(model, x)

    # 1. shrink == mask (and shrink without pruning == the model)
    keep = random_keep(dg, seed, ratio)
    masked = hfp_fx.mask(dg, keep=keep).eval()
    small = hfp_fx.shrink(dg, keep=keep).eval()
    small.graph.lint()
    with torch.no_grad():
        assert_close(masked(x), small(x))
        assert_close(reference, hfp_fx.shrink(dg, keep={}).eval()(x))

    # 3. the cost model predicts the shrunk model exactly
    predicted = cm.counts(dg.alive(keep)[cm.unit_ids])
    assert predicted == hfp_fx.count(small, x)
    assert predicted.macs == flop_counter_macs(small, x)
    if any(len(v) < dg.group(k).channels for k, v in keep.items()):
        assert predicted.params < dense.params

    # 4. nothing above touched the user's model
    assert_unchanged(model, snap)
    with torch.no_grad():
        assert_close(reference, model(x), rtol=0, atol=0)


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


@settings(deadline=None)
@given(blocks=chain_specs(), seed=st.integers(0, 2 ** 16))
def test_residual_chain_grouping(blocks, seed):
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
