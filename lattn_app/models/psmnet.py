"""PSMNet (Chang & Chen, CVPR 2018, "Pyramid Stereo Matching Network"), stacked-hourglass version, and EA-PSMNet.

PSMNet as its authors published it (github.com/JiaRenChang/PSMNet, ``models/stackhourglass.py``),
written for lattn; its parameter count, :data:`PSMNET_PARAMETERS`, is the authors' network's:

    left, right (B, 3, H, W), normalised, padded bottom/right to a multiple of 16
      -> feature extractor, applied to each view (weights shared):
         firstconv: three 3x3 conv-BN-ReLU, 32 channels, the first with stride 2          1/2
         layer1: 3 residual blocks, 32 channels                                             1/2
         layer2: 16 residual blocks, 64 channels, stride 2                                  1/4
         layer3: 3 residual blocks, 128 channels
         layer4: 3 residual blocks, 128 channels, dilation 2
         [EA-PSMNet: the attention module here, see below]
         spatial pyramid pooling: average pooling 64/32/16/8 -> 1x1 conv-BN-ReLU to 32 channels ->
         bilinear upsampling back; concatenated with layer2's and layer4's outputs (320 channels)
         lastconv: 3x3 conv-BN-ReLU to 128, 1x1 conv to 32 channels
      -> concatenation cost volume (B, 64, max_disparity/4, H/4, W/4)
      -> dres0 (two 3D conv-BN-ReLU), dres1 (a residual pair), three stacked 3D hourglasses, each
         fed the previous one's intermediate volumes (PSMNet's "presqu"/"postsqu" skips)
      -> a classifier per hourglass, each cost added to the previous one's
      -> trilinear upsampling to (max_disparity, H, W), softmax over disparity, disparity regression
    = three disparity maps in training (StereoTask's loss weights 0.5/0.7/1.0), the last one in eval.

EA-PSMNet (Efficient Attention, Shen et al., WACV 2021, arXiv 1812.01243): the same network with the
paper's attention module (:class:`~lattn_app.backbones.attention_module.AttentionModule2d`: one head, queries
and keys of 64 channels, values of 128, the reprojection zero-initialised, the residual). The paper reports
Scene Flow EPE 0.48 for it against PSMNet's 1.09,
but the text available to us does not say where in PSMNet the module sits. **The placement is lattn's
choice**: one module after the feature extractor's last residual layer (``layer4``, 128 channels at
1/4 resolution), before the spatial pyramid pooling. Why there: it is the deepest 2D feature map, so
the global context the module adds reaches the pyramid pooling, the skip into ``lastconv`` and both
views' matching features; and at 1/4 resolution (64 x 128 = 8192 positions for a 256 x 512 crop)
the N x N map of non-local (softmax) attention is large while efficient attention's d x d context is
not, which is the setting the paper's memory argument is about.

Where we differ from the authors' code, and why: views of any size are padded to a multiple of 16 and
the prediction is cropped back (the hourglasses halve the 1/4 volume twice); feature maps smaller
than a pooling window (images under 256 pixels) are pooled over their whole extent instead of
failing; the upsampling uses ``align_corners=True``, which the authors' README asks for on PyTorch >= 0.4.1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.attention_module import AttentionModule2d
from .stereo import (
    build_cost_volume,
    check_max_disparity,
    conv3d_bn,
    deconv3d_bn,
    disparity_regression,
    pad_pair,
)

# The parameters of the authors' stackhourglass PSMNet (their paper: 5.22M), counted from the structure
# of their models/stackhourglass.py and models/submodule.py; the disparity range changes no weight.
PSMNET_PARAMETERS = 5_224_768
SPP_POOLS = (64, 32, 16, 8)  # average-pooling windows of the pyramid branches, in 1/4-resolution pixels
SIZE_MULTIPLE = 16  # the 1/4-resolution volume is halved twice by the hourglasses


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
            relu: bool = True) -> nn.Sequential:
    """Conv2d (no bias; padding keeps the size at stride 1, dilation included) + BatchNorm2d (+ ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, dilation * (kernel_size // 2), dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """PSMNet's basic block: conv-BN-ReLU, conv-BN, plus the shortcut; no ReLU after the sum (as the authors)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_channels, channels, 3, stride, dilation)
        self.conv2 = conv_bn(channels, channels, 3, 1, dilation, relu=False)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))
            if stride != 1 or in_channels != channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x)) + identity


