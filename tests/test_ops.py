"""One small model per coupling rule: shrink == mask, counts predicted exactly, reasons given."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx
from helpers import assert_close, check_model


def groups_by_module(dg):
    return {m: g for g in dg.groups for m in g.modules}


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(14, 10, 1)
        self.d, self.e = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(6, 5, 1)

    def forward(self, x):
        y = torch.relu(self.c(torch.cat([self.a(x), self.b(x)], dim=1)))
        p, q = torch.split(y, [4, 6], dim=1)
        r, s = y.chunk(2, dim=1)
        return torch.cat([self.d(p), self.e(q), r + s, y[:, 2:7], y.narrow(1, 1, 3)], 1).mean((2, 3))


class SliceNarrow(nn.Module):
    """Prunable channel ranges cut out by ``x[:, a:b]`` and ``narrow``, each feeding a conv.

    Unlike ``CatSplit`` (whose sliced tensors reach the output, fixing their channels) every
    channel of ``a`` is prunable here, so shrink must recompute the bounds from the kept channels.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b, self.c = nn.Conv2d(7, 4, 1), nn.Conv2d(5, 4, 1)
        self.d, self.e = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.f = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y[:, 2:9]) + self.c(y.narrow(1, 6, 5)) + self.d(torch.narrow(y, 1, 0, 4)) + self.e(y[..., -4:, :, :])
        return self.f(torch.relu(z)).mean((2, 3))


class Shuffle(nn.Module):
    """ShuffleNet-style: chunk, branch, cat, view/transpose/view channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(2):
            x1, x2 = x.chunk(2, dim=1)
            x = torch.cat((x1, self.branch(x2)), dim=1)
            n, c, h, w = x.size()
            x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.head(x)


class PixelAndNativeShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.shuffle = nn.ChannelShuffle(4)
        self.b = nn.Conv2d(16, 8, 1)
        self.ps = nn.PixelShuffle(2)
        self.c = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.c(self.ps(self.b(self.shuffle(self.a(x)))))


class ChannelsLast(nn.Module):
    """ConvNeXt-style block: depthwise conv, permute, LayerNorm, linear, GELU, linear, layer scale."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1))
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(torch.flatten(x, 1))


class FlattenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc2(torch.relu(self.fc(x.view(x.size(0), 6 * 4 * 4))))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(12, 3, 1), nn.Conv2d(3, 12, 1)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)


class GroupedAndTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.dw2 = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # depth multiplier 2
        self.up = nn.ConvTranspose2d(24, 6, 2, stride=2)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.up(F.relu(self.dw2(self.g(self.a(x)))))))


