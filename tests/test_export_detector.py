"""The exportable Faster / Mask R-CNN inference (lattn_app/export/detector.py) against torchvision's own:
the same weights give the same detections, in the same order, with every size of the graph fixed by the
image size (the detections not kept are flagged, not removed)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import batched_nms

from lattn_app import tasks
from lattn_app.export.detector import TwoStageInference, kept_by_nms, paste_masks
from lattn_app.export.wrappers import export_wrapper
from lattn_app.models.detection import DetectorOptions, build_detector
from tests.test_export import spread_one_stage_scores
from tests.test_models_detection import SMALL_HEADS, TINY_PYRAMID, TINY_VIT

DETECTIONS = 100  # torchvision's (and lattn's) detections per image


@pytest.mark.parametrize("detector, backbone, options, head_norm", [
    ("maskrcnn", "pyramid_tiny", TINY_PYRAMID, "group"),
    ("fasterrcnn", "pyramid_tiny", TINY_PYRAMID, "none"),
    ("maskrcnn", "vit", TINY_VIT, "none"),  # one-level backbone, simple pyramid
])
@pytest.mark.parametrize("regime", ["full", "some", "none"])
def test_two_stage_inference_gives_torchvisions_detections(detector, backbone, options, head_norm, regime):
    torch.manual_seed(0)
    model = build_detector(detector, 3, backbone, options, DetectorOptions(
        head_norm=head_norm, detections_per_image=DETECTIONS, **SMALL_HEADS)).eval()
    images = torch.rand(2, 3, 70, 101)  # neither side a multiple of the padding (32)
    with torch.no_grad():
        expected = model(list(images))  # an untrained model: 100 detections over the score threshold of 0.05
        if regime != "full":  # the median score of the first image's detections, or more than any
            model.roi_heads.score_thresh = float(expected[0]["scores"].median()) if regime == "some" else 0.999
            expected = model(list(images))
        boxes, scores, labels, valid, *masks = TwoStageInference(model)(images)
    assert boxes.shape == (2, DETECTIONS, 4) and valid.shape == (2, DETECTIONS)
    counts = []
    for index, reference in enumerate(expected):
        count = int(valid[index].sum())
        counts.append(count)
        assert count == len(reference["boxes"])
        assert valid[index, :count].all()  # the valid detections first
        assert torch.equal(labels[index, :count], reference["labels"])
        torch.testing.assert_close(boxes[index, :count], reference["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(scores[index, :count], reference["scores"], rtol=0, atol=1e-6)
        assert (scores[index, count:] == 0).all() and (labels[index, count:] == 0).all()
        if detector == "maskrcnn":
            assert masks[0].shape == (2, DETECTIONS, 70, 101)
            torch.testing.assert_close(masks[0][index, :count], reference["masks"][:, 0], rtol=0, atol=1e-5)
        else:
            assert not masks
    # each threshold checks what it is meant to: the cap of 100, fewer detections than the cap, none at all
    assert {"full": all(c == DETECTIONS for c in counts), "some": 0 < counts[0] < DETECTIONS,
            "none": all(c == 0 for c in counts)}[regime], counts


@pytest.mark.parametrize("detector", ["retinanet", "fcos"])
@pytest.mark.parametrize("regime", ["full", "some", "none"])
def test_a_one_stage_detectors_exported_computation_gives_the_tasks_detections(detector, regime):
    torch.manual_seed(0)
    task = tasks.DetectionTask(detector=detector, backbone="pyramid_tiny", num_classes=3, net={"neck_channels": 32},
                               backbone_options={k: v for k, v in TINY_PYRAMID.items() if k != "attention"})
    spread_one_stage_scores(task.detector)
    wrapper = export_wrapper(task)  # what is traced: the detector's OneStageInference, label 0 dropped as the task does
    counts = []
    with torch.no_grad():
        for size in ((144, 176), (176, 144), (150, 131)):
            image = torch.rand(3, *size, generator=torch.Generator().manual_seed(sum(size)))
            expected = task([image])[0]  # torchvision's inference, through the task
            if regime != "full":
                task.detector.score_thresh = float(expected["scores"].median()) if regime == "some" else 0.999
                expected = task([image])[0]
            boxes, labels, scores = wrapper(image)
            counts.append(len(boxes))
            assert torch.equal(labels, expected["labels"])
            torch.testing.assert_close(boxes, expected["boxes"], rtol=0, atol=1e-5)
            torch.testing.assert_close(scores, expected["scores"], rtol=0, atol=1e-6)
            task.detector.score_thresh = 0.05
    assert {"full": all(c >= 95 for c in counts), "some": all(0 < c < 95 for c in counts),
            "none": all(c == 0 for c in counts)}[regime], counts


def test_pasted_masks_equal_torchvisions():
    generator = torch.Generator().manual_seed(0)
    height, width = 45, 61
    corners = torch.rand(40, 2, generator=generator) * torch.tensor([width, height])
    sizes = torch.rand(40, 2, generator=generator) * 40
    sizes[:5] *= 0.01  # boxes under a pixel (torchvision: at least one pixel)
    # clipped to the image, as detections are: the expanded boxes of those at an edge reach outside it
    # (torchvision's pasting fails on a box wholly outside, which a detection never is)
    boxes = torch.cat([corners, torch.minimum(corners + sizes, torch.tensor([width, height]))], dim=1)
    masks = torch.rand(40, 28, 28, generator=generator)
    expected = paste_masks_in_image(masks[:, None], boxes, (height, width))[:, 0]
    torch.testing.assert_close(paste_masks(masks, boxes, height, width), expected, rtol=0, atol=1e-5)  # round-off


@pytest.mark.parametrize("count", [300, 3000])  # batched_nms's two forms: groups shifted apart, one NMS per group
def test_nms_mask_keeps_what_batched_nms_keeps_and_ignores_invalid_boxes(count):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(count, 2, generator=generator) * 100
    boxes = torch.cat([corners, corners + 5 + torch.rand(count, 2, generator=generator) * 30], dim=1)
    scores = torch.rand(count, generator=generator)
    groups = torch.randint(0, 3, (count,), generator=generator)
    valid = torch.rand(count, generator=generator) > 0.2
    valid_index = valid.nonzero().squeeze(1)
    expected = torch.zeros(count, dtype=torch.bool)
    expected[valid_index[batched_nms(boxes[valid], scores[valid], groups[valid], 0.5)]] = True
    everyone = torch.arange(count)
    kept = kept_by_nms(boxes, scores, groups, valid, 0.5, {group: everyone for group in range(3)})
    assert torch.equal(kept, expected)
    assert 0 < int(kept.sum()) < int(valid.sum())  # NMS suppressed some valid boxes and kept others
