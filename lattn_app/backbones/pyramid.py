"""Pyramid backbone: a hierarchical transformer with attention at every stage (PVTv2-like layout).

The dense-task backbone of lattn (detection FPN, stereo): four stages at strides 4, 8, 16 and 32 whose
blocks all attend globally over their stage's grid with any registered token mixer, the stride-4 stage
included; there the grid is large (56 x 56 at 224, 135 x 240 for a 540 x 960 stereo frame), which is
what the linear mechanisms (``efficient``, ``performer``, ``nystrom``, ``care``, ``coupling``, ``fnet``)
make affordable.

    images -> [7x7 conv, stride 4 + LN] -> stage 1 -> [3x3 conv, stride 2 + LN] -> stage 2 -> ... -> stage k
    stage i: depth_i x (x + DWConv3x3(x), then the pre-norm TransformerBlock of blocks.py), then LN
    head:   global average pool -> LN -> Linear

- **Position**: a depthwise 3x3 convolution added before every block (a conditional position encoding,
  as CPVT's PEG / CMT's local perception unit). It adapts to any grid, so there is no position table to
  resample and any image size divisible by ``2 ** (num_stages + 1)`` (32 for four stages) works.
- **Not PVTv2**: the layout (overlapping patch embeddings, widths, depths, heads, MLP ratios) is PVTv2's,
  but the attention is the registry's mechanism over the whole grid instead of PVTv2's
  spatial-reduction attention, the MLP is the plain timm ``Mlp`` and position comes from the convolution
  above, so PVTv2 weights do not load.
- ``num_stages=k`` builds only the first k stages (stereo needs strides 4 and 8); ``feature_info``
  lists the built levels and the classifier sits on the last one.
- ``attention`` is one name for every stage or one per stage (e.g. ``["efficient", "efficient",
  "softmax", "softmax"]``); ``attention_options`` likewise one dict for all or one per stage. Softmax
  (or any mechanism of quadratic time) at stride 4 is allowed but logged as a warning.
- Mechanisms built for one grid (``linformer``, ``mixer``) get each stage's grid from ``img_size``
  and resample their weights on other grids (see their docs); ``img_size`` matters for nothing else.

    >>> from lattn_app.backbones import create_backbone
    >>> model = create_backbone("pyramid_tiny", attention="efficient", num_classes=0)
    >>> maps = model.forward_pyramid(images)       # [(B, 32, H/4, W/4), (B, 64, H/8, W/8), ...]
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
from timm.layers import to_2tuple, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..attention import attention_info
from ..registry import BACKBONES
from .base import Backbone, FeatureLevel, maps_to_tokens, tokens_to_maps
from .blocks import TransformerBlock, mixer_options

log = logging.getLogger(__name__)

Grid = tuple[int, int]
STEM_STRIDE = 4


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: a k x k convolution with stride s and padding k // 2, then LayerNorm.

    The first stage uses 7x7 / stride 4 on the image, the others 3x3 / stride 2 (PVTv2's layout).
    Maps (B, C_in, H, W) -> maps (B, C, H / s, W / s) for H, W divisible by s.
    """

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PositionalConv(nn.Module):
    """Conditional position encoding: tokens + depthwise 3x3 conv of their grid (CPVT's PEG)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, hw: Grid) -> Tensor:
        return x + maps_to_tokens(self.proj(tokens_to_maps(x, hw)))


class PyramidBlock(TransformerBlock):
    """The shared pre-norm transformer block with a conditional position encoding in front of it."""

    def __init__(self, dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(dim, *args, **kwargs)
        self.pos_conv = PositionalConv(dim)

    def forward(self, x: Tensor, hw: Grid, context: Tensor | None = None,
                context_hw: Grid | None = None) -> Tensor:
        return super().forward(self.pos_conv(x, hw), hw, context, context_hw)


class PyramidStage(nn.Module):
    """Downsampling patch embedding, `depth` blocks of global attention over the stage grid, LayerNorm."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        stride: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        attention: str,
        attention_options: dict[str, Any],
        drop_rate: float,
        drop_path_rates: list[float],
        init_values: float | None,
        first_layer_index: int = 0,
    ) -> None:
        super().__init__()
        self.downsample = OverlapPatchEmbed(in_chans, dim, kernel_size=7 if stride == STEM_STRIDE else 3, stride=stride)
        self.blocks = nn.ModuleList(
            PyramidBlock(dim, num_heads, attention, attention_options, mlp_ratio, drop_rate, rate, init_values,
                         layer_index=first_layer_index + index)
            for index, rate in enumerate(drop_path_rates)
        )
        self.norm = nn.LayerNorm(dim)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        """Maps (B, C_in, H, W) -> maps (B, C, H / s, W / s)."""
        x = self.downsample(x)
        hw = (x.shape[-2], x.shape[-1])
        tokens = maps_to_tokens(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, hw, use_reentrant=False)
            else:
                tokens = block(tokens, hw)
        return tokens_to_maps(self.norm(tokens), hw)


