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
from typing import Any, Literal

import albumentations as A
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from .base import LattnDataModule, image_to_tensor
from .io import read_image
from .synthetic_coco import SYNTHETIC_COCO_IMAGE_SIZE, ensure_synthetic_coco

log = logging.getLogger(__name__)

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
    degenerate, no_area, no_polygon = [], [], []  # annotation ids, named in the warnings below
    crowd = 0
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
        if bbox[2] <= 0 or bbox[3] <= 0:  # an inverted or empty box: no object to detect or to score
            no_area.append(ann.get("id", f"annotations[{i}]"))
            continue
        if (bbox[2] <= 1 or bbox[3] <= 1) and train:
            degenerate.append(ann.get("id", f"annotations[{i}]"))
            continue
        if ann.get("iscrowd", 0) and train:
            crowd += 1
            continue
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list) and not any(len(p) >= 6 for p in segmentation):
            no_polygon.append(ann.get("id", f"annotations[{i}]"))
            if train:  # a mask loss on an empty mask would teach the model that the object is not there
                continue
            ann = {key: value for key, value in ann.items() if key != "segmentation"}  # scored with its box's mask
        images[ann["image_id"]].annotations.append(ann)
    _warn_left_out(json_path, no_area, "a box of width or height <= 0", "left out")
    _warn_left_out(json_path, degenerate, "a box of width or height <= 1", "not trained on")
    _warn_left_out(json_path, no_polygon, "no polygon of 3 or more points",
                   "not trained on" if train else "its box is used as its mask")
    result = list(images.values())
    empty = sum(1 for im in result if not im.annotations)
    if train:
        result = [im for im in result if im.annotations]
    log.info(
        "%s: %d images (%d without annotations, %s), %d annotations%s",
        json_path.name, len(result) + (empty if train else 0), empty,
        "skipped for training" if train else "kept for evaluation",
        sum(len(im.annotations) for im in result),
        f"; skipped {len(degenerate)} degenerate boxes (w or h <= 1) and {crowd} crowd annotations (not trained on)"
        if train else "",
    )
    return result


def _warn_left_out(json_path: Path, annotation_ids: list, problem: str, action: str) -> None:
    if annotation_ids:
        shown = ", ".join(str(a) for a in annotation_ids[:10]) + (", ..." if len(annotation_ids) > 10 else "")
        log.warning("%s: %d annotation(s) with %s (%s): id %s", json_path, len(annotation_ids), problem, action, shown)


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
        return image_to_tensor(image), target


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
        return image_to_tensor(image), {"image_id": index, "orig_size": (h0, w0), "size": tuple(image.shape[:2]),
                        "file_name": self.paths[index].name, "path": str(self.paths[index])}


