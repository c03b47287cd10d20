"""KITTI 2012 and KITTI 2015 stereo as distributed (Geiger et al. 2012; Menze and Geiger 2015).

:class:`KITTI2015DataModule` reads ``data_scene_flow``::

    root/training/image_2/NNNNNN_10.png          left colour image (frame 10 of the sequence; _11 is the next frame)
    root/training/image_3/NNNNNN_10.png          right colour image
    root/training/disp_occ_0/NNNNNN_10.png       disparity of all pixels with ground truth (16-bit PNG)
    root/training/disp_noc_0/NNNNNN_10.png       disparity of the non-occluded pixels only
    root/training/calib_cam_to_cam/NNNNNN.txt    calibration (optional: P_rect_02, P_rect_03)
    root/testing/image_2/, image_3/              test pairs, without ground truth

:class:`KITTI2012DataModule` reads ``data_stereo_flow``: the same with ``colored_0``, ``colored_1``,
``disp_occ``, ``disp_noc`` and ``calib/NNNNNN.txt`` (P2, P3). Only the ``_10`` frames have ground truth.

Disparities are 16-bit PNGs: disparity = value / 256, and 0 means no ground truth (KITTI's ground
truth is sparse, from a laser scanner). The "noc" pixels of the metrics are those with a disparity in
the ``disp_noc`` file. ``root`` may also be the folder that holds ``data_scene_flow/`` or
``data_stereo_flow/``. Folder names are matched case-insensitively.

Splits: KITTI publishes ground truth for ``training/`` only, so ``lattn test`` scores every training
pair (zero-shot evaluation: a model not trained on KITTI). Fine-tuning holds out ``val_fraction`` of the
training pairs for validation (each pair is its own scene); the test pairs go to the benchmark's server
(``--data.predict_split testing``). KITTI 2015's ``disp_occ_1`` is the next frame's disparity, not the
right view's, so the view-swapping flip (``flip_prob``) is not available.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import ClassVar

from .calibration import read_kitti_calib
from .datamodule import StereoDataModule
from .files import FolderListing, StereoSample

log = logging.getLogger(__name__)

__all__ = ["KITTI2012DataModule", "KITTI2015DataModule"]

FRAME = re.compile(r"^(\d{6})_10\.png$", re.IGNORECASE)


class _KITTIDataModule(StereoDataModule):
    """What KITTI 2012 and 2015 share; the subclasses name their folders."""

    year: ClassVar[int]
    download_folder: ClassVar[str]
    left_folder: ClassVar[str]
    right_folder: ClassVar[str]
    occ_folder: ClassVar[str]
    noc_folder: ClassVar[str]
    calib_folder: ClassVar[str]
    score_all_ground_truth = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if self.train_transform.flip_prob > 0:
            raise ValueError(f"{type(self).__name__}: flip_prob must be 0: KITTI has no right-view disparities "
                             "(the view-swapping flip needs them)")
        self._listing = FolderListing()

    def _split_folder(self, split: str) -> Path:
        root = self.dataset_root
        for base in (root, self._listing.folder(root, self.download_folder)):
            folder = self._listing.folder(base, split)
            if folder is not None:
                return folder
        raise FileNotFoundError(f"{type(self).__name__}: {root / split} not found; expected {self.layout}")

    def _pairs(self, split: str, ground_truth: bool) -> list[StereoSample]:
        folder = self._split_folder(split)
        left_dir = self._listing.folder(folder, self.left_folder)
        right_dir = self._listing.folder(folder, self.right_folder)
        if left_dir is None:
            raise FileNotFoundError(f"{type(self).__name__}: {folder / self.left_folder} not found; expected the left "
                                    f"images NNNNNN_10.png of KITTI {self.year} there")
        occ_dir = self._listing.folder(folder, self.occ_folder) if ground_truth else None
        noc_dir = self._listing.folder(folder, self.noc_folder) if ground_truth else None
        calib_dir = self._listing.folder(folder, self.calib_folder)
        right_files, occ_files, noc_files = (self._listing.files(d) for d in (right_dir, occ_dir, noc_dir))
        calib_files = self._listing.files(calib_dir)
        root = self.dataset_root
        samples: list[StereoSample] = []
        missing: list[Path] = []
        for name in sorted(self._listing.files(left_dir).values()):
            match = FRAME.match(name)
            if match is None:
                continue
            key = name.lower()
            needed = [(right_dir, self.right_folder, right_files)]
            if ground_truth:
                needed += [(occ_dir, self.occ_folder, occ_files), (noc_dir, self.noc_folder, noc_files)]
            absent = [(d or folder / sub) / name for d, sub, files in needed if key not in files]
            if absent:
                missing.extend(absent)
                continue
            calib_name = calib_files.get(f"{match.group(1)}.txt")
            calibration = read_kitti_calib(calib_dir / calib_name) if calib_name else None
            left = left_dir / name
            samples.append(StereoSample(
                left=left,
                right=right_dir / right_files[key],
                disparity=occ_dir / occ_files[key] if ground_truth else None,
                disparity_right=None,
                name=left.relative_to(root).as_posix(),
                sequence=f"kitti{self.year}/{match.group(1)}",
                nonoccluded=noc_dir / noc_files[key] if ground_truth else None,
                calibration=calibration,
            ))
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {len(missing)} file(s) missing in {folder}: every left image "
                f"{self.left_folder}/NNNNNN_10.png needs {self.right_folder}/"
                + (f", {self.occ_folder}/ and {self.noc_folder}/" if ground_truth else "")
                + f" files of the same name. First missing: {', '.join(str(p) for p in missing[:5])}"
            )
        if not samples:
            raise FileNotFoundError(f"{type(self).__name__}: no pairs found: looked for NNNNNN_10.png in {left_dir}")
        log.info("KITTI %d %s: %d pairs", self.year, split, len(samples))
        return samples

    def training_frames(self, need_right_disparity: bool) -> list[StereoSample]:
        return self._pairs("training", ground_truth=True)

    def test_frames(self) -> list[StereoSample]:
        """Every training pair: KITTI publishes ground truth for training/ only (see the module docstring)."""
        return self._pairs("training", ground_truth=True)

    def split_pairs(self, split: str) -> list[StereoSample]:
        return self._pairs(split, ground_truth=False)


class KITTI2015DataModule(_KITTIDataModule):
    """KITTI 2015 stereo (``data_scene_flow``): see the module docstring for the layout and splits.

    Args:
        **kwargs: the options of :class:`~lattn_app.data.stereo.StereoDataModule` and ``root`` (the
            folder with ``training/`` and ``testing/``, or the one holding ``data_scene_flow/``; required:
            there is no embedded set), ``batch_size``, ``eval_batch_size``, ``num_workers``.
    """

    year = 2015
    benchmark_name = "KITTI 2015"
    benchmark_metrics = ("d1_all", "d1_noc", "bad3_all", "bad3_noc")  # D1-all on all / non-occluded pixels
    download_folder = "data_scene_flow"
    left_folder, right_folder, occ_folder, noc_folder, calib_folder = (
        "image_2", "image_3", "disp_occ_0", "disp_noc_0", "calib_cam_to_cam")
    layout = "training/ with image_2/, image_3/, disp_occ_0/, disp_noc_0/ (KITTI 2015, data_scene_flow)"


class KITTI2012DataModule(_KITTIDataModule):
    """KITTI 2012 stereo (``data_stereo_flow``): see the module docstring for the layout and splits.

    Args:
        **kwargs: as :class:`KITTI2015DataModule` (``root``: the folder with ``training/``, or the one
            holding ``data_stereo_flow/``).
    """

    year = 2012
    benchmark_name = "KITTI 2012"
    benchmark_metrics = ("bad3_noc", "bad3_all", "avgerr_noc", "avgerr_all")  # Out-Noc/Out-All (>3 px), Avg-Noc/All
    download_folder = "data_stereo_flow"
    left_folder, right_folder, occ_folder, noc_folder, calib_folder = (
        "colored_0", "colored_1", "disp_occ", "disp_noc", "calib")
    layout = "training/ with colored_0/, colored_1/, disp_occ/, disp_noc/ (KITTI 2012, data_stereo_flow)"
