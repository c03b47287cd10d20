"""Reading and writing the files of stereo datasets: PFM disparities, RGB images, 16-bit disparity PNGs.

- :func:`read_pfm` / :func:`write_pfm`: the Portable Float Map format of Scene Flow's disparities
  (grey ``Pf`` or colour ``PF``, either endianness). Arrays are returned top row first, although
  the file stores the bottom row first.
- :func:`read_image`: any image Pillow reads, as ``uint8`` RGB of shape (H, W, 3).
- :func:`write_disparity_png16` / :func:`read_disparity_png16`: disparities as 16-bit PNGs in the
  KITTI convention (value = round(disparity * 256), 0 = invalid), the usual way to save predictions.
- :func:`colorize_disparity`: a disparity map as a colour image for viewing.
- :func:`write_ply_points`: a coloured point cloud as binary PLY (Open3D, MeshLab, CloudCompare read it).

Malformed files raise :class:`PFMError` or :class:`ImageReadError` (both ``ValueError``) whose
message names the file and what is wrong with it; a file that does not exist raises
``FileNotFoundError``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageReadError",
    "PFMError",
    "colorize_disparity",
    "read_disparity_png16",
    "read_image",
    "read_pfm",
    "write_disparity_png16",
    "write_pfm",
    "write_ply_points",
]

PathLike = str | os.PathLike

# The three header tokens after the magic: width, height, scale (each followed by whitespace).
_HEADER_TOKEN = re.compile(rb"\s*(\S+)")


class PFMError(ValueError):
    """A file that is not a valid PFM (bad magic, bad dimensions or scale, truncated data)."""


class ImageReadError(ValueError):
    """An image file that cannot be decoded (not an image, corrupt or truncated)."""


# --------------------------------------------------------------------------------------------- PFM


def read_pfm(path: PathLike) -> np.ndarray:
    """Read a PFM file as a ``float32`` array, top row first.

    Returns an (H, W) array for a grey file (magic ``Pf``) and an (H, W, 3) array for a colour file
    (magic ``PF``). The sign of the scale field gives the byte order (negative: little endian,
    positive: big endian); its magnitude is ignored, as in every Scene Flow reader. Bytes after the
    pixel data are ignored.

    Raises:
        FileNotFoundError: `path` does not exist.
        PFMError: the file is not a valid PFM; the message names the file and the problem.
    """
    path = Path(path)
    data = path.read_bytes()

    def fail(problem: str) -> PFMError:
        return PFMError(f"{path}: not a valid PFM file: {problem}")

    magic = data[:2]
    if magic not in (b"Pf", b"PF"):
        raise fail(f"the file starts with {data[:2]!r}, expected the magic 'Pf' (grey) or 'PF' (colour)")
    channels = 3 if magic == b"PF" else 1
    if len(data) < 3 or not data[2:3].isspace():
        raise fail(f"the magic {magic.decode()!r} is not followed by a line break")

    tokens: list[bytes] = []
    position = 2
    for name in ("width", "height", "scale"):
        match = _HEADER_TOKEN.match(data, position, min(len(data), position + 64))
        if match is None:
            raise fail(f"the header ends before the {name} field (truncated header)")
        tokens.append(match.group(1))
        position = match.end()
    try:
        width, height = int(tokens[0]), int(tokens[1])
    except ValueError:
        raise fail(f"the dimensions {tokens[0]!r} x {tokens[1]!r} are not integers (expected 'WIDTH HEIGHT')") from None
    if width <= 0 or height <= 0:
        raise fail(f"the dimensions {width} x {height} (width x height) must be positive")
    try:
        scale = float(tokens[2])
    except ValueError:
        raise fail(f"the scale field {tokens[2]!r} is not a number") from None
    if scale == 0 or not np.isfinite(scale):
        raise fail(f"the scale field is {tokens[2].decode(errors='replace')!r}; expected a non-zero number "
                   "(negative: little endian, positive: big endian)")
    # Exactly one whitespace byte ends the header (a Windows "\r\n" is accepted as one line break).
    if position >= len(data) or not data[position : position + 1].isspace():
        raise fail("the scale field is not followed by a line break (truncated header)")
    position += 2 if data[position : position + 2] == b"\r\n" else 1

    count = width * height * channels
    available = (len(data) - position) // 4
    if available < count:
        raise fail(
            f"truncated data: the header announces {width} x {height} x {channels} float32 values "
            f"({count * 4} bytes) but only {len(data) - position} bytes follow"
        )
    dtype = np.dtype("<f4") if scale < 0 else np.dtype(">f4")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=position)
    shape = (height, width) if channels == 1 else (height, width, 3)
    # PFM stores the bottom row first.
    return np.ascontiguousarray(values.reshape(shape)[::-1], dtype=np.float32)


def write_pfm(path: PathLike, array: np.ndarray, little_endian: bool = True) -> None:
    """Write `array` as a PFM file: (H, W) or (H, W, 1) as grey ``Pf``, (H, W, 3) as colour ``PF``.

    The array is given top row first (as :func:`read_pfm` returns it) and stored bottom row first,
    as float32 in the chosen byte order (scale field -1.0 for little endian, 1.0 for big endian).
    Parent folders are created.

    Raises:
        ValueError: `array` has another shape, or is empty.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or array.size == 0:
        raise ValueError(
            f"write_pfm({str(path)!r}): expected a non-empty (H, W) or (H, W, 3) array, got shape {array.shape}"
        )
    magic = b"PF" if array.ndim == 3 else b"Pf"
    height, width = array.shape[:2]
    dtype = np.dtype("<f4") if little_endian else np.dtype(">f4")
    header = magic + b"\n" + f"{width} {height}\n{-1.0 if little_endian else 1.0}\n".encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.write(np.ascontiguousarray(array[::-1], dtype=dtype).tobytes())


