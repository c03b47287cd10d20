"""The embedded default detection data: procedurally drawn shapes in the COCO 2017 layout.

``ensure_synthetic_coco()`` writes the set once and returns its root; later calls find it and return at
once::

    <cache_dir>/synthetic_coco_v1_128x160_1000-40-40_seed0/
        README.txt
        annotations/instances_train2017.json   (train: for training)
        annotations/instances_val2017.json     (val: checkpoint selection)
        annotations/instances_test2017.json    (test: held out)
        train2017/000000000001.png ...
        val2017/...
        test2017/...

Each image shows 1 to 5 filled shapes of four categories (:data:`SYNTHETIC_COCO_CATEGORIES`: circle,
square, triangle, star) in random colours, sizes and rotations on a textured background (gradient,
stripes and pixel noise); about one image in ten shows no shape and has no annotation. Shapes may overlap;
each annotation describes the *visible* part of its shape: polygon segmentation (the outer contours of
the visible mask, COCO's ``[[x1, y1, x2, y2, ...]]``), ``bbox`` ``[x, y, w, h]`` enclosing that mask,
``area`` (its pixel count) and ``iscrowd`` 0. Shapes less than a third visible are not annotated and
are painted over. The category ids are deliberately not contiguous (1, 3, 7, 9) so that the mapping
to contiguous labels is exercised.

The set is deterministic (image i of a split comes from its own generator seeded by (seed, split, i)).
The cache directory is ``$LATTN_CACHE_DIR`` if set, else ``~/.cache/lattn``; the set is written into a
temporary sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np

from .cache import build_once

log = logging.getLogger(__name__)

SYNTHETIC_COCO_IMAGE_SIZE = (128, 160)  #: (height, width) of the embedded set's images

VERSION = 1
"""Bumped whenever the drawing or the annotation format changes, so that an old cached set is not reused."""

SYNTHETIC_COCO_CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 3, "name": "square"},
                             {"id": 7, "name": "triangle"}, {"id": 9, "name": "star"})
SPLITS = ("train", "val", "test")
EMPTY_FRACTION = 0.1
MIN_VISIBLE_FRACTION = 1 / 3

__all__ = ["SYNTHETIC_COCO_CATEGORIES", "ensure_synthetic_coco", "render_synthetic_coco_image"]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured background: a colour gradient plus faint stripes (float32 (H, W, 3))."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 215, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None]
    image = base + ramp * rng.uniform(-60, 60, 3).astype(np.float32)
    period = rng.uniform(6, 20)
    tilt = rng.uniform(0, np.pi)
    stripes = np.sin((np.cos(tilt) * xx + np.sin(tilt) * yy) * 2 * np.pi / period)[..., None]
    return image + stripes * rng.uniform(5, 20, 3).astype(np.float32)


def _shape_polygon(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The outline (K, 2) of one shape in pixel coordinates (x, y)."""
    radius = rng.uniform(0.1, 0.25) * min(height, width)
    centre = np.array([rng.uniform(radius * 0.7, width - radius * 0.7), rng.uniform(radius * 0.7, height - radius * 0.7)])
    angle = rng.uniform(0, 2 * np.pi)
    if name == "circle":
        corners, lengths = 48, np.full(48, radius)
    elif name == "square":
        corners, lengths = 4, np.full(4, radius)
    elif name == "triangle":
        corners, lengths = 3, np.full(3, radius * 1.15)
    elif name == "star":
        corners, lengths = 10, np.full(10, radius * 1.1)
        lengths[1::2] *= rng.uniform(0.4, 0.5)
    else:
        raise ValueError(f"unknown synthetic COCO category {name!r}")
    theta = angle + np.arange(corners) * 2 * np.pi / corners
    return centre + np.stack([np.cos(theta), np.sin(theta)], axis=1) * lengths[:, None]


def _colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    while True:
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) > 100:
            return colour


def _mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons (outer contours, >= 3 points) of a binary mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) >= 3:
            # +0.5: contour points are pixel centres; the polygon passes through them.
            polygons.append([round(float(v) + 0.5, 2) for v in contour.reshape(-1)])
    return polygons


