"""Hugging Face models as they are, captured with torch.export (``capture="export"`` / ``"auto"``).

Tiny random-init configurations; every check of ``tests/helpers.check_model`` (shrink == mask on
the logits, cost model == counter, save/load, training step, the user's model untouched).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import hfp_fx  # noqa: E402
from helpers import check_model  # noqa: E402


def build(name, tie=True, seed=0):
    torch.manual_seed(seed)
    if name in ("llama", "qwen2", "mistral", "qwen3"):
        prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "qwen3": "Qwen3"}[name]
        config_cls, model_cls = getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")
        cfg = config_cls(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=tie)
        return model_cls(cfg).eval()
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=48, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(cfg).eval()


def ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def owning(dg, param, dim):
    return [g for g in dg.groups if any(m.target == param and m.dim == dim for m in g.members)]


def prunable(dg):
    return sorted(g.channels for g in dg.prunable_groups)


CASES = [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False), ("gpt2", True), ("bert", True)]
#: prunable group sizes: the residual stream (48), per layer the key/value groups (2: each KV
#: head with its 3 query heads) or heads (4) and the MLP width; BERT's pooler (48)
PRUNABLE = {"llama": [2, 2, 48, 64, 64], "qwen2": [2, 2, 48, 64, 64], "gpt2": [4, 4, 48, 192, 192],
            "bert": [4, 4, 48, 48, 64, 64]}


@pytest.mark.parametrize("name,tie", CASES, ids=[f"{n}-{'tied' if t else 'untied'}" for n, t in CASES])
def test_hugging_face_model_shrink_equals_mask(name, tie):
    dg, small = check_model(build(name, tie), {"input_ids": ids()}, capture="export")
    assert prunable(dg) == PRUNABLE[name]
    assert not dg.shape_specialized  # batch and sequence length stay symbolic (see the test below)
    fixed = [g for g in dg.groups if not g.prunable]
    assert len(fixed) == 1 and fixed[0].reason == "model output"  # the logits (vocabulary / labels)
    assert isinstance(small(ids()), torch.Tensor)  # the graph returns the logits


def test_llama_groups_are_the_stream_the_kv_groups_and_the_mlp():
    dg = hfp_fx.dependency_graph(build("llama"), {"input_ids": ids()}, capture="export")
    assert not dg.facts.mac_mismatch
    stream = owning(dg, "lm_head.weight", 1)[0]  # tied: the embedding is the LM head's weight
    assert stream.prunable and stream.channels == 48
    for layer in range(2):
        kv = owning(dg, f"model.layers.{layer}.self_attn.k_proj.weight", 0)[0]
        assert kv.prunable and kv.channels == 2
        q = [m for m in kv.members if m.target == f"model.layers.{layer}.self_attn.q_proj.weight" and m.dim == 0]
        assert len(q[0].offsets) == 48  # every query row goes with its key/value head
        mlp = owning(dg, f"model.layers.{layer}.mlp.up_proj.weight", 0)[0]
        assert mlp.prunable and mlp.channels == 64


def test_auto_capture_exports_hugging_face_models():
    model = build("qwen2", tie=False)
    dg, _ = check_model(model, {"input_ids": ids()}, capture="auto")
    assert prunable(dg) == PRUNABLE["qwen2"]
    positional = hfp_fx.dependency_graph(model, ids(), capture="auto")  # a tensor: input_ids
    assert prunable(positional) == PRUNABLE["qwen2"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_prune_to_forty_percent_of_the_parameters(name):
    model = build(name)
    x = {"input_ids": ids()}
    dense = hfp_fx.count(model, x, capture="auto")
    small = hfp_fx.prune(model, x, {"params": 0.4}, capture="auto")
    report = small.meta["hfp"]
    assert report.dense == dense
    assert report.achieved == hfp_fx.count(small, (ids(),))
    assert 0.38 * dense.params <= report.achieved.params <= 0.4 * dense.params
    with torch.no_grad():
        reference = model(input_ids=ids(), use_cache=False) if name != "bert" else model(input_ids=ids())
        assert small(ids()).shape == reference.logits.shape


def test_keyword_examples_in_any_order():
    model, x = build("bert"), ids()
    types = (x % 2).flip(1)
    example = {"token_type_ids": types, "input_ids": x}  # not the signature's order
    with pytest.raises(TypeError, match="capture='export'"):
        hfp_fx.dependency_graph(model, example, capture="fx")  # tracing takes leading positional ones only
    dg = hfp_fx.dependency_graph(model, example, capture="export")
    with torch.no_grad():
        expected = model(input_ids=x, token_type_ids=types).logits
        torch.testing.assert_close(hfp_fx.mask(dg, keep={}).eval()(types, x), expected)  # the dict's order


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_prepare_train_finalize_on_an_exported_model_is_exact(name):
    from helpers import train_then_finalize

    model, x = build(name), ids()
    prepared = hfp_fx.prepare(model, {"input_ids": x}, {"params": 0.5}, lambda_init=0.02, capture="auto")

    def next_token_loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    report = train_then_finalize(prepared, x, next_token_loss, 20).meta["hfp"]
    assert report.achieved.params <= report.target.params


def test_save_and_load_an_exported_pruned_model(tmp_path):
    model, x = build("gpt2"), ids()
    small = hfp_fx.prune(model, {"input_ids": x}, {"params": 0.5}, capture="auto")
    assert small.meta["hfp"].capture == "export" and small.meta["hfp"].input_names == ["input_ids"]
    path = tmp_path / "gpt2.hfp.pt"
    hfp_fx.save(small, path)
    again = hfp_fx.load(path, lambda: build("gpt2"))  # recorded: capture, input names and shapes
    with torch.no_grad():
        assert torch.equal(again.eval()(x), small.eval()(x))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_to_pretrained_round_trips_through_save_pretrained(name, tie, tmp_path):
    model, x = build(name, tie), ids()
    dg = hfp_fx.dependency_graph(model, x, capture="export")
    gen = torch.Generator().manual_seed(0)
    # one KV group of two (3 query heads), and the same random half of the hidden size and of
    # every MLP: a hidden size of 24 is a multiple of 3 heads, as transformers' configs require
    keep = {}
    for g in dg.prunable_groups:
        n = 1 if g.channels == 2 else g.channels // 2
        keep[g.id] = sorted(torch.randperm(g.channels, generator=gen)[:n].tolist())
    small = hfp_fx.shrink(dg, keep=keep)
    hf = hfp_fx.to_pretrained(small, like=model).eval()
    assert type(hf) is type(model)
    assert hf.config.hidden_size < model.config.hidden_size
    assert hf.config.num_key_value_heads <= model.config.num_key_value_heads
    assert sum(p.numel() for p in hf.parameters()) <= 0.5 * sum(p.numel() for p in model.parameters())
    assert_same_logits_after_save(hf, small, model, x, tmp_path)


def assert_same_logits_after_save(hf, small, model, x, tmp_path):
    """``hf`` computes ``small``'s logits, and again after ``save_pretrained`` / ``from_pretrained``."""
    with torch.no_grad():
        expected = small(x)
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, atol=1e-4, rtol=1e-4)


