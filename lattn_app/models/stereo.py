"""The stereo network: PSMNet with attention over 1/4-resolution features (Efficient Attention, §5).

    left, right (B, 3, H, W), normalised
      -> backbone pyramid of both views (one batched pass), fused into one stride-4 map per view
      -> attention layers over the stride-4 tokens: self-attention within each view, then
         cross-attention between the views (queries from one view, keys/values from the other)
      -> cost volume over disparities 0 .. max_disparity/4 - 1 (concatenation or group-wise correlation)
      -> 3D convolutions and stacked 3D hourglasses; each hourglass gives a cost volume
      -> ``upsampling: trilinear`` (PSMNet's): trilinear upsampling to (max_disparity, H, W), softmax over
         disparity, soft-argmin at full resolution; ``upsampling: convex``: the cost upsampled along
         disparity only, soft-argmin at 1/4 resolution, then RAFT's convex upsampling (each full-resolution
         pixel a learned convex combination of its 3 x 3 coarse neighbours, weights from the left features)
    = one full-resolution disparity map per hourglass (training supervises all; inference uses the last).

``convex`` is lattn's own choice for speed: the full-resolution volume of ``trilinear`` (and its backward)
is 30% of a training step of the main job on a 2-core CPU, and upsampling a disparity map by a learned
convex combination keeps depth edges sharp where bilinear upsampling would blur them (Teed and Deng, RAFT,
ECCV 2020, §3.3).

Images of any size work: they are padded on the bottom/right to a multiple of :attr:`StereoNet.size_multiple`
and the prediction is cropped back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import astuple, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attention_info
from ..backbones import create_backbone
from ..backbones.base import maps_to_tokens, tokens_to_maps
from ..backbones.blocks import TransformerBlock, mixer_options
from ..registry import BACKBONES, check_choice

COST_VOLUMES = ("gwc", "concat")
UPSAMPLINGS = ("trilinear", "convex")


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(True)
    )


def conv3d_bn(in_channels: int, out_channels: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv3d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm3d(out_channels)]
    if relu:
        layers.append(nn.ReLU(True))
    return nn.Sequential(*layers)


def deconv3d_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """Doubles depth, height and width (the inverse of a stride-2 conv3d_bn on even sizes)."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, 3, 2, 1, output_padding=1, bias=False),
        nn.BatchNorm3d(out_channels),
    )


