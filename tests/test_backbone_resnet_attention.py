"""The Efficient Attention paper's ResNets: torchvision's networks with attention modules.

- the module with ``efficient`` equals the released module's formula (weights copied across, float64);
- every registered mechanism runs inside a module, forward and backward;
- the plain network (no modules) under lattn's Mask R-CNN is torchvision's ``maskrcnn_resnet50_fpn``:
  the same state-dict keys and shapes, parameter count, trainable parameters and FPN outputs;
- a torchvision ResNet-50 state dict in a local file loads with no backbone key missing, the modules
  reported as new, and the network then computes what torchvision's does;
- the placement rule gives the non-local paper's layouts; bad positions are one-line errors.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from lattn_app.attention import list_attentions
from lattn_app.backbones import create_backbone
from lattn_app.backbones.attention_module import AttentionModule2d
from lattn_app.backbones.resnet_attention import placement_rule
from lattn_app.models.detection import build_detector


def reference_efficient_module(x, keys, queries, values, reprojection, head_count):
    """The released module's computation (cmsflash/efficient-attention, EfficientAttention.forward),
    written out: per head, softmax of the keys over positions and of the queries over channels, the
    context keys x values^T, then context^T x queries, the heads concatenated, reprojected, plus x."""
    n, _, h, w = x.shape
    k = F.conv2d(x, *keys).flatten(2)
    q = F.conv2d(x, *queries).flatten(2)
    v = F.conv2d(x, *values).flatten(2)
    dk, dv = k.shape[1] // head_count, v.shape[1] // head_count
    heads = []
    for i in range(head_count):
        key = k[:, i * dk:(i + 1) * dk].softmax(dim=2)
        query = q[:, i * dk:(i + 1) * dk].softmax(dim=1)
        value = v[:, i * dv:(i + 1) * dv]
        context = key @ value.transpose(1, 2)
        heads.append((context.transpose(1, 2) @ query).reshape(n, dv, h, w))
    return F.conv2d(torch.cat(heads, dim=1), *reprojection) + x


@pytest.mark.parametrize("head_count", [1, 2])
def test_efficient_module_equals_the_released_module(head_count):
    torch.manual_seed(0)
    module = AttentionModule2d(32, "efficient", num_heads=head_count, zero_init_reprojection=False).double()
    assert (module.key_channels, module.value_channels) == (16, 32)  # the paper's C/2 and C
    x = torch.randn(2, 32, 7, 9, dtype=torch.float64)
    weights = [(conv.weight, conv.bias) for conv in (module.keys, module.queries, module.values, module.reprojection)]
    expected = reference_efficient_module(x, *weights, head_count)
    torch.testing.assert_close(module(x), expected, rtol=1e-12, atol=1e-12)
    # The released module's parameter names and shapes: its state dict loads into ours one to one.
    names = {name for name, _ in module.named_parameters()}
    assert names == {f"{conv}.{kind}" for conv in ("keys", "queries", "values", "reprojection")
                     for kind in ("weight", "bias")}


def test_efficient_module_gradients_equal_the_formula_s():
    """lattn's hand-written backward of efficient attention, with key width != value width."""
    torch.manual_seed(1)
    module = AttentionModule2d(24, "efficient", num_heads=2, zero_init_reprojection=False).double()
    x = torch.randn(2, 24, 5, 6, dtype=torch.float64, requires_grad=True)
    module(x).square().sum().backward()
    ours = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    weights = [(c.weight, c.bias) for c in (module.keys, module.queries, module.values, module.reprojection)]
    reference_efficient_module(x, *weights, 2).square().sum().backward()
    theirs = [x.grad] + [p.grad for p in module.parameters()]
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", list_attentions())
def test_every_mechanism_runs_in_a_module(attention):
    torch.manual_seed(0)
    module = AttentionModule2d(32, attention, num_heads=2, grid=(6, 8), zero_init_reprojection=False)
    x = torch.randn(2, 32, 6, 8, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in module.parameters())
    assert not torch.equal(out, x)  # the attention branch contributes


def test_zero_initialised_module_starts_as_the_identity():
    module = AttentionModule2d(16, "softmax")
    x = torch.randn(1, 16, 4, 4)
    assert torch.equal(module(x), x)


