"""torchvision Swin V1 / V2: attention heads are prunable units and pruning them is exact.

``shifted_window_attention``, ``_get_relative_position_bias`` and ``_patch_merging_pad`` are
``torch.fx.wrap``-ped by torchvision, so they reach the graph as single nodes; the rules in
``passes/rules_swin.py`` give them coupling rules, and a pruned attention calls
``hfp_fx.functional.window_attention`` instead of torchvision's function.
"""
import itertools

import pytest
import torch
from torchvision.models import swin_transformer as tv_swin
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

import hfp_fx
from hfp_fx.functional import window_attention
from helpers import assert_close, check_model, random_keep


def tiny_swin(v2=False, window=(4, 4), depths=(2, 2), heads=(2, 4), drop_path=0.0):
    torch.manual_seed(0)
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=list(depths), num_heads=list(heads),
                           window_size=list(window), stochastic_depth_prob=drop_path, num_classes=10, **extra)


CASES = {  # name: (model kwargs, input side); 40 and 44 need padding to whole windows
    "v1": (dict(), 32),
    "v1_pad": (dict(), 44),
    "v1_rect": (dict(window=(4, 2)), 40),
    "v2": (dict(v2=True), 32),
    "v2_pad_rect": (dict(v2=True, window=(2, 4), depths=(1, 2)), 44),
}


def _attention_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (tv_swin.shifted_window_attention, window_attention)]


def _head_groups(dg):
    """Attention block path -> the prunable group holding its heads (its ``qkv.weight`` rows)."""
    found = {}
    for g in dg.prunable_groups:
        for m in g.members:
            if m.target.endswith("attn.qkv.weight") and m.dim == 0:
                found[m.target[: -len(".qkv.weight")]] = g
    return found


@pytest.mark.parametrize("name", sorted(CASES))
def test_swin_heads_are_prunable_and_shrink_equals_mask(name):
    kwargs, side = CASES[name]
    model = tiny_swin(**kwargs)
    dg, small = check_model(model, torch.randn(1, 3, side, side))
    blocks = {path: mod for path, mod in model.named_modules()
              if isinstance(mod, tv_swin.ShiftedWindowAttention)}
    groups = _head_groups(dg)
    assert set(groups) == set(blocks)
    for path, attn in blocks.items():
        g = groups[path]
        heads, head_dim = attn.num_heads, attn.qkv.in_features // attn.num_heads
        assert g.channels == heads
        members = {(m.target, m.dim): m for m in g.members}
        rows = members[(f"{path}.qkv.weight", 0)].offsets
        assert len(rows) == 3 * heads * head_dim and len(rows) % head_dim == 0
        assert (f"{path}.proj.weight", 1) in members
        if kwargs.get("v2"):
            assert (f"{path}.logit_scale", 0) in members
            assert (f"{path}.cpb_mlp.2.weight", 0) in members
        else:
            assert (f"{path}.relative_position_bias_table", 1) in members
    # shifted windows occur in every case (the second block of a stage shifts)
    assert any(n.kwargs.get("shift_size", [0, 0]) != [0, 0] for n in _attention_nodes(dg.facts.gm))


def _keep_some_heads(dg, seed):
    """A random keep that removes at least one head of every attention block."""
    keep = random_keep(dg, seed=seed, ratio=0.5)
    for g in _head_groups(dg).values():
        assert len(keep[g.id]) < g.channels
    return keep


@pytest.mark.parametrize("name,train", list(itertools.product(["v1_pad", "v2_pad_rect"], [False, True])))
def test_removing_heads_equals_mask_in_train_and_eval(name, train):
    """Traced in train mode the attention runs its dropout branches (p=0) and the graph is exact too."""
    kwargs, side = CASES[name]
    model = tiny_swin(**kwargs).train(train)
    x = torch.randn(2, 3, side, side)
    dg = hfp_fx.dependency_graph(model, x)
    assert not dg.facts.mac_mismatch
    for seed in range(2):
        keep = _keep_some_heads(dg, seed)
        masked, small = hfp_fx.mask(dg, keep=keep).train(train), hfp_fx.shrink(dg, keep=keep).train(train)
        with torch.no_grad():
            assert_close(masked(x), small(x), rtol=1e-4, atol=1e-5)


