"""Albumentations pipelines for image classification.

Every pipeline takes an RGB ``uint8`` image of shape (H, W, 3) (``pipeline(image=array)["image"]``) and
returns a ``float32`` torch tensor of shape (3, image_size, image_size) with values in [0, 1]. The
images are *not* normalised by mean and standard deviation here: the model does that, so that a
checkpoint carries its own normalisation.

- :func:`classification_train_transform`: the usual ImageNet training augmentation (random resized
  crop, horizontal flip, colour jitter), as in timm;
- :func:`classification_eval_transform`: resize the shorter side to ``image_size / crop_pct``, then a
  centre crop of ``image_size`` (``crop_pct=1`` with square inputs is a plain resize);
- :func:`cifar_train_transform`: the X-formers paper's CIFAR augmentation (random 32 x 32 crop of the
  image zero-padded by 4 pixels, horizontal flip).

Random transforms draw from the pipeline's own generator (albumentations does not use the global
seeds); the training loader reseeds it for every sample from (run seed, epoch, sample)
(:class:`~lattn_app.data.resumable.SeededDataset`), so augmentation is reproducible, resumes exactly
and does not depend on the number of workers.
"""

from __future__ import annotations

import math

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels per side); got {image_size!r}")
    return image_size


def _to_tensor() -> list[A.BasicTransform]:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    return [A.ToFloat(max_value=255.0), ToTensorV2()]


def classification_train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
) -> A.Compose:
    """Training augmentation: RandomResizedCrop -> HorizontalFlip -> ColorJitter -> float tensor.

    Args:
        image_size: side of the square output crop, in pixels.
        scale: range of the crop's area as a fraction of the image area (timm / torchvision default).
        ratio: range of the crop's aspect ratio before it is resized to a square.
        hflip: probability of a horizontal flip (0 disables it).
        color_jitter: strength of the brightness, contrast and saturation jitter, each drawn from
            [1 - s, 1 + s] (hue is left alone, as in timm); None or 0 disables it.
    """
    _check_size(image_size)
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1; got {tuple(scale)!r}")
    if not 0 <= hflip <= 1:
        raise ValueError(f"hflip is a probability in [0, 1]; got {hflip!r}")
    if color_jitter is not None and color_jitter < 0:
        raise ValueError(f"color_jitter must be >= 0 or None; got {color_jitter!r}")
    steps: list[A.BasicTransform] = [
        A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(scale), ratio=tuple(ratio),
                            interpolation=cv2.INTER_LINEAR),
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if color_jitter:
        steps.append(A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                   hue=0.0, p=1.0))
    return A.Compose(steps + _to_tensor())


def classification_eval_transform(image_size: int, crop_pct: float = 0.875) -> A.Compose:
    """Evaluation preprocessing: resize the shorter side to ``floor(image_size / crop_pct)``, centre crop.

    ``crop_pct=0.875`` is the standard ImageNet protocol (256 -> 224); ``crop_pct=1`` keeps the whole
    image of a square input (CIFAR: a 32 x 32 image stays as it is). Deterministic.
    """
    _check_size(image_size)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1]; got {crop_pct!r}")
    resize_to = max(image_size, math.floor(image_size / crop_pct))
    return A.Compose([
        A.SmallestMaxSize(max_size=resize_to, interpolation=cv2.INTER_LINEAR),
        A.CenterCrop(height=image_size, width=image_size),
        *_to_tensor(),
    ])


def cifar_train_transform(image_size: int = 32, padding: int = 4, hflip: float = 0.5) -> A.Compose:
    """The X-formers paper's CIFAR augmentation: zero-pad by `padding`, random 32 x 32 crop, flip.

    The crop has the input's size (32 for CIFAR); with ``image_size != 32`` it is then resized to
    ``image_size`` (e.g. to fine-tune a 224-pixel model on CIFAR).
    """
    _check_size(image_size)
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding!r}")
    steps: list[A.BasicTransform] = [
        A.Pad(padding=padding, fill=0, border_mode=cv2.BORDER_CONSTANT),
        A.RandomCrop(height=32, width=32),
    ]
    if hflip > 0:
        steps.append(A.HorizontalFlip(p=hflip))
    if image_size != 32:
        steps.append(A.Resize(height=image_size, width=image_size, interpolation=cv2.INTER_LINEAR))
    return A.Compose(steps + _to_tensor())
