"""COCO detection and instance segmentation data: the datamodule, its dataset and box+mask augmentation.

:class:`CocoDataModule` reads the COCO 2017 layout (or any COCO-format JSON + image folder)::

    root/annotations/instances_train2017.json    root/train2017/*.jpg
    root/annotations/instances_val2017.json      root/val2017/*.jpg
    (optional) a held-out test JSON + folder, e.g. root/annotations/instances_test2017.json, root/test2017/

With ``root=None`` the embedded synthetic set of :mod:`lattn_app.data.synthetic_coco` (same layout,
generated once into the cache directory) is used, with a loud warning.

Labels: COCO category ids (possibly non-contiguous, e.g. 1..90 with gaps) are mapped to contiguous
labels ``1..num_classes`` in increasing id order. Label 0 is reserved for the background, as
torchvision's detection models (Mask R-CNN, Faster R-CNN) expect, so a model is built with
``num_classes + 1`` classes. ``category_ids[label - 1]`` gives back the original COCO id (for the results
JSON); ``class_names[label - 1]`` the name. The same mapping is used for every split (all JSON files must
declare the same category ids).

A sample is ``(image, target)``: ``image`` float32 (3, H, W) in [0, 1] (not normalised: the model
normalises), resized so that its longer side is ``image_size`` (resizing happens here and only here);
``target`` a dict with

- ``boxes`` float32 (N, 4), ``x1, y1, x2, y2`` in pixels;
- ``labels`` int64 (N,), contiguous labels >= 1;
- ``masks`` uint8 (N, h, w), instance masks;
- ``iscrowd`` int64 (N,), ``area`` float32 (N,) (the annotation's ``area``);
- ``image_id`` int (the COCO image id), ``orig_size`` (H0, W0) of the file, ``size`` (H, W) after resizing,
  ``file_name`` str and ``path`` str of the image file.

Training targets are in the pixels of the resized (and augmented) image, which is what the detector
learns from. Validation/test targets stay in the pixels of the ORIGINAL image, exactly as in the JSON:
that is what COCOeval compares against, and the detection task maps its predictions back to the
original size before scoring them.

COCO conventions: crowd annotations (``iscrowd=1``, usually RLE) are dropped from training targets but
kept (with ``iscrowd`` 1) in validation/test targets, where the metrics treat them as "ignore" regions.
Images with no usable annotation are skipped for training and kept for validation and test. Annotations
with a degenerate box (width or height <= 1 pixel) are skipped for training and kept for evaluation
(COCOeval counts them). Both counts are logged.
``val_coco_gt_path`` / ``test_coco_gt_path`` name the original JSON files, for pycocotools' COCOeval.
Use :func:`coco_collate` (the loaders do): a batch is ``(list of images, list of targets)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from .io import read_image
from .resumable import ResumableDataModule
from .synthetic_coco import SYNTHETIC_COCO_IMAGE_SIZE, ensure_synthetic_coco

log = logging.getLogger(__name__)
_warn_rank_zero = rank_zero_only(log.warning)  # logged once in distributed runs (global rank 0)

__all__ = [
    "CocoDataModule",
    "CocoDataset",
    "CocoImage",
    "build_transform",
    "coco_collate",
    "decode_segmentation",
    "load_coco_json",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
REQUIRED_KEYS = ("images", "annotations", "categories")
SYNTHETIC_IMAGE_SIDE = max(SYNTHETIC_COCO_IMAGE_SIZE)


# ----------------------------------------------------------------------------------------- parsing


@dataclass
class CocoImage:
    """One image and its kept annotations (original COCO dicts)."""

    path: Path
    image_id: int
    height: int
    width: int
    annotations: list[dict] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {REQUIRED_KEYS}; got {type(document).__name__}")
    for key in REQUIRED_KEYS:
        if key not in document:
            raise ValueError(f"{path}: missing key {key!r} (a COCO instances file has {REQUIRED_KEYS})")
        if not isinstance(document[key], list):
            raise ValueError(f"{path}: key {key!r} must be a list; got {type(document[key]).__name__}")
    return document


def read_categories(path: str | os.PathLike) -> list[dict]:
    """The categories of a COCO JSON, sorted by id (checked: unique integer ids with names)."""
    path = Path(path)
    return _check_categories(path, _read_json(path)["categories"])


def _check_categories(path: Path, categories: list) -> list[dict]:
    seen = set()
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(f"{path}: categories[{i}] must be an object with 'id' and 'name'; got {category!r}")
        if category["id"] in seen:
            raise ValueError(f"{path}: category id {category['id']} appears twice in 'categories'")
        seen.add(category["id"])
    if not categories:
        raise ValueError(f"{path}: 'categories' is empty")
    return sorted(categories, key=lambda c: c["id"])


def load_coco_json(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    category_ids: Sequence[int],
    *,
    train: bool,
) -> list[CocoImage]:
    """Parse and check a COCO instances JSON; return its images with the annotations to use.

    Args:
        category_ids: the ids of the label mapping; the file must declare exactly these.
        train: drop crowd annotations, degenerate boxes and images left with no annotation (COCO
            training practice); evaluation keeps all of them, as COCOeval does.

    Raises:
        ValueError: invalid JSON, a missing key, an annotation with an unknown image or category id,
            a malformed annotation, categories that differ from `category_ids`.
        FileNotFoundError: the JSON or an image file listed in it does not exist.
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    document = _read_json(json_path)
    categories = _check_categories(json_path, document["categories"])
    ids = [c["id"] for c in categories]
    if sorted(ids) != sorted(category_ids):
        raise ValueError(f"{json_path}: categories have ids {ids}; expected the same ids as the other splits "
                         f"{sorted(category_ids)} (one label mapping is used for all splits)")
    images: dict[int, CocoImage] = {}
    for i, info in enumerate(document["images"]):
        for key in ("id", "file_name", "height", "width"):
            if not isinstance(info, dict) or key not in info:
                raise ValueError(f"{json_path}: images[{i}] has no key {key!r}")
        if info["id"] in images:
            raise ValueError(f"{json_path}: image id {info['id']} appears twice in 'images'")
        images[info["id"]] = CocoImage(image_dir / info["file_name"], int(info["id"]), int(info["height"]), int(info["width"]))
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{json_path}: image folder {image_dir} not found")
    present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    missing = [im.path for im in images.values()
               if (im.path.name not in present if im.path.parent == image_dir else not im.path.is_file())]
    if missing:
        raise FileNotFoundError(f"{json_path}: {len(missing)} image file(s) listed in 'images' not found, "
                                f"first: {missing[0]}")
    known = set(ids)
    degenerate = crowd = 0
    for i, ann in enumerate(document["annotations"]):
        for key in ("image_id", "category_id", "bbox"):
            if not isinstance(ann, dict) or key not in ann:
                raise ValueError(f"{json_path}: annotations[{i}] has no key {key!r}")
        if ann["image_id"] not in images:
            raise ValueError(f"{json_path}: annotations[{i}] (id {ann.get('id')}) has image_id {ann['image_id']}, "
                             "which is not in 'images'")
        if ann["category_id"] not in known:
            raise ValueError(f"{json_path}: annotations[{i}] (id {ann.get('id')}) has category_id "
                             f"{ann['category_id']}, which is not in 'categories' {sorted(known)}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"{json_path}: annotations[{i}] (id {ann.get('id')}) 'bbox' must be [x, y, w, h]; got {bbox!r}")
        if (bbox[2] <= 1 or bbox[3] <= 1) and train:
            degenerate += 1
            continue
        if ann.get("iscrowd", 0) and train:
            crowd += 1
            continue
        images[ann["image_id"]].annotations.append(ann)
    result = list(images.values())
    empty = sum(1 for im in result if not im.annotations)
    if train:
        result = [im for im in result if im.annotations]
    log.info(
        "%s: %d images (%d without annotations, %s), %d annotations%s",
        json_path.name, len(result) + (empty if train else 0), empty,
        "skipped for training" if train else "kept for evaluation",
        sum(len(im.annotations) for im in result),
        f"; skipped {degenerate} degenerate boxes (w or h <= 1) and {crowd} crowd annotations (not trained on)"
        if train else "",
    )
    return result


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a uint8 (H, W) mask."""
    if isinstance(segmentation, list):  # polygons
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and "counts" in segmentation:  # compressed RLE
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown COCO segmentation format: {type(segmentation).__name__}")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


# -------------------------------------------------------------------------------------- transforms


def build_transform(image_size: int, train: bool, flip_prob: float = 0.5,
                    scale_range: tuple[float, float] = (0.75, 1.25)) -> A.Compose:
    """Albumentations pipeline over the image, boxes (pascal_voc) and masks together.

    Training: horizontal flip, then a resize of the longer side to a random size in
    ``image_size * scale_range`` (crop-free multi-scale training). Evaluation: resize of the longer side
    to `image_size` only.
    """
    if train:
        low, high = scale_range
        sizes = sorted({max(16, int(round(image_size * s))) for s in np.linspace(low, high, 9)})
        ops = [A.HorizontalFlip(p=flip_prob), A.LongestMaxSize(max_size=sizes if len(sizes) > 1 else sizes[0])]
    else:  # evaluation targets stay in original pixels: only the image is resized
        return A.Compose([A.LongestMaxSize(max_size=image_size)])
    return A.Compose(ops, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["indices"], clip=True,
                                                   min_width=1.0, min_height=1.0))


# ----------------------------------------------------------------------------------------- dataset


class CocoDataset(Dataset):
    """Images of a COCO JSON with their targets (see the module docstring for the format)."""

    def __init__(self, images: Sequence[CocoImage], category_ids: Sequence[int], transform: A.Compose | None = None,
                 train: bool = False) -> None:
        self.images = list(images)
        self.category_to_label = {cid: i + 1 for i, cid in enumerate(category_ids)}
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.images)

    def seed_transform(self, seed: int) -> None:
        """Seed the albumentations pipeline's own generator (a resumed run augments each sample as before)."""
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        item = self.images[index]
        image = read_image(item.path)
        h0, w0 = image.shape[:2]
        if (h0, w0) != (item.height, item.width):
            raise ValueError(f"{item.path}: image is {h0}x{w0} (HxW) but its JSON entry says "
                             f"{item.height}x{item.width}")
        anns = item.annotations
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32).reshape(-1, 4)
        masks = [decode_segmentation(a["segmentation"], h0, w0) if "segmentation" in a
                 else _box_mask(a["bbox"], h0, w0) for a in anns]
        if self.train:  # boxes and masks follow the augmentation and the resizing
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, w0)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, h0)
            extra = {"masks": masks} if masks else {}
            out = self.transform(image=image, bboxes=boxes, indices=list(range(len(anns))), **extra)
            image, indices = out["image"], [int(i) for i in out["indices"]]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            masks = [out["masks"][i] for i in indices] if masks else []
            anns = [anns[i] for i in indices]
            mask_size = image.shape[:2]
        else:  # the image is resized; the ground truth stays in original pixels (see the module docstring)
            image = self.transform(image=image)["image"] if self.transform is not None else image
            mask_size = (h0, w0)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack([np.asarray(m, np.uint8) for m in masks])) if masks
            else torch.zeros((0, *mask_size), dtype=torch.uint8),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
                                 dtype=torch.float32),
            "image_id": item.image_id,
            "orig_size": (h0, w0),
            "size": tuple(image.shape[:2]),
            "file_name": item.path.name,
            "path": str(item.path),
        }
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return tensor, target


