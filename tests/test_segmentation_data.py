"""Segmentation data: the three layouts read their real file formats (PNG masks written here), labels map to
the training classes and back, image and mask move together, and bad input stops with the file named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lattn_app.data.segmentation import (
    ADE20KDataModule,
    CityscapesDataModule,
    MaskError,
    SegmentationFolderDataModule,
)
from lattn_app.data.segmentation.transforms import segmentation_train_transform
from lattn_app.data.synthetic_segmentation import SYNTHETIC_ADE20K_CLASSES, ensure_synthetic_ade20k

COLOURS = np.array([[250, 20, 20], [20, 250, 20], [20, 20, 250], [240, 240, 30]], np.uint8)


def write_pair(image_path: Path, mask_path: Path, mask: np.ndarray, image: np.ndarray | None = None) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = COLOURS[np.clip(mask, 0, 3) % 4]
    Image.fromarray(image.astype(np.uint8)).save(image_path)
    Image.fromarray(mask).save(mask_path)


def blocks(height: int = 40, width: int = 48, values=(0, 1, 2, 3)) -> np.ndarray:
    """A mask of four quadrants with the given values."""
    mask = np.empty((height, width), np.uint8)
    mask[: height // 2, : width // 2], mask[: height // 2, width // 2:] = values[0], values[1]
    mask[height // 2:, : width // 2], mask[height // 2:, width // 2:] = values[2], values[3]
    return mask


def folder_root(root: Path, train: int = 3, val: int = 2, mask=None) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("red\ngreen\nblue\nyellow\n")
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            m = blocks() if mask is None else mask
            write_pair(root / "images" / split / f"img{i}.png", root / "masks" / split / f"img{i}.png", m)
    return root


def test_training_augmentation_moves_image_and_mask_together_and_keeps_labels_exact():
    mask = blocks(60, 80)
    mask[25:35, :] = 255  # an unlabelled band
    image = COLOURS[mask % 4]
    image[mask == 255] = 0
    transform = segmentation_train_transform(48, scale_size=64, ratio_range=(0.5, 2.0), flip_prob=0.5,
                                             color_jitter=None)
    for seed in range(20):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (48, 48, 3) and out["mask"].shape == (48, 48)
        assert set(np.unique(out["mask"])) <= {0, 1, 2, 3, 255}  # nearest neighbour: no blended label
        labelled = out["mask"] != 255
        agree = (np.abs(out["image"].astype(int) - COLOURS[out["mask"] % 4].astype(int)).sum(-1) < 60) & labelled
        assert agree.sum() >= 0.8 * labelled.sum()  # every label still sits on its colour (boundaries blur)


def test_ade20k_layout_reads_class_list_and_reduces_the_zero_label(tmp_path):
    root = ensure_synthetic_ade20k(tmp_path, train_images=12, val_images=3)
    data = ADE20KDataModule(root=str(root), val_size=2, crop_size=32, scale_size=None, eval_scale=None, num_workers=0)
    assert data.class_names == [name for name, _, _ in SYNTHETIC_ADE20K_CLASSES]
    assert data.category_ids == list(range(1, 10))
    data.setup("fit")
    data.setup("test")
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [10, 2, 3]
    sample = data.datasets["test"][0]
    raw = np.array(Image.open(data.datasets["test"].pairs[0][1]))
    labels = sample["mask"].numpy()
    assert labels.shape == raw.shape and sample["image"].shape[1:] == raw.shape
    assert (labels[raw == 0] == 255).all() and (labels[raw > 0] == raw[raw > 0] - 1).all()
    # the counts of the training masks are those of the files
    expected = sum(np.bincount(np.array(Image.open(m)).ravel(), minlength=10)[1:] for _, m in data.datasets["train"].pairs)
    assert data.training_class_pixels().tolist() == expected.tolist()


def test_ade20k_names_come_from_object_info(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    write_pair(base / "images/training/ADE_train_00000001.jpg", base / "annotations/training/ADE_train_00000001.png",
               blocks(values=(0, 1, 2, 150)))
    write_pair(base / "images/training/ADE_train_00000002.jpg", base / "annotations/training/ADE_train_00000002.png",
               blocks(values=(3, 1, 2, 150)))
    rows = "\n".join(f"{i}\t0.01\t10\t2\tname{i};alias" for i in range(1, 151))
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + rows + "\n")
    data = ADE20KDataModule(root=str(tmp_path), val_size=1, num_workers=0)
    assert data.num_classes == 150 and data.class_names[0] == "name1" and data.class_names[149] == "name150"
    data.setup("fit")
    assert set(torch.unique(data.datasets["val"][0]["mask"]).tolist()) <= {255, 0, 1, 2, 149}


def test_cityscapes_label_ids_map_to_the_19_training_classes(tmp_path):
    name = "aachen_000000_000019"
    for split, count in (("train", 3), ("val", 1)):
        for i in range(count):
            stem = f"aachen_{i:06d}_000019"
            write_pair(tmp_path / f"leftImg8bit/{split}/aachen/{stem}_leftImg8bit.png",
                       tmp_path / f"gtFine/{split}/aachen/{stem}_gtFine_labelIds.png", blocks(values=(7, 26, 0, 33)))
    data = CityscapesDataModule(root=str(tmp_path), val_size=1, eval_scale=None, num_workers=0)
    assert data.num_classes == 19 and data.class_names[13] == "car" and data.category_ids[13] == 26
    data.setup("test")
    assert set(torch.unique(data.datasets["test"][0]["mask"]).tolist()) == {0, 13, 255, 18}
    bad = tmp_path / f"gtFine/val/aachen/{name}_gtFine_labelIds.png"
    Image.fromarray(blocks(values=(7, 40, 0, 33))).save(bad)
    with pytest.raises(MaskError, match=rf"{bad}: mask values 40 are not in the class list"):
        data.datasets["test"][0]


def test_a_folder_layout_with_a_class_list(tmp_path):
    root = folder_root(tmp_path / "mine")
    data = SegmentationFolderDataModule(root=str(root), crop_size=32, scale_size=None, eval_scale=None, num_workers=0)
    assert data.class_names == ["red", "green", "blue", "yellow"] and data.category_ids == [0, 1, 2, 3]
    data.setup("fit")
    batch = next(iter(data.loader("train")))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["mask"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="there is no test split with masks"):
        data.setup("test")


def test_a_mask_whose_size_differs_from_its_image_is_an_error_naming_both(tmp_path):
    root = folder_root(tmp_path / "mine")
    mask_path = root / "masks/val/img1.png"
    Image.fromarray(blocks(30, 48)).save(mask_path)
    data = SegmentationFolderDataModule(root=str(root), num_workers=0)
    data.setup("validate")
    with pytest.raises(MaskError, match=rf"{mask_path}: the mask is 30x48 \(HxW\) but its image .*img1.png is 40x48"):
        data.datasets["val"][1]


def test_class_ids_outside_the_class_list_are_an_error_naming_the_file(tmp_path):
    root = folder_root(tmp_path / "mine", mask=blocks(values=(0, 1, 7, 9)))
    data = SegmentationFolderDataModule(root=str(root), num_workers=0)
    data.setup("validate")
    with pytest.raises(MaskError, match=r"masks/val/img0.png: mask values 7, 9 are not in the class list; expected "
                                        r"class ids 0..3 or the unlabelled / unused values 255"):
        data.datasets["val"][0]


def test_a_missing_mask_is_an_error_naming_the_image_and_the_mask(tmp_path):
    root = folder_root(tmp_path / "mine")
    (root / "masks/train/img2.png").unlink()
    data = SegmentationFolderDataModule(root=str(root), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"images/train/img2.png: its mask .*masks/train/img2.png does not exist"):
        data.setup("fit")


def test_a_colour_mask_is_refused(tmp_path):
    root = folder_root(tmp_path / "mine")
    Image.fromarray(COLOURS[blocks() % 4]).save(root / "masks/val/img0.png")
    data = SegmentationFolderDataModule(root=str(root), num_workers=0)
    data.setup("validate")
    with pytest.raises(MaskError, match=r"img0.png: the mask is a 'RGB' image; expected a single-channel PNG"):
        data.datasets["val"][0]


def test_embedded_scenes_are_textured_with_thin_parts_and_unlabelled_pixels(tmp_path):
    root = ensure_synthetic_ade20k(tmp_path, train_images=20, val_images=2)
    masks = [np.array(Image.open(p)) for p in sorted((root / "ADEChallengeData2016/annotations/training").glob("*.png"))]
    values = np.concatenate([m.ravel() for m in masks])
    assert set(np.unique(values)) == set(range(10))  # every class and the unlabelled 0 occur
    pole = len(SYNTHETIC_ADE20K_CLASSES)
    assert any(((m == pole).sum(axis=1) <= 4).all() and (m == pole).any() for m in masks)  # poles are thin
    image = np.array(Image.open(sorted((root / "ADEChallengeData2016/images/training").glob("*.jpg"))[0]))
    mask = masks[0]
    biggest = np.bincount(mask.ravel()).argmax()
    assert image[mask == biggest].std(axis=0).mean() > 10  # a region is a texture, not one flat colour
    assert "NOT real data" not in (root / "README.txt").read_text() and "not real data" in (root / "README.txt").read_text()
