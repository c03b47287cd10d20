"""Stereo data: one short module per dataset layout on a shared dataset, augmentation and datamodule.

- :mod:`.files`: a frame's files (:class:`StereoSample`), case-insensitive folder lookup, predict pairs;
- :mod:`.augmentation`: :class:`StereoAugmentation`, geometry-consistent training augmentation;
- :mod:`.dataset`: :class:`StereoDataset` (the sample format), disparity reading, batching;
- :mod:`.datamodule`: :class:`StereoDataModule`, what every layout shares (validation sequences, limits,
  augmentation options, predict pairs, the data's known disparity range);
- :mod:`.calibration`: calib.txt and KITTI calibration files, disparity -> depth;
- one module per layout: :mod:`.sceneflow` (:class:`SceneFlowDataModule`), :mod:`.kitti`
  (:class:`KITTI2012DataModule`, :class:`KITTI2015DataModule`), :mod:`.middlebury`
  (:class:`MiddleburyDataModule`), :mod:`.eth3d` (:class:`ETH3DDataModule`).
"""

from .augmentation import StereoAugmentation
from .calibration import (
           CalibrationError,
           StereoCalibration,
           depth_from_disparity,
           read_calib_txt,
           read_kitti_calib,
)
from .datamodule import StereoDataModule
from .dataset import (
           StereoDataset,
           read_disparity,
           read_nonoccluded,
           split_batch,
           stereo_collate,
)
from .eth3d import ETH3DDataModule
from .files import StereoSample, find_predict_pairs
from .kitti import KITTI2012DataModule, KITTI2015DataModule
from .middlebury import MiddleburyDataModule
from .sceneflow import PUBLISHED_FRAME_COUNTS, SceneFlowDataModule

__all__ = ["PUBLISHED_FRAME_COUNTS", "CalibrationError", "ETH3DDataModule", "KITTI2012DataModule", "KITTI2015DataModule",
           "MiddleburyDataModule", "SceneFlowDataModule", "StereoAugmentation", "StereoCalibration", "StereoDataModule",
           "StereoDataset", "StereoSample", "depth_from_disparity", "find_predict_pairs", "read_calib_txt",
           "read_disparity", "read_kitti_calib", "read_nonoccluded", "split_batch", "stereo_collate"]
