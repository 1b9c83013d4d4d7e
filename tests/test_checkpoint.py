"""A checkpoint in, a checkpoint out: prune_checkpoint streams a safetensors checkpoint through the
plan made on the meta device, and the result equals to_pretrained(prune(...)) of the loaded model."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hfp_fx
from hfp_fx.interop.cli import main
from hfp_fx.interop.safetensors_stream import DTYPES, SafetensorsCheckpoint, write_safetensors

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def llama(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def qwen3():
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return transformers.Qwen3ForCausalLM(cfg).eval().to(torch.bfloat16)


def in_memory(src, target, **kw):
    """The reference: the checkpoint loaded, pruned in memory, converted back."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    small = hfp_fx.prune(dense, ids, target, uniform_blocks=True, capture="export", **kw)
    return hfp_fx.to_pretrained(small, like=dense), small.meta["hfp"]


@pytest.mark.parametrize("build, shard", [(lambda: llama(tie=True), "40KB"), (lambda: llama(tie=False), None),
                                          (qwen3, "30KB")], ids=["llama-tied-sharded", "llama", "qwen3-bf16"])
def test_streamed_checkpoint_equals_the_in_memory_path(tmp_path, build, shard):
    model = build()
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    (src / "tokenizer.json").write_text("{}")  # other files travel with the weights
    report = hfp_fx.prune_checkpoint(src, dst, {"params": 0.5})
    reference, ref_report = in_memory(src, {"params": 0.5})
    assert report.keep == ref_report.keep and report.achieved == ref_report.achieved
    assert report.achieved.params <= 0.5 * report.dense.params
    pruned = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    got, want = pruned.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for key in want:  # tensor for tensor, the same bytes
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    ids = torch.randint(0, 64, (2, 24))
    assert torch.equal(pruned(ids).logits, reference(ids).logits)
    assert pruned.config.hidden_size < model.config.hidden_size or \
        pruned.config.intermediate_size < model.config.intermediate_size
    assert (dst / "tokenizer.json").exists() and json.loads((dst / "hfp_prune_plan.json").read_text())["keep"]
    if shard:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(SafetensorsCheckpoint(src).entries)


def test_cli_prunes_a_checkpoint_directory(tmp_path, capsys):
    llama(tie=False).save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prune", f"hf:{tmp_path / 'src'}", "--params", "50%", "--uniform-blocks", "--out", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    small = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hfp_fx.count(small, torch.zeros(1, 16, dtype=torch.long)).params <= 0.5 * 67_584 + 64 * 64 * 2
    assert main(["prune", f"hf:{tmp_path / 'src'}", "--params", "50%"]) == 2  # no --out
    assert "--out" in capsys.readouterr().err


def test_what_cannot_stream_says_so(tmp_path):
    llama(tie=False).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="needs the model in memory"):
        hfp_fx.prune_checkpoint(tmp_path / "src", tmp_path / "dst", {"params": 0.5}, importance="taylor")
    with pytest.raises(ValueError, match="other than src"):
        hfp_fx.prune_checkpoint(tmp_path / "src", tmp_path / "src", {"params": 0.5})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        SafetensorsCheckpoint(tmp_path / "empty")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(k for k in DTYPES if not k.startswith("F8"))),
                          st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=4))
def test_streamed_files_round_trip_with_the_safetensors_library(tmp_path_factory, specs):
    directory = tmp_path_factory.mktemp("st")
    gen = torch.Generator().manual_seed(len(specs))
    tensors = {f"t{i}": (torch.randn(shape, generator=gen) * 50).to(DTYPES[dtype]) for i, (dtype, shape) in enumerate(specs)}
    write_safetensors(directory / "a.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                      tensors.__getitem__)
    theirs = safetensors_torch.load_file(str(directory / "a.safetensors"))
    ours = SafetensorsCheckpoint(directory)
    for k, v in tensors.items():
        assert torch.equal(theirs[k], v) and torch.equal(ours.read(k), v) and ours.read(k).dtype == v.dtype
    safetensors_torch.save_file(tensors, str(directory / "b.safetensors"))
    (directory / "a.safetensors").unlink()
    assert all(torch.equal(SafetensorsCheckpoint(directory).read(k), v) for k, v in tensors.items())


def test_a_produced_tensor_must_match_the_header(tmp_path):
    with pytest.raises(ValueError, match="the header says"):
        write_safetensors(tmp_path / "a.safetensors", {"a": ((2,), torch.float32)}, lambda k: torch.ones(3))
