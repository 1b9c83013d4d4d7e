"""Parameters that reach the channels through views: class tokens, position embeddings, GRN, layer scale.

A parameter combined with channels through ``expand`` / ``view`` / ``unsqueeze`` / slicing /
casts must be bound to those channels (``passes/rules_pointwise.py`` ``param_view_chain``), so the
channels stay prunable, the parameter is sliced with them and every literal size on the chain is
rewritten.  Chains that cannot be followed keep fixing the channels with a reason.
"""
import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import check_model


def group_of(dg, target, dim):
    """The prune group that holds dim ``dim`` of parameter ``target``."""
    return next(g for g in dg.groups if any(m.target == target and m.dim == dim for m in g.members))


def assert_sliced(dg, small, target, dim):
    """``target`` is in a prunable group and the shrunk model's copy lost the removed slices."""
    g = group_of(dg, target, dim)
    assert g.prunable, g.reason
    dense = dict(dg.facts.gm.named_parameters())[target].shape[dim]
    assert dict(small.named_parameters())[target].shape[dim] == g.channels // 2 < dense


class Tokens(nn.Module):
    """A token stream that is not normalised: cls token expanded with literal sizes, sliced pos embedding."""

    def __init__(self, c=8, tokens=4, dist=False):
        super().__init__()
        self.c, self.dist = c, dist
        self.proj = nn.Linear(6, c)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.dist_token = nn.Parameter(torch.randn(1, 1, c)) if dist else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 3, c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.proj(x)
        cls = self.cls_token.expand(x.shape[0], 1, self.c)  # literal channel count
        extra = [self.dist_token.expand(x.shape[0], -1, -1)] if self.dist else []
        x = torch.cat([cls, *extra, x], dim=1)
        x = x + self.pos_embed[:, :x.shape[1]].to(x.dtype)
        return self.head(torch.relu(x))


class ChannelsLastGRN(nn.Module):
    """GRN-like scale and shift on channels-last (``gamma.view(1, 1, 1, -1)``), no normalisation."""

    def __init__(self, c=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, c), nn.Linear(c, 4)
        self.gamma, self.beta = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x):
        x = self.fc1(x.permute(0, 2, 3, 1))
        x = x * self.gamma.view(1, 1, 1, -1) + self.beta.view(1, 1, 1, -1)
        return self.fc2(x)


class LayerScaleBlock(nn.Module):
    """Conv residual block with layer scales ``gamma.reshape(-1, 1, 1)`` and ``unsqueeze(-1).unsqueeze(-1)``."""

    def __init__(self, c=8):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c))
        self.delta = nn.Parameter(torch.rand(c))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.gamma.reshape(-1, 1, 1) * torch.relu(self.a(x))
        x = x + self.b(x) * self.delta.unsqueeze(-1).unsqueeze(-1).expand_as(x)
        return self.head(x).mean((2, 3))


class LearnedChannels(nn.Module):
    """Extra learned channels concatenated along the channel axis (``pad.expand(n, -1, h, w)``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.extra = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        y = self.stem(x)
        extra = self.extra.expand(y.shape[0], -1, y.shape[2], y.shape[3])
        return self.head(torch.cat([y, extra], dim=1))


@pytest.mark.parametrize("dist", [False, True])
def test_class_token_and_position_embedding_are_pruned_with_the_stream(dist):
    torch.manual_seed(0)
    dg, small = check_model(Tokens(dist=dist), torch.randn(2, 4, 6))
    for name in ["cls_token", "pos_embed"] + (["dist_token"] if dist else []):
        assert_sliced(dg, small, name, 2)
    assert group_of(dg, "cls_token", 2) is group_of(dg, "proj.weight", 0)


def test_grn_like_scale_and_shift_on_channels_last():
    torch.manual_seed(0)
    dg, small = check_model(ChannelsLastGRN(), torch.randn(2, 3, 5, 5))
    assert_sliced(dg, small, "gamma", 0)
    assert group_of(dg, "beta", 0) is group_of(dg, "fc1.weight", 0)


def test_layer_scale_through_reshape_unsqueeze_and_expand_as():
    torch.manual_seed(0)
    dg, small = check_model(LayerScaleBlock(), torch.randn(2, 3, 6, 6))
    assert_sliced(dg, small, "gamma", 0)
    assert_sliced(dg, small, "delta", 0)


def test_learned_channels_concatenated_along_channels_are_prunable():
    torch.manual_seed(0)
    dg, small = check_model(LearnedChannels(), torch.randn(2, 3, 4, 4))
    assert_sliced(dg, small, "extra", 1)


class SlicedChannels(nn.Module):
    """The parameter is sliced along the channel dim: not one-to-one, so the channels stay fixed."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 6), nn.Linear(6, 2)
        self.p = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.head(self.fc(x) + self.p[:6])


