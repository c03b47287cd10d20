"""Detectors around registry backbones: necks that turn a backbone into a feature pyramid, and the
torchvision detectors (Mask R-CNN, Faster R-CNN, RetinaNet, FCOS) built on them.

Necks (what torchvision's detectors call ``backbone``: images -> ordered dict of maps, all with
``out_channels`` channels; the keys name the stride, ``"p2"`` = stride 4 ... ``"p7"`` = stride 128):

- :class:`FeaturePyramid`: torchvision's FPN over the levels of a hierarchical backbone (``pyramid``,
  CARE, hierarchical Couplformer), plus a max-pooled extra level (two-stage detectors) or P6/P7 convs
  (one-stage detectors, as in RetinaNet).
- :class:`SimpleFeaturePyramid`: ViTDet's simple pyramid over the single map of an isotropic backbone
  (``vit``, flat Couplformer): transposed convs up, max pooling down, then 1x1 + 3x3 convs per level.

:func:`build_detector` picks the neck, the levels and the anchors for the detector kind.
:class:`PreparedImages` replaces torchvision's image transform: images arrive already resized (by the
datamodule) and normalised (by the task), so the only work left is batching them with padding.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass
from typing import Any, Literal

from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..backbones import create_backbone
from ..registry import check_choice
from .roi_align import PyramidRoIAlign

DETECTORS = ("maskrcnn", "fasterrcnn", "retinanet", "fcos")
HEAD_NORMS = ("none", "group")
NECKS = ("auto", "fpn", "simple")
TWO_STAGE = ("maskrcnn", "fasterrcnn")
# Strides of the pyramid levels each kind of detector uses; the last one(s) come from the extra block.
TWO_STAGE_STRIDES = (4, 8, 16, 32, 64)  # P2-P5 + max-pooled P6 (Mask R-CNN / Faster R-CNN with FPN)
ONE_STAGE_STRIDES = (8, 16, 32, 64, 128)  # P3-P5 + P6, P7 convs (RetinaNet, FCOS)
# Default anchor size of a level, as a multiple of its stride (torchvision's and Detectron2's choices).
ANCHOR_SIZE_PER_STRIDE = {"maskrcnn": 8, "fasterrcnn": 8, "retinanet": 4, "fcos": 1}


def level_name(stride: int) -> str:
    return f"p{int(round(math.log2(stride)))}"


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when `channels` is not a multiple of 32)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


class FeaturePyramid(nn.Module):
    """FPN over a hierarchical backbone's levels of stride <= the largest wanted, plus extra levels."""

    def __init__(self, backbone: nn.Module, strides: Sequence[int], out_channels: int, one_stage: bool,
                 norm: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        backbone_strides = list(backbone.strides)
        wanted = [s for s in strides if s in backbone_strides]
        extra = [s for s in strides if s > max(backbone_strides)]
        if not wanted or len(wanted) + len(extra) != len(strides):
            raise ValueError(f"FPN neck: the backbone gives strides {backbone_strides}; the detector needs levels at "
                             f"strides {list(strides)} (the ones above {max(backbone_strides)} are added by the neck)")
        self.in_levels = [backbone_strides.index(s) for s in wanted]
        in_channels = [backbone.out_channels[i] for i in self.in_levels]
        if one_stage:
            if len(extra) != 2:
                raise ValueError(f"FPN neck: a one-stage detector adds 2 levels above the backbone's; got strides {strides}")
            extra_block = LastLevelP6P7(out_channels, out_channels)
        else:
            if len(extra) != 1:
                raise ValueError(f"FPN neck: a two-stage detector adds 1 level above the backbone's; got strides {strides}")
            extra_block = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block,
                                         norm_layer=group_norm if norm else None)
        self.names = [level_name(s) for s in strides]
        self.strides = tuple(strides)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        levels = self.backbone.forward_pyramid(images)
        features = self.fpn(OrderedDict((str(i), levels[i]) for i in self.in_levels))
        return OrderedDict(zip(self.names, features.values()))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over the last map of an isotropic backbone (stride s).

    Level of stride t: t < s: log2(s / t) transposed 2x2 convs (LayerNorm + GELU between them); t = s: the
    map itself; t > s: t / s max pooling. Each level then gets a 1x1 conv to `out_channels` and a 3x3 conv,
    both followed by LayerNorm. Levels above the backbone-derived ones come from max pooling (two-stage) or
    from P6/P7 convs (one-stage), as in the FPN neck.
    """

    def __init__(self, backbone: nn.Module, strides: Sequence[int], out_channels: int, one_stage: bool,
                 norm: bool = True) -> None:
        super().__init__()  # `norm`: ViTDet's simple pyramid always normalises (LayerNorm); kept for one signature
        self.backbone = backbone
        in_stride, channels = backbone.strides[-1], backbone.out_channels[-1]
        built = strides[:-2] if one_stage else strides[:-1]
        self.scales = nn.ModuleList()
        for stride in built:
            layers: list[nn.Module] = []
            dim = channels
            if stride < in_stride:
                steps = int(round(math.log2(in_stride / stride)))
                if 2**steps * stride != in_stride:
                    raise ValueError(f"simple pyramid: stride {stride} is not the backbone's stride {in_stride} / 2^k")
                for step in range(steps):
                    layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
                    dim //= 2
                    if step < steps - 1:
                        layers += [LayerNorm2d(dim), nn.GELU()]
            elif stride > in_stride:
                layers.append(nn.MaxPool2d(kernel_size=stride // in_stride, stride=stride // in_stride))
            layers += [
                nn.Conv2d(dim, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False), LayerNorm2d(out_channels),
            ]
            self.scales.append(nn.Sequential(*layers))
        self.extra = LastLevelP6P7(out_channels, out_channels) if one_stage else LastLevelMaxPool()
        self.names = [level_name(s) for s in strides]
        self.strides = tuple(strides)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        top = self.backbone.forward_pyramid(images)[-1]
        results = [scale(top) for scale in self.scales]
        names = self.names[: len(results)]
        results, names = self.extra(results, [top], names)
        return OrderedDict(zip(self.names, results))


class PreparedImages(GeneralizedRCNNTransform):
    """torchvision's detection transform minus its resizing and normalisation.

    lattn resizes in the datamodule (so boxes and masks are augmented with the image) and normalises in
    the task (``LattnTask.normalize``, as for every task); this keeps the batching (padding to a multiple of
    `size_divisible`) and the post-processing (mask pasting at the input size).
    """

    def __init__(self, size_divisible: int) -> None:
        super().__init__(min_size=1, max_size=1, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                         size_divisible=size_divisible)

    def normalize(self, image: Tensor) -> Tensor:
        return image

    def resize(self, image: Tensor, target: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any] | None]:
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size_divisible={self.size_divisible})"


@dataclass(frozen=True)
class DetectorOptions:
    """The detector's architecture beyond its kind, classes, backbone and attention mechanism.

    Args:
        neck: ``fpn`` (hierarchical backbones), ``simple`` (ViTDet, isotropic ones) or ``auto`` (fpn when
            the backbone gives several levels, simple when it gives one).
        neck_channels: channels of every pyramid level (Mask R-CNN: 256).
        anchor_sizes: one anchor size (pixels) per level; default ``k * stride`` with k 8 (Mask/Faster
            R-CNN), 4 (RetinaNet, with 3 octave scales per level) or 1 (FCOS).
        anchor_aspect_ratios: anchor height/width ratios (not FCOS, which is anchor-free).
        box_head_dim: width of the R-CNN box head (2 FC layers; Mask R-CNN: 1024).
        mask_head_channels: width of the mask head (4 convs; Mask R-CNN: 256).
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss (Mask R-CNN: 256).
        box_batch_size_per_image: proposals sampled per image for the box-head loss (Mask R-CNN: 512).
        rpn_train_proposals: RPN proposals kept in training, per level before NMS and per image after it
            (torchvision: 2000; at test time 1000 as in torchvision). Small images with few objects need
            far fewer, and the RPN's share of the step shrinks with them.
        score_threshold: detections below this score are dropped before evaluation (COCO practice: 0.05).
        detections_per_image: the most detections kept per image (COCO: 100).
        head_norm: ``none`` (torchvision's Mask R-CNN) or ``group``: GroupNorm in the FPN and the R-CNN
            heads, whose box head then has 4 convs before its FC layer (Mask R-CNN "v2", Detectron2's GN
            models); it trains faster and is what training without pretrained weights needs.
    """

    # Typed fields with defaults, the shape of every options dataclass (StereoNetOptions, ...): on purpose.
    neck: Literal["auto", "fpn", "simple"] = "auto"
    neck_channels: int = 256
    anchor_sizes: tuple[float, ...] | None = None
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_train_proposals: int = 2000
    score_threshold: float = 0.05
    detections_per_image: int = 100
    head_norm: Literal["none", "group"] = "none"

    @classmethod
    def of(cls, options: DetectorOptions | Mapping[str, Any] | None) -> DetectorOptions:
        """`options` as DetectorOptions (a checkpoint stores them as a plain dict)."""
        if options is None:
            return cls()
        return options if isinstance(options, cls) else cls(**options)


def build_detector(
    detector: str,
    num_classes: int,
    backbone: str,
    backbone_options: dict[str, Any] | None = None,
    options: DetectorOptions | None = None,
) -> nn.Module:
    """A torchvision detector of kind `detector` on the registry backbone `backbone`.

    Args:
        detector: ``maskrcnn`` (boxes + masks), ``fasterrcnn``, ``retinanet`` or ``fcos`` (boxes).
        num_classes: object classes, without the background (the detector gets ``num_classes + 1``).
        backbone: registered backbone with a feature pyramid.
        backbone_options: the backbone's own options (its ``attention`` included).
        options: the rest of the architecture (:class:`DetectorOptions`).
    """
    options = DetectorOptions.of(options)
    (neck, neck_channels, anchor_sizes, anchor_aspect_ratios, box_head_dim, mask_head_channels,
     rpn_batch_size_per_image, box_batch_size_per_image, rpn_train_proposals, score_threshold,
     detections_per_image, head_norm) = astuple(options)
    check_choice("detector", detector, DETECTORS)
    check_choice("head_norm", head_norm, HEAD_NORMS)
    norm = head_norm == "group"
    check_choice("neck", neck, NECKS)
    feature_extractor = create_backbone(backbone, **(backbone_options or {}))
    for required in ("forward_pyramid", "strides", "out_channels"):
        if not hasattr(feature_extractor, required):
            raise ValueError(f"backbone {backbone!r} has no {required}; detection needs a backbone with a feature "
                             "pyramid (forward_pyramid, strides, out_channels)")
    feature_extractor.remove_classifier()
    one_stage = detector not in TWO_STAGE
    strides = ONE_STAGE_STRIDES if one_stage else TWO_STAGE_STRIDES
    if neck == "auto":
        neck = "fpn" if len(feature_extractor.strides) > 1 else "simple"
    neck_class = FeaturePyramid if neck == "fpn" else SimpleFeaturePyramid
    features = neck_class(feature_extractor, strides, neck_channels, one_stage, norm)

    if anchor_sizes is None:
        anchor_sizes = [ANCHOR_SIZE_PER_STRIDE[detector] * s for s in strides]
    if len(anchor_sizes) != len(strides):
        raise ValueError(f"anchor_sizes needs one size per level (strides {list(strides)}); got {list(anchor_sizes)}")
    if detector == "retinanet":  # three octave scales per level, as in the RetinaNet paper
        sizes = tuple(tuple(a * 2 ** (k / 3) for k in range(3)) for a in anchor_sizes)
    else:
        sizes = tuple((a,) for a in anchor_sizes)
    ratios = (1.0,) if detector == "fcos" else tuple(anchor_aspect_ratios)
    anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))

    classes = num_classes + 1  # label 0 is the background
    common = {"min_size": 1, "max_size": 1}  # unused: PreparedImages replaces the transform below
    if detector in TWO_STAGE:
        roi_levels = features.names[:-1]  # the pooled extra level only feeds the RPN, as in torchvision's FPN models
        roi_strides = strides[: len(roi_levels)]
        box_pool = PyramidRoIAlign(roi_levels, roi_strides, output_size=7, sampling_ratio=2)
        kwargs = dict(
            rpn_anchor_generator=anchors, box_roi_pool=box_pool,
            box_head=FastRCNNConvFCHead((neck_channels, 7, 7), [neck_channels] * 4, [box_head_dim], norm_layer=group_norm)
            if norm else TwoMLPHead(neck_channels * 7 * 7, box_head_dim),
            box_predictor=FastRCNNPredictor(box_head_dim, classes),
            rpn_batch_size_per_image=rpn_batch_size_per_image, box_batch_size_per_image=box_batch_size_per_image,
            rpn_pre_nms_top_n_train=rpn_train_proposals, rpn_post_nms_top_n_train=rpn_train_proposals,
            box_score_thresh=score_threshold, box_detections_per_img=detections_per_image, **common,
        )
        if detector == "maskrcnn":
            model = MaskRCNN(
                features, num_classes=None,
                mask_roi_pool=PyramidRoIAlign(roi_levels, roi_strides, output_size=14, sampling_ratio=2),
                mask_head=MaskRCNNHeads(neck_channels, (mask_head_channels,) * 4, dilation=1,
                                        norm_layer=group_norm if norm else None),
                mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, classes), **kwargs,
            )
        else:
            model = FasterRCNN(features, num_classes=None, **kwargs)
    elif detector == "retinanet":
        model = RetinaNet(features, classes, anchor_generator=anchors, score_thresh=score_threshold,
                          detections_per_img=detections_per_image, **common)
    else:
        model = FCOS(features, classes, anchor_generator=anchors, score_thresh=score_threshold,
                     detections_per_img=detections_per_image, **common)
    size_divisible = max(32, *feature_extractor.strides)
    model.transform = PreparedImages(size_divisible)
    return model
