"""The stereo network's parts against their definitions, and the whole network's contract."""

from __future__ import annotations

import pytest
import torch

from lattn_app.models.stereo import (
    ConvexUpsampler,
    LocalRefinement,
    StereoNet,
    StereoNetOptions,
    build_cost_volume,
    disparity_regression,
)

# A small ViT with patch 4 gives the stride-4 features without waiting for a pyramid backbone.
TINY_BACKBONE = dict(patch_size=4, embed_dim=32, depth=1, num_heads=2, class_token=False, global_pool="avg",
                     pos_embed="sincos")


def tiny_net(max_disparity: int = 32, attention: str = "efficient", **options) -> StereoNet:
    settings = dict(img_size=(32, 64), feature_dim=16, groups=4, volume_channels=8, num_hourglasses=2,
                    attention_heads=2)
    settings.update(options)
    return StereoNet(max_disparity, "vit", TINY_BACKBONE, attention, options=StereoNetOptions(**settings))


def test_group_wise_correlation_matches_its_definition():
    left, right = torch.randn(2, 8, 5, 12), torch.randn(2, 8, 5, 12)
    volume = build_cost_volume(left, right, 6, "gwc", groups=2)
    assert volume.shape == (2, 2, 6, 5, 12)
    for d in (0, 3, 5):
        for x in range(12):
            if x < d:
                assert torch.all(volume[:, :, d, :, x] == 0)
            else:
                expected = (left[:, :4, :, x] * right[:, :4, :, x - d]).mean(dim=1)
                torch.testing.assert_close(volume[:, 0, d, :, x], expected)


def test_concatenation_volume_pairs_left_x_with_right_x_minus_d():
    left, right = torch.randn(1, 3, 4, 10), torch.randn(1, 3, 4, 10)
    volume = build_cost_volume(left, right, 4, "concat", groups=1)
    assert volume.shape == (1, 6, 4, 4, 10)
    torch.testing.assert_close(volume[:, :3, 2, :, 7], left[..., 7])
    torch.testing.assert_close(volume[:, 3:, 2, :, 7], right[..., 5])
    assert torch.all(volume[:, :, 2, :, :2] == 0)


def test_soft_argmin_returns_the_disparity_of_a_peaked_distribution():
    cost = torch.full((1, 8, 2, 3), -1e4)
    cost[0, 5] = 1e4
    assert torch.all(disparity_regression(cost) == 5)
    flat = torch.zeros(1, 8, 1, 1)  # uniform over 0..7 -> 3.5
    assert disparity_regression(flat).item() == pytest.approx(3.5)


def test_convex_upsampling_combines_the_3x3_coarse_neighbours():
    upsampler = ConvexUpsampler(channels=8, factor=4)
    coarse = torch.rand(2, 5, 7) * 10
    features = torch.randn(2, 8, 5, 7)
    mask = upsampler.mask(features)
    assert mask.shape == (2, 9, 4, 4, 5, 7)
    torch.testing.assert_close(mask.sum(dim=1), torch.ones(2, 4, 4, 5, 7))
    fine = upsampler(coarse, mask)
    assert fine.shape == (2, 20, 28)
    # Fine pixel (4 i + a, 4 j + b) = 4 * sum_k mask[k, a, b, i, j] * coarse[(i, j) + offset_k] (zero outside).
    padded = torch.nn.functional.pad(coarse, (1, 1, 1, 1))
    i, j, a, b = 3, 2, 1, 3
    neighbours = padded[:, i:i + 3, j:j + 3].reshape(2, 9)
    torch.testing.assert_close(fine[:, 4 * i + a, 4 * j + b], 4 * (mask[:, :, a, b, i, j] * neighbours).sum(dim=1))
    # Interior pixels of a constant map stay constant (times the factor): a convex combination.
    flat = upsampler(torch.full((1, 5, 7), 3.0), mask[:1])
    torch.testing.assert_close(flat[:, 4:-4, 4:-4], torch.full((1, 12, 20), 12.0))


@pytest.mark.parametrize("refinement", [False, True])
def test_convex_upsampling_network_trains_and_predicts_at_any_size(refinement):
    net = tiny_net(upsampling="convex", refinement=refinement)
    left, right = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64)
    outputs = net(left, right)
    assert [tuple(o.shape) for o in outputs] == [(2, 32, 64)] * 2
    sum(o.mean() for o in outputs).backward()
    assert net.upsampler.weights[0].weight.grad.abs().sum() > 0
    if refinement:
        assert net.refinement.head[-1].weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        (final,) = net(torch.rand(1, 3, 37, 75), torch.rand(1, 3, 37, 75))
    assert final.shape == (1, 37, 75) and 0 <= final.min() and final.max() <= 32


def test_local_refinement_starts_as_the_identity_and_keeps_the_coarse_gradient():
    torch.manual_seed(0)
    refinement = LocalRefinement(channels=8, radius=2)
    left = torch.rand(1, 3, 16, 40)
    right = torch.roll(left, shifts=-3, dims=-1)  # right(x) = left(x + 3): the true disparity is 3 everywhere
    coarse = torch.full((1, 16, 40), 2.0, requires_grad=True)
    refined = refinement(left, right, coarse)
    torch.testing.assert_close(refined, coarse)  # zero-initialised last layer: no change before training
    refined.sum().backward()
    assert torch.all(coarse.grad == 1)  # the coarse map keeps its gradient through the sum


def test_training_gives_one_map_per_hourglass_and_eval_the_final_one_at_any_size():
    net = tiny_net()
    left, right = torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64)
    outputs = net(left, right)
    assert [tuple(o.shape) for o in outputs] == [(2, 32, 64)] * 2
    net.eval()
    with torch.no_grad():
        (final,) = net(torch.rand(1, 3, 37, 75), torch.rand(1, 3, 37, 75))  # padded inside, cropped back
    assert final.shape == (1, 37, 75)
    assert final.min() >= 0 and final.max() <= 32


def test_gradients_reach_backbone_attention_and_aggregation():
    net = tiny_net()
    outputs = net(torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64))
    sum(o.mean() for o in outputs).backward()
    for module in (net.backbone, net.attention.self_blocks[0], net.attention.cross_blocks[0], net.hourglasses[0]):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_views_are_attended_across_in_cross_attention():
    net = tiny_net().eval()
    left, right = torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        base, _ = net.features(left, right)
        changed, _ = net.features(left, torch.rand(1, 3, 32, 64))
        without_cross = tiny_net(cross_attention=False).eval()
        alone, _ = without_cross.features(left, right)
        alone_changed, _ = without_cross.features(left, torch.rand(1, 3, 32, 64))
    assert not torch.allclose(base, changed)  # left features depend on the right view
    torch.testing.assert_close(alone, alone_changed)  # ... only through cross-attention


@pytest.mark.parametrize("attention", ["softmax", "performer", "nystrom", "care", "coupling"])
def test_other_mechanisms_build_and_run(attention):
    net = tiny_net(attention=attention).eval()
    with torch.no_grad():
        (final,) = net(torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 64))
    assert torch.isfinite(final).all()


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_net(max_disparity=40)
    with pytest.raises(ValueError, match="'fnet' does not"):
        tiny_net(attention="fnet")
    with pytest.raises(ValueError, match="cost_volume"):
        tiny_net(cost_volume="dot")
    with pytest.raises(ValueError, match="upsampling"):
        tiny_net(upsampling="bicubic")
    with pytest.raises(ValueError, match="same shape"):
        tiny_net()(torch.rand(1, 3, 32, 64), torch.rand(1, 3, 32, 48))