def test_only_changed_attention_leaves_torchvision():
    """A block whose heads and channels are all kept still calls torchvision's own function."""
    model = tiny_swin(v2=True)
    x = torch.randn(1, 3, 32, 32)
    dg = hfp_fx.dependency_graph(model, x)
    groups = _head_groups(dg)
    pruned_block = "features.3.1.attn"
    g = groups[pruned_block]
    small = hfp_fx.shrink(dg, keep={g.id: [0, 2]})
    targets = {n.name: n.target for n in _attention_nodes(small)}
    assert sum(t is window_attention for t in targets.values()) == 1
    assert sum(t is tv_swin.shifted_window_attention for t in targets.values()) == len(groups) - 1
    node = next(n for n in _attention_nodes(small) if n.target is window_attention)
    assert node.kwargs["num_heads"] == 2
    assert node.kwargs["scale"] == pytest.approx((32 // 4) ** -0.5)  # the dense head dim's scale
    assert small.get_parameter(f"{pruned_block}.logit_scale").shape == (2, 1, 1)
    # MLP-only pruning does not touch the attention calls either
    mlp = next(gr for gr in dg.prunable_groups if any(m.target.endswith("mlp.0.weight") and m.dim == 0
                                                      for m in gr.members))
    untouched = hfp_fx.shrink(dg, keep={mlp.id: [0]})
    assert all(n.target is tv_swin.shifted_window_attention for n in _attention_nodes(untouched))
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep={g.id: [0, 2]})(x), small(x))


def test_pruned_swin_traces_again():
    """The pruned model's ``window_attention`` is one node with the same rule: prune it once more."""
    model = tiny_swin()
    x = torch.randn(1, 3, 32, 32)
    dg = hfp_fx.dependency_graph(model, x)
    small = hfp_fx.shrink(dg, keep=random_keep(dg, seed=1)).eval()
    dg2, smaller = check_model(small, x)
    assert len(_head_groups(dg2)) == len(_head_groups(dg))
    assert all(n.target is window_attention for n in _attention_nodes(smaller))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_prune_reaches_macs_target(v2, tmp_path):
    model, x = tiny_swin(v2=v2).eval(), torch.randn(1, 3, 32, 32)
    dense = hfp_fx.count(model, x)
    small = hfp_fx.prune(model, x, {"macs": 0.5}).eval()
    achieved = hfp_fx.count(small, x)
    assert achieved.macs <= 0.5 * dense.macs
    assert achieved.macs == small.meta["hfp"].achieved.macs
    dg = hfp_fx.dependency_graph(model, x)
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=small.meta["hfp"].keep).eval()(x), small(x))
    hfp_fx.save(small, tmp_path / "swin.pt")  # loading re-traces and re-shrinks the dense model
    again = hfp_fx.load(tmp_path / "swin.pt", lambda: tiny_swin(v2=v2), x).eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


@pytest.mark.parametrize("shape,window,shift,v2", [
    ((8, 8), (4, 4), (2, 2), False), ((7, 10), (4, 2), (2, 1), True), ((3, 9), (4, 4), (2, 2), False),
    ((6, 6), (2, 4), (0, 0), True)])
def test_window_attention_equals_torchvision(shape, window, shift, v2):
    """Same sizes as the dense model: the replacement computes torchvision's function."""
    torch.manual_seed(0)
    C, heads, N = 16, 2, window[0] * window[1]
    x = torch.randn(2, *shape, C)
    qkv_w, proj_w, qkv_b, proj_b = torch.randn(3 * C, C), torch.randn(C, C), torch.randn(3 * C), torch.randn(C)
    bias, scale = torch.randn(1, heads, N, N), torch.randn(heads, 1, 1) if v2 else None
    args = (x, qkv_w, proj_w, bias, list(window), heads, list(shift))
    kw = dict(qkv_bias=qkv_b, proj_bias=proj_b, logit_scale=scale, training=False)
    assert_close(tv_swin.shifted_window_attention(*args, **kw), window_attention(*args, **kw))


def test_prepare_gates_heads_and_finalize():
    """HFP gates: the head gate scales ``proj_weight``'s columns; gates at 1 change nothing, and
    finalize with a head's gate at 0 equals the reference mask."""
    from helpers import apply_plan

    model, x = tiny_swin(v2=True).eval(), torch.randn(2, 3, 32, 32)
    prepared = hfp_fx.prepare(model, x, hfp_fx.Target(macs=0.5)).eval()
    with torch.no_grad():
        assert torch.equal(prepared(x), model(x))
    sites = {name for name, _ in prepared.hfp.sites.named_children()}
    assert {f"{n.name}_2" for n in _attention_nodes(prepared)} <= sites  # argument 2: proj_weight
    small = hfp_fx.finalize(prepared).eval()
    report = small.meta["hfp"]
    assert any(n.target is window_attention for n in _attention_nodes(small))
    apply_plan(prepared, report.keep)
    with torch.no_grad():
        assert_close(prepared(x), small(x))


