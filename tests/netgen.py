"""Random tiny networks for the property tests (``tests/test_property.py``) and the long fuzz run
(``benchmarks/fuzz.py``).

A network is plain data (frozen dataclasses of tuples, so hypothesis prints a readable
counterexample) that :class:`Net` turns into modules whose ``forward`` methods ``torch.fx`` traces:

* one or two **inputs** (``forward(x)`` or ``forward(x, y)``): each image gets its own stem (a
  block sequence); the second stem is merged into the first by ``+`` / ``torch.add`` (its last
  width forced to the first stem's) or by ``torch.cat``;
* a **trunk** of blocks: conv, residual, concat (whose branches are block sequences, so they can
  hold further concats and splits, and whose output may be channel-shuffled), split/chunk,
  depthwise, grouped conv, squeeze-excitation (conv or linear gates), channel shuffle,
  channels-last linear, pooling, a channel range (``x[:, a:b]``, negative bounds, ``...``,
  ``narrow``) feeding a conv;
* one or two **heads** (global-pool linear, flatten MLP, multi-layer linear, or the raw feature
  map), the second tapping the trunk at a drawn depth; ``forward`` returns a tensor, a tuple or a
  dict.

Spatial size is 8x8; only trunk-level pools halve it (never inside a branch or a stem).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

MAX_W = 24  #: widest plain conv drawn
MAX_DEPTH = 2  #: nesting depth of concat/split branches
SIZE = 8  #: input height and width
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


class Seq(nn.Module):
    """Blocks run in order; no blocks is the identity."""

    def __init__(self, blocks, cin):
        super().__init__()
        mods, c = [], cin
        for b in blocks:
            mods.append(build_block(b, c))
            c = b.out
        self.blocks = nn.ModuleList(mods)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def shuffle_channels(x, c: int, groups: int, how: str):
    """Channel shuffle of ``x`` (``c`` channels when traced): ``F.channel_shuffle`` ("function"), or
    ``view -> transpose -> view`` with sizes from ``x.size()`` ("runtime", torchvision's
    ShuffleNet) or literal ("static"), the last view's channel size given or ``-1`` ("...-1")."""
    if how == "function":
        return F.channel_shuffle(x, groups)
    if how.startswith("runtime"):
        b, c, h, w = x.size()
    else:
        b, h, w = x.size(0), x.size(2), x.size(3)
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1 if how.endswith("-1") else c, h, w)


class Concat(nn.Module):
    """Branches (block sequences; empty = the input itself) concatenated along channels, then an
    optional channel shuffle (ShuffleNet)."""

    def __init__(self, cin, branches, shuffle, out):
        super().__init__()
        self.branches = nn.ModuleList([Seq(b, cin) for b in branches])
        self.c = out
        self.groups, self.how = shuffle if shuffle else (0, None)
        self.shuffle = nn.ChannelShuffle(self.groups) if self.how == "module" else None

    def forward(self, x):
        y = torch.cat([b(x) for b in self.branches], dim=1)
        if self.shuffle is not None:
            return self.shuffle(y)
        return shuffle_channels(y, self.c, self.groups, self.how) if self.groups else y


class SplitBranches(nn.Module):
    """``split``/``chunk`` along channels, a block sequence per piece, then ``cat``."""

    def __init__(self, sizes, how, branches):
        super().__init__()
        self.sizes, self.how = list(sizes), how
        self.branches = nn.ModuleList([Seq(b, s) for s, b in zip(sizes, branches)])

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
    """Conv gate: ``x * sigmoid(fc2(relu(fc1(pool(x)))))``."""

    def __init__(self, c, hidden, pool_module):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if pool_module else None
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        s = self.pool(x) if self.pool is not None else F.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class LinearSE(nn.Module):
    """Linear gate on the pooled vector, broadcast back by ``view``, ``[..., None, None]`` or
    ``unsqueeze``; ``sigmoid`` or ``hardsigmoid``."""

    def __init__(self, c, hidden, reshape, hard):
        super().__init__()
        self.c, self.reshape, self.hard = c, reshape, hard
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        s = F.hardsigmoid(s) if self.hard else torch.sigmoid(s)
        if self.reshape == "view":
            s = s.view(s.size(0), self.c, 1, 1)
        elif self.reshape == "index":
            s = s[:, :, None, None]
        else:
            s = s.unsqueeze(-1).unsqueeze(-1)
        return x * s


