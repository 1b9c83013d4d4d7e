"""Shared checks: shrink equals mask, the cost model predicts the shrunk model, nothing mutated."""
import importlib.util
import io
from pathlib import Path

import torch

import hfp_fx


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, repr(model)


def assert_unchanged(model, snapshot):
    state, text = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"user model tensor {k} was modified"
    assert repr(model) == text, "user model structure was modified"


def random_keep(dg, seed=0, ratio=0.5):
    gen = torch.Generator().manual_seed(seed)
    return {g.id: sorted(torch.randperm(g.channels, generator=gen)[: max(1, int(g.channels * ratio))].tolist())
            for g in dg.prunable_groups}


def outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in outputs(v)]
    return []


def apply_plan(prepared, keep) -> None:
    """Switch the removed channels of ``keep`` (a finalize report's plan) off in ``prepared``.

    This is finalize's reference semantics: the prepared model with the removed channels' gates
    at zero.  With per-group widths the kept channels must be the top of the group's ranking.
    """
    hfp = prepared.hfp
    gates = hfp.gates
    assert gates.kind in ("width", "channel"), gates.kind
    with torch.no_grad():
        if gates.kind == "channel":
            gates.threshold = 0.0  # channels the projection added back count as kept whatever their gate
        for i, gid in enumerate(hfp.group_ids):
            lo, hi = hfp.offsets[i], hfp.offsets[i + 1]
            kept = torch.as_tensor(keep.get(gid, range(hi - lo)), dtype=torch.long)
            if gates.kind == "width":
                ranks = sorted(int(r) for r in gates.rank[lo:hi][kept])
                assert ranks == list(range(len(ranks))), f"{gid}: kept channels are not the top-ranked ones"
                gates.width[i] = len(ranks) / (hi - lo)
            else:
                g = gates.gate_of(gid)
                off = torch.ones_like(g, dtype=torch.bool)
                off[kept] = False
                g[off] = 0.0


def assert_close(a, b, rtol=1e-4, atol=1e-5):
    for x, y in zip(outputs(a), outputs(b)):
        assert x.shape == y.shape
        scale = float(x.abs().max()) + 1e-12
        assert float((x - y).abs().max()) <= atol + rtol * scale, float((x - y).abs().max()) / scale


def randomize_zero_weights(model):
    """Small random values for weight matrices initialised to zero (torchvision's ViT head):
    an output that ignores the pruned channels would make every comparison pass."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def check_model(model, x, seed=0, ratio=0.5, train_mode=True, capture="fx"):
    """Prune a random ``ratio`` of every group and check every guarantee of the core API.

    ``x``: a tensor, a tuple or a dict of keyword tensors (the graph takes its values positionally).
    """
    model = randomize_zero_weights(model.eval())
    inputs = tuple(x.values()) if isinstance(x, dict) else x if isinstance(x, tuple) else (x,)
    snap = state_snapshot(model)
    dg = hfp_fx.dependency_graph(model, x, capture=capture)
    assert not dg.facts.mac_mismatch, dg.facts.mac_mismatch
    cm = hfp_fx.CostModel(dg)
    dense = hfp_fx.count(model, x, capture=capture)
    assert cm.counts() == dense
    keep = random_keep(dg, seed, ratio)
    masked = hfp_fx.mask(dg, keep=keep).eval()
    small = hfp_fx.shrink(dg, keep=keep).eval()
    small.graph.lint()
    assert "def forward" in small.code
    with torch.no_grad():
        assert_close(masked(*inputs), small(*inputs))
    predicted = cm.counts(dg.alive(keep)[cm.unit_ids])
    assert predicted == hfp_fx.count(small, inputs)
    if keep and any(len(v) < dg.group(k).channels for k, v in keep.items()):
        assert predicted.params < dense.params
    if train_mode:
        small.train()
        out = small(*inputs)
        loss = sum(o.float().sum() for o in outputs(out))
        loss.backward()
        small.eval()
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert_close(small(*inputs), loaded(*inputs), rtol=0, atol=0)
    assert_unchanged(model, snap)
    return dg, small


def train_then_finalize(prepared, x, loss_of, steps, lr=0.02):
    """``steps`` SGD steps on ``loss_of(prepared(x)) + complexity_loss``, then ``finalize``; checks
    finalize's reference semantics (the prepared model with the removed channels' gates at zero)
    and returns the pruned model."""
    opt = torch.optim.SGD(prepared.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        loss = loss_of(prepared(x)) + hfp_fx.complexity_loss(prepared)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()
    small = hfp_fx.finalize(prepared).eval()
    apply_plan(prepared, small.meta["hfp"].keep)
    with torch.no_grad():
        assert_close(prepared(x), small(x))
    return small



def load_script(path: Path, name: str):
    """Import the script at ``path`` (a benchmark or an example, not a package module) as ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
