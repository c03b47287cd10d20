"""Semantic segmentation datamodules: ADE20K, Cityscapes, and image + mask folders with a class list.

- :mod:`.dataset`: the label mapping (:class:`LabelMap`), mask reading and checks,
  :class:`SegmentationDataset` and :class:`SegmentationDataModule`, what every layout shares;
- :mod:`.transforms`: the joint image + mask augmentation;
- :mod:`.ade20k`: :class:`ADE20KDataModule` (``root=None``: the embedded synthetic set in ADE20K's layout);
- :mod:`.cityscapes`: :class:`CityscapesDataModule` (19 classes from ``*_labelIds.png``);
- :mod:`.folders`: :class:`SegmentationFolderDataModule`, a user's own images, masks and class list.
"""

from .ade20k import ADE20KDataModule
from .cityscapes import CITYSCAPES_CLASSES, CityscapesDataModule
from .dataset import IGNORE_INDEX, LabelMap, MaskError, SegmentationDataModule, SegmentationDataset, read_mask
from .folders import SegmentationFolderDataModule

__all__ = [
    "ADE20KDataModule",
    "CITYSCAPES_CLASSES",
    "CityscapesDataModule",
    "IGNORE_INDEX",
    "LabelMap",
    "MaskError",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationFolderDataModule",
    "read_mask",
]
