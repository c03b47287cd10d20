"""Image-classification data modules: image folders (ImageNet layout) and CIFAR-10/100 from disk.

Every sample is a dict. For fit, validate and test::

    {"image": float32 tensor (3, H, W) in [0, 1], "label": int64 scalar tensor}

and for predict ``{"image": ..., "path": str}``. Images are not normalised here: the model does that.
Both data modules know their classes as soon as they are built (``num_classes``, ``class_names``), so
the command line links ``data.num_classes`` to the model.

- :class:`ImageFolderDataModule`: ``root/{train,val,test}/<class_name>/<image>`` (jpg, jpeg, png, bmp,
  webp). ``root=None`` uses the embedded synthetic set (:mod:`.synthetic_classification`).
- :class:`CIFARDataModule`: the official "python version" pickles of CIFAR-10 or CIFAR-100, with a
  seeded validation split held out of the training batches for checkpoint selection; the test batch
  is only used by ``test``.

The validation data (checkpoint selection) is never the test data.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..registry import check_choice
from .io import ImageReadError, read_image
from .resumable import ResumableDataModule
from .synthetic_classification import ensure_synthetic_classification
from .transforms import cifar_train_transform, classification_eval_transform, classification_train_transform

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "CIFARDataModule",
    "ClassificationDataset",
    "ImageFolderDataModule",
    "ImageReadError",
    "find_classes",
    "list_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File types read as images (compared case-insensitively)."""

Transform = Callable[..., dict[str, Any]]
STAGES = ("fit", "validate", "test", "predict")


# ---------------------------------------------------------------------------------------------------
# Folder scanning
# ---------------------------------------------------------------------------------------------------


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = [extensions]
    normalised = tuple(("." + e.lower().lstrip(".")) for e in extensions if e.strip("."))
    if not normalised:
        raise ValueError(f"extensions must name at least one file type, e.g. {IMAGE_EXTENSIONS}; got {extensions!r}")
    return normalised


def _subfolders(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_classes(directory: str | Path) -> list[str]:
    """The sorted names of the class subfolders of `directory` (hidden folders are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} does not exist or is not a directory; expected a split folder with one "
            f"subfolder of images per class (ImageNet layout: <split>/<class_name>/<image>)"
        )
    classes = [p.name for p in _subfolders(directory)]
    if not classes:
        raise ValueError(
            f"{directory} has no class subfolders; expected one subfolder of images per class "
            f"(ImageNet layout: <split>/<class_name>/<image>)"
        )
    return classes


def list_images(directory: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every image file under `directory`, recursively, in sorted order (hidden entries are skipped)."""
    extensions = _normalise_extensions(extensions)
    directory = Path(directory)
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in extensions
        )
    return sorted(found)


def _labelled_images(
    split_dir: Path, class_names: list[str], extensions: tuple[str, ...]
) -> list[tuple[str, int]]:
    """(path, label) of every image of a split folder; each class folder must be one of `class_names`."""
    find_classes(split_dir)  # a clear error for a missing folder or one without class subfolders
    index = {name: i for i, name in enumerate(class_names)}
    samples: list[tuple[str, int]] = []
    for folder in _subfolders(Path(split_dir)):
        if folder.name not in index:
            raise ValueError(
                f"{folder}: class {folder.name!r} is not one of the {len(class_names)} training classes "
                f"(the subfolders of the training folder: {', '.join(class_names)}); every class of a "
                f"validation or test folder must also be in the training folder"
            )
        images = list_images(folder, extensions)
        if not images:
            raise ValueError(f"{folder}: class folder has no images (expected files ending in {', '.join(extensions)})")
        samples.extend((str(path), index[folder.name]) for path in images)
    return samples


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


class ClassificationDataset(Dataset):
    """Labelled images from files or from an in-memory uint8 array, through an albumentations pipeline.

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

    def seed_transform(self, seed: int) -> None:
        """Reseed the pipeline's random generator (albumentations ignores the global seeds)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker init: seed the augmentations, numpy and random from torch's per-worker seed.

    torch gives every worker of every epoch its own seed drawn from the main process's generator, so
    this makes augmentation reproducible under ``seed_everything`` and different across workers and
    epochs (a forked copy of one generator would repeat the same augmentations in every worker).
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "seed_transform"):
        info.dataset.seed_transform(seed)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------
# Data modules
# ---------------------------------------------------------------------------------------------------


