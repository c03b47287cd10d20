"""Training augmentation of a stereo pair that keeps its geometry consistent (shared by every stereo dataset)."""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

__all__ = ["StereoAugmentation"]


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

    Randomness comes from the pipeline's own generator, which :meth:`set_random_seed` reseeds (the
    training loader does so for every sample from (seed, epoch, index): see
    :mod:`lattn_app.data.resumable`), or from a generator passed to ``__call__``.
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
        self.rng = np.random.default_rng()
        self.photometric = None
        if photometric:
            targets = {} if asymmetric_color else {"right": "image"}
            self.photometric = A.Compose(photometric, additional_targets=targets)

    def set_random_seed(self, seed: int) -> None:
        """Draw the next augmentations from `seed` (the same seed gives the same augmentation)."""
        self.rng = np.random.default_rng(seed)

    def __call__(
        self,
        left: np.ndarray,
        right: np.ndarray,
        disparity: np.ndarray,
        disparity_right: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray | None]:
        """Augment one sample; returns a dict with "left", "right", "disparity", "disparity_right"."""
        rng = rng if rng is not None else self.rng
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


def _resize_disparity(disparity: np.ndarray, size: tuple[int, int], factor_x: float) -> np.ndarray:
    """Nearest-neighbour resize to `size` (W, H), values multiplied by the horizontal factor."""
    return cv2.resize(disparity, size, interpolation=cv2.INTER_NEAREST) * np.float32(factor_x)