class Attention(nn.Module):
    """timm-style attention: qkv reshape into heads, SDPA, merge heads, projection."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ManualAttention(Attention):
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class BiasedAttention(Attention):
    """A per-head relative-position bias as ``attn_mask`` (timm vit_relpos, coatnet, maxvit)."""

    def __init__(self, dim=16, num_heads=4, tokens=5):
        super().__init__(dim, num_heads)
        self.bias_table = nn.Parameter(torch.randn(2 * tokens - 1, num_heads))
        idx = torch.arange(tokens)
        self.register_buffer("index", (idx[:, None] - idx[None, :] + tokens - 1).flatten())
        self.tokens = tokens

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.bias_table[self.index].view(self.tokens, self.tokens, -1).permute(2, 0, 1).unsqueeze(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, attn_cls):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 5, 16))
        self.inp = nn.Linear(8, 16)
        self.attn = attn_cls()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x) + self.pos
        return self.fc(self.attn(x))


@pytest.mark.parametrize("model,x", [
    (CatSplit(), torch.randn(2, 3, 8, 8)),
    (SliceNarrow(), torch.randn(2, 3, 5, 5)),
    (Shuffle(), torch.randn(2, 3, 6, 6)),
    (PixelAndNativeShuffle(), torch.randn(2, 3, 4, 4)),
    (ChannelsLast(), torch.randn(2, 3, 4, 4)),
    (FlattenMLP(), torch.randn(2, 3, 4, 4)),
    (SqueezeExcite(), torch.randn(2, 3, 6, 6)),
    (GroupedAndTransposed(), torch.randn(2, 3, 5, 5)),
    (Block(Attention), torch.randn(2, 5, 8)),
    (Block(ManualAttention), torch.randn(2, 5, 8)),
    (Block(BiasedAttention), torch.randn(2, 5, 8)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
@pytest.mark.parametrize("seed", [0, 1])
def test_rule_models(model, x, seed):
    dg, _ = check_model(model, x, seed=seed)
    assert dg.prunable_groups


def test_attention_prunes_whole_heads():
    dg = hfp_fx.dependency_graph(Block(Attention), torch.randn(2, 5, 8))
    qkv = [g for g in dg.groups if any(m.target == "attn.qkv.weight" and m.dim == 0 for m in g.members)]
    assert len(qkv) == 1 and qkv[0].prunable and qkv[0].channels == 4  # one unit per head
    small = hfp_fx.shrink(dg, keep={qkv[0].id: [0, 2]})
    assert small.get_submodule("attn.qkv").out_features == 3 * 2 * 4
    assert small.get_submodule("attn.proj").in_features == 2 * 4


@pytest.mark.parametrize("pick", ["first", "last", "odd"])
def test_channel_slices_follow_the_kept_channels(pick):
    """Slice and narrow bounds are recounted over the kept channels: shrink == mask."""
    torch.manual_seed(0)
    model, x = SliceNarrow().eval(), torch.randn(2, 3, 5, 5)
    dg = hfp_fx.dependency_graph(model, x)
    a_groups = [g for g in dg.prunable_groups if "a" in g.modules]
    assert sum(g.channels for g in a_groups) == 12  # every channel of a is prunable
    choose = {"first": lambda n: [0], "last": lambda n: [n - 1], "odd": lambda n: list(range(1, n, 2)) or [0]}[pick]
    keep = {g.id: choose(g.channels) for g in dg.prunable_groups}
    small = hfp_fx.shrink(dg, keep=keep).eval()
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=keep).eval()(x), small(x))
    kept_a = small.get_submodule("a").out_channels
    assert kept_a < 12
    widths = [small.get_submodule(n).in_channels for n in "bcde"]
    assert sum(widths) < 7 + 5 + 4 + 4


class NegativeNarrow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.f = nn.Conv2d(3, 12, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.f(self.b(y.narrow(1, -3, 3))).mean((2, 3))  # the last three channels


def test_narrow_with_negative_start():
    """``narrow(dim, -k, k)`` (the last k channels) used to map the empty range ``ids[-k:0]``."""
    dg, _ = check_model(NegativeNarrow(), torch.randn(2, 3, 5, 5))
    assert dg.prunable_groups
    small = hfp_fx.prune(NegativeNarrow(), torch.randn(2, 3, 5, 5), {"macs": 0.6})
    assert hfp_fx.count(small, torch.randn(2, 3, 5, 5)).macs <= small.meta["hfp"].target.macs


def test_shuffle_and_cat_groups():
    dg = hfp_fx.dependency_graph(CatSplit(), torch.randn(1, 3, 8, 8))
    by = groups_by_module(dg)
    assert by["a"].prunable and by["b"].prunable and by["a"] is not by["b"]
    dg = hfp_fx.dependency_graph(Shuffle(), torch.randn(1, 3, 6, 6))
    assert 0 < dg.prunable_fraction() < 1


def test_grouped_conv_prunes_whole_groups():
    dg = hfp_fx.dependency_graph(GroupedAndTransposed(), torch.randn(1, 3, 5, 5))
    g = groups_by_module(dg)["g"]
    assert g.channels == 4  # four conv-groups
    small = hfp_fx.shrink(dg, keep={g.id: [1, 3]})
    conv = small.get_submodule("g")
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 6)


def test_layernorm_channels_are_prunable_and_outputs_fixed_with_reasons():
    dg = hfp_fx.dependency_graph(ChannelsLast(), torch.randn(1, 3, 4, 4))
    by = groups_by_module(dg)
    assert by["norm"].prunable and "norm.weight" in [m.target for m in by["norm"].members]
    assert by["fc1"].prunable and by["fc1"].channels == 32
    assert not by["head"].prunable and "model output" in by["head"].reason


class NormOverTwoDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 8), nn.LayerNorm([4, 8]), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_layernorm_over_several_dims_fixes_the_channels_with_a_reason():
    dg = hfp_fx.dependency_graph(NormOverTwoDims(), torch.randn(2, 4, 3))
    group = groups_by_module(dg)["a"]
    assert not group.prunable and "normalises over several dims" in group.reason


class UnknownOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(torch.fft.fft(self.a(x)).real)


def test_unknown_op_fixes_channels_and_names_it():
    dg = hfp_fx.dependency_graph(UnknownOp(), torch.randn(1, 3, 4, 4))
    g = groups_by_module(dg)["a"]
    assert not g.prunable and "fft" in g.reason
    check_model(UnknownOp(), torch.randn(1, 3, 4, 4))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b = nn.Conv2d(3, 8, 1), DataDependent(), nn.Conv2d(8, 4, 1)
        self.c = nn.Conv2d(4, 6, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.d(torch.relu(self.c(self.b(self.inner(self.a(x))))))


def test_untraceable_submodule_becomes_opaque():
    with pytest.warns(UserWarning, match="inner"):
        dg = hfp_fx.dependency_graph(HasUntraceable(), torch.randn(1, 3, 4, 4))
    by = groups_by_module(dg)
    assert not by["a"].prunable and "opaque" in by["a"].reason
    assert by["c"].prunable
    with pytest.warns(UserWarning):
        check_model(HasUntraceable(), torch.randn(1, 3, 4, 4))


def test_untraceable_root_raises_naming_the_cause():
    with pytest.raises(hfp_fx.TraceError, match="DataDependent"):
        hfp_fx.dependency_graph(DataDependent(), torch.randn(1, 8, 4, 4))


def test_exclude_and_bad_keep():
    model = FlattenMLP()
    dg = hfp_fx.dependency_graph(model, torch.randn(1, 3, 4, 4), exclude=["conv"])
    assert not groups_by_module(dg)["conv"].prunable
    with pytest.raises(ValueError, match="does not have"):
        hfp_fx.dependency_graph(model, torch.randn(1, 3, 4, 4), exclude=["nope"])
    dg = hfp_fx.dependency_graph(model, torch.randn(1, 3, 4, 4))
    g = groups_by_module(dg)["conv"]
    with pytest.raises(ValueError, match="at least one"):
        hfp_fx.shrink(dg, keep={g.id: []})
    with pytest.raises(ValueError, match="distinct"):
        hfp_fx.shrink(dg, keep={g.id: [0, 0]})
    with pytest.raises(KeyError):
        hfp_fx.shrink(dg, keep={"nope": [0]})


def test_multihead_attention_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 3)

        def forward(self, x):
            x = self.inp(x)
            y, _ = self.mha(x, x, x, need_weights=False)
            return self.fc2(F.gelu(self.fc1(y)))

    dg, _ = check_model(M(), torch.randn(2, 5, 4))
    assert groups_by_module(dg)["fc1"].prunable


def test_summary_networkx_and_dot():
    dg = hfp_fx.dependency_graph(SqueezeExcite(), torch.randn(1, 3, 6, 6))
    text = dg.summary()
    assert "prunable" in text and dg.groups[0].id in text
    g = dg.to_networkx()
    assert any(d.get("kind") == "group" for _, d in g.nodes(data=True))
    dot = dg.to_dot()
    assert dot.startswith("digraph") and "->" in dot


class Reductions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Linear(8, 3)
        self.inorm = nn.InstanceNorm2d(8)

    def forward(self, x):
        y = self.inorm(self.a(x))
        n = y.norm(2, dim=2)  # (N, 8, W): p positional, channels kept
        s = torch.std(y, 3, True, True).squeeze(3)
        z = (n + s).mean(-1)
        return self.b(z.broadcast_to(2, 8))


class TokenMixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.tok = nn.Linear(5, 7)  # mixes tokens, channels pass through
        self.unflat = nn.Unflatten(1, (6, 1))
        self.head = nn.Linear(6 * 7, 2)

    def forward(self, x):
        y = self.tok(self.embed(x).transpose(1, 2))  # (N, 6, 7)
        return self.head(self.unflat(y).flatten(1))


class FunctionalGroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.wg = nn.Parameter(torch.randn(8, 2, 1, 1))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.conv2d(self.a(x), self.w, None, 1, 1, 1, 8)
        y = F.conv2d(y, self.wg, None, 1, 0, 1, 4)
        return self.out(y)


@pytest.mark.parametrize("model,x", [
    (Reductions(), torch.randn(2, 3, 4, 4)),
    (TokenMixer(), torch.randn(2, 5, 4)),
    (FunctionalGroupedConv(), torch.randn(2, 3, 5, 5)),
], ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_argument_rewrites_and_counts(model, x):
    dg, small = check_model(model, x)
    assert dg.prunable_groups


def test_gather_fixes_channels():
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x)
            idx = torch.zeros_like(y, dtype=torch.long)
            return self.b(torch.gather(y, 2, idx))

    dg = hfp_fx.dependency_graph(G(), torch.randn(1, 3, 4, 4))
    assert not groups_by_module(dg)["a"].prunable
    check_model(G(), torch.randn(1, 3, 4, 4))


class Tied(nn.Module):
    """Two linears sharing one weight tensor (``c.weight is b.weight``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.c.weight = self.b.weight
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head(self.b(h) + self.c(h))


class TiedConv(nn.Module):
    """Two parallel convs sharing weight and bias, each used on a different input."""

    def __init__(self):
        super().__init__()
        self.a, self.a2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.p, self.q = nn.Conv2d(8, 10, 3, padding=1), nn.Conv2d(8, 10, 3, padding=1)
        self.q.weight, self.q.bias = self.p.weight, self.p.bias
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        y = torch.relu(self.p(torch.relu(self.a(x)))) * torch.relu(self.q(torch.relu(self.a2(x))))
        return self.head(y).mean((2, 3))


class TiedLM(nn.Module):
    """A tiny LM whose head is the embedding (``lm_head.weight is embed.weight``), residual MLP between.

    The embedding dim is one prunable group shared by both uses of the tensor; ``head_first``
    registers the head first, so the tensor's canonical name is ``lm_head.weight``.
    """

    def __init__(self, vocab=11, d=8, hidden=12, head_first=False):
        super().__init__()
        if head_first:
            self.lm_head = nn.Linear(d, vocab, bias=False)
        self.embed = nn.Embedding(vocab, d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        if not head_first:
            self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.lm_head(x)


class TiedLMHeadFirst(TiedLM):
    def __init__(self):
        super().__init__(head_first=True)


def _tokens():
    return torch.randint(0, 11, (2, 5))


TIED = {"Tied": (Tied, ("b.weight", "c.weight"), lambda: torch.randn(3, 4)),
        "TiedConv": (TiedConv, ("p.weight", "q.weight", "p.bias", "q.bias"), lambda: torch.randn(2, 3, 5, 5)),
        "TiedLM": (TiedLM, ("embed.weight", "lm_head.weight"), _tokens),
        "TiedLMHeadFirst": (TiedLMHeadFirst, ("embed.weight", "lm_head.weight"), _tokens)}


def assert_tied(small, names):
    tensors = dict(small.named_parameters(remove_duplicate=False))
    for first, second in zip(names[::2], names[1::2]):
        assert tensors[first] is tensors[second], f"{first} and {second} are no longer one tensor"


@pytest.mark.parametrize("name", sorted(TIED))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tied_weights_shrink_to_one_tensor(name, seed):
    cls, names, make_input = TIED[name]
    torch.manual_seed(seed)
    _, small = check_model(cls(), make_input(), seed=seed)  # counts include the shared tensor once
    assert_tied(small, names)


@pytest.mark.parametrize("name", sorted(TIED))
@pytest.mark.parametrize("target", [{"params": 0.7}, {"macs": 0.6}, {"params": 0.5, "macs": 0.7}],
                         ids=["params70", "macs60", "both"])
def test_tied_weights_prune_meets_target(name, target, tmp_path):
    cls, names, make_input = TIED[name]
    torch.manual_seed(0)
    model, x = cls().eval(), make_input()
    dense = hfp_fx.count(model, x)
    assert dense.params == sum(p.numel() for p in model.parameters())  # shared tensors once
    small = hfp_fx.prune(model, x, target).eval()
    achieved, report = hfp_fx.count(small, x), small.meta["hfp"]
    assert achieved.params == report.achieved.params and achieved.macs == report.achieved.macs
    for k, fraction in target.items():
        assert getattr(achieved, k) <= fraction * getattr(dense, k) == pytest.approx(getattr(report.target, k), abs=1)
    assert_tied(small, names)
    dg = hfp_fx.dependency_graph(model, x)
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=report.keep).eval()(x), small(x))
    hfp_fx.save(small, tmp_path / "tied.pt")
    again = hfp_fx.load(tmp_path / "tied.pt", cls, x).eval()
    assert_tied(again, names)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