def render_synthetic_coco_image(
    rng: np.random.Generator, image_size: tuple[int, int] = (128, 160)
) -> tuple[np.ndarray, list[dict]]:
    """One RGB uint8 image (H, W, 3) and its annotations (dicts with category_id, bbox, area, segmentation)."""
    height, width = image_size
    image = _background(rng, height, width)
    names = [c["name"] for c in SYNTHETIC_COCO_CATEGORIES]
    count = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, 6))
    shapes: list[tuple[int, np.ndarray]] = []  # (category index, full mask)
    for _ in range(count):
        index = int(rng.integers(len(names)))
        polygon = _shape_polygon(names[index], rng, height, width)
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
        colour = _colour(rng, image.mean(axis=(0, 1)))
        image[mask.astype(bool)] = colour
        shapes.append((index, mask.astype(bool)))
    image = image + rng.normal(0, rng.uniform(2, 10), image.shape)
    annotations = []
    covered = np.zeros((height, width), bool)
    for index, mask in reversed(shapes):  # later shapes are on top
        visible = mask & ~covered
        covered |= mask
        if visible.sum() < MIN_VISIBLE_FRACTION * max(mask.sum(), 1):
            continue
        polygons = _mask_polygons(visible)
        if not polygons:
            continue
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append({
            "category_id": SYNTHETIC_COCO_CATEGORIES[index]["id"],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(visible.sum()),
            "segmentation": polygons,
            "iscrowd": 0,
        })
    annotations.reverse()
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), annotations


def _readme(image_size: tuple[int, int], counts: dict[str, int], seed: int) -> str:
    return "\n".join([
        "lattn embedded synthetic COCO-format detection set (procedurally generated; not real data).",
        "",
        f"Version {VERSION}, seed {seed}, images of {image_size[0]}x{image_size[1]} (HxW) pixels in the COCO 2017 layout.",
        "Splits: " + ", ".join(f"{split} ({n} images)" for split, n in counts.items()) + ".",
        "Categories (id: name): " + ", ".join(f"{c['id']}: {c['name']}" for c in SYNTHETIC_COCO_CATEGORIES) + ".",
        "Written by lattn_app.data.synthetic_coco; regenerated identically if deleted.",
        "Train on your own COCO-format data with --data.root PATH.",
    ]) + "\n"


# Shaped like the other embedded sets' ensure_* (cache folder, counts, seed): on purpose, one per set.
def ensure_synthetic_coco(
    cache_dir: str | Path | None = None,
    *,
    image_size: tuple[int, int] = SYNTHETIC_COCO_IMAGE_SIZE,
    train_images: int = 1000,
    val_images: int = 40,
    test_images: int = 40,
    seed: int = 0,
) -> Path:
    """Return the root of the synthetic COCO set, generating it the first time.

    Args:
        cache_dir: where the set lives; None: ``$LATTN_CACHE_DIR``, else ``~/.cache/lattn``.
        image_size: (height, width) of the images, each at least 32.
        train_images, val_images, test_images: images per split (at least 1).
        seed: base seed; every image has its own generator seeded by (seed, split, index).

    Returns:
        the root, holding ``annotations/instances_{train,val,test}2017.json`` and ``{train,val,test}2017/``.
        Its name encodes the version and every argument.
    """
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size must be (height, width) with both >= 32; got {image_size!r}")
    counts = {"train": train_images, "val": val_images, "test": test_images}
    for split, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{split}_images must be a positive integer; got {count!r}")
    name = (f"synthetic_coco_v{VERSION}_{image_size[0]}x{image_size[1]}_"
            f"{train_images}-{val_images}-{test_images}_seed{seed}")

    def write(tmp: Path) -> None:
        (tmp / "annotations").mkdir()
        for split_index, split in enumerate(SPLITS):
            folder = tmp / f"{split}2017"
            folder.mkdir()
            images, annotations = [], []
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_index, i])
                image, anns = render_synthetic_coco_image(rng, image_size)
                image_id = i + 1
                file_name = f"{image_id:012d}.png"
                if not cv2.imwrite(str(folder / file_name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                    raise OSError(f"could not write {folder / file_name}")
                images.append({"id": image_id, "file_name": file_name, "height": image_size[0], "width": image_size[1]})
                for ann in anns:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
            document = {
                "info": {"description": f"lattn synthetic COCO set v{VERSION} ({split})", "version": str(VERSION)},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": [{**c, "supercategory": "shape"} for c in SYNTHETIC_COCO_CATEGORIES],
            }
            (tmp / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(document))
        (tmp / "README.txt").write_text(_readme(image_size, counts, seed))

    return build_once(cache_dir, name, write, "synthetic COCO set")
