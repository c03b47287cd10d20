"""Stereo calibration: the benchmarks' calibration files, and disparity -> metric depth.

- :func:`read_calib_txt`: Middlebury 2014 / MiddEval3 / ETH3D ``calib.txt`` (``key=value`` lines:
  ``cam0=[f 0 cx; 0 f cy; 0 0 1]``, ``cam1=[...]``, ``doffs``, ``baseline``, ``width``, ``height``,
  ``ndisp``, ``vmin``, ``vmax``, ...);
- :func:`read_kitti_calib`: KITTI's rectified projection matrices (KITTI 2015
  ``calib_cam_to_cam/NNNNNN.txt``: ``P_rect_02``, ``P_rect_03``; KITTI 2012 ``calib/NNNNNN.txt``: ``P2``,
  ``P3``);
- :class:`StereoCalibration`: what depth needs (focal length, principal point, baseline, ``doffs``) and
  the disparity bound a dataset states (``ndisp``).

Depth: Z = focal_length * baseline / (d + doffs), in the unit of the baseline (Middlebury and ETH3D:
millimetres; KITTI: metres).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

__all__ = ["CalibrationError", "StereoCalibration", "depth_from_disparity", "read_calib_txt", "read_kitti_calib"]


class CalibrationError(ValueError):
    """A calibration file that cannot be read (missing key, value that is not a number, bad matrix)."""


@dataclass(frozen=True)
class StereoCalibration:
    """A rectified pair's calibration.

    Attributes:
        focal_length: focal length in pixels (cam0's f).
        baseline: distance between the camera centres; depth comes out in its unit.
        doffs: x-difference of the principal points (cam1's cx - cam0's cx); 0 for KITTI.
        cx, cy: principal point of the left camera in pixels (None: the image centre).
        ndisp: the dataset's conservative bound on the disparities (Middlebury, ETH3D), or None.
        unit: the baseline's unit, for messages and file headers ("mm", "m").
        source: the file it was read from, or "given" (``--data.focal_length``, ``--data.baseline``).
    """

    focal_length: float
    baseline: float
    doffs: float = 0.0
    cx: float | None = None
    cy: float | None = None
    ndisp: int | None = None
    unit: str = ""
    source: str = "given"

    def scaled(self, factor: float) -> StereoCalibration:
        """The calibration of the pair resized by `factor` (focal length, principal point, doffs, ndisp)."""
        return replace(self, focal_length=self.focal_length * factor, doffs=self.doffs * factor,
                       cx=None if self.cx is None else self.cx * factor, cy=None if self.cy is None else self.cy * factor,
                       ndisp=None if self.ndisp is None else math.ceil(self.ndisp * factor))


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _number(path: Path, key: str, text: str) -> float:
    if not _NUMBER.match(text.strip()):
        raise CalibrationError(f"{path}: {key}={text.strip()!r} is not a number")
    return float(text)


def _matrix(path: Path, key: str, text: str) -> np.ndarray:
    """``[f 0 cx; 0 f cy; 0 0 1]`` -> 3 x 3 array."""
    body = text.strip()
    if not (body.startswith("[") and body.endswith("]")):
        raise CalibrationError(f"{path}: {key}={body!r} is not a matrix; expected {key}=[f 0 cx; 0 f cy; 0 0 1]")
    rows = [row.split() for row in body[1:-1].split(";")]
    if len(rows) != 3 or any(len(row) != 3 for row in rows):
        raise CalibrationError(f"{path}: {key} must be a 3 x 3 matrix [f 0 cx; 0 f cy; 0 0 1]; got {body!r}")
    return np.array([[_number(path, key, value) for value in row] for row in rows])


def read_calib_txt(path: str | os.PathLike, unit: str = "mm") -> StereoCalibration:
    """Read a Middlebury 2014 / MiddEval3 / ETH3D ``calib.txt``.

    Needs ``cam0``, ``baseline`` and, for the disparity offset, ``cam1`` or ``doffs`` (``doffs`` wins when
    both are there); ``ndisp`` is optional. Unknown keys (``isint``, ``vmin``, ``dyavg``, ...) are ignored.

    Raises:
        FileNotFoundError: `path` does not exist.
        CalibrationError: a required key is missing or a value is malformed (the message names both).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise CalibrationError(f"{path}: line {number} {line.strip()!r} is not key=value")
        values[key.strip().lower()] = value.strip()
    for key in ("cam0", "baseline"):
        if key not in values:
            raise CalibrationError(f"{path}: no {key}= line; a calib.txt needs cam0=[f 0 cx; 0 f cy; 0 0 1] and "
                                   "baseline= (and doffs= or cam1=)")
    cam0 = _matrix(path, "cam0", values["cam0"])
    focal = float(cam0[0, 0])
    if not focal > 0:
        raise CalibrationError(f"{path}: cam0's focal length is {focal}; expected a positive number of pixels")
    baseline = _number(path, "baseline", values["baseline"])
    if not baseline > 0:
        raise CalibrationError(f"{path}: baseline={values['baseline']} must be positive")
    if "doffs" in values:
        doffs = _number(path, "doffs", values["doffs"])
    elif "cam1" in values:
        doffs = float(_matrix(path, "cam1", values["cam1"])[0, 2] - cam0[0, 2])
    else:
        raise CalibrationError(f"{path}: neither doffs= nor cam1= is given; one is needed for depth")
    ndisp = None
    if "ndisp" in values:
        ndisp_value = _number(path, "ndisp", values["ndisp"])
        if ndisp_value <= 0 or ndisp_value != int(ndisp_value):
            raise CalibrationError(f"{path}: ndisp={values['ndisp']} must be a positive whole number of pixels")
        ndisp = int(ndisp_value)
    return StereoCalibration(focal, baseline, doffs, float(cam0[0, 2]), float(cam0[1, 2]), ndisp, unit, str(path))


def read_kitti_calib(path: str | os.PathLike) -> StereoCalibration:
    """Read KITTI's rectified calibration: ``P_rect_02``/``P_rect_03`` (2015) or ``P2``/``P3`` (2012).

    The baseline (metres) is ``(P_left[0, 3] - P_right[0, 3]) / f``.

    Raises:
        FileNotFoundError: `path` does not exist.
        CalibrationError: the projection matrices are missing or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    rows: dict[str, list[str]] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            rows[key.strip()] = value.split()
    for left_key, right_key in (("P_rect_02", "P_rect_03"), ("P2", "P3")):
        if left_key in rows and right_key in rows:
            break
    else:
        raise CalibrationError(f"{path}: no P_rect_02/P_rect_03 (KITTI 2015) or P2/P3 (KITTI 2012) lines")
    matrices = []
    for key in (left_key, right_key):
        if len(rows[key]) != 12:
            raise CalibrationError(f"{path}: {key} has {len(rows[key])} values; expected the 12 of a 3 x 4 matrix")
        matrices.append(np.array([_number(path, key, value) for value in rows[key]]).reshape(3, 4))
    left, right = matrices
    focal = float(left[0, 0])
    baseline = float(left[0, 3] - right[0, 3]) / focal if focal else 0.0
    if not focal > 0 or not baseline > 0:
        raise CalibrationError(f"{path}: {left_key}/{right_key} give focal length {focal} and baseline {baseline}; "
                               "expected both positive")
    return StereoCalibration(focal, baseline, 0.0, float(left[0, 2]), float(left[1, 2]), None, "m", str(path))


def depth_from_disparity(disparity: np.ndarray, calibration: StereoCalibration) -> np.ndarray:
    """Metric depth f * B / (d + doffs), float32; inf where there is no disparity (d <= 0 or not finite)."""
    disparity = np.asarray(disparity, dtype=np.float64)
    denominator = disparity + calibration.doffs
    valid = np.isfinite(disparity) & (disparity > 0) & (denominator > 0)
    depth = np.full(disparity.shape, np.inf)
    depth[valid] = calibration.focal_length * calibration.baseline / denominator[valid]
    return depth.astype(np.float32)
