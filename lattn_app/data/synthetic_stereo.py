"""The embedded stereo dataset: a small synthetic set in exactly the Scene Flow (FlyingThings3D) layout.

``SceneFlowDataModule(root=None)`` trains on this set, so that ``lattn fit`` works on a fresh machine
without downloading Scene Flow. :func:`ensure_synthetic_sceneflow` generates it once, deterministically,
into a cache folder and returns its root; later calls return the same folder at once::

    root/README.txt
    root/FlyingThings3D/frames_cleanpass/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/0006.png ... 0015.png
    root/FlyingThings3D/frames_finalpass/...          (the clean images, blurred, with sensor noise)
    root/FlyingThings3D/disparity/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/0006.pfm ... 0015.pfm

What the images show: a textured background plane (constant or slanted disparity) and 3 to 6
textured foreground shapes (rotated rectangles, ellipses, convex polygons), each at its own constant
or slightly slanted disparity, moving a little from frame to frame of a sequence. Every surface has its
own random multi-scale colour texture (no flat areas), so matching is unambiguous. Both views are
rendered from the same scene with a z-buffer: the right view sees a surface point of the left view at
``x_right = x_left - d``. The disparities are therefore exact, for both views, occlusions included:
the left PFM gives the disparity of the surface each left pixel sees, the right PFM that of the
surface each right pixel sees (``x_left = x_right + d``).

Defaults: 128 x 256 images (H x W), disparities in [2, 44] (use ``max_disparity=48`` in the model),
40 TRAIN sequences and 10 TEST sequences of 4 frames (0006..0009, numbered as in FlyingThings3D), that
is 160 TRAIN and 40 TEST frames (many short sequences: more distinct scenes for the same file count); sequence ``i`` of a split is ``{A,B,C}[i % 3]/{i // 3:04d}``.

The cache folder is ``$LATTN_CACHE_DIR`` if set, else ``~/.cache/lattn``; the set lives in a
sub-folder whose name holds the generator version and parameters. It is written into a temporary
sibling folder and renamed into place when complete, so an interrupted generation never leaves a
partial set and concurrent callers do not disturb each other.
"""

from __future__ import annotations

import logging
import math
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .cache import README_NAME, build_once, default_cache_dir
from .io import write_pfm

log = logging.getLogger(__name__)

__all__ = [
    "SYNTHETIC_VERSION",
    "StereoFrame",
    "default_cache_dir",
    "ensure_synthetic_sceneflow",
    "generate_synthetic_sceneflow",
    "render_sequence",
    "sequence_folder",
    "SyntheticSceneFlow",
]

# Bump when the generated content changes: the cache folder name carries it, so old sets are not reused.
SYNTHETIC_VERSION = "v1"
FIRST_FRAME = 6  # FlyingThings3D numbers the 10 frames of a sequence 0006..0015
SEQUENCE_LETTERS = ("A", "B", "C")
SPLITS = ("TRAIN", "TEST")
SHAPES = ("rectangle", "ellipse", "polygon")


@dataclass
class StereoFrame:
    """One rendered stereo frame (clean images) with its exact disparities."""

    left: np.ndarray  #: uint8 (H, W, 3) RGB
    right: np.ndarray  #: uint8 (H, W, 3) RGB
    disparity_left: np.ndarray  #: float32 (H, W), > 0: the left pixel x matches the right pixel x - d
    disparity_right: np.ndarray  #: float32 (H, W), > 0: the right pixel x matches the left pixel x + d