class FeatureFusion(nn.Module):
    """Backbone pyramid levels -> one stride-4 feature map (each level projected, upsampled, summed)."""

    def __init__(self, in_channels: list[int], strides: list[int], dim: int) -> None:
        super().__init__()
        if 4 not in strides and min(strides) < 4:
            raise ValueError(f"the stereo network needs backbone features at stride >= 4; got strides {strides}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.smooth = nn.Sequential(conv_bn_relu(dim, dim), nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, levels: list[Tensor], size: tuple[int, int]) -> Tensor:
        fused = 0
        for lateral, level in zip(self.lateral, levels):
            mapped = lateral(level)
            if mapped.shape[-2:] != size:
                mapped = F.interpolate(mapped, size=size, mode="bilinear", align_corners=False)
            fused = fused + mapped
        return self.smooth(fused)


class StereoAttention(nn.Module):
    """Attention over the stride-4 features of both views: self-attention, then cross-attention.

    Each layer is a self-attention block (within each view) followed, when `cross_attention` is on, by a
    cross-attention block (left queries attend to right keys/values and vice versa; the block's
    weights are shared by the two directions). Both views go through as one batch.
    """

    def __init__(
        self, dim: int, num_heads: int, depth: int, attention: str, attention_options: dict[str, Any] | None,
        grid: tuple[int, int], cross_attention: bool = True, rope: bool = False,
    ) -> None:
        super().__init__()
        if cross_attention and not attention_info(attention).cross:
            raise ValueError(
                f"stereo cross-attention needs a mechanism that supports cross-attention; {attention!r} does "
                f"not (set cross_attention: false, or choose one that lattn list marks CROSS yes)"
            )
        options = mixer_options(attention, attention_options, grid, 0, rope=rope)
        # Self and cross blocks alternate, so they are layers 2i and 2i + 1 (performer draws per layer).
        self.self_blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, attention, options, layer_index=2 * i) for i in range(depth)
        )
        self.cross_blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, attention, options, layer_index=2 * i + 1)
            for i in range(depth if cross_attention else 0)
        )

    def forward(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        batch, hw = left.shape[0], (left.shape[-2], left.shape[-1])
        x = maps_to_tokens(torch.cat([left, right]))
        for index, self_block in enumerate(self.self_blocks):
            x = self_block(x, hw)
            if self.cross_blocks:
                other_view = torch.cat([x[batch:], x[:batch]])
                x = self.cross_blocks[index](x, hw, other_view, hw)
        maps = tokens_to_maps(x, hw)
        return maps[:batch], maps[batch:]


def build_cost_volume(left: Tensor, right: Tensor, num_disparities: int, kind: str, groups: int) -> Tensor:
    """(B, C, H, W) features of both views -> cost volume over disparities 0 .. num_disparities - 1.

    ``gwc``: group-wise correlation, (B, groups, D, H, W): the mean product of the channels of each
    group of left[x] and right[x - d]. ``concat``: PSMNet's concatenation, (B, 2C, D, H, W). Pixels with
    x < d (no partner in the right view) are zero.
    """
    batch, channels, height, width = left.shape
    if kind == "gwc":
        if channels % groups:
            raise ValueError(f"group-wise correlation: feature channels {channels} must divide by groups={groups}")
        volume = left.new_zeros(batch, groups, num_disparities, height, width)
        left_groups = left.view(batch, groups, channels // groups, height, width)
        right_groups = right.view(batch, groups, channels // groups, height, width)
        for d in range(num_disparities):
            if d == 0:
                volume[:, :, 0] = (left_groups * right_groups).mean(dim=2)
            else:
                volume[:, :, d, :, d:] = (left_groups[..., d:] * right_groups[..., :-d]).mean(dim=2)
        return volume
    volume = left.new_zeros(batch, 2 * channels, num_disparities, height, width)
    for d in range(num_disparities):
        if d == 0:
            volume[:, :channels, 0], volume[:, channels:, 0] = left, right
        else:
            volume[:, :channels, d, :, d:] = left[..., d:]
            volume[:, channels:, d, :, d:] = right[..., :-d]
    return volume


class Hourglass3D(nn.Module):
    """Encoder-decoder over (disparity, height, width) at 1/2 and 1/4 of the volume's size, with skips."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.down1 = nn.Sequential(conv3d_bn(channels, 2 * channels, stride=2), conv3d_bn(2 * channels, 2 * channels))
        self.down2 = nn.Sequential(conv3d_bn(2 * channels, 2 * channels, stride=2), conv3d_bn(2 * channels, 2 * channels))
        self.up1 = deconv3d_bn(2 * channels, 2 * channels)
        self.up2 = deconv3d_bn(2 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        half = self.down1(x)
        quarter = self.down2(half)
        half = F.relu(self.up1(quarter) + half)
        return F.relu(self.up2(half) + x)


def disparity_regression(cost: Tensor) -> Tensor:
    """Soft-argmin: (B, D, H, W) matching scores -> expected disparity sum_d d * softmax(scores)_d."""
    probabilities = F.softmax(cost, dim=1)
    disparities = torch.arange(cost.shape[1], device=cost.device, dtype=probabilities.dtype)
    return (probabilities * disparities.view(1, -1, 1, 1)).sum(dim=1)


class ConvexUpsampler(nn.Module):
    """A coarse disparity map (B, h, w) at 1/`factor` -> (B, factor h, factor w), sharp at depth edges (RAFT's).

    Each fine pixel is a convex combination (softmax weights) of the 3 x 3 coarse disparities around its
    coarse pixel, multiplied by `factor`; the weights are predicted from the coarse features.
    torchvision's RAFT does the same combination in a private helper
    (``torchvision.models.optical_flow._utils.upsample_flow``); lattn keeps its own because that module is
    not public API and takes the softmax on every call, where :meth:`mask` here is computed once and reused
    by every hourglass output.
    """

    def __init__(self, channels: int, factor: int = 4) -> None:
        super().__init__()
        self.factor = factor
        self.weights = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(True),
                                     nn.Conv2d(2 * channels, 9 * factor * factor, 1))

    def mask(self, features: Tensor) -> Tensor:
        """Softmax combination weights (B, 9, factor, factor, h, w) from the coarse features (B, C, h, w)."""
        batch, _, height, width = features.shape
        # RAFT scales the logits by 0.25 so that the untrained upsampler starts close to uniform weights.
        logits = 0.25 * self.weights(features)
        return logits.view(batch, 9, self.factor, self.factor, height, width).softmax(dim=1)

    def forward(self, disparity: Tensor, mask: Tensor) -> Tensor:
        batch, height, width = disparity.shape
        padded = F.pad(self.factor * disparity, (1, 1, 1, 1))  # zero outside, as the fine map's border pixels see it
        # The 3 x 3 neighbours as 9 shifted views (row by row): what F.unfold gives, in ops every exporter knows.
        neighbours = torch.stack([padded[:, dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], dim=1)
        neighbours = neighbours.view(batch, 9, 1, 1, height, width)
        fine = (mask * neighbours).sum(dim=1)  # (B, factor, factor, h, w)
        return fine.permute(0, 3, 1, 4, 2).reshape(batch, self.factor * height, self.factor * width)


class LocalRefinement(nn.Module):
    """Full-resolution refinement: a residual from a local correlation around the current disparity.

    Both views get small full-resolution features (two 3 x 3 convolutions, shared); the right view's are
    sampled at x - d - delta for delta in -radius .. radius around the current disparity d, correlated with
    the left's, and a small dilated convolution head turns the 2 radius + 1 correlations, the left features
    and d into a correction added to d. The 1/4-resolution volume cannot place a match to the pixel; this
    local search at full resolution can (the idea of the refinement steps of RAFT-Stereo and CREStereo).
    The sampling positions and the head's input use d without its gradient; the sum keeps it.
    """

    def __init__(self, channels: int = 12, radius: int = 2) -> None:
        super().__init__()
        self.radius = radius
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(True),
                                      nn.Conv2d(channels, channels, 3, padding=1))
        hidden = channels
        self.head = nn.Sequential(
            nn.Conv2d(2 * radius + 1 + channels + 1, hidden, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(True),
            nn.Conv2d(hidden, hidden, 3, padding=4, dilation=4), nn.ReLU(True),
            nn.Conv2d(hidden, 1, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)  # starts as the identity: the coarse disparity unchanged
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, left: Tensor, right: Tensor, disparity: Tensor) -> Tensor:
        batch, _, height, width = left.shape
        features = self.features(torch.cat([left, right]))
        left_features, right_features = features[:batch], features[batch:]
        guide = disparity.detach()
        xs = torch.arange(width, device=left.device, dtype=left.dtype).view(1, 1, width)
        ys = torch.arange(height, device=left.device, dtype=left.dtype).view(1, height, 1).expand(batch, height, width)
        y_grid = 2 * ys / max(height - 1, 1) - 1
        correlations = []
        for delta in range(-self.radius, self.radius + 1):
            x_grid = 2 * (xs - guide - delta) / max(width - 1, 1) - 1
            grid = torch.stack([x_grid, y_grid], dim=-1)
            warped = F.grid_sample(right_features, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            correlations.append((left_features * warped).mean(dim=1))
        inputs = torch.cat([torch.stack(correlations, dim=1), left_features,
                            guide.unsqueeze(1) / 64], dim=1)  # a fixed scale: max_disparity may change later
        return disparity + self.head(inputs).squeeze(1)


def pad_pair(left: Tensor, right: Tensor, multiple: int) -> tuple[Tensor, Tensor]:
    """Both views padded on the bottom and right to a multiple of `multiple` (predictions are cropped back)."""
    if left.shape != right.shape:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} views must have the same shape")
    pad_h, pad_w = -left.shape[-2] % multiple, -left.shape[-1] % multiple
    if pad_h or pad_w:
        left, right = F.pad(left, (0, pad_w, 0, pad_h)), F.pad(right, (0, pad_w, 0, pad_h))
    return left, right


def check_max_disparity(max_disparity: Any) -> int:
    """`max_disparity` if it is a positive multiple of 16, else a ValueError saying why it must be."""
    if isinstance(max_disparity, bool) or not isinstance(max_disparity, int) or max_disparity < 16 or max_disparity % 16:
        raise ValueError(
            f"max_disparity must be a positive multiple of 16 (the 1/4-resolution volume is halved twice "
            f"by the hourglasses); got {max_disparity!r}"
        )
    return max_disparity


@dataclass(frozen=True)
class StereoNetOptions:
    """The stereo network's architecture beyond its backbone and attention mechanism.

    Args:
        attention_depth: self-attention (+ cross-attention) layers over the 1/4 features; 0: none.
        attention_heads: heads of those layers.
        cross_attention: also attend from each view to the other (the mechanism must support it).
        rope: 2D rotary position embedding in the attention layers (mechanisms that support it).
        feature_dim: channels of the fused stride-4 features.
        cost_volume: ``gwc`` (group-wise correlation) or ``concat`` (PSMNet's concatenation).
        groups: correlation groups of ``gwc``.
        volume_channels: channels of the 3D aggregation network.
        num_hourglasses: stacked 3D hourglasses (PSMNet: 3); each one's output is supervised.
        img_size: training image size; used by fixed-grid mechanisms (linformer, mixer) only.
        upsampling: ``trilinear`` (PSMNet's full-resolution volume) or ``convex`` (soft-argmin at 1/4
            resolution, then learned convex upsampling: faster, see the module docstring).
        refinement: refine the final map at full resolution from a local correlation around it
            (:class:`LocalRefinement`); off: PSMNet's outputs as they are.
    """

    attention_depth: int = 1
    attention_heads: int = 4
    cross_attention: bool = True
    rope: bool = False
    feature_dim: int = 64
    cost_volume: Literal["gwc", "concat"] = "gwc"
    groups: int = 16
    volume_channels: int = 32
    num_hourglasses: int = 3
    img_size: tuple[int, int] = (256, 512)
    upsampling: Literal["trilinear", "convex"] = "trilinear"
    refinement: bool = False

    @classmethod
    def of(cls, options: StereoNetOptions | Mapping[str, Any] | None) -> StereoNetOptions:
        """`options` as StereoNetOptions (a checkpoint stores them as a plain dict)."""
        if options is None:
            return cls()
        return options if isinstance(options, cls) else cls(**options)


class StereoNet(nn.Module):
    """PSMNet-style stereo network with registry backbone and attention (see the module docstring).

    Args:
        max_disparity: largest disparity the cost volume covers (a multiple of 16).
        backbone: registered backbone giving stride-4 features (``lattn list backbones``); every level
            of its pyramid is fused into one stride-4 map.
        backbone_options: the backbone's own options; its ``attention`` defaults to `attention`.
        attention: registered mechanism of the stereo attention layers (``lattn list attention``).
        attention_options: that mechanism's own options.
        options: the rest of the architecture (:class:`StereoNetOptions`).
    """

    def __init__(
        self,
        max_disparity: int = 192,
        backbone: str = "pyramid_tiny",
        backbone_options: dict[str, Any] | None = None,
        attention: str = "efficient",
        attention_options: dict[str, Any] | None = None,
        options: StereoNetOptions | None = None,
    ) -> None:
        options = StereoNetOptions.of(options)
        (attention_depth, attention_heads, cross_attention, rope, feature_dim, cost_volume, groups, volume_channels,
         num_hourglasses, img_size, upsampling, refinement) = astuple(options)
        super().__init__()
        check_choice("stereo: cost_volume", cost_volume, COST_VOLUMES)
        check_choice("stereo: upsampling", upsampling, UPSAMPLINGS)
        check_max_disparity(max_disparity)
        if num_hourglasses < 1:
            raise ValueError(f"num_hourglasses must be at least 1; got {num_hourglasses}")
        self.max_disparity = max_disparity
        self.cost_volume = cost_volume
        self.groups = groups

        self.options = options
        built = dict(backbone_options or {})
        built.setdefault("num_classes", 0)
        entry = BACKBONES.get(backbone)
        if entry.accepts("attention"):  # the backbone's mechanism is the stereo layers' unless set apart
            built.setdefault("attention", attention)
            if attention_options is not None and built["attention"] == attention:
                built.setdefault("attention_options", attention_options)
        if entry.accepts("img_size"):
            built.setdefault("img_size", tuple(img_size))
        self.backbone = create_backbone(backbone, **built)
        self.backbone.remove_classifier()
        strides = self.backbone.strides
        # Padding makes the stride-4 grid divisible by 4 (the hourglasses halve it twice) and fits the backbone.
        self.size_multiple = max(16, max(strides))
        self.fusion = FeatureFusion(self.backbone.out_channels, strides, feature_dim)
        grid = (img_size[0] // 4, img_size[1] // 4)
        self.attention = (
            StereoAttention(feature_dim, attention_heads, attention_depth, attention, attention_options, grid,
                            cross_attention, rope)
            if attention_depth > 0 else None
        )
        volume_in = groups if cost_volume == "gwc" else 2 * feature_dim
        c = volume_channels
        self.volume_stem = nn.Sequential(conv3d_bn(volume_in, c), conv3d_bn(c, c))
        self.volume_residual = nn.Sequential(conv3d_bn(c, c), conv3d_bn(c, c, relu=False))
        self.hourglasses = nn.ModuleList(Hourglass3D(c) for _ in range(num_hourglasses))
        self.classifiers = nn.ModuleList(
            nn.Sequential(conv3d_bn(c, c), nn.Conv3d(c, 1, 3, 1, 1, bias=False)) for _ in range(num_hourglasses)
        )
        self.upsampler = ConvexUpsampler(feature_dim) if upsampling == "convex" else None
        self.refinement = LocalRefinement() if refinement else None
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        """Stride-4 features of both views after the attention layers."""
        size = (left.shape[-2] // 4, left.shape[-1] // 4)
        levels = self.backbone.forward_pyramid(torch.cat([left, right]))
        fused = self.fusion(levels, size)
        # Slices, not fused.chunk(2): torch.export keeps the batch size symbolic through a slice.
        left_features, right_features = fused[: left.shape[0]], fused[left.shape[0]:]
        if self.attention is not None:
            left_features, right_features = self.attention(left_features, right_features)
        return left_features, right_features

    def forward(self, left: Tensor, right: Tensor) -> list[Tensor]:
        """Normalised views (B, 3, H, W) -> disparity maps (B, H, W), one per hourglass (last = final).

        In eval mode only the final map is upsampled and regressed (the earlier ones are not needed).
        """
        height, width = left.shape[-2:]
        left, right = pad_pair(left, right, self.size_multiple)
        left_features, right_features = self.features(left, right)
        volume = build_cost_volume(left_features, right_features, self.max_disparity // 4, self.cost_volume,
                                   self.groups)
        # channels-last 3D tensors take oneDNN's faster 3D convolution kernels on the CPU (and on CUDA).
        x = self.volume_stem(volume.contiguous(memory_format=torch.channels_last_3d))
        x = self.volume_residual(x) + x
        mask = self.upsampler.mask(left_features) if self.upsampler is not None else None
        outputs, cost = [], None
        for index, (hourglass, classifier) in enumerate(zip(self.hourglasses, self.classifiers)):
            x = hourglass(x)
            cost = classifier(x) if cost is None else classifier(x) + cost
            if not self.training and index < len(self.hourglasses) - 1:
                continue
            if mask is None:
                full = F.interpolate(cost, size=(self.max_disparity, left.shape[-2], left.shape[-1]), mode="trilinear",
                                     align_corners=False)
                disparity = disparity_regression(full.squeeze(1))
            else:  # disparity bins upsampled at 1/4 resolution; the 1/4 map (in full-resolution pixels) upsampled
                fine_bins = F.interpolate(cost, size=(self.max_disparity, *cost.shape[-2:]), mode="trilinear",
                                          align_corners=False)
                disparity = self.upsampler(disparity_regression(fine_bins.squeeze(1)) / 4, mask)
            if self.refinement is not None and index == len(self.hourglasses) - 1:
                disparity = self.refinement(left, right, disparity)
            outputs.append(disparity[:, :height, :width])
        return outputs