@pytest.mark.parametrize("name", ["Tied", "TiedLM", "TiedLMHeadFirst"])
def test_tied_weights_fold_gates_once(name):
    """A gate is folded into a weight only where its consumer is the tensor's one reader.

    The LM head's gate folded into the tied embedding would also scale the embedding's output.
    """
    cls, names, make_input = TIED[name]
    torch.manual_seed(0)
    model, x = cls(), make_input()
    prepared = hfp_fx.prepare(model, x, {"params": 0.9}, gates="channel")
    with torch.no_grad():
        prepared.hfp.gates.gate.uniform_(0.5, 1.5)
        prepared.hfp.gates.threshold = 0.0
    small = hfp_fx.finalize(prepared).eval()
    assert_tied(small, names)
    assert hfp_fx.count(small, x).params == small.meta["hfp"].achieved.params
    keep = small.meta["hfp"].keep
    with torch.no_grad():
        for gid, kept in keep.items():
            g = prepared.hfp.gates.gate_of(gid)
            off = torch.ones_like(g, dtype=torch.bool)
            off[kept] = False
            g[off] = 0
        assert_close(prepared.eval()(x), small(x))


@pytest.mark.parametrize("cls", [TiedLM, TiedLMHeadFirst])
def test_tied_embedding_dim_is_one_prunable_group(cls):
    dg = hfp_fx.dependency_graph(cls(), _tokens())
    canonical = dg.facts.canonical["lm_head.weight"]
    assert canonical == dg.facts.canonical["embed.weight"]
    width = [g for g in dg.groups if any(m.target == canonical and m.dim == 1 for m in g.members)]
    assert len(width) == 1 and width[0].prunable and width[0].channels == 8
    assert {"up.weight", "down.weight"} <= {m.target for m in width[0].members}
    vocab = [g for g in dg.groups if any(m.target == canonical and m.dim == 0 for m in g.members)]
    assert len(vocab) == 1 and not vocab[0].prunable  # the logits are the model output