def coco_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images (of different sizes) and targets as lists, as torchvision detection models take them."""
    return [image for image, _ in batch], [target for _, target in batch]


# ------------------------------------------------------------------------------------ datamodule


class CocoDataModule(LattnDataModule):
    """COCO-format detection + instance segmentation data (see the module docstring).

    Args:
        train_json, val_json, test_json: COCO instances JSON files, relative to `root` (or absolute).
            val_json None: no validation; test_json None: no test set (with ``root=None``:
            ``annotations/instances_test2017.json``).
        train_images, val_images, test_images: image folders, relative to `root` (or absolute).
        image_size: images are resized so that their longer side is this many pixels (with ``root=None``
            at most 160, the embedded images' size).
        flip_prob: training horizontal-flip probability.
        scale_range: training resize range, as factors of image_size (crop-free multi-scale training).
        predict_dir: a folder of images for ``lattn predict`` (image ids are their sorted positions).
        predict_split: ``"val"`` or ``"test"``: predict over that split's images instead, with their
            COCO image ids, so that the results JSON can be scored by COCOeval against that split's JSON.
        **kwargs: ``root`` (the folder holding ``annotations/`` and the image folders; None: the embedded
            synthetic set, whose test split is then the test set), ``batch_size``, ``eval_batch_size``,
            ``num_workers`` (:class:`~lattn_app.data.base.LattnDataModule`).
    """

    layout = "annotations/ (COCO instances JSON files) and the image folders (train2017/, val2017/)"
    embedded_description = "coloured shapes on textured backgrounds in the COCO format"
    collate_fn = staticmethod(coco_collate)

    def __init__(
        self,
        train_json: str = "annotations/instances_train2017.json",
        val_json: str | None = "annotations/instances_val2017.json",
        test_json: str | None = None,
        train_images: str = "train2017",
        val_images: str = "val2017",
        test_images: str = "test2017",
        image_size: int = 512,
        flip_prob: float = 0.5,
        scale_range: tuple[float, float] = (0.75, 1.25),
        predict_dir: str | None = None,
        predict_split: Literal["val", "test"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if image_size < 16:
            raise ValueError(f"CocoDataModule: image_size must be >= 16 pixels; got {image_size!r}")
        if predict_split not in (None, "val", "test"):
            raise ValueError(f"CocoDataModule: predict_split must be 'val', 'test' or null; got {predict_split!r}")
        if predict_split is not None and predict_dir is not None:
            raise ValueError("CocoDataModule: give predict_dir (a folder of images) or predict_split, not both")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"CocoDataModule: flip_prob must be in [0, 1]; got {flip_prob!r}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"CocoDataModule: scale_range must be (min, max) with 0 < min <= max; got {scale_range!r}")
        if self.is_embedded and test_json is None:
            test_json = "annotations/instances_test2017.json"
        self.files = {"train": (train_json, train_images), "val": (val_json, val_images),
                      "test": (test_json, test_images)}
        self.requested_image_size = image_size
        self.flip_prob = flip_prob
        self.scale_range = tuple(scale_range)
        self.predict_dir = predict_dir
        self.predict_split = predict_split
        self._categories: list[dict] | None = None

    def build_embedded(self) -> Path:
        return ensure_synthetic_coco()

    # -------------------------------------------------------------- what the data knows, read on first use

    def json_path(self, split: str) -> Path | None:
        """The COCO JSON of `split` ("train", "val", "test"), or None when that split has none."""
        name = self.files[split][0]
        return self.dataset_root / name if name else None

    @property
    def val_coco_gt_path(self) -> Path | None:
        return self.json_path("val")

    @property
    def test_coco_gt_path(self) -> Path | None:
        return self.json_path("test")

    @property
    def image_size(self) -> int:
        """The longer side images are resized to (on the embedded set at most its images' 160 pixels)."""
        if self.is_embedded and self.requested_image_size > SYNTHETIC_IMAGE_SIDE:
            return SYNTHETIC_IMAGE_SIDE  # COCO configs ask for 1333 pixels; upscaling 160-pixel shapes 8x only costs time
        return self.requested_image_size

    @property
    def categories(self) -> list[dict]:
        """The categories of the smallest JSON at hand (every split is checked against them in setup)."""
        if self._categories is None:
            val = self.json_path("val")
            self._categories = read_categories(val if val is not None and val.is_file() else self.json_path("train"))
        return self._categories

    @property
    def category_ids(self) -> list[int]:
        """label l -> COCO id ``category_ids[l - 1]``."""
        return [int(c["id"]) for c in self.categories]

    @property
    def class_names(self) -> list[str]:
        """label l -> ``class_names[l - 1]``."""
        return [str(c["name"]) for c in self.categories]

    @property
    def num_classes(self) -> int:
        """Object categories, without the background (label 0)."""
        return len(self.categories)

    # ------------------------------------------------------------------------------------- datasets

    def _dataset(self, split: str, train: bool) -> CocoDataset:
        json_path = self.json_path(split)
        images = load_coco_json(json_path, self.dataset_root / self.files[split][1], self.category_ids, train=train)
        if not images:
            raise ValueError(f"CocoDataModule: the {split} split is empty: {json_path} lists no image"
                             + (" with a usable (non-crowd, non-degenerate) annotation" if train else ""))
        transform = (build_transform(self.image_size, True, self.flip_prob, self.scale_range) if train
                     else build_transform(self.image_size, False))
        return CocoDataset(images, self.category_ids, transform, train=train)

    def setup(self, stage: str | None = None) -> None:
        """Parse the JSON files `stage` needs ("fit", "validate", "test", "predict", None: all)."""
        if self.requested_image_size != self.image_size:
            log.info("CocoDataModule: image_size %d lowered to %d, the longer side of the embedded images",
                     self.requested_image_size, self.image_size)
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = self._dataset("train", train=True)
        if stage in (None, "fit", "validate") and "val" not in self.datasets:
            self.datasets["val"] = self._dataset("val", train=False) if self.files["val"][0] else []
        if stage in (None, "test") and "test" not in self.datasets:
            if self.files["test"][0] is not None:
                self.datasets["test"] = self._dataset("test", train=False)
            elif stage == "test":
                raise ValueError("CocoDataModule: no test set; pass --data.test_json (relative to root) and "
                                 "--data.test_images")
        if stage in (None, "predict") and "predict" not in self.datasets:
            if self.predict_split is not None:
                if self.files[self.predict_split][0] is None:
                    raise ValueError(f"CocoDataModule: predict_split={self.predict_split!r} but that split has no "
                                     f"JSON; pass --data.{self.predict_split}_json")
                self.datasets["predict"] = self._dataset(self.predict_split, train=False)
            elif self.predict_dir is not None:
                self.datasets["predict"] = PredictImageDataset(self.predict_dir, self.image_size)
            elif stage == "predict":
                raise ValueError("CocoDataModule: nothing to predict; pass --data.predict_dir FOLDER of images or "
                                 "--data.predict_split val|test")
