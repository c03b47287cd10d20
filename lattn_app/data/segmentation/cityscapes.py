"""Cityscapes (fine annotations) as distributed: 19 training classes from the ``*_labelIds.png`` masks.

``root`` is the folder holding the two extracted packages ``leftImg8bit_trainvaltest.zip`` and
``gtFine_trainvaltest.zip``::

    leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png      (2048 x 1024)
    gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The labelIds masks hold Cityscapes' 34 label ids (0..33; 255 and -1 for the licence plate are read as
unlabelled). The 19 classes of the benchmark (their ``trainId`` 0..18) are trained and scored; the
other 15 ids (unlabelled, ego vehicle, rectification border, out of roi, static, dynamic, ground,
parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) are ignored, as in
cityscapesScripts. Predictions are written with the label ids (``category_ids``), so they can be scored by
cityscapesScripts directly.

Splits: Cityscapes' test masks are not public, so its ``val`` images (500) are the test set here, and
``val_size`` training images (drawn with ``split_seed``) are held out for validation. There is no
embedded set: ``root`` is required.
"""

from __future__ import annotations

from typing import Any

from ..classification.dataset import list_images
from .dataset import LabelMap, Pair, SegmentationDataModule, hold_out

__all__ = ["CITYSCAPES_CLASSES", "CityscapesDataModule"]

#: (name, labelId) of the 19 training classes, in trainId order.
CITYSCAPES_CLASSES = (
    ("road", 7), ("sidewalk", 8), ("building", 11), ("wall", 12), ("fence", 13), ("pole", 17),
    ("traffic light", 19), ("traffic sign", 20), ("vegetation", 21), ("terrain", 22), ("sky", 23),
    ("person", 24), ("rider", 25), ("car", 26), ("truck", 27), ("bus", 28), ("train", 31),
    ("motorcycle", 32), ("bicycle", 33),
)
NUM_LABEL_IDS = 34
IMAGE_SUFFIX = "_leftImg8bit.png"
MASK_SUFFIX = "_gtFine_labelIds.png"
SPLIT_FOLDERS = {"train": "train", "test": "val"}


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes in its distributed layout (see the module docstring).

    Args:
        val_size: training images held out for validation (checkpoint selection).
        split_seed: seed of that hold-out.
        **kwargs: the augmentation, evaluation-size and predict options of
            :class:`~lattn_app.data.segmentation.dataset.SegmentationDataModule` (Cityscapes configs use
            ``scale_size`` 1024 and ``eval_scale`` 1024: the frames' own size) and ``root``, ``batch_size``,
            ``eval_batch_size``, ``num_workers``.
    """

    layout = f"leftImg8bit/{{train,val}}/<city>/*{IMAGE_SUFFIX} and gtFine/{{train,val}}/<city>/*{MASK_SUFFIX}"

    def __init__(self, val_size: int = 200, split_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
            raise ValueError(f"CityscapesDataModule: val_size must be a positive integer; got {val_size!r}")
        self.val_size = val_size
        self.split_seed = split_seed
        self._splits: dict[str, list[Pair]] | None = None

    def read_label_map(self) -> LabelMap:
        ids = tuple(label_id for _, label_id in CITYSCAPES_CLASSES)
        unused = tuple(i for i in range(NUM_LABEL_IDS) if i not in ids)
        return LabelMap(tuple(name for name, _ in CITYSCAPES_CLASSES), ids, ignore_values=(255,), unused_values=unused)

    def _pairs(self, folder: str) -> list[Pair]:
        images_dir = self.dataset_root / "leftImg8bit" / folder
        if not images_dir.is_dir():
            if folder == SPLIT_FOLDERS["train"]:
                raise FileNotFoundError(f"CityscapesDataModule: {images_dir} not found; --data.root must hold "
                                        f"{self.layout}")
            return []
        images = [p for p in list_images(images_dir, (".png",)) if p.name.endswith(IMAGE_SUFFIX)]
        return self.paired_masks(images, images_dir, self.dataset_root / "gtFine" / folder,
                                 lambda p: p.with_name(p.name[: -len(IMAGE_SUFFIX)] + MASK_SUFFIX))

    def split_pairs(self, split: str) -> list[Pair]:
        if self._splits is None:
            train, val = hold_out(self._pairs(SPLIT_FOLDERS["train"]), self.val_size, self.split_seed)
            self._splits = {"train": train, "val": val, "test": self._pairs(SPLIT_FOLDERS["test"])}
        return self._splits[split]
