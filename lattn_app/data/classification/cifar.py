"""CIFAR-10 and CIFAR-100 from the official "python version" files on disk (no download).

What the files are (folder, batch files, meta file and key, archive URL) is torchvision's
``CIFAR10`` / ``CIFAR100`` description; the files are read here, once each, with an unpickler that
builds only what CIFAR files hold, and checked for the keys, shapes and labels CIFAR has, so that a
missing or bad file stops the run with one line naming it and what was expected.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from ...registry import check_choice
from ..transforms import cifar_train_transform, classification_eval_transform
from .dataset import IMAGE_EXTENSIONS, ClassificationDataModule, ClassificationDataset

__all__ = ["CIFARDataModule"]

CIFARVariant = Literal["cifar10", "cifar100"]
TORCHVISION: dict[str, type[CIFAR10]] = {"cifar10": CIFAR10, "cifar100": CIFAR100}
LABELS = {"cifar10": "labels", "cifar100": "fine_labels"}  # the label key (CIFAR-100: the 100 fine labels)


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


def load_cifar_pickle(path: Path, variant: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the files were written by Python 2 with bytes keys)."""
    try:
        with open(path, "rb") as file:
            content = _CIFARUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(
            f"{path}: not a readable {variant} pickle file ({type(error).__name__}: {error}); the file is "
            f"damaged or is not from the 'python version' archive ({TORCHVISION[variant].url})"
        ) from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict (the {variant} format), got {type(content).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in content.items()}


