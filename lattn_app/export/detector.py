"""torchvision's detectors' inference, written so that torch.export and ONNX can trace it.

torchvision's own inference path cannot be exported whole: it selects proposals and detections with
data-dependent indexing (``boxes[keep]``), branches on how many boxes there are (``batched_nms``), and
pastes every mask with a Python loop over boxes of data-dependent size. :class:`TwoStageInference`
(Faster / Mask R-CNN) and :class:`OneStageInference` (RetinaNet, FCOS) compute the same detections from
the same submodules (and so the same weights) with shapes that depend on the image size only:

- a box that torchvision *drops* (too small, below the score threshold, suppressed) is kept here in a
  fixed-size tensor with a validity flag, and it never takes part in anything downstream;
- the dropped boxes go into NMS as one extra group of identical boxes, which suppress each other and
  nothing else (so NMS runs once, on every candidate, in torchvision's coordinate-offset form);
- "keep the best k" (per level before NMS, per image after it) is a top-k of the flagged scores (NMS
  keeps boxes in descending score order, so these are the same boxes in the same order);
- each mask is pasted by one separable bilinear resampling (two small matrix products per mask), the
  computation of torchvision's ``paste_masks_in_image`` (``F.interpolate`` of the padded 28 x 28 mask to
  the integer box, then copied into the image) without the per-box loop.

Only the number of detections is data-dependent, and only at the very end (the outputs are cut to the
valid ones). The results equal torchvision's; tests compare the two on the same weights. Above 1,000
candidates (on a CPU) torchvision's ``batched_nms`` runs one NMS per class on the raw coordinates instead of
the offset form, which can decide differently only where an overlap lies within float32 round-off of the
threshold; equal scores may be ordered either way (docs/export.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import clip_boxes_to_image, nms

OUTSIDE = (-2.0, -2.0, -1.0, -1.0)  # what a box out of an NMS becomes: outside every (clipped) box, IoU 1 with its like
FEW_BOXES = 1000  # torchvision's batched_nms shifts groups apart up to this many boxes on a CPU (4,000 coordinates)


def inference(detector: nn.Module) -> nn.Module:
    """The exportable inference of a torchvision detector: images (B, 3, H, W) -> boxes, scores, labels,
    valid[, masks], as :class:`TwoStageInference` describes."""
    if isinstance(detector, FasterRCNN):  # MaskRCNN subclasses FasterRCNN
        return TwoStageInference(detector)
    if isinstance(detector, (RetinaNet, FCOS)):
        return OneStageInference(detector)
    raise ValueError(f"lattn exports torchvision's Faster / Mask R-CNN, RetinaNet and FCOS whole; got "
                     f"{type(detector).__name__}")


def pad_to_multiple(images: Tensor, divisible: int) -> Tensor:
    """Images padded at the bottom and right to multiples of `divisible` (torchvision's batch_images)."""
    height, width = images.shape[-2:]
    return F.pad(images, (0, (width + divisible - 1) // divisible * divisible - width,
                          0, (height + divisible - 1) // divisible * divisible - height))


def anchors_of(detector: nn.Module, padded: Tensor, maps: list[Tensor]) -> Tensor:
    """The detector's anchors (or FCOS's points) for every location of `maps`, levels in order: (A, 4)."""
    batch = padded.shape[0]
    anchors = detector.anchor_generator(ImageList(padded, [(padded.shape[-2], padded.shape[-1])] * batch), maps)
    return anchors[0]  # the same for every image of one size


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """Boxes whose width and height are both at least `min_size` (torchvision's remove_small_boxes, as a mask)."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def kept_by_nms(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float,
                members: dict[int, Tensor]) -> Tensor:
    """Which of one image's `boxes` (n, 4) torchvision's ``batched_nms`` keeps, as a mask (n,): exactly the
    boxes ``batched_nms(boxes[valid], scores[valid], groups[valid])`` keeps on a CPU, with shapes that do not
    depend on `valid`.

    Up to 1,000 valid boxes (4,000 coordinates), batched_nms runs one NMS with each group shifted apart;
    above, one NMS per group on the boxes as they are. Both are computed here and the count chooses (the two
    differ where an overlap lies within round-off of the threshold). `members` maps each group to the indices
    of the boxes that can be in it (a level's proposals, a class's column), so that a group's NMS costs what
    torchvision's does, not an NMS over every box.
    """
    shifted = kept_shifted_apart(boxes, scores, groups, valid, iou_threshold)
    per_group = kept_group_by_group(boxes, scores, groups, valid, iou_threshold, members)
    many = valid.sum() > FEW_BOXES
    return ((many & per_group) | (~many & shifted)) & valid  # not torch.where: onnxruntime has no Where on booleans


def kept_shifted_apart(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float) -> Tensor:
    """batched_nms's coordinate trick on the at most 1,000 best valid boxes (every valid box where it applies):
    each group shifted by its own offset (the valid boxes' largest coordinate + 1) so that two never overlap;
    the padding, invalid boxes, as a group of its own of identical boxes, which suppress only each other."""
    index, best, real = (t[0] for t in top_kept(scores[None], valid[None], FEW_BOXES))
    chosen = torch.where(real[:, None], boxes[index], boxes.new_tensor(OUTSIDE))
    chosen_groups = torch.where(real, groups[index], groups.max() + 1)
    largest = torch.where(real[:, None], chosen, 0.0).max()
    keep = nms(chosen + (chosen_groups.to(boxes.dtype) * (largest + 1))[:, None], best, iou_threshold)
    return torch.zeros_like(valid).index_fill(0, index[keep], True)  # the padding is removed by `& valid`


def kept_group_by_group(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, iou_threshold: float,
                        members: dict[int, Tensor]) -> Tensor:
    """batched_nms's per-group NMS: for each group, NMS over the boxes that can be in it, the others of them
    moved outside the image (where they overlap nothing but each other)."""
    kept = torch.zeros(valid.shape, dtype=torch.int64, device=valid.device)
    for group, index in members.items():
        inside = valid[index] & (groups[index] == group)
        keep = nms(torch.where(inside[:, None], boxes[index], boxes.new_tensor(OUTSIDE)), scores[index], iou_threshold)
        kept_here = torch.zeros_like(inside).index_fill(0, keep, True) & inside
        kept = kept.index_add(0, index, kept_here.to(torch.int64))  # groups may share candidates (one-stage)
    return kept > 0


def top_kept(scores: Tensor, kept: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The at most `k` highest-scoring kept entries of each row of `scores` (B, n): indices (B, k'), their
    scores and whether each is a kept entry (a row with fewer than k' kept ones is padded with others)."""
    masked = torch.where(kept, scores, torch.full_like(scores, -1.0))  # every real score is >= 0
    values, indices = masked.topk(torch.sym_min(scores.shape[1], k), dim=1)
    return indices, scores.gather(1, indices), values >= 0


def paste_masks(masks: Tensor, boxes: Tensor, height, width, padding: int = 1) -> Tensor:
    """Masks (n, M, M) of boxes (n, 4) pasted into `height` x `width` images: (n, height, width).

    torchvision's ``paste_masks_in_image``: the mask padded by `padding`, its box scaled alike about its
    centre and rounded towards zero, the mask resized to the box's integer size by bilinear interpolation
    (``align_corners=False``) and copied in, zero outside the box. Written as ``rows @ mask @ columns^T`` with
    the interpolation weights, the same sums without a loop over boxes of data-dependent size.
    """
    size = masks.shape[-1]
    padded = F.pad(masks, (padding,) * 4)
    scale = (size + 2 * padding) / size
    half_width = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_height = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack((centre_x - half_width, centre_y - half_height, centre_x + half_width,
                            centre_y + half_height), dim=1).to(torch.int64)
    rows = interpolation_weights(expanded[:, 1], expanded[:, 3], height, size + 2 * padding, masks.dtype)
    columns = interpolation_weights(expanded[:, 0], expanded[:, 2], width, size + 2 * padding, masks.dtype)
    return rows @ padded @ columns.transpose(1, 2)


def interpolation_weights(start: Tensor, end: Tensor, length, source: int, dtype: torch.dtype) -> Tensor:
    """(n, length, source): the weight of each of `source` mask samples in each image pixel along one axis, for
    boxes covering pixels start..end (integers, inclusive): F.interpolate's bilinear weights, align_corners=False."""
    extent = (end - start + 1).clamp(min=1).to(dtype)  # the box's size in pixels (torchvision: at least 1)
    pixel = torch.arange(length, device=start.device)[None, :] - start[:, None]  # position inside the box
    inside = (pixel >= 0) & (pixel < extent[:, None].to(torch.int64))
    position = ((pixel.to(dtype) + 0.5) * (source / extent[:, None]) - 0.5).clamp(min=0)
    low = position.floor()
    fraction = position - low
    low = low.to(torch.int64).clamp(max=source - 1)
    high = (low + 1).clamp(max=source - 1)
    samples = torch.arange(source, device=start.device)
    weights = ((samples == low[..., None]).to(dtype) * (1 - fraction)[..., None]
               + (samples == high[..., None]).to(dtype) * fraction[..., None])
    return weights * inside[..., None].to(dtype)


class DetectorInference(nn.Module):
    """What both inferences share: the detector, and its padding and feature pyramid of the images."""

    with_masks = False

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def features(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The images padded as the detector pads them, and its feature pyramid of them."""
        padded = pad_to_multiple(images, self.detector.transform.size_divisible)
        return padded, self.detector.backbone(padded)


class TwoStageInference(DetectorInference):
    """A torchvision Faster / Mask R-CNN's inference (``detector.eval()(images)``) on normalised images
    (B, 3, H, W) of one size: boxes, scores, labels (B, D) [masks (B, D, H, W)] and whether each of the D
    detections is one (D = the detector's ``detections_per_img``; rows hold the valid ones first, by score).

    The detector's own submodules and settings do the work (see the module docstring for what differs in
    how): the transform's padding, the backbone, the RPN (its head, anchors, box coder, pre/post-NMS counts,
    NMS and score thresholds) and the RoI heads (pooling, box and mask heads, score threshold, NMS,
    detections per image).
    """

    def __init__(self, detector: nn.Module) -> None:
        if not isinstance(detector, FasterRCNN):
            raise ValueError(f"TwoStageInference runs torchvision's Faster / Mask R-CNN; got {type(detector).__name__}")
        super().__init__(detector)
        self.with_masks = detector.roi_heads.has_mask()

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        height, width = images.shape[-2:]
        padded, features = self.features(images)
        boxes, scores, labels, valid = self.detections(padded, features, height, width)
        if not self.with_masks:
            return boxes, scores, labels, valid
        return boxes, scores, labels, valid, self.masks(features, boxes, labels, height, width)

    def detections(self, padded: Tensor, features: dict[str, Tensor], height, width) -> tuple[Tensor, ...]:
        """Boxes, scores, labels and validity (B, D) of images of `height` x `width` (without masks)."""
        proposals, proposal_valid = self.propose(padded, features, height, width)
        return self.detect(features, proposals, proposal_valid, height, width)

    def propose(self, padded: Tensor, features: dict[str, Tensor], height, width) -> tuple[Tensor, Tensor]:
        """The RPN's proposals (B, P, 4) and which are real (B, P): torchvision's RegionProposalNetwork in eval."""
        rpn = self.detector.rpn
        maps = list(features.values())
        batch = padded.shape[0]
        objectness, deltas = rpn.head(maps)
        anchors = anchors_of(rpn, padded, maps)
        per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness]
        # torchvision's concat_box_prediction_layers: each level's (B, A * C, h, w) as (B, h * w * A, C), levels
        # concatenated. Channels last by stacking, not by permuting: with symbolic sizes the ONNX exporter turns the
        # reshape of a permuted map into a view it then rejects.
        objectness = torch.cat([torch.stack(o.unbind(1), dim=-1).flatten(1) for o in objectness], dim=1)
        deltas = torch.cat([torch.stack(d.unbind(1), dim=-1).reshape(batch, -1, 4) for d in deltas], dim=1)
        boxes = rpn.box_coder.decode_single(deltas.reshape(-1, 4), anchors.repeat(batch, 1)).view(batch, -1, 4)
        chosen, levels, members, offset, start = [], [], {}, 0, 0
        for level, scores in enumerate(objectness.split(per_level, dim=1)):  # the best pre_nms_top_n of each level
            top = scores.topk(torch.sym_min(scores.shape[1], rpn._pre_nms_top_n["testing"]), dim=1).indices
            chosen.append(top + offset)
            levels.append(torch.full_like(top, level))
            members[level] = torch.arange(start, start + top.shape[1], device=top.device)  # NMS within the level
            offset, start = offset + scores.shape[1], start + top.shape[1]
        chosen, levels = torch.cat(chosen, dim=1), torch.cat(levels, dim=1)
        scores = objectness.gather(1, chosen).sigmoid()
        boxes = clip_boxes_to_image(boxes.gather(1, chosen[..., None].expand(-1, -1, 4)), (height, width))
        valid = large_enough(boxes, rpn.min_size) & (scores >= rpn.score_thresh)
        kept = torch.stack([kept_by_nms(boxes[b], scores[b], levels[b], valid[b], rpn.nms_thresh, members)
                            for b in range(batch)])  # NMS per image and level
        top, _, real = top_kept(scores, kept, rpn._post_nms_top_n["testing"])
        return boxes.gather(1, top[..., None].expand(-1, -1, 4)), real

    def detect(self, features: dict[str, Tensor], proposals: Tensor, proposal_valid: Tensor, height,
               width) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The box head's detections: torchvision's RoIHeads.postprocess_detections, per image."""
        heads = self.detector.roi_heads
        batch, count = proposals.shape[:2]
        image_sizes = [(height, width)] * batch
        pooled = heads.box_roi_pool(features, list(proposals.unbind(0)), image_sizes)
        class_logits, regression = heads.box_predictor(heads.box_head(pooled))
        classes = class_logits.shape[-1]
        boxes = heads.box_coder.decode_single(regression, proposals.reshape(-1, 4))  # (B * P, 4 * classes)
        boxes = boxes.reshape(batch, count, classes, 4)[:, :, 1:]
        boxes = clip_boxes_to_image(boxes, (height, width)).reshape(batch, -1, 4)
        scores = F.softmax(class_logits, -1).reshape(batch, count, classes)[:, :, 1:].reshape(batch, -1)
        labels = torch.arange(1, classes, device=boxes.device).repeat(batch, count)
        valid = (proposal_valid.repeat_interleave(classes - 1, dim=1) & (scores > heads.score_thresh)
                 & large_enough(boxes, 1e-2))
        proposal = torch.arange(count, device=boxes.device) * (classes - 1)  # candidates: (proposal, class) in rows
        members = {label: proposal + (label - 1) for label in range(1, classes)}
        kept = torch.stack([kept_by_nms(boxes[b], scores[b], labels[b], valid[b], heads.nms_thresh, members)
                            for b in range(batch)])  # NMS per image and class
        top, scores, real = top_kept(scores, kept, heads.detections_per_img)
        boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        return boxes, scores * real, labels.gather(1, top) * real, real

    def masks(self, features: dict[str, Tensor], boxes: Tensor, labels: Tensor, height, width) -> Tensor:
        """Mask probabilities (B, D, H, W) of the detections: torchvision's mask branch and paste_masks_in_image."""
        heads = self.detector.roi_heads
        batch, count = boxes.shape[:2]
        pooled = heads.mask_roi_pool(features, list(boxes.unbind(0)), [(height, width)] * batch)
        logits = heads.mask_predictor(heads.mask_head(pooled))
        chosen = logits.gather(1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, *logits.shape[-2:]))[:, 0]
        return paste_masks(chosen.sigmoid(), boxes.reshape(-1, 4), height, width).reshape(batch, count, height, width)


class OneStageInference(DetectorInference):
    """A torchvision RetinaNet's or FCOS's inference on normalised images (B, 3, H, W) of one size, as
    :class:`TwoStageInference`: boxes, scores, labels (B, D) and whether each of the D detections is one.

    torchvision's ``postprocess_detections``: per level, the scores over the threshold (RetinaNet: the
    class probability; FCOS: its geometric mean with the centre-ness), the best ``topk_candidates`` of
    them, their boxes decoded and clipped; then NMS per class over the levels together and the best
    ``detections_per_img``. Here the candidates under the threshold stay, flagged, in each level's top-k.
    """

    def __init__(self, detector: nn.Module) -> None:
        if not isinstance(detector, (RetinaNet, FCOS)):
            raise ValueError(f"OneStageInference runs torchvision's RetinaNet and FCOS; got {type(detector).__name__}")
        super().__init__(detector)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        height, width = images.shape[-2:]
        return self.detections(*self.features(images), height, width)

    def detections(self, padded: Tensor, features: dict[str, Tensor], height, width) -> tuple[Tensor, ...]:
        """Boxes, scores, labels and validity (B, D) of images of `height` x `width`."""
        detector = self.detector
        maps = list(features.values())
        outputs = detector.head(maps)  # (B, locations * A, C) logits, (B, ..., 4) regression[, (B, ..., 1) centre-ness]
        scores = outputs["cls_logits"].sigmoid()
        if "bbox_ctrness" in outputs:  # FCOS
            scores = torch.sqrt(scores * outputs["bbox_ctrness"].sigmoid())
        batch, _, classes = scores.shape
        anchors = anchors_of(detector, padded, maps)
        per_level = [m.shape[-2] * m.shape[-1] for m in maps]
        per_level = [count * (anchors.shape[0] // sum(per_level)) for count in per_level]  # times anchors per place
        chosen, offset = [], 0
        for level_scores in scores.flatten(1).split([count * classes for count in per_level], dim=1):
            candidates, _, _ = top_kept(level_scores, level_scores > detector.score_thresh, detector.topk_candidates)
            chosen.append(candidates + offset)
            offset = offset + level_scores.shape[1]
        chosen = torch.cat(chosen, dim=1)  # (B, K): flat indices location * classes + class
        scores = scores.flatten(1).gather(1, chosen)
        valid = scores > detector.score_thresh
        places, labels = torch.div(chosen, classes, rounding_mode="floor"), chosen % classes
        regression = outputs["bbox_regression"].gather(1, places[..., None].expand(-1, -1, 4))
        # RetinaNet's BoxCoder decodes (N, 4) codes with decode_single, FCOS's BoxLinearCoder with decode
        decode = detector.box_coder.decode if isinstance(detector, FCOS) else detector.box_coder.decode_single
        boxes = decode(regression.reshape(-1, 4), anchors[places.flatten()])
        boxes = clip_boxes_to_image(boxes.view(batch, -1, 4), (height, width))
        candidates = torch.arange(chosen.shape[1], device=boxes.device)  # any class may be anywhere among them
        members = {label: candidates for label in range(classes)}
        kept = torch.stack([kept_by_nms(boxes[b], scores[b], labels[b], valid[b], detector.nms_thresh, members)
                            for b in range(batch)])  # NMS per image and class
        top, scores, real = top_kept(scores, kept, detector.detections_per_img)
        boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        return boxes, scores * real, labels.gather(1, top) * real, real