class Shuffle(nn.Module):
    def __init__(self, c, groups, how):
        super().__init__()
        self.c, self.groups, self.how = c, groups, how

    def forward(self, x):
        return shuffle_channels(x, self.c, self.groups, self.how)


class SliceConv(nn.Module):
    """A channel range ``[start, start + length)`` of ``c`` channels, cut out by basic indexing
    (``x[:, a:b]``, the same with negative bounds, ``x[..., a:b, :, :]``) or ``narrow`` (method or
    function), feeding a conv: the range's channels stay prunable."""

    def __init__(self, c, start, length, how, cout, k, act):
        super().__init__()
        self.c, self.start, self.length, self.how = c, start, length, how
        self.conv = ConvBNAct(length, cout, k, act)

    def forward(self, x):
        a, b = self.start, self.start + self.length
        if self.how == "index":
            y = x[:, a:b]
        elif self.how == "index-negative":
            y = x[:, a - self.c:(b - self.c) or None]
        elif self.how == "ellipsis":
            y = x[..., a:b, :, :]
        elif self.how == "Tensor.narrow":
            y = x.narrow(1, a, self.length)
        elif self.how == "torch.narrow":
            y = torch.narrow(x, 1, a, self.length)
        else:  # "narrow-negative"
            y = x.narrow(1, a - self.c, self.length)
        return self.conv(y)


