"""LightningModules of lattn; the CLI finds them by their short class names (``model: StereoTask``)."""

from .base import LattnTask
from .classification import ClassificationTask
from .classification_writer import ClassificationPredictionWriter
from .detection import DetectionPredictionWriter, DetectionTask
from .segmentation import SegmentationPredictionWriter, SegmentationTask
from .stereo import StereoPredictionWriter, StereoTask

__all__ = [
    "ClassificationPredictionWriter",
    "ClassificationTask",
    "DetectionPredictionWriter",
    "DetectionTask",
    "LattnTask",
    "SegmentationPredictionWriter",
    "SegmentationTask",
    "StereoPredictionWriter",
    "StereoTask",
]