def assert_round_trip(small, model, x, tmp_path):
    """``to_pretrained`` gives the model's class with ``small``'s logits and parameter count, and
    ``save_pretrained`` / ``from_pretrained`` bring it back unchanged."""
    hf = hfp_fx.to_pretrained(small, like=model).eval()
    assert type(hf) is type(model)
    cfg = hf.config
    assert cfg.hidden_size % cfg.num_attention_heads == 0  # what transformers' configs check
    assert sum(p.numel() for p in hf.parameters()) == small.meta["hfp"].achieved.params
    assert_same_logits_after_save(hf, small, model, x, tmp_path)
    return hf


#: (model, tied, params target, seed): without the config fit, each of these plans a hidden
#: size that is not a multiple of the kept query heads (e.g. 25 with 6 heads); Mistral and Qwen3
#: (per-head q/k RMSNorms over the head dim) share Llama's layer names
FIT_CASES = [("llama", True, 0.4, 0), ("llama", False, 0.6, 0), ("llama", True, 0.7, 1),
             ("qwen2", True, 0.4, 0), ("qwen2", False, 0.7, 1), ("qwen2", True, 0.3, 2),
             ("mistral", True, 0.4, 0), ("qwen3", False, 0.6, 0)]


@pytest.mark.parametrize("name,tie,target,seed", FIT_CASES, ids=[f"{n}-{'tied' if t else 'untied'}-{p}-seed{s}"
                                                                 for n, t, p, s in FIT_CASES])
