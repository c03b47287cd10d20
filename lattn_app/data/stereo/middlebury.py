"""Middlebury stereo as distributed: the MiddEval3 benchmark and the 2014 scenes (Scharstein et al., GCPR 2014).

:class:`MiddleburyDataModule` reads either layout; ``root`` is the folder that holds it::

    MiddEval3/trainingF/<scene>/im0.png, im1.png, calib.txt       (F = full, H = half, Q = quarter size)
    MiddEval3/trainingF/<scene>/disp0GT.pfm, mask0nocc.png        (the ground-truth download)
    MiddEval3/testF/<scene>/im0.png, im1.png, calib.txt           (no ground truth)
    MiddEval3/trainingH/..., trainingQ/..., testH/..., testQ/...

    2014/<scene>-perfect/im0.png, im1.png, disp0.pfm, calib.txt   (the 2014 scenes; -imperfect alike)

``root`` may be ``MiddEval3/`` itself or its parent; for the 2014 scenes, the folder of scene folders.
``resolution`` (F, H or Q) chooses MiddEval3's folder; the 2014 scenes are full size.

- Disparities are PFMs in which infinity means unknown (0 in lattn: no ground truth).
- ``mask0nocc.png``: 255 = non-occluded, 128 = occluded, 0 = no ground truth. Without it (the 2014
  scenes) only the all-pixel metrics are reported.
- ``calib.txt`` gives the focal length, principal point, ``doffs`` and ``baseline`` (mm) for depth, and
  ``ndisp``, a conservative bound on the scene's disparities: a model whose ``max_disparity`` is smaller
  evaluates the scene at a reduced scale (:class:`~lattn_app.tasks.stereo.StereoTask`).

Splits: every scene with ground truth is a test pair (``lattn test``) and a training pair; validation
holds out ``val_fraction`` of the scenes. ``--data.predict_split testing`` predicts MiddEval3's test scenes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from .calibration import read_calib_txt
from .datamodule import StereoDataModule
from .files import FolderListing, StereoSample

log = logging.getLogger(__name__)

__all__ = ["MiddleburyDataModule", "scene_pairs"]

Resolution = Literal["F", "H", "Q"]


def scene_pairs(listing: FolderListing, folder: Path, root: Path, subset: str, ground_truth_names: tuple[str, ...],
                ground_truth_folder: Path | None = None, owner: str = "") -> list[StereoSample]:
    """The scenes under `folder` in the Middlebury convention (im0.png, im1.png, calib.txt; ETH3D's too).

    A scene is a sub-folder holding ``im0.png``. With `ground_truth_names` (the first of them that
    exists is the left disparity, e.g. ``disp0GT.pfm``), each scene needs a disparity in the scene folder,
    or in ``ground_truth_folder/<scene>/`` (ETH3D); ``mask0nocc.png`` next to it is used when present.
    Missing files are reported all at once.
    """
    samples: list[StereoSample] = []
    missing: list[Path] = []
    for scene in listing.subfolders(folder):
        scene_dir = folder / scene
        files = listing.files(scene_dir)
        if "im0.png" not in files:
            continue
        truth_dir = scene_dir if ground_truth_folder is None else listing.folder(ground_truth_folder, scene)
        truth_files = listing.files(truth_dir)
        needed = ["im1.png", "calib.txt"]
        absent = [scene_dir / name for name in needed if name not in files]
        disparity = next((truth_files[n.lower()] for n in ground_truth_names if n.lower() in truth_files), None)
        if ground_truth_names and disparity is None:
            absent.append((truth_dir or ground_truth_folder / scene) / ground_truth_names[0])
        if absent:
            missing.extend(absent)
            continue
        mask = truth_files.get("mask0nocc.png") if ground_truth_names else None
        left = scene_dir / files["im0.png"]
        samples.append(StereoSample(
            left=left,
            right=scene_dir / files["im1.png"],
            disparity=truth_dir / disparity if disparity else None,
            disparity_right=None,
            name=left.relative_to(root).as_posix(),
            sequence=f"{subset}/{scene}",
            nonoccluded=truth_dir / mask if mask else None,
            calibration=read_calib_txt(scene_dir / files["calib.txt"]),
        ))
    if missing:
        raise FileNotFoundError(
            f"{owner}: {len(missing)} file(s) missing in {folder}: every scene with im0.png needs im1.png, calib.txt"
            + (f" and {' or '.join(ground_truth_names)}" if ground_truth_names else "")
            + f". First missing: {', '.join(str(p) for p in missing[:5])}"
        )
    if not samples:
        raise FileNotFoundError(f"{owner}: no scenes found in {folder}: expected sub-folders with im0.png, im1.png "
                                "and calib.txt")
    return samples


class MiddleburyDataModule(StereoDataModule):
    """Middlebury stereo (MiddEval3 or the 2014 scenes): see the module docstring for the layouts and splits.

    Args:
        resolution: MiddEval3's image size: ``F`` (full), ``H`` (half) or ``Q`` (quarter). The benchmark's
            metrics are computed at this size (bad-2.0 and average error at the chosen resolution).
        **kwargs: the options of :class:`~lattn_app.data.stereo.StereoDataModule` and ``root``
            (required: there is no embedded set), ``batch_size``, ``eval_batch_size``, ``num_workers``.
    """

    layout = ("MiddEval3/trainingF|H|Q/<scene>/{im0.png, im1.png, calib.txt, disp0GT.pfm, mask0nocc.png}, or "
              "2014 scene folders <scene>/{im0.png, im1.png, calib.txt, disp0.pfm}")
    score_all_ground_truth = True

    def __init__(self, resolution: Resolution = "H", **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if resolution not in ("F", "H", "Q"):
            raise ValueError(f"MiddleburyDataModule: resolution must be 'F', 'H' or 'Q'; got {resolution!r}")
        if self.train_transform.flip_prob > 0:
            raise ValueError("MiddleburyDataModule: flip_prob must be 0 (the right-view disparities are not read)")
        self.resolution = resolution
        self._listing = FolderListing()
        self._has_masks: bool | None = None

    @property
    def benchmark_name(self) -> str:  # type: ignore[override]
        if self.root is None:
            return "Middlebury"
        return f"Middlebury ({self.resolution})" if self._eval3_folder("training") else "Middlebury 2014"

    @property
    def benchmark_metrics(self) -> tuple[str, ...]:  # type: ignore[override]
        """bad-2.0 and average error on all pixels, and on the non-occluded ones where mask0nocc.png exists."""
        if self._has_masks is None and "test" in self.datasets:
            self._has_masks = all(s.nonoccluded is not None for s in self.datasets["test"].samples)
        if self._has_masks:
            return ("bad2_all", "bad2_noc", "avgerr_all", "avgerr_noc")
        return ("bad2_all", "avgerr_all")

    def _eval3_folder(self, split: str) -> Path | None:
        """MiddEval3's ``{training,test}<resolution>`` folder, or None for the 2014 layout."""
        root = self.dataset_root
        name = f"{split}{self.resolution}"
        for base in (root, self._listing.folder(root, "MiddEval3")):
            folder = self._listing.folder(base, name)
            if folder is not None:
                return folder
        return None

    def _scenes(self, split: str, ground_truth: bool) -> list[StereoSample]:
        folder = self._eval3_folder(split)
        if folder is None:
            has_eval3 = any(self._listing.folder(b, f"training{r}") for b in (self.dataset_root,
                            self._listing.folder(self.dataset_root, "MiddEval3")) for r in "FHQ")
            if has_eval3 or split == "test":
                raise FileNotFoundError(f"MiddleburyDataModule: {self.dataset_root / 'MiddEval3' / (split + self.resolution)} "
                                        f"not found; expected MiddEval3's {split} scenes at resolution "
                                        f"{self.resolution} (or change --data.resolution)")
            folder = self.dataset_root  # the 2014 scenes: one folder of scene folders
            names: tuple[str, ...] = ("disp0.pfm",) if ground_truth else ()
        else:
            names = ("disp0GT.pfm",) if ground_truth else ()
        samples = scene_pairs(self._listing, folder, self.dataset_root, "middlebury", names,
                              owner="MiddleburyDataModule")
        log.info("Middlebury %s: %d scenes", folder, len(samples))
        return samples

    def training_frames(self, need_right_disparity: bool) -> list[StereoSample]:
        return self._scenes("training", ground_truth=True)

    def test_frames(self) -> list[StereoSample]:
        """Every scene with ground truth (MiddEval3's training scenes at `resolution`, or the 2014 scenes)."""
        samples = self._scenes("training", ground_truth=True)
        self._has_masks = all(s.nonoccluded is not None for s in samples)
        return samples

    def split_pairs(self, split: str) -> list[StereoSample]:
        return self._scenes("test" if split == "testing" else "training", ground_truth=False)