class _ClassificationDataModule(ResumableDataModule):
    """Shared loader settings and dataset bookkeeping of the classification data modules."""

    num_classes: int
    class_names: list[str]
    image_size: int

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer; got {value!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"{type(self).__name__}: num_workers must be an integer >= 0; got {num_workers!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        cpus = _available_cpus()
        if num_workers > cpus:
            log.info("%s: num_workers=%d lowered to the %d available CPUs", type(self).__name__, num_workers, cpus)
        self.num_workers = min(num_workers, cpus)
        self.datasets: dict[str, ClassificationDataset] = {}

    def _dataset(self, split: str, stage: str) -> ClassificationDataset:
        if split not in self.datasets:
            raise RuntimeError(
                f"{type(self).__name__}: the {split} data is not set up; call setup({stage!r}) first "
                f"(the Trainer does this)"
            )
        return self.datasets[split]

    def _loader(self, dataset: ClassificationDataset, train: bool) -> DataLoader:
        options = dict(num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                       persistent_workers=self.num_workers > 0, worker_init_fn=_seed_worker)
        if train:  # ordered and augmented by (seed, epoch, sample), resumable mid-epoch
            # Drop a last incomplete training batch (a batch of one breaks BatchNorm), unless the whole
            # training set is smaller than a batch.
            return self.resumable_train_loader(dataset, self.batch_size, drop_last=len(dataset) >= self.batch_size,
                                               **options)
        return self.evaluation_loader(dataset, self.eval_batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", "fit"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", "validate"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", "test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("predict", "predict"), train=False)

    def _predict_dataset(
        self, predict_dir: str | None, extensions: Sequence[str], transform: Transform
    ) -> ClassificationDataset:
        if predict_dir is None:
            raise ValueError(
                f"{type(self).__name__}: predict needs a folder of images; pass --data.predict_dir PATH"
            )
        folder = Path(predict_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"predict_dir {folder} does not exist or is not a directory")
        paths = list_images(folder, extensions)
        if not paths:
            raise ValueError(f"predict_dir {folder} has no images (searched recursively for {', '.join(extensions)})")
        return ClassificationDataset(transform, paths=[str(p) for p in paths])


class ImageFolderDataModule(_ClassificationDataModule):
    """Image classification from folders in the ImageNet layout: ``root/<split>/<class_name>/<image>``.

    The classes are the sorted subfolder names of the training folder, known as soon as the module is
    built. Validation and test folders may lack some classes but may not add any. ``val`` chooses
    checkpoints; ``test`` is a separate held-out folder and is never replaced by ``val``. Images are read
    as RGB whatever their mode; an unreadable image stops the run with an error naming the file.

    Args:
        root: the dataset folder. None: the embedded synthetic set (10 classes of 64 x 64 procedural
            shapes, written once to ``$LATTN_CACHE_DIR`` or ``~/.cache/lattn``), announced with a warning.
        train_dir: training folder, relative to `root` (or absolute).
        val_dir: validation folder (checkpoint selection), relative to `root` (or absolute).
        test_dir: held-out test folder, relative to `root` (or absolute); None if there is none
            (``test`` then fails with an explanation).
        predict_dir: a folder of images (searched recursively) for ``predict``, relative to the current
            directory (or absolute); predictions carry each image's path.
        image_size: side of the square images the model sees, in pixels.
        batch_size: training batch size.
        eval_batch_size: batch size for validate, test and predict; None: `batch_size`.
        num_workers: data-loading processes (lowered to the number of available CPUs); 0 loads in the
            main process.
        crop_pct: evaluation centre crop as a fraction of the resized shorter side
            (the shorter side is resized to image_size / crop_pct).
        scale: training RandomResizedCrop area range, as fractions of the image.
        ratio: training RandomResizedCrop aspect-ratio range.
        hflip: probability of a horizontal flip in training.
        color_jitter: brightness / contrast / saturation jitter strength in training; None disables it.
        extensions: file types read as images, case-insensitive.
    """

    def __init__(
        self,
        root: str | None = None,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = "test",
        predict_dir: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float | None = 0.4,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.is_synthetic = root is None
        if root is None:
            self.root = ensure_synthetic_classification()
            log.warning(
                "ImageFolderDataModule: no data root given, so the EMBEDDED SYNTHETIC SET is used (10 "
                "classes of procedurally drawn 64x64 shapes at %s), not real data. Pass --data.root PATH "
                "(a folder with train/<class>/<image>, val/..., test/...) to train on your own images.",
                self.root,
            )
        else:
            self.root = Path(root).expanduser()
            if not self.root.is_dir():
                raise FileNotFoundError(
                    f"ImageFolderDataModule: root {self.root} does not exist or is not a directory; expected "
                    f"a folder with {train_dir}/<class_name>/<image>, {val_dir}/... and {test_dir}/..."
                )
        self.train_dir = self.root / train_dir
        self.val_dir = self.root / val_dir
        self.test_dir = self.root / test_dir if test_dir is not None else None
        self.predict_dir = predict_dir
        self.extensions = _normalise_extensions(extensions)
        self.image_size = image_size
        self.class_names = find_classes(self.train_dir)
        self.num_classes = len(self.class_names)
        self.train_transform = classification_train_transform(
            image_size, scale=scale, ratio=ratio, hflip=hflip, color_jitter=color_jitter
        )
        self.eval_transform = classification_eval_transform(image_size, crop_pct=crop_pct)

    def _split(self, folder: Path, transform: Transform) -> ClassificationDataset:
        samples = _labelled_images(folder, self.class_names, self.extensions)
        paths, labels = zip(*samples)
        return ClassificationDataset(transform, paths=paths, labels=labels)

    def setup(self, stage: str | None = None) -> None:
        """Scan the folders a stage needs: fit -> train and val, validate -> val, test, predict."""
        stage = check_choice("ImageFolderDataModule.setup: stage", stage or "fit", STAGES)
        if stage == "fit" and "train" not in self.datasets:
            self.datasets["train"] = self._split(self.train_dir, self.train_transform)
        if stage in ("fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self._split(self.val_dir, self.eval_transform)
        if stage == "test" and "test" not in self.datasets:
            if self.test_dir is None or not self.test_dir.is_dir():
                where = "test_dir is None" if self.test_dir is None else f"{self.test_dir} does not exist"
                raise FileNotFoundError(
                    f"ImageFolderDataModule: no held-out test folder ({where}). Put the test images in "
                    f"<root>/test/<class_name>/ or pass --data.test_dir. The validation folder "
                    f"({self.val_dir}) chooses checkpoints and is never used as the test set; to evaluate "
                    f"on it, run `lattn validate`."
                )
            self.datasets["test"] = self._split(self.test_dir, self.eval_transform)
        if stage == "predict":
            self.datasets["predict"] = self._predict_dataset(self.predict_dir, self.extensions, self.eval_transform)


# ---------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR files hold (dicts, lists, numpy arrays): no arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which a CIFAR file does not contain")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]  # files pickled by numpy 1
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path, variant: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the files were written by Python 2 with bytes keys)."""
    try:
        with open(path, "rb") as file:
            content = _CIFARUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(
            f"{path}: not a readable {variant} pickle file ({type(error).__name__}: {error}); the file is "
            f"damaged or is not from the 'python version' archive ({_CIFAR[variant]['url']})"
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict (the {variant} format), got {type(content).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _get(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise ValueError(f"{path}: key {key!r} is missing (keys present: {', '.join(map(str, content))})")
    return content[key]


class CIFARDataModule(_ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 from the official "python version" pickles, no download.

    `root` is the folder that contains (or is) ``cifar-10-batches-py`` (``data_batch_1`` ...
    ``data_batch_5``, ``test_batch``, ``batches.meta``) or ``cifar-100-python`` (``train``, ``test``,
    ``meta``). CIFAR-100 uses the 100 fine labels. `val_size` training images, drawn with `split_seed`,
    are held out for validation (checkpoint selection); the remaining ones train; the test batch is
    only used by ``test``. Training uses the X-formers paper's augmentation: a random 32 x 32 crop of
    the image zero-padded by `padding` pixels and a horizontal flip.

    Args:
        root: folder containing or being ``cifar-10-batches-py`` / ``cifar-100-python``.
        variant: ``"cifar10"`` or ``"cifar100"``.
        val_size: training images held out for validation (1 ... 49999).
        split_seed: seed of the validation split (fixed, independent of the run's seed).
        image_size: side of the images the model sees; 32 keeps CIFAR's size, otherwise they are resized.
        padding: zero padding before the random training crop.
        hflip: probability of a horizontal flip in training.
        batch_size: training batch size.
        eval_batch_size: batch size for validate, test and predict; None: `batch_size`.
        num_workers: data-loading processes (lowered to the number of available CPUs).
        predict_dir: a folder of images (searched recursively) for ``predict``, resized to image_size.
    """

    def __init__(
        self,
        root: str,
        variant: str = "cifar10",
        val_size: int = 5000,
        split_seed: int = 0,
        image_size: int = 32,
        padding: int = 4,
        hflip: float = 0.5,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        self.variant = check_choice("CIFARDataModule: variant", variant, tuple(_CIFAR))
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
            raise ValueError(
                f"CIFARDataModule: val_size must be a positive integer (training images held out to choose "
                f"checkpoints; the test batch is never used for that); got {val_size!r}"
            )
        self.spec = _CIFAR[variant]
        self.root = self._find_folder(Path(root).expanduser())
        self.val_size = val_size
        self.split_seed = split_seed
        self.image_size = image_size
        self.predict_dir = predict_dir
        meta_path = self.root / self.spec["meta"]
        names = _get(_load_cifar_pickle(meta_path, variant), self.spec["names"], meta_path)
        self.class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
        if not self.class_names:
            raise ValueError(f"{meta_path}: {self.spec['names']!r} is empty; expected the class names")
        self.num_classes = len(self.class_names)
        self.train_transform = cifar_train_transform(image_size, padding=padding, hflip=hflip)
        self.eval_transform = classification_eval_transform(image_size, crop_pct=1.0)
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None

    def _find_folder(self, root: Path) -> Path:
        folder = self.spec["folder"]
        for candidate in (root / folder, root):
            if (candidate / self.spec["meta"]).is_file():
                break
        else:
            candidate = root if root.name == folder else root / folder
        needed = [self.spec["meta"], *self.spec["train"], *self.spec["test"]]
        for name in needed:
            if not (candidate / name).is_file():
                raise FileNotFoundError(
                    f"CIFARDataModule: {candidate / name} not found. {self.variant} is read from the "
                    f"'python version' archive, not downloaded: get {self.spec['url']}, extract it so that "
                    f"{folder}/ ({', '.join(needed)}) lies in --data.root (now {root})"
                )
        return candidate

    def _read(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 32, 32, 3) uint8 RGB and labels (N,) int64 of the batch files `names`."""
        images, labels = [], []
        for name in names:
            path = self.root / name
            content = _load_cifar_pickle(path, self.variant)
            data = np.asarray(_get(content, "data", path))
            batch_labels = np.asarray(_get(content, self.spec["labels"], path))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(
                    f"{path}: 'data' must be a uint8 array of shape (N, 3072) (32x32 R, G, B planes); "
                    f"got {data.dtype} {data.shape}"
                )
            if batch_labels.shape != (len(data),) or not np.issubdtype(batch_labels.dtype, np.integer):
                raise ValueError(
                    f"{path}: {self.spec['labels']!r} must hold one integer label per image ({len(data)}); "
                    f"got {batch_labels.dtype} {batch_labels.shape}"
                )
            if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= self.num_classes):
                raise ValueError(
                    f"{path}: {self.spec['labels']!r} has labels outside 0..{self.num_classes - 1} "
                    f"(found {batch_labels.min()}..{batch_labels.max()})"
                )
            # Each row is three 32x32 planes (R, G, B), each row-major: -> (N, 32, 32, 3).
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(batch_labels.astype(np.int64))
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)

    def setup(self, stage: str | None = None) -> None:
        """Load the batches a stage needs: fit -> train and val, validate -> val, test, predict."""
        stage = check_choice("CIFARDataModule.setup: stage", stage or "fit", STAGES)
        if stage in ("fit", "validate") and "val" not in self.datasets:
            images, labels = self._read(self.spec["train"])
            if self.val_size >= len(images):
                raise ValueError(
                    f"CIFARDataModule: val_size={self.val_size} leaves no training images (the training "
                    f"batches in {self.root} hold {len(images)})"
                )
            order = np.random.default_rng(self.split_seed).permutation(len(images))
            self.val_indices = np.sort(order[: self.val_size])
            self.train_indices = np.sort(order[self.val_size :])
            self.datasets["train"] = ClassificationDataset(
                self.train_transform, images=images[self.train_indices], labels=labels[self.train_indices]
            )
            self.datasets["val"] = ClassificationDataset(
                self.eval_transform, images=images[self.val_indices], labels=labels[self.val_indices]
            )
        if stage == "test" and "test" not in self.datasets:
            images, labels = self._read(self.spec["test"])
            self.datasets["test"] = ClassificationDataset(self.eval_transform, images=images, labels=labels)
        if stage == "predict":
            self.datasets["predict"] = self._predict_dataset(self.predict_dir, IMAGE_EXTENSIONS, self.eval_transform)
