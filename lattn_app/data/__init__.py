"""Datamodules of lattn: real on-disk formats, and embedded synthetic sets of the same formats.

The CLI finds them by short class name (``data: SceneFlowDataModule``). With ``root`` unset each
datamodule generates its embedded synthetic set once into the cache directory (``$LATTN_CACHE_DIR``,
default ``~/.cache/lattn``) and says so in the log.
"""

from .classification import CIFARDataModule, ImageFolderDataModule
from .coco import CocoDataModule
from .segmentation import ADE20KDataModule, CityscapesDataModule, SegmentationFolderDataModule
from .stereo import SceneFlowDataModule
from .stereo import ETH3DDataModule, KITTI2012DataModule, KITTI2015DataModule, MiddleburyDataModule  # noqa: F401

__all__ = ["CIFARDataModule", "CocoDataModule", "ImageFolderDataModule", "SceneFlowDataModule"]
__all__ += ["ADE20KDataModule", "CityscapesDataModule", "SegmentationFolderDataModule"]
