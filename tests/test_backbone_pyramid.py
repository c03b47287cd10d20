"""The pyramid backbone: levels and strides on non-square images for every mechanism, partial stages,
per-stage attention, size errors, gradients, pretrained round trips and layer-wise LR decay groups."""

from __future__ import annotations

import logging

import pytest
import torch
from timm.optim import param_groups_layer_decay

from lattn_app.attention.efficient import EfficientAttention
from lattn_app.attention.softmax import SoftmaxAttention
from lattn_app.backbones import Backbone, create_backbone, list_backbones
from lattn_app.backbones.blocks import TransformerBlock
from lattn_app.backbones.pyramid import PyramidTransformer

from .helpers import ALL_MECHANISMS

SIZE = (64, 96)  # non-square, divisible by 32
SMALL = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
             num_classes=5)


def small(**options) -> PyramidTransformer:
    return create_backbone("pyramid", **{**SMALL, **options}).eval()


def mixers(model) -> list[torch.nn.Module]:
    return [block.attn for block in model.modules() if isinstance(block, TransformerBlock)]


def test_registered_with_presets():
    assert {"pyramid", "pyramid_tiny", "pyramid_small"} <= set(list_backbones())
    tiny = create_backbone("pyramid_tiny", num_classes=0)
    assert isinstance(tiny, Backbone)
    assert tiny.out_channels == [32, 64, 160, 256] and tiny.strides == [4, 8, 16, 32]
    assert [len(stage.blocks) for stage in tiny.stages] == [2, 2, 2, 2]
    assert [m.num_heads for m in mixers(tiny)[::2]] == [1, 2, 5, 8]
    assert all(isinstance(m, EfficientAttention) for m in mixers(tiny))  # the default mechanism
    assert [len(stage.blocks) for stage in create_backbone("pyramid_small").stages] == [3, 4, 6, 3]


@pytest.mark.parametrize("attention", ALL_MECHANISMS)
def test_every_mechanism_gives_the_pyramid_at_every_stride(attention):
    # img_size is the run-time size, so linformer and mixer are built for exactly these stage grids.
    model = small(attention=attention, img_size=SIZE)
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        maps = model.forward_pyramid(images)
        logits = model(images)
    assert [tuple(m.shape) for m in maps] == [
        (2, c, SIZE[0] // s, SIZE[1] // s) for c, s in zip(model.out_channels, model.strides)
    ]
    assert model.out_channels == [16, 32, 48, 64] and model.strides == [4, 8, 16, 32]
    assert all(m.isfinite().all() for m in maps)
    assert logits.shape == (2, 5) and logits.isfinite().all()


def test_attention_is_global_over_each_stage_grid():
    model = small()
    seen = []
    for mixer in mixers(model):
        mixer.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[1], args[1])))
    model(torch.randn(1, 3, *SIZE))
    assert seen == [(16 * 24, (16, 24)), (8 * 12, (8, 12)), (4 * 6, (4, 6)), (2 * 3, (2, 3))]


def test_fixed_grid_mechanisms_get_each_stage_grid_from_img_size():
    model = small(attention="linformer", img_size=(128, 64))
    assert [m.grid_size for m in mixers(model)] == [(32, 16), (16, 8), (8, 4), (4, 2)]


def test_num_stages_builds_only_the_first_levels():
    model = small(num_stages=2)
    assert len(model.stages) == 2 and model.strides == [4, 8] and model.out_channels == [16, 32]
    assert model.num_features == 32
    maps = model.forward_pyramid(torch.randn(1, 3, 24, 40))  # two stages: multiples of 8 suffice
    assert [tuple(m.shape) for m in maps] == [(1, 16, 6, 10), (1, 32, 3, 5)]
    assert model(torch.randn(1, 3, 24, 40)).shape == (1, 5)  # the classifier sits on the last built stage


def test_head_and_features():
    model = small()
    images = torch.randn(2, 3, *SIZE)
    features = model.forward_features(images)
    assert features.shape == (2, 64, 2, 3)
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    assert model.forward_head(features).shape == (2, 5)
    assert small(num_classes=0)(images).shape == (2, 64)  # no classifier: the pooled embedding