class SharedView(nn.Module):
    """A view of the parameter already read as untracked by an earlier op: binding it later would lie."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 6), nn.Linear(6, 2)
        self.p = nn.Parameter(torch.randn(6))

    def forward(self, x):
        v = self.p.view(1, -1)
        s = v.sum()  # reads every position of v before it meets the channels
        return self.head(self.fc(x) * v) * s


@pytest.mark.parametrize("cls", [SlicedChannels, SharedView])
def test_chains_that_cannot_be_followed_fix_the_channels_with_a_reason(cls):
    dg, _ = check_model(cls(), torch.randn(2, 3))
    g = group_of(dg, "fc.weight", 0)
    assert not g.prunable and "combines the channels with the untracked tensor" in g.reason


def test_torchvision_vit_class_token_and_position_embedding_are_bound():
    """The residual stream stays fixed by LayerNorm, but the tokens join it instead of fixing it."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    dg, _ = check_model(model, torch.randn(1, 3, 32, 32))
    stream = group_of(dg, "class_token", 2)
    assert stream is group_of(dg, "encoder.pos_embedding", 2) is group_of(dg, "conv_proj.weight", 0)
    assert "untracked" not in (stream.reason or "")


# -------------------------------------------------------------------------------------------
# property: random view chains over a per-channel parameter
# -------------------------------------------------------------------------------------------
class ViewChain(nn.Module):
    """``fc(x) * chain(gamma) + x'`` on channels-last, ``chain`` a drawn list of view-like steps."""

    def __init__(self, steps, c=6):
        super().__init__()
        self.fc, self.head = nn.Linear(4, c), nn.Linear(c, 2)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.steps = steps

    def forward(self, x):
        y = self.fc(x)
        g = self.gamma
        for name, args in self.steps:
            g = g[args] if name == "getitem" else getattr(g, name)(*args)
        return self.head(y * g + y)


@st.composite
def view_chains(draw, c=6, out_rank=3):
    """Steps over a ``(c,)`` tensor whose other dims stay 1, ending as ``(1,) * k + (c,)`` (or expanded)."""
    shape, ch, steps = [c], 0, []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["unsqueeze", "squeeze", "transpose", "view", "to", "getitem", "contiguous"]))
        if kind == "unsqueeze" and len(shape) < 5:
            k = draw(st.integers(0, len(shape)))
            steps.append(("unsqueeze", (k,)))
            shape.insert(k, 1)
            ch += k <= ch
        elif kind == "squeeze" and len(shape) > 1:
            k = draw(st.sampled_from([i for i in range(len(shape)) if i != ch]))
            steps.append(("squeeze", (k,)))
            shape.pop(k)
            ch -= k < ch
        elif kind == "transpose" and len(shape) > 1:
            i, j = draw(st.permutations(range(len(shape))))[:2]
            steps.append(("transpose", (i, j)))
            shape[i], shape[j] = shape[j], shape[i]
            ch = j if ch == i else i if ch == j else ch
        elif kind == "view":
            sizes = [-1 if i == ch and draw(st.booleans()) else s for i, s in enumerate(shape)]
            steps.append(("view", tuple(sizes)))
        elif kind == "to":
            steps.append(("to", (torch.float32,)))
        elif kind == "getitem":
            steps.append(("getitem", (Ellipsis, None) if draw(st.booleans()) else (slice(None),)))
            if steps[-1][1][-1] is None:
                shape.append(1)
        elif kind == "contiguous":
            steps.append(("contiguous", ()))
    lead = draw(st.integers(0, out_rank - 1))
    order = [i for i in range(len(shape)) if i != ch] + [ch]
    steps.append(("permute", tuple(order)))
    steps.append(("reshape", (1,) * lead + (-1 if draw(st.booleans()) else c,)))
    if draw(st.booleans()):
        steps.append(("expand", (2, 3, c)[out_rank - 1 - lead:]))
    return steps


@settings(deadline=None, max_examples=25)
@given(steps=view_chains(), seed=st.integers(0, 3))
def test_random_view_chains_bind_the_parameter(steps, seed):
    torch.manual_seed(seed)
    dg, small = check_model(ViewChain(steps), torch.randn(2, 3, 4), seed=seed)
    assert_sliced(dg, small, "gamma", 0)
