"""``capture="export"`` / ``"auto"`` on plain torch models (no transformers needed)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hfp_fx
from helpers import assert_close, check_model
from test_transformers import TinyLlama, groups_with


@pytest.mark.parametrize("repeat", ["expand", "interleave", "sdpa"])
def test_exported_tiny_llama_prunes_like_the_traced_one(repeat):
    x = torch.randint(0, 40, (2, 7))
    dg, small = check_model(TinyLlama(repeat), x, capture="export")
    traced = hfp_fx.dependency_graph(TinyLlama(repeat), x)
    assert sorted(g.channels for g in dg.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)
    for layer in range(2):
        group = groups_with(dg, f"layers.{layer}.self_attn.k_proj.weight", 0)[0]
        assert group.prunable and group.channels == 2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(8, 32), nn.Linear(16, 8), nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        a, b = h.split(16, dim=-1)  # a gated unit
        h = self.fc2(torch.cat([F.gelu(a) * b, b[..., 4:12]], -1)[..., :16])
        return self.head(self.norm(x + h)[:, 0])


def test_exported_graph_literals_are_rewritten_by_shrink():
    dg, small = check_model(MLP(), torch.randn(2, 5, 8), capture="export")
    assert not dg.facts.mac_mismatch
    assert any(g.prunable for g in dg.groups)


class Checked(nn.Module):
    """Input validation symbolic tracing cannot follow (``isinstance`` of a proxy)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError("expected a tensor")
        return self.fc2(torch.relu(self.fc1(x)))


def test_auto_falls_back_to_export_when_tracing_fails():
    x = torch.randn(3, 6)
    with pytest.raises(hfp_fx.TraceError):
        hfp_fx.dependency_graph(Checked(), x, capture="fx")
    dg, _ = check_model(Checked(), x, capture="auto")
    assert [g.channels for g in dg.prunable_groups] == [16]
    assert hfp_fx.dependency_graph(Checked(), x).capture == "export"  # "auto" is the default


def test_auto_keeps_symbolic_tracing_for_models_it_captures():
    x = torch.randint(0, 40, (2, 7))
    dg = hfp_fx.dependency_graph(TinyLlama("sdpa"), x, capture="auto")
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in dg.gm.graph.nodes)


def test_keyword_examples_and_unknown_capture():
    model, x = Checked(), torch.randn(3, 6)
    dg = hfp_fx.dependency_graph(model, {"x": x}, capture="export")
    assert [g.channels for g in dg.prunable_groups] == [16]
    assert [g.channels for g in hfp_fx.dependency_graph(model, {"x": x}, capture="auto").prunable_groups] == [16]
    with pytest.raises(ValueError, match="capture"):
        hfp_fx.dependency_graph(model, x, capture="dynamo")


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, groups=2), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.relu6(self.b2(self.c2(x)))
        x = x + self.c3(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_exported_cnn_prunes_like_the_traced_one():
    x = torch.randn(2, 3, 16, 16)
    dg, _ = check_model(CNN(), x, capture="export")
    traced = hfp_fx.dependency_graph(CNN(), x)
    assert sorted(g.channels for g in dg.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)


def test_exported_resnet_groups_and_counts_match_the_traced_ones(capsys):
    from hfp_fx.interop.cli import main

    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)
    exported = hfp_fx.dependency_graph(model, x, capture="export")
    traced = hfp_fx.dependency_graph(model, x)
    assert not exported.facts.mac_mismatch
    assert sorted(g.channels for g in exported.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)
    assert hfp_fx.CostModel(exported).counts() == hfp_fx.CostModel(traced).counts() == hfp_fx.count(model, x)
    assert main(["count", "torchvision:resnet18", "--input-size", "1,3,64,64", "--capture", "export"]) == 0
    assert "11,689,512" in capsys.readouterr().out


# -- ATen ops the zoo sweeps met under capture="export" ------------------------------------
def _same_groups(model, x):
    dg, _ = check_model(model, x, capture="export")
    traced = hfp_fx.dependency_graph(model, x)
    assert sorted(g.channels for g in dg.prunable_groups) == sorted(g.channels for g in traced.prunable_groups)
    return dg