class BareAttention(torch.nn.Module):
    """Window attention between two linear layers, no LayerNorm: its input and output channels
    are prunable too, so the replacement runs with input, inner and output widths all different.
    ``keywords=True`` passes every argument by keyword (``input=...``)."""

    def __init__(self, v2=False, keywords=False):
        super().__init__()
        cls = tv_swin.ShiftedWindowAttentionV2 if v2 else tv_swin.ShiftedWindowAttention
        self.inp = torch.nn.Linear(3, 16)
        self.attn = cls(16, [4, 4], [2, 2], num_heads=4)
        self.out = torch.nn.Linear(16, 5)
        self.keywords = keywords

    def forward(self, x):
        y = self.inp(x)
        if self.keywords:
            a = self.attn
            y = tv_swin.shifted_window_attention(
                input=y, qkv_weight=a.qkv.weight, proj_weight=a.proj.weight,
                relative_position_bias=a.get_relative_position_bias(), window_size=a.window_size,
                num_heads=a.num_heads, shift_size=a.shift_size, qkv_bias=a.qkv.bias, proj_bias=a.proj.bias,
                logit_scale=getattr(a, "logit_scale", None), training=self.training)
        else:
            y = self.attn(y)
        return self.out(torch.relu(y))


@pytest.mark.parametrize("v2,keywords", [(False, False), (True, False), (False, True), (True, True)])
def test_attention_input_and_output_channels(v2, keywords):
    torch.manual_seed(0)
    model, x = BareAttention(v2, keywords), torch.randn(2, 10, 7, 3)
    dg, small = check_model(model, x)
    owners = {(m.target, m.dim) for g in dg.prunable_groups for m in g.members}
    assert {("attn.qkv.weight", 1), ("attn.qkv.weight", 0), ("attn.proj.weight", 0)} <= owners
    assert _attention_nodes(small)[0].target is window_attention

    def group(target, dim):
        return next(g for g in dg.prunable_groups if any((m.target, m.dim) == (target, dim) for m in g.members))

    # 12 input channels, 1 head of 4 (inner width 4), 6 output channels
    keep = {group("attn.qkv.weight", 1).id: list(range(2, 14)), group("attn.qkv.weight", 0).id: [2],
            group("attn.proj.weight", 0).id: [0, 3, 5, 8, 13, 15]}
    small = hfp_fx.shrink(dg, keep=keep)
    assert small.get_parameter("attn.qkv.weight").shape == (12, 12)
    assert small.get_parameter("attn.proj.weight").shape == (6, 4)
    with torch.no_grad():
        assert_close(hfp_fx.mask(dg, keep=keep)(x), small(x))


class StoredBias(torch.nn.Module):
    """Window attention whose per-head bias is a stored ``(1, heads, N, N)`` tensor (sliced with the
    heads) or, ``computed=True``, made at run time without a head map (the heads are fixed)."""

    def __init__(self, computed):
        super().__init__()
        self.inp = torch.nn.Linear(3, 16)
        self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)
        self.bias = torch.nn.Parameter(torch.randn(1, 4, 16, 16))
        self.computed = computed

    def forward(self, x):
        bias = x.new_ones(1, 4, 16, 16) * 0.5 if self.computed else self.bias
        y = tv_swin.shifted_window_attention(self.inp(x), self.qkv.weight, self.proj.weight, bias, [4, 4], 4,
                                             [0, 0], qkv_bias=self.qkv.bias, proj_bias=self.proj.bias)
        return y.mean()


@pytest.mark.parametrize("computed", [False, True], ids=["stored", "computed"])
def test_per_head_bias_is_sliced_or_fixes_the_heads(computed):
    torch.manual_seed(0)
    model, x = StoredBias(computed), torch.randn(1, 8, 8, 3)
    dg = hfp_fx.dependency_graph(model, x)
    heads = [g for g in dg.groups if any(m.target == "qkv.weight" and m.dim == 0 for m in g.members)]
    assert len(heads) == 1
    if computed:
        assert not heads[0].prunable
        assert any("relative-position bias" in r for r in heads[0].reasons)
    else:
        assert heads[0].prunable and any(m.target == "bias" and m.dim == 1 for m in heads[0].members)
        check_model(model, x)
