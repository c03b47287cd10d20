"""Image classification from folders in the ImageNet layout: ``root/<split>/<class_name>/<image>``.

The folders are scanned with torchvision's ``find_classes`` and ``make_dataset`` (hidden entries are
skipped); the errors name the folder and what was expected there.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import find_classes as torchvision_find_classes
from torchvision.datasets.folder import make_dataset

from ...registry import check_choice
from ..synthetic_classification import ensure_synthetic_classification
from ..transforms import classification_eval_transform, classification_train_transform
from .dataset import (IMAGE_EXTENSIONS, ClassificationDataModule, ClassificationDataset, normalise_extensions,
                      visible_files)

__all__ = ["ImageFolderDataModule", "find_classes", "labelled_images"]

LAYOUT_HINT = "ImageNet layout: <split>/<class_name>/<image>"


def find_classes(directory: str | Path) -> list[str]:
    """The sorted names of the class subfolders of `directory` (hidden folders are ignored)."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist or is not a directory; expected a split folder with "
                                f"one subfolder of images per class ({LAYOUT_HINT})")
    try:
        classes, _ = torchvision_find_classes(directory)
    except FileNotFoundError:  # torchvision's "Couldn't find any class folder"
        classes = []
    classes = [name for name in classes if not name.startswith(".")]
    if not classes:
        raise ValueError(f"{directory} has no class subfolders; expected one subfolder of images per class "
                         f"({LAYOUT_HINT})")
    return classes


def labelled_images(split_dir: str | Path, class_names: list[str],
                    extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """(path, label) of every image of a split folder; each class folder must be a training class and hold images."""
    split_dir = Path(split_dir).expanduser()
    present = find_classes(split_dir)
    index = {name: i for i, name in enumerate(class_names)}
    for name in present:
        if name not in index:
            raise ValueError(
                f"{split_dir / name}: class {name!r} is not one of the {len(class_names)} training classes (the "
                f"subfolders of the training folder: {', '.join(class_names)}); every class of a validation or test "
                f"folder must also be in the training folder")
    samples = make_dataset(str(split_dir), {name: index[name] for name in present},
                           is_valid_file=visible_files(str(split_dir), extensions), allow_empty=True)
    found = {label for _, label in samples}
    for name in present:
        if index[name] not in found:
            raise ValueError(f"{split_dir / name}: class folder has no images (expected files ending in "
                             f"{', '.join(extensions)})")
    return samples


class ImageFolderDataModule(ClassificationDataModule):
    """Image classification from folders in the ImageNet layout: ``root/<split>/<class_name>/<image>``.

    The classes are the sorted subfolder names of the training folder. Validation and test folders may
    lack some classes but may not add any. ``val`` chooses checkpoints; ``test`` is a separate held-out
    folder and is never replaced by ``val``. Images are read as RGB whatever their mode; an unreadable
    image stops the run with an error naming the file. ``root=None`` uses the embedded synthetic set
    (:mod:`lattn_app.data.synthetic_classification`: 10 classes of 64 x 64 procedural shapes, written
    once to ``$LATTN_CACHE_DIR`` or ``~/.cache/lattn``), announced with a warning.

    Args:
        train_dir: training folder, relative to `root` (or absolute).
        val_dir: validation folder (checkpoint selection), relative to `root` (or absolute).
        test_dir: held-out test folder, relative to `root` (or absolute); None if there is none
            (``test`` then fails with an explanation).
        image_size: side of the square images the model sees, in pixels.
        predict_dir: a folder of images (searched recursively) for ``predict``, relative to the current
            directory (or absolute); predictions carry each image's path.
        crop_pct: evaluation centre crop as a fraction of the resized shorter side
            (the shorter side is resized to image_size / crop_pct).
        scale: training RandomResizedCrop area range, as fractions of the image.
        ratio: training RandomResizedCrop aspect-ratio range.
        hflip: probability of a horizontal flip in training.
        color_jitter: brightness / contrast / saturation jitter strength in training; None disables it.
        extensions: file types read as images, case-insensitive.
        **kwargs: ``root`` (None: the embedded set), ``batch_size``, ``eval_batch_size``, ``num_workers``
            (:class:`~lattn_app.data.base.LattnDataModule`).
    """

    layout = "train/<class_name>/<image>, val/<class_name>/<image> and test/<class_name>/<image> (ImageNet layout)"
    embedded_description = "10 classes of procedurally drawn 64x64 shapes"

    def __init__(
        self,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = "test",
        image_size: int = 224,
        predict_dir: str | None = None,
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | None = 0.4,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, predict_dir=predict_dir, **kwargs)
        self.save_hyperparameters()
        self.train_dir, self.val_dir, self.test_dir = train_dir, val_dir, test_dir
        self.extensions = normalise_extensions(extensions)
        self.train_transform = classification_train_transform(image_size, scale=scale, ratio=ratio, hflip=hflip,
                                                              color_jitter=color_jitter)
        self.eval_transform = classification_eval_transform(image_size, crop_pct=crop_pct)

    def build_embedded(self) -> Path:
        return ensure_synthetic_classification()

    def folder(self, relative: str) -> Path:
        """A split folder: `relative` under the dataset root (an absolute path stays as it is)."""
        return self.dataset_root / Path(relative).expanduser()

    def read_class_names(self) -> list[str]:
        return find_classes(self.folder(self.train_dir))

    def split(self, relative: str, transform: Any) -> ClassificationDataset:
        paths, labels = zip(*labelled_images(self.folder(relative), self.class_names, self.extensions))
        return ClassificationDataset(transform, paths=paths, labels=labels)

    def setup(self, stage: str | None = None) -> None:
        """Scan the folders a stage needs: fit -> train and val, validate -> val, test, predict."""
        stage = check_choice("ImageFolderDataModule.setup: stage", stage or "fit",
                             ("fit", "validate", "test", "predict"))
        if stage == "fit" and "train" not in self.datasets:
            self.datasets["train"] = self.split(self.train_dir, self.train_transform)
        if stage in ("fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self.split(self.val_dir, self.eval_transform)
        if stage == "test" and "test" not in self.datasets:
            test_dir = self.folder(self.test_dir) if self.test_dir is not None else None
            if test_dir is None or not test_dir.is_dir():
                where = "test_dir is None" if test_dir is None else f"{test_dir} does not exist"
                raise FileNotFoundError(
                    f"ImageFolderDataModule: no held-out test folder ({where}). Put the test images in "
                    f"<root>/test/<class_name>/ or pass --data.test_dir. The validation folder "
                    f"({self.folder(self.val_dir)}) chooses checkpoints and is never used as the test set; to "
                    f"evaluate on it, run `lattn validate`.")
            self.datasets["test"] = self.split(self.test_dir, self.eval_transform)
        if stage == "predict":
            self.datasets["predict"] = self.predict_dataset(self.extensions, self.eval_transform)
