"""The embedded default classification data: procedurally drawn shapes and patterns in ImageNet layout.

``ensure_synthetic_classification()`` writes the set once and returns its root; later calls find it
and return at once::

    <cache_dir>/synthetic_classification_v1_64px_100-25-25_seed0/
        README.txt
        train/<class_name>/<class_name>_00000.png     100 per class
        val/<class_name>/...                            25 per class (checkpoint selection)
        test/<class_name>/...                           25 per class (held out)

There are 10 classes (:data:`SYNTHETIC_CLASSES`): filled shapes (circle, square, triangle, star,
cross), outlines (ring), scattered dots and periodic patterns (horizontal and vertical stripes,
checkerboard). Each image draws its colours, position, size, rotation, background gradient and pixel
noise at random, so the task is learnable (a small model reaches well above chance in a minute or two
of CPU training) but not trivial. The set is deterministic: image i of a class and split comes from its
own seeded generator, so the same arguments give the same bytes on every machine.

The cache directory is ``$LATTN_CACHE_DIR`` if set, else ``~/.cache/lattn``. The set is written into a
temporary sibling directory and renamed into place when complete, so an interrupted generation never
leaves a partial set behind (its ``.tmp-`` directory is removed by a later call after an hour).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from .cache import build_once, default_cache_dir  # noqa: F401 (default_cache_dir: part of this module's API)

log = logging.getLogger(__name__)

VERSION = 1
"""Bumped whenever the drawing changes, so that an old cached set is not reused."""

SYNTHETIC_CLASSES = (
    "checkerboard",
    "circle",
    "cross",
    "dots",
    "ring",
    "square",
    "star",
    "stripes_horizontal",
    "stripes_vertical",
    "triangle",
)
SPLITS = ("train", "val", "test")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a foreground colour far enough apart to be told apart through the noise."""
    background = rng.uniform(0, 255, 3)
    while True:
        foreground = rng.uniform(0, 255, 3)
        if np.linalg.norm(foreground - background) > 90:
            return background, foreground


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """A flat colour, or (half of the time) a linear gradient around it in a random direction."""
    image = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        image = image + ramp * rng.uniform(-60, 60, 3).astype(np.float32)
    return image


def _rotated_coords(size: int, centre: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u, v) relative to `centre`, rotated by `angle` radians."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x, y = xx - centre[0], yy - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def _soft(distance_inside: np.ndarray) -> np.ndarray:
    """Anti-aliased mask from a signed distance (positive inside), one pixel of transition."""
    return np.clip(distance_inside + 0.5, 0.0, 1.0)


def _polygon_mask(size: int, points: np.ndarray) -> np.ndarray:
    """Anti-aliased filled polygon (points in pixel coordinates) as a float mask in [0, 1]."""
    shift = 4  # sub-pixel precision of cv2's drawing functions
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.round(points * (1 << shift)).astype(np.int32)], 255, cv2.LINE_AA, shift)
    return canvas.astype(np.float32) / 255.0


