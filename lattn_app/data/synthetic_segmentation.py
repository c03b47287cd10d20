"""The embedded default segmentation data: procedurally drawn textured scenes in the ADE20K layout.

``ensure_synthetic_ade20k()`` writes the set once and returns its root; later calls return at once::

    <cache_dir>/synthetic_ade20k_v1_96x128_500-100_seed0/
        README.txt
        ADEChallengeData2016/objectInfo150.txt              the class list (ADE20K's format)
        ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...
        ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...
        ADEChallengeData2016/annotations/training/ADE_train_00000001.png ...   (8-bit class ids)
        ADEChallengeData2016/annotations/validation/...

Masks follow ADE20K's convention: 0 = unlabelled (ignored), 1..K = the classes of
:data:`SYNTHETIC_ADE20K_CLASSES`. Each scene is

- a "stuff" background: two of sky, grass, road, water and wall, split by a wavy horizon;
- 2 to 5 objects (tree, brick, cloth, and stuff classes as objects) drawn one over the other
  (occlusion): star-shaped outlines whose radius is a random Fourier series (irregular, concave
  boundaries), some with a thin limb 2-3 pixels wide;
- 0 to 3 poles: polylines 1-3 pixels wide (thin parts), over or under the objects;
- sometimes a small unlabelled patch of mixed texture (mask 0), like ADE20K's unlabelled pixels.

Every class is a *texture* (stripes of a class-specific period and angle, bricks, checks, grain,
waves, dots, smooth gradients) in colours drawn around a class hue with wide jitter, and pairs of
classes share colour ranges (road and wall are both grey; grass and tree both green), so a model has to
read texture and shape, not one colour per class. Sensor noise is added and the images are saved as
JPEG (quality 95), the format of ADE20K's images.

The set is deterministic (image i of a split comes from its own generator seeded by (seed, split, i)).
The cache directory is ``$LATTN_CACHE_DIR`` if set, else ``~/.cache/lattn``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .cache import build_once

__all__ = ["SYNTHETIC_ADE20K_CLASSES", "ensure_synthetic_ade20k", "render_synthetic_scene"]

VERSION = 1
"""Bumped whenever the drawing changes, so that an old cached set is not reused."""

SYNTHETIC_ADE20K_IMAGE_SIZE = (96, 128)  #: (height, width) of the embedded images

#: Mask value k (1-based, as in ADE20K) is SYNTHETIC_ADE20K_CLASSES[k - 1]: (name, hue in degrees, texture).
SYNTHETIC_ADE20K_CLASSES = (
    ("sky", 210, "gradient"),
    ("grass", 110, "grain"),
    ("road", None, "speckle"),  # grey
    ("water", 195, "waves"),
    ("wall", None, "stripes"),  # grey too: only the texture tells road from wall
    ("tree", 120, "dots"),  # green like grass
    ("brick", 15, "bricks"),
    ("cloth", 300, "checks"),
    ("pole", 40, "rings"),
)
STUFF = ("sky", "grass", "road", "water", "wall")
OBJECTS = ("tree", "brick", "cloth", "water", "wall", "grass")
SPLITS = {"training": "train", "validation": "val"}
_NAMES = [name for name, _, _ in SYNTHETIC_ADE20K_CLASSES]


def _value(name: str) -> int:
    return _NAMES.index(name) + 1


def _texture(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A texture in [0, 1] over the grid (H, W)."""
    height, width = yy.shape
    if kind == "gradient":
        t = yy / height * rng.uniform(0.6, 1.2) + rng.normal(0, 0.02, yy.shape)
    elif kind == "grain":
        noise = rng.random((height // 2 + 1, width // 2 + 1)).astype(np.float32)
        t = cv2.resize(noise, (width, height), interpolation=cv2.INTER_NEAREST) * 0.8 + 0.2 * rng.random(yy.shape)
    elif kind == "speckle":
        t = 0.5 + 0.15 * rng.standard_normal(yy.shape)
        t[rng.random(yy.shape) < 0.04] = 1.0
    elif kind == "waves":
        f = rng.uniform(0.15, 0.3)
        t = 0.5 + 0.5 * np.sin(xx * f * 0.4 + 3.0 * np.sin(yy * f))
    elif kind == "stripes":
        angle, period = rng.uniform(-0.2, 0.2), rng.uniform(3.0, 5.0)
        t = 0.5 + 0.5 * np.sign(np.sin((np.sin(angle) * xx + np.cos(angle) * yy) * 2 * np.pi / period))
    elif kind == "dots":
        period = rng.uniform(5.0, 8.0)
        t = ((np.sin(xx * 2 * np.pi / period) * np.sin(yy * 2 * np.pi / period)) > 0.35).astype(np.float32)
    elif kind == "bricks":
        h, w = rng.uniform(5, 7), rng.uniform(10, 14)
        row = np.floor(yy / h)
        shifted = xx + (row % 2) * w / 2
        mortar = (np.mod(yy, h) < 1.2) | (np.mod(shifted, w) < 1.2)
        t = np.where(mortar, 1.0, 0.25 + 0.1 * rng.standard_normal(yy.shape))
    elif kind == "checks":
        size = rng.uniform(4.0, 6.0)
        t = ((np.floor((xx + yy) / size) + np.floor((xx - yy) / size)) % 2).astype(np.float32)
    elif kind == "rings":
        t = 0.5 + 0.5 * np.sin(np.hypot(xx - rng.uniform(0, width), yy - rng.uniform(0, height)) * 1.5)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return np.clip(t, 0.0, 1.0).astype(np.float32)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    pixel = np.uint8([[[int(hue / 2) % 180, int(saturation * 255), int(value * 255)]]])
    return cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _paint(rng: np.random.Generator, name: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The texture of class `name` in two colours around its hue: float (H, W, 3)."""
    _, hue, kind = SYNTHETIC_ADE20K_CLASSES[_NAMES.index(name)]
    if hue is None:  # grey classes
        dark, light = _hsv_to_rgb(0, 0.0, rng.uniform(0.2, 0.45)), _hsv_to_rgb(0, rng.uniform(0, 0.1), rng.uniform(0.55, 0.85))
    else:
        h = hue + rng.uniform(-25, 25)
        dark = _hsv_to_rgb(h, rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.5))
        light = _hsv_to_rgb(h + rng.uniform(-15, 15), rng.uniform(0.3, 0.8), rng.uniform(0.6, 0.95))
    t = _texture(kind, rng, yy, xx)[..., None]
    return dark + (light - dark) * t


def _blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An irregular star-shaped outline (K, 2) in (x, y): radius = a random Fourier series of the angle."""
    radius = rng.uniform(0.12, 0.3) * min(height, width)
    centre = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += rng.uniform(0, 0.35 / k ** 0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(r, 0.25, None) * rng.uniform(0.7, 1.3, (1,))
    stretch = rng.uniform(0.6, 1.6)
    return centre + np.stack([np.cos(theta) * r * stretch, np.sin(theta) * r / stretch], axis=1)


def render_synthetic_scene(rng: np.random.Generator, image_size: tuple[int, int] = SYNTHETIC_ADE20K_IMAGE_SIZE
                           ) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image (H, W, 3) and its uint8 mask (H, W) of ADE20K-style values (0 unlabelled, 1..K)."""
    height, width = image_size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    mask = np.zeros((height, width), np.uint8)

    def put(region: np.ndarray, name: str | None) -> None:
        if name is None:  # unlabelled: a mixture of two textures
            a, b = rng.choice(_NAMES, 2, replace=False)
            paint = 0.5 * (_paint(rng, a, yy, xx) + _paint(rng, b, yy, xx))
            value = 0
        else:
            paint, value = _paint(rng, name, yy, xx), _value(name)
        image[region] = paint[region]
        mask[region] = value

    # Background: two stuff classes split by a wavy horizon.
    top, bottom = rng.choice(STUFF, 2, replace=False)
    horizon = height * rng.uniform(0.3, 0.7) + sum(
        rng.uniform(1, 6) * np.sin(xx[0] * rng.uniform(0.02, 0.15) + rng.uniform(0, 6)) for _ in range(3))
    put(np.ones((height, width), bool) & (yy < horizon[None, :]), str(top))
    put(yy >= horizon[None, :], str(bottom))

    layers: list[tuple[str, str]] = [("object", str(rng.choice(OBJECTS))) for _ in range(int(rng.integers(2, 6)))]
    layers += [("pole", "pole")] * int(rng.integers(0, 4))
    order = rng.permutation(len(layers))
    for index in order:  # objects and poles in random depth order: each occludes what was drawn before
        kind, name = layers[index]
        region = np.zeros((height, width), np.uint8)
        if kind == "object":
            cv2.fillPoly(region, [np.round(_blob(rng, height, width) * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
            if rng.random() < 0.4:  # a thin limb of the same class
                start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
                end = start + rng.uniform(-0.5, 0.5, 2) * np.array([width, height])
                cv2.line(region, tuple(int(v) for v in start), tuple(int(v) for v in end), 1, int(rng.integers(2, 4)))
        else:
            points = np.stack([np.linspace(rng.uniform(0, width), rng.uniform(0, width), 4),
                               np.linspace(-2, height + 2, 4)], axis=1)
            points += rng.normal(0, 3, points.shape)
            cv2.polylines(region, [np.round(points).astype(np.int32)], False, 1, int(rng.integers(1, 4)))
        put(region.astype(bool), name)
    if rng.random() < 0.3:
        patch = np.zeros((height, width), np.uint8)
        cv2.circle(patch, (int(rng.uniform(0, width)), int(rng.uniform(0, height))), int(rng.uniform(3, 8)), 1, -1)
        put(patch.astype(bool), None)
    # Lighting and sensor noise
    image *= rng.uniform(0.8, 1.2) + rng.uniform(-0.15, 0.15) * (xx / width)[..., None]
    image += rng.normal(0, rng.uniform(2, 8), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _object_info(pixel_ratios: np.ndarray, counts: dict[str, np.ndarray]) -> str:
    """objectInfo150.txt of ADE20K: Idx, Ratio (pixel share), Train and Val (images containing the class), Name."""
    lines = ["Idx\tRatio\tTrain\tVal\tName"]
    for index, name in enumerate(_NAMES):
        lines.append(f"{index + 1}\t{pixel_ratios[index]:.4f}\t{int(counts['training'][index])}\t"
                     f"{int(counts['validation'][index])}\t{name}")
    return "\n".join(lines) + "\n"


def _readme(image_size: tuple[int, int], counts: dict[str, int], seed: int, pixels: np.ndarray) -> str:
    shares = pixels / max(1, pixels.sum())
    return "\n".join([
        "lattn embedded synthetic semantic segmentation set in the ADE20K layout (procedurally generated; not real data).",
        "",
        f"Version {VERSION}, seed {seed}, images of {image_size[0]}x{image_size[1]} (HxW) pixels.",
        "Splits: " + ", ".join(f"{split} ({n} images)" for split, n in counts.items()) + ".",
        "Masks: 8-bit PNG, 0 = unlabelled (ignored), k = class k of objectInfo150.txt (ADE20K's convention).",
        "Classes (value: name, share of the training pixels): "
        + ", ".join(f"{i + 1}: {name} {shares[i]:.3f}" for i, name in enumerate(_NAMES)) + ".",
        "Written by lattn_app.data.synthetic_segmentation; regenerated identically if deleted.",
        "Train on ADE20K itself with --data.root PATH (the folder holding ADEChallengeData2016/).",
    ]) + "\n"


# Shaped like the other embedded sets' ensure_* (cache folder, counts, seed): on purpose, one per set.
def ensure_synthetic_ade20k(
    cache_dir: str | Path | None = None,
    *,
    image_size: tuple[int, int] = SYNTHETIC_ADE20K_IMAGE_SIZE,
    train_images: int = 500,
    val_images: int = 100,
    seed: int = 0,
) -> Path:
    """Return the root of the synthetic ADE20K-layout set (it holds ``ADEChallengeData2016/``), generating it once.

    Args:
        cache_dir: where the set lives; None: ``$LATTN_CACHE_DIR``, else ``~/.cache/lattn``.
        image_size: (height, width) of the images, each at least 32.
        train_images, val_images: images of ``training`` and ``validation`` (at least 1 each).
        seed: base seed; every image has its own generator seeded by (seed, split, index).
    """
    image_size = tuple(int(v) for v in image_size)
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size must be (height, width) with both >= 32; got {image_size!r}")
    counts = {"training": train_images, "validation": val_images}
    for split, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{SPLITS[split]}_images must be a positive integer; got {count!r}")
    name = f"synthetic_ade20k_v{VERSION}_{image_size[0]}x{image_size[1]}_{train_images}-{val_images}_seed{seed}"

    def write(tmp: Path) -> None:
        base = tmp / "ADEChallengeData2016"
        pixels = np.zeros(len(_NAMES), np.int64)
        present = {split: np.zeros(len(_NAMES), np.int64) for split in counts}
        for split_index, split in enumerate(counts):
            (base / "images" / split).mkdir(parents=True)
            (base / "annotations" / split).mkdir(parents=True)
            prefix = "ADE_train" if split == "training" else "ADE_val"
            for i in range(counts[split]):
                image, mask = render_synthetic_scene(np.random.default_rng([seed, split_index, i]), image_size)
                stem = f"{prefix}_{i + 1:08d}"
                if not cv2.imwrite(str(base / "images" / split / f"{stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, 95]):
                    raise OSError(f"could not write {base / 'images' / split / stem}.jpg")
                if not cv2.imwrite(str(base / "annotations" / split / f"{stem}.png"), mask):
                    raise OSError(f"could not write {base / 'annotations' / split / stem}.png")
                histogram = np.bincount(mask.ravel(), minlength=len(_NAMES) + 1)[1:]
                present[split] += histogram > 0
                if split == "training":
                    pixels += histogram
        (base / "objectInfo150.txt").write_text(_object_info(pixels / max(1, pixels.sum()), present))
        (tmp / "README.txt").write_text(_readme(image_size, {SPLITS[s]: n for s, n in counts.items()}, seed, pixels))

    return build_once(cache_dir, name, write, "synthetic ADE20K-layout segmentation set")
