"""The embedded stereo dataset: a small synthetic set in exactly the Scene Flow (FlyingThings3D) layout.

``SceneFlowDataModule(root=None)`` trains on this set, so that ``lattn fit`` works on a fresh machine
without downloading Scene Flow. :func:`ensure_synthetic_sceneflow` generates it once, deterministically,
into a cache folder and returns its root; later calls return the same folder at once::

    root/README.txt
    root/FlyingThings3D/frames_cleanpass/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/0006.png ... 0015.png
    root/FlyingThings3D/frames_finalpass/...          (the clean images, blurred, with sensor noise)
    root/FlyingThings3D/disparity/{TRAIN,TEST}/{A,B,C}/NNNN/{left,right}/0006.pfm ... 0015.pfm

What the images show (generator v2, built for models that transfer to photographs): a background that
is a slanted plane or an indoor-like wall, often with a floor rising to near disparities at the bottom
and sometimes a receding side wall; 3 to 8 foreground objects: planar rectangles, ellipses and convex
polygons at their own slanted disparities, curved domes and cylinders, and thin bars (poles, cables,
1 to 5 pixels wide). Textures are of four kinds: photograph-like power-law (1/f) texture with patches of
other colours, repetitive stripes, checks and dots (ambiguous matches), nearly textureless surfaces, and
the v1 multi-scale colour noise; they are mapped with perspective (a receding floor's texture shrinks
with distance), with Lambertian shading, and both views are slightly blurred like a camera's optics.
Scenes differ in depth: each reaches a random fraction of the set's range. Both views are rendered from
the same scene with a z-buffer: the right view sees a surface point of the left view at
``x_right = x_left - d``. The disparities are therefore exact, for both views, occlusions included:
the left PFM gives the disparity of the surface each left pixel sees, the right PFM that of the
surface each right pixel sees (``x_left = x_right + d``). ``subpixel=False`` keeps to fronto-parallel
surfaces at integer disparities with v1 textures and no blur (pixels match exactly).

Defaults: 128 x 256 images (H x W), disparities in [1, 44] (``max_disparity=48`` in the model; real pairs
with larger disparities are evaluated at the reduced scale that fits, where their bound is known), 100
TRAIN and 20 TEST sequences of 2 frames (0006..0007, numbered as in FlyingThings3D), that is 200 TRAIN and
40 TEST frames (many short sequences: more distinct scenes for the same file count); sequence ``i`` of a
split is ``{A,B,C}[i % 3]/{i // 3:04d}``.

The cache folder is ``$LATTN_CACHE_DIR`` if set, else ``~/.cache/lattn``; the set lives in a
sub-folder whose name holds the generator version and parameters. It is written into a temporary
sibling folder and renamed into place when complete, so an interrupted generation never leaves a
partial set and concurrent callers do not disturb each other.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
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
SYNTHETIC_VERSION = "v2"
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
    """A textured surface: a shape in its local (u, v) frame, placed in the left view per frame.

    At frame t the local origin sits at left-view pixel (cx + vx t, cy + vy t) and the disparity is
    d(u, v) = d0 + vd t + gx u + gy v (a plane) plus, for curved surfaces, ``bump`` times a dome
    (1 - (p/a)^2 - (q/b)^2) or a cylinder (1 - (p/a)^2) over the shape's own axes (p, q), clipped to
    the set's disparity range. The background, the wall and the floor have no shape (they cover
    everything; the z-buffer cuts them where nearer surfaces are).

    The texture is mapped with perspective: a pixel's texture coordinates are its 3D point on the
    surface's plane (pixel ray / disparity) in the plane's own axes, so a receding floor's texture
    shrinks with distance as in a photograph, and both views sample the same surface point.
    """

    texture: np.ndarray  # float32 (th, tw, 3), the plane's centre at the texture's centre
    center: tuple[float, float]
    velocity: tuple[float, float]
    disparity: tuple[float, float]  # d0, vd (per frame)
    slant: tuple[float, float]  # gx, gy
    density: float = 1.0  # texture pixels per image pixel at the surface's centre
    periodic: bool = False  # the texture tiles (wrap) instead of mirroring at its border
    shading: tuple[float, float] = (0.0, 0.0)  # brightness change per pixel along u and v (Lambertian: both views)
    shape: str | None = None
    theta: float = 0.0
    half_axes: tuple[float, float] = (0.0, 0.0)
    vertices: np.ndarray | None = None  # (k, 2) counter-clockwise, for polygons
    bump: float = 0.0
    bump_kind: str | None = None  # "dome" or "cylinder"

    def state(self, t: int) -> tuple[float, float, float]:
        """Centre x, centre y and centre disparity at frame t."""
        return (self.center[0] + self.velocity[0] * t, self.center[1] + self.velocity[1] * t,
                self.disparity[0] + self.disparity[1] * t)

    def _axes(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = math.cos(self.theta), math.sin(self.theta)
        return u * cos + v * sin, -u * sin + v * cos

    def contains(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        if self.shape is None:
            return np.ones(u.shape, dtype=bool)
        p, q = self._axes(u, v)
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

    def disparity_at(self, u: np.ndarray, v: np.ndarray, d0: float, limits: tuple[float, float]) -> np.ndarray:
        gx, gy = self.slant
        disparity = d0 + gx * u + gy * v
        if self.bump_kind is not None:
            p, q = self._axes(u, v)
            a, b = self.half_axes
            profile = 1 - (p / a) ** 2 - ((q / b) ** 2 if self.bump_kind == "dome" else 0)
            disparity = disparity + self.bump * np.maximum(profile, 0)
        return np.clip(disparity, *limits)

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
    """The generator's first texture: a base colour, smooth colour noise at cell sizes 24 to 2 pixels, and
    sharp-edged blobs of a second colour, float32 (height, width, 3) in [0, 255]: structure at every scale."""
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


def _power_law_noise(rng: np.random.Generator, size: int, exponent: float) -> np.ndarray:
    """(size, size) noise with amplitude spectrum 1 / f^exponent (natural images: about 1), unit variance."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius ** exponent
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _natural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A photograph-like texture: power-law (1/f) luminance and colour at every scale, with patches of
    other colours cut out by a second power-law field (the edges of painted or printed regions)."""
    luminance = _power_law_noise(rng, size, rng.uniform(0.8, 1.6))
    base = rng.uniform(40, 215) + rng.normal(0, 25, 3)  # mostly muted colours, as in photographs
    tint = 1.0 + rng.normal(0, 0.15, 3)
    texture = base + rng.uniform(15, 60) * luminance[..., None] * tint
    texture += rng.uniform(3, 12) * np.stack([_power_law_noise(rng, size, 1.2) for _ in range(3)], axis=-1)
    if rng.random() < 0.6:
        regions = _power_law_noise(rng, size, rng.uniform(1.3, 2.0)) > rng.uniform(0.3, 1.2)
        texture[regions] = 0.35 * texture[regions] + 0.65 * rng.uniform(0, 255, 3)
    return np.clip(texture, 0, 255).astype(np.float32)


def _periodic_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A repetitive texture (stripes, checks or dots, period 6 to 24 pixels) with a little noise: the
    repeated structure makes matching ambiguous, as on tiles, fabrics and blinds. It tiles exactly."""
    period = size / int(round(size / rng.uniform(6, 24)))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) * (2 * np.pi / period)
    kind = rng.integers(3)
    if kind == 0:
        pattern = np.sin(xs if rng.random() < 0.5 else ys)
    elif kind == 1:
        pattern = np.sign(np.sin(xs) * np.sin(ys))
    else:
        pattern = (np.cos(xs) + np.cos(ys) > 1.0).astype(np.float32) * 2 - 1
    colours = rng.uniform(20, 235, (2, 3))
    texture = colours[0] + (colours[1] - colours[0]) * (0.5 + 0.5 * pattern[..., None])
    texture += rng.uniform(2, 8) * rng.normal(size=texture.shape)
    return np.clip(texture, 0, 255).astype(np.float32)