def _shape_mask(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The foreground coverage (H, W) in [0, 1] of one drawing of class `name`."""
    radius = rng.uniform(0.16, 0.34) * size
    centre = rng.uniform(radius * 0.8, size - radius * 0.8, 2)
    angle = rng.uniform(-np.pi, np.pi)
    u, v = _rotated_coords(size, centre, angle)
    if name == "circle":
        return _soft(radius - np.hypot(u, v))
    if name == "ring":
        thickness = rng.uniform(0.15, 0.3) * radius
        return _soft(thickness - np.abs(np.hypot(u, v) - radius))
    if name == "square":
        half = radius * 0.8
        return _soft(half - np.maximum(np.abs(u), np.abs(v)))
    if name == "cross":
        arm = rng.uniform(0.18, 0.3) * radius
        bar_u = np.minimum(arm - np.abs(u), radius - np.abs(v))
        bar_v = np.minimum(arm - np.abs(v), radius - np.abs(u))
        return _soft(np.maximum(bar_u, bar_v))
    if name in ("triangle", "star"):
        corners = 3 if name == "triangle" else 10
        theta = angle + np.arange(corners) * 2 * np.pi / corners
        lengths = np.full(corners, radius)
        if name == "star":
            lengths[1::2] *= rng.uniform(0.38, 0.5)
        points = centre + np.stack([np.cos(theta), np.sin(theta)], axis=1) * lengths[:, None]
        return _polygon_mask(size, points)
    if name == "dots":
        mask = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(5, 11)):
            dot_radius = rng.uniform(0.03, 0.06) * size
            dot_centre = rng.uniform(dot_radius, size - dot_radius, 2)
            du, dv = _rotated_coords(size, dot_centre, 0.0)
            mask = np.maximum(mask, _soft(dot_radius - np.hypot(du, dv)))
        return mask
    # Periodic patterns fill a random rectangle covering most of the image.
    period = rng.uniform(0.1, 0.22) * size
    phase = rng.uniform(0, period)
    tilt = rng.uniform(-0.25, 0.25)  # radians: near-horizontal / near-vertical
    u, v = _rotated_coords(size, np.array([size / 2, size / 2]), tilt)
    if name == "stripes_horizontal":
        pattern = _soft((period / 4 - np.abs((v + phase) % period - period / 2)) * 2)
    elif name == "stripes_vertical":
        pattern = _soft((period / 4 - np.abs((u + phase) % period - period / 2)) * 2)
    elif name == "checkerboard":
        pattern = ((np.floor((u + phase) / period) + np.floor((v + phase) / period)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown synthetic class {name!r}; expected one of {SYNTHETIC_CLASSES}")
    x0, y0 = rng.uniform(0, 0.3 * size, 2)
    x1, y1 = size - rng.uniform(0, 0.3 * size, 2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    return pattern * ((xx > x0) & (xx < x1) & (yy > y0) & (yy < y1))


def render_synthetic_image(name: str, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """One RGB uint8 image (image_size, image_size, 3) of class `name`, drawn with `rng`."""
    background, foreground = _colours(rng)
    image = _background(rng, image_size, background)
    mask = _shape_mask(name, rng, image_size)[..., None]
    image = image * (1 - mask) + foreground.astype(np.float32) * mask
    image = image + rng.normal(0, rng.uniform(2, 16), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _readme(image_size: int, counts: dict[str, int], seed: int) -> str:
    lines = [
        "lattn embedded synthetic classification set (procedurally generated; not real data).",
        "",
        f"Version {VERSION}, seed {seed}, {len(SYNTHETIC_CLASSES)} classes, RGB PNG images of "
        f"{image_size}x{image_size} pixels, in the ImageNet folder layout <split>/<class_name>/<file>.png.",
        "Splits: " + ", ".join(f"{split} ({n} per class)" for split, n in counts.items()) + ".",
        "train is for training, val for checkpoint selection, test is held out for the final evaluation.",
        "Classes: " + ", ".join(SYNTHETIC_CLASSES) + ".",
        "Each image has a random background (flat or gradient), foreground colour, position, size,",
        "rotation and Gaussian pixel noise. Written by lattn_app.data.synthetic_classification;",
        "it is regenerated identically if deleted. Train on your own data with --data.root PATH.",
    ]
    return "\n".join(lines) + "\n"


def ensure_synthetic_classification(
    cache_dir: str | Path | None = None,
    image_size: int = 64,
    train_per_class: int = 100,
    val_per_class: int = 25,
    test_per_class: int = 25,
    seed: int = 0,
) -> Path:
    """Return the root of the synthetic classification set, generating it the first time.

    Args:
        cache_dir: where the set lives; None: ``$LATTN_CACHE_DIR``, else ``~/.cache/lattn``.
        image_size: side of the square images, in pixels (at least 16).
        train_per_class, val_per_class, test_per_class: images per class in each split (at least 1).
        seed: base seed; every image has its own generator seeded by (seed, split, class, index).

    Returns:
        the set's root directory, containing ``README.txt`` and ``train/``, ``val/``, ``test/``. Its
        name encodes the version and every argument, so different arguments never share a directory.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16; got {image_size!r}")
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    for split, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{split}_per_class must be a positive integer; got {count!r}")
    name = (
        f"synthetic_classification_v{VERSION}_{image_size}px_"
        f"{train_per_class}-{val_per_class}-{test_per_class}_seed{seed}"
    )

    def write(tmp: Path) -> None:
        for split_index, split in enumerate(SPLITS):
            for class_index, class_name in enumerate(SYNTHETIC_CLASSES):
                folder = tmp / split / class_name
                folder.mkdir(parents=True)
                for i in range(counts[split]):
                    rng = np.random.default_rng([seed, split_index, class_index, i])
                    image = render_synthetic_image(class_name, rng, image_size)
                    path = folder / f"{class_name}_{i:05d}.png"
                    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
                        raise OSError(f"could not write {path}")
        (tmp / "README.txt").write_text(_readme(image_size, counts, seed))

    return build_once(cache_dir, name, write, "synthetic classification set")
