"""A few timm architectures (random init): attention heads, layer scale, channels-last blocks."""
import pytest
import torch

from helpers import check_model

timm = pytest.importorskip("timm", reason="timm is in the dev extra")

MODELS = {
    "vit_tiny_patch16_224": dict(img_size=64),
    "resnet18d": {},
    "mobilenetv3_small_050": {},
    "convnext_atto": {},
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_timm_model(name):
    model = timm.create_model(name, pretrained=False, num_classes=10, **MODELS[name])
    dg, _ = check_model(model, torch.randn(2, 3, 64, 64), train_mode=False)
    assert dg.prunable_groups


def test_vit_heads_are_prunable():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10)
    import hfp_fx

    dg = hfp_fx.dependency_graph(model, torch.randn(1, 3, 32, 32))
    heads = [g for g in dg.groups if any(m.target.endswith("attn.qkv.weight") and m.dim == 0 for m in g.members)]
    assert heads and all(g.prunable and g.channels == 3 for g in heads)


def test_tokens_and_grn_parameters_join_their_channels():
    """The cls token (behind ``expand``) and GRN's ``weight.view(...)`` are bound, not "untracked",
    and the channels they join are prunable: LayerNorm over the residual stream and GRN's mean of
    the per-channel norms over the channels are exact with the removed channels at zero."""
    import hfp_fx

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=10)
    cnx = timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)
    for model, x, target in ((vit, torch.randn(1, 3, 32, 32), "cls_token"),
                             (cnx, torch.randn(1, 3, 32, 32), "stages.0.blocks.0.mlp.grn.weight")):
        dg = hfp_fx.dependency_graph(model, x)
        assert all("untracked" not in (g.reason or "") for g in dg.groups)
        assert any(m.target == target for g in dg.groups for m in g.members)
    grn = next(g for g in dg.groups if any(m.target == "stages.0.blocks.0.mlp.fc1.weight" and m.dim == 0
                                           for m in g.members))
    assert {"stages.0.blocks.0.mlp.grn.weight", "stages.0.blocks.0.mlp.grn.bias"} <= {m.target for m in grn.members}
    assert grn.prunable
    stream = next(g for g in dg.groups if any(m.target == "stem.0.weight" and m.dim == 0 for m in g.members))
    assert stream.prunable


def test_convnextv2_prunes_exactly():
    from helpers import check_model

    check_model(timm.create_model("convnextv2_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1)).eval(),
                torch.randn(1, 3, 32, 32))