def _get(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise ValueError(f"{path}: key {key!r} is missing (keys present: {', '.join(map(str, content))})")
    return content[key]


def read_batch_file(path: Path, variant: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 RGB and labels (N,) int64 of one batch file; a ValueError names a bad one."""
    content = load_cifar_pickle(path, variant)
    data = np.asarray(_get(content, "data", path))
    labels = np.asarray(_get(content, LABELS[variant], path))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072) (32x32 R, G, B planes); got "
                         f"{data.dtype} {data.shape}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {LABELS[variant]!r} must hold one integer label per image ({len(data)}); got "
                         f"{labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: {LABELS[variant]!r} has labels outside 0..{num_classes - 1} (found "
                         f"{labels.min()}..{labels.max()})")
    # Each row is three 32x32 planes (R, G, B), each row-major: -> (N, 32, 32, 3).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10 or CIFAR-100 from the official "python version" files, no download.

    `root` is the folder that contains (or is) ``cifar-10-batches-py`` (``data_batch_1`` ...
    ``data_batch_5``, ``test_batch``, ``batches.meta``) or ``cifar-100-python`` (``train``, ``test``,
    ``meta``). CIFAR-100 uses the 100 fine labels. `val_size` training images, drawn with `split_seed`,
    are held out for validation (checkpoint selection); the remaining ones train; the test batch is
    only used by ``test``. Training uses the X-formers paper's augmentation: a random 32 x 32 crop of
    the image zero-padded by `padding` pixels and a horizontal flip.

    Args:
        root: folder containing or being ``cifar-10-batches-py`` / ``cifar-100-python``.
        variant: ``cifar10`` or ``cifar100``.
        val_size: training images held out for validation (1 ... 49999).
        split_seed: seed of the validation split (fixed, independent of the run's seed).
        image_size: side of the images the model sees; 32 keeps CIFAR's size, otherwise they are resized.
        padding: zero padding before the random training crop.
        hflip: probability of a horizontal flip in training.
        predict_dir: a folder of images (searched recursively) for ``predict``, resized to image_size.
        **kwargs: ``batch_size``, ``eval_batch_size``, ``num_workers``
            (:class:`~lattn_app.data.base.LattnDataModule`).
    """

    layout = ("cifar-10-batches-py/ (data_batch_1 ... data_batch_5, test_batch, batches.meta) or cifar-100-python/ "
              "(train, test, meta)")

    def __init__(
        self,
        root: str,
        variant: CIFARVariant = "cifar10",
        val_size: int = 5000,
        split_seed: int = 0,
        image_size: int = 32,
        padding: int = 4,
        hflip: float = 0.5,
        predict_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, image_size=image_size, predict_dir=predict_dir, **kwargs)
        self.save_hyperparameters()
        self.variant = check_choice("CIFARDataModule: variant", variant, tuple(TORCHVISION))
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
            raise ValueError(f"CIFARDataModule: val_size must be a positive integer (training images held out to "
                             f"choose checkpoints; the test batch is never used for that); got {val_size!r}")
        self.val_size = val_size
        self.split_seed = split_seed
        self.train_transform = cifar_train_transform(image_size, padding=padding, hflip=hflip)
        self.eval_transform = classification_eval_transform(image_size, crop_pct=1.0)
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self._folder: Path | None = None

    @property
    def torchvision_class(self) -> type[CIFAR10]:
        return TORCHVISION[self.variant]

    @property
    def folder(self) -> Path:
        """The folder holding the batch files (checked to hold all of them)."""
        if self._folder is None:
            spec, root = self.torchvision_class, self.dataset_root
            for candidate in (root / spec.base_folder, root):
                if (candidate / spec.meta["filename"]).is_file():
                    break
            else:
                candidate = root if root.name == spec.base_folder else root / spec.base_folder
            needed = [spec.meta["filename"], *(name for name, _ in spec.train_list + spec.test_list)]
            for name in needed:
                if not (candidate / name).is_file():
                    raise FileNotFoundError(
                        f"CIFARDataModule: {candidate / name} not found. {self.variant} is read from the 'python "
                        f"version' archive, not downloaded: get {spec.url}, extract it so that {spec.base_folder}/ "
                        f"({', '.join(needed)}) lies in --data.root (now {root})")
            self._folder = candidate
        return self._folder

    def read_class_names(self) -> list[str]:
        path = self.folder / self.torchvision_class.meta["filename"]
        key = self.torchvision_class.meta["key"]
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n)
                 for n in _get(load_cifar_pickle(path, self.variant), key, path)]
        if not names:
            raise ValueError(f"{path}: {key!r} is empty; expected the class names")
        return names

    def read(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 32, 32, 3) uint8 RGB and labels (N,) int64 of the training or the test batches."""
        # Read here, not by torchvision's CIFAR10: it unpickles with pickle.load (a file can run any code), so each file
        # needs this safe read anyway; reading them again through torchvision took 1.70 s instead of 1.01 s for the
        # 50,000 training images (best of 5, 2-core CPU), and its MD5 check refuses all but the official files.
        spec = self.torchvision_class
        batches = [read_batch_file(self.folder / name, self.variant, self.num_classes)
                   for name, _ in (spec.train_list if train else spec.test_list)]
        return (np.ascontiguousarray(np.concatenate([images for images, _ in batches])),
                np.concatenate([labels for _, labels in batches]))

    def setup(self, stage: str | None = None) -> None:
        """Load the batches a stage needs: fit -> train and val, validate -> val, test, predict."""
        stage = check_choice("CIFARDataModule.setup: stage", stage or "fit", ("fit", "validate", "test", "predict"))
        if stage in ("fit", "validate") and "val" not in self.datasets:
            images, labels = self.read(train=True)
            if self.val_size >= len(images):
                raise ValueError(f"CIFARDataModule: val_size={self.val_size} leaves no training images (the training "
                                 f"batches in {self.folder} hold {len(images)})")
            order = np.random.default_rng(self.split_seed).permutation(len(images))
            self.val_indices = np.sort(order[: self.val_size])
            self.train_indices = np.sort(order[self.val_size:])
            self.datasets["train"] = ClassificationDataset(self.train_transform, images=images[self.train_indices],
                                                           labels=labels[self.train_indices])
            self.datasets["val"] = ClassificationDataset(self.eval_transform, images=images[self.val_indices],
                                                         labels=labels[self.val_indices])
        if stage == "test" and "test" not in self.datasets:
            images, labels = self.read(train=False)
            self.datasets["test"] = ClassificationDataset(self.eval_transform, images=images, labels=labels)
        if stage == "predict":
            self.datasets["predict"] = self.predict_dataset(IMAGE_EXTENSIONS, self.eval_transform)
