"""Transformers: the normalised residual stream, attention heads, HFP training on both."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

import hfp_fx
from helpers import assert_close, check_model, train_then_finalize


def groups_with(dg, target, dim=None):
    """Groups with a member on parameter ``target`` (and ``dim``)."""
    return [g for g in dg.groups if any(m.target == target and (dim is None or m.dim == dim) for m in g.members)]


class Block(nn.Module):
    """Pre-norm transformer block over a linear stem; ``norm`` picks the normalisation."""

    def __init__(self, norm="layer", d=16, heads=4, hidden=32, post_norm=False, batch_first=True):
        super().__init__()
        make = {"layer": lambda: nn.LayerNorm(d), "rms": lambda: nn.RMSNorm(d),
                "rms_eps": lambda: nn.RMSNorm(d, eps=1e-3), "rms_noaffine": lambda: nn.RMSNorm(d, elementwise_affine=False),
                "layer_nobias": lambda: nn.LayerNorm(d, bias=False)}[norm]
        self.stem = nn.Linear(6, d)
        self.n1, self.n2, self.n3 = make(), make(), make()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)
        self.post_norm, self.batch_first = post_norm, batch_first

    def forward(self, x):
        x = self.stem(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.post_norm:  # BERT-style: the norm's output is the stream
            x = self.n1(x + self.attn(x, x, x, need_weights=False)[0])
            x = self.n2(x + self.fc2(F.gelu(self.fc1(x))))
        else:
            h = self.n1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            x = x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        return self.head(self.n3(x))


NORMS = ["layer", "rms", "rms_eps", "rms_noaffine", "layer_nobias"]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("post_norm", [False, True], ids=["pre", "post"])
def test_normalised_residual_stream_and_heads_prune_exactly(norm, post_norm):
    dg, small = check_model(Block(norm, post_norm=post_norm), torch.randn(2, 5, 6))
    stream = groups_with(dg, "stem.weight", 0)[0]
    assert stream.prunable and stream.channels == 16
    heads = groups_with(dg, "attn.in_proj_weight", 0)[0]
    assert heads.prunable and heads.channels == 4  # whole heads, not their rows
    rows = [m for m in heads.members if m.target == "attn.in_proj_weight"][0]
    assert len(rows.offsets) == 3 * 16  # q, k and v rows of every head


@pytest.mark.parametrize("norm", ["rms", "rms_eps", "rms_noaffine"])
def test_pruned_rmsnorm_is_a_standard_rmsnorm_with_rescaled_eps_and_weight(norm):
    model = Block(norm).eval()
    x = torch.randn(2, 5, 6)
    dg = hfp_fx.dependency_graph(model, x)
    stream = groups_with(dg, "stem.weight", 0)[0]
    keep = {stream.id: range(0, 16, 2)}  # d' = d / 2
    small = hfp_fx.shrink(dg, keep=keep)
    rms = [n for n in small.graph.nodes if n.target is F.rms_norm]
    assert len(rms) == 3
    eps = model.n1.eps if model.n1.eps is not None else torch.finfo(torch.float32).eps
    assert all(n.args[1] == (8,) and math.isclose(n.args[3], eps * 2) for n in rms)
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=keep)(x), small(x))


def test_layernorm_keeps_the_statistics_of_the_original_width():
    """The pruned LayerNorm is not a LayerNorm over the kept channels: the removed ones count as zeros."""
    model = Block("layer").eval()
    x = torch.randn(2, 5, 6)
    dg = hfp_fx.dependency_graph(model, x)
    stream = groups_with(dg, "stem.weight", 0)[0]
    keep = {stream.id: range(0, 16, 2)}
    small = hfp_fx.shrink(dg, keep=keep)
    assert not any(isinstance(m, nn.LayerNorm) for n in small.graph.nodes if n.op == "call_module"
                   for m in [small.get_submodule(n.target)])
    with torch.no_grad():
        h = small.stem(x)
        d = 16
        mean = h.sum(-1, keepdim=True) / d
        var = ((h - mean) ** 2).sum(-1, keepdim=True) / d + (d - 8) / d * mean ** 2
        expected = (h - mean) / torch.sqrt(var + model.n1.eps) * small.n1.weight + small.n1.bias
        naive = F.layer_norm(h, (8,), small.n1.weight, small.n1.bias, model.n1.eps)
        padded = torch.zeros(2, 5, 16)
        padded[..., ::2] = h
        dense_ln = F.layer_norm(padded, (16,), eps=model.n1.eps)[..., ::2] * small.n1.weight + small.n1.bias
    assert_close(expected, dense_ln)
    assert not torch.allclose(naive, dense_ln, atol=1e-3)


class HandWritten(nn.Module):
    """RMSNorm and LayerNorm written with tensor ops, F.normalize and a norm over the channels."""

    def __init__(self, d=16):
        super().__init__()
        self.stem, self.fc, self.head = nn.Linear(6, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        x = self.stem(x)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        x = x + self.fc(h)
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        y = (x - u) / torch.sqrt(s + 1e-5)
        return self.head(F.normalize(y, dim=-1) * torch.norm(y, dim=-1, keepdim=True))


def test_hand_written_norms_prune_exactly():
    dg, small = check_model(HandWritten(), torch.randn(2, 5, 6))
    assert groups_with(dg, "stem.weight", 0)[0].prunable
    # means over the pruned channels became sum / original width
    assert not any(n.target in ("mean", torch.mean) for n in small.graph.nodes)


def test_max_over_the_channels_stays_fixed_with_a_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h - h.amax(-1, keepdim=True))

    dg = hfp_fx.dependency_graph(M(), torch.randn(2, 4))
    group = groups_with(dg, "a.weight", 0)[0]
    assert not group.prunable and "reduces over the channel dim" in group.reason


class Attention(nn.Module):
    def __init__(self, batch_first=True, kdim=None, bias=True, mask=None, dropout=0.0):
        super().__init__()
        self.stem = nn.Linear(4, 16)
        self.memory = nn.Linear(16, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias,
                                          dropout=dropout)
        self.head = nn.Linear(16, 3)
        self.batch_first, self.mask = batch_first, mask
        self.register_buffer("causal", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))
        self.register_buffer("additive", torch.randn(5, 5))
        self.register_buffer("padding", torch.tensor([[False] * 4 + [True], [False] * 5]))

    def forward(self, x):
        h = self.stem(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        kv = self.memory(h) if self.memory is not None else h
        kwargs = {None: {}, "causal": {"attn_mask": self.causal, "is_causal": True},
                  "additive": {"attn_mask": self.additive}, "bool": {"attn_mask": self.causal},
                  "padding": {"key_padding_mask": self.padding}}[self.mask]
        y = self.attn(h, kv, kv, need_weights=False, **kwargs)[0]
        return self.head(F.gelu(y))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "kdim"])
@pytest.mark.parametrize("mask", [None, "causal", "additive", "bool", "padding"])
def test_multihead_attention_prunes_heads_and_channels_exactly(batch_first, kdim, mask):
    torch.manual_seed(0)
    dg, small = check_model(Attention(batch_first, kdim, mask=mask), torch.randn(2, 5, 4))
    heads = groups_with(dg, "attn.out_proj.weight", 1)[0]
    assert heads.prunable and heads.channels == 4
    assert groups_with(dg, "stem.weight", 0)[0].prunable
    assert all(not isinstance(small.get_submodule(n.target), nn.MultiheadAttention)
               for n in small.graph.nodes if n.op == "call_module")


def test_multihead_attention_without_bias_with_dropout_trains_after_shrink():
    torch.manual_seed(0)
    dg, small = check_model(Attention(bias=False, dropout=0.2), torch.randn(2, 5, 4))
    small.train()
    x = torch.randn(2, 5, 4)
    assert not torch.equal(small(x), small(x))  # attention dropout is on in training mode
    small.eval()
    assert torch.equal(small(x), small(x))


def test_multihead_attention_left_whole_says_why():
    class ReadsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.attn = nn.Linear(4, 16), nn.MultiheadAttention(16, 2)

        def forward(self, x):
            h = self.stem(x)
            y, w = self.attn(h, h, h)
            return y, w

    class CrossPacked(ReadsWeights):
        def forward(self, x):
            h = self.stem(x)
            return self.attn(h, h * 2, h, need_weights=False)[0]

    for model, why in ((ReadsWeights(), "attention weights are read"), (CrossPacked(), "packed in_proj_weight")):
        dg, _ = check_model(model, torch.randn(5, 4))
        group = groups_with(dg, "stem.weight", 0)[0]
        assert not group.prunable and why in group.reason


def test_prepare_train_finalize_on_a_transformer_block_is_exact():
    torch.manual_seed(0)
    model, x = Block("layer"), torch.randn(8, 5, 6)
    y = torch.randint(0, 3, (8, 5))
    prepared = hfp_fx.prepare(model, x, {"macs": 0.5}, lambda_init=0.02)
    small = train_then_finalize(prepared, x, lambda out: F.cross_entropy(out.flatten(0, 1), y.flatten()), 60)
    report = small.meta["hfp"]
    assert report.achieved.macs <= report.target.macs
    kept = {gid: len(v) for gid, v in report.keep.items()}
    assert kept[groups_with(prepared.hfp_config.graph, "stem.weight", 0)[0].id] <= 16


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(norm=st.sampled_from(NORMS), heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 3]),
       post_norm=st.booleans(), batch_first=st.booleans(), seed=st.integers(0, 10_000),
       ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_random_transformer_blocks_shrink_equals_mask(norm, heads, head_dim, post_norm, batch_first, seed, ratio):
    torch.manual_seed(seed)
    d = heads * head_dim
    model = Block(norm, d=d, heads=heads, hidden=2 * d, post_norm=post_norm, batch_first=batch_first)
    check_model(model, torch.randn(2, 3, 6), seed=seed, ratio=ratio, train_mode=False)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder``: torch's own layers are traced through (their fast-path checks
    follow the example), so the decomposed attention, the norms and the feed-forward prune."""

    def __init__(self, norm_first):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post", "pre"])
