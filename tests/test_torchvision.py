"""A representative subset of the model zoo (the full sweep is benchmarks/zoo.py)."""
import pytest
import torch
import torchvision
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from helpers import check_model

SMALL_ZOO = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(width_mult=0.5),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "shufflenet_v2_x0_5": lambda: torchvision.models.shufflenet_v2_x0_5(),
    "squeezenet1_1": lambda: torchvision.models.squeezenet1_1(),
    "regnet_x_400mf": lambda: torchvision.models.regnet_x_400mf(),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(),
    "densenet121": lambda: torchvision.models.densenet121(),
    "googlenet": lambda: torchvision.models.googlenet(aux_logits=False, init_weights=True),
    "tiny_vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                          mlp_dim=64, num_classes=10),
    "tiny_convnext": lambda: ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10),
    "tiny_swin": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                         window_size=[4, 4], num_classes=10),
}


@pytest.mark.parametrize("name", sorted(SMALL_ZOO))
def test_shrink_equals_mask(name):
    torch.manual_seed(0)
    model = SMALL_ZOO[name]()
    size = 32 if name in ("tiny_vit", "tiny_swin", "tiny_convnext") else 64
    dg, small = check_model(model, torch.randn(2, 3, size, size))
    assert dg.prunable_fraction() > 0.3


def test_segmentation_dict_output():
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    check_model(model, torch.randn(1, 3, 64, 64), train_mode=False)


def test_detection_backbone_fpn():
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    dg, _ = check_model(model.backbone, torch.randn(1, 3, 64, 64), train_mode=False)
    assert dg.prunable_groups


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "tiny_convnext", "tiny_swin"])
def test_shape_pass_stays_on_meta_tensors(name, caplog):
    """Standard models never need the real-run fallback of the shape pass (it costs compute and a copy
    of the weights); a shortcut producing a tensor the next op rejects would send them there."""
    import hfp_fx
    from hfp_fx.capture.shapes import propagate_shapes
    from hfp_fx.capture.tracing import trace

    x = torch.randn(1, 3, 32, 32) if name.startswith("tiny") else torch.randn(1, 3, 64, 64)
    traced = trace(SMALL_ZOO[name]().eval(), (x,))
    with caplog.at_level("DEBUG", logger="hfp_fx.capture.shapes"):
        propagate_shapes(traced.graph_module, (x,))
    assert not [r for r in caplog.records if "real forward pass" in r.getMessage()]
    assert hfp_fx.count(traced.graph_module, x).macs == sum(n.meta["macs"] for n in traced.graph_module.graph.nodes)


def _layout(tensor_meta):
    """``tensor_meta`` without ``requires_grad`` (reused results carry no autograd state)."""
    if isinstance(tensor_meta, (tuple, list)) and not hasattr(tensor_meta, "stride"):
        return [_layout(t) for t in tensor_meta]
    if tensor_meta is None:
        return None
    return tensor_meta.shape, tensor_meta.dtype, tensor_meta.stride, tensor_meta.memory_format


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_shape_pass_memo_changes_nothing(name):
    """Repeated transformer blocks are run once on meta tensors; every node still gets the shapes,
    strides and MACs that running it gives."""
    from hfp_fx.capture.copies import GraphTwin
    from hfp_fx.capture.shapes import _ShapeAndFlopProp
    from hfp_fx.capture.tracing import trace

    model = {"vit": lambda: VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                              hidden_dim=32, mlp_dim=64, num_classes=10),
             "swin": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                             window_size=[4, 4], num_classes=10)}[name]()
    x = torch.empty(2, 3, 32, 32, device="meta")
    facts = []
    for memoize in (False, True):
        gm = trace(model.eval(), (x,)).graph_module
        interp = _ShapeAndFlopProp(gm, GraphTwin(gm, "meta"), memoize=memoize)
        interp.run(x)
        facts.append([(n.name, _layout(n.meta.get("tensor_meta")), n.meta.get("macs")) for n in gm.graph.nodes])
        hits = interp.memo.hits
    assert facts[0] == facts[1]
    assert hits >= 2  # attention of blocks 2.. (and their MLP parts without a shortcut)


def test_shape_pass_copies_only_the_modules_it_runs():
    """Convs, batch norms and ReLUs are answered from their configuration (shape shortcuts), so
    the shape pass makes no meta copy of them; the user's weights stay where they were."""
    from hfp_fx.capture.copies import GraphTwin
    from hfp_fx.capture.shapes import _ShapeAndFlopProp
    from hfp_fx.capture.tracing import trace

    gm = trace(torchvision.models.resnet18(), (torch.randn(1, 3, 32, 32),)).graph_module
    twin = GraphTwin(gm, "meta")
    _ShapeAndFlopProp(gm, twin, on_meta=True).run(torch.empty(1, 3, 32, 32, device="meta"))
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")
    copied = set(twin._copies)
    assert copied < set(called) and len(copied) <= 2, copied  # (at most the pools run)
    assert not any(isinstance(gm.get_submodule(t), (torch.nn.Conv2d, torch.nn.BatchNorm2d)) for t in copied)
    assert all(not p.is_meta for p in gm.parameters())
