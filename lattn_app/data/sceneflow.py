"""Scene Flow stereo data: the datamodule, its dataset, and stereo-aware training augmentation.

:class:`SceneFlowDataModule` reads the Scene Flow datasets (Mayer et al., CVPR 2016) as distributed::

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
:mod:`lattn_app.data.synthetic_stereo` (same layout, FlyingThings3D only) is used, with a warning.

Every sample is a dict:

- ``"left"``, ``"right"``: float32 tensors (3, H, W) with values in [0, 1] (not normalised: the model
  normalises);
- ``"disparity"``: float32 tensor (H, W), the left-view disparity in pixels (the left pixel x matches
  the right pixel x - d); 0 marks pixels without ground truth. Absent in prediction samples;
- ``"name"``: the path of the left image relative to the dataset root (or to the prediction folder),
  with ``/`` separators; prediction writers name their files after it.
"""

from __future__ import annotations

import logging
import os
import random
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, default_collate

from ..registry import check_choice
from .io import read_image, read_pfm
from .resumable import ResumableDataModule
from .synthetic_stereo import ensure_synthetic_sceneflow

log = logging.getLogger(__name__)
_warn_rank_zero = rank_zero_only(log.warning)  # logged once in distributed runs (global rank 0)

__all__ = [
    "PUBLISHED_FRAME_COUNTS",
    "SceneFlowDataModule",
    "StereoAugmentation",
    "StereoDataset",
    "StereoSample",
    "find_predict_pairs",
    "read_disparity",
    "stereo_collate",
]

SYNTHETIC_MAX_DISPARITY = 48  # the embedded set's disparities lie in [2, 44]
SUBSET_FOLDERS = {"flyingthings3d": "FlyingThings3D", "monkaa": "Monkaa", "driving": "Driving"}
PASSES = ("cleanpass", "finalpass")
SPLITS = ("TRAIN", "TEST")
UNUSED_FILES = "all_unused_files.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
# Frames per pass of the distributed Scene Flow data, as used by PSMNet, GwcNet and most stereo papers
# (22,390 + 8,664 + 4,400 = 35,454 training pairs; 4,370 test pairs). These counts are before skipping
# the frames of all_unused_files.txt; the comparison below adds the skipped frames back.
PUBLISHED_FRAME_COUNTS = {
    ("flyingthings3d", "TRAIN"): 22390,
    ("flyingthings3d", "TEST"): 4370,
    ("monkaa", "TRAIN"): 8664,
    ("driving", "TRAIN"): 4400,
}


# ----------------------------------------------------------------------------------------- files


def read_disparity(path: str | os.PathLike) -> np.ndarray:
    """Read a Scene Flow disparity PFM as float32 (H, W); non-finite values become 0 (invalid).

    Scene Flow disparities are positive; 0 marks a pixel without ground truth, which the loss and the
    metrics ignore. A colour PFM contributes its first channel.

    Raises:
        PFMError: the file is not a valid PFM.
        ValueError: the file holds negative disparities (not a Scene Flow disparity map).
    """
    disparity = read_pfm(path)
    if disparity.ndim == 3:
        disparity = np.ascontiguousarray(disparity[..., 0])
    finite = np.isfinite(disparity)
    if not finite.all():
        disparity[~finite] = 0.0
    if (disparity < 0).any():
        raise ValueError(
            f"{path}: negative disparities (down to {float(disparity.min()):.3f}); Scene Flow disparities are "
            "positive (the left pixel x matches the right pixel x - d)"
        )
    return disparity


@dataclass(frozen=True)
class StereoSample:
    """The files of one stereo frame."""

    left: Path
    right: Path
    disparity: Path | None  #: left-view disparity PFM (None for prediction pairs)
    disparity_right: Path | None  #: right-view disparity PFM (used by the view-swapping flip)
    name: str  #: the left image's path relative to the dataset root, '/' separated
    sequence: str  #: the sequence it belongs to, e.g. "flyingthings3d/TRAIN/A/0000"


class _Listing:
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


def _sequence_folders(listing: _Listing, base: Path) -> list[tuple[str, ...]]:
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