def test_the_plain_network_is_torchvision_s_mask_rcnn():
    """No modules, BatchNorm, all layers trained = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)."""
    torch.manual_seed(0)
    theirs = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    ours = build_detector("maskrcnn", 90, "resnet50", {"attention_positions": 0, "num_classes": 0})
    their_state = theirs.state_dict()
    our_state = {k.replace("backbone.backbone.", "backbone.body."): v for k, v in ours.state_dict().items()}
    assert our_state.keys() == their_state.keys()
    assert all(our_state[k].shape == their_state[k].shape for k in their_state)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 44_454_513
    # Same weights, same features: the FPN levels P2-P6 of one image.
    ours.load_state_dict({k.replace("backbone.body.", "backbone.backbone."): v for k, v in their_state.items()})
    theirs.eval(), ours.eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        their_levels, our_levels = theirs.backbone(image), ours.backbone(image)
    for mine, reference in zip(our_levels.values(), their_levels.values(), strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_the_detection_setting_is_torchvision_s_pretrained_layout():
    """FrozenBatchNorm2d and layer2-4 trained: torchvision's maskrcnn_resnet50_fpn with ImageNet weights."""
    backbone = _resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)
    theirs = MaskRCNN(backbone, num_classes=91)
    ours = build_detector("maskrcnn", 90, "resnet50", {"attention_positions": 0, "num_classes": 0,
                                                         "norm_layer": "frozen", "trainable_layers": 3})
    def counts(model):
        return (sum(p.numel() for p in model.parameters()),
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert counts(ours) == counts(theirs)
    assert {type(m) for m in ours.backbone.backbone.modules()} >= {FrozenBatchNorm2d}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())


def test_torchvision_weights_load_with_no_backbone_key_missing(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet50().eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = create_backbone("resnet50", attention="efficient", attention_positions=2, pretrained=str(path)).eval()
    report = model.load_report
    assert report.missing and all(key.startswith("attention.") for key in report.missing)
    assert not report.unexpected and "fc.weight" in report.loaded
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # zero-initialised modules: the pretrained network's function, unchanged
        torch.testing.assert_close(model(image), reference(image), rtol=0, atol=0)
    ten_classes = create_backbone("resnet50", attention_positions=1, num_classes=10, pretrained=str(path))
    assert ten_classes.load_report.reinitialised_head == ["fc.weight", "fc.bias"]


def test_pyramid_levels_and_classifier():
    model = create_backbone("resnet50", attention="efficient", attention_positions=1, num_classes=7)
    assert model.out_channels == [256, 512, 1024, 2048] and model.strides == [4, 8, 16, 32]
    images = torch.randn(1, 3, 64, 96)
    levels = model.forward_pyramid(images)
    assert [tuple(level.shape[1:]) for level in levels] == [(256, 16, 24), (512, 8, 12), (1024, 4, 6), (2048, 2, 3)]
    assert model(images).shape == (1, 7)
    assert list(model.attention) == ["layer3_4"]


def test_placement_rule_gives_the_non_local_layouts():
    resnet50, resnet101 = [3, 4, 6, 3], [3, 4, 23, 3]
    assert placement_rule(resnet50, 1) == ["layer3.4"]  # right before the last block of res4
    five = placement_rule(resnet50, 5)
    assert sorted(five) == ["layer2.0", "layer2.2", "layer3.0", "layer3.2", "layer3.4"]  # every other block
    assert sorted(placement_rule(resnet50, 10)) == sorted([f"layer2.{i}" for i in range(4)] +
                                                           [f"layer3.{i}" for i in range(6)])
    assert placement_rule(resnet101, 5) == ["layer3.21", "layer3.19", "layer3.17", "layer2.2", "layer2.0"]
    assert placement_rule(resnet50, 2) == ["layer3.4", "layer3.2"]


@pytest.mark.parametrize("options, message", [
    ({"attention_positions": ["layer3.6"]}, "'layer3.6' is not 'layerX.i' of this network (layer1.0-layer1.2"),
    ({"attention_positions": 17}, "only 16 blocks"),
    ({"arch": "resnet18"}, "resnet: arch"),
    ({"trainable_layers": 6}, "trainable_layers must be 0 to 5"),
])
def test_bad_options_are_one_line_errors(options, message):
    name = "resnet" if "arch" in options else "resnet50"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        create_backbone(name, **options)
    assert "\n" not in str(error.value)


def test_the_resnets_feed_semantic_fpn():
    """Segmentation on the paper's ResNet (issue: "the ResNets of the EA issue" as Semantic FPN backbones)."""
    from lattn_app.tasks.segmentation import SegmentationTask

    task = SegmentationTask(backbone="resnet50", attention="efficient", num_classes=5,
                            backbone_options={"attention_positions": 1, "num_classes": 0})
    logits = task(task.normalize(torch.rand(1, 3, 64, 96)))
    assert logits.shape == (1, 5, 64, 96)
