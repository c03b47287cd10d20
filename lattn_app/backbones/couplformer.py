"""Couplformer backbones (Lan, Wang, Shen, Liang, Wei; WACV 2023): coupling attention in two models.

- ``couplformer``: the flat CCT-style classifier of the reference code. A convolutional tokenizer (two
  conv 3x3 + ReLU + max-pool stages, so tokens sit on a stride-4 grid), a learnable position embedding,
  pre-norm transformer blocks and a sequence-pooling head (an attention-weighted average of the tokens;
  there is no class token, so every token stays on the grid that coupling attention needs).
- ``couplformer_hierarchical``: the Swin-like model of the reference. A 4x4 patch embedding, a fixed
  2D sine-cosine position embedding, four stages of blocks with *global* attention (no windows: the
  coupled map is cheap enough for the whole grid) and patch merging between stages (strides 4/8/16/32).

Both run coupling attention by default and take any registered token mixer instead (``attention=``),
so ``attention="softmax"`` builds the same network with regular attention (same parameter names and
count). For the paper's memory comparison against the "regular Transformer", which materialises the
N x N map, pass ``attention_options={"fused": False}`` too: the default fused softmax kernel never
stores that map and then needs less activation memory than coupling attention.

The reference runs many tiny heads (head size 1-4) because the coupled maps cost H^2 + W^2 per head;
the presets below keep that head size of 2. ImageNet recipe of the paper: AdamW lr 5e-4, weight decay
0.05, 10 warm-up epochs, 224x224, gradient clipping 1.0.

    >>> from lattn_app.backbones.couplformer import couplformer
    >>> model = couplformer(num_classes=100, img_size=32)          # the reference's CIFAR model
    >>> twin = couplformer(num_classes=100, img_size=32, attention="softmax")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models.swin_transformer import PatchMerging
from torch import Tensor, nn

from ..registry import BACKBONES, check_choice
from .base import Backbone, FeatureLevel, tokens_to_maps
from .blocks import TransformerBlock, mixer_options

Grid = tuple[int, int]
GLOBAL_POOLS = ("attention", "avg")


@dataclass(frozen=True)
class FlatPreset:
    """Size of a flat Couplformer."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float


# "small" is the configuration the reference README trains on CIFAR (6 layers, width 128, 64 heads,
# MLP ratio 3). "medium" and "large" are the widths/depths of the reference's kct_7 and kct_14 (CCT-7 and
# CCT-14 sizes) with the same head size of 2.
FLAT_PRESETS: dict[str, FlatPreset] = {
    "small": FlatPreset(depth=6, embed_dim=128, num_heads=64, mlp_ratio=3.0),
    "medium": FlatPreset(depth=7, embed_dim=256, num_heads=128, mlp_ratio=2.0),
    "large": FlatPreset(depth=14, embed_dim=384, num_heads=192, mlp_ratio=3.0),
}


def _drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic depth growing linearly from 0 in the first block to `drop_path_rate` in the last."""
    return torch.linspace(0, drop_path_rate, num_blocks).tolist()


def _init_weights(module: nn.Module) -> None:
    # The reference (and timm's ViT/Swin) initialisation: truncated normal linears, unit LayerNorms.
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SequencePooling(nn.Module):
    """CCT's sequence pooling: softmax over tokens of a learned score, then the score-weighted average.

    Unlike a class token it adds no token off the grid, and unlike mean pooling it lets the network
    choose which tokens matter.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Linear(dim, 1)

    def weights(self, tokens: Tensor) -> Tensor:
        """Pooling weights (B, N), each row summing to one."""
        return torch.softmax(self.attention(tokens).squeeze(-1), dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.einsum("bn,bnc->bc", self.weights(tokens), tokens)


class MeanPooling(nn.Module):
    """Average over tokens (Swin's global average pooling)."""

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens.mean(dim=1)


def _make_pool(global_pool: str, dim: int) -> nn.Module:
    check_choice("global_pool", global_pool, GLOBAL_POOLS)
    return SequencePooling(dim) if global_pool == "attention" else MeanPooling()


class ConvTokenizer(nn.Module):
    """CCT's convolutional tokenizer: `num_layers` x (conv 3x3, ReLU, max-pool 3x3 stride 2).

    Each layer halves the grid (rounding up), so two layers give the stride-4 tokens of the reference.
    """

    def __init__(self, in_chans: int, embed_dim: int, num_layers: int = 2, hidden_chans: int = 64) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"the tokenizer needs at least one conv layer; got num_layers={num_layers}")
        channels = [in_chans] + [hidden_chans] * (num_layers - 1) + [embed_dim]
        self.layers = nn.Sequential(
            *[
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                )
                for c_in, c_out in zip(channels[:-1], channels[1:])
            ]
        )
        self.stride = 2**num_layers
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def grid(self, image_size: Grid) -> Grid:
        """Token grid for an image of `image_size` (each max-pool rounds up)."""
        h, w = image_size
        for _ in self.layers:
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def forward(self, images: Tensor) -> tuple[Tensor, Grid]:
        maps = self.layers(images)
        return maps.flatten(2).transpose(1, 2), (maps.shape[-2], maps.shape[-1])


