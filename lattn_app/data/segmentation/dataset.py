"""What every semantic segmentation layout shares: class lists, label masks, the dataset and the datamodule.

A layout (ADE20K, Cityscapes, image + mask folders) says where the (image, mask) pairs of each split
are and what the values in its mask files mean (a :class:`LabelMap`); the rest is here, once:

- **labels**: the mask files hold the dataset's own class ids (ADE20K 1..150 with 0 unlabelled,
  Cityscapes' labelIds, a user's values); they are mapped to contiguous labels 0..K-1, and unlabelled
  values to the ignore index 255, when a mask is read. A value that is neither a class nor unlabelled is
  an error naming the file and the values. ``category_ids[label]`` gives back the dataset's id (the
  prediction writer saves those);
- **samples**: ``{"image": float32 (3, H, W) in [0, 1], "mask": int64 (H, W), "name", "path", "size"}``
  (``size``: the image file's (H, W); ``name``: its path relative to the data root, without suffix); the
  training image and mask are augmented together (:mod:`.transforms`); an evaluation mask keeps its
  file's size (the task scores predictions at that size), its image may be resized;
- **checks**: a mask whose size differs from its image's, or a missing mask file, is an error naming the
  files; masks must be single-channel (8- or 16-bit) images of class ids;
- :func:`segmentation_collate` stacks samples of one size and keeps lists otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..base import LattnDataModule, available_cpus, image_to_tensor
from ..classification.dataset import IMAGE_EXTENSIONS, list_images
from ..io import read_image
from .transforms import crop_hw, segmentation_eval_transform, segmentation_train_transform

log = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "LabelMap", "MaskError", "SegmentationDataModule", "SegmentationDataset",
           "read_mask", "segmentation_collate"]

IGNORE_INDEX = 255
"""The label of unlabelled pixels in every sample: left out of the loss and the metrics."""

Pair = tuple[Path, Path | None]


class MaskError(ValueError):
    """A label mask that does not fit its image or its class list (the message names the file)."""


@dataclass(frozen=True)
class LabelMap:
    """What the values of a dataset's mask files mean.

    Args:
        class_names: the K classes, in label order (label k = ``class_names[k]``).
        ids: the value each class has in the mask files (``ids[k]`` for label k); the datamodules expose
            them as ``category_ids``.
        ignore_values: mask values of unlabelled pixels (read as the ignore index).
        unused_values: values that are valid in the files but not trained on (Cityscapes' 15 labelIds
            outside its 19 training classes): also read as the ignore index.
    """

    class_names: tuple[str, ...]
    ids: tuple[int, ...]
    ignore_values: tuple[int, ...] = ()
    unused_values: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.class_names:
            raise ValueError("a segmentation dataset needs at least one class")
        if len(self.ids) != len(self.class_names):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.ids)} ids")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"class ids must be unique; got {list(self.ids)}")
        if len(self.class_names) >= IGNORE_INDEX:
            raise ValueError(f"at most {IGNORE_INDEX - 1} classes are supported (label {IGNORE_INDEX} is the ignore "
                             f"index); got {len(self.class_names)}")
        if min(self.ids) < 0 or set(self.ids) & set(self.ignore_values):
            raise ValueError(f"class ids must be >= 0 and differ from the unlabelled values {list(self.ignore_values)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def lookup(self) -> np.ndarray:
        """Table value -> label (IGNORE_INDEX for unlabelled / unused values, -1 for values that are invalid)."""
        size = max((*self.ids, *self.ignore_values, *self.unused_values)) + 1
        table = np.full(max(size, 256), -1, np.int16)
        table[list(self.ignore_values) + list(self.unused_values)] = IGNORE_INDEX
        table[list(self.ids)] = np.arange(len(self.ids))
        return table

    def describe_valid(self) -> str:
        ids = sorted(self.ids)
        contiguous = ids == list(range(ids[0], ids[-1] + 1))
        text = f"{ids[0]}..{ids[-1]}" if contiguous and len(ids) > 2 else ", ".join(map(str, ids))
        extra = sorted((*self.ignore_values, *self.unused_values))
        return f"class ids {text}" + (f" or the unlabelled / unused values {_short(extra)}" if extra else "")


def _short(values: Sequence[int]) -> str:
    values = list(values)
    return ", ".join(map(str, values[:12])) + (" ..." if len(values) > 12 else "")


def read_mask(path: str | Path) -> np.ndarray:
    """A label mask file as an integer array (H, W): 8-bit grey or palette (the palette indices), or 16-bit grey.

    Raises:
        FileNotFoundError: the file does not exist.
        MaskError: the file is not a readable image, or holds colours (RGB) instead of class ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise MaskError(f"{path}: cannot read the mask ({type(error).__name__}: {error})") from error
    if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise MaskError(f"{path}: the mask is a {mode!r} image; expected a single-channel PNG of class ids "
                        "(8-bit grey or palette, or 16-bit grey), not colours")
    return array.astype(np.int32 if array.dtype != np.uint8 else np.uint8)