class ChannelsLastLinear(nn.Module):
    """``permute -> Linear -> act -> permute`` (ConvNeXt-style pointwise linear)."""

    def __init__(self, cin, cout, act):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.act = Act(act, functional=True)

    def forward(self, x):
        return self.act(self.fc(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


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


class MLPHead(nn.Module):
    """Mean-pool, then ``Linear -> act (-> dropout)`` per hidden width, then the classifier."""

    def __init__(self, c, hidden, n_out, act, dropout):
        super().__init__()
        layers, w = [], c
        for h in hidden:
            layers += [nn.Linear(w, h), _ACT_MODULES[act]()]
            if dropout:
                layers.append(nn.Dropout(0.1))
            w = h
        layers.append(nn.Linear(w, n_out))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x.mean((2, 3)))


class FeatureHead(nn.Module):
    """The feature map itself is an output (its channels are fixed)."""

    def forward(self, x):
        return x


# -------------------------------------------------------------------------------------------
# specs
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    kind: str
    out: int  #: channels after the block
    args: Tuple  #: kind-specific, see ``build_block``


@dataclass(frozen=True)
class Second:
    """The second input ``y`` (``in_ch`` channels): its stem and how it joins the first stem."""

    in_ch: int
    stem: Tuple[Block, ...]
    merge: str  #: "add", "torch.add" or "cat"


@dataclass(frozen=True)
class NetSpec:
    batch: int
    stem: Tuple[Block, ...]
    second: Optional[Second]
    trunk: Tuple[Block, ...]
    heads: Tuple[Tuple, ...]  #: (tap, kind, *args); tap = number of trunk blocks before the head
    output: str  #: "tensor" (one head), "tuple" or "dict"


def build_block(b: Block, cin: int) -> nn.Module:
    a = b.args
    if b.kind == "conv":  # (k, act, functional, bias)
        return ConvBNAct(cin, b.out, a[0], a[1], functional=a[2], bias=a[3])
    if b.kind == "residual":  # (k, act, mid, use_torch_add)
        return Residual(cin, b.out, a[0], a[1], a[2], a[3])
    if b.kind == "concat":  # (branches, shuffle: None or (groups, how))
        return Concat(cin, a[0], a[1], b.out)
    if b.kind == "split":  # (sizes, how, branches)
        return SplitBranches(a[0], a[1], a[2])
    if b.kind == "depthwise":  # (mult, act)
        return ConvBNAct(cin, cin * a[0], 3, a[1], groups=cin)
    if b.kind == "grouped":  # (groups, k, act)
        return ConvBNAct(cin, b.out, a[1], a[2], groups=a[0])
    if b.kind == "se":  # (hidden, pool_module)
        return SqueezeExcite(cin, a[0], a[1])
    if b.kind == "linear_se":  # (hidden, reshape, hard)
        return LinearSE(cin, a[0], a[1], a[2])
    if b.kind == "shuffle":  # (groups, how)
        return Shuffle(cin, a[0], a[1])
    if b.kind == "linear":  # (act,)
        return ChannelsLastLinear(cin, b.out, a[0])
    if b.kind == "pool":  # (kind, halve, functional)
        return Pool(a[0], a[1], a[2])
    if b.kind == "slice":  # (start, length, how, k, act)
        return SliceConv(cin, a[0], a[1], a[2], b.out, a[3], a[4])
    raise AssertionError(b.kind)


def walk(blocks, c, size):
    """``(channels, size)`` after each prefix of ``blocks``: ``[(c, size), ...]``, one more than blocks."""
    out = [(c, size)]
    for b in blocks:
        c = b.out
        if b.kind == "pool" and b.args[1]:
            size //= 2
        out.append((c, size))
    return out


def build_head(kind: str, args: Tuple, c: int, size: int) -> nn.Module:
    if kind == "gap":  # (n_out, flatten_how)
        return GapHead(c, args[0], args[1])
    if kind == "flat":  # (hidden, n_out)
        return FlatHead(c * size * size, args[0], args[1])
    if kind == "mlp":  # (hidden widths, n_out, act, dropout)
        return MLPHead(c, args[0], args[1], args[2], args[3])
    if kind == "feature":
        return FeatureHead()
    raise AssertionError(kind)


class Net(nn.Module):
    """The network a :class:`NetSpec` describes."""

    def __init__(self, spec: NetSpec, in_ch: int = 3):
        super().__init__()
        self.spec = spec
        self.stem = Seq(spec.stem, in_ch)
        c = spec.stem[-1].out if spec.stem else in_ch
        if spec.second is not None:
            s = spec.second
            self.stem2 = Seq(s.stem, s.in_ch)
            c2 = s.stem[-1].out if s.stem else s.in_ch
            c = c + c2 if s.merge == "cat" else c
        else:
            self.stem2 = None
        shapes = walk(spec.trunk, c, SIZE)
        self.trunk = nn.ModuleList([build_block(b, shapes[i][0]) for i, b in enumerate(spec.trunk)])
        self.heads = nn.ModuleList([build_head(h[1], h[2:], *shapes[h[0]]) for h in spec.heads])

    def forward(self, x, y=None):
        x = self.stem(x)
        if self.stem2 is not None:
            y = self.stem2(y)
            merge = self.spec.second.merge
            x = torch.cat([x, y], 1) if merge == "cat" else torch.add(x, y) if merge == "torch.add" else x + y
        taps = {0: x}
        for i, block in enumerate(self.trunk):
            x = block(x)
            taps[i + 1] = x
        outs = [head(taps[h[0]]) for head, h in zip(self.heads, self.spec.heads)]
        if self.spec.output == "tuple":
            return tuple(outs)
        if self.spec.output == "dict":
            return {"main": outs[0], "aux": outs[1]}
        return outs[0]


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial batch-norm affine parameters and statistics, so eval mode is not an identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def make(spec: NetSpec, seed: int) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """The model (eval mode, random batch norms) and its example inputs (always a tuple)."""
    torch.manual_seed(seed)
    model = Net(spec)
    randomize_norms(model)
    inputs = (torch.randn(spec.batch, 3, SIZE, SIZE),)
    if spec.second is not None:
        inputs += (torch.randn(spec.batch, spec.second.in_ch, SIZE, SIZE),)
    return model.eval(), inputs


def example_arg(inputs):
    """What to pass as ``example_inputs``: the bare tensor for one input, else the tuple."""
    return inputs[0] if len(inputs) == 1 else inputs


# -------------------------------------------------------------------------------------------
# strategies
# -------------------------------------------------------------------------------------------
widths = st.integers(2, MAX_W)
acts = st.sampled_from(ACTS)
kernels = st.sampled_from([1, 3])
SHUFFLE_HOWS = ("static", "static-1", "module", "function", "runtime", "runtime-1")
SLICE_HOWS = ("index", "index-negative", "ellipsis", "Tensor.narrow", "torch.narrow", "narrow-negative")
BUGGY_SLICE_HOWS = ()  #: slicing patterns of known library bugs (none now)

#: Leave out patterns of known library bugs (``BUGGY_SLICE_HOWS``; ``benchmarks/fuzz.py
#: --known-bugs`` re-enables them).  The runtime ``view(b, g, c // g, h, w)`` shuffles whose
#: ``g`` dim is the pruned one (``"runtime"`` shuffles) used to fail and are generated now, with
#: a regression test in test_property.py; so is ``narrow`` with a negative start (test_ops.py).
AVOID_KNOWN_BUGS = True


@st.composite
def compositions(draw, total: int, parts: int):
    """``parts`` positive integers summing to ``total``."""
    cuts = sorted(draw(st.lists(st.integers(1, total - 1), min_size=parts - 1, max_size=parts - 1, unique=True)))
    edges = [0] + cuts + [total]
    return tuple(b - a for a, b in zip(edges, edges[1:]))


def _shuffle(draw, c: int):
    """A channel shuffle ``(groups, how)`` of ``c`` channels, or ``None``."""
    gs = [g for g in (2, 3, 4) if c % g == 0 and c > g]
    if not gs:
        return None
    return draw(st.sampled_from(gs)), draw(st.sampled_from(SHUFFLE_HOWS))


@st.composite
def sequences(draw, c: int, size: int, n, depth: int = 0, halve: bool = True):
    """``(blocks, channels, size)`` for ``n`` (an int strategy) blocks starting at ``c`` channels."""
    blocks = []
    for _ in range(draw(n)):
        b = draw(blocks_for(c, size, depth, halve))
        blocks.append(b)
        c = b.out
        if b.kind == "pool" and b.args[1]:
            size //= 2
    return tuple(blocks), c, size


@st.composite
def branch_for(draw, c: int, size: int, depth: int, allow_identity: bool):
    """A concat/split branch: the identity, a conv, or a short sequence (maybe nesting)."""
    choice = draw(st.sampled_from(["identity", "conv", "seq"] if allow_identity else ["conv", "seq"]))
    if choice == "identity":
        return ()
    first = Block("conv", draw(st.integers(2, 8)), (draw(kernels), draw(acts), draw(st.booleans()), False))
    if choice == "conv":
        return (first,)
    rest, _, _ = draw(sequences(first.out, size, st.integers(1, 2), depth + 1, halve=False))
    return (first,) + rest


def _out(branch, c):
    return branch[-1].out if branch else c


@st.composite
def blocks_for(draw, c: int, size: int, depth: int = 0, halve: bool = True) -> Block:
    kinds = ["conv", "residual", "depthwise", "se", "linear_se", "pool", "linear"]
    if depth < MAX_DEPTH:
        kinds += ["concat", "concat"]  # twice: the nesting is the point
        if c >= 2:
            kinds.append("split")
    if c >= 4:
        kinds.append("shuffle")
    if c % 2 == 0:
        kinds.append("grouped")
    if c >= 2:
        kinds.append("slice")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return Block("conv", draw(widths), (draw(kernels), draw(acts), draw(st.booleans()), draw(st.booleans())))
    if kind == "residual":
        out = draw(st.one_of(st.just(c), widths))
        mid = draw(st.one_of(st.none(), widths))
        return Block("residual", out, (draw(kernels), draw(acts), mid, draw(st.booleans())))
    if kind == "concat":
        n = draw(st.integers(2, 3))
        branches = tuple(draw(branch_for(c, size, depth, allow_identity=c <= 12)) for _ in range(n))
        out = sum(_out(b, c) for b in branches)
        return Block("concat", out, (branches, _shuffle(draw, out) if draw(st.booleans()) else None))
    if kind == "split":
        how = draw(st.sampled_from(["torch.split", "Tensor.split", "torch.chunk", "Tensor.chunk"]))
        if how.endswith("chunk"):
            n = draw(st.sampled_from([p for p in (2, 3) if c % p == 0] or [1]))
            sizes = (c // n,) * n
        else:
            sizes = draw(compositions(c, draw(st.integers(2, min(3, c)))))
        branches = tuple(draw(branch_for(s, size, depth, allow_identity=True)) for s in sizes)
        out = sum(_out(b, s) for b, s in zip(branches, sizes))
        return Block("split", out, (sizes, how, branches))
    if kind == "depthwise":
        mult = draw(st.sampled_from([1, 2])) if c <= 12 else 1
        return Block("depthwise", c * mult, (mult, draw(acts)))
    if kind == "grouped":
        g = draw(st.sampled_from([g for g in (2, 4) if c % g == 0]))
        out = g * draw(st.integers(1, MAX_W // g))
        return Block("grouped", out, (g, draw(kernels), draw(acts)))
    if kind == "se":
        return Block("se", c, (draw(st.integers(2, 8)), draw(st.booleans())))
    if kind == "linear_se":
        return Block("linear_se", c, (draw(st.integers(2, 8)), draw(st.sampled_from(["view", "index", "unsqueeze"])),
                                      draw(st.booleans())))
    if kind == "shuffle":
        return Block("shuffle", c, _shuffle(draw, c) or (1, "static"))
    if kind == "linear":
        return Block("linear", draw(widths), (draw(acts),))
    if kind == "slice":
        start = draw(st.integers(0, c - 1))
        length = draw(st.integers(1, c - start))
        how = draw(st.sampled_from(SLICE_HOWS + (() if AVOID_KNOWN_BUGS else BUGGY_SLICE_HOWS)))
        return Block("slice", draw(widths), (start, length, how, draw(kernels), draw(acts)))
    halve = halve and size >= 2 and draw(st.booleans())
    return Block("pool", c, (draw(st.sampled_from(["max", "avg"])), halve, draw(st.booleans())))


@st.composite
def heads_for(draw, tap: int, c: int, size: int, feature_ok: bool):
    kinds = ["gap", "flat", "mlp"] + (["feature"] if feature_ok else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "gap":
        return (tap, "gap", draw(st.integers(2, 10)), draw(st.sampled_from(["module", "method", "function"])))
    if kind == "flat":
        return (tap, "flat", draw(widths), draw(st.integers(2, 10)))
    if kind == "mlp":
        hidden = tuple(draw(st.lists(widths, min_size=1, max_size=2)))
        return (tap, "mlp", hidden, draw(st.integers(2, 10)), draw(acts), draw(st.booleans()))
    return (tap, "feature")


@st.composite
def net_specs(draw, max_blocks: int = 6, multi: bool = True) -> NetSpec:
    """A random network; ``multi=False`` draws only one input and one output."""
    two_inputs = multi and draw(st.integers(0, 2)) == 0
    if two_inputs:
        stem, c, _ = draw(sequences(3, SIZE, st.integers(0, 2), halve=False))
        in_ch = draw(st.sampled_from([1, 3, 4]))
        stem2, c2, _ = draw(sequences(in_ch, SIZE, st.integers(0, 2), halve=False))
        merge = draw(st.sampled_from(["add", "torch.add", "cat"]))
        if merge != "cat" and c2 != c:
            stem2 += (Block("conv", c, (draw(kernels), draw(acts), False, draw(st.booleans()))),)
        second = Second(in_ch, stem2, merge)
        c = c + (stem2[-1].out if stem2 else in_ch) if merge == "cat" else c
        n_trunk = st.integers(0, max(0, max_blocks - len(stem) - len(stem2)))
    else:
        stem, second, c = (), None, 3
        n_trunk = st.integers(0, max_blocks)
    trunk, _, _ = draw(sequences(c, SIZE, n_trunk))
    shapes = walk(trunk, c, SIZE)
    heads = [draw(heads_for(len(trunk), *shapes[-1], feature_ok=False))]
    output = draw(st.sampled_from(["tensor", "tuple", "dict"])) if multi else "tensor"
    if output != "tensor":
        tap = draw(st.integers(0, len(trunk)))
        heads.append(draw(heads_for(tap, *shapes[tap], feature_ok=True)))
    return NetSpec(draw(st.sampled_from([1, 2])), stem, second, trunk, tuple(heads), output)


@st.composite
def targets(draw):
    """A ``hfp_fx.prune`` target: params and/or MACs, each a fraction in [0.3, 0.9]."""
    which = draw(st.sampled_from([("params",), ("macs",), ("params", "macs")]))
    return {k: draw(st.floats(0.3, 0.9)) for k in which}
