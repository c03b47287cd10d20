"""LightningModules of lattn; the CLI finds them by their short class names (``model: StereoTask``)."""

from .base import LattnTask
from .stereo import StereoPredictionWriter, StereoTask

__all__ = ["LattnTask", "StereoPredictionWriter", "StereoTask"]
