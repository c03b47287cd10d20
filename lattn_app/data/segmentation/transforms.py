"""Albumentations pipelines that move an image and its label mask together.

Training (mmsegmentation's ADE20K / Cityscapes pipeline): resize so that the shorter side is
``scale_size`` (left as it is with None), then a random rescale by a factor in ``ratio_range`` (0.5-2.0),
padding to the crop size (image 0, mask the ignore index), a random crop, a horizontal flip, and
photometric jitter (brightness, contrast, saturation, hue) of the image only. Masks are resized with
nearest-neighbour interpolation only: a label is never blended with its neighbours.

Evaluation: the image's shorter side is resized to ``scale_size`` (or left as it is); the mask is not
touched: predictions are scored at the mask's original size.

Random steps draw from the pipeline's own generator, which the training loader reseeds for every
sample (:class:`~lattn_app.data.resumable.SeededDataset`).
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2

__all__ = ["crop_hw", "segmentation_eval_transform", "segmentation_train_transform"]


def crop_hw(crop_size: int | Sequence[int]) -> tuple[int, int]:
    """`crop_size` as (height, width): an int is a square."""
    size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(int(v) for v in crop_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"crop_size must be a positive int or (height, width); got {crop_size!r}")
    return size  # type: ignore[return-value]


def segmentation_train_transform(crop_size: int | Sequence[int], scale_size: int | None = None,
                                 ratio_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5,
                                 color_jitter: float | None = 0.5, ignore_index: int = 255) -> A.Compose:
    """The training pipeline: ``pipeline(image=uint8 (H, W, 3), mask=uint8 (H, W))`` -> image and mask of crop_size.

    Args:
        crop_size: side (or (height, width)) of the training crop.
        scale_size: the shorter side images are first resized to; None: their own size.
        ratio_range: range of the random rescale factor (after the resize to scale_size).
        flip_prob: probability of a horizontal flip.
        color_jitter: strength s of the photometric jitter of the image: contrast and saturation factors in
            [1 - s, 1 + s], brightness in [1 - s/2, 1 + s/2], hue shifted by up to 0.1 s of the colour circle
            (s = 0.5 is close to mmsegmentation's PhotoMetricDistortion); None or 0: none.
        ignore_index: the mask value of padding (ignored by the loss and the metrics).
    """
    height, width = crop_hw(crop_size)
    low, high = (float(v) for v in ratio_range)
    if not 0 < low <= high:
        raise ValueError(f"ratio_range must be (min, max) with 0 < min <= max; got {tuple(ratio_range)!r}")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob is a probability in [0, 1]; got {flip_prob!r}")
    if color_jitter is not None and not 0 <= color_jitter < 1:
        raise ValueError(f"color_jitter must be in [0, 1) or None; got {color_jitter!r}")
    steps: list[A.BasicTransform] = []
    if scale_size is not None:
        steps.append(A.SmallestMaxSize(max_size=int(scale_size), interpolation=cv2.INTER_LINEAR,
                                       mask_interpolation=cv2.INTER_NEAREST))
    if (low, high) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(low - 1, high - 1), interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    steps += [
        A.PadIfNeeded(min_height=height, min_width=width, position="top_left", border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=ignore_index),
        A.RandomCrop(height=height, width=width),
    ]
    if flip_prob > 0:
        steps.append(A.HorizontalFlip(p=flip_prob))
    if color_jitter:
        s = float(color_jitter)
        steps.append(A.ColorJitter(brightness=s / 2, contrast=s, saturation=s, hue=s / 10, p=1.0))
    return A.Compose(steps)


def segmentation_eval_transform(scale_size: int | None = None) -> A.Compose | None:
    """Evaluation: the image's shorter side resized to `scale_size` (None: no transform at all)."""
    if scale_size is None:
        return None
    return A.Compose([A.SmallestMaxSize(max_size=int(scale_size), interpolation=cv2.INTER_LINEAR)])
