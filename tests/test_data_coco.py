"""COCO datamodule: synthetic set, label mapping, mask decoding, crowd/empty/degenerate handling, errors."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from lattn_app.data.coco import CocoDataModule, CocoDataset, build_transform, decode_segmentation, load_coco_json
from lattn_app.data.synthetic_coco import ensure_synthetic_coco

H, W = 40, 48


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, ensure_synthetic_coco(cache, train_images=12, val_images=6, test_images=6)


def _write_set(root, annotations, images=None, categories=None, split="val"):
    """A tiny COCO set: two images (ids 10 and 11) of H x W, categories 5 and 2."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    images = images if images is not None else [
        {"id": 10, "file_name": "a.png", "height": H, "width": W},
        {"id": 11, "file_name": "b.png", "height": H, "width": W},
    ]
    for info in images:
        Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(root / f"{split}2017" / info["file_name"])
    document = {"images": images, "annotations": annotations,
                "categories": categories or [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}]}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(document))
    return path


SQUARE = {"id": 1, "image_id": 10, "category_id": 5, "bbox": [10, 8, 12, 12], "area": 144, "iscrowd": 0,
          "segmentation": [[10, 8, 22, 8, 22, 20, 10, 20]]}


def test_synthetic_set_is_deterministic_and_cached(tmp_path, synthetic):
    cache, root = synthetic
    assert (root / "annotations" / "instances_train2017.json").is_file()
    again = ensure_synthetic_coco(cache, train_images=12, val_images=6, test_images=6)
    assert again == root
    other = ensure_synthetic_coco(tmp_path, train_images=12, val_images=6, test_images=6)
    for name in ("annotations/instances_train2017.json", "val2017/000000000001.png"):
        assert (other / name).read_bytes() == (root / name).read_bytes()
    document = json.loads((root / "annotations/instances_train2017.json").read_text())
    assert sorted(c["id"] for c in document["categories"]) == [1, 3, 7, 9]
    ann = document["annotations"][0]
    assert ann["iscrowd"] == 0 and len(ann["bbox"]) == 4 and isinstance(ann["segmentation"], list)
    assert not list(cache.glob(".*tmp-*"))


def test_category_mapping_round_trip(synthetic):
    cache, root = synthetic
    dm = CocoDataModule(root=str(root), test_json="annotations/instances_test2017.json", image_size=64, num_workers=0)
    assert dm.num_classes == 4 and dm.class_names == ["circle", "square", "triangle", "star"]
    assert dm.category_ids == [1, 3, 7, 9]
    assert dm.val_coco_gt_path.name == "instances_val2017.json"
    assert dm.test_coco_gt_path.name == "instances_test2017.json"
    dm.setup("test")
    for label in range(1, dm.num_classes + 1):
        assert dm.datasets["test"].category_to_label[dm.category_ids[label - 1]] == label
    _, target = dm.datasets["test"][0]
    document = json.loads(dm.test_coco_gt_path.read_text())
    expected = [a["category_id"] for a in document["annotations"] if a["image_id"] == target["image_id"]]
    assert [dm.category_ids[int(label) - 1] for label in target["labels"]] == expected


def test_embedded_default_warns(synthetic, monkeypatch, caplog):
    cache, _ = synthetic
    monkeypatch.setenv("LATTN_CACHE_DIR", str(tmp := cache / "default"))
    dm = CocoDataModule(image_size=64, num_workers=0)
    with caplog.at_level(logging.WARNING):
        assert dm.num_classes == 4  # the classes are read on first use (the CLI links them to the model)
    assert "EMBEDDED SYNTHETIC" in caplog.text and "--data.root" in caplog.text and str(tmp) in caplog.text
    assert dm.test_coco_gt_path is not None


def test_polygon_and_rle_masks_decode():
    square = decode_segmentation(SQUARE["segmentation"], H, W)
    assert square.dtype == np.uint8 and square.shape == (H, W)
    ys, xs = np.nonzero(square)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 21, 8, 19)
    reference = np.zeros((H, W), np.uint8, order="F")
    reference[5:15, 30:40] = 1
    compressed = mask_utils.encode(reference)
    compressed["counts"] = compressed["counts"].decode("ascii")  # as stored in JSON
    assert np.array_equal(decode_segmentation(compressed, H, W), reference)
    flat = reference.flatten(order="F")
    runs, value, count = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    assert np.array_equal(decode_segmentation({"size": [H, W], "counts": runs}, H, W), reference)


