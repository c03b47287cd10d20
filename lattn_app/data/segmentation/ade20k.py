"""ADE20K (SceneParsing, 150 classes) as distributed, and the embedded default in its layout.

``root`` is the folder holding ``ADEChallengeData2016/`` (or that folder itself)::

    ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...      (20,210 images)
    ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...      (2,000 images)
    ADEChallengeData2016/annotations/training/ADE_train_00000001.png ... (8-bit class ids)
    ADEChallengeData2016/annotations/validation/...
    ADEChallengeData2016/objectInfo150.txt                              (the class list; optional)

Masks: 0 = unlabelled ("other"), 1..150 = the classes; lattn reads 0 as the ignore index and k as label
k - 1 (the "reduce zero label" convention of every ADE20K benchmark), and the prediction writer saves
label + 1 again. Class names come from ``objectInfo150.txt`` (its ``Name`` column, first name of each
row); without it, the classes are named by their ids.

Splits: ADE20K's test images have no public masks, so the benchmark's validation images are the test
set here (``lattn test`` reports the number papers report), and ``val_size`` training images (drawn with
``split_seed``) are held out for validation (checkpoint selection).

With ``root=None`` the embedded synthetic set of :mod:`lattn_app.data.synthetic_segmentation` (the same
layout and conventions, 9 classes) is generated once and used, with a loud warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..classification.dataset import list_images
from ..synthetic_segmentation import SYNTHETIC_ADE20K_IMAGE_SIZE, ensure_synthetic_ade20k
from .dataset import LabelMap, Pair, SegmentationDataModule, hold_out

log = logging.getLogger(__name__)

__all__ = ["ADE20KDataModule", "read_object_info"]

ADE20K_NUM_CLASSES = 150
FOLDER = "ADEChallengeData2016"
SPLIT_FOLDERS = {"train": "training", "test": "validation"}


def read_object_info(path: Path) -> list[str]:
    """Class names in id order from ADE20K's ``objectInfo150.txt`` (tab-separated: Idx Ratio Train Val Name)."""
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if number == 1 or not line.strip():  # the header
            continue
        if len(fields) < 5 or not fields[0].strip().isdigit():
            raise ValueError(f"{path}, line {number}: expected 'Idx<TAB>Ratio<TAB>Train<TAB>Val<TAB>Name'; got {line!r}")
        names[int(fields[0])] = fields[4].split(";")[0].strip()
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ValueError(f"{path}: class ids must run 1..N without gaps; got {sorted(names)[:10]} ...")
    return [names[i] for i in range(1, len(names) + 1)]


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K in its distributed layout (see the module docstring); ``root=None``: the embedded set.

    Args:
        val_size: training images held out for validation (checkpoint selection); on the embedded set at
            most a tenth of its training images.
        split_seed: seed of that hold-out (fixed, independent of the run's seed).
        **kwargs: the augmentation, evaluation-size and predict options of
            :class:`~lattn_app.data.segmentation.dataset.SegmentationDataModule` and ``root``,
            ``batch_size``, ``eval_batch_size``, ``num_workers``.
    """

    layout = (f"{FOLDER}/images/{{training,validation}}/*.jpg and {FOLDER}/annotations/{{training,validation}}/*.png "
              "(class ids, 0 = unlabelled)")
    embedded_description = "textured scenes of 9 classes with irregular boundaries, thin parts and occlusion"
    embedded_image_size = SYNTHETIC_ADE20K_IMAGE_SIZE

    def __init__(self, val_size: int = 500, split_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
            raise ValueError(f"ADE20KDataModule: val_size must be a positive integer (training images held out for "
                             f"checkpoint selection); got {val_size!r}")
        self.val_size = val_size
        self.split_seed = split_seed
        self._splits: dict[str, list[Pair]] | None = None

    def build_embedded(self) -> Path:
        return ensure_synthetic_ade20k()

    @property
    def folder(self) -> Path:
        """``ADEChallengeData2016`` under the root (or the root itself)."""
        root = self.dataset_root
        folder = root if root.name == FOLDER or (root / "images" / "training").is_dir() else root / FOLDER
        if not (folder / "images" / "training").is_dir():
            raise FileNotFoundError(f"ADE20KDataModule: {folder / 'images' / 'training'} not found; --data.root must "
                                    f"hold {self.layout}")
        return folder

    def read_label_map(self) -> LabelMap:
        info = self.folder / "objectInfo150.txt"
        if info.is_file():
            names = read_object_info(info)
        else:
            log.info("ADE20KDataModule: %s not found; the %d classes are named by their ids", info, ADE20K_NUM_CLASSES)
            names = [str(i) for i in range(1, ADE20K_NUM_CLASSES + 1)]
        return LabelMap(tuple(names), tuple(range(1, len(names) + 1)), ignore_values=(0,))

    def _pairs(self, folder_name: str) -> list[Pair]:
        images_dir = self.folder / "images" / folder_name
        if not images_dir.is_dir():
            return []
        return self.paired_masks(list_images(images_dir, (".jpg", ".jpeg", ".png")), images_dir,
                                 self.folder / "annotations" / folder_name, lambda p: p.with_suffix(".png"))

    def split_pairs(self, split: str) -> list[Pair]:
        if self._splits is None:
            training = self._pairs(SPLIT_FOLDERS["train"])
            val_size = self.val_size
            if self.is_embedded and val_size > len(training) // 10:
                val_size = max(1, len(training) // 10)  # configs hold out 500 of ADE20K's 20,210
                log.info("ADE20KDataModule: val_size %d lowered to %d (a tenth of the embedded set's %d training "
                         "images)", self.val_size, val_size, len(training))
            train, val = hold_out(training, val_size, self.split_seed)
            self._splits = {"train": train, "val": val, "test": self._pairs(SPLIT_FOLDERS["test"])}
        return self._splits[split]