def test_per_head_attn_mask_fixes_the_heads_with_a_reason():
    dg = hfp_fx.dependency_graph(Block(BiasedAttention), torch.randn(2, 5, 8))
    heads = [g for g in dg.groups if any(m.target == "attn.qkv.weight" and m.dim == 0 for m in g.members)]
    assert heads and not any(g.prunable for g in heads)
    assert any("attn_mask has per-head values" in g.reason for g in heads)


class UntrackedReshapeBySize(nn.Module):
    """maxvit_t's relative-position attention, reduced: ``B, N, D = y.shape`` is read from the
    prunable LayerNorm stream, but the reshape it sizes acts on a tensor whose channels are pruned
    apart from the stream's (the attention's)."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm = nn.Linear(8, 16), nn.LayerNorm(16)
        self.qkv, self.merge = nn.Linear(16, 48), nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        y = self.norm(x)
        B, N, D = y.shape
        q, k, v = self.qkv(y).reshape(B, N, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.einsum("bhnd,bhmd->bhnm", q, k).softmax(-1)
        o = torch.einsum("bhnm,bhmd->bhnd", a, v).permute(0, 2, 1, 3)
        o = o.reshape(B, N, 2, D // 2).reshape(B, N, D)  # volo: ``C // num_heads``
        return self.head(x + self.merge(o))


@pytest.mark.parametrize("seed", [0, 1])
def test_size_read_from_a_pruned_stream_keeps_an_untracked_reshape_dense(seed):
    dg, _ = check_model(UntrackedReshapeBySize(), torch.randn(2, 5, 8), seed=seed)
    assert groups_by_module(dg)["inp"].prunable


class GlobalQuery(nn.Module):
    """gcvit's global-query attention, reduced: the query is not computed from the tracked input,
    so the heads of key and value meet an untracked tensor in ``q @ k^T``."""

    def __init__(self, learned):
        super().__init__()
        self.kv, self.proj = nn.Linear(8, 32), nn.Linear(16, 8)
        self.q = nn.Parameter(torch.randn(1, 2, 5, 8))
        self.learned = learned

    def forward(self, x):
        b, n, _ = x.shape
        k, v = self.kv(x).reshape(b, n, 2, 2, 8).permute(2, 0, 3, 1, 4)
        q = self.q if self.learned else self.q * 2  # a parameter (bound) or a computed tensor (fixed)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, 16))


@pytest.mark.parametrize("learned", [True, False])
def test_heads_meeting_an_untracked_query_are_bound_or_fixed(learned):
    dg, _ = check_model(GlobalQuery(learned), torch.randn(2, 5, 8))
    heads = [g for g in dg.groups if any(m.target == "proj.weight" and m.dim == 1 for m in g.members)][0]
    if learned:
        assert heads.prunable and any(m.target == "q" for m in heads.members)
    else:
        assert not heads.prunable and "untracked tensor" in heads.reason


class ComputedBias(nn.Module):
    """BEiT's qkv: ``F.linear(x, qkv.weight, cat(q_bias, zeros, v_bias))``."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(12, 2)
        self.weight = nn.Parameter(torch.randn(12, 8))
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))

    def forward(self, x):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return self.out(F.linear(self.inp(x), self.weight, bias))


