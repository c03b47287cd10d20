"""torchmetrics Metric subclasses that torchmetrics lacks (stereo disparity errors)."""

from .stereo import BadPixelRate, D1Error, EndPointError, stereo_metrics, valid_disparity_mask

__all__ = ["BadPixelRate", "D1Error", "EndPointError", "stereo_metrics", "valid_disparity_mask"]
