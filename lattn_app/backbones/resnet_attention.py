"""ResNets with attention modules: the networks of the Efficient Attention paper (Shen et al., WACV 2021).

torchvision's own ResNet-50/101 and ResNeXt-101 (``torchvision.models.resnet*``, not copies) with
attention modules inserted between their residual blocks. Each module is the paper's (as released in
cmsflash/efficient-attention, ``EfficientAttention``):

    x (B, C, H, W) -> queries, keys (1x1 convs, C -> key_channels), values (1x1 conv, C -> value_channels)
                   -> attention over the H*W positions, per head
                   -> reprojection (1x1 conv, value_channels -> C) -> + x

with the mechanism from the registry: ``efficient`` is the paper's module (keys normalised by a softmax
over positions, queries over channels), ``softmax`` the non-local block it replaces (Wang et al., 2018,
without the non-local block's BatchNorm), and every other mechanism works as well (see
:class:`~lattn_app.backbones.attention_module.AttentionModule2d` for how).

- **Names**: the ResNet keeps torchvision's child names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``,
  ``fc``), so a torchvision or timm ResNet state dict loads as is; the modules live apart, in
  ``attention`` (keys like ``layer3_4``: after block 4 of ``layer3``), and are reported as new weights.
- **Positions** (``attention_positions``): a list such as ``["layer3.4"]`` (after block 4 of ``layer3``,
  counting from 0), or a number n of modules placed by the non-local paper's rule, which the Efficient
  Attention release names its module a drop-in replacement for: 1 module right before the last block
  of res4 (``layer3``); 5 modules: every other block, 3 in res4 and 2 in res3; 10: every block of res3
  and res4 (ResNet-50). The Efficient Attention paper states counts (1, 2 on ImageNet; 1, 5, 7 on COCO)
  but not positions, so the positions of those counts are this rule's, not the paper's.
- **Initialisation**: torchvision's for the ResNet (or the pretrained weights); the modules' 1x1 convs
  PyTorch's default, the reprojection zero (``zero_init_reprojection``), so that a module inserted into
  a pretrained network starts as the identity, as the non-local block starts with its BatchNorm scale
  at zero. The paper does not state its initialisation; this is lattn's choice.
- **Detection**: ``norm_layer="frozen"`` (torchvision's FrozenBatchNorm2d, as its Mask R-CNN uses) and
  ``trainable_layers`` (5: all; 3: layer2-4 as torchvision's ``maskrcnn_resnet50_fpn``) — the modules
  always train.

    >>> from lattn_app.backbones import create_backbone
    >>> model = create_backbone("resnet50", attention="efficient", attention_positions=1, num_classes=1000)
    >>> maps = model.forward_pyramid(images)   # [(B, 256, H/4, W/4), (B, 512, H/8, W/8), ..., (B, 2048, H/32, W/32)]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..registry import BACKBONES, check_choice
from .attention_module import AttentionModule2d
from .base import Backbone, FeatureLevel

log = logging.getLogger(__name__)

ARCHITECTURES = ("resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")
NORM_LAYERS = ("batch", "frozen")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
# torchvision's freezing order (_resnet_fpn_extractor): trainable_layers=k trains the first k of these.
TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "conv1")


def placement_rule(blocks_per_layer: Sequence[int], count: int) -> list[str]:
    """The first `count` positions of the non-local paper's order (see the module docstring).

    Order: res4 (``layer3``) before its last block and every other block back from there (3 at most),
    then res3 (``layer2``) likewise (2 at most), then the remaining blocks of res4 and res3 from the end,
    then those of res2 and res5. For ResNet-50 the first 1, 5 and 10 are the non-local layouts.
    """
    res3, res4 = blocks_per_layer[1], blocks_per_layer[2]
    order = [f"layer3.{res4 - 2 - 2 * i}" for i in range(3) if res4 - 2 - 2 * i >= 0]
    order += [f"layer2.{res3 - 2 - 2 * i}" for i in range(2) if res3 - 2 - 2 * i >= 0]
    for layer_index in (2, 1, 0, 3):  # the rest: res4, res3, res2, res5, each from its last block back
        blocks = blocks_per_layer[layer_index]
        order += [f"{LAYERS[layer_index]}.{b}" for b in reversed(range(blocks)) if f"{LAYERS[layer_index]}.{b}" not in order]
    if count > len(order):
        raise ValueError(f"attention_positions={count}: this ResNet has only {len(order)} blocks to follow")
    return order[:count]


class AttentionResNet(Backbone):
    """torchvision ResNet / ResNeXt with attention modules (see the module docstring).

    Args:
        arch: ``resnet50``, ``resnet101``, ``resnext101_32x8d`` or ``resnext101_64x4d`` (torchvision's).
        attention: registered mechanism of the modules.
        attention_positions: where the modules go: a list of ``"layerX.i"`` (after block i of layerX) or a
            number of modules placed by :func:`placement_rule`; 0 or [] = the plain ResNet.
        attention_options: the mechanism's own options.
        key_channels_ratio: key_channels = ratio x the channels at the module (paper: 0.5).
        value_channels_ratio: value_channels = ratio x those channels (paper: 1.0).
        num_heads: heads of every module (paper: 1).
        zero_init_reprojection: modules start as the identity.
        num_classes: classes of the ``fc`` classifier; 0: none (pooled features).
        norm_layer: ``batch`` (BatchNorm2d) or ``frozen`` (FrozenBatchNorm2d, detection with pretrained weights).
        trainable_layers: 0-5, how many of layer4, layer3, layer2, layer1, conv1 (with bn1) train (5: all).
        img_size: training image size; used by fixed-grid mechanisms (linformer, mixer) only.
        pretrained: ImageNet weights, a local torchvision/timm file or a lattn checkpoint (see
            :meth:`Backbone.load_pretrained`); the modules' weights are reported as new.
        in_chans: image channels (3; others only without pretrained weights).
    """

    classifier_parts = ("fc",)
    #: Loading weights of another class count leaves these initialised (see timm_weights.load_pretrained).
    pretrained_head_keys = ("fc.weight", "fc.bias")

    def __init__(
        self,
        arch: str = "resnet50",
        attention: str = "efficient",
        attention_positions: int | Sequence[str] = 1,
        attention_options: dict[str, Any] | None = None,
        key_channels_ratio: float = 0.5,
        value_channels_ratio: float = 1.0,
        num_heads: int = 1,
        zero_init_reprojection: bool = True,
        num_classes: int = 1000,
        norm_layer: str = "batch",
        trainable_layers: int = 5,
        img_size: int | tuple[int, int] = 224,
        pretrained: str | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        check_choice("resnet: arch", arch, ARCHITECTURES)
        check_choice("resnet: norm_layer", norm_layer, NORM_LAYERS)
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"resnet: trainable_layers must be 0 to 5 (layer4, layer3, layer2, layer1, conv1); "
                             f"got {trainable_layers}")
        self.arch = arch
        network = getattr(torchvision.models, arch)(
            weights=None, num_classes=max(num_classes, 1),
            norm_layer=FrozenBatchNorm2d if norm_layer == "frozen" else None,
        )
        if in_chans != 3:
            network.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for name, child in network.named_children():  # torchvision's names, so its state dicts load as is
            self.add_module(name, child)
        if num_classes == 0:
            self.fc = nn.Identity()
        self.num_classes = num_classes
        self.num_features = self.fc.in_features if num_classes else network.fc.in_features
        blocks = [len(getattr(self, name)) for name in LAYERS]
        widths = [getattr(self, name)[-1].conv3.out_channels for name in LAYERS]
        self.feature_info = [FeatureLevel(width, 4 * 2**i) for i, width in enumerate(widths)]

        positions = (placement_rule(blocks, attention_positions) if isinstance(attention_positions, int)
                     else list(attention_positions))
        self.attention_positions = positions
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.attention = nn.ModuleDict()
        for index, position in enumerate(positions):
            layer, block = self._parse_position(position, blocks)
            channels, stride = widths[layer], 4 * 2**layer
            self.attention[f"{LAYERS[layer]}_{block}"] = AttentionModule2d(
                channels, attention, int(channels * key_channels_ratio), int(channels * value_channels_ratio),
                num_heads, attention_options, (size[0] // stride, size[1] // stride), zero_init_reprojection,
                layer_index=index,
            )
        self._freeze(trainable_layers)
        if pretrained:
            self.load_pretrained(pretrained)

    @staticmethod
    def _parse_position(position: str, blocks: Sequence[int]) -> tuple[int, int]:
        layer_name, _, block = str(position).partition(".")
        if layer_name not in LAYERS or not block.isdigit() or int(block) >= blocks[LAYERS.index(layer_name)]:
            sizes = ", ".join(f"{name}.0-{name}.{n - 1}" for name, n in zip(LAYERS, blocks))
            raise ValueError(f"resnet: attention position {position!r} is not 'layerX.i' of this network ({sizes})")
        return LAYERS.index(layer_name), int(block)

    def _freeze(self, trainable_layers: int) -> None:
        trained = TRAINABLE_ORDER[:trainable_layers]
        for name, parameter in self.named_parameters():
            top = name.split(".")[0]
            top = "conv1" if top == "bn1" else top
            if top in TRAINABLE_ORDER and top not in trained:
                parameter.requires_grad_(False)

    def _stage(self, index: int, x: Tensor) -> Tensor:
        name = LAYERS[index]
        for block_index, block in enumerate(getattr(self, name)):
            x = block(x)
            key = f"{name}_{block_index}"
            if key in self.attention:
                x = self.attention[key](x)
        return x

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        """The outputs of layer1-4: (B, C_i, H / s_i, W / s_i), s_i = 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        levels = []
        for index in range(len(LAYERS)):
            x = self._stage(index, x)
            levels.append(x)
        return levels

    def forward_features(self, images: Tensor) -> Tensor:
        """layer4's map (B, 2048, H / 32, W / 32)."""
        return self.forward_pyramid(images)[-1]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = torch.flatten(self.avgpool(features), 1)
        return pooled if pre_logits else self.fc(pooled)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


BACKBONES.register(
    "resnet",
    description="torchvision ResNet/ResNeXt with the Efficient Attention paper's attention modules "
    "(arch: resnet50, resnet101, resnext101_32x8d, resnext101_64x4d)",
)(AttentionResNet)


def _preset(name: str, description: str) -> None:
    BACKBONES.register(name, description=description, time="O(N d^2) per module with efficient attention")(
        partial(AttentionResNet, arch=name)
    )


_preset("resnet50", "torchvision ResNet-50 with Efficient Attention modules (default 1; attention_positions 0 = plain)")
_preset("resnet101", "torchvision ResNet-101 with Efficient Attention modules (default 1; attention_positions 0 = plain)")
_preset("resnext101_32x8d", "torchvision ResNeXt-101 32x8d with Efficient Attention modules (attention_positions 0 = plain)")
_preset("resnext101_64x4d", "torchvision ResNeXt-101 64x4d with Efficient Attention modules (attention_positions 0 = plain)")