# -------------------------------------------------------------------------------------- transforms


class StereoAugmentation:
    """Training augmentation of a stereo pair and its disparity that keeps the geometry consistent.

    Applied in this order (all on numpy arrays; images uint8 RGB (H, W, 3), disparities float32 (H, W)):

    1. random rescale (optional): both views and both disparities are resized by the same factor, and
       the disparities are multiplied by the horizontal factor (nearest-neighbour resampling keeps
       invalid zeros and object edges intact);
    2. random horizontal flip that swaps the views (optional): new left = flip(right), new right =
       flip(left), new disparity = flip(right-view disparity). Flipping one view alone would make the
       disparity negative, so this is the only valid flip; it needs the right-view disparity and is
       skipped for samples without it;
    3. one random crop with the same window for both views and the disparities (clipped to the image
       when the image is smaller than `crop_size`);
    4. photometric jitter (brightness, contrast, saturation, hue, gamma) with albumentations, drawn
       separately for each view when `asymmetric_color` (real stereo cameras differ) or once for both.

    Randomness comes from the generator passed to ``__call__`` (the dataset draws it from torch's
    seed, so augmentations are reproducible and differ between data-loader workers).
    """

    def __init__(
        self,
        crop_size: tuple[int, int] | None = (256, 512),
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.2,
        hue: float = 0.05,
        gamma: tuple[float, float] | None = (0.8, 1.2),
        asymmetric_color: bool = True,
        flip_prob: float = 0.0,
        rescale: tuple[float, float] | None = None,
    ) -> None:
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError(f"crop_size must be (height, width) in pixels or None; got {crop_size!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be a probability in [0, 1]; got {flip_prob!r}")
        if rescale is not None and (len(rescale) != 2 or not 0 < rescale[0] <= rescale[1]):
            raise ValueError(
                f"rescale must be a (min, max) range of scale factors with 0 < min <= max, or None; got {rescale!r}"
            )
        if gamma is not None and (len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]):
            raise ValueError(f"gamma must be a (min, max) range with 0 < min <= max, or None; got {gamma!r}")
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.flip_prob = flip_prob
        self.rescale = tuple(rescale) if rescale is not None else None
        self.asymmetric_color = asymmetric_color
        photometric: list[A.BasicTransform] = []
        if any(value > 0 for value in (brightness, contrast, saturation, hue)):
            photometric.append(
                A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=1.0)
            )
        if gamma is not None and gamma != (1.0, 1.0):
            photometric.append(A.RandomGamma(gamma_limit=(gamma[0] * 100, gamma[1] * 100), p=1.0))
        self.photometric = None
        if photometric:
            targets = {} if asymmetric_color else {"right": "image"}
            self.photometric = A.Compose(photometric, additional_targets=targets)

    def __call__(
        self,
        left: np.ndarray,
        right: np.ndarray,
        disparity: np.ndarray,
        disparity_right: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray | None]:
        """Augment one sample; returns a dict with "left", "right", "disparity", "disparity_right"."""
        rng = rng if rng is not None else np.random.default_rng()
        height, width = left.shape[:2]

        if self.rescale is not None:
            low, high = self.rescale
            if self.crop_size is not None:  # never shrink below the crop
                low = max(low, self.crop_size[0] / height, self.crop_size[1] / width)
                high = max(high, low)
            scale = float(rng.uniform(low, high))
            new_size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 order: (W, H)
            if new_size != (width, height):
                factor_x = new_size[0] / width
                interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                left = cv2.resize(left, new_size, interpolation=interpolation)
                right = cv2.resize(right, new_size, interpolation=interpolation)
                disparity = _resize_disparity(disparity, new_size, factor_x)
                if disparity_right is not None:
                    disparity_right = _resize_disparity(disparity_right, new_size, factor_x)
                height, width = left.shape[:2]

        if self.flip_prob > 0 and disparity_right is not None and rng.random() < self.flip_prob:
            left, right = right[:, ::-1], left[:, ::-1]
            disparity, disparity_right = disparity_right[:, ::-1], disparity[:, ::-1]

        if self.crop_size is not None:
            crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
            top = int(rng.integers(0, height - crop_h + 1))
            left_edge = int(rng.integers(0, width - crop_w + 1))
            window = (slice(top, top + crop_h), slice(left_edge, left_edge + crop_w))
            left, right, disparity = left[window], right[window], disparity[window]
            if disparity_right is not None:
                disparity_right = disparity_right[window]

        left, right = np.ascontiguousarray(left), np.ascontiguousarray(right)
        if self.photometric is not None:
            seed = int(rng.integers(2**32))
            self.photometric.set_random_state(np.random.default_rng(seed), random.Random(seed))
            if self.asymmetric_color:
                left = self.photometric(image=left)["image"]
                right = self.photometric(image=right)["image"]
            else:
                out = self.photometric(image=left, right=right)
                left, right = out["image"], out["right"]
        return {
            "left": left,
            "right": right,
            "disparity": np.ascontiguousarray(disparity, dtype=np.float32),
            "disparity_right": None if disparity_right is None else np.ascontiguousarray(disparity_right, dtype=np.float32),
        }