def test_gradient_reaches_the_first_stage():
    model = small(drop_path_rate=0.1).train()
    maps = model.forward_pyramid(torch.randn(2, 3, *SIZE))
    (model.forward_head(maps[-1]).square().sum() + maps[0].mean()).backward()
    first = model.stages[0]
    for parameter in (first.downsample.proj.weight, first.blocks[0].pos_conv.proj.weight,
                      first.blocks[0].attn.qkv.weight, first.blocks[0].mlp.fc1.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model = small().train()
    images = torch.randn(1, 3, *SIZE)
    model(images).sum().backward()
    expected = model.stages[0].blocks[0].attn.qkv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing()
    model(images).sum().backward()
    torch.testing.assert_close(model.stages[0].blocks[0].attn.qkv.weight.grad, expected)


def test_image_size_not_divisible_names_the_multiple():
    with pytest.raises(ValueError, match="image size 64x80 is not divisible by 32.*multiple of 32"):
        small()(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="image size 20x24 is not divisible by 8"):
        small(num_stages=2).forward_pyramid(torch.randn(1, 3, 20, 24))
    with pytest.raises(ValueError, match="img_size 100x100 is not divisible by 32"):
        small(img_size=100)


def test_attention_per_stage_is_honoured():
    names = ["efficient", "coupling", "softmax", "mixer"]
    model = small(attention=names, attention_options=[{"normalization": "scaling"}, None, {"fused": False}, None])
    assert [type(stage.blocks[0].attn).__name__ for stage in model.stages] == [
        "EfficientAttention", "CouplingAttention", "SoftmaxAttention", "MixerTokenMixing"
    ]
    assert model.stages[0].blocks[0].attn.normalization == "scaling"
    assert model.stages[2].blocks[0].attn.fused is False
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    # A list for the declared stages works with fewer built ones; a wrong length is refused.
    two = small(attention=names, num_stages=2)
    assert [type(m) for m in mixers(two)] == [EfficientAttention, type(model.stages[1].blocks[0].attn)]
    with pytest.raises(ValueError, match="one per stage .*got 3"):
        small(attention=names[:3])


def test_softmax_at_stride_4_is_allowed_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lattn_app.backbones.pyramid"):
        model = small(attention=["softmax", "efficient", "efficient", "efficient"])
    assert isinstance(model.stages[0].blocks[0].attn, SoftmaxAttention)
    assert "stride 4" in caplog.text and "quadratic" in caplog.text and "H/4 * W/4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lattn_app.backbones.pyramid"):
        small(attention=["efficient", "softmax", "softmax", "softmax"])
    assert not caplog.text


def test_bad_options_are_named():
    with pytest.raises(TypeError, match="backbone 'pyramid' has no option 'embed_dim'. Did you mean 'embed_dims'"):
        create_backbone("pyramid", embed_dim=64)
    with pytest.raises(TypeError, match="attention mechanism 'efficient' has no option 'normalisation'"):
        small(attention_options={"normalisation": "scaling"})
    with pytest.raises(KeyError, match="Unknown attention mechanism 'efficent'. Did you mean 'efficient'"):
        small(attention="efficent")
    with pytest.raises(ValueError, match="num_stages must be an integer from 1 to 4"):
        small(num_stages=5)
    with pytest.raises(ValueError, match="stage 3 width 48 must be divisible by its num_heads 5"):
        small(num_heads=(1, 2, 5, 4))
    with pytest.raises(ValueError, match="one entry per stage"):
        small(depths=(1, 1, 1))


def test_own_weights_round_trip_through_pretrained(tmp_path):
    source = small(attention="linformer", img_size=SIZE)
    images = torch.randn(1, 3, *SIZE)
    # A bare state dict file and a Lightning-style checkpoint of a task that holds the backbone.
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    checkpoint = {"state_dict": {f"model.backbone.{k}": v for k, v in source.state_dict().items()}, "epoch": 1}
    checkpoint["state_dict"]["model.neck.weight"] = torch.ones(3)
    torch.save(checkpoint, tmp_path / "run.ckpt")
    for name in ("weights.pth", "run.ckpt"):
        target = small(attention="linformer", img_size=SIZE, pretrained=str(tmp_path / name))
        assert not target.load_report.missing and not target.load_report.unexpected
        with torch.no_grad():
            torch.testing.assert_close(target(images), source(images))
    # Another class count: everything but the classifier loads.
    other = small(attention="linformer", img_size=SIZE, num_classes=3, pretrained=str(tmp_path / "run.ckpt"))
    assert other.load_report.reinitialised_head == ["head.weight", "head.bias"]
    # Weights of another architecture would load nothing: refused.
    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor of .*other.pth matches"):
        small(pretrained=str(tmp_path / "other.pth"))


def test_layer_decay_groups_follow_depth():
    model = small(depths=(1, 2, 1, 1))
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    scale = {name: g["lr_scale"] for g in groups for name in [n for n, p in model.named_parameters()
                                                                if any(p is q for q in g["params"])]}
    assert scale["head.weight"] == 1.0
    assert scale["stages.0.downsample.proj.weight"] < scale["stages.0.blocks.0.attn.qkv.weight"]
    assert scale["stages.1.downsample.proj.weight"] == scale["stages.1.blocks.0.attn.qkv.weight"]
    assert scale["stages.1.blocks.0.attn.qkv.weight"] < scale["stages.1.blocks.1.attn.qkv.weight"]
    assert scale["stages.1.norm.weight"] == scale["stages.1.blocks.1.attn.qkv.weight"]
    assert scale["stages.3.blocks.0.attn.qkv.weight"] < scale["head.weight"]
    assert len({round(s, 6) for s in scale.values()}) == 1 + 5 + 1  # stem, 5 blocks, head
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n, p in model.named_parameters()
                if any(p is q for q in g["params"])}
    assert "stages.0.blocks.0.pos_conv.proj.weight" in no_decay
    assert "stages.0.blocks.0.attn.qkv.weight" not in no_decay


def test_presets_complexity_at_224():
    tiny = create_backbone("pyramid_tiny").complexity(224)
    assert 2.5e6 < tiny.params < 4e6 and 0.4 < tiny.gmacs < 0.7  # PVTv2-b0: 3.7M, 0.6 GMACs