def _box_mask(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
    """A box-shaped mask for an annotation without a segmentation."""
    x, y, w, h = bbox
    mask = np.zeros((height, width), np.uint8)
    mask[int(max(y, 0)):int(np.ceil(min(y + h, height))), int(max(x, 0)):int(np.ceil(min(x + w, width)))] = 1
    return mask


class PredictImageDataset(Dataset):
    """The images of a folder for ``predict``: (image, target) with no annotations, image_id = index."""

    def __init__(self, folder: str | os.PathLike, image_size: int) -> None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"CocoDataModule: predict_dir {folder} is not a folder")
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise FileNotFoundError(f"CocoDataModule: no images ({', '.join(IMAGE_SUFFIXES)}) in predict_dir {folder}")
        self.transform = A.Compose([A.LongestMaxSize(max_size=image_size)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image = read_image(self.paths[index])
        h0, w0 = image.shape[:2]
        image = self.transform(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return tensor, {"image_id": index, "orig_size": (h0, w0), "size": tuple(image.shape[:2]),
                        "file_name": self.paths[index].name, "path": str(self.paths[index])}


def coco_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images (of different sizes) and targets as lists, as torchvision detection models take them."""
    return [image for image, _ in batch], [target for _, target in batch]


# ------------------------------------------------------------------------------------ datamodule


class CocoDataModule(ResumableDataModule):
    """COCO-format detection + instance segmentation data (see the module docstring)."""

    def __init__(
        self,
        root: str | None = None,
        train_json: str = "annotations/instances_train2017.json",
        val_json: str | None = "annotations/instances_val2017.json",
        test_json: str | None = None,
        train_images: str = "train2017",
        val_images: str = "val2017",
        test_images: str = "test2017",
        image_size: int = 512,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        flip_prob: float = 0.5,
        scale_range: tuple[float, float] = (0.75, 1.25),
        predict_dir: str | None = None,
        predict_split: str | None = None,
    ) -> None:
        """
        Args:
            root: the dataset folder. None: the embedded synthetic set (generated once into
                ``$LATTN_CACHE_DIR`` or ``~/.cache/lattn``), with a warning; its test split is used as test set.
            train_json, val_json, test_json: COCO instances JSON files, relative to `root` (or absolute).
                val_json None: no validation; test_json None: no test set (with ``root=None``:
                ``annotations/instances_test2017.json``).
            train_images, val_images, test_images: image folders, relative to `root` (or absolute).
            image_size: images are resized so that their longer side is this many pixels (with ``root=None``
                at most 160, the embedded images' size).
            batch_size: training batch size. eval_batch_size: validation/test/predict (default: batch_size).
            num_workers: data-loader worker processes.
            flip_prob: training horizontal-flip probability.
            scale_range: training resize range, as factors of image_size (crop-free multi-scale training).
            predict_dir: a folder of images for ``lattn predict`` (image ids are their sorted positions).
            predict_split: ``"val"`` or ``"test"``: predict over that split's images instead, with their
                COCO image ids, so that the results JSON can be scored by COCOeval against that split's JSON.
        """
        super().__init__()
        self.save_hyperparameters()
        if image_size < 16:
            raise ValueError(f"CocoDataModule: image_size must be >= 16 pixels; got {image_size!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or batch_size)):
            if value < 1:
                raise ValueError(f"CocoDataModule: {name} must be >= 1; got {value!r}")
        if predict_split not in (None, "val", "test"):
            raise ValueError(f"CocoDataModule: predict_split must be 'val', 'test' or null; got {predict_split!r}")
        if predict_split is not None and predict_dir is not None:
            raise ValueError("CocoDataModule: give predict_dir (a folder of images) or predict_split, not both")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"CocoDataModule: flip_prob must be in [0, 1]; got {flip_prob!r}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"CocoDataModule: scale_range must be (min, max) with 0 < min <= max; got {scale_range!r}")
        self.root = root
        if root is None:
            data_root = ensure_synthetic_coco()
            _warn_rank_zero(
                "No dataset root given: using the EMBEDDED SYNTHETIC COCO-format set at %s (coloured shapes on "
                "textured backgrounds), NOT the COCO dataset. Numbers on it say nothing about real detection "
                "accuracy. Pass --data.root /path/to/coco (the folder holding annotations/ and train2017/, "
                "val2017/) to train on COCO or on your own COCO-format data.", data_root,
            )
            if test_json is None:
                test_json = "annotations/instances_test2017.json"
            if image_size > SYNTHETIC_IMAGE_SIDE:
                # COCO configs ask for 1333-pixel images; upscaling 160-pixel shapes 8x only costs time.
                _warn_rank_zero("image_size %d lowered to %d, the longer side of the embedded images",
                                image_size, SYNTHETIC_IMAGE_SIDE)
                image_size = SYNTHETIC_IMAGE_SIDE
                self.hparams["image_size"] = self._hparams_initial["image_size"] = image_size
        else:
            data_root = Path(root).expanduser()
            if not data_root.is_dir():
                raise FileNotFoundError(f"CocoDataModule: root {data_root} is not a folder; expected the folder "
                                        "holding annotations/ and the image folders")
        self.dataset_root = data_root
        self.train_json_path = data_root / train_json
        self.val_coco_gt_path: Path | None = data_root / val_json if val_json else None
        self.test_coco_gt_path: Path | None = data_root / test_json if test_json else None
        self.image_dirs = {"train": data_root / train_images, "val": data_root / val_images,
                           "test": data_root / test_images}
        # The label mapping, from the smallest file at hand (every split is checked against it in setup).
        source = self.val_coco_gt_path if self.val_coco_gt_path and self.val_coco_gt_path.is_file() else self.train_json_path
        categories = read_categories(source)
        self.category_ids: list[int] = [int(c["id"]) for c in categories]  #: label l -> COCO id category_ids[l - 1]
        self.class_names: list[str] = [str(c["name"]) for c in categories]  #: label l -> class_names[l - 1]
        self.num_classes: int = len(categories)  #: without the background (label 0)
        self.label_to_category_id = {i + 1: cid for i, cid in enumerate(self.category_ids)}
        self.category_id_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_dir = predict_dir
        self.predict_split = predict_split
        self.train_transform = build_transform(image_size, True, flip_prob, tuple(scale_range))
        self.eval_transform = build_transform(image_size, False)
        self.train_dataset: CocoDataset | None = None
        self.val_dataset: CocoDataset | None = None
        self.test_dataset: CocoDataset | None = None
        self.predict_dataset: Dataset | None = None

    def _dataset(self, split: str, json_path: Path, train: bool) -> CocoDataset:
        images = load_coco_json(json_path, self.image_dirs[split], self.category_ids, train=train)
        if not images:
            raise ValueError(f"CocoDataModule: the {split} split is empty: {json_path} lists no image"
                             + (" with a usable (non-crowd, non-degenerate) annotation" if train else ""))
        return CocoDataset(images, self.category_ids, self.train_transform if train else self.eval_transform, train=train)

    def setup(self, stage: str | None = None) -> None:
        """Parse the JSON files `stage` needs ("fit", "validate", "test", "predict", None: all)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._dataset("train", self.train_json_path, train=True)
        if stage in (None, "fit", "validate") and self.val_dataset is None and self.val_coco_gt_path is not None:
            self.val_dataset = self._dataset("val", self.val_coco_gt_path, train=False)
        if stage in (None, "test") and self.test_dataset is None:
            if self.test_coco_gt_path is None:
                if stage == "test":
                    raise ValueError("CocoDataModule: no test set; pass --data.test_json (relative to root) and "
                                     "--data.test_images")
            else:
                self.test_dataset = self._dataset("test", self.test_coco_gt_path, train=False)
        if stage in (None, "predict") and self.predict_dataset is None:
            if self.predict_split is not None:
                gt_path = self.val_coco_gt_path if self.predict_split == "val" else self.test_coco_gt_path
                if gt_path is None:
                    raise ValueError(f"CocoDataModule: predict_split={self.predict_split!r} but that split has no "
                                     f"JSON; pass --data.{self.predict_split}_json")
                self.predict_dataset = self._dataset(self.predict_split, gt_path, train=False)
            elif self.predict_dir is not None:
                self.predict_dataset = PredictImageDataset(self.predict_dir, self.image_size)
            elif stage == "predict":
                raise ValueError("CocoDataModule: nothing to predict; pass --data.predict_dir FOLDER of images or "
                                 "--data.predict_split val|test")

    def _loader(self, dataset: Dataset | None, stage: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"CocoDataModule: the {stage} dataset is not set up; call setup() first")
        options = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=coco_collate)
        if shuffle:  # training: ordered and augmented by (seed, epoch, sample), resumable mid-epoch
            return self.resumable_train_loader(dataset, batch_size, drop_last=len(dataset) >= batch_size, **options)
        return self.evaluation_loader(dataset, batch_size, **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_coco_gt_path is None:
            return []
        return self._loader(self.val_dataset, "val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, "predict", self.eval_batch_size)
