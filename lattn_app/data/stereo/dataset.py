"""Stereo samples read from files, the same for every dataset layout.

Every sample is a dict:

- ``"left"``, ``"right"``: float32 tensors (3, H, W) with values in [0, 1] (not normalised: the model
  normalises);
- ``"disparity"``: float32 tensor (H, W), the left-view disparity in pixels (the left pixel x matches
  the right pixel x - d); 0 marks pixels without ground truth. Absent in prediction samples;
- ``"name"``: the path of the left image relative to the dataset root (or to the prediction folder),
  with ``/`` separators; prediction writers name their files after it;

and, where the dataset knows them (every sample of one dataset has the same keys):

- ``"nonoccluded"``: bool tensor (H, W), True where the left pixel is visible in the right view (the
  benchmarks' "noc" pixels);
- ``"disparity_bound"``: float, the largest disparity the pair may hold (``ndisp`` of calib.txt, or
  ``--data.disparity_bound``); a model with a smaller range evaluates the pair at a reduced scale;
- ``"calibration"``: dict of floats ``focal_length``, ``baseline``, ``doffs``, ``cx``, ``cy`` (NaN: the
  image centre), for depth.

Batches: samples of one size are stacked; a batch of several sizes (evaluation and prediction of pairs
as they come) keeps ``left``, ``right``, ``disparity`` and ``nonoccluded`` as lists of per-sample tensors
(each with a batch dimension of 1), which :func:`split_batch` and the stereo task handle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..base import image_to_tensor
from ..io import ImageReadError, _open_fully, read_disparity_png16, read_image, read_pfm
from .augmentation import StereoAugmentation
from .calibration import StereoCalibration
from .files import StereoSample

__all__ = ["StereoDataset", "read_disparity", "read_nonoccluded", "split_batch", "stereo_collate"]

PER_SAMPLE_MAPS = ("left", "right", "disparity", "nonoccluded")  # the keys a batch of several sizes keeps as lists


def read_disparity(path: str | os.PathLike) -> np.ndarray:
    """Read a disparity file as float32 (H, W): a PFM (Scene Flow, Middlebury, ETH3D) or a 16-bit PNG (KITTI).

    Disparities are positive; 0 marks a pixel without ground truth, which the loss and the metrics
    ignore: non-finite PFM values (Middlebury's and ETH3D's infinities) and KITTI's 0 both become 0.
    A colour PFM contributes its first channel; a PNG holds value / 256 (KITTI's convention).

    Raises:
        PFMError, ImageReadError: the file is not a valid PFM / 16-bit PNG.
        ValueError: the file holds negative disparities (not a disparity map of the left view).
    """
    if Path(path).suffix.lower() == ".png":
        return read_disparity_png16(path)
    disparity = read_pfm(path)
    if disparity.ndim == 3:
        disparity = np.ascontiguousarray(disparity[..., 0])
    finite = np.isfinite(disparity)
    if not finite.all():
        disparity[~finite] = 0.0
    if (disparity < 0).any():
        raise ValueError(
            f"{path}: negative disparities (down to {float(disparity.min()):.3f}); disparities are "
            "positive (the left pixel x matches the right pixel x - d)"
        )
    return disparity


def read_nonoccluded(path: str | os.PathLike) -> np.ndarray:
    """The non-occluded pixels (bool (H, W)) of a mask PNG or of a KITTI disp_noc PNG.

    An 8-bit mask (MiddEval3's and ETH3D's ``mask0nocc.png``: 255 = non-occluded, 128 = occluded, 0 =
    no ground truth) gives its 255 pixels; a 16-bit disparity PNG (KITTI's ``disp_noc``) gives its pixels
    with a disparity.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageReadError: the file is not an 8-bit grey mask or a 16-bit disparity PNG.
    """
    image = _open_fully(Path(path))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return read_disparity_png16(path) > 0
    if image.mode in ("L", "P", "RGB", "RGBA", "LA"):
        return np.asarray(image.convert("L")) == 255
    raise ImageReadError(f"{path}: expected an 8-bit mask (255 = non-occluded) or a 16-bit disparity PNG, "
                         f"got Pillow mode {image.mode!r}")


def _calibration_values(calibration: StereoCalibration) -> dict[str, float]:
    nan = float("nan")
    return {"focal_length": float(calibration.focal_length), "baseline": float(calibration.baseline),
            "doffs": float(calibration.doffs), "cx": nan if calibration.cx is None else float(calibration.cx),
            "cy": nan if calibration.cy is None else float(calibration.cy)}


class StereoDataset(Dataset):
    """Stereo frames read from files; samples are dicts (see the module docstring).

    Args:
        samples: the frames; a sample without ``disparity`` gives a prediction sample (no "disparity").
        transform: training augmentation, or None for the full images as stored.
        use_right_disparity: read the right-view disparity too (the view-swapping flip needs it).
        disparity_bound: the largest disparity of the pairs where their calibration states none (its
            ``ndisp`` wins); None: not known.
        calibration: the calibration of pairs that have none of their own (given on the command line).
    """

    def __init__(self, samples: Sequence[StereoSample], transform: StereoAugmentation | None = None,
                 use_right_disparity: bool = False, disparity_bound: float | None = None,
                 calibration: StereoCalibration | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.use_right_disparity = use_right_disparity
        self.disparity_bound = disparity_bound
        self.calibration = calibration

    def _extras(self, sample: StereoSample) -> dict[str, Any]:
        """The optional keys of an evaluation or prediction sample (see the module docstring)."""
        extras: dict[str, Any] = {}
        calibration = sample.calibration or self.calibration
        bound = calibration.ndisp if calibration is not None and calibration.ndisp else self.disparity_bound
        if bound is not None:
            extras["disparity_bound"] = float(bound)
        if calibration is not None:
            extras["calibration"] = _calibration_values(calibration)
        return extras

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        left, right = read_image(sample.left), read_image(sample.right)
        if left.shape != right.shape:
            raise ValueError(f"the stereo pair {sample.left} ({left.shape[1]}x{left.shape[0]}) and {sample.right} "
                             f"({right.shape[1]}x{right.shape[0]}) differ in size; both views must have the same size")
        if sample.disparity is None:
            return {"left": image_to_tensor(left), "right": image_to_tensor(right), "name": sample.name,
                    **self._extras(sample)}
        disparity = read_disparity(sample.disparity)
        disparity_right = None
        if self.use_right_disparity and sample.disparity_right is not None:
            disparity_right = read_disparity(sample.disparity_right)
        for path, values in ((sample.disparity, disparity), (sample.disparity_right, disparity_right)):
            if values is not None and values.shape != left.shape[:2]:
                raise ValueError(f"{path}: disparity of size {values.shape[1]}x{values.shape[0]} but the image "
                                 f"{sample.left} is {left.shape[1]}x{left.shape[0]}; expected the same size")
        if self.transform is not None:
            # Seeded per sample by the training loader (SeededDataset calls transform.set_random_seed).
            out = self.transform(left, right, disparity, disparity_right)
            left, right, disparity = out["left"], out["right"], out["disparity"]
            return {
                "left": image_to_tensor(left),
                "right": image_to_tensor(right),
                "disparity": torch.from_numpy(np.ascontiguousarray(disparity, dtype=np.float32)),
                "name": sample.name,
            }
        item = {
            "left": image_to_tensor(left),
            "right": image_to_tensor(right),
            "disparity": torch.from_numpy(np.ascontiguousarray(disparity, dtype=np.float32)),
            "name": sample.name,
        }
        if sample.nonoccluded is not None:
            mask = read_nonoccluded(sample.nonoccluded)
            if mask.shape != disparity.shape:
                raise ValueError(f"{sample.nonoccluded}: mask of size {mask.shape[1]}x{mask.shape[0]} but the image "
                                 f"{sample.left} is {left.shape[1]}x{left.shape[0]}; expected the same size")
            item["nonoccluded"] = torch.from_numpy(mask & (disparity > 0))
        item.update(self._extras(sample))
        return item


def stereo_collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch ("name" becomes a list of strings).

    Samples of several sizes (evaluation and prediction take images as they come) are not stacked:
    ``left``, ``right``, ``disparity`` and ``nonoccluded`` become lists of per-sample tensors with a batch
    dimension of 1 (see :func:`split_batch`); the other keys are collated as usual.
    """
    keys = set(batch[0])
    for sample in batch[1:]:
        if set(sample) != keys:
            raise ValueError(f"cannot batch stereo samples with different keys: {sample['name']} has "
                             f"{sorted(sample)}, {batch[0]['name']} has {sorted(keys)}")
    if len({tuple(sample["left"].shape[-2:]) for sample in batch}) == 1:
        return default_collate(batch)
    stacked = default_collate([{k: v for k, v in sample.items() if k not in PER_SAMPLE_MAPS} for sample in batch])
    for key in PER_SAMPLE_MAPS:
        if key in keys:
            stacked[key] = [sample[key].unsqueeze(0) for sample in batch]
    return stacked


def split_batch(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch as per-sample batches of one (tensors keep a batch dimension of 1; names are lists of one)."""
    size = len(batch["name"])
    samples = []
    for index in range(size):
        sample: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, list):
                sample[key] = value[index] if key in PER_SAMPLE_MAPS else [value[index]]
            elif isinstance(value, dict):
                sample[key] = {k: v[index : index + 1] for k, v in value.items()}
            else:
                sample[key] = value[index : index + 1]
        samples.append(sample)
    return samples