class MHABlock(nn.Module):
    """``nn.MultiheadAttention`` exports as ``aten.unflatten`` of its packed q/k/v projection."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x + self.attn(x, x, x, need_weights=False)[0])


def test_exported_multihead_attention_prunes_its_heads():
    dg = _same_groups(MHABlock(), torch.randn(2, 5, 16))
    assert 4 in [g.channels for g in dg.prunable_groups]  # the heads


def test_exported_swin_window_attention_prunes_heads_and_stream():
    """torchvision's shifted windows: ``roll``, ``pad``, the mask built with ``new_zeros``, and the
    relative-position bias ``table[index]`` (``aten.index.Tensor``) sliced with the heads."""
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[3, 3],
                            num_classes=5)
    dg = _same_groups(model, torch.randn(1, 3, 40, 40))  # 10x10 tokens: padded to whole windows
    assert any(g.channels == 2 for g in dg.prunable_groups)  # the first stage's heads
    assert 1 in dg.facts.params["features.1.0.attn.relative_position_bias_table"]  # (entries, heads)


class Shuffled(nn.Module):
    """``einsum(eq, [q, k])`` with packed operands, ``chunk``, ``unbind``, ``swapaxes``, ``movedim``,
    a gather ``x[:, index]`` along tokens, ``zeros_like`` and an in-place dropout."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 6)
        self.drop = nn.Dropout(0.1, inplace=True)
        self.register_buffer("index", torch.tensor([3, 1, 0, 2, 4]))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (2, 12)).transpose(1, 2).chunk(3, dim=-1)  # (B, heads, T, 4)
        attn = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        out = out.movedim(1, 2).flatten(2)[:, self.index]  # (B, T, 8)
        out = out + torch.zeros_like(out)
        a, b = out.unflatten(-1, (2, 4)).swapaxes(1, 2).unbind(1)
        return self.proj(self.drop(torch.cat([a, b], -1)))


def test_exported_einsum_chunk_unbind_index_and_inplace_dropout():
    x = torch.randn(2, 5, 8)
    dg, _ = check_model(Shuffled(), x, capture="export")
    # q/k channels (united by the einsum) and v channels; symbolic tracing fixes v at `[:, self.index]`
    assert sorted(g.channels for g in dg.prunable_groups) == [4, 4]
    targets = {str(n.target) for n in dg.gm.graph.nodes}
    assert {"aten.einsum.default", "aten.chunk.default", "aten.index.Tensor"} <= targets
    assert not any("unsupported" in r for g in dg.groups for r in g.reasons)


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = self.c1(x)
        h = torch.roll(h, shifts=(1, -1), dims=(2, 3)) + torch.roll(h, 2, 1)  # the second rolls channels
        return self.c2(h)


def test_roll_keeps_channels_unless_it_rolls_them():
    x = torch.randn(1, 3, 6, 6)
    for capture in ("fx", "export"):
        dg = hfp_fx.dependency_graph(Rolled(), x, capture=capture)
        assert not dg.prunable_groups
        assert any("rolls the channel dim" in r for g in dg.groups for r in g.reasons)


