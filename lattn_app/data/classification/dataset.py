"""What both classification datamodules share: the dataset of labelled images, the classes, predict folders.

Every sample is a dict. For fit, validate and test::

    {"image": float32 tensor (3, H, W) in [0, 1], "label": int64 scalar tensor}

and for predict ``{"image": ..., "path": str}``. Images are not normalised here: the model does that.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import has_file_allowed_extension, make_dataset

from ..base import LattnDataModule
from ..io import read_image

__all__ = ["IMAGE_EXTENSIONS", "ClassificationDataModule", "ClassificationDataset", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File types read as images (compared case-insensitively)."""

Transform = Callable[..., dict[str, Any]]


def normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    """Lower-case suffixes with their dot (``"PNG"`` -> ``".png"``); at least one."""
    if isinstance(extensions, str):
        extensions = [extensions]
    normalised = tuple(("." + e.lower().lstrip(".")) for e in extensions if e.strip("."))
    if not normalised:
        raise ValueError(f"extensions must name at least one file type, e.g. {IMAGE_EXTENSIONS}; got {extensions!r}")
    return normalised


def visible_files(top: str, extensions: tuple[str, ...]) -> Callable[[str], bool]:
    """torchvision's ``is_valid_file`` test for the paths it builds under `top` (exactly that string prefix):
    a file ending in `extensions` with no hidden part below `top`.

    Hidden entries (``.ipynb_checkpoints/``, macOS's ``._photo.jpg``) are not images of the dataset.
    """
    hidden = os.sep + "."

    def is_valid_file(path: str) -> bool:
        return hidden not in path[len(top):] and has_file_allowed_extension(path, extensions)

    return is_valid_file


def list_images(directory: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file under `directory`, recursively and in sorted order (hidden entries are skipped)."""
    extensions = normalise_extensions(extensions)
    folder = Path(directory).expanduser()
    # torchvision's scan of one class folder, with `directory` as the only "class".
    top = os.path.join(str(folder.parent), folder.name)
    found = make_dataset(str(folder.parent), {folder.name: 0}, is_valid_file=visible_files(top, extensions),
                         allow_empty=True)
    return [Path(os.path.normpath(path)) for path, _ in found]


class ClassificationDataset(Dataset):
    """Labelled images from files or from an in-memory uint8 array, through an albumentations pipeline.

    Training samples are read through :class:`~lattn_app.data.resumable.SeededDataset`, which reseeds
    `transform` (``set_random_seed``) for every sample.

    Args:
        transform: pipeline called as ``transform(image=uint8 (H, W, 3))["image"]``.
        paths: image files (read with :func:`lattn_app.data.io.read_image`), or
        images: an array (N, H, W, 3) of uint8 RGB images; exactly one of the two.
        labels: one class index per image, or None for unlabelled images (predict), whose samples carry
            their ``path`` instead of a ``label``.
    """

    def __init__(
        self,
        transform: Transform,
        paths: Sequence[str] | None = None,
        images: np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if (paths is None) == (images is None):
            raise ValueError("ClassificationDataset needs exactly one of paths and images")
        self.transform = transform
        self.paths = list(paths) if paths is not None else None
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError(f"ClassificationDataset: {len(self.labels)} labels for {len(self)} images")
        if self.labels is None and self.paths is None:
            raise ValueError("ClassificationDataset: images from an array need labels")

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_image(self.paths[index]) if self.paths is not None else self.images[index]
        sample: dict[str, Any] = {"image": self.transform(image=image)["image"]}
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[index], dtype=torch.int64)
        else:
            sample["path"] = self.paths[index]
        return sample


class ClassificationDataModule(LattnDataModule):
    """Base of the classification datamodules: the classes, the image size and the predict folder.

    The classes (:attr:`class_names`, :attr:`num_classes`) are read from the data on first use, which
    the command line does right after building the datamodule (it links ``data.num_classes`` and
    ``data.class_names`` to the model); with ``root=None`` that first use generates the embedded set.
    Subclasses implement :meth:`read_class_names` and ``setup``.

    Args:
        image_size: side of the square images the model sees, in pixels.
        predict_dir: a folder of images (searched recursively) for ``predict``, relative to the current
            directory (or absolute); predictions carry each image's path.
        **kwargs: ``root``, ``batch_size``, ``eval_batch_size``, ``num_workers`` (:class:`LattnDataModule`).
    """

    def __init__(self, image_size: int, predict_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.predict_dir = predict_dir
        self._class_names: list[str] | None = None

    def read_class_names(self) -> list[str]:
        """The class names, in label order, read from the data under :attr:`dataset_root`."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        """One name per class, in label order."""
        if self._class_names is None:
            self._class_names = self.read_class_names()
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict_dataset(self, extensions: Sequence[str], transform: Transform) -> ClassificationDataset:
        """The images of `predict_dir` (unlabelled: their samples carry their path)."""
        if self.predict_dir is None:
            raise ValueError(f"{type(self).__name__}: predict needs a folder of images; pass --data.predict_dir PATH")
        folder = Path(self.predict_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"predict_dir {folder} does not exist or is not a directory")
        paths = list_images(folder, extensions)
        if not paths:
            raise ValueError(f"predict_dir {folder} has no images (searched recursively for {', '.join(extensions)})")
        return ClassificationDataset(transform, paths=[str(p) for p in paths])
