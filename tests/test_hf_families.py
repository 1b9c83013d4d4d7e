"""Every Hugging Face decoder family of ``benchmarks/hf_families.py``: exact, prunable to a
params target, and back to its own class with the same logits, or a clear error.

Tiny random-init configurations (their 1-d weights drawn away from 1 / 0, so a norm rescaled
wrongly shows), the default capture (no ``capture=``).
"""
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hfp_fx  # noqa: E402
from helpers import apply_plan, load_script, train_then_finalize  # noqa: E402

F = load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "hf_families.py", "hf_families")

#: dense decoders that go back to their class; LayerNorm ones keep the stream whole (and the
#: heads, where the config derives the head dim from the hidden size)
ROUND_TRIP = ["llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3", "phi3", "olmo2", "phi",
              "stablelm", "gpt_neox", "gpt2", "opt", "falcon", "mixtral", "qwen2_moe", "qwen3_moe"]
MOE = {"mixtral": {"stream", "heads", "experts", "expert_mlp"},
       "qwen2_moe": {"stream", "heads", "experts", "expert_mlp", "mlp"},  # its shared expert is a plain MLP
       "qwen3_moe": {"stream", "heads", "experts", "expert_mlp"}}
LAYER_NORM = {"phi": False, "stablelm": True, "gpt_neox": True, "gpt2": True, "opt": True, "falcon": True}  # heads whole?
#: Falcon's multi-query attention has one key/value head, and query heads within a group go whole
KINDS = {**MOE, "falcon": {"stream", "mlp"}}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_shrink_equals_mask_on_a_random_half_of_every_group(family):
    model, x = F.build(family), F.example()
    dg = hfp_fx.dependency_graph(model, x)  # the default capture handles Hugging Face models
    assert dg.capture == "export"
    gen = torch.Generator().manual_seed(0)
    keep = {g.id: sorted(torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 2)].tolist())
            for g in dg.prunable_groups}
    with torch.no_grad():
        assert rel_err(hfp_fx.shrink(dg, keep=keep)(*x.values()), hfp_fx.mask(dg, keep=keep)(*x.values())) < 1e-5
    if family in ROUND_TRIP:  # the residual stream, heads and MLPs (the experts' widths) are all prunable
        assert {F.kind_of(g) for g in dg.prunable_groups} == KINDS.get(family, {"stream", "heads", "mlp"})