# ---------------------------------------------------------------------------------------- datasets


def _resize_disparity(disparity: np.ndarray, size: tuple[int, int], factor_x: float) -> np.ndarray:
    """Nearest-neighbour resize to `size` (W, H), values multiplied by the horizontal factor."""
    return cv2.resize(disparity, size, interpolation=cv2.INTER_NEAREST) * np.float32(factor_x)


def _image_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class StereoDataset(Dataset):
    """Stereo frames read from files; samples are dicts (see the module docstring).

    Args:
        samples: the frames; a sample without ``disparity`` gives a prediction sample (no "disparity").
        transform: training augmentation, or None for the full images as stored.
        use_right_disparity: read the right-view disparity too (the view-swapping flip needs it).
    """

    def __init__(self, samples: Sequence[StereoSample], transform: StereoAugmentation | None = None,
                 use_right_disparity: bool = False) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.use_right_disparity = use_right_disparity

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        left, right = read_image(sample.left), read_image(sample.right)
        if left.shape != right.shape:
            raise ValueError(f"the stereo pair {sample.left} ({left.shape[1]}x{left.shape[0]}) and {sample.right} "
                             f"({right.shape[1]}x{right.shape[0]}) differ in size; both views must have the same size")
        if sample.disparity is None:
            return {"left": _image_tensor(left), "right": _image_tensor(right), "name": sample.name}
        disparity = read_disparity(sample.disparity)
        disparity_right = None
        if self.use_right_disparity and sample.disparity_right is not None:
            disparity_right = read_disparity(sample.disparity_right)
        for path, values in ((sample.disparity, disparity), (sample.disparity_right, disparity_right)):
            if values is not None and values.shape != left.shape[:2]:
                raise ValueError(f"{path}: disparity of size {values.shape[1]}x{values.shape[0]} but the image "
                                 f"{sample.left} is {left.shape[1]}x{left.shape[0]}; expected the same size")
        if self.transform is not None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # per sample in training (SeededDataset)
            out = self.transform(left, right, disparity, disparity_right, rng=np.random.default_rng(seed))
            left, right, disparity = out["left"], out["right"], out["disparity"]
        return {
            "left": _image_tensor(left),
            "right": _image_tensor(right),
            "disparity": torch.from_numpy(np.ascontiguousarray(disparity, dtype=np.float32)),
            "name": sample.name,
        }