# ----------------------------------------------------------------------------------------- images


def _open_fully(path: Path) -> Image.Image:
    """Open and decode an image completely (Pillow decodes lazily; truncation shows only on load)."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from error


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file as ``uint8`` RGB of shape (H, W, 3).

    Grey, grey+alpha, palette, CMYK and RGBA images are converted to RGB with Pillow's ``convert``:
    grey is repeated in the three channels, a palette is looked up, and an alpha channel is dropped
    (not composited over a background). 16-bit images are not supported as colour images (use
    :func:`read_disparity_png16` for 16-bit disparity PNGs). The whole file is decoded here, so a
    truncated file fails at once instead of giving a partly grey image.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageReadError: the file is not a readable image (unknown format, corrupt or truncated).
    """
    path = Path(path)
    image = _open_fully(path)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ImageReadError(
            f"{path}: a {image.mode!r} (16-bit or float) image cannot be read as an 8-bit RGB image; "
            "expected an 8-bit grey, palette, RGB or RGBA image"
        )
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what Pillow asks for before dropping a palette's transparency
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


# ------------------------------------------------------------------------------------ disparities


def write_disparity_png16(path: PathLike, disparity: np.ndarray) -> None:
    """Save an (H, W) disparity map as a 16-bit grey PNG in the KITTI convention.

    Each pixel stores ``round(disparity * 256)`` clipped to 0..65535, so disparities are kept to
    1/256 pixel up to 255.996 pixels; larger values saturate. 0 means "no disparity": non-finite and
    negative disparities are written as 0. Parent folders are created.

    Raises:
        ValueError: `disparity` is not a 2-D array.
    """
    disparity = np.asarray(disparity, dtype=np.float64)
    if disparity.ndim != 2 or disparity.size == 0:
        raise ValueError(f"write_disparity_png16({str(path)!r}): expected a non-empty (H, W) disparity map, "
                         f"got shape {disparity.shape}")
    disparity = np.where(np.isfinite(disparity), disparity, 0.0)
    values = np.clip(np.rint(disparity * 256.0), 0, 65535).astype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), values):
        raise OSError(f"could not write the 16-bit PNG {path} (does the name end in .png?)")