class Couplformer(Backbone):
    """Flat CCT-style Couplformer: conv tokenizer, pre-norm blocks, sequence pooling.

    Isotropic: every block sees the same stride-4 token grid, so the feature pyramid has a single
    level, the normalised final tokens as a (B, C, H/4, W/4) map. Input sizes other than `img_size`
    (including non-square ones) work; the learnable position embedding is resampled bicubically.
    """

    def __init__(
        self,
        *,
        depth: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        attention: str = "coupling",
        attention_options: dict[str, Any] | None = None,
        num_classes: int = 1000,
        img_size: int | Grid = 224,
        in_chans: int = 3,
        tokenizer_layers: int = 2,
        global_pool: str = "attention",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.img_size = to_2tuple(img_size)
        self.tokenizer = ConvTokenizer(in_chans, embed_dim, num_layers=tokenizer_layers)
        self.grid_size = self.tokenizer.grid(self.img_size)
        self.feature_info = [FeatureLevel(channels=embed_dim, stride=self.tokenizer.stride)]

        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        options = mixer_options(attention, attention_options, self.grid_size)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(embed_dim, num_heads, attention, options, mlp_ratio, drop_rate, rate)
                for rate in _drop_path_rates(drop_path_rate, depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier_parts = ("pool", "head")
        self.pool = _make_pool(global_pool, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(_init_weights)
        trunc_normal_(self.pos_embed, std=0.2)  # the reference's learnable embedding init

    def position_embedding(self, hw: Grid) -> Tensor:
        """The position embedding for a token grid `hw`, resampled when it differs from the built one."""
        if hw == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(hw), list(self.grid_size), num_prefix_tokens=0)

    def encode(self, images: Tensor) -> tuple[Tensor, Grid]:
        """Normalised final tokens (B, H/4 * W/4, C) and their grid."""
        tokens, hw = self.tokenizer(images)
        tokens = self.pos_drop(tokens + self.position_embedding(hw))
        for block in self.blocks:
            tokens = block(tokens, hw)
        return self.norm(tokens), hw

    def forward_features(self, images: Tensor) -> Tensor:
        return self.encode(images)[0]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool(features)
        return pooled if pre_logits else self.head(pooled)

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        tokens, hw = self.encode(images)
        return [tokens_to_maps(tokens, hw)]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


class CouplformerStage(nn.Module):
    """One stage of the hierarchical model: optional 2x2 patch merging, then global-attention blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        attention: str,
        attention_options: dict[str, Any],
        mlp_ratio: float,
        drop_rate: float,
        drop_path_rates: list[float],
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} must be divisible by its num_heads {num_heads}")
        self.downsample = PatchMerging(in_dim, out_dim=dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(dim, num_heads, attention, attention_options, mlp_ratio, drop_rate, rate)
                for rate in drop_path_rates
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C_in) -> (B, H', W', C), H' = ceil(H / 2) when the stage downsamples."""
        x = self.downsample(x)
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        for block in self.blocks:
            tokens = block(tokens, (height, width))
        return tokens.view(batch, height, width, channels)


# Repeats the flat model's options on purpose: each model's signature lists its options explicitly.
class CouplformerHierarchical(Backbone):
    """Swin-like Couplformer: 4x4 patches, stages with global attention and patch merging between them.

    No windows and no shifts: coupling attention covers the whole grid at H^2 + W^2 map memory per head.
    Any input size works; odd grids are padded by patch merging. The pyramid is the output of every
    stage, (B, C_i, ceil(H / s_i), ceil(W / s_i)) with s_i = 4, 8, 16, 32; the last level carries the
    final LayerNorm, the others are the raw stage outputs (as timm's Swin features).
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (48, 96, 192, 384),
        mlp_ratio: float = 4.0,
        attention: str = "coupling",
        attention_options: dict[str, Any] | None = None,
        num_classes: int = 1000,
        img_size: int | Grid = 224,
        in_chans: int = 3,
        patch_size: int = 4,
        global_pool: str = "attention",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(
                f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have one entry per stage"
            )
        if embed_dim % 4:
            raise ValueError(
                f"embed_dim {embed_dim} must be divisible by 4 (2D sine-cosine position embedding)"
            )
        self.num_classes = num_classes
        self.img_size = to_2tuple(img_size)
        widths = [embed_dim * 2**i for i in range(len(depths))]
        strides = [patch_size * 2**i for i in range(len(depths))]
        self.num_features = widths[-1]
        self.feature_info = [FeatureLevel(channels=c, stride=s) for c, s in zip(widths, strides)]

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.pos_drop = nn.Dropout(drop_rate)
        rates = _drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, (width, depth, heads, stride) in enumerate(zip(widths, depths, num_heads, strides)):
            grid = (-(-self.img_size[0] // stride), -(-self.img_size[1] // stride))
            first = sum(depths[:i])
            self.stages.append(
                CouplformerStage(
                    in_dim=widths[max(i - 1, 0)],
                    dim=width,
                    depth=depth,
                    num_heads=heads,
                    downsample=i > 0,
                    attention=attention,
                    attention_options=mixer_options(attention, attention_options, grid),
                    mlp_ratio=mlp_ratio,
                    drop_rate=drop_rate,
                    drop_path_rates=rates[first : first + depth],
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.classifier_parts = ("pool", "head")
        self.pool = _make_pool(global_pool, self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens (B, H/4, W/4, C) with the 2D sine-cosine position embedding added."""
        x = self.patch_embed(images)
        height, width, channels = x.shape[1:]
        # Fixed sine-cosine (the reference uses a fixed sine embedding): valid on any grid, no resampling.
        position = build_sincos2d_pos_embed([height, width], channels, device=x.device, dtype=x.dtype)
        return self.pos_drop(x + position.view(height, width, channels))

    def stage_outputs(self, images: Tensor) -> list[Tensor]:
        """Every stage's output (B, H_i, W_i, C_i); the last one normalised."""
        x = self.embed(images)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        outputs[-1] = self.norm(outputs[-1])
        return outputs

    def forward_features(self, images: Tensor) -> Tensor:
        """Normalised last-stage tokens (B, H/32 * W/32, C)."""
        return self.stage_outputs(images)[-1].flatten(1, 2)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool(features)
        return pooled if pre_logits else self.head(pooled)

    def forward_pyramid(self, images: Tensor) -> list[Tensor]:
        return [x.permute(0, 3, 1, 2) for x in self.stage_outputs(images)]


@BACKBONES.register(
    "couplformer",
    description="Couplformer (flat, CCT-style): conv tokenizer, stride-4 tokens, sequence pooling",
    time="O(N (H + W) C) per block with coupling attention",
    memory="O(H^2 + W^2) per head with coupling attention",
)
def couplformer(
    *,
    preset: str = "small",
    depth: int | None = None,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    attention: str = "coupling",
    attention_options: dict[str, Any] | None = None,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    global_pool: str = "attention",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
    pretrained: str | None = None,
) -> Couplformer:
    """Flat Couplformer of size `preset` ("small", "medium", "large"; see ``FLAT_PRESETS``).

    `depth`, `embed_dim`, `num_heads` and `mlp_ratio` override the preset's value when given.
    `attention` is any registered token mixer ("softmax" gives the regular-Transformer twin);
    `attention_options` go to it (e.g. ``{"variant": "pooling", "attn_drop": 0.1}`` for coupling).
    `global_pool` is "attention" (CCT's sequence pooling, the reference) or "avg".
    `pretrained`: weights to load (a file or a lattn ``.ckpt``; see ``Backbone.load_pretrained``).
    """
    check_choice("couplformer preset", preset, list(FLAT_PRESETS))
    size = FLAT_PRESETS[preset]
    model = Couplformer(
        depth=size.depth if depth is None else depth,
        embed_dim=size.embed_dim if embed_dim is None else embed_dim,
        num_heads=size.num_heads if num_heads is None else num_heads,
        mlp_ratio=size.mlp_ratio if mlp_ratio is None else mlp_ratio,
        attention=attention,
        attention_options=attention_options,
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        global_pool=global_pool,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if pretrained:
        model.load_pretrained(pretrained)
    return model


@BACKBONES.register(
    "couplformer_hierarchical",
    description="Couplformer (Swin-like): 4 stages of global coupled attention, strides 4/8/16/32",
    time="O(N (H + W) C) per block with coupling attention",
    memory="O(H^2 + W^2) per head with coupling attention",
)
def couplformer_hierarchical(
    *,
    embed_dim: int = 96,
    depths: tuple[int, ...] = (2, 2, 6, 2),
    num_heads: tuple[int, ...] = (48, 96, 192, 384),
    mlp_ratio: float = 4.0,
    attention: str = "coupling",
    attention_options: dict[str, Any] | None = None,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    global_pool: str = "attention",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.1,
    pretrained: str | None = None,
) -> CouplformerHierarchical:
    """Hierarchical Couplformer; the defaults are Swin-T's widths and depths (96, (2, 2, 6, 2)).

    Widths double every stage. `num_heads` defaults to head size 2 in every stage, the reference's
    many tiny heads. `attention`, `attention_options` and `global_pool` as in :func:`couplformer`.
    `img_size` only matters to mechanisms built for one grid (linformer, mixer). `pretrained` as in
    :func:`couplformer`.
    """
    model = CouplformerHierarchical(
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        mlp_ratio=mlp_ratio,
        attention=attention,
        attention_options=attention_options,
        num_classes=num_classes,
        img_size=img_size,
        in_chans=in_chans,
        global_pool=global_pool,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if pretrained:
        model.load_pretrained(pretrained)
    return model
