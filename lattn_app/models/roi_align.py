"""RoIAlign for the R-CNN heads, with a matmul form that makes CPU training of small images fast.

torchvision's CPU ``roi_align`` backward is a serial loop of scattered adds (about 30 ns per sample point
on the 2-core development machine), and in Mask R-CNN training on 160-pixel images it was a quarter of
the step. RoIAlign with a fixed number of sample points per bin is separable: a region's output is
``Wy @ feature @ Wx^T`` per channel, where ``Wy`` (``Wx``) holds the bilinear weights of the sample rows
(columns), averaged per bin. Written that way, forward and backward are batched matrix products, which
costs O(H * W) per region instead of O(output * samples): far faster on small maps (measured 4-7x for
forward + backward at 40 x 40), slower on large ones (1.8x slower at 100 x 168). :class:`PyramidRoIAlign`
therefore uses it only where it wins: CPU, gradients wanted, and a small map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

from ..attention.base import autocast_off

# The matmul form is used when a level's H * W is at most this many times the sample points of one
# region's channel (output height * width * sampling_ratio^2); the crossover measured here lies between
# 8x (4-7x faster) and 86x (1.8x slower).
MATMUL_MAX_MAP_TO_SAMPLES = 16


def _axis_weights(start: Tensor, length: Tensor, bins: int, samples: int, size: int) -> Tensor:
    """(R, bins, size): how RoIAlign (``aligned=False``) weighs each feature row (or column) in each bin.

    Follows torchvision's kernel: ``samples`` points per bin at ``start + length * (bin + (i + 0.5) /
    samples) / bins``; a point outside [-1, size] contributes nothing, one within is clamped to
    [0, size - 1] and interpolated linearly between its two neighbours.
    """
    offsets = (torch.arange(bins * samples, dtype=start.dtype, device=start.device) + 0.5) / samples
    points = start[:, None] + length[:, None] / bins * offsets  # (R, bins * samples)
    inside = ((points >= -1) & (points <= size)).to(start.dtype)
    points = points.clamp(0, size - 1)
    low = points.floor()
    high = (low + 1).clamp(max=size - 1)
    high_weight = points - low
    weights = start.new_zeros(len(start), bins * samples, size)
    weights.scatter_add_(2, low.long()[..., None], ((1 - high_weight) * inside)[..., None])
    weights.scatter_add_(2, high.long()[..., None], (high_weight * inside)[..., None])
    return weights.view(len(start), bins, samples, size).mean(2)


def roi_align_matmul(features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
                     sampling_ratio: int) -> Tensor:
    """torchvision's ``roi_align(..., aligned=False)`` with ``sampling_ratio > 0``, as matrix products.

    Args:
        features: (N, C, H, W) feature maps.
        rois: (R, 5) regions as ``[image index, x1, y1, x2, y2]`` in image pixels.
        output_size: (height, width) of each pooled region.
        spatial_scale: feature pixels per image pixel (1 / stride).
        sampling_ratio: sample points per bin along each axis.

    Returns:
        (R, C, output height, output width), computed in float32 (or float64) and returned in the features' dtype.
    """
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_matmul needs a fixed sampling_ratio > 0, got {sampling_ratio}")
    out_h, out_w = output_size
    height, width = features.shape[-2:]
    dtype = torch.promote_types(features.dtype, torch.float32)  # pool in float32 at least, as torchvision does
    with autocast_off(features):
        maps = features.to(dtype)
        boxes = rois[:, 1:].to(dtype) * spatial_scale
        box_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
        box_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
        rows = _axis_weights(boxes[:, 1], box_h, out_h, sampling_ratio, height)  # (R, out_h, H)
        cols = _axis_weights(boxes[:, 0], box_w, out_w, sampling_ratio, width)  # (R, out_w, W)
        pooled = maps.new_zeros(len(rois), maps.shape[1], out_h, out_w)
        image_of_roi = rois[:, 0].long()
        for image in torch.unique(image_of_roi).tolist():
            index = torch.nonzero(image_of_roi == image).squeeze(1)
            by_rows = torch.einsum("rph,chw->rpcw", rows[index], maps[image])
            pooled[index] = torch.einsum("rpcw,rqw->rcpq", by_rows, cols[index])
    return pooled.to(features.dtype)


class PyramidRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same level assignment and results), using
    :func:`roi_align_matmul` on the levels where it is faster: CPU training on small maps.

    Args:
        featmap_names: the pyramid levels to pool from, finest first.
        strides: their strides in image pixels (so the scales need not be inferred from the first batch).
        output_size: pooled height and width.
        sampling_ratio: sample points per bin along each axis.
    """

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 sampling_ratio: int) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        if len(strides) != len(featmap_names):
            raise ValueError(f"PyramidRoIAlign needs one stride per level: names {list(featmap_names)}, "
                             f"strides {list(strides)}")
        self.scales = [1.0 / s for s in strides]
        self.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                          self.canonical_scale, self.canonical_level)

    def use_matmul(self, feature: Tensor) -> bool:
        samples = self.output_size[0] * self.output_size[1] * self.sampling_ratio ** 2
        return (feature.device.type == "cpu" and torch.is_grad_enabled() and self.sampling_ratio > 0
                and feature.shape[-2] * feature.shape[-1] <= MATMUL_MAX_MAP_TO_SAMPLES * samples)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)  # all 0 with a single level
        pooled = features[0].new_zeros(rois.shape[0], features[0].shape[1], *self.output_size)  # not len(): traceable
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            if self.use_matmul(feature):
                level_pooled = roi_align_matmul(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            else:
                level_pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            pooled[index] = level_pooled.to(pooled.dtype)
        return pooled
