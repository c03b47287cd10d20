"""torchmetrics Metric subclasses that torchmetrics lacks (stereo disparity errors; segmentation scores from a
confusion matrix)."""

from .segmentation import SegmentationMetrics, trivial_baseline
from .stereo import BadPixelRate, D1Error, EndPointError, stereo_metrics, valid_disparity_mask

__all__ = ["BadPixelRate", "D1Error", "EndPointError", "SegmentationMetrics", "stereo_metrics", "trivial_baseline",
           "valid_disparity_mask"]
