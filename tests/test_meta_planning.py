"""Planning without weights: a model on the meta device is analysed, counted and planned
(importance="uniform"); what needs weights says so by name instead of a raw meta-tensor error."""
import pytest
import torch
import torchvision

import hfp_fx


def meta_resnet():
    with torch.device("meta"):
        return torchvision.models.resnet18().eval()


def test_a_meta_model_is_planned_exactly_with_uniform_importance():
    model, x = meta_resnet(), torch.randn(1, 3, 64, 64)
    dense = hfp_fx.count(model, x)
    assert dense == hfp_fx.count(torchvision.models.resnet18().eval(), x)
    small = hfp_fx.prune(model, x, {"macs": 0.5}, importance="uniform")
    report = small.meta["hfp"]
    assert next(small.parameters()).is_meta
    assert hfp_fx.count(small, x) == report.achieved and report.achieved.macs <= report.target.macs
    assert report.keep  # the plan: which channels a loaded model would keep


def test_llama_config_on_meta_is_planned_with_uniform_blocks():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    small = hfp_fx.prune(model, ids, {"params": 0.5}, importance="uniform", uniform_blocks=True)
    assert hfp_fx.count(small, ids) == small.meta["hfp"].achieved


@pytest.mark.parametrize("call", ["l1", "taylor", "prepare"])
def test_what_needs_weights_names_the_meta_device(call):
    model, x = meta_resnet(), torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="meta device"):
        if call == "prepare":
            hfp_fx.prepare(model, x, {"macs": 0.5})
        else:
            hfp_fx.prune(model, x, {"macs": 0.5}, importance=call,
                         calibration=[x] if call == "taylor" else None)