def stereo_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one size into a batch ("name" becomes a list of strings)."""
    sizes = sorted({tuple(sample["left"].shape[-2:]) for sample in batch})
    if len(sizes) > 1:
        names = ", ".join(sample["name"] for sample in batch[:4])
        raise ValueError(
            f"cannot batch stereo pairs of different sizes {sizes} ({names}, ...): use a batch size of 1 "
            "(--data.eval_batch_size 1; the model pads each pair) or images of one size"
        )
    return default_collate(batch)


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
        listing = _Listing()
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


# -------------------------------------------------------------------------------------- datamodule


class SceneFlowDataModule(ResumableDataModule):
    """Scene Flow stereo (FlyingThings3D, Monkaa, Driving) as distributed, or the embedded synthetic set.

    Training samples are augmented by :class:`StereoAugmentation`; validation and test samples are the
    full images as stored. See the module docstring for the layout, splits and sample format.
    """

    def __init__(
        self,
        root: str | None = None,
        subsets: list[str] = ["flyingthings3d", "monkaa", "driving"],  # noqa: B006 (read only; shown by --help)
        passes: list[str] = ["cleanpass"],  # noqa: B006
        max_disparity: int = 192,
        crop_size: tuple[int, int] | None = (256, 512),
        val_fraction: float = 0.05,
        val_seed: int = 0,
        batch_size: int = 4,
        eval_batch_size: int = 2,
        num_workers: int = 4,
        exclude_unused: bool = True,
        limit_train: int | None = None,
        limit_val: int | None = None,
        limit_test: int | None = None,
        predict_pairs: str | list[list[str]] | None = None,
        brightness: float = 0.3,
        contrast: float = 0.3,
        saturation: float = 0.2,
        hue: float = 0.05,
        gamma: tuple[float, float] | None = (0.8, 1.2),
        asymmetric_color: bool = True,
        flip_prob: float = 0.0,
        rescale: tuple[float, float] | None = None,
    ) -> None:
        """
        Args:
            root: the folder holding ``FlyingThings3D/``, ``Monkaa/`` and ``Driving/``. None: the embedded
                synthetic set (generated once into ``$LATTN_CACHE_DIR`` or ``~/.cache/lattn``), with a warning.
            subsets: training subsets among "flyingthings3d", "monkaa", "driving". Each must exist under
                `root`; the embedded set has only flyingthings3d (the others are skipped for it).
            passes: rendering passes to use, "cleanpass" and/or "finalpass" (both: every frame twice).
            max_disparity: the largest disparity the model predicts, in pixels (the model is given this
                value). Ground truth above it is returned unchanged; the model's loss ignores it.
                With ``root=None`` it is lowered to 48, which covers the embedded set (disparities in [2, 44]).
            crop_size: training crop (height, width) in pixels, clipped to the image when larger; None
                trains on full images. Validation and test always use full images.
            val_fraction: fraction of the training sequences of each subset held out for validation
                (at least one sequence when > 0 and a subset has two or more). 0: no validation.
            val_seed: seed of the choice of validation sequences (the split is the same on every run).
            batch_size: training batch size.
            eval_batch_size: validation, test and prediction batch size (images of one batch must
                have one size; use 1 to predict images of different sizes).
            num_workers: data-loader worker processes (0: load in the main process).
            exclude_unused: skip the FlyingThings3D frames listed in ``FlyingThings3D/all_unused_files.txt``
                when that file exists (the dataset's authors list them as unusable).
            limit_train: use only the first N training frames (quick runs); None: all.
            limit_val: use only the first N validation frames; None: all.
            limit_test: use only the first N test frames; None: all.
            predict_pairs: for ``lattn predict``: a folder with ``left/`` and ``right/`` sub-folders of
                same-named images, or a list of [left_image, right_image] paths. Images may have any size.
            brightness: training colour jitter: brightness factor range [1 - b, 1 + b].
            contrast: training colour jitter: contrast factor range [1 - c, 1 + c].
            saturation: training colour jitter: saturation factor range [1 - s, 1 + s].
            hue: training colour jitter: hue shift range [-h, h] (fraction of the hue circle, <= 0.5).
            gamma: training gamma range (min, max); None: no gamma change.
            asymmetric_color: draw the colour jitter separately for the two views (True) or once (False).
            flip_prob: probability of the horizontal flip that swaps the views (needs the right-view
                disparity PFMs, which Scene Flow ships). 0 (default): off.
            rescale: training rescale range (min, max) of scale factors, disparities scaled with the
                width; None (default): off.
        """
        super().__init__()
        if root is None and max_disparity > SYNTHETIC_MAX_DISPARITY:
            log.info("SceneFlowDataModule: max_disparity %s -> %d for the embedded synthetic set (disparities in [2, 44])",
                     max_disparity, SYNTHETIC_MAX_DISPARITY)
            max_disparity = SYNTHETIC_MAX_DISPARITY
        self.save_hyperparameters()
        # LightningCLI records the given config as hparams; the logged value must be the one the model gets
        # (Lightning refuses to log model and data hparams that disagree).
        self.hparams["max_disparity"] = self._hparams_initial["max_disparity"] = max_disparity
        self.root = root
        self.subsets = [
            check_choice("SceneFlowDataModule: subsets entry", str(s).lower(), tuple(SUBSET_FOLDERS)) for s in subsets
        ]
        if not self.subsets:
            raise ValueError(f"SceneFlowDataModule: subsets is empty; expected some of {tuple(SUBSET_FOLDERS)}")
        self.passes = [check_choice("SceneFlowDataModule: passes entry", str(p).lower(), PASSES) for p in passes]
        if not self.passes:
            raise ValueError(f"SceneFlowDataModule: passes is empty; expected some of {PASSES}")
        if max_disparity < 1:
            raise ValueError(
                f"SceneFlowDataModule: max_disparity must be a positive number of pixels; got {max_disparity!r}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"SceneFlowDataModule: val_fraction must be in [0, 1); got {val_fraction!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"SceneFlowDataModule: {name} must be >= 1; got {value!r}")
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val), ("limit_test", limit_test)):
            if value is not None and value < 1:
                raise ValueError(f"SceneFlowDataModule: {name} must be a positive number of frames or None; got {value!r}")
        self.max_disparity = max_disparity
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.exclude_unused = exclude_unused
        self.limits = {"train": limit_train, "val": limit_val, "test": limit_test}
        self.predict_pairs = predict_pairs
        self.train_transform = StereoAugmentation(
            crop_size=crop_size, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
            gamma=gamma, asymmetric_color=asymmetric_color, flip_prob=flip_prob, rescale=rescale,
        )
        self.train_dataset: StereoDataset | None = None
        self.val_dataset: StereoDataset | None = None
        self.test_dataset: StereoDataset | None = None
        self.predict_dataset: StereoDataset | None = None
        self._dataset_root: Path | None = None
        self._listing = _Listing()

    # ------------------------------------------------------------------------------ finding files

    @property
    def is_synthetic(self) -> bool:
        """True when the embedded synthetic set is used (``root=None``)."""
        return self.root is None

    @property
    def dataset_root(self) -> Path:
        """The root folder read (the embedded set's cache folder when ``root=None``)."""
        if self._dataset_root is None:
            if self.root is None:
                self._dataset_root = ensure_synthetic_sceneflow()
                _warn_rank_zero(
                    "No dataset root given: using the EMBEDDED SYNTHETIC stereo set at %s (textured shapes at "
                    "known disparities in the Scene Flow layout), NOT the Scene Flow dataset. Numbers on it say "
                    "nothing about real stereo accuracy. Pass --data.root /path/to/SceneFlow (the folder holding "
                    "FlyingThings3D/, Monkaa/, Driving/) to train on Scene Flow.", self._dataset_root,
                )
            else:
                root = Path(self.root).expanduser()
                if not root.is_dir():
                    raise FileNotFoundError(f"SceneFlowDataModule: root {root} is not a folder; expected the folder "
                                            "holding FlyingThings3D/, Monkaa/ and Driving/")
                self._dataset_root = root
        return self._dataset_root

    def prepare_data(self) -> None:
        """Generate the embedded synthetic set once (rank 0) when no root is given."""
        if self.root is None:
            ensure_synthetic_sceneflow()

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
        if not self.is_synthetic and published and len(samples) + excluded < published:
            _warn_rank_zero("Scene Flow %s: found %d frames (+%d skipped as unused), fewer than the %d of the "
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
        if not self.is_synthetic:
            return self.subsets
        if "flyingthings3d" not in self.subsets:
            raise ValueError(f"SceneFlowDataModule: the embedded synthetic set has only flyingthings3d, but subsets is "
                             f"{self.subsets}; pass --data.root to use Monkaa or Driving")
        skipped = [s for s in self.subsets if s != "flyingthings3d"]
        if skipped:
            log.info("The embedded synthetic set has only FlyingThings3D; subsets %s are skipped", skipped)
        return ["flyingthings3d"]

    def _split_train_val(self, samples: list[StereoSample]) -> tuple[list[StereoSample], list[StereoSample]]:
        """Hold out val_fraction of the sequences of each subset (deterministic, seeded)."""
        by_subset: dict[str, list[str]] = defaultdict(list)
        for sequence in sorted({s.sequence for s in samples}):
            by_subset[sequence.split("/")[0]].append(sequence)
        held_out: set[str] = set()
        counts = {subset: round(self.val_fraction * len(sequences)) for subset, sequences in by_subset.items()}
        if self.val_fraction > 0 and not any(counts.values()):
            largest = max(by_subset, key=lambda subset: len(by_subset[subset]))
            if len(by_subset[largest]) >= 2:
                counts[largest] = 1
        for subset, sequences in by_subset.items():
            rng = np.random.default_rng([self.val_seed, zlib.crc32(subset.encode())])
            order = rng.permutation(len(sequences))
            held_out.update(sequences[i] for i in order[: counts[subset]])
        if self.val_fraction > 0 and not held_out:
            _warn_rank_zero("SceneFlowDataModule: only one training sequence; no validation set is held out")
        train = [s for s in samples if s.sequence not in held_out]
        val = [s for s in samples if s.sequence in held_out]
        log.info("Scene Flow split: %d training frames, %d validation frames (%d held-out sequences)",
                 len(train), len(val), len(held_out))
        return train, val

    def _limit(self, samples: list[StereoSample], stage: str) -> list[StereoSample]:
        limit = self.limits[stage]
        return samples if limit is None else samples[:limit]

    # ---------------------------------------------------------------------------------- Lightning

    def setup(self, stage: str | None = None) -> None:
        """Find the files of the datasets `stage` needs ("fit", "validate", "test", "predict", None: all)."""
        if stage != "predict":
            _ = self.dataset_root  # resolve the root first (generates and announces the embedded set)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            flip = self.train_transform.flip_prob > 0
            train, val = self._split_train_val(self._frames("TRAIN", self._training_subsets(), need_right_disparity=flip))
            self.train_dataset = StereoDataset(self._limit(train, "train"), self.train_transform, use_right_disparity=flip)
            self.val_dataset = StereoDataset(self._limit(val, "val"))
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = StereoDataset(self._limit(self._frames("TEST", ["flyingthings3d"]), "test"))
        if stage in (None, "predict") and self.predict_dataset is None:
            if self.predict_pairs is None:
                if stage == "predict":
                    raise ValueError("SceneFlowDataModule: nothing to predict; pass --data.predict_pairs FOLDER (with "
                                     "left/ and right/ sub-folders) or a list of [left, right] image paths")
            else:
                self.predict_dataset = StereoDataset(find_predict_pairs(self.predict_pairs))
        counts = {name: len(getattr(self, f"{name}_dataset") or ()) for name in ("train", "val", "test", "predict")}
        log.info("Scene Flow datasets after setup(%s): %s", stage, counts)

    def _loader(self, dataset: StereoDataset | None, stage: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"SceneFlowDataModule: the {stage} dataset is not set up; call setup() first")
        options = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                       pin_memory=torch.cuda.is_available(), collate_fn=stereo_collate)
        if shuffle:  # training: ordered and augmented by (seed, epoch, sample), resumable mid-epoch
            return self.resumable_train_loader(dataset, batch_size, drop_last=len(dataset) >= batch_size, **options)
        return self.evaluation_loader(dataset, batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is not None and len(self.val_dataset) == 0:
            return []  # val_fraction=0 (or a single sequence): no validation
        return self._loader(self.val_dataset, "val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, "predict", self.eval_batch_size)