def _per_stage(name: str, value: Any, num_stages: int, total: int) -> list[Any]:
    """`value` repeated for every stage, or a list with one entry per stage (built or declared)."""
    if isinstance(value, (list, tuple)):
        if len(value) not in (num_stages, total):
            counts = f"{num_stages}" if num_stages == total else f"{num_stages} (built) or {total} (declared)"
            raise ValueError(
                f"pyramid: {name} must be one value for every stage or a list with one per stage "
                f"({counts}); got {len(value)}: {list(value)!r}"
            )
        return list(value)[:num_stages]
    return [value] * num_stages


# Backbone constructors share the shape of their common options on purpose: explicit signatures.
class PyramidTransformer(Backbone):
    """Hierarchical transformer with attention at every stage (strides 4/8/16/32), any token mixer."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8.0, 8.0, 4.0, 4.0),
        attention: str | list[str] = "efficient",
        attention_options: dict[str, Any] | list[dict[str, Any] | None] | None = None,
        num_stages: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        pretrained: str | None = None,
    ) -> None:
        """
        Args:
            img_size: the input size that grid-bound mechanisms (linformer, mixer) are built for and
                that ``complexity`` assumes; any size divisible by ``2 ** (num_stages + 1)`` runs.
            in_chans: image channels.
            num_classes: classifier outputs (average pool, LayerNorm, Linear); 0: no classifier, the
                head returns the pooled, normalised embedding.
            embed_dims, depths, num_heads, mlp_ratios: one entry per stage (equal lengths).
            attention: a registered token mixer for every stage, or a list with one per stage.
            attention_options: the mechanism's options, one dict for every stage or a list of one per
                stage (None entries for none).
            num_stages: build only the first `num_stages` stages (strides 4, 8, ... 2 ** (num_stages + 1)).
            drop_rate: dropout in the MLPs and before the classifier.
            drop_path_rate: stochastic depth, growing linearly over all built blocks up to this value.
            init_values: LayerScale initial value (None: no LayerScale).
            pretrained: weights to load (file or lattn ``.ckpt``; see ``timm_weights.load_pretrained``).
        """
        super().__init__()
        lists = {"embed_dims": embed_dims, "depths": depths, "num_heads": num_heads, "mlp_ratios": mlp_ratios}
        lengths = {name: len(value) for name, value in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"pyramid: embed_dims, depths, num_heads and mlp_ratios need one entry per stage each; "
                             f"got lengths {lengths}")
        total = len(depths)
        if not isinstance(num_stages, int) or not 1 <= num_stages <= total:
            raise ValueError(f"pyramid: num_stages must be an integer from 1 to {total} (the stages declared); "
                             f"got {num_stages!r}")
        if num_classes < 0 or in_chans < 1:
            raise ValueError(f"pyramid: need num_classes >= 0 and in_chans >= 1; got {num_classes}, {in_chans}")
        for i in range(num_stages):
            if depths[i] < 1:
                raise ValueError(f"pyramid: stage {i + 1} needs at least one block; got depths={tuple(depths)}")
            if num_heads[i] < 1 or embed_dims[i] % num_heads[i]:
                raise ValueError(f"pyramid: stage {i + 1} width {embed_dims[i]} must be divisible by its "
                                 f"num_heads {num_heads[i]}")
        attentions = _per_stage("attention", attention, num_stages, total)
        options = _per_stage("attention_options", attention_options, num_stages, total)
        for name in attentions:
            attention_info(name)  # an unknown name fails here, with the registry's suggestion

        self.num_classes = num_classes
        self.num_stages = num_stages
        self.attention = attentions
        self.size_multiple = STEM_STRIDE * 2 ** (num_stages - 1)
        self.img_size = to_2tuple(img_size)
        self.check_image_size(self.img_size, what="img_size")
        dims = [int(d) for d in embed_dims[:num_stages]]
        strides = [STEM_STRIDE * 2**i for i in range(num_stages)]
        self.feature_info = [FeatureLevel(channels=c, stride=s) for c, s in zip(dims, strides)]
        self.num_features = dims[-1]

        rates = torch.linspace(0, drop_path_rate, sum(depths[:num_stages])).tolist()
        self.stages = nn.ModuleList()
        for i, (dim, stride) in enumerate(zip(dims, strides)):
            grid = (self.img_size[0] // stride, self.img_size[1] // stride)
            info = attention_info(attentions[i])
            if i == 0 and "N^2" in info.time:
                log.warning(
                    "pyramid: %r attention at stride 4 costs %s in the H/4 * W/4 tokens (%d at %dx%d): time "
                    "is quadratic, and memory too wherever the N x N map is materialised; prefer a linear "
                    "mechanism (efficient, performer, nystrom, care, coupling, fnet) at this stage",
                    attentions[i], info.time, grid[0] * grid[1], *self.img_size,
                )
            first = sum(depths[:i])
            self.stages.append(
                PyramidStage(
                    in_chans=in_chans if i == 0 else dims[i - 1],
                    dim=dim,
                    stride=STEM_STRIDE if i == 0 else 2,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    attention=attentions[i],
                    attention_options=mixer_options(attentions[i], options[i], grid),
                    drop_rate=drop_rate,
                    drop_path_rates=rates[first : first + depths[i]],
                    init_values=init_values,
                    first_layer_index=first,
                )
            )
        self.classifier_parts = ("head_norm", "head_drop", "head")
        self.head_norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        if pretrained:
            self.load_pretrained(pretrained)  # (PVTv2 weights do not fit: see the module docs)

    def init_weights(self) -> None:
        """Truncated-normal linears (timm's ViT/PVTv2), fan-out normal for our own convolutions."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (OverlapPatchEmbed, PositionalConv)):
                conv = module.proj  # not every Conv2d: mechanisms initialise their own (nystrom)
                fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
                nn.init.normal_(conv.weight, std=(2.0 / fan_out) ** 0.5)
                nn.init.zeros_(conv.bias)

    def check_image_size(self, size: tuple[int, int], what: str = "image size") -> None:
        """Raise a ValueError unless both sides divide by the coarsest stride."""
        height, width = size
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"pyramid: {what} {height}x{width} is not divisible by {self.size_multiple} (the stride of "
                f"its last stage with num_stages={self.num_stages}); resize or pad the images to a multiple "
                f"of {self.size_multiple}"
            )

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        """One normalised map per built stage: (B, C_i, H / s_i, W / s_i), s_i = 4, 8, 16, 32."""
        self.check_image_size((images.shape[-2], images.shape[-1]))
        x, levels = images, []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        return levels

    def forward_features(self, images: Tensor) -> Tensor:
        """The last built stage's map (B, C, H / s, W / s)."""
        return self.forward_pyramid(images)[-1]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Average pool of a map (B, C, h, w) or tokens (B, N, C), LayerNorm, then the classifier."""
        pooled = features.mean(dim=(-2, -1)) if features.dim() == 4 else features.mean(dim=1)
        pooled = self.head_drop(self.head_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (timm's API)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth in timm's format (layer-wise learning-rate decay).

        Fine: the stem, then every block (a stage's downsampling joins its first block, a stage's norm its
        last), then the head norm and classifier. Coarse: the stem, then one group per stage.
        """
        if coarse:
            return {"stem": r"^stages\.0\.downsample", "blocks": r"^stages\.(\d+)"}
        return {
            "stem": r"^stages\.0\.downsample",
            "blocks": [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
                (r"^head_norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The position-encoding convolutions, as CPVT/Twins exclude their PEG from weight decay."""
        return {name for name, _ in self.named_parameters() if ".pos_conv." in name}


BACKBONES.register(
    "pyramid",
    description="Hierarchical transformer, attention at every stage (strides 4/8/16/32), PVTv2-b1 widths by "
    "default; dense features for FPN and stereo",
    time="O(N d^2) per block with efficient attention (N: tokens of the stage)",
    memory="O(d^2) per head with efficient attention",
)(PyramidTransformer)


def _preset(name: str, description: str, **architecture: Any) -> None:
    """Register `name` as PyramidTransformer with `architecture` as its defaults (still overridable)."""
    BACKBONES.register(name, description=description)(partial(PyramidTransformer, **architecture))


_preset("pyramid_tiny", "pyramid with PVTv2-b0 widths/depths/heads (32,64,160,256; 2,2,2,2; 1,2,5,8); not PVTv2's "
        "attention", embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8))
_preset("pyramid_small", "pyramid with PVTv2-b2 widths/depths/heads (64,128,320,512; 3,4,6,3; 1,2,5,8); not PVTv2's "
        "attention", embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8))
