"""Couplformer backbones: registration, shapes on any grid, sequence pooling, the softmax twin, gradients."""

from __future__ import annotations

import pytest
import torch

import lattn_app.backbones.couplformer  # noqa: F401 (registers the backbones)
from lattn_app.attention.coupling import CouplingAttention
from lattn_app.attention.softmax import SoftmaxAttention
from lattn_app.backbones import Backbone, create_backbone
from lattn_app.backbones.couplformer import (
    FLAT_PRESETS,
    SequencePooling,
    couplformer,
    couplformer_hierarchical,
)
from lattn_app.registry import BACKBONES

# Small sizes so the whole file runs in seconds on a CPU; head size 2 as in the reference.
SMALL = {
    "couplformer": dict(depth=2, embed_dim=32, num_heads=16, mlp_ratio=2.0, img_size=32),
    "couplformer_hierarchical": dict(
        embed_dim=16, depths=(1, 1, 1, 1), num_heads=(8, 16, 32, 64), img_size=64
    ),
}
NAMES = list(SMALL)


def build(name: str, **options):
    return create_backbone(name, **{**SMALL[name], **options}).eval()


def mixers(model):
    return [module.attn for module in model.modules() if hasattr(module, "attn") and hasattr(module, "mlp")]


@pytest.mark.parametrize("name", NAMES)
def test_registered_and_builds_with_logits(name):
    assert name in BACKBONES
    model = build(name, num_classes=7)
    assert isinstance(model, Backbone)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_refused_by_name(name):
    with pytest.raises(TypeError, match="drop_path_rat"):
        create_backbone(name, drop_path_rat=0.1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 64), (96, 128), (40, 72)])
def test_pyramid_matches_feature_info_on_any_grid(name, size):
    model = build(name, num_classes=5)
    images = torch.randn(2, 3, *size)
    maps = model.forward_pyramid(images)
    assert len(maps) == len(model.feature_info)
    for level, feature_map in zip(model.feature_info, maps):
        expected = (2, level.channels, -(-size[0] // level.stride), -(-size[1] // level.stride))
        assert feature_map.shape == expected
    assert model(images).shape == (2, 5)  # non-square grids classify too


def test_pyramid_levels():
    assert build("couplformer").strides == [4]
    hierarchical = build("couplformer_hierarchical")
    assert hierarchical.strides == [4, 8, 16, 32]
    assert hierarchical.out_channels == [16, 32, 64, 128]
    assert hierarchical.num_features == 128


def test_hierarchical_attention_is_global_over_each_stage_grid():
    model = build("couplformer_hierarchical")
    seen = []
    for mixer in mixers(model):
        mixer.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[1], args[1])))
    model(torch.randn(1, 3, 64, 96))
    # One mixer call per stage, each over the whole stage grid (no windows).
    assert seen == [(16 * 24, (16, 24)), (8 * 12, (8, 12)), (4 * 6, (4, 6)), (2 * 3, (2, 3))]


def test_sequence_pooling_is_the_attention_weighted_average():
    pool = SequencePooling(8)
    tokens = torch.randn(3, 10, 8)
    weights = torch.softmax(tokens @ pool.attention.weight[0] + pool.attention.bias, dim=1)
    expected = (weights.unsqueeze(-1) * tokens).sum(dim=1)
    torch.testing.assert_close(pool(tokens), expected)


@pytest.mark.parametrize("name", NAMES)
def test_pooled_embedding_follows_the_pooling_weights_not_the_mean(name):
    model = build(name, num_classes=0)
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    with torch.no_grad():  # score = 50 * channel 0, and token 3 has by far the largest channel 0
        model.pool.attention.weight.zero_()
        model.pool.attention.weight[0, 0] = 50.0
        model.pool.attention.bias.zero_()
        features[:, 3, 0] = features[:, :, 0].abs().max() + 5.0
    pooled = model.forward_head(features)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(pooled, features[:, 3])
    assert not torch.allclose(pooled, features.mean(dim=1), atol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_pre_logits_is_the_embedding_the_head_classifies(name):
    model = build(name, num_classes=4)
    features = model.forward_features(torch.randn(2, 3, 64, 64))
    embedding = model.forward_head(features, pre_logits=True)
    assert embedding.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model.head(embedding))