def residual_layer(in_channels: int, channels: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_channels, channels, stride, dilation),
                         *(ResidualBlock(channels, channels, 1, dilation) for _ in range(blocks - 1)))


class FeatureExtractor(nn.Module):
    """PSMNet's 2D feature extractor (CNN with dilated residual layers and spatial pyramid pooling): 32 channels at 1/4.

    `attention`: an :class:`AttentionModule2d` applied after ``layer4`` (EA-PSMNet), or None (PSMNet).
    """

    def __init__(self, attention: AttentionModule2d | None = None) -> None:
        super().__init__()
        self.firstconv = nn.Sequential(conv_bn(3, 32, 3, 2), conv_bn(32, 32, 3), conv_bn(32, 32, 3))
        self.layer1 = residual_layer(32, 32, 3)
        self.layer2 = residual_layer(32, 64, 16, stride=2)
        self.layer3 = residual_layer(64, 128, 3)
        self.layer4 = residual_layer(128, 128, 3, dilation=2)
        self.attention = attention
        self.branches = nn.ModuleList(conv_bn(128, 32, 1) for _ in SPP_POOLS)
        self.lastconv = nn.Sequential(conv_bn(64 + 128 + 32 * len(SPP_POOLS), 128, 3),
                                      nn.Conv2d(128, 32, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        raw = self.layer2(self.layer1(self.firstconv(x)))
        skip = self.layer4(self.layer3(raw))
        if self.attention is not None:
            skip = self.attention(skip)
        size = skip.shape[-2:]
        pooled = []
        for window, branch in zip(SPP_POOLS, self.branches):
            # A map smaller than the window is pooled whole (the authors' code fails there).
            kernel = (min(window, size[0]), min(window, size[1]))
            level = F.avg_pool2d(skip, kernel, kernel)
            if self.training and level[:, 0].numel() == 1:  # batch norm needs two values per channel
                raise ValueError(f"PSMNet: a training batch of one {x.shape[-1]}x{x.shape[-2]} pair pools to one value "
                                 f"per channel in the {window}-pixel pyramid branch; expected a batch of at least 2 "
                                 "or views of at least 512 x 256 pixels (width x height)")
            level = branch(level)
            pooled.append(F.interpolate(level, size=size, mode="bilinear", align_corners=True))
        # The authors' order: layer2, layer4, then the branches from the finest (8) to the coarsest (64).
        return self.lastconv(torch.cat([raw, skip, *reversed(pooled)], dim=1))


class PSMHourglass(nn.Module):
    """PSMNet's 3D hourglass: down to 1/2 and 1/4 of the volume and back, taking and giving its skips.

    ``forward(x, presqu, postsqu)`` returns (out, pre, post): `pre` (the 1/2 volume on the way down) has
    the previous hourglass's `postsqu` added; `post` (the 1/2 volume on the way up) adds `presqu`
    (or this hourglass's own `pre` when None).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        wide = 2 * channels
        self.conv1 = conv3d_bn(channels, wide, stride=2)
        self.conv2 = conv3d_bn(wide, wide, relu=False)
        self.conv3 = conv3d_bn(wide, wide, stride=2)
        self.conv4 = conv3d_bn(wide, wide)
        self.conv5 = deconv3d_bn(wide, wide)
        self.conv6 = deconv3d_bn(wide, channels)

    def forward(self, x: Tensor, presqu: Tensor | None, postsqu: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        pre = self.conv2(self.conv1(x))
        pre = F.relu(pre if postsqu is None else pre + postsqu)
        out = self.conv4(self.conv3(pre))
        post = F.relu(self.conv5(out) + (pre if presqu is None else presqu))
        return self.conv6(post), pre, post


def classifier(channels: int) -> nn.Sequential:
    return nn.Sequential(conv3d_bn(channels, channels), nn.Conv3d(channels, 1, 3, 1, 1, bias=False))


def init_like_the_authors(module: nn.Module) -> None:
    """The authors' initialisation: conv weights ~ N(0, sqrt(2 / (kernel volume x out channels))), batch
    norms at weight 1 and bias 0. Transposed 3D convs keep PyTorch's default, as in their code."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fan_out = math.prod(m.kernel_size) * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PSMNet(nn.Module):
    """PSMNet's stacked-hourglass network, or EA-PSMNet with `attention` set (see the module docstring).

    Args:
        max_disparity: largest disparity the cost volume covers (a multiple of 16; PSMNet: 192). No
            weight depends on it, so it may be changed after building (``StereoTask.set_max_disparity``).
        attention: None: PSMNet. A registered mechanism (``efficient``: the paper's EA-PSMNet, ``softmax``:
            a non-local module, or any of ``lattn list attention``): an :class:`AttentionModule2d` after
            the feature extractor's ``layer4``.
        attention_options: that mechanism's own options.
        attention_heads: heads of the attention module (1: the paper's module).
        img_size: training image size (H, W); fixed-grid mechanisms (linformer, mixer) are built for its
            1/4-resolution grid.
    """

    size_multiple = SIZE_MULTIPLE
    num_outputs = 3

    def __init__(self, max_disparity: int = 192, attention: str | None = None,
                 attention_options: Mapping[str, Any] | None = None, attention_heads: int = 1,
                 img_size: tuple[int, int] = (256, 512)) -> None:
        super().__init__()
        self.max_disparity = check_max_disparity(max_disparity)
        module = None
        if attention is not None:
            module = AttentionModule2d(128, attention, num_heads=attention_heads,
                                       attention_options=dict(attention_options or {}),
                                       grid=(img_size[0] // 4, img_size[1] // 4))
        elif attention_options:
            raise ValueError("psmnet_attention_options are set but psmnet_attention is null; expected a mechanism "
                             "name (e.g. efficient) or no options")
        self.feature_extraction = FeatureExtractor(module)
        self.dres0 = nn.Sequential(conv3d_bn(64, 32), conv3d_bn(32, 32))
        self.dres1 = nn.Sequential(conv3d_bn(32, 32), conv3d_bn(32, 32, relu=False))
        self.hourglasses = nn.ModuleList(PSMHourglass(32) for _ in range(3))
        self.classifiers = nn.ModuleList(classifier(32) for _ in range(3))
        # The attention module keeps its own initialisation: zero reprojection, so EA-PSMNet starts as PSMNet.
        for name, child in self.named_children():
            if name == "feature_extraction":
                for part_name, part in child.named_children():
                    if part_name != "attention":
                        init_like_the_authors(part)
            else:
                init_like_the_authors(child)

    def forward(self, left: Tensor, right: Tensor) -> list[Tensor]:
        """Normalised views (B, 3, H, W) -> disparity maps (B, H, W): three in training, the final one in eval."""
        height, width = left.shape[-2:]
        left, right = pad_pair(left, right, self.size_multiple)
        # One pass per view, as the authors: in training each view's batch-norm statistics are its own.
        left_features, right_features = self.feature_extraction(left), self.feature_extraction(right)
        volume = build_cost_volume(left_features, right_features, self.max_disparity // 4, "concat", 1)
        cost0 = self.dres0(volume)
        cost0 = self.dres1(cost0) + cost0
        out1, pre1, post1 = self.hourglasses[0](cost0, None, None)
        out1 = out1 + cost0
        out2, _, post2 = self.hourglasses[1](out1, pre1, post1)
        out2 = out2 + cost0
        out3, _, _ = self.hourglasses[2](out2, pre1, post2)  # pre1 again, as in the authors' network
        out3 = out3 + cost0
        cost1 = self.classifiers[0](out1)
        cost2 = self.classifiers[1](out2) + cost1
        cost3 = self.classifiers[2](out3) + cost2
        costs = [cost1, cost2, cost3] if self.training else [cost3]
        size = (self.max_disparity, left.shape[-2], left.shape[-1])
        return [disparity_regression(F.interpolate(cost, size=size, mode="trilinear", align_corners=True).squeeze(1))
                [:, :height, :width] for cost in costs]