@pytest.mark.parametrize("family", ROUND_TRIP)
def test_uniform_blocks_prune_goes_back_to_its_class_with_the_same_logits(family, tmp_path):
    model, x = F.build(family), F.example()
    target = 0.7 if family in LAYER_NORM and family not in ("phi", "falcon") else 0.5
    small = hfp_fx.prune(model, x, {"params": target}, uniform_blocks=True)
    report = small.meta["hfp"]
    # the experts' widths and the stream go in multiples of 8 (torch._grouped_mm): coarser on a tiny model
    assert (0.8 if family in MOE else 0.9) * report.target.params <= report.achieved.params <= report.target.params
    stream = next(g for g in report.groups.values() if g.dense == 48 and "mlp" not in g.name)
    if family in LAYER_NORM:
        assert stream.kept == stream.dense  # a pruned LayerNorm stream has no config
    hf = hfp_fx.to_pretrained(small, like=model).eval()  # checks itself against the pruned graph
    assert type(hf) is type(model)
    assert sum(p.numel() for p in hf.parameters()) == report.achieved.params
    with torch.no_grad():
        expected = small(*x.values())
        assert rel_err(hf(**x).logits, expected) < 1e-4
    hf.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(loaded(**x).logits, expected) < 1e-4


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3"])
def test_query_key_norms_stay_exact_with_activations_near_eps(family):
    """Per-head (Qwen3, Gemma3) and all-heads (OLMo2) q/k RMSNorms share the config's eps with the
    stream's norms: to_pretrained rescales their projections instead, exact even where eps matters."""
    model, x = F.build(family), F.example()
    with torch.no_grad():  # queries and keys of the size of eps: an eps off by d/d' would show
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(1e-3)
    dg = hfp_fx.dependency_graph(model, x)
    keep = {g.id: range(max(1, g.channels // 2)) for g in dg.prunable_groups}  # hidden 24, one KV group
    small = hfp_fx.shrink(dg, keep=keep)
    hf = hfp_fx.to_pretrained(small, like=model, check=False).eval()
    with torch.no_grad():
        assert rel_err(hf(**x).logits, small(*x.values())) < 1e-5


def test_to_pretrained_refuses_a_model_it_would_get_wrong():
    """The self-check: a layout that forgets the layers' norms (what OLMo2's post-norms under
    Llama's names did) builds a model whose logits differ; it raises instead of returning it."""
    model, x = F.build("llama"), F.example()
    dg = hfp_fx.dependency_graph(model, x)
    small = hfp_fx.shrink(dg, keep={g.id: range(max(1, g.channels // 2)) for g in dg.prunable_groups})
    layout = hfp_fx.plan.hf_layouts.LAYOUTS["llama"]
    try:
        hfp_fx.plan.hf_layouts.LAYOUTS["llama"] = hfp_fx.plan.hf_layouts.DecoderLayout(layout.norm, layout.final_norm, stream_norms=())
        with pytest.raises(ValueError, match="differ from the pruned graph"):
            hfp_fx.to_pretrained(small, like=model)
        unchecked = hfp_fx.to_pretrained(small, like=model, check=False)
        with torch.no_grad():
            assert rel_err(unchecked(**x).logits, small(*x.values())) > 1e-3
    finally:
        hfp_fx.plan.hf_layouts.LAYOUTS["llama"] = layout


def test_layer_norm_decoders_without_uniform_blocks_are_refused_by_name():
    model, x = F.build("gpt2"), F.example()
    small = hfp_fx.prune(model, x, {"params": 0.5})
    assert small.meta["hfp"].achieved.params <= small.meta["hfp"].target.params  # exact graph, any width
    with pytest.raises(ValueError, match="uniform_blocks=True.*LayerNorm|LayerNorm.*uniform_blocks=True"):
        hfp_fx.to_pretrained(small, like=model)


def test_layer_norm_uniform_blocks_says_what_it_keeps_whole():
    model, x = F.build("gpt2"), F.example()
    with pytest.warns(UserWarning, match="keeps its residual stream and heads whole"):
        hfp_fx.prune(model, x, {"params": 0.7}, uniform_blocks=True)


def test_mixture_of_experts_prunes_whole_experts_their_width_and_the_stream():
    model, x = F.build("mixtral"), F.example()
    small = hfp_fx.prune(model, x, {"params": 0.5}, uniform_blocks=True)
    hf = hfp_fx.to_pretrained(small, like=model)  # checked against the pruned graph
    cfg, dense = hf.config, model.config
    assert cfg.intermediate_size < dense.intermediate_size and cfg.hidden_size < dense.hidden_size
    assert cfg.intermediate_size % 8 == 0 and cfg.hidden_size % 8 == 0  # what torch._grouped_mm runs
    assert cfg.num_experts_per_tok <= cfg.num_local_experts < dense.num_local_experts  # top-k unchanged
    experts = hf.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (cfg.num_local_experts, 2 * cfg.intermediate_size, cfg.hidden_size)
    assert hf.model.layers[0].mlp.gate.weight.shape == (cfg.num_local_experts, cfg.hidden_size)


def test_removed_experts_are_never_routed_to_in_the_reference():
    """The reference removes an expert by a -inf router logit (a softmax "logit" gate site): the
    pruned model, whose router has no row for it, is exact; fewer experts than top-k are refused."""
    model, x = F.build("mixtral"), F.example()
    dg = hfp_fx.dependency_graph(model, x)
    experts = [g for g in dg.prunable_groups if F.kind_of(g) == "experts"]
    assert [g.floor for g in experts] == [2, 2]  # num_experts_per_tok
    assert any(site.kind == "logit" for site in dg.facts.gates)
    for kept in ([0, 3], [1, 2, 3]):
        keep = {g.id: kept for g in experts}
        with torch.no_grad():
            assert rel_err(hfp_fx.shrink(dg, keep=keep)(*x.values()), hfp_fx.mask(dg, keep=keep)(*x.values())) < 1e-5
    with pytest.raises(ValueError, match="keep at least 2"):
        hfp_fx.shrink(dg, keep={experts[0].id: [1]})


def test_to_pretrained_refuses_unaligned_expert_widths():
    """Odd expert widths are exact as a graph, but torch._grouped_mm refuses them: a clear error."""
    model, x = F.build("mixtral"), F.example()
    dg = hfp_fx.dependency_graph(model, x)
    keep = {g.id: range(g.channels - 1) if F.kind_of(g) == "expert_mlp" else range(g.channels)
            for g in dg.prunable_groups}
    with pytest.raises(ValueError, match="uniform_blocks=True"):
        hfp_fx.to_pretrained(hfp_fx.shrink(dg, keep=keep), like=model)


def test_models_without_a_layout_are_refused_by_name():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    model, x = transformers.BertForSequenceClassification(cfg).eval(), F.example()
    dg = hfp_fx.dependency_graph(model, x)
    small = hfp_fx.shrink(dg, keep={g.id: range(max(1, g.channels // 2)) for g in dg.prunable_groups})
    with pytest.raises(ValueError, match="not a decoder family to_pretrained knows"):
        hfp_fx.to_pretrained(small, like=model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "gemma2"])
def test_a_shrunk_exported_model_stays_in_aten(family):
    """Rewrites emit ops of the graph's own dialect: norms over the pruned stream (RMSNorm's mean,
    GPT-2's LayerNorm written out), split sizes and finalize's scale nodes are ATen ops too; and
    finalize is exact (GPT-2: a gate is never folded into the LM head tied to the embedding)."""
    import operator

    model, x = F.build(family), F.example()
    prepared = hfp_fx.prepare(model, x, {"params": 0.5}, gates="channel")
    with torch.no_grad():
        hfp_fx.gate_parameters(prepared)[0].uniform_(0.5, 1.5)  # scale nodes where gates cannot fold
    finalized = hfp_fx.finalize(prepared).eval()
    apply_plan(prepared, finalized.meta["hfp"].keep)  # finalize's reference: removed gates at 0
    expected = prepared.eval()(*x.values())
    for small in (hfp_fx.prune(model, x, {"params": 0.5}), finalized):
        # (python arithmetic on symbolic sizes, e.g. batch * seq, is how export writes dynamic shapes)
        others = [n.format_node() for n in small.graph.nodes if n.op in ("call_method", "call_module") or
                  n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)
                  and n.target is not operator.getitem
                  and not (n.target.__module__ == "_operator" and isinstance(n.meta.get("val"), torch.SymInt))]
        assert not others, others[:3]
    with torch.no_grad():
        assert rel_err(finalized(*x.values()), expected) < 1e-4


def test_gates_scale_the_weights_of_exported_linear_layers():
    """In an exported graph a gate at an ``aten.linear`` / ``addmm`` input scales the layer's weight
    (one pass over a weight, not over every token's activations), as for an ``nn.Linear``; the
    prepared model still computes the dense model at gates 1, and finalize stays exact."""
    for family in ("llama", "gpt2"):
        model, x = F.build(family), F.example()
        prepared = hfp_fx.prepare(model, x, {"params": 0.5}, gates="channel")
        sites = [n for n in prepared.graph.nodes if n.op == "call_module" and str(n.target).startswith("hfp.sites.")]
        on_weights = [n for n in sites if n.args[0].op == "get_attr"]
        assert len(on_weights) >= len(sites) // 2, family
        with torch.no_grad():
            assert rel_err(prepared.eval()(*x.values()), model(**x, use_cache=False).logits) < 1e-6
            hfp_fx.gate_parameters(prepared)[0].uniform_(0.5, 1.5)
        small = hfp_fx.finalize(prepared).eval()
        apply_plan(prepared, small.meta["hfp"].keep)
        with torch.no_grad():
            assert rel_err(small(*x.values()), prepared.eval()(*x.values())) < 1e-5


def test_hfp_training_on_a_mixture_of_experts_model():
    """prepare -> train (the experts' logit gates keep finite gradients, so every parameter stays
    finite) -> finalize (exact against the prepared model with the removed channels off) ->
    to_pretrained."""
    model, x = F.build("mixtral"), F.example()
    ids = x["input_ids"]
    # budget="project": on budget from the first step, so some router (logit) gates are 0: log(0)
    prepared = hfp_fx.prepare(model, x, {"params": 0.5}, uniform_blocks=True, budget="project").train()

    def next_token_loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    small = train_then_finalize(prepared, ids, next_token_loss, 5, lr=1e-3)
    assert all(torch.isfinite(p).all() for p in prepared.parameters())
    report = small.meta["hfp"]
    assert report.achieved.params <= report.target.params
    with torch.no_grad():
        assert rel_err(small(ids), prepared(ids)) < 1e-5
    assert hfp_fx.to_pretrained(small, like=model).config.num_local_experts >= model.config.num_experts_per_tok
