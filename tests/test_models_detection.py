"""Detection models: necks and detectors on registry backbones, the image preparation, the mapping of
predictions to original pixels, and the metrics against pycocotools' COCOeval."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchmetrics.detection import MeanAveragePrecision

from lattn_app.backbones import create_backbone
from lattn_app.data.coco import CocoDataModule
from lattn_app.data.synthetic_coco import ensure_synthetic_coco
from lattn_app.models.detection import (
    FeaturePyramid,
    PreparedImages,
    SimpleFeaturePyramid,
    DetectorOptions,
    build_detector,
)
from lattn_app.tasks.detection import coco_results, encode_masks, ground_truth, to_original_size

TINY_PYRAMID = {"attention": "efficient", "embed_dims": [16, 32, 32, 48], "depths": [1, 1, 1, 1],
                "num_heads": [1, 1, 2, 2]}
TINY_VIT = {"attention": "efficient", "img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2}
SMALL_HEADS = {"neck_channels": 32, "box_head_dim": 64, "mask_head_channels": 16, "rpn_batch_size_per_image": 32,
               "box_batch_size_per_image": 32}


def _targets(sizes):
    targets = []
    for h, w in sizes:
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 4:30, 6:40] = 1
        masks[1, 20:50, 30:60] = 1
        targets.append({"boxes": torch.tensor([[6.0, 4, 40, 30], [30, 20, 60, 50]]), "labels": torch.tensor([1, 3]),
                        "masks": masks})
    return targets


@pytest.mark.parametrize("detector, backbone, options, head_norm", [
    ("maskrcnn", "pyramid_tiny", TINY_PYRAMID, "none"),
    ("maskrcnn", "pyramid_tiny", TINY_PYRAMID, "group"),
    ("fasterrcnn", "pyramid_tiny", TINY_PYRAMID, "none"),
    ("retinanet", "pyramid_tiny", TINY_PYRAMID, "none"),
    ("fcos", "pyramid_tiny", TINY_PYRAMID, "none"),
    ("maskrcnn", "vit", TINY_VIT, "none"),
])
def test_detector_trains_and_detects(detector, backbone, options, head_norm):
    torch.manual_seed(0)
    model = build_detector(detector, 3, backbone, options, DetectorOptions(head_norm=head_norm, **SMALL_HEADS))
    if head_norm == "group":
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.roi_heads.box_head.modules())
    sizes = [(64, 96), (80, 64)]  # different sizes in one batch, neither a multiple of 32
    images = [torch.rand(3, h, w) for h, w in sizes]
    model.train()
    losses = model(images, _targets(sizes))
    assert all(torch.isfinite(v) for v in losses.values())
    if detector == "maskrcnn":
        assert "loss_mask" in losses
    sum(losses.values()).backward()
    backbone_grads = [p.grad for p in model.backbone.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads), "no gradient reached the backbone"
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for (h, w), detection in zip(sizes, detections):
        n = len(detection["scores"])
        assert detection["boxes"].shape == (n, 4) and detection["labels"].shape == (n,)
        if n:
            # label 0 is the background; one-stage heads may score it before training (the task drops it)
            assert detection["labels"].min() >= (1 if detector in ("maskrcnn", "fasterrcnn") else 0)
            assert detection["labels"].max() <= 3
            assert detection["boxes"][:, 2].max() <= w + 1e-3 and detection["boxes"][:, 3].max() <= h + 1e-3
        if detector == "maskrcnn":
            assert detection["masks"].shape == (n, 1, h, w)


def test_fpn_levels_follow_backbone_strides():
    backbone = create_backbone("pyramid_tiny", **TINY_PYRAMID)
    neck = FeaturePyramid(backbone, (4, 8, 16, 32, 64), out_channels=24, one_stage=False)
    features = neck(torch.rand(1, 3, 64, 128))
    assert list(features) == ["p2", "p3", "p4", "p5", "p6"]
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(16, 32), (8, 16), (4, 8), (2, 4), (1, 2)]
    assert all(f.shape[1] == 24 for f in features.values())
    one_stage = FeaturePyramid(backbone, (8, 16, 32, 64, 128), out_channels=24, one_stage=True)
    assert list(one_stage(torch.rand(1, 3, 64, 128))) == ["p3", "p4", "p5", "p6", "p7"]
    with pytest.raises(ValueError, match="strides"):
        FeaturePyramid(backbone, (2, 4, 8, 16, 32), out_channels=24, one_stage=False)


def test_simple_pyramid_over_isotropic_vit():
    backbone = create_backbone("vit", **TINY_VIT)
    neck = SimpleFeaturePyramid(backbone, (4, 8, 16, 32, 64), out_channels=24, one_stage=False)
    features = neck(torch.rand(2, 3, 64, 96))  # stride-16 grid 4 x 6
    assert [tuple(f.shape) for f in features.values()] == [
        (2, 24, 16, 24), (2, 24, 8, 12), (2, 24, 4, 6), (2, 24, 2, 3), (2, 24, 1, 2)]


def test_prepared_images_neither_resize_nor_normalise():
    transform = PreparedImages(size_divisible=32)
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 40)]
    batch, _ = transform(images)
    assert batch.image_sizes == [(50, 70), (64, 40)]
    assert batch.tensors.shape == (2, 3, 64, 96)
    assert torch.equal(batch.tensors[0, :, :50, :70], images[0])
    assert batch.tensors[0, :, 50:, :].abs().sum() == 0


def test_to_original_size_scales_boxes_and_masks():
    masks = torch.zeros(1, 1, 40, 50)
    masks[0, 0, 10:30, 5:25] = 0.9
    detection = {"boxes": torch.tensor([[5.0, 10, 25, 30]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([2]),
                 "masks": masks}
    original = to_original_size(detection, (40, 50), (80, 100))
    assert torch.allclose(original["boxes"], torch.tensor([[10.0, 20, 50, 60]]))
    assert original["masks"].shape == (1, 80, 100) and original["masks"].dtype == torch.bool
    ys, xs = np.nonzero(original["masks"][0].numpy())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20, 59, 10, 49)
    assert original["scores"] is detection["scores"]


def _perturbed_predictions(target, rng):
    """Ground truth turned into imperfect detections: shifted boxes, eroded masks, false positives."""
    n = len(target["labels"])
    h, w = target["orig_size"]
    boxes = target["boxes"].clone() + torch.from_numpy(rng.normal(0, 3, (n, 4))).float()
    labels = target["labels"].clone()
    flip = torch.from_numpy(rng.random(n) < 0.2)
    labels[flip] = labels[flip] % 4 + 1
    masks = target["masks"].bool().clone()
    masks[:, ::3, :] = False
    extra = 2
    false_boxes = torch.tensor([[10.0, 10, 40, 50], [60, 30, 100, 90]])
    false_masks = torch.zeros(extra, h, w, dtype=torch.bool)
    false_masks[0, 10:50, 10:40] = True
    false_masks[1, 30:90, 60:100] = True
    return {
        "boxes": torch.cat([boxes, false_boxes]),
        "scores": torch.from_numpy(rng.random(n + extra)).float(),
        "labels": torch.cat([labels, torch.tensor([1, 2])]),
        "masks": torch.cat([masks, false_masks]),
    }


def test_metrics_equal_cocoeval_on_the_results_json(tmp_path):
    """torchmetrics (what `lattn test` logs) and COCOeval on our results JSON (what `lattn predict` writes)."""
    root = ensure_synthetic_coco(tmp_path, train_images=2, val_images=2, test_images=12)
    data = CocoDataModule(root=str(root), test_json="annotations/instances_test2017.json", image_size=96,
                          num_workers=0, eval_batch_size=4)
    data.setup("test")
    metric = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools")
    rng = np.random.default_rng(0)
    bbox_results, segm_results = [], []
    for index in range(len(data.datasets["test"])):
        _, target = data.datasets["test"][index]
        assert target["masks"].shape[-2:] == (128, 160)  # evaluation ground truth in original pixels
        prediction = _perturbed_predictions(target, rng)
        metric.update([prediction], [ground_truth(target, with_masks=True)])
        result = {"image_id": target["image_id"], "boxes": prediction["boxes"], "scores": prediction["scores"],
                  "category_ids": [data.category_ids[int(label) - 1] for label in prediction["labels"]],
                  "masks": encode_masks(prediction["masks"])}
        bbox, segm = coco_results(result)
        bbox_results += bbox
        segm_results += segm
    ours = metric.compute()
    (tmp_path / "bbox.json").write_text(json.dumps(bbox_results))
    (tmp_path / "segm.json").write_text(json.dumps(segm_results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(data.test_coco_gt_path))
        for iou_type in ("bbox", "segm"):
            evaluation = COCOeval(gt, gt.loadRes(str(tmp_path / f"{iou_type}.json")), iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            stats = evaluation.stats
            keys = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")
            reference = dict(zip(keys, (*stats[:6], *stats[6:9])))
            assert 0.2 < reference["map_50"] < 0.99  # a meaningful comparison, not 0 against 0
            for key, value in reference.items():
                assert float(ours[f"{iou_type}_{key}"]) == pytest.approx(value, abs=1e-3), (iou_type, key)