def test_uniform_blocks_plan_fits_the_hugging_face_config(name, tie, target, seed, tmp_path):
    model, x = build(name, tie, seed), ids()
    small = hfp_fx.prune(model, {"input_ids": x}, {"params": target}, uniform_blocks=True, capture="auto")
    report = small.meta["hfp"]
    assert report.achieved == hfp_fx.count(small, (x,))
    assert 0.9 * report.target.params <= report.achieved.params <= report.target.params
    assert_round_trip(small, model, x, tmp_path)


def test_prepare_finalize_with_uniform_blocks_fits_the_hugging_face_config(tmp_path):
    model, x = build("llama"), ids()
    prepared = hfp_fx.prepare(model, {"input_ids": x}, {"params": 0.4}, capture="auto", uniform_blocks=True)
    small = hfp_fx.finalize(prepared).eval()  # untrained widths: every group loses the same fraction
    assert small.meta["hfp"].achieved.params <= small.meta["hfp"].target.params
    assert_round_trip(small, model, x, tmp_path)


def test_to_pretrained_refuses_what_a_config_cannot_express():
    model, x = build("llama"), ids()
    uneven = hfp_fx.prune(model, x, {"params": 0.5}, capture="export")
    widths = {tuple(uneven.state_dict()[f"model.layers.{i}.mlp.gate_proj.weight"].shape) for i in range(2)}
    if len(widths) > 1:
        with pytest.raises(ValueError, match="uniform_blocks=True"):
            hfp_fx.to_pretrained(uneven, like=model)
    dg = hfp_fx.dependency_graph(model, x, capture="export")
    odd = {g.id: range(25) if g.channels == 48 else range(g.channels) for g in dg.prunable_groups}
    with pytest.raises(ValueError, match="uniform_blocks=True.*multiple of the kept heads"):
        hfp_fx.to_pretrained(hfp_fx.shrink(dg, keep=odd), like=model)  # hidden 25, 6 heads
    gpt2 = build("gpt2")
    small = hfp_fx.prune(gpt2, x, {"params": 0.5}, capture="export")
    with pytest.raises(ValueError, match="LayerNorm"):
        hfp_fx.to_pretrained(small, like=gpt2)



@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_graph_captured_from_one_sequence_serves_any_batch_and_length(name):
    """Export keeps batch and sequence symbolic (a batch of 1 captured as 2): the pruned graph
    equals its masked reference, and the captured graph the model, at other shapes."""
    model = build(name)
    example = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    dg = hfp_fx.dependency_graph(model, example)
    assert not dg.shape_specialized
    keep = {g.id: range(0, g.channels, 2) for g in dg.prunable_groups}
    small, reference = hfp_fx.shrink(dg, keep=keep), hfp_fx.mask(dg, keep=keep)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for batch in (1, 3):
            for length in (5, 16, 29):
                x = torch.randint(0, 64, (batch, length), generator=gen)
                assert torch.allclose(small(x), reference(x), atol=1e-5, rtol=1e-5), (batch, length)
                assert torch.allclose(dg.gm(x), model(x, use_cache=False).logits, atol=1e-5), (batch, length)


def test_a_prepared_model_trains_on_batches_of_any_length():
    model = build("llama")
    prepared = hfp_fx.prepare(model, torch.randint(0, 64, (1, 16)), {"params": 0.6})
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    for batch, length in ((4, 12), (2, 20), (3, 7)):
        x = torch.randint(0, 64, (batch, length), generator=gen)
        logits = prepared(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
        (loss + hfp_fx.complexity_loss(prepared)).backward()
        opt.step()
        opt.zero_grad()
    small = hfp_fx.finalize(prepared).eval()
    x = torch.randint(0, 64, (2, 11), generator=gen)
    assert small(x).shape == (2, 11, 64)
    assert hfp_fx.count(small, x).params <= 0.6 * hfp_fx.count(model, x).params