def encode_mask(values: np.ndarray, table: np.ndarray, label_map: LabelMap, path: Path) -> np.ndarray:
    """Mask file values -> uint8 labels 0..K-1 / IGNORE_INDEX; an error names the file and the invalid values."""
    if values.size and (values.min() < 0 or values.max() >= len(table)):
        bad = np.unique(values[(values < 0) | (values >= len(table))])
    else:
        labels = table[values]
        if not (labels < 0).any():
            return labels.astype(np.uint8)
        bad = np.unique(values[labels < 0])
    raise MaskError(f"{path}: mask values {_short(bad.tolist())} are not in the class list; expected "
                    f"{label_map.describe_valid()}")


class SegmentationDataset(Dataset):
    """(image, mask) pairs through a joint transform; pairs without a mask are images to predict.

    Args:
        pairs: (image path, mask path or None).
        label_map: the meaning of the mask values.
        transform: ``transform(image=..., mask=...)`` (training: both change) or, with ``train=False``,
            ``transform(image=...)`` (the mask keeps its size); None: no transform.
        train: whether `transform` moves the mask with the image.
        root: names are the image paths relative to it (without suffix), for the prediction files.
    """

    def __init__(self, pairs: Sequence[Pair], label_map: LabelMap, transform: Callable[..., dict] | None = None,
                 train: bool = False, root: Path | None = None) -> None:
        self.pairs = [(Path(image), None if mask is None else Path(mask)) for image, mask in pairs]
        self.label_map = label_map
        self.table = label_map.lookup()
        self.transform = transform
        self.train = train
        self.root = root

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        image = self.pairs[index][0]
        try:
            relative = image.relative_to(self.root) if self.root is not None else Path(image.name)
        except ValueError:
            relative = Path(image.name)
        return relative.with_suffix("").as_posix()

    def labels(self, index: int) -> np.ndarray:
        """The mask of sample `index` as labels (uint8, original size), checked against its image's size."""
        image_path, mask_path = self.pairs[index]
        if mask_path is None:
            raise ValueError(f"{image_path} has no mask")
        labels = encode_mask(read_mask(mask_path), self.table, self.label_map, mask_path)
        return labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path)
        sample: dict[str, Any] = {"name": self.name(index), "path": str(image_path), "size": tuple(image.shape[:2])}
        if mask_path is None:
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            sample["image"] = image_to_tensor(image)
            return sample
        labels = self.labels(index)
        if labels.shape != image.shape[:2]:
            raise MaskError(f"{mask_path}: the mask is {labels.shape[0]}x{labels.shape[1]} (HxW) but its image "
                            f"{image_path} is {image.shape[0]}x{image.shape[1]}; a mask must have its image's size")
        if self.train:
            out = self.transform(image=image, mask=labels) if self.transform is not None else {"image": image, "mask": labels}
            image, labels = out["image"], out["mask"]
        elif self.transform is not None:
            image = self.transform(image=image)["image"]
        sample["image"] = image_to_tensor(image)
        sample["mask"] = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
        return sample


def segmentation_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A batch dict: ``image`` and ``mask`` stacked when all samples have one size, lists otherwise."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def hold_out(pairs: Sequence[Pair], count: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(kept, held out): `count` pairs drawn with `seed` are held out (both in their original order)."""
    if count >= len(pairs):
        raise ValueError(f"val_size={count} leaves no training images (the training split has {len(pairs)})")
    chosen = set(np.random.default_rng(seed).permutation(len(pairs))[:count].tolist())
    return ([p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen])


