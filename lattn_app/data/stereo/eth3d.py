"""ETH3D two-view stereo as distributed (Schöps et al., CVPR 2017).

:class:`ETH3DDataModule` reads::

    root/two_view_training/<scene>/im0.png, im1.png, calib.txt       (grey images; read as RGB)
    root/two_view_training_gt/<scene>/disp0GT.pfm, mask0nocc.png     (the ground-truth download)
    root/two_view_test/<scene>/im0.png, im1.png, calib.txt           (no ground truth)

- ``disp0GT.pfm``: the left view's disparity; infinity means unknown (0 in lattn: no ground truth).
- ``mask0nocc.png``: 255 marks the non-occluded pixels, the ones ETH3D's table scores.
- ``calib.txt``: Middlebury's format (``cam0``, ``cam1``, ``doffs``, ``baseline``, ``ndisp``, ...).

Splits: every training scene is a test pair (``lattn test``: ETH3D publishes ground truth for
``two_view_training`` only) and a training pair; validation holds out ``val_fraction`` of the scenes.
``--data.predict_split testing`` predicts ``two_view_test``.
"""

from __future__ import annotations

import logging

from .datamodule import StereoDataModule
from .files import FolderListing, StereoSample
from .middlebury import scene_pairs

log = logging.getLogger(__name__)

__all__ = ["ETH3DDataModule"]


class ETH3DDataModule(StereoDataModule):
    """ETH3D two-view stereo: see the module docstring for the layout and splits.

    Args:
        **kwargs: the options of :class:`~lattn_app.data.stereo.StereoDataModule` and ``root`` (the folder
            with ``two_view_training/`` and ``two_view_training_gt/``; required: there is no embedded set),
            ``batch_size``, ``eval_batch_size``, ``num_workers``.
    """

    layout = ("two_view_training/<scene>/{im0.png, im1.png, calib.txt} and "
              "two_view_training_gt/<scene>/{disp0GT.pfm, mask0nocc.png} (ETH3D two-view)")
    benchmark_name = "ETH3D"
    benchmark_metrics = ("bad1_noc", "avgerr_noc")
    score_all_ground_truth = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if self.train_transform.flip_prob > 0:
            raise ValueError("ETH3DDataModule: flip_prob must be 0 (ETH3D has no right-view disparities)")
        self._listing = FolderListing()

    def _folder(self, name: str, what: str):
        folder = self._listing.folder(self.dataset_root, name)
        if folder is None:
            raise FileNotFoundError(f"ETH3DDataModule: {self.dataset_root / name} not found; expected {what} there")
        return folder

    def _scenes(self, ground_truth: bool, split: str = "training") -> list[StereoSample]:
        images = self._folder(f"two_view_{'test' if split == 'testing' else 'training'}", f"ETH3D's {split} scenes")
        truth = self._folder("two_view_training_gt", "the ground truth (disp0GT.pfm, mask0nocc.png per scene)") \
            if ground_truth else None
        samples = scene_pairs(self._listing, images, self.dataset_root, "eth3d",
                              ("disp0GT.pfm",) if ground_truth else (), truth, owner="ETH3DDataModule")
        log.info("ETH3D %s: %d scenes", split, len(samples))
        return samples

    def training_frames(self, need_right_disparity: bool) -> list[StereoSample]:
        return self._scenes(ground_truth=True)

    def test_frames(self) -> list[StereoSample]:
        return self._scenes(ground_truth=True)

    def split_pairs(self, split: str) -> list[StereoSample]:
        return self._scenes(ground_truth=False, split=split)