def test_torch_transformer_encoder_prunes_exactly(norm_first):
    with pytest.warns(UserWarning, match="specialised"):
        dg, _ = check_model(TorchEncoder(norm_first), torch.randn(2, 5, 6))
    assert groups_with(dg, "inp.weight", 0)[0].prunable
    for layer in range(2):
        heads = groups_with(dg, f"encoder.layers.{layer}.self_attn.out_proj.weight", 1)[0]
        assert heads.prunable and heads.channels == 4


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GQAttention(nn.Module):
    """Llama-style attention: RoPE, grouped-query heads repeated three ways."""

    def __init__(self, d, heads, kv_heads, repeat):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)
        self.repeat = repeat

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.num_heads // self.num_key_value_heads
        if self.repeat == "expand":  # Hugging Face's repeat_kv
            k, v = (t[:, :, None].expand(b, self.num_key_value_heads, groups, n, self.head_dim)
                    .reshape(b, self.num_heads, n, self.head_dim) for t in (k, v))
        elif self.repeat == "interleave":
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        gqa = {"enable_gqa": True} if self.repeat == "sdpa" else {}
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class TinyLlama(nn.Module):
    def __init__(self, repeat, vocab=40, d=24, heads=6, kv_heads=2, hidden=40, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "input_layernorm": nn.RMSNorm(d, eps=1e-6), "self_attn": GQAttention(d, heads, kv_heads, repeat),
            "post_attention_layernorm": nn.RMSNorm(d, eps=1e-6), "gate_proj": nn.Linear(d, hidden, bias=False),
            "up_proj": nn.Linear(d, hidden, bias=False), "down_proj": nn.Linear(hidden, d, bias=False)})
            for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        head_dim = d // heads
        freqs = torch.outer(torch.arange(16.0), 1.0 / 10000 ** (torch.arange(0, head_dim, 2.0) / head_dim))
        angles = torch.cat((freqs, freqs), -1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        cos, sin = self.cos[: ids.shape[1]], self.sin[: ids.shape[1]]
        for layer in self.layers:
            x = x + layer["self_attn"](layer["input_layernorm"](x), cos, sin)
            h = layer["post_attention_layernorm"](x)
            x = x + layer["down_proj"](F.silu(layer["gate_proj"](h)) * layer["up_proj"](h))
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("repeat", ["expand", "interleave", "sdpa"])
def test_grouped_query_attention_prunes_whole_kv_groups(repeat):
    torch.manual_seed(0)
    dg, small = check_model(TinyLlama(repeat), torch.randint(0, 40, (2, 7)))
    for layer in range(2):
        group = groups_with(dg, f"layers.{layer}.self_attn.k_proj.weight", 0)[0]
        assert group.prunable and group.channels == 2  # the two KV heads, each with its 3 query heads
        q_rows = [m for m in group.members if m.target == f"layers.{layer}.self_attn.q_proj.weight" and m.dim == 0]
        assert len(q_rows[0].offsets) == 24  # every query row belongs to some KV group
    stream = groups_with(dg, "embed_tokens.weight", 1)[0]
    assert stream.prunable  # the tied embedding / LM head dim under RMSNorm
    assert small.lm_head.weight is small.embed_tokens.weight


def test_prepare_finalize_on_torchvision_vit_prunes_heads_and_the_stream():
    from torchvision.models.vision_transformer import VisionTransformer
    from helpers import randomize_zero_weights

    torch.manual_seed(0)
    model = randomize_zero_weights(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                     hidden_dim=32, mlp_dim=64, num_classes=5))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    prepared = hfp_fx.prepare(model, x, {"macs": 0.4}, lambda_init=0.05)
    small = train_then_finalize(prepared, x, lambda out: F.cross_entropy(out, y), 20, lr=0.01)
    report = small.meta["hfp"]
    assert report.achieved.macs <= report.target.macs
    dg = prepared.hfp_config.graph
    stream = groups_with(dg, "class_token")[0]
    heads = groups_with(dg, "encoder.layers.encoder_layer_0.self_attention.out_proj.weight", 1)[0]
    assert stream.prunable and heads.prunable
    assert small.class_token.shape[-1] == len(report.keep.get(stream.id, range(32)))