def test_linear_with_a_computed_bias_keeps_its_outputs_and_prunes_its_inputs():
    dg, _ = check_model(ComputedBias(), torch.randn(2, 4))
    by = groups_by_module(dg)
    assert by["inp"].prunable
    outputs = [g for g in dg.groups if any(m.target == "weight" and m.dim == 0 for m in g.members)][0]
    assert not outputs.prunable and "computed bias" in outputs.reason


class ChannelRouter(nn.Module):
    """A softmax over the channels (a router's scores) read by a linear layer, and a top-k over
    them whose indices count per channel: what a mixture-of-experts router computes."""

    def __init__(self, running_sum=False):
        super().__init__()
        self.score, self.mix, self.per_count = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)
        self.running_sum = running_sum

    def forward(self, x):
        p = torch.softmax(self.score(x), -1)
        idx = torch.topk(p, 2, -1).indices
        counts = torch.histc(idx.reshape(-1).float(), bins=5, min=0, max=4)
        out = self.mix(p) + self.per_count(counts)
        if self.running_sum:  # a removed channel's running sum is not 0: only offsets may read it
            out = out + torch.cumsum(counts, 0)[-2]
        return out


def test_softmax_over_channels_prunes_with_a_logit_gate():
    x = torch.randn(4, 6)
    dg, small = check_model(ChannelRouter().eval(), x, capture="fx")
    (scores,) = [g for g in dg.prunable_groups if g.channels == 5]
    assert scores.floor == 2  # the top-k picks 2 of them
    assert any(site.kind == "logit" for site in dg.facts.gates)
    for keep in ([0, 3], [1, 2, 4]):
        with torch.no_grad():
            assert_close(hfp_fx.shrink(dg, keep={scores.id: keep})(x), hfp_fx.mask(dg, keep={scores.id: keep})(x))
    with pytest.raises(ValueError, match="keep at least 2"):
        hfp_fx.shrink(dg, keep={scores.id: [4]})
    fixed = hfp_fx.dependency_graph(ChannelRouter(running_sum=True).eval(), x, capture="fx")
    assert not [g for g in fixed.prunable_groups if g.channels == 5]


def test_channel_indices_read_as_values_fix_the_channels():
    class OneHot(nn.Module):
        def __init__(self):
            super().__init__()
            self.score = nn.Linear(6, 5)

        def forward(self, x):
            idx = torch.topk(self.score(x), 2, -1).indices
            return F.one_hot(idx, 5).float().sum(1)  # positions 0..4 used as values: not prunable

    dg = hfp_fx.dependency_graph(OneHot(), torch.randn(4, 6), capture="fx")
    (scores,) = [g for g in dg.groups if g.channels == 5 and any(m.target == "score.weight" for m in g.members)]
    assert not scores.prunable and "reads channel indices" in scores.reason
