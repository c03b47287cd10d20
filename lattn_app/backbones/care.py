"""CARE Transformer backbones (Zhou et al., "CARE Transformer: Mobile-Friendly Linear Visual Transformer
via Decoupled Dual Interaction", CVPR 2025): ``care_s0``, ``care_s1``, ``care_s2``.

    >>> from lattn_app.backbones import create_backbone
    >>> model = create_backbone("care_s0", num_classes=10)          # CARE linear attention in stages 3-4
    >>> model = create_backbone("care_s0", attention="efficient")   # any registered mechanism instead

A CARE block sees C = 4g channels split as [memory g | attention g | conv1 g | conv2 g]:

- **asymmetric decoupling**: conv1 -> depthwise 3x3, conv2 -> depthwise 7x7; the attention part goes
  through depthwise 11x1 + 1x11 strip convolutions (stages 1-2) or through linear attention (stages 3-4,
  head size 16 and 32; by default the registry's ``"care"`` mechanism, whose q and k come from one 1x1
  projection and whose values are the attention channels themselves);
- **dual interaction**: a conv MLP (BN -> 1x1 expand -> GELU -> depthwise 3x3 -> 1x1, residual) mixes the
  three decoupled parts, then a second one mixes the memory with that result;
- **dynamic memory**: nothing is stored: the first g channels of a block's output *are* the next
  block's memory, because every block reads its memory from its first g input channels.

Block output: x + DropPath(gamma * interaction), gamma initialised to 1e-6.

Where this follows the official code on points the paper leaves open (docs/methods.md#backbone-care):

- The stage widths are the full block widths C = 4g (official: ``dims = feat_dims + mem_dims``, e.g.
  S0 24 + 8 = 32); the memory is the *first* g channels, the rest are 3g decoupled features.
- "The last block expands to the classifier width" means: in the very last block of stage 4, the
  second interaction stops after its depthwise 3x3, i.e. it has no 1x1 projection back, no residual
  and no layer scale, so its output has r2 * C channels (S0/S1: 4 * 256 = 1024, S2: 4 * 384 = 1536).
  That map is what ``forward_features`` returns and the stride-32 level of ``forward_pyramid``.
- The head is GAP -> GELU -> LayerNorm -> Linear, and the distillation head is a complete second head
  with its own LayerNorm (as in the official code); ``pre_logits`` returns the class head's normalised
  embedding.
- Drop-path rates rise linearly over all blocks; convolution and linear weights are initialised with
  a truncated normal of std 0.02 and zero biases.

Image sizes: any H, W >= 1 works. Sides that are not multiples of 32 are zero-padded at the bottom and
right to the next multiple of 32 (H' = 32 * ceil(H / 32), likewise W'), so level i of the pyramid has
H' / s_i x W' / s_i cells and its top-left ceil(H / s_i) x ceil(W / s_i) cells cover the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import DropPath, LayerScale2d, trunc_normal_
from torch import Tensor, nn
from torch.nn import functional as F

from ..attention import create_attention
from ..registry import BACKBONES
from .base import Backbone, FeatureLevel, maps_to_tokens, tokens_to_maps

STRIDES = (4, 8, 16, 32)
ATTENTION_STAGES = (2, 3)  # stages 3 and 4 (0-based) use attention; stages 1-2 use strip convolutions
HEAD_SIZES = (None, None, 16, 32)  # attention head size per stage
LAYER_SCALE_INIT = 1e-6


class StripConvMixer(nn.Module):
    """Depthwise 11x1 plus depthwise 1x11 convolution: the cheap long-range mixer of stages 1-2."""

    def __init__(self, channels: int, length: int = 11) -> None:
        super().__init__()
        self.vertical = nn.Conv2d(channels, channels, (length, 1), padding=(length // 2, 0), groups=channels)
        self.horizontal = nn.Conv2d(channels, channels, (1, length), padding=(0, length // 2), groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.vertical(x) + self.horizontal(x)


class AttentionMixer(nn.Module):
    """A registered token mixer applied to a feature map (stages 3-4).

    ``attention="care"`` builds CARE's linear attention exactly: values are the input channels
    themselves and there is no output projection. Any other name builds that mechanism with its
    defaults (its own q/k/v and output projections) at the same number of heads.
    """

    def __init__(self, channels: int, head_size: int, attention: str = "care") -> None:
        super().__init__()
        if channels % head_size:
            raise ValueError(f"attention width {channels} must be a multiple of the head size {head_size}")
        num_heads = channels // head_size
        if attention == "care":
            self.attn = create_attention(
                "care", dim=channels, num_heads=num_heads, value_projection=False, output_projection=False
            )
        else:
            self.attn = create_attention(attention, dim=channels, num_heads=num_heads)

    def forward(self, x: Tensor) -> Tensor:
        hw = (x.shape[2], x.shape[3])
        return tokens_to_maps(self.attn(maps_to_tokens(x), hw), hw)


class AsymmetricDecoupling(nn.Module):
    """Splits [memory | attention | conv1 | conv2] and mixes the last three parts each its own way.

    Returns ``(memory, mixed)``: the untouched first g channels and the 3g mixed channels.
    """

    def __init__(self, memory_dim: int, head_size: int | None, attention: str) -> None:
        super().__init__()
        self.memory_dim = memory_dim
        g = memory_dim
        self.attention_mixer = StripConvMixer(g) if head_size is None else AttentionMixer(g, head_size, attention)
        self.conv3x3 = nn.Conv2d(g, g, 3, padding=1, groups=g)
        self.conv7x7 = nn.Conv2d(g, g, 7, padding=3, groups=g)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        g = self.memory_dim
        memory, attention_part, conv1_part, conv2_part = torch.split(x, [x.shape[1] - 3 * g, g, g, g], dim=1)
        mixed = torch.cat(
            [self.attention_mixer(attention_part), self.conv3x3(conv1_part), self.conv7x7(conv2_part)], dim=1
        )
        return memory, mixed


class ConvInteraction(nn.Module):
    """BN -> 1x1 expand (x ratio) -> GELU -> depthwise 3x3 -> 1x1 back, plus the input.

    With ``project_back=False`` it stops after the depthwise 3x3 and returns ratio * channels
    channels without a residual (the network's last block, which widens to the classifier).
    """

    def __init__(self, channels: int, ratio: int, project_back: bool = True) -> None:
        super().__init__()
        hidden = ratio * channels
        self.norm = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.conv3x3 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1) if project_back else None
        self.out_channels = channels if project_back else hidden

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3x3(self.act(self.expand(self.norm(x))))
        return x + self.project(y) if self.project is not None else y


class CareBlock(nn.Module):
    """One CARE block: asymmetric decoupling, then dual interaction, then a layer-scaled residual.

    The memory read here is the first ``memory_dim`` input channels; since the residual keeps the
    channel order, the first ``memory_dim`` output channels are the next block's memory.
    """

    def __init__(
        self,
        dim: int,
        memory_dim: int,
        ratios: tuple[int, int],
        head_size: int | None = None,
        attention: str = "care",
        drop_path: float = 0.0,
        expand_to_classifier: bool = False,
    ) -> None:
        super().__init__()
        if dim != 4 * memory_dim:
            raise ValueError(f"a CARE block has 4 * memory_dim channels; got dim={dim}, memory_dim={memory_dim}")
        self.memory_dim = memory_dim
        self.expand_to_classifier = expand_to_classifier
        self.decoupling = AsymmetricDecoupling(memory_dim, head_size, attention)
        self.feature_interaction = ConvInteraction(3 * memory_dim, ratios[0])
        self.memory_interaction = ConvInteraction(dim, ratios[1], project_back=not expand_to_classifier)
        # The widening last block replaces x by its expansion: no residual, so no layer scale either.
        self.layer_scale = None if expand_to_classifier else LayerScale2d(dim, LAYER_SCALE_INIT)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.out_channels = self.memory_interaction.out_channels

    def forward(self, x: Tensor) -> Tensor:
        memory, mixed = self.decoupling(x)
        interaction = self.memory_interaction(torch.cat([memory, self.feature_interaction(mixed)], dim=1))
        if self.layer_scale is None:
            return self.drop_path(interaction)
        return x + self.drop_path(self.layer_scale(interaction))


class CareStage(nn.Module):
    """Optional downsampling (BN + 2x2 stride-2 conv), then CARE blocks at one resolution."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        memory_dim: int,
        depth: int,
        ratios: tuple[int, int],
        head_size: int | None,
        attention: str,
        drop_paths: list[float],
        downsample: bool,
        expand_last_block: bool,
    ) -> None:
        super().__init__()
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, dim, 2, stride=2))
            if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *[
                CareBlock(
                    dim,
                    memory_dim,
                    ratios,
                    head_size,
                    attention,
                    drop_paths[i],
                    expand_to_classifier=expand_last_block and i == depth - 1,
                )
                for i in range(depth)
            ]
        )
        self.out_channels = self.blocks[-1].out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class CareHead(nn.Module):
    """GELU -> LayerNorm -> Linear on pooled features; ``fc`` is the identity when num_classes == 0."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(num_features, eps=1e-6)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, pooled: Tensor, pre_logits: bool = False) -> Tensor:
        embedding = self.norm(self.act(pooled))
        return embedding if pre_logits else self.fc(embedding)


@dataclass(frozen=True)
class CareConfig:
    """One CARE variant: per-stage depths, widths C = 4g, memory widths g, interaction ratios (r1, r2)."""

    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    memory_dims: tuple[int, int, int, int]
    ratios: tuple[tuple[int, int], ...]


CARE_S0 = CareConfig((2, 4, 8, 4), (32, 64, 128, 256), (8, 16, 32, 64), ((2, 2), (2, 4), (4, 4), (4, 4)))
CARE_S1 = CareConfig((3, 6, 10, 6), (32, 64, 128, 256), (8, 16, 32, 64), ((2, 4), (2, 4), (4, 4), (4, 4)))
CARE_S2 = CareConfig((3, 6, 10, 6), (32, 64, 192, 384), (8, 16, 48, 96), ((4, 4),) * 4)


class CareTransformer(Backbone):
    """CARE Transformer: a four-stage conv/linear-attention hybrid with dual interaction and memory.

    ``forward_features`` returns the stride-32 map widened to ``num_features`` channels (the classifier
    width). ``forward_head`` pools it; with ``distillation`` it returns ``(class_logits, distill_logits)``
    in training and their average in eval mode (DeiT-style hard distillation).
    """

    def __init__(
        self,
        config: CareConfig,
        num_classes: int = 1000,
        attention: str = "care",
        drop_path_rate: float = 0.0,
        distillation: bool = True,
        in_chans: int = 3,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 for no classifier); got {num_classes}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {drop_path_rate}")
        self.config = config
        self.num_classes = num_classes
        widths = config.widths
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 4, stride=4), nn.BatchNorm2d(widths[0]))

        rates = torch.linspace(0, drop_path_rate, sum(config.depths)).split(list(config.depths))
        stages, in_channels = [], widths[0]
        for i, depth in enumerate(config.depths):
            stage = CareStage(
                in_channels,
                widths[i],
                config.memory_dims[i],
                depth,
                config.ratios[i],
                HEAD_SIZES[i] if i in ATTENTION_STAGES else None,
                attention,
                rates[i].tolist(),
                downsample=i > 0,
                expand_last_block=i == len(config.depths) - 1,
            )
            stages.append(stage)
            in_channels = widths[i]
        self.stages = nn.ModuleList(stages)

        self.num_features = self.stages[-1].out_channels
        self.feature_info = [FeatureLevel(s.out_channels, stride) for s, stride in zip(self.stages, STRIDES)]
        self.classifier_parts = ("head", "dist_head")
        self.head = CareHead(self.num_features, num_classes)
        # Distillation needs classes to distil; without a classifier there is one (embedding) head.
        self.dist_head = CareHead(self.num_features, num_classes) if distillation and num_classes > 0 else None
        self.apply(self._init_weights)
        if pretrained:  # e.g. ImageNet weights before fine-tuning for detection
            self.load_pretrained(pretrained)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _stem(self, images: Tensor) -> Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W); got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        stride = STRIDES[-1]
        pad_h, pad_w = -height % stride, -width % stride
        if pad_h or pad_w:  # strided convs would silently drop the last rows/columns otherwise
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.stem(images)

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        x, levels = self._stem(images), []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels

    def forward_features(self, images: Tensor) -> Tensor:
        x = self._stem(images)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        pooled = features.mean(dim=(2, 3)) if features.dim() == 4 else features
        logits = self.head(pooled, pre_logits)
        if pre_logits or self.dist_head is None:
            return logits
        distill_logits = self.dist_head(pooled)
        if self.training:
            return logits, distill_logits
        return (logits + distill_logits) / 2


def _describe(name: str, config: CareConfig) -> str:
    return f"CARE Transformer {name} (CVPR 2025): depths {config.depths}, widths {config.widths}"


# Each variant is CareTransformer with its configuration bound; the other options stay keyword arguments.
for _name, _config, _published in (("S0", CARE_S0, "7.3M params, 0.7 GMACs"), ("S1", CARE_S1, "9.6M params, 1.0 GMACs"),
                                   ("S2", CARE_S2, "19.5M params, 1.9 GMACs")):
    BACKBONES.register(
        f"care_{_name.lower()}", description=f"{_describe(_name, _config)}; published {_published} at 224"
    )(partial(CareTransformer, _config))