@dataclass
class _Surface:
    """A textured planar surface: a shape in its local (u, v) frame, placed in the left view per frame.

    At frame t the local origin sits at left-view pixel (cx + vx t, cy + vy t) and the disparity is
    d(u, v) = d0 + vd t + gx u + gy v. The background has no shape (it covers everything).
    """

    texture: np.ndarray  # float32 (th, tw, 3); local (0, 0) is texture pixel (origin, origin_y)
    origin: tuple[float, float]
    center: tuple[float, float]
    velocity: tuple[float, float]
    disparity: tuple[float, float]  # d0, vd (per frame)
    slant: tuple[float, float]  # gx, gy
    shape: str | None = None
    theta: float = 0.0
    half_axes: tuple[float, float] = (0.0, 0.0)
    vertices: np.ndarray | None = None  # (k, 2) counter-clockwise, for polygons

    def state(self, t: int) -> tuple[float, float, float]:
        """Centre x, centre y and centre disparity at frame t."""
        return (self.center[0] + self.velocity[0] * t, self.center[1] + self.velocity[1] * t,
                self.disparity[0] + self.disparity[1] * t)

    def contains(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.shape is None:
            return np.ones(u.shape, dtype=bool)
        cos, sin = math.cos(self.theta), math.sin(self.theta)
        p, q = u * cos + v * sin, -u * sin + v * cos
        a, b = self.half_axes
        if self.shape == "rectangle":
            return (np.abs(p) <= a) & (np.abs(q) <= b)
        if self.shape == "ellipse":
            return (p / a) ** 2 + (q / b) ** 2 <= 1.0
        inside = np.ones(u.shape, dtype=bool)
        vertices = self.vertices
        for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
            inside &= (x1 - x0) * (q - y0) - (y1 - y0) * (p - x0) >= 0
        return inside


def _check_parameters(height: int, width: int, train_sequences: int, test_sequences: int,
                      frames_per_sequence: int, min_disparity: float, max_disparity: float) -> None:
    def fail(name: str, value: object, expected: str) -> ValueError:
        return ValueError(f"synthetic Scene Flow set: {name}={value!r}; expected {expected}")

    if height < 16:
        raise fail("height", height, "at least 16 pixels")
    if width < 32:
        raise fail("width", width, "at least 32 pixels")
    for name, value in (("train_sequences", train_sequences), ("test_sequences", test_sequences)):
        if value < 0:
            raise fail(name, value, "a count >= 0")
    if train_sequences + test_sequences < 1:
        raise fail("train_sequences + test_sequences", train_sequences + test_sequences, "at least 1 sequence")
    if not 1 <= frames_per_sequence <= 9000:
        raise fail("frames_per_sequence", frames_per_sequence, "1 to 9000 frames")
    if not 0 < min_disparity:
        raise fail("min_disparity", min_disparity, "a positive disparity")
    if not max_disparity >= min_disparity + 8:
        raise fail("max_disparity", max_disparity, f"at least min_disparity + 8 = {min_disparity + 8}")
    if not max_disparity <= width / 2:
        raise fail("max_disparity", max_disparity, f"at most half the width ({width / 2})")


# ---------------------------------------------------------------------------------------- scenes


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random colourful multi-scale texture, float32 (height, width, 3) in [0, 255].

    A base colour, smooth colour noise at cell sizes 24 to 2 pixels, and sharp-edged blobs of a
    second colour: there is structure at every scale, so no area is flat.
    """
    texture = np.empty((height, width, 3), np.float32)
    texture[:] = rng.uniform(50, 205, 3)
    for cell, amplitude in ((24, 45.0), (10, 35.0), (5, 28.0), (2, 22.0)):
        grid = rng.normal(0.0, 1.0, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        texture += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    blob_cell = int(rng.integers(4, 12))
    blobs = rng.normal(0.0, 1.0, (height // blob_cell + 2, width // blob_cell + 2)).astype(np.float32)
    blobs = cv2.resize(blobs, (width, height), interpolation=cv2.INTER_CUBIC) > rng.uniform(0.6, 1.2)
    texture[blobs] = 0.5 * texture[blobs] + 0.5 * rng.uniform(0, 255, 3).astype(np.float32)
    return np.clip(texture, 0, 255)


def _random_scene(rng: np.random.Generator, height: int, width: int, frames: int, min_disparity: float,
                  max_disparity: float, subpixel: bool) -> list[_Surface]:
    """A background plane and 3 to 6 foreground shapes, with motion over `frames` frames."""
    span = max_disparity - min_disparity
    background_high = min_disparity + 0.25 * span
    foreground_low = min_disparity + 0.3 * span
    pan = (rng.uniform(-1.5, 1.5), rng.uniform(-0.5, 0.5))
    reach_x = width / 2 + max_disparity + abs(pan[0]) * frames + 4
    reach_y = height / 2 + abs(pan[1]) * frames + 4
    pad_x, pad_y = int(math.ceil(reach_x - width / 2)) + 4, int(math.ceil(reach_y - height / 2)) + 4
    if subpixel:
        half = (background_high - min_disparity) / 2
        gx = rng.uniform(-1, 1) * 0.5 * half / reach_x
        gy = rng.uniform(-1, 1) * 0.3 * half / reach_y
        spread = abs(gx) * reach_x + abs(gy) * reach_y
        d0 = min_disparity + half + rng.uniform(-1, 1) * 0.9 * (half - spread)
    else:
        gx = gy = 0.0
        d0 = float(rng.integers(math.ceil(min_disparity), math.floor(background_high) + 1))
    surfaces = [_Surface(
        texture=_texture(rng, height + 2 * pad_y, width + 2 * pad_x),
        origin=(width / 2 + pad_x, height / 2 + pad_y),
        center=(width / 2, height / 2), velocity=pan, disparity=(d0, 0.0), slant=(gx, gy),
    )]

    for _ in range(int(rng.integers(3, 7))):
        radius = rng.uniform(0.15, 0.4) * min(height, width)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if shape == "rectangle":
            half_axes = (radius * rng.uniform(0.45, 0.7), radius * rng.uniform(0.45, 0.7))
        else:
            half_axes = (radius * rng.uniform(0.5, 1.0), radius * rng.uniform(0.5, 1.0))
        vertices = None
        if shape == "polygon":  # points on a circle in angular order: convex and counter-clockwise
            count = int(rng.integers(3, 8))
            angles = (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * (2 * np.pi / count) + rng.uniform(0, 2 * np.pi)
            vertices = radius * rng.uniform(0.7, 1.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        if subpixel:
            low, high = foreground_low + 1.5, max_disparity - 1.5
            start = rng.uniform(low, high)
            end = float(np.clip(start + rng.uniform(-4, 4), low, high))
            disparity = (start, (end - start) / max(frames - 1, 1))
            slant = (rng.uniform(-1, 1) * 0.75 / radius, rng.uniform(-1, 1) * 0.75 / radius)
        else:
            disparity = (float(rng.integers(math.ceil(foreground_low), math.floor(max_disparity) + 1)), 0.0)
            slant = (0.0, 0.0)
        size = int(math.ceil(radius)) + 6
        surfaces.append(_Surface(
            texture=_texture(rng, 2 * size, 2 * size),
            origin=(float(size), float(size)),
            center=(rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height),
            velocity=(rng.uniform(-2, 2), rng.uniform(-1.5, 1.5)),
            disparity=disparity, slant=slant, shape=shape, theta=rng.uniform(0, np.pi),
            half_axes=half_axes, vertices=vertices,
        ))
    return surfaces


def _render_view(surfaces: list[_Surface], t: int, height: int, width: int, view: str) -> tuple[np.ndarray, np.ndarray]:
    """Render one view at frame t: float32 image (H, W, 3) and the disparity of the visible surface."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3), np.float32)
    depth = np.full((height, width), -np.inf)
    # Back to front (ties drawn in the same order in both views, so both agree on who is in front).
    for surface in sorted(surfaces, key=lambda s: (s.shape is not None, s.state(t)[2])):
        cx, cy, d0 = surface.state(t)
        gx, gy = surface.slant
        if view == "left":
            x_left = xs
        else:  # solve x_right = x_left - d(x_left, y) for x_left (d is affine in x_left)
            x_left = (xs + d0 - gx * cx + gy * (ys - cy)) / (1.0 - gx)
        u, v = x_left - cx, ys - cy
        disparity = d0 + gx * u + gy * v
        visible = surface.contains(u, v) & (disparity >= depth)
        if not visible.any():
            continue
        colour = cv2.remap(surface.texture, (u + surface.origin[0]).astype(np.float32),
                           (v + surface.origin[1]).astype(np.float32), cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT_101)
        image[visible] = colour[visible]
        depth[visible] = disparity[visible]
    return image, depth.astype(np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_sequence(seed: int | np.random.SeedSequence, *, height: int = 128, width: int = 256, frames: int = 10,
                    min_disparity: float = 2.0, max_disparity: float = 44.0, subpixel: bool = True) -> list[StereoFrame]:
    """Render one random sequence of `frames` stereo frames (clean images) with exact disparities.

    `subpixel=False` puts every surface at a constant integer disparity without slant, so that
    ``left[y, x] == right[y, x - d]`` holds exactly for every pixel visible in both views.
    """
    _check_parameters(height, width, 1, 0, frames, min_disparity, max_disparity)
    rng = np.random.default_rng(seed)
    surfaces = _random_scene(rng, height, width, frames, min_disparity, max_disparity, subpixel)
    result = []
    for t in range(frames):
        left, disparity_left = _render_view(surfaces, t, height, width, "left")
        right, disparity_right = _render_view(surfaces, t, height, width, "right")
        result.append(StereoFrame(_to_uint8(left), _to_uint8(right), disparity_left, disparity_right))
    return result


def _final_pass(rng: np.random.Generator, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The "final pass" look: the same defocus blur on both views, independent sensor noise per view."""
    sigma = rng.uniform(0.6, 1.3)
    noise = rng.uniform(1.5, 4.0)
    views = []
    for image in (left, right):
        blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
        views.append(_to_uint8(blurred + rng.normal(0.0, noise, image.shape).astype(np.float32)))
    return views[0], views[1]


# ------------------------------------------------------------------------------------------ files


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3]):
        raise OSError(f"could not write the image {path}")


def _readme(height: int, width: int, train_sequences: int, test_sequences: int, frames: int,
            min_disparity: float, max_disparity: float, subpixel: bool, seed: int) -> str:
    return f"""lattn embedded synthetic stereo set (Scene Flow / FlyingThings3D layout), generator {SYNTHETIC_VERSION}

This folder was generated by lattn_app.data.synthetic_stereo.ensure_synthetic_sceneflow. It is NOT the
Scene Flow dataset: it is a small synthetic stand-in in the same file layout and formats, used when
SceneFlowDataModule is given no root, so that training and tests run without a download. Use the real
data with --data.root /path/to/SceneFlow.

Content: a textured background plane and 3 to 6 textured foreground shapes per scene, at constant or
slightly slanted disparities, moving slowly over the frames of a sequence; both views rendered from the
same scene, so the disparities (left and right view) are exact, occlusions included.
frames_finalpass holds the clean images with blur and sensor noise.

Parameters: {height} x {width} pixels (H x W), disparities in [{min_disparity:g}, {max_disparity:g}]
({'sub-pixel, slanted surfaces' if subpixel else 'integer, fronto-parallel surfaces'}),
{train_sequences} TRAIN and {test_sequences} TEST sequences of {frames} frames
({FIRST_FRAME:04d}..{FIRST_FRAME + frames - 1:04d}), seed {seed}.

Layout:
  FlyingThings3D/frames_cleanpass/{{TRAIN,TEST}}/{{A,B,C}}/NNNN/{{left,right}}/NNNN.png
  FlyingThings3D/frames_finalpass/{{TRAIN,TEST}}/{{A,B,C}}/NNNN/{{left,right}}/NNNN.png
  FlyingThings3D/disparity/{{TRAIN,TEST}}/{{A,B,C}}/NNNN/{{left,right}}/NNNN.pfm

Delete this folder at any time; it is generated again when needed.
"""


def sequence_folder(index: int) -> str:
    """The FlyingThings3D-style folder of the `index`-th sequence of a split: ``A/0000``, ``B/0000``, ..."""
    return f"{SEQUENCE_LETTERS[index % len(SEQUENCE_LETTERS)]}/{index // len(SEQUENCE_LETTERS):04d}"


@dataclass(frozen=True)
class SyntheticSceneFlow:
    """The parameters of one synthetic Scene Flow set (the one place they and their defaults are declared).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        train_sequences: number of TRAIN sequences (``A/0000``, ``B/0000``, ``C/0000``, ``A/0001``, ...).
        test_sequences: number of TEST sequences.
        frames_per_sequence: frames per sequence, numbered from 0006 as in FlyingThings3D.
        min_disparity: smallest disparity of the background, in pixels.
        max_disparity: largest disparity of the foreground shapes, in pixels (at most width / 2).
        subpixel: slanted surfaces at real-valued disparities (default); False puts every surface at a
            constant integer disparity, for exact pixel-matching checks.
        seed: the seed of the whole set; the same parameters always give byte-identical files.
    """

    height: int = 128
    width: int = 256
    train_sequences: int = 40
    test_sequences: int = 10
    frames_per_sequence: int = 4
    min_disparity: float = 2.0
    max_disparity: float = 44.0
    subpixel: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_parameters(self.height, self.width, self.train_sequences, self.test_sequences,
                          self.frames_per_sequence, self.min_disparity, self.max_disparity)

    @property
    def name(self) -> str:
        """The cache sub-folder name of this parameter set (it carries the generator version)."""
        return (f"sceneflow_synthetic_{SYNTHETIC_VERSION}_{self.height}x{self.width}_train{self.train_sequences}"
                f"_test{self.test_sequences}_f{self.frames_per_sequence}_d{self.min_disparity:g}-"
                f"{self.max_disparity:g}_{'sub' if self.subpixel else 'int'}_seed{self.seed}")


def generate_synthetic_sceneflow(root: str | Path, **parameters: Any) -> Path:
    """Write the synthetic set into `root` (created if needed), without caching; returns `root`.

    Most callers want :func:`ensure_synthetic_sceneflow`, which calls this once per parameter set
    and makes the result appear atomically. `parameters`: those of :class:`SyntheticSceneFlow`.
    """
    spec = SyntheticSceneFlow(**parameters)
    (height, width, train_sequences, test_sequences, frames_per_sequence, min_disparity, max_disparity, subpixel,
     seed) = astuple(spec)
    root = Path(root)
    things = root / "FlyingThings3D"
    for split_index, (split, count) in enumerate(zip(SPLITS, (train_sequences, test_sequences))):
        for sequence in range(count):
            folder = f"{split}/{sequence_folder(sequence)}"
            frames = render_sequence(
                np.random.SeedSequence([seed, split_index, sequence]), height=height, width=width,
                frames=frames_per_sequence, min_disparity=min_disparity, max_disparity=max_disparity,
                subpixel=subpixel,
            )
            for t, frame in enumerate(frames):
                name = f"{FIRST_FRAME + t:04d}"
                final = _final_pass(np.random.default_rng([seed, split_index, sequence, t, 1]), frame.left, frame.right)
                for view, clean, noisy, disparity in (("left", frame.left, final[0], frame.disparity_left),
                                                      ("right", frame.right, final[1], frame.disparity_right)):
                    _write_png(things / "frames_cleanpass" / folder / view / f"{name}.png", clean)
                    _write_png(things / "frames_finalpass" / folder / view / f"{name}.png", noisy)
                    write_pfm(things / "disparity" / folder / view / f"{name}.pfm", disparity)
    (root / README_NAME).write_text(_readme(height, width, train_sequences, test_sequences, frames_per_sequence,
                                            min_disparity, max_disparity, subpixel, seed))
    return root


def ensure_synthetic_sceneflow(cache_dir: str | Path | None = None, **parameters: Any) -> Path:
    """Return the root of the synthetic Scene Flow set, generating it on the first call.

    Args:
        cache_dir: folder that holds generated sets; default ``$LATTN_CACHE_DIR`` or ``~/.cache/lattn``.
        parameters: the set's parameters (:class:`SyntheticSceneFlow`; a typo is an error naming it).

    Returns:
        The root folder: ``root/FlyingThings3D/{frames_cleanpass,frames_finalpass,disparity}/...``.
    """
    spec = SyntheticSceneFlow(**parameters)
    return build_once(cache_dir, spec.name, lambda folder: generate_synthetic_sceneflow(folder, **parameters),
                      "synthetic Scene Flow set")
