"""The matmul RoIAlign against torchvision's kernel: same values and gradients, and the pyramid pooler
against torchvision's MultiScaleRoIAlign (same level assignment), on both of its paths."""

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from lattn_app.models.roi_align import PyramidRoIAlign, roi_align_matmul


def _rois(num, images, image_size, generator):
    """Regions of every kind: inside, touching and crossing the border, thinner than a feature pixel."""
    x1y1 = torch.rand(num, 2, generator=generator) * image_size * 0.9
    wh = torch.rand(num, 2, generator=generator) * image_size * 0.6
    wh[: num // 8] = torch.rand(num // 8, 2, generator=generator) * 0.5  # sub-pixel regions
    boxes = torch.cat([x1y1, x1y1 + wh], dim=1)
    boxes[num // 8: num // 4, 2:] = image_size + 3.0  # past the right and bottom edges
    boxes[num // 4: num // 4 + 4, :2] = -2.0  # before the left and top edges
    image_index = torch.randint(0, images, (num, 1), generator=generator).float()
    return torch.cat([image_index, boxes], dim=1)


@pytest.mark.parametrize("output_size, sampling_ratio, spatial_scale", [(7, 2, 0.25), (14, 2, 0.125), (7, 1, 0.5)])
def test_matmul_roi_align_equals_torchvision_in_values_and_gradients(output_size, sampling_ratio, spatial_scale):
    generator = torch.Generator().manual_seed(0)
    image_size = 96
    size = int(image_size * spatial_scale)
    features = torch.randn(3, 5, size, size + 2, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = _rois(64, 3, image_size, generator).double()
    expected = roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)
    pooled = roi_align_matmul(features, rois, (output_size, output_size), spatial_scale, sampling_ratio)
    assert pooled.dtype == features.dtype
    torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(expected, features, upstream)
    (grad,) = torch.autograd.grad(pooled, features, upstream)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)


def test_matmul_roi_align_refuses_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio > 0"):
        roi_align_matmul(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), (2, 2), 1.0, 0)


@pytest.mark.parametrize("grad, map_scale", [(True, 1), (False, 1), (True, 4)])
def test_pyramid_roi_align_equals_multiscale_roi_align(grad, map_scale):
    """Training on small maps takes the matmul path, evaluation and large maps torchvision's kernel:
    all three give torchvision's MultiScaleRoIAlign, level by level."""
    generator = torch.Generator().manual_seed(1)
    image_size = 128 * map_scale
    strides = (4, 8, 16, 32)
    names = ["p2", "p3", "p4", "p5"]
    maps = OrderedDict((n, torch.randn(2, 6, image_size // s, image_size // s, generator=generator, requires_grad=grad))
                       for n, s in zip(names, strides))
    boxes = [_rois(40, 1, image_size, generator)[:, 1:].clamp(0, image_size) for _ in range(2)]
    for b in boxes:  # some regions big enough for the coarser levels
        b[:10, 2:] = b[:10, :2] + image_size * 0.9
    image_shapes = [(image_size, image_size)] * 2
    pooler = PyramidRoIAlign(names, strides, output_size=7, sampling_ratio=2)
    reference = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    with torch.set_grad_enabled(grad):
        assert pooler.use_matmul(maps["p2"]) == (grad and map_scale == 1)
        pooled = pooler(maps, boxes, image_shapes)
        expected = reference(maps, boxes, image_shapes)
    levels = reference.map_levels(boxes)
    assert len(torch.unique(levels)) >= 2  # the test covers more than one level
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    if grad:
        upstream = torch.randn(expected.shape, generator=generator)
        grads = torch.autograd.grad(pooled, list(maps.values()), upstream, allow_unused=True)
        expected_grads = torch.autograd.grad(expected, list(maps.values()), upstream, allow_unused=True)
        for g, e, m in zip(grads, expected_grads, maps.values()):  # None: no region on that level
            zero = torch.zeros_like(m)
            torch.testing.assert_close(zero if g is None else g, zero if e is None else e, rtol=1e-4, atol=1e-5)


def test_pyramid_roi_align_needs_one_stride_per_level():
    with pytest.raises(ValueError, match="one stride per level"):
        PyramidRoIAlign(["p2", "p3"], [4], output_size=7, sampling_ratio=2)