class TimmOps(nn.Module):
    """What timm models export: ``padding="same"`` convs (``aten.conv2d.padding``), a one-group and a
    four-group ``F.group_norm``, ConvNeXt-V2's GRN ``addcmul``, and a ``stack`` of two branches."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.n1, self.n2 = nn.GroupNorm(1, 8), nn.GroupNorm(4, 8)
        self.gamma, self.beta = nn.Parameter(torch.randn(1, 8, 1, 1)), nn.Parameter(torch.randn(1, 8, 1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.group_norm(self.c1(x), 1, self.n1.weight, self.n1.bias)
        h = h + F.gelu(F.group_norm(self.c2(h), 4, self.n2.weight, self.n2.bias))
        nx = h.norm(p=2, dim=(2, 3), keepdim=True)
        h = torch.addcmul(self.beta, self.gamma, h * nx) + h
        h = torch.stack([h, h.relu()], 0).sum(0)
        return self.fc(h.mean((2, 3)))


def test_exported_timm_ops_prune_like_the_traced_ones():
    x = torch.randn(2, 3, 8, 8)
    dg = _same_groups(TimmOps(), x)
    assert dg.prunable_groups and not any("unsupported" in r for g in dg.groups for r in g.reasons)
    gm = hfp_fx.dependency_graph(TimmOps(), x, capture="export").gm
    assert {"aten.conv2d.padding", "aten.group_norm.default", "aten.addcmul.default", "aten.stack.default"} <= \
        {str(n.target) for n in gm.graph.nodes}


class GroupNormed(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.c1, self.norm, self.c2 = nn.Conv2d(3, 8, 1), nn.GroupNorm(groups, 8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(F.group_norm(self.c1(x), self.norm.num_groups, self.norm.weight, self.norm.bias)))


@pytest.mark.parametrize("groups", [1, 4])
def test_functional_group_norm_prunes_whole_groups_or_keeps_the_statistics(groups):
    x = torch.randn(2, 3, 5, 5)
    for capture in ("fx", "export"):
        dg, small = check_model(GroupNormed(groups), x, capture=capture)
        assert [g.channels for g in dg.prunable_groups] == [groups if groups > 1 else 8]  # units: whole groups


class QKNormAttention(nn.Module):
    """Gemma-4-style attention (timm ``gemma4_vit``): clamps with tensor bounds around the
    projections, an RMSNorm over ``head_dim`` per head (q/k norm, shared weight), position
    tables built under ``torch.no_grad()`` with a device literal, and attention through SDPA."""

    def __init__(self, dim=12, heads=3, head_dim=4):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.register_buffer("lo", torch.tensor(-3.0))
        self.register_buffer("hi", torch.tensor(3.0))
        self.q, self.k, self.v = (nn.Linear(dim, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, dim)
        self.q_norm, self.k_norm = nn.Parameter(torch.randn(head_dim)), nn.Parameter(torch.randn(head_dim))
        self.register_buffer("freq", torch.rand(head_dim))

    def forward(self, x):
        b, n, _ = x.shape
        x = torch.clamp(x, self.lo, self.hi)
        q = self.q(x).view(b, n, self.heads, self.head_dim)
        k = self.k(x).view(b, n, self.heads, self.head_dim)
        v = self.v(x).view(b, n, self.heads, self.head_dim)
        q = F.rms_norm(q, (self.head_dim,), self.q_norm, 1e-6)
        k = F.rms_norm(k, (self.head_dim,), self.k_norm, 1e-6)
        with torch.no_grad():
            pos = torch.arange(n, dtype=torch.float32).to(x.device)[:, None] * self.freq
        q, k = q * pos.cos()[:, None], k * pos.cos()[:, None]
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0)
        return self.o(torch.clamp(h.transpose(1, 2).reshape(b, n, -1), min=self.lo))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_per_head_rms_norm_over_head_dim_prunes_whole_heads(capture):
    dg, small = check_model(QKNormAttention(), torch.randn(2, 5, 12), capture=capture)
    assert [g.channels for g in dg.prunable_groups if "q.weight" in str(g)] == [3]  # heads, not head_dim
    assert not any("unsupported" in r for g in dg.groups for r in g.reasons)


def test_a_real_run_after_a_meta_failure_in_a_no_grad_block_keeps_grad_mode_and_counts(monkeypatch):
    """An op without a meta kernel inside the exported ``with torch.no_grad():`` block: torch's
    ``wrap_with_set_grad_enabled`` does not restore grad mode when its body raises, and the real
    run that follows dispatches SDPA to the CPU kernel ``FlopCounterMode`` has no formula for."""
    import hfp_fx.capture.shapes

    def no_meta_kernel(self, n):
        raise NotImplementedError("no meta kernel")

    monkeypatch.setattr(hfp_fx.capture.shapes._MetaGraph, "run_node", no_meta_kernel)
    check_model(QKNormAttention(), torch.randn(2, 5, 12), capture="export")  # MACs as the cost model's
    assert torch.is_grad_enabled()


class LatentPool(nn.Module):
    """A learned query (a parameter's view) fed to a Linear: timm's attention pooling."""

    def __init__(self):
        super().__init__()
        self.latent, self.fc1, self.q = nn.Parameter(torch.randn(1, 1, 8)), nn.Linear(8, 16), nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        q = self.q(self.latent.expand(x.shape[0], -1, -1))
        return self.fc2(torch.relu(self.fc1(x)) * q)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_counts_and_shrink_work_with_grad_mode_off(capture):
    model, x = LatentPool().eval(), torch.randn(2, 3, 8)
    with torch.no_grad():
        dense = hfp_fx.count(model, x, capture=capture)
        dg = hfp_fx.dependency_graph(model, x, capture=capture)
        cm = hfp_fx.CostModel(dg)
        keep = {g.id: list(range(g.channels // 2)) for g in dg.prunable_groups}
        small = hfp_fx.shrink(dg, keep=keep)
        assert_close(hfp_fx.mask(dg, keep=keep)(x), small(x))
        assert cm.counts() == dense
        assert cm.counts(dg.alive(keep)[cm.unit_ids]) == hfp_fx.count(small, x)
    assert torch.is_grad_enabled() and dg.prunable_groups


class LinearNormed(nn.Module):
    """LeViT's ``LinearNorm``: a BatchNorm1d over ``(B*N, C)`` whose result is ``reshape_as(x)``;
    ``shaped_by_input``: the second reshape takes its shape from the (unpruned) input instead."""

    def __init__(self, shaped_by_input=False):
        super().__init__()
        self.shaped_by_input = shaped_by_input
        self.fc1, self.bn1, self.fc2, self.bn2 = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 6), nn.BatchNorm1d(6)
        self.fc3, self.head = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        h = torch.relu(self.bn1(h.flatten(0, 1)).reshape_as(h))
        y = self.fc2(h)
        y = self.bn2(y.flatten(0, 1)).reshape_as(x if self.shaped_by_input else y)
        h2 = self.fc3(y)
        return self.head(h2.flatten(0, 1).reshape_as(h) if self.shaped_by_input else h2)


@pytest.mark.parametrize("shaped_by_input", [False, True])
def test_exported_reshape_as_follows_the_shape_source(shaped_by_input):
    dg, _ = check_model(LinearNormed(shaped_by_input), torch.randn(2, 5, 6), capture="export")
    assert any(n.target is torch.ops.aten.reshape_as.default for n in dg.gm.graph.nodes)
    widths = sorted(g.channels for g in dg.prunable_groups)
    # fc1/bn1 and fc3 are tied through ``reshape_as(h)``; the 6 channels of the input's width are not prunable
    assert widths == ([16] if shaped_by_input else [6, 16, 16])
