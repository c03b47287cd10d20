"""Stereo samples read from files, the same for every dataset layout.

Every sample is a dict:

- ``"left"``, ``"right"``: float32 tensors (3, H, W) with values in [0, 1] (not normalised: the model
  normalises);
- ``"disparity"``: float32 tensor (H, W), the left-view disparity in pixels (the left pixel x matches
  the right pixel x - d); 0 marks pixels without ground truth. Absent in prediction samples;
- ``"name"``: the path of the left image relative to the dataset root (or to the prediction folder),
  with ``/`` separators; prediction writers name their files after it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..base import image_to_tensor
from ..io import read_image, read_pfm
from .augmentation import StereoAugmentation
from .files import StereoSample

__all__ = ["StereoDataset", "read_disparity", "stereo_collate"]


def read_disparity(path: str | os.PathLike) -> np.ndarray:
    """Read a disparity PFM as float32 (H, W); non-finite values become 0 (invalid).

    Disparities are positive; 0 marks a pixel without ground truth, which the loss and the
    metrics ignore. A colour PFM contributes its first channel.

    Raises:
        PFMError: the file is not a valid PFM.
        ValueError: the file holds negative disparities (not a disparity map of the left view).
    """
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
            return {"left": image_to_tensor(left), "right": image_to_tensor(right), "name": sample.name}
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