def read_disparity_png16(path: PathLike) -> np.ndarray:
    """Read a 16-bit KITTI-convention disparity PNG as ``float32`` (H, W): value / 256, 0 = invalid.

    Raises:
        FileNotFoundError: `path` does not exist.
        ImageReadError: the file is not readable, or is not a single-channel 16-bit image.
    """
    path = Path(path)
    image = _open_fully(path)
    if image.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise ImageReadError(
            f"{path}: expected a single-channel 16-bit disparity PNG (KITTI convention), got Pillow mode {image.mode!r}"
        )
    values = np.asarray(image)
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise ImageReadError(f"{path}: values outside 0..65535, not a 16-bit disparity PNG")
    return (values.astype(np.float32) / 256.0).astype(np.float32)


def colorize_disparity(disparity: np.ndarray, max_disparity: float | None = None) -> np.ndarray:
    """Colour an (H, W) disparity map for viewing: ``uint8`` RGB (H, W, 3), turbo colour map.

    0 maps to the blue end and `max_disparity` (default: the largest valid value) to the red end;
    larger values saturate. Invalid pixels (non-finite, or not positive) are black.

    Raises:
        ValueError: `disparity` is not 2-D, or `max_disparity` is not positive.
    """
    disparity = np.asarray(disparity, dtype=np.float32)
    if disparity.ndim != 2:
        raise ValueError(f"colorize_disparity: expected an (H, W) disparity map, got shape {disparity.shape}")
    valid = np.isfinite(disparity) & (disparity > 0)
    if max_disparity is None:
        max_disparity = float(disparity[valid].max()) if valid.any() else 1.0
    if not max_disparity > 0:
        raise ValueError(f"colorize_disparity: max_disparity must be positive, got {max_disparity!r}")
    scaled = np.where(valid, disparity, 0.0) * (255.0 / max_disparity)
    levels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    colormap = getattr(cv2, "COLORMAP_TURBO", cv2.COLORMAP_JET)
    rgb = cv2.cvtColor(cv2.applyColorMap(levels, colormap), cv2.COLOR_BGR2RGB)
    rgb[~valid] = 0
    return rgb


# ------------------------------------------------------------------------------------ point clouds


def write_ply_points(path: PathLike, points: np.ndarray, colors: np.ndarray | None = None,
                     comment: str | None = None) -> None:
    """Write N points (N, 3) with optional uint8 RGB colours (N, 3) as a binary little-endian PLY.

    Vertices only (``x y z`` as float32, ``red green blue`` as uchar): the point-cloud form that Open3D
    (``read_point_cloud``), MeshLab and CloudCompare read. Parent folders are created.

    Raises:
        ValueError: `points` is not (N, 3), or `colors` does not match it.
    """
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"write_ply_points({str(path)!r}): expected (N, 3) points, got shape {points.shape}")
    properties = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != points.shape:
            raise ValueError(f"write_ply_points({str(path)!r}): colours {colors.shape} do not match points {points.shape}")
        properties += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertices = np.empty(len(points), dtype=properties)
    vertices["x"], vertices["y"], vertices["z"] = points[:, 0], points[:, 1], points[:, 2]
    if colors is not None:
        vertices["red"], vertices["green"], vertices["blue"] = (np.clip(colors, 0, 255).astype(np.uint8)[:, i]
                                                                 for i in range(3))
    header = ["ply", "format binary_little_endian 1.0"]
    if comment:
        header += [f"comment {line}" for line in comment.splitlines()]
    header.append(f"element vertex {len(points)}")
    header += [f"property {'float' if kind == '<f4' else 'uchar'} {name}" for name, kind in properties]
    header.append("end_header")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(vertices.tobytes())
