"""Stereo disparity metrics as torchmetrics ``Metric`` subclasses.

Averaging: every metric is a ratio of two sums over **all valid pixels of the whole set** (per pixel,
not per image): EPE = sum |d_pred - d_gt| / #valid, bad-k = #(|error| > k) / #valid, D1 =
#(|error| > 3 and |error| > 5% of d_gt) / #valid (the KITTI 2015 outlier rate). A pixel is valid when
0 < d_gt < max_disparity (the same pixels the loss trains on). The sums are ``dist_reduce_fx="sum"``
states in float64, so under DDP the ranks' sums add up and the result equals a single-process
evaluation of the same pixels. Rates are fractions (0.05 = 5%).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection


def valid_disparity_mask(target: Tensor, max_disparity: float | None) -> Tensor:
    """Pixels with ground truth inside (0, max_disparity): the ones that are trained on and scored."""
    valid = torch.isfinite(target) & (target > 0)
    if max_disparity is not None:
        valid &= target < max_disparity
    return valid


class _DisparityRate(Metric):
    """sum(per-pixel score over valid pixels) / number of valid pixels."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, max_disparity: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_disparity = max_disparity
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds and target: disparities of the same shape, (B, H, W) or (H, W)."""
        if preds.shape != target.shape:
            raise ValueError(f"{type(self).__name__}: preds {tuple(preds.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        valid = valid_disparity_mask(target, self.max_disparity)
        error = (preds.detach()[valid].double() - target[valid].double()).abs()
        self.total += self.pixel_scores(error, target[valid].double()).sum()
        self.count += valid.sum()

    def compute(self) -> Tensor:
        return self.total / self.count.clamp(min=1)


class EndPointError(_DisparityRate):
    """Mean absolute disparity error in pixels (EPE) over all valid pixels of the set."""

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        return error


class BadPixelRate(_DisparityRate):
    """Fraction of valid pixels whose disparity error exceeds `threshold` pixels (bad-1, bad-2, bad-3)."""

    def __init__(self, threshold: float, max_disparity: float | None = None, **kwargs) -> None:
        super().__init__(max_disparity, **kwargs)
        self.threshold = threshold

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        return (error > self.threshold).double()


class D1Error(_DisparityRate):
    """KITTI 2015 D1: fraction of valid pixels with error > 3 px and > 5% of the true disparity."""

    def pixel_scores(self, error: Tensor, target: Tensor) -> Tensor:
        return ((error > 3) & (error > 0.05 * target)).double()


def stereo_metrics(max_disparity: float | None, prefix: str) -> MetricCollection:
    """EPE, bad-1/2/3 and D1 as one collection whose keys start with `prefix` (e.g. ``val_epe``)."""
    return MetricCollection(
        {
            "epe": EndPointError(max_disparity),
            "bad1": BadPixelRate(1.0, max_disparity),
            "bad2": BadPixelRate(2.0, max_disparity),
            "bad3": BadPixelRate(3.0, max_disparity),
            "d1": D1Error(max_disparity),
        },
        prefix=prefix,
    )