class GroupNorms(nn.Module):
    """GroupNorm with four groups (pruned whole groups) and with one (MetaFormer's norm)."""

    def __init__(self, affine=True):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16, affine=affine)
        self.c2, self.gn1 = nn.Conv2d(16, 8, 1), nn.GroupNorm(1, 8, affine=affine)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.c2(torch.relu(self.gn(self.c1(x))))
        return self.fc(self.gn1(y).mean((2, 3)))


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_prunes_whole_groups_and_one_group_norms_like_layernorm(affine):
    dg, small = check_model(GroupNorms(affine), torch.randn(2, 3, 8, 8))
    groups = groups_with(dg, "c1.weight", 0)[0]
    assert groups.prunable and groups.channels == 4  # one unit per group of 4 channels
    assert groups_with(dg, "c2.weight", 0)[0].prunable
    keep = {groups.id: [0, 2]}
    assert hfp_fx.shrink(dg, keep=keep).gn.num_groups == 2


class EinsumAttention(nn.Module):
    """Attention written with ``einsum`` and a per-head relative-position table gathered by index."""

    def __init__(self):
        super().__init__()
        self.n_heads, self.inp = 4, nn.Linear(5, 8)
        self.qkv, self.proj = nn.Linear(8, 48), nn.Linear(16, 8)
        self.table = nn.Parameter(torch.randn(9, 4))
        self.register_buffer("index", torch.randint(0, 9, (25,)))
        self.weight = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        x = self.inp(x)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.n_heads, 4).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(5, 5, -1).permute(2, 0, 1).unsqueeze(0)
        attn = (torch.einsum("bhid,bhjd->bhij", q, k * 0.5) + bias).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, 16)
        return torch.einsum("bnc,cd->bnd", x + self.proj(out), self.weight)