def test_crowd_empty_and_degenerate(tmp_path, caplog):
    reference = np.zeros((H, W), np.uint8, order="F")
    reference[20:30, 30:40] = 1
    rle = mask_utils.encode(reference)
    rle["counts"] = rle["counts"].decode("ascii")
    crowd = {"id": 2, "image_id": 10, "category_id": 2, "bbox": [30, 20, 10, 10], "area": 100, "iscrowd": 1,
             "segmentation": rle}
    thin = {"id": 3, "image_id": 10, "category_id": 2, "bbox": [1, 1, 0.5, 10], "area": 5, "iscrowd": 0,
            "segmentation": [[1, 1, 1.5, 1, 1.5, 11, 1, 11]]}
    path = _write_set(tmp_path, [SQUARE, crowd, thin])
    with caplog.at_level(logging.INFO):
        train = load_coco_json(path, tmp_path / "val2017", [2, 5], train=True)
    assert [im.image_id for im in train] == [10] and [a["id"] for a in train[0].annotations] == [1]
    assert "1 degenerate" in caplog.text and "1 without annotations" in caplog.text
    evaluation = load_coco_json(path, tmp_path / "val2017", [2, 5], train=False)
    assert [im.image_id for im in evaluation] == [10, 11]
    dataset = CocoDataset(evaluation, [2, 5], build_transform(W // 2, train=False))
    image, target = dataset[0]
    assert image.shape == (3, H // 2, W // 2) and 0 <= image.min() and image.max() <= 1
    # Evaluation keeps crowd and degenerate annotations, in original pixels, as COCOeval sees them.
    assert target["labels"].tolist() == [2, 1, 1]  # id 5 -> label 2, id 2 -> label 1
    assert target["iscrowd"].tolist() == [0, 1, 0]
    assert torch.allclose(target["boxes"][0], torch.tensor([10.0, 8, 22, 20]))
    assert target["masks"].shape == (3, H, W) and target["masks"][1].sum() == 100
    assert target["area"].tolist() == [144, 100, 5] and target["orig_size"] == (H, W) and target["size"] == (H // 2, W // 2)
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, H, W) and empty["labels"].dtype == torch.int64


@pytest.mark.parametrize("change, message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {k: v for k, v in d.items() if k != "annotations"}, "'annotations'"),
    (lambda d: {k: v for k, v in d.items() if k != "categories"}, "'categories'"),
    (lambda d: {**d, "annotations": [{**SQUARE, "category_id": 99}]}, "category_id 99"),
    (lambda d: {**d, "annotations": [{**SQUARE, "image_id": 77}]}, "image_id 77"),
])
def test_malformed_json_names_file_and_key(tmp_path, change, message):
    path = _write_set(tmp_path, [SQUARE])
    changed = change(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ValueError, match=message) as info:
        load_coco_json(path, tmp_path / "val2017", [2, 5], train=False)
    assert str(path) in str(info.value)


def test_missing_image_file(tmp_path):
    path = _write_set(tmp_path, [SQUARE])
    (tmp_path / "val2017" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        load_coco_json(path, tmp_path / "val2017", [2, 5], train=False)


def test_flip_keeps_boxes_and_masks_together(tmp_path):
    path = _write_set(tmp_path, [SQUARE])
    images = load_coco_json(path, tmp_path / "val2017", [2, 5], train=True)
    dataset = CocoDataset(images, [2, 5], build_transform(W, train=True, flip_prob=1.0, scale_range=(1.0, 1.0)),
                          train=True)
    _, target = dataset[0]
    ys, xs = np.nonzero(target["masks"][0].numpy())
    x1, y1, x2, y2 = target["boxes"][0].tolist()
    assert (x1, y1, x2, y2) == pytest.approx((W - 22, 8, W - 10, 20), abs=1e-4)
    assert x1 - 1e-4 <= xs.min() and xs.max() + 1 <= x2 + 1e-4 and y1 <= ys.min() and ys.max() + 1 <= y2


def test_dataloader_batch_structure(synthetic):
    _, root = synthetic
    dm = CocoDataModule(root=str(root), image_size=96, batch_size=3, num_workers=0)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and image.shape[0] == 3 and max(image.shape[1:]) <= 120
        n = len(target["labels"])
        assert n >= 1 and target["boxes"].shape == (n, 4) and target["masks"].shape == (n, *image.shape[1:])
        assert target["labels"].min() >= 1 and target["labels"].max() <= dm.num_classes
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
        assert isinstance(target["image_id"], int) and target["orig_size"] == (128, 160)
    val_images, _ = next(iter(dm.val_dataloader()))
    assert max(val_images[0].shape[1:]) == 96


def test_empty_split_is_an_error_naming_the_file(tmp_path):
    path = _write_set(tmp_path, [], split="train")  # images but not one annotation
    _write_set(tmp_path, [SQUARE], split="val")
    data = CocoDataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(ValueError, match="train split is empty.*instances_train2017.json"):
        data.setup("fit")
    assert path.is_file()


def test_bad_boxes_and_polygons_are_named_and_handled(tmp_path, caplog):
    """A negative-width box is left out everywhere; a 2-point polygon is not trained on and is scored with
    its box as the mask; the warnings name the annotation ids and the file."""
    inverted = {**SQUARE, "id": 7, "bbox": [30, 20, -5, 10]}
    line = {**SQUARE, "id": 8, "image_id": 11, "segmentation": [[10, 8, 22, 20]]}
    path = _write_set(tmp_path, [SQUARE, inverted, line])
    with caplog.at_level(logging.WARNING):
        train = load_coco_json(path, tmp_path / "val2017", [2, 5], train=True)
    assert [a["id"] for im in train for a in im.annotations] == [1]
    assert f"{path}: 1 annotation(s) with a box of width or height <= 0 (left out): id 7" in caplog.text
    assert f"{path}: 1 annotation(s) with no polygon of 3 or more points (not trained on): id 8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluation = load_coco_json(path, tmp_path / "val2017", [2, 5], train=False)
    assert [[a["id"] for a in im.annotations] for im in evaluation] == [[1], [8]]
    assert "(its box is used as its mask): id 8" in caplog.text
    _, target = CocoDataset(evaluation, [2, 5], build_transform(W // 2, train=False))[1]
    assert int(target["masks"][0].sum()) == 12 * 12  # the box [10, 8, 12, 12] filled