class SegmentationDataModule(LattnDataModule):
    """Base of the segmentation datamodules: classes, splits, augmentation, predict input, class counts.

    Subclasses implement :meth:`read_label_map` and :meth:`split_pairs` (the (image, mask) pairs of
    ``train``, ``val`` and ``test``); layouts without labelled test images hold out ``val_size``
    training images for validation and use the official validation images as the test set, so that
    checkpoint selection never sees the test images.

    The command line links ``data.num_classes``, ``data.class_names`` and ``data.category_ids`` (each
    class's id in the mask files) to the task.

    Args:
        crop_size: training crop, a side or (height, width).
        scale_size: training images are first resized so that their shorter side is this (then
            rescaled by a random factor in `ratio_range`); None: their own size.
        ratio_range: range of the random training rescale factor.
        flip_prob: training horizontal-flip probability.
        color_jitter: photometric jitter strength of training images (:mod:`.transforms`); None: none.
        eval_scale: validation/test/predict images are resized so that their shorter side is this (the
            masks keep their size and predictions are resized to it); None: their own size.
        predict_dir: a folder of images (searched recursively) for ``lattn predict``.
        predict_split: ``val`` or ``test``: predict the images of that split instead.
        **kwargs: ``root``, ``batch_size``, ``eval_batch_size``, ``num_workers``
            (:class:`~lattn_app.data.base.LattnDataModule`).
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        scale_size: int | None = 512,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        color_jitter: float | None = 0.5,
        eval_scale: int | None = 512,
        predict_dir: str | None = None,
        predict_split: Literal["val", "test"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.crop_size = crop_hw(crop_size)
        for name, value in (("scale_size", scale_size), ("eval_scale", eval_scale)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{owner}: {name} must be a positive integer (pixels) or null; got {value!r}")
        if predict_split not in (None, "val", "test"):
            raise ValueError(f"{owner}: predict_split must be 'val', 'test' or null; got {predict_split!r}")
        if predict_split is not None and predict_dir is not None:
            raise ValueError(f"{owner}: give predict_dir (a folder of images) or predict_split, not both")
        self.scale_size = scale_size
        self.ratio_range = tuple(ratio_range)
        self.flip_prob = flip_prob
        self.color_jitter = color_jitter
        self.eval_scale = eval_scale
        segmentation_train_transform(self.crop_size, scale_size, ratio_range, flip_prob, color_jitter)  # checks them
        self.predict_dir = predict_dir
        self.predict_split = predict_split
        self._label_map: LabelMap | None = None
        self._class_pixels: np.ndarray | None = None
        self._transforms: tuple[Callable[..., dict], Callable[..., dict] | None] | None = None

    collate_fn = staticmethod(segmentation_collate)
    #: (height, width) of the embedded set's images: on it, sizes above these are lowered to them.
    embedded_image_size: ClassVar[tuple[int, int] | None] = None

    def sizes(self) -> tuple[tuple[int, int], int | None, int | None]:
        """(crop size, scale size, eval scale) in use: on the embedded set at most its images' size.

        Configs for real data ask for 512-pixel crops; upscaling 96-pixel synthetic scenes 5x only costs time.
        """
        crop, scale, evaluation = self.crop_size, self.scale_size, self.eval_scale
        if self.is_embedded and self.embedded_image_size is not None:
            height, width = self.embedded_image_size
            short = min(height, width)
            lowered = ((min(crop[0], height), min(crop[1], width)), None if scale is None else min(scale, short),
                       None if evaluation is None else min(evaluation, short))
            if lowered != (crop, scale, evaluation):
                log.info("%s: on the embedded %dx%d images, crop_size %s, scale_size %s and eval_scale %s are lowered "
                         "to %s, %s and %s", type(self).__name__, height, width, list(crop), scale, evaluation,
                         list(lowered[0]), lowered[1], lowered[2])
            crop, scale, evaluation = lowered
        return crop, scale, evaluation

    def transforms(self) -> tuple[Callable[..., dict], Callable[..., dict] | None]:
        """(training pipeline, evaluation pipeline) at :meth:`sizes`."""
        if getattr(self, "_transforms", None) is None:
            crop, scale, evaluation = self.sizes()
            self._transforms = (segmentation_train_transform(crop, scale, self.ratio_range, self.flip_prob,
                                                             self.color_jitter, IGNORE_INDEX),
                                segmentation_eval_transform(evaluation))
        return self._transforms

    # ------------------------------------------------------------------ what a layout provides
    def read_label_map(self) -> LabelMap:
        """The classes and the meaning of the mask values, read from the data (or fixed by the layout)."""
        raise NotImplementedError

    def split_pairs(self, split: str) -> list[Pair]:
        """The (image, mask) pairs of `split` (``train``, ``val``, ``test``); [] for a split the data lacks."""
        raise NotImplementedError

    # ------------------------------------------------------------------ what the data knows
    @property
    def label_map(self) -> LabelMap:
        if self._label_map is None:
            self._label_map = self.read_label_map()
        return self._label_map

    @property
    def class_names(self) -> list[str]:
        return list(self.label_map.class_names)

    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    @property
    def category_ids(self) -> list[int]:
        """The value of each class (label order) in the dataset's mask files; predictions are saved with it."""
        return list(self.label_map.ids)

    @property
    def ignore_index(self) -> int:
        return IGNORE_INDEX

    # ------------------------------------------------------------------ datasets
    def _dataset(self, split: str, train: bool) -> SegmentationDataset:
        pairs = self.split_pairs(split)
        if not pairs:
            raise ValueError(f"{type(self).__name__}: the {split} split has no images (expected {self.layout})")
        transform = self.transforms()[0 if train else 1]
        return SegmentationDataset(pairs, self.label_map, transform, train=train, root=self.dataset_root)

    def setup(self, stage: str | None = None) -> None:
        """Find the pairs `stage` needs ("fit", "validate", "test", "predict"; None: all)."""
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = self._dataset("train", train=True)
        if stage in (None, "fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self._dataset("val", train=False)
        if stage in (None, "test") and "test" not in self.datasets:
            if self.split_pairs("test"):
                self.datasets["test"] = self._dataset("test", train=False)
            elif stage == "test":
                raise ValueError(f"{type(self).__name__}: there is no test split with masks ({self.layout})")
        if stage in (None, "predict") and "predict" not in self.datasets:
            if self.predict_split is not None:
                self.datasets["predict"] = self._dataset(self.predict_split, train=False)
            elif self.predict_dir is not None:
                folder = Path(self.predict_dir).expanduser()
                if not folder.is_dir():
                    raise FileNotFoundError(f"{type(self).__name__}: predict_dir {folder} is not a folder")
                paths = list_images(folder, IMAGE_EXTENSIONS)
                if not paths:
                    raise FileNotFoundError(f"{type(self).__name__}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                                            f"predict_dir {folder}")
                self.datasets["predict"] = SegmentationDataset([(p, None) for p in paths], self.label_map,
                                                               self.transforms()[1], root=folder)
            elif stage == "predict":
                raise ValueError(f"{type(self).__name__}: nothing to predict; pass --data.predict_dir FOLDER of images "
                                 "or --data.predict_split val|test")

    def training_class_pixels(self) -> np.ndarray:
        """Labelled pixels per class (K,) over the training masks as they are on disk (no augmentation).

        Read once per process (all training masks, in threads); the task takes the most frequent class
        from it for its trivial baseline.
        """
        if self._class_pixels is None:
            self.setup("fit")
            dataset: SegmentationDataset = self.datasets["train"]  # type: ignore[assignment]
            log.info("%s: counting the class pixels of the %d training masks (for the trivial baseline)",
                     type(self).__name__, len(dataset))

            def count(index: int) -> np.ndarray:
                return np.bincount(dataset.labels(index).ravel(), minlength=256)[: self.num_classes]

            with ThreadPoolExecutor(max_workers=available_cpus()) as pool:
                self._class_pixels = np.sum(list(pool.map(count, range(len(dataset)))), axis=0).astype(np.int64)
        return self._class_pixels

    @staticmethod
    def paired_masks(images: Sequence[Path], image_root: Path, mask_root: Path,
                     mask_name: Callable[[Path], Path]) -> list[Pair]:
        """Each image with its mask ``mask_root / mask_name(image relative to image_root)``; a missing one is an error."""
        pairs: list[Pair] = []
        for image in images:
            mask = mask_root / mask_name(image.relative_to(image_root))
            if not mask.is_file():
                raise FileNotFoundError(f"{image}: its mask {mask} does not exist (every image of {image_root} needs "
                                        f"a mask in {mask_root})")
            pairs.append((image, mask))
        return pairs
