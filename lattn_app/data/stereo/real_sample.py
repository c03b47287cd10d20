"""A real stereo pair with ground truth, available offline: Middlebury 2014's Motorcycle, as scikit-image ships it.

scikit-image (``pip install "lattn[samples]"``) ships the left and right images and the left ground-truth
disparity of the Middlebury 2014 scene *Motorcycle* (Scharstein et al., GCPR 2014) at a quarter of the
original size: 741 x 500 pixels (0.37 MP), disparities 7.2 to 59.9 px, 7.3% of the pixels without ground
truth. :func:`write_motorcycle` writes it as a Middlebury 2014 scene folder (``im0.png``, ``im1.png``,
``disp0.pfm``, ``calib.txt``) that :class:`~lattn_app.data.stereo.MiddleburyDataModule` reads, at that size
or reduced (``scale=0.5``: 370 x 250, disparities halved), so that any stereo checkpoint can be scored on
real photographs, next to OpenCV's SGBM::

    python -m lattn_app.data.stereo.real_sample data/real_stereo          # writes full/ and half/
    lattn test --config configs/sceneflow_efficient.yaml --ckpt_path checkpoints/sceneflow_efficient/best.ckpt \\
        --data MiddleburyDataModule --data.root data/real_stereo/full

``calib.txt`` is the scene's published calibration (2964 x 2000 pixels, ``ndisp=270``) scaled to the
written size; the reduced ground truth is the mean of each 2 x 2 block whose four pixels all have ground
truth, times the scale (other blocks: none). One pair is a sanity check of transfer, not a benchmark.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from ..io import write_pfm

__all__ = ["MOTORCYCLE_CALIBRATION", "load_motorcycle", "write_motorcycle"]

# The Middlebury 2014 Motorcycle scene's calib.txt at its original size (2964 x 2000 pixels).
MOTORCYCLE_CALIBRATION = {"focal": 3979.911, "cx0": 1244.772, "cx1": 1369.115, "cy": 1019.507, "doffs": 124.343,
                          "baseline": 193.001, "width": 2964, "height": 2000, "ndisp": 270}
SHIPPED_SIZE = (500, 741)  # (height, width) of scikit-image's copy: a quarter of the original


def load_motorcycle() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-image's Motorcycle pair: left and right uint8 RGB (500, 741, 3), left disparity (inf = unknown)."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError("the real stereo sample comes with scikit-image: pip install scikit-image "
                          '(or pip install "lattn[samples]")') from error
    left, right, disparity = data.stereo_motorcycle()
    if left.shape[:2] != SHIPPED_SIZE:
        raise ValueError(f"scikit-image's Motorcycle pair is {left.shape[1]} x {left.shape[0]}; expected "
                         f"{SHIPPED_SIZE[1]} x {SHIPPED_SIZE[0]} (a quarter of Middlebury's 2964 x 2000)")
    return left, right, disparity.astype(np.float32)


def _reduce_disparity(disparity: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block with ground truth everywhere, in the reduced image's pixels; else inf."""
    height, width = disparity.shape[0] // factor, disparity.shape[1] // factor
    blocks = disparity[: height * factor, : width * factor].reshape(height, factor, width, factor)
    known = np.isfinite(blocks).all(axis=(1, 3))
    mean = np.where(known, np.where(np.isfinite(blocks), blocks, 0).mean(axis=(1, 3)), np.inf)
    return (mean / factor).astype(np.float32)


def _calib_text(scale: float, height: int, width: int) -> str:
    c = MOTORCYCLE_CALIBRATION
    s = scale * SHIPPED_SIZE[1] / c["width"]  # the original size -> the written size
    f, cx0, cx1, cy = c["focal"] * s, c["cx0"] * s, c["cx1"] * s, c["cy"] * s
    return (f"cam0=[{f:.3f} 0 {cx0:.3f}; 0 {f:.3f} {cy:.3f}; 0 0 1]\n"
            f"cam1=[{f:.3f} 0 {cx1:.3f}; 0 {f:.3f} {cy:.3f}; 0 0 1]\n"
            f"doffs={c['doffs'] * s:.3f}\nbaseline={c['baseline']}\nwidth={width}\nheight={height}\n"
            f"ndisp={math.ceil(c['ndisp'] * s)}\n")


def write_motorcycle(folder: str | Path, scale: float = 1.0) -> Path:
    """Write the pair as ``folder/Motorcycle-perfect/`` (a Middlebury 2014 scene) at 1.0 or 0.5 of the shipped size.

    Returns the scene folder. An existing scene folder is an error (nothing is overwritten).
    """
    if scale not in (1.0, 0.5):
        raise ValueError(f"scale must be 1.0 (741 x 500) or 0.5 (370 x 250); got {scale!r}")
    scene = Path(folder) / "Motorcycle-perfect"
    if scene.exists():
        raise FileExistsError(f"{scene} exists; choose another folder or delete it")
    left, right, disparity = load_motorcycle()
    if scale != 1.0:
        factor = round(1 / scale)
        size = (left.shape[1] // factor, left.shape[0] // factor)
        left, right = (cv2.resize(image, size, interpolation=cv2.INTER_AREA) for image in (left, right))
        disparity = _reduce_disparity(disparity, factor)
    scene.mkdir(parents=True)
    for name, image in (("im0.png", left), ("im1.png", right)):
        if not cv2.imwrite(str(scene / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {scene / name}")
    write_pfm(scene / "disp0.pfm", disparity)
    (scene / "calib.txt").write_text(_calib_text(scale, left.shape[0], left.shape[1]))
    return scene


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write scikit-image's Middlebury Motorcycle pair as Middlebury 2014 "
                                                 "scene folders: OUT/full (741 x 500) and OUT/half (370 x 250).")
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    for name, scale in (("full", 1.0), ("half", 0.5)):
        print(write_motorcycle(args.out / name, scale))


if __name__ == "__main__":
    main()