@pytest.mark.parametrize("name", NAMES)
def test_softmax_twin_has_the_same_architecture_and_parameters(name):
    coupled, regular = build(name), build(name, attention="softmax")
    assert all(isinstance(m, CouplingAttention) for m in mixers(coupled)) and mixers(coupled)
    assert all(isinstance(m, SoftmaxAttention) for m in mixers(regular)) and mixers(regular)
    shapes = {key: value.shape for key, value in coupled.state_dict().items()}
    assert shapes == {key: value.shape for key, value in regular.state_dict().items()}
    assert sum(p.numel() for p in coupled.parameters()) == sum(p.numel() for p in regular.parameters())
    # The twins differ only in how attention is computed: coupling does fewer MACs on the same grid.
    assert coupled.complexity(64).macs < regular.complexity(64).macs


def test_attention_options_reach_the_mixer():
    model = build("couplformer", attention_options={"variant": "pooling"})
    assert {m.variant for m in mixers(model)} == {"pooling"}


@pytest.mark.parametrize("attention", ["linformer", "efficient"])
@pytest.mark.parametrize("name", NAMES)
def test_other_mechanisms_build_and_run(name, attention):
    # linformer is built for one grid: the backbones hand it the grid of img_size at every stage.
    model = build(name, attention=attention, num_classes=3)
    assert model(torch.randn(1, 3, *_pair(SMALL[name]["img_size"]))).shape == (1, 3)


def _pair(size):
    return (size, size) if isinstance(size, int) else size


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter_and_are_finite(name):
    model = build(name, num_classes=4, drop_path_rate=0.1).train()
    logits = model(torch.randn(2, 3, 32, 48))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_flat_presets_and_overrides():
    default = couplformer(img_size=32, num_classes=10)
    assert len(default.blocks) == 6 and default.num_features == 128  # the reference's CIFAR model
    assert default.blocks[0].attn.num_heads == 64 and default.blocks[0].mlp.fc1.out_features == 384
    assert FLAT_PRESETS["large"].depth == 14
    overridden = couplformer(preset="medium", depth=1, img_size=32)
    assert len(overridden.blocks) == 1 and overridden.num_features == 256


def test_flat_presets_are_the_reference_s_kct_models():
    for name, (depth, width, heads, ratio) in {"medium": (7, 256, 4, 2.0), "large": (14, 384, 6, 3.0),
                                               "kct_7": (7, 256, 4, 2.0), "kct_8": (8, 256, 128, 2.0)}.items():
        preset = FLAT_PRESETS[name]
        assert (preset.depth, preset.embed_dim, preset.num_heads, preset.mlp_ratio) == (depth, width, heads, ratio)
    model = couplformer(depth=1, embed_dim=32, num_heads=16, img_size=32)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].attn.attn_drop == 0.1
    assert model.pos_embed is None and model.tokenizer.proj.kernel_size == (4, 4)


def test_the_earlier_flat_layout_stays_available_for_its_checkpoints(tmp_path):
    legacy = dict(tokenizer="conv", pos_embed="learned", block="pre_norm", qkv_bias=True, attn_drop_rate=0.0)
    model = couplformer(img_size=32, num_classes=100, **legacy)
    assert sum(p.numel() for p in model.parameters()) == 1_089_189  # lattn 0.1.0's "small" at 100 classes
    assert {"tokenizer.layers.0.0.weight", "pos_embed", "blocks.0.attn.qkv.bias"} <= set(model.state_dict())
    torch.save(model.state_dict(), tmp_path / "old.pth")
    loaded = couplformer(img_size=32, num_classes=100, pretrained=str(tmp_path / "old.pth"), **legacy)
    assert torch.equal(loaded.pos_embed, model.pos_embed)


def test_hierarchical_defaults_are_swin_t_sized():
    model = couplformer_hierarchical(num_classes=0)
    assert model.out_channels == [96, 192, 384, 768]
    assert [len(stage.blocks) for stage in model.stages] == [2, 2, 6, 2]
    assert [stage.blocks[0].attn.head_dim for stage in model.stages] == [2, 2, 2, 2]


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="'huge'"):
        couplformer(preset="huge")
    with pytest.raises(ValueError, match="global_pool"):
        couplformer(global_pool="max", depth=1)
    with pytest.raises(ValueError, match="num_heads"):
        couplformer_hierarchical(depths=(1, 1), num_heads=(2, 2, 2))


@pytest.mark.parametrize("name, options", [
    ("couplformer", {"depth": 1, "embed_dim": 32, "num_heads": 8}),
    ("couplformer_hierarchical", {"embed_dim": 16, "depths": (1, 1), "num_heads": (4, 8)}),
])
def test_pretrained_weights_load_into_a_fresh_model(tmp_path, name, options):
    source = create_backbone(name, num_classes=0, **options)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    loaded = create_backbone(name, num_classes=0, pretrained=str(tmp_path / "weights.pth"), **options)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
