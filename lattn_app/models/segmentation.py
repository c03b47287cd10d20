"""Semantic segmentation networks on registry backbones: Semantic FPN, and a simple pyramid for plain ViTs.

:class:`Segmenter` turns images (B, 3, H, W) into class logits (B, K, H, W) at the input size:

- **Semantic FPN** (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019, its semantic branch;
  the head CARE and its peers use on ADE20K) over the ``forward_pyramid`` levels of a hierarchical
  backbone (``pyramid*``, ``care_s*``, ``couplformer_hierarchical``, any backbone with several levels):
  an FPN with ``neck_channels`` (256) channels per level; then, per level of stride s, log2(s / 4)
  stages (at least one) of 3 x 3 conv -> GroupNorm -> ReLU, each followed by a 2x bilinear upsampling
  while the map is coarser than stride 4; the levels are summed at stride 4, then dropout, a 1 x 1
  classifier and a 4x bilinear upsampling to the input size.
- **simple pyramid** for isotropic backbones with one map (``vit*``, flat ``couplformer``): ViTDet's
  simple feature pyramid (transposed convolutions up, max pooling down, 1 x 1 and 3 x 3 convolutions
  with LayerNorm; :class:`~lattn_app.models.detection.SimpleFeaturePyramid`) builds levels at strides
  4-32 from the single map, followed by the same per-level stages and classifier.

Images of any size run: they are padded at the bottom and right to a multiple of the coarsest stride
(at least 32) and the logits are cropped back, so the prediction has the input's size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from ..backbones import create_backbone
from ..registry import check_choice
from .detection import SimpleFeaturePyramid, group_norm

HEADS = ("auto", "fpn", "simple")
NORMS = ("group", "batch", "none")
SIMPLE_PYRAMID_STRIDES = (4, 8, 16, 32, 64)  # the stride-64 max-pooled level of the detection neck is not used


@dataclass(frozen=True)
class SegmenterOptions:
    """The segmentation network beyond its classes, backbone and attention mechanism.

    Args:
        head: ``fpn`` (Semantic FPN over a hierarchical backbone's levels), ``simple`` (a simple pyramid
            from the single map of an isotropic backbone) or ``auto`` (fpn when the backbone gives
            several levels, simple when it gives one).
        neck_channels: channels of every FPN (or simple pyramid) level (Semantic FPN: 256).
        head_channels: channels of the per-level upsampling stages (Semantic FPN: 128).
        norm: normalisation in the upsampling stages (and the FPN): ``group`` (GroupNorm with 32
            groups, Kirillov et al.), ``batch`` (mmsegmentation's SyncBN setting) or ``none``.
        dropout: dropout before the classifier (mmsegmentation: 0.1).
    """

    head: Literal["auto", "fpn", "simple"] = "auto"
    neck_channels: int = 256
    head_channels: int = 128
    norm: Literal["group", "batch", "none"] = "group"
    dropout: float = 0.1

    @classmethod
    def of(cls, options: SegmenterOptions | Mapping[str, Any] | None) -> SegmenterOptions:
        """`options` as SegmenterOptions (a checkpoint stores them as a plain dict)."""
        if options is None:
            return cls()
        return options if isinstance(options, cls) else cls(**options)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return group_norm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ScaleHead(nn.Module):
    """One level's path to the common stride: conv 3x3 -> norm -> ReLU stages, each followed by a 2x upsampling."""

    def __init__(self, in_channels: int, channels: int, stride: int, common_stride: int, norm: str) -> None:
        super().__init__()
        upsamplings = int(round(math.log2(stride / common_stride)))
        layers: list[nn.Module] = []
        for index in range(max(1, upsamplings)):
            layers += [nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1, bias=norm == "none"),
                       _norm(norm, channels), nn.ReLU(inplace=True)]
            if upsamplings > 0:
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Segmenter(nn.Module):
    """Backbone + (FPN or simple pyramid) + Semantic FPN head (see the module docstring)."""

    def __init__(self, num_classes: int, backbone: str, backbone_options: dict[str, Any] | None = None,
                 options: SegmenterOptions | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        options = SegmenterOptions.of(options)
        check_choice("net.head", options.head, HEADS)
        check_choice("net.norm", options.norm, NORMS)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        if not 0 <= options.dropout < 1:
            raise ValueError(f"net.dropout must be in [0, 1); got {options.dropout}")
        self.backbone = create_backbone(backbone, **(backbone_options or {}))
        for required in ("forward_pyramid", "strides", "out_channels"):
            if not hasattr(self.backbone, required):
                raise ValueError(f"backbone {backbone!r} has no {required}; segmentation needs a backbone with a "
                                 "feature pyramid (forward_pyramid, strides, out_channels)")
        self.backbone.remove_classifier()
        strides = list(self.backbone.strides)
        head = options.head if options.head != "auto" else ("fpn" if len(strides) > 1 else "simple")
        self.head_kind = head
        if head == "fpn":
            if len(strides) < 2:
                raise ValueError(f"net.head fpn needs a backbone with several pyramid levels; {backbone!r} gives one "
                                 f"(stride {strides[0]}): use net.head simple")
            self.neck = FeaturePyramidNetwork(list(self.backbone.out_channels), options.neck_channels,
                                              norm_layer=group_norm if options.norm == "group" else None)
            self.level_strides = strides
        else:
            if len(strides) != 1:
                raise ValueError(f"net.head simple builds its pyramid from one map; {backbone!r} gives {len(strides)} "
                                 "levels: use net.head fpn")
            self.neck = SimpleFeaturePyramid(self.backbone, SIMPLE_PYRAMID_STRIDES, options.neck_channels,
                                             one_stage=False)
            self.level_strides = list(SIMPLE_PYRAMID_STRIDES[:-1])
        self.common_stride = min(self.level_strides)
        self.scale_heads = nn.ModuleList(
            ScaleHead(options.neck_channels, options.head_channels, s, self.common_stride, options.norm)
            for s in self.level_strides
        )
        self.dropout = nn.Dropout2d(options.dropout) if options.dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(options.head_channels, num_classes, kernel_size=1)
        self.size_multiple = max(32, *strides, *self.level_strides)

    def levels(self, images: Tensor) -> list[Tensor]:
        """The pyramid the head reads: FPN outputs (hierarchical) or simple-pyramid levels (isotropic)."""
        if self.head_kind == "fpn":
            maps = self.backbone.forward_pyramid(images)
            return list(self.neck(OrderedDict((str(i), m) for i, m in enumerate(maps))).values())
        return list(self.neck(images).values())[: len(self.level_strides)]

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W), any H and W -> logits (B, num_classes, H, W)."""
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        levels = self.levels(images)
        fused = None
        for level, head in zip(levels, self.scale_heads):
            x = head(level)
            if fused is None:
                fused = x
            else:
                if x.shape[-2:] != fused.shape[-2:]:  # odd grids of padded backbones
                    x = F.interpolate(x, size=fused.shape[-2:], mode="bilinear", align_corners=False)
                fused = fused + x
        logits = self.classifier(self.dropout(fused))
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width]
