"""Stereo data: one short module per dataset layout on a shared dataset, augmentation and datamodule.

- :mod:`.files`: a frame's files (:class:`StereoSample`), case-insensitive folder lookup, predict pairs;
- :mod:`.augmentation`: :class:`StereoAugmentation`, geometry-consistent training augmentation;
- :mod:`.dataset`: :class:`StereoDataset` (the sample format), disparity reading, batching;
- :mod:`.datamodule`: :class:`StereoDataModule`, what every layout shares (validation sequences, limits,
  augmentation options, predict pairs, the data's known disparity range);
- one module per layout: :mod:`.sceneflow` (:class:`SceneFlowDataModule`).
"""

from .augmentation import StereoAugmentation
from .datamodule import StereoDataModule
from .dataset import StereoDataset, read_disparity, stereo_collate
from .files import StereoSample, find_predict_pairs
from .sceneflow import PUBLISHED_FRAME_COUNTS, SceneFlowDataModule

__all__ = ["PUBLISHED_FRAME_COUNTS", "SceneFlowDataModule", "StereoAugmentation", "StereoDataModule", "StereoDataset",
           "StereoSample", "find_predict_pairs", "read_disparity", "stereo_collate"]