def test_einsum_attention_with_a_gathered_bias_table_prunes_heads():
    dg, small = check_model(EinsumAttention(), torch.randn(2, 5, 5))
    heads = groups_with(dg, "table", 1)[0]
    assert heads.prunable and heads.channels == 4
    assert groups_with(dg, "weight", 0)[0].prunable  # contracted against a parameter: bound


@pytest.mark.parametrize("target", [{"params": 0.5}, {"macs": 0.3}])
def test_uniform_blocks_keep_the_same_widths_in_every_layer(target):
    torch.manual_seed(0)
    model, ids = TinyLlama("expand", layers=3), torch.randint(0, 40, (2, 7))
    free = hfp_fx.prune(model, ids, target).meta["hfp"]
    small = hfp_fx.prune(model, ids, target, uniform_blocks=True)
    report = small.meta["hfp"]
    dg = hfp_fx.dependency_graph(model, ids)
    for name, dim in (("self_attn.k_proj.weight", 0), ("gate_proj.weight", 0)):
        kept = {len(report.keep.get(g.id, range(g.channels)))
                for layer in range(3) for g in groups_with(dg, f"layers.{layer}.{name}", dim)}
        assert len(kept) == 1, (name, kept)  # one width for all three layers
    counts = hfp_fx.count(small, ids)
    for key, value in target.items():
        dense = getattr(hfp_fx.count(model, ids), key)
        assert getattr(counts, key) <= value * dense  # the budget is met ...
        assert getattr(counts, key) >= getattr(free.achieved, key) - 0.05 * dense  # ... about as closely
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=report.keep)(ids), small(ids))
