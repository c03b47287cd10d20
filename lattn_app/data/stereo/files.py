"""Finding stereo files: one frame's files, case-insensitive folder lookup, and pairs to predict."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .calibration import StereoCalibration

__all__ = ["IMAGE_SUFFIXES", "FolderListing", "StereoSample", "find_predict_pairs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class StereoSample:
    """The files of one stereo frame."""

    left: Path
    right: Path
    disparity: Path | None  #: left-view disparity file (None for prediction pairs)
    disparity_right: Path | None  #: right-view disparity file (used by the view-swapping flip)
    name: str  #: the left image's path relative to the dataset root, '/' separated
    sequence: str  #: the sequence it belongs to, e.g. "flyingthings3d/TRAIN/A/0000"
    #: where the left view's non-occluded pixels are marked: an 8-bit mask PNG (255 = non-occluded: MiddEval3's
    #: and ETH3D's mask0nocc.png) or a 16-bit disparity PNG whose valid pixels are the non-occluded ones (KITTI's
    #: disp_noc); None: not known
    nonoccluded: Path | None = None
    calibration: StereoCalibration | None = None  #: the pair's calibration, where the dataset has one


class FolderListing:
    """Cached folder listings with case-insensitive lookup of child names."""

    def __init__(self) -> None:
        # folder -> (sub-folder names, file names), each as {lower-case name: name on disk}
        self._cache: dict[Path, tuple[dict[str, str], dict[str, str]]] = {}

    def _entries(self, folder: Path) -> tuple[dict[str, str], dict[str, str]]:
        if folder not in self._cache:
            folders: dict[str, str] = {}
            files: dict[str, str] = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in sorted(entries, key=lambda e: e.name):
                        try:
                            target = folders if entry.is_dir() else files
                        except OSError:
                            continue
                        # Exact lower-case names win over case variants ("left" over "Left").
                        if entry.name.lower() not in target or entry.name == entry.name.lower():
                            target[entry.name.lower()] = entry.name
            except (FileNotFoundError, NotADirectoryError):
                pass
            self._cache[folder] = (folders, files)
        return self._cache[folder]

    def folder(self, parent: Path | None, name: str) -> Path | None:
        """The child folder `name` of `parent`, matched case-insensitively, or None."""
        if parent is None:
            return None
        actual = self._entries(parent)[0].get(name.lower())
        return parent / actual if actual is not None else None

    def path(self, parent: Path | None, parts: Iterable[str]) -> Path | None:
        for part in parts:
            parent = self.folder(parent, part)
        return parent

    def subfolders(self, folder: Path) -> list[str]:
        return sorted(self._entries(folder)[0].values())

    def files(self, folder: Path | None) -> dict[str, str]:
        return {} if folder is None else self._entries(folder)[1]


def find_predict_pairs(pairs: str | os.PathLike | Sequence[Sequence[str]]) -> list[StereoSample]:
    """Stereo pairs to predict: a folder with ``left/`` and ``right/`` of same-named images, or a list
    of ``[left, right]`` image paths.

    Names: for a folder, the left image's path relative to it (``left/0001.png``); for a list, the left
    image's path relative to the deepest folder that holds all the left images (its file name when
    they share a folder), so that names never point outside a prediction folder.

    Raises:
        FileNotFoundError: the folder, a sub-folder, or an image is missing (named in the message).
        ValueError: an entry of the list is not a [left, right] pair, or nothing is found.
    """
    if isinstance(pairs, (str, os.PathLike)):
        folder = Path(pairs).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"predict_pairs: {folder} is not a folder; expected a folder with left/ and right/ "
                                    "sub-folders of same-named images, or a list of [left, right] image paths")
        listing = FolderListing()
        left_dir, right_dir = listing.folder(folder, "left"), listing.folder(folder, "right")
        if left_dir is None or right_dir is None:
            absent = "left" if left_dir is None else "right"
            raise FileNotFoundError(f"predict_pairs: {folder} has no {absent}/ sub-folder; "
                                    "expected left/ and right/ sub-folders of same-named images")
        left_names = sorted(name for name in listing.files(left_dir).values() if name.lower().endswith(IMAGE_SUFFIXES))
        if not left_names:
            raise ValueError(f"predict_pairs: no images ({', '.join(IMAGE_SUFFIXES)}) in {left_dir}")
        right_files = listing.files(right_dir)
        missing = [right_dir / name for name in left_names if name.lower() not in right_files]
        if missing:
            raise FileNotFoundError(f"predict_pairs: {len(missing)} of {len(left_names)} left images in {left_dir} have no "
                                    f"same-named right image; first missing: {', '.join(map(str, missing[:3]))}")
        return [StereoSample(left_dir / name, right_dir / right_files[name.lower()], None, None,
                             f"{left_dir.name}/{name}", folder.as_posix()) for name in left_names]

    entries = [list(pair) for pair in pairs]
    for pair in entries:
        if len(pair) != 2:
            raise ValueError(f"predict_pairs: each entry must be [left_image, right_image]; got {pair!r}")
    paths = [(Path(left).expanduser(), Path(right).expanduser()) for left, right in entries]
    if not paths:
        raise ValueError("predict_pairs: the list of [left, right] image pairs is empty")
    missing = [str(path) for pair in paths for path in pair if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"predict_pairs: {len(missing)} image(s) not found: {', '.join(missing[:3])}")
    lefts = [left.resolve() for left, _ in paths]
    common = Path(os.path.commonpath([str(left.parent) for left in lefts]))
    return [StereoSample(left, right, None, None, resolved.relative_to(common).as_posix(), "")
            for (left, right), resolved in zip(paths, lefts)]

