"""Scene Flow (Mayer et al., CVPR 2016) as distributed: FlyingThings3D, Monkaa and Driving.

:class:`SceneFlowDataModule` reads::

    root/FlyingThings3D/frames_cleanpass/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/NNNN.png
    root/FlyingThings3D/frames_finalpass/...                          (same layout)
    root/FlyingThings3D/disparity/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/NNNN.pfm
    root/FlyingThings3D/all_unused_files.txt                          (optional: frames to skip)
    root/Monkaa/frames_cleanpass/<scene>/{left,right}/NNNN.png
    root/Monkaa/disparity/<scene>/{left,right}/NNNN.pfm
    root/Driving/frames_cleanpass/{15mm,35mm}_focallength/scene_{backwards,forwards}/{fast,slow}/{left,right}/NNNN.png
    root/Driving/disparity/...                                        (same layout)

Folder names are matched case-insensitively (``flyingthings3d`` works as well). A sequence is any
folder that holds a ``left/`` folder of PNG images; its frames are matched with ``right/`` and with the
``disparity/`` tree at the same relative path.

Splits: training uses FlyingThings3D TRAIN plus all of Monkaa and Driving (as selected by ``subsets``);
``val_fraction`` of the training *sequences* of each subset are held out for validation (frames of one
sequence are near-duplicates, so holding out frames would leak); the test split is FlyingThings3D TEST,
never used for validation. With ``root=None`` the embedded synthetic set of
:mod:`lattn_app.data.synthetic_stereo` (same layout, FlyingThings3D only, disparities below 48) is used,
with a warning. Samples are described in :mod:`lattn_app.data.stereo.dataset`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from ..base import warn_rank_zero
from ..synthetic_stereo import ensure_synthetic_sceneflow
from .datamodule import StereoDataModule
from .files import FolderListing, StereoSample

log = logging.getLogger(__name__)

__all__ = ["PUBLISHED_FRAME_COUNTS", "SYNTHETIC_MAX_DISPARITY", "SceneFlowDataModule"]

SYNTHETIC_MAX_DISPARITY = 48  # the embedded set's disparities lie in [1, 44]
SUBSET_FOLDERS = {"flyingthings3d": "FlyingThings3D", "monkaa": "Monkaa", "driving": "Driving"}
UNUSED_FILES = "all_unused_files.txt"
# Frames per pass of the distributed Scene Flow data, as used by PSMNet, GwcNet and most stereo papers
# (22,390 + 8,664 + 4,400 = 35,454 training pairs; 4,370 test pairs). These counts are before skipping
# the frames of all_unused_files.txt; the comparison below adds the skipped frames back.
PUBLISHED_FRAME_COUNTS = {
    ("flyingthings3d", "TRAIN"): 22390,
    ("flyingthings3d", "TEST"): 4370,
    ("monkaa", "TRAIN"): 8664,
    ("driving", "TRAIN"): 4400,
}
Subset = Literal["flyingthings3d", "monkaa", "driving"]
Pass = Literal["cleanpass", "finalpass"]


def _sequence_folders(listing: FolderListing, base: Path) -> list[tuple[str, ...]]:
    """Relative paths (as parts) of the folders under `base` that hold a ``left/`` folder."""
    found: list[tuple[str, ...]] = []
    stack: list[tuple[str, ...]] = [()]
    while stack:
        parts = stack.pop()
        folder = base.joinpath(*parts)
        children = listing.subfolders(folder)
        if any(child.lower() == "left" for child in children):
            found.append(parts)
            continue
        stack.extend(parts + (child,) for child in reversed(children) if child.lower() != "right")
    return sorted(found)


def _read_unused_list(path: Path) -> set[tuple[str, ...]]:
    """Frame keys (split, letter, sequence, frame) of FlyingThings3D's all_unused_files.txt, lower case.

    Lines look like ``TRAIN/A/0004/left/0006.png`` (paths below ``frames_cleanpass/``); a frame is
    skipped when either of its views is listed.
    """
    keys: set[tuple[str, ...]] = set()
    for line in path.read_text(errors="replace").splitlines():
        parts = [part for part in line.strip().replace("\\", "/").lower().split("/") if part]
        if len(parts) >= 5 and parts[-2] in ("left", "right"):
            keys.add((parts[-5], parts[-4], parts[-3], Path(parts[-1]).stem))
    return keys


def _expected(folder: Path | None, base: Path, parts: Sequence[str]) -> Path:
    return folder if folder is not None else base.joinpath(*parts)


class SceneFlowDataModule(StereoDataModule):
    """Scene Flow stereo (FlyingThings3D, Monkaa, Driving) as distributed, or the embedded synthetic set.

    See the module docstring for the layout and the splits, :class:`StereoDataModule` for the options
    every stereo dataset shares.

    Args:
        subsets: training subsets among "flyingthings3d", "monkaa", "driving". Each must exist under
            `root`; the embedded set has only flyingthings3d (the others are skipped for it).
        passes: rendering passes to use, "cleanpass" and/or "finalpass" (both: every frame twice).
        exclude_unused: skip the FlyingThings3D frames listed in ``FlyingThings3D/all_unused_files.txt``
            when that file exists (the dataset's authors list them as unusable).
        **kwargs: the options of :class:`StereoDataModule` and ``root`` (the folder holding
            ``FlyingThings3D/``, ``Monkaa/`` and ``Driving/``; None: the embedded synthetic set),
            ``batch_size``, ``eval_batch_size``, ``num_workers``.
    """

    layout = "FlyingThings3D/, Monkaa/ and Driving/ (each with frames_cleanpass/ or frames_finalpass/ and disparity/)"
    embedded_description = "textured shapes at known disparities in the Scene Flow layout"

    def __init__(
        self,
        subsets: list[Subset] = ["flyingthings3d", "monkaa", "driving"],  # noqa: B006 (read only; shown by --help)
        passes: list[Pass] = ["cleanpass"],  # noqa: B006
        exclude_unused: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.subsets = [str(s).lower() for s in subsets]
        if not self.subsets or not set(self.subsets) <= set(SUBSET_FOLDERS):
            raise ValueError(f"SceneFlowDataModule: subsets must be some of {tuple(SUBSET_FOLDERS)}; got {list(subsets)}")
        self.passes = [str(p).lower() for p in passes]
        if not self.passes or not set(self.passes) <= {"cleanpass", "finalpass"}:
            raise ValueError(f"SceneFlowDataModule: passes must be some of ('cleanpass', 'finalpass'); got {list(passes)}")
        self.exclude_unused = exclude_unused
        self._listing = FolderListing()

    def build_embedded(self) -> Path:
        return ensure_synthetic_sceneflow()

    @property
    def disparity_range(self) -> int | None:
        """48 on the embedded set (its disparities lie in [1, 44]); None on Scene Flow (no stated bound)."""
        return SYNTHETIC_MAX_DISPARITY if self.is_embedded else None

    # ------------------------------------------------------------------------------ finding files

    def _subset_folder(self, subset: str) -> Path:
        root = self.dataset_root
        folder = self._listing.folder(root, SUBSET_FOLDERS[subset])
        if folder is None:
            raise FileNotFoundError(
                f"SceneFlowDataModule: subset {subset!r} not found: expected the folder {root / SUBSET_FOLDERS[subset]} "
                f"(with frames_cleanpass/ or frames_finalpass/ and disparity/ inside)"
                + ("" if subset == "flyingthings3d" else f"; remove {subset!r} from --data.subsets to go without it")
            )
        return folder

    def _unused_frames(self, things: Path) -> set[tuple[str, ...]]:
        if not self.exclude_unused:
            return set()
        listed = self._listing.files(things).get(UNUSED_FILES.lower())
        return _read_unused_list(things / listed) if listed else set()

    def _scan(self, subset: str, split: str, pass_name: str, need_right_disparity: bool = False) -> list[StereoSample]:
        """The frames of one subset, split ("TRAIN"/"TEST"; Monkaa and Driving are all TRAIN) and pass.

        Every left image needs its right image and its left-view disparity PFM (and its right-view PFM
        when `need_right_disparity`); missing files are reported all at once.
        """
        subset_dir = self._subset_folder(subset)
        pass_folder = f"frames_{pass_name}"
        images = self._listing.folder(subset_dir, pass_folder)
        if images is None:
            raise FileNotFoundError(f"SceneFlowDataModule: {subset_dir / pass_folder} not found; expected the "
                                    f"{pass_name} images of {SUBSET_FOLDERS[subset]} there (or change --data.passes)")
        disparities = self._listing.folder(subset_dir, "disparity")
        if disparities is None:
            raise FileNotFoundError(f"SceneFlowDataModule: {subset_dir / 'disparity'} not found; expected the "
                                    f"disparity PFMs of {SUBSET_FOLDERS[subset]} there")
        unused: set[tuple[str, ...]] = set()
        if subset == "flyingthings3d":
            images_base = self._listing.folder(images, split)
            if images_base is None:
                raise FileNotFoundError(f"SceneFlowDataModule: {images / split} not found; expected the FlyingThings3D "
                                        f"{split} split there")
            disparity_base = self._listing.folder(disparities, split)
            disparity_expected = disparities / split
            unused = self._unused_frames(subset_dir)
        else:
            images_base, disparity_base, disparity_expected = images, disparities, disparities

        root = self.dataset_root
        samples: list[StereoSample] = []
        missing: list[Path] = []
        excluded = 0
        frames = 0
        for parts in _sequence_folders(self._listing, images_base):
            sequence_dir = images_base.joinpath(*parts)
            left_dir = self._listing.folder(sequence_dir, "left")
            right_dir = self._listing.folder(sequence_dir, "right")
            disparity_dir = self._listing.path(disparity_base, parts)
            disparity_left = self._listing.folder(disparity_dir, "left")
            disparity_right = self._listing.folder(disparity_dir, "right")
            right_files = self._listing.files(right_dir)
            disparity_files = self._listing.files(disparity_left)
            disparity_right_files = self._listing.files(disparity_right)
            expected_disparity = _expected(disparity_left, disparity_expected, (*parts, "left"))
            for name in sorted(self._listing.files(left_dir).values()):
                if not name.lower().endswith(".png"):
                    continue
                stem = Path(name).stem
                if unused and (split.lower(), *(p.lower() for p in parts[-2:]), stem.lower()) in unused:
                    excluded += 1
                    continue
                frames += 1
                right = right_files.get(name.lower())
                disparity = disparity_files.get(f"{stem}.pfm".lower())
                if right is None:
                    missing.append(_expected(right_dir, sequence_dir, ("right",)) / name)
                if disparity is None:
                    missing.append(expected_disparity / f"{stem}.pfm")
                if right is None or disparity is None:
                    continue
                pfm_right = disparity_right_files.get(f"{stem}.pfm".lower())
                if need_right_disparity and pfm_right is None:
                    missing.append(_expected(disparity_right, disparity_expected, (*parts, "right")) / f"{stem}.pfm")
                    continue
                left_path = left_dir / name
                samples.append(StereoSample(
                    left=left_path,
                    right=right_dir / right,
                    disparity=disparity_left / disparity,
                    disparity_right=disparity_right / pfm_right if pfm_right else None,
                    name=left_path.relative_to(root).as_posix(),
                    sequence="/".join((subset, *((split,) if subset == "flyingthings3d" else ()), *parts)),
                ))
        what = f"{SUBSET_FOLDERS[subset]}{' ' + split if subset == 'flyingthings3d' else ''} ({pass_name})"
        if missing:
            raise FileNotFoundError(
                f"SceneFlowDataModule: {len(missing)} file(s) missing for {what}: every left image needs its right "
                f"image and its left-view disparity PFM"
                + (" and right-view disparity PFM (flip_prob > 0)" if need_right_disparity else "")
                + f". First missing: {', '.join(str(p) for p in missing[:5])}"
            )
        if frames == 0:
            raise FileNotFoundError(
                f"SceneFlowDataModule: no frames found for {what}: looked for <sequence>/left/*.png under {images_base}"
                + (f" ({excluded} frames skipped as listed in {UNUSED_FILES})" if excluded else "")
            )
        log.info("Scene Flow %s: %d frames%s", what, len(samples),
                 f" ({excluded} skipped as listed in {UNUSED_FILES})" if excluded else "")
        published = PUBLISHED_FRAME_COUNTS.get((subset, split))
        if not self.is_embedded and published and len(samples) + excluded < published:
            warn_rank_zero("Scene Flow %s: found %d frames (+%d skipped as unused), fewer than the %d of the "
                            "published dataset; is the download complete?", what, len(samples), excluded, published)
        return samples

    def _frames(self, split: str, subsets: Sequence[str], need_right_disparity: bool = False) -> list[StereoSample]:
        samples: list[StereoSample] = []
        for pass_name in self.passes:
            for subset in subsets:
                split_of_subset = split if subset == "flyingthings3d" else "TRAIN"
                samples.extend(self._scan(subset, split_of_subset, pass_name, need_right_disparity))
        return samples

    def _training_subsets(self) -> list[str]:
        if not self.is_embedded:
            return self.subsets
        if "flyingthings3d" not in self.subsets:
            raise ValueError(f"SceneFlowDataModule: the embedded synthetic set has only flyingthings3d, but subsets is "
                             f"{self.subsets}; pass --data.root to use Monkaa or Driving")
        skipped = [s for s in self.subsets if s != "flyingthings3d"]
        if skipped:
            log.info("The embedded synthetic set has only FlyingThings3D; subsets %s are skipped", skipped)
        return ["flyingthings3d"]

    def training_frames(self, need_right_disparity: bool) -> list[StereoSample]:
        return self._frames("TRAIN", self._training_subsets(), need_right_disparity)

    def test_frames(self) -> list[StereoSample]:
        return self._frames("TEST", ["flyingthings3d"])