def _flat_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A nearly textureless surface (painted wall, sky): one colour, faint smooth variation and grain."""
    texture = rng.uniform(30, 225, 3) + rng.uniform(1, 6) * _power_law_noise(rng, size, 1.8)[..., None]
    texture = texture + rng.uniform(0.5, 2.0) * rng.normal(size=(size, size, 3))
    return np.clip(texture, 0, 255).astype(np.float32)


def _surface_texture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, bool]:
    """A random texture of one of four kinds and whether it tiles (periodic ones do)."""
    kind = rng.choice(4, p=(0.55, 0.15, 0.12, 0.18))
    if kind == 0:
        return _natural_texture(rng, size), False
    if kind == 1:
        return _periodic_texture(rng, size), True
    if kind == 2:
        return _flat_texture(rng, size), False
    return _texture(rng, size, size), False


def _random_scene(rng: np.random.Generator, height: int, width: int, frames: int, min_disparity: float,
                  max_disparity: float, subpixel: bool) -> list[_Surface]:
    """The background (a slanted plane, or a wall with a floor and sometimes a side wall) and 3 to 8
    foreground objects: planar shapes, domes and cylinders, thin bars; motion over `frames` frames."""
    # Scenes differ in depth: some only hold small disparities, some reach the set's largest.
    top = max_disparity if not subpixel else min_disparity + rng.uniform(0.4, 1.0) * (max_disparity - min_disparity)
    span = top - min_disparity
    background_high = min_disparity + 0.3 * span
    pan = (rng.uniform(-1.5, 1.5), rng.uniform(-0.5, 0.5))
    big = 1 << int(math.ceil(math.log2(max(height, width) + max_disparity)))

    def textured(**fields: Any) -> _Surface:
        size = big if fields.get("shape") is None else 256
        texture, periodic = _surface_texture(rng, size) if subpixel else (_texture(rng, size, size), False)
        return _Surface(texture=texture, periodic=periodic, density=float(rng.uniform(0.6, 1.6)) if subpixel else 1.0,
                        shading=tuple(rng.uniform(-1, 1, 2) * 0.3 / max(height, width)) if subpixel else (0.0, 0.0),
                        **fields)

    if not subpixel:  # fronto-parallel, integer disparities: exact pixel matches
        surfaces = [textured(center=(width / 2, height / 2), velocity=pan, slant=(0.0, 0.0), disparity=(
            float(rng.integers(math.ceil(min_disparity), math.floor(background_high) + 1)), 0.0))]
    else:
        wall = min_disparity + rng.uniform(0.05, 1.0) * (background_high - min_disparity)
        gx = rng.uniform(-1, 1) * 0.25 * (wall - min_disparity) / width
        surfaces = [textured(center=(width / 2, height / 2), velocity=pan, disparity=(wall, 0.0),
                             slant=(gx, rng.uniform(-1, 1) * 0.15 * (wall - min_disparity) / height))]
        if rng.random() < 0.55:  # a floor meeting the wall at a horizon line, rising to near disparities
            horizon = rng.uniform(0.25, 0.8) * height
            bottom = rng.uniform(wall + 0.4 * (top - wall), top)
            surfaces.append(textured(center=(width / 2, horizon), velocity=pan, disparity=(wall, 0.0),
                                     slant=(rng.uniform(-1, 1) * 0.05, (bottom - wall) / (height - horizon))))
        if rng.random() < 0.3:  # a side wall receding towards the back wall
            side = rng.choice([-1.0, 1.0])
            edge = rng.uniform(0.1, 0.35) * width
            near = min(rng.uniform(wall + 0.3 * (top - wall), top), wall + 0.7 * edge)
            surfaces.append(textured(center=(width / 2 - side * (width / 2 - edge), height / 2), velocity=pan,
                                     disparity=(wall, 0.0), slant=(-side * (near - wall) / edge, 0.0)))

    count = int(rng.integers(3, 9)) if subpixel else int(rng.integers(3, 7))
    for index in range(count):
        kind = "bar" if subpixel and index < rng.integers(0, 3) else SHAPES[int(rng.integers(len(SHAPES)))]
        radius = rng.uniform(0.1, 0.4) * min(height, width)
        shape, vertices, bump, bump_kind = kind, None, 0.0, None
        if kind == "bar":  # a thin structure: pole, cable, table leg (1 to 5 pixels wide)
            shape = "rectangle"
            half_axes = (rng.uniform(0.3, 0.9) * max(height, width), rng.uniform(0.5, 2.5))
            radius = half_axes[0]
        elif kind == "rectangle":
            half_axes = (radius * rng.uniform(0.45, 0.7), radius * rng.uniform(0.45, 0.7))
        else:
            half_axes = (radius * rng.uniform(0.5, 1.0), radius * rng.uniform(0.5, 1.0))
        if kind == "polygon":  # points on a circle in angular order: convex and counter-clockwise
            n = int(rng.integers(3, 8))
            angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)
            vertices = radius * rng.uniform(0.7, 1.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        if subpixel:
            low, high = background_high + 2, max(top - 1, background_high + 3)
            start = rng.uniform(low, high)
            end = float(np.clip(start + rng.uniform(-3, 3), low, high))
            disparity = (start, (end - start) / max(frames - 1, 1))
            steep = 0.5 if kind == "bar" else 1.0
            slant = tuple(rng.uniform(-1, 1, 2) * steep * min(0.3, 0.25 * (start - min_disparity) / radius))
            if kind == "ellipse" and rng.random() < 0.6:  # curved: a dome or a cylinder bulging towards the camera
                bump_kind = "dome" if rng.random() < 0.5 else "cylinder"
                bump = rng.uniform(0.1, 0.3) * min(half_axes)
        else:
            disparity = (float(rng.integers(math.ceil(background_high), math.floor(max_disparity) + 1)), 0.0)
            slant = (0.0, 0.0)
        surfaces.append(textured(
            center=(rng.uniform(0.05, 0.95) * width, rng.uniform(0.05, 0.95) * height),
            velocity=(rng.uniform(-2, 2), rng.uniform(-1.5, 1.5)), disparity=disparity, slant=slant,
            shape=shape, theta=rng.uniform(0, np.pi), half_axes=half_axes, vertices=vertices, bump=bump,
            bump_kind=bump_kind,
        ))
    return surfaces


def _plane_axes(gx: float, gy: float, d_principal: float, focal: float) -> tuple[np.ndarray, np.ndarray]:
    """Two orthonormal 3D axes in the plane of disparity d = d_p + gx x + gy y (x, y from the principal point).

    With depth Z = f B / d, the plane is gx f X + gy f Y + d_p Z = f B: normal (gx f, gy f, d_p).
    """
    normal = np.array([gx * focal, gy * focal, d_principal])
    normal /= np.linalg.norm(normal)
    for seed in (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])):
        first = seed - seed.dot(normal) * normal
        if np.linalg.norm(first) > 0.3:
            break
    first /= np.linalg.norm(first)
    return first, np.cross(normal, first)


def _solve_left_x(surface: _Surface, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, d0: float,
                  limits: tuple[float, float]) -> np.ndarray:
    """The left-view x of the surface point each right-view pixel sees: x_right = x_left - d(x_left, y).

    Exact for a plane (d is affine in x_left); where the surface is curved or clipped to the disparity
    range, Newton steps from there (the surfaces' slopes stay below 1, so the solution is unique).
    """
    gx, gy = surface.slant
    x_left = (xs + d0 - gx * cx + gy * (ys - cy)) / (1.0 - gx)
    v = ys - cy
    if surface.bump_kind is None:
        plane = d0 + gx * (x_left - cx) + gy * v
        if plane.min() >= limits[0] and plane.max() <= limits[1]:
            return x_left
    for _ in range(6):
        residual = x_left - surface.disparity_at(x_left - cx, v, d0, limits) - xs
        slope = (surface.disparity_at(x_left + 0.25 - cx, v, d0, limits)
                 - surface.disparity_at(x_left - 0.25 - cx, v, d0, limits)) / 0.5
        x_left = x_left - residual / np.maximum(1.0 - slope, 0.1)
    return x_left


def _render_view(surfaces: list[_Surface], t: int, height: int, width: int, view: str,
                 limits: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Render one view at frame t: float32 image (H, W, 3) and the disparity of the visible surface."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3), np.float32)
    depth = np.full((height, width), -np.inf)
    focal = float(width)  # a 53-degree horizontal field of view: the perspective of the texture mapping
    principal = (width / 2, height / 2)
    # Back to front (ties drawn in the same order in both views, so both agree on who is in front).
    for surface in sorted(surfaces, key=lambda s: (s.shape is not None, s.state(t)[2])):
        cx, cy, d0 = surface.state(t)
        gx, gy = surface.slant
        if view == "left":
            x_left = xs
        else:
            x_left = _solve_left_x(surface, xs, ys, cx, cy, d0, limits)
        u, v = x_left - cx, ys - cy
        disparity = surface.disparity_at(u, v, d0, limits)
        visible = surface.contains(u, v) & (disparity >= depth)
        if not visible.any():
            continue
        # Perspective texture mapping: the 3D point on the surface's plane (baseline 1), in the plane's axes;
        # pixels where the plane lies behind the camera are hidden by the wall in front of them.
        d_principal = d0 + gx * (principal[0] - cx) + gy * (principal[1] - cy)
        plane = np.maximum(d0 + gx * u + gy * v, 0.25)
        first, second = _plane_axes(gx, gy, d_principal, focal)
        rays = np.stack([x_left - principal[0], ys - principal[1], np.full_like(xs, focal)], axis=-1)
        points = rays / plane[..., None] - np.array([cx - principal[0], cy - principal[1], focal]) / d0
        scale = surface.density * d0  # texture pixels per image pixel at the surface's centre: `density`
        s_coord = np.clip((points @ first) * scale, -1e4, 1e4)
        t_coord = np.clip((points @ second) * scale, -1e4, 1e4)
        size_y, size_x = surface.texture.shape[:2]
        colour = cv2.remap(surface.texture, (s_coord + size_x / 2).astype(np.float32),
                           (t_coord + size_y / 2).astype(np.float32), cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_WRAP if surface.periodic else cv2.BORDER_REFLECT_101)
        if surface.shading != (0.0, 0.0):
            colour = colour * (1.0 + surface.shading[0] * u + surface.shading[1] * v)[..., None].astype(np.float32)
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
    limits = (min_disparity, max_disparity)
    # A camera's optics and demosaicing soften every edge a little; the same blur on both views keeps them
    # consistent (off for integer disparities, whose pixels must match exactly).
    sigma = rng.uniform(0.4, 0.8) if subpixel else 0.0
    result = []
    for t in range(frames):
        views = []
        for view in ("left", "right"):
            image, disparity = _render_view(surfaces, t, height, width, view, limits)
            if sigma:
                image = cv2.GaussianBlur(image, (0, 0), sigma)
            views.append((_to_uint8(image), disparity))
        result.append(StereoFrame(views[0][0], views[1][0], views[0][1], views[1][1]))
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

Content: a slanted background plane or a wall (often with a floor, sometimes a side wall) and 3 to 8
objects per scene (planar shapes, domes, cylinders, thin bars) with photograph-like, repetitive,
nearly textureless or multi-scale noise textures mapped with perspective; moving slowly over the frames
of a sequence; both views rendered from the same scene, so the disparities (left and right view) are
exact, occlusions included.
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
    train_sequences: int = 100
    test_sequences: int = 20
    frames_per_sequence: int = 2
    min_disparity: float = 1.0
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


def _write_sequence(job: tuple[Path, SyntheticSceneFlow, int, int]) -> None:
    """Render sequence `sequence` of split `split_index` and write its files (clean, final, disparities)."""
    root, spec, split_index, sequence = job
    things = root / "FlyingThings3D"
    folder = f"{SPLITS[split_index]}/{sequence_folder(sequence)}"
    frames = render_sequence(
        np.random.SeedSequence([spec.seed, split_index, sequence]), height=spec.height, width=spec.width,
        frames=spec.frames_per_sequence, min_disparity=spec.min_disparity, max_disparity=spec.max_disparity,
        subpixel=spec.subpixel,
    )
    for t, frame in enumerate(frames):
        name = f"{FIRST_FRAME + t:04d}"
        final = _final_pass(np.random.default_rng([spec.seed, split_index, sequence, t, 1]), frame.left, frame.right)
        for view, clean, noisy, disparity in (("left", frame.left, final[0], frame.disparity_left),
                                              ("right", frame.right, final[1], frame.disparity_right)):
            _write_png(things / "frames_cleanpass" / folder / view / f"{name}.png", clean)
            _write_png(things / "frames_finalpass" / folder / view / f"{name}.png", noisy)
            write_pfm(things / "disparity" / folder / view / f"{name}.pfm", disparity)


def generate_synthetic_sceneflow(root: str | Path, **parameters: Any) -> Path:
    """Write the synthetic set into `root` (created if needed), without caching; returns `root`.

    Most callers want :func:`ensure_synthetic_sceneflow`, which calls this once per parameter set
    and makes the result appear atomically. `parameters`: those of :class:`SyntheticSceneFlow`.
    """
    spec = SyntheticSceneFlow(**parameters)
    root = Path(root)
    jobs = [(root, spec, split_index, sequence)
            for split_index, count in enumerate((spec.train_sequences, spec.test_sequences))
            for sequence in range(count)]
    # Sequences are independent (each has its own seed), so they render in parallel on every core: the
    # default set takes about 45 s on one core of a 2-core CPU. Forked workers: nothing to import again.
    workers = min(os.cpu_count() or 1, 4) if len(jobs) >= 8 else 1
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_write_sequence, jobs, chunksize=4))
    else:
        for job in jobs:
            _write_sequence(job)
    (root / README_NAME).write_text(_readme(*astuple(spec)))
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
