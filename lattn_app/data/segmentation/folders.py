"""A user's own segmentation data: a folder of images, a folder of masks and a class list.

::

    root/classes.txt                     one class name per line; line i (from 0) names mask value i
    root/images/train/**/<name>.<jpg|png|...>
    root/masks/train/**/<name>.png       the same relative path and name, suffix .png
    root/images/val/...   root/masks/val/...      validation (checkpoint selection)
    root/images/test/...  root/masks/test/...     held-out test (optional; needed only by `lattn test`)

Masks are single-channel PNGs (8-bit grey or palette, or 16-bit) whose pixel values are class indices
into ``classes.txt``; ``ignore_value`` (default 255) marks unlabelled pixels. Any other value is an error
naming the mask file and the values. The folder names, the class-list file and the mask suffix are
options, so most existing layouts fit without moving files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..classification.dataset import IMAGE_EXTENSIONS, list_images
from .dataset import LabelMap, Pair, SegmentationDataModule

__all__ = ["SegmentationFolderDataModule", "read_class_list"]


def read_class_list(path: Path) -> list[str]:
    """Class names from a text file, one per line (blank lines and lines starting with # are skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} not found; expected a text file with one class name per line "
                                "(line i names mask value i)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise ValueError(f"{path}: the class list is empty; expected one class name per line")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: class names must be unique; {', '.join(duplicates)} appear more than once")
    return names


class SegmentationFolderDataModule(SegmentationDataModule):
    """Images and masks in folders with a class list (see the module docstring).

    Args:
        classes: the class list, relative to `root` (or absolute), or the names themselves as a list.
        image_dir: the image folders' parent, relative to `root`; split folders below it.
        mask_dir: the mask folders' parent, relative to `root`.
        train_split, val_split, test_split: the split folder names (test_split None: no test set).
        mask_suffix: a mask's name is its image's name with this suffix instead of the image's.
        ignore_value: the mask value of unlabelled pixels.
        **kwargs: ``root`` (required), the augmentation, evaluation-size and predict options of
            :class:`~lattn_app.data.segmentation.dataset.SegmentationDataModule`, ``batch_size``,
            ``eval_batch_size``, ``num_workers``.
    """

    layout = "classes.txt, images/{train,val}/* and masks/{train,val}/*.png (pixel value i = class i of classes.txt)"

    def __init__(self, classes: str | list[str] = "classes.txt", image_dir: str = "images", mask_dir: str = "masks",
                 train_split: str = "train", val_split: str = "val", test_split: str | None = "test",
                 mask_suffix: str = ".png", ignore_value: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.classes = classes
        self.image_dir, self.mask_dir = image_dir, mask_dir
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.mask_suffix = mask_suffix
        self.ignore_value = ignore_value

    def read_label_map(self) -> LabelMap:
        names = list(self.classes) if isinstance(self.classes, (list, tuple)) else read_class_list(
            self.dataset_root / self.classes)
        if self.ignore_value < len(names):
            raise ValueError(f"SegmentationFolderDataModule: ignore_value {self.ignore_value} is a class index (the "
                             f"class list has {len(names)} classes); use a value >= {len(names)}, e.g. 255")
        return LabelMap(tuple(names), tuple(range(len(names))), ignore_values=(self.ignore_value,))

    def split_pairs(self, split: str) -> list[Pair]:
        name = self.splits[split]
        if name is None:
            return []
        images_dir = self.dataset_root / self.image_dir / name
        if not images_dir.is_dir():
            if split == "test":
                return []
            raise FileNotFoundError(f"SegmentationFolderDataModule: {images_dir} not found; --data.root must hold "
                                    f"{self.layout}")
        images = list_images(images_dir, IMAGE_EXTENSIONS)
        return self.paired_masks(images, images_dir, self.dataset_root / self.mask_dir / name,
                                 lambda p: p.with_suffix(self.mask_suffix))
